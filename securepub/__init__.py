"""securepub: a secure publish/subscribe server for the web."""

__version__ = "0.1.0"
