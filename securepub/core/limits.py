"""The per-message and per-connection bounds every part of a node enforces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-message and per-connection bounds (SPEC section 6, ``[limits]``)."""

    max_message_bytes: int = 65536
    max_json_depth: int = 32
    max_subscriptions: int = 100
    max_connections_per_ip: int = 100
    max_publish_rate: float = 50.0
    max_errors: int = 50
    max_queued_bytes: int = 1024 * 1024
    #: What the embedded engine may hold in history, all topics together.
    max_history_bytes: int = 256 * 1024 * 1024
    #: A session's lifetime: the default and the most a ticket may ask for ...
    max_session_seconds: int = 3600
    #: ... and the least (SPEC: 60; lower it only to test refreshes quickly).
    min_session_seconds: int = 60
    #: Connections still opening (TLS handshake, first request headers, ticket
    #: redemption) the node takes at once: past half of it an upgrade is
    #: answered 503 with Retry-After, past all of it a new connection is dropped.
    max_opening_connections: int = 2000

    @property
    def max_frame_bytes(self) -> int:
        """The largest frame, HTTP body or reassembled message accepted at all."""
        return self.max_message_bytes + 4096
