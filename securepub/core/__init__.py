"""The domain: topics, grants, tickets, validation, origin policy, limits; no I/O, no Autobahn."""
