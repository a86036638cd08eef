"""Clients: the blocking and Twisted publishers, the securepub command, securepub.js."""
