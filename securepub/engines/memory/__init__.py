"""The embedded engine: everything in this process, for one node."""
