"""The node: settings, TLS, the site and its resources, the WebSocket protocol, the service."""
