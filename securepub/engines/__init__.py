"""Cluster engines: what carries tickets, messages, history and presence (memory or Redis)."""
