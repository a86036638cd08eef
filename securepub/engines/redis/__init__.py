"""The Redis engine: tickets, fan-out, history and presence shared by every node."""
