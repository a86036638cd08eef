"""WebSocket tickets: single-use, short-lived, optionally bound to one client IP."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from zope.interface import Interface

from securepub.core.topics import Pattern

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

__all__ = [
    "REFUSAL_REASONS",
    "ITicketStore",
    "SecondsClock",
    "StoreUnavailable",
    "Ticket",
    "TicketRefused",
    "normalize_ip",
]


class SecondsClock(Protocol):
    """The part of ``IReactorTime`` used here: the reactor or a ``task.Clock``.

    A Protocol rather than ``IReactorTime`` itself because mypy, without the
    mypy-zope plugin, misreads zope interface methods (no ``self``).
    """

    def seconds(self) -> float: ...


TOKEN_BYTES: Final = 32
"""Randomness per token: 256 bits, far above the SPEC's 128-bit floor."""

TOKEN_LENGTH: Final = 43
"""Length of a token: unpadded base64url of ``TOKEN_BYTES`` bytes."""

_TOKEN_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]{43}")

REFUSAL_REASONS: Final = frozenset({"unknown", "expired", "already_redeemed", "wrong_ip"})


def normalize_ip(text: str) -> str:
    """Return the canonical text of an IPv4 or IPv6 address.

    IPv4-mapped IPv6 addresses (``::ffff:192.0.2.1``, what a dual-stack
    socket reports for an IPv4 peer) become the IPv4 address, so a ticket
    bound to ``192.0.2.1`` matches however the peer's address is spelled.
    Zoned IPv6 addresses (``fe80::1%eth0``) and anything that is not an
    address raise ``ValueError``.
    """
    if not isinstance(text, str):
        raise ValueError("not an IP address")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError("not an IP address") from None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            raise ValueError("zoned IPv6 addresses are not accepted")
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
    return str(address)


@dataclass(frozen=True, slots=True)
class Ticket:
    """What a backend granted one browser, stored until redeemed or expired.

    ``subscribe`` and ``publish`` hold compiled topic patterns; the store
    treats them as opaque. ``client_ip`` is normalized on construction
    (``ValueError`` if it is not an address); ``expires_at`` must be finite
    so a ticket cannot be made immortal by a NaN.
    """

    user: str
    client_ip: str | None
    subscribe: tuple[Pattern, ...]
    publish: tuple[Pattern, ...]
    expires_at: float
    #: How long a session opened (or refreshed) with this ticket may last, in
    #: seconds; None for the node's ``[limits] max_session_seconds``.
    session_ttl: float | None = None

    def __post_init__(self) -> None:
        if self.client_ip is not None:
            object.__setattr__(self, "client_ip", normalize_ip(self.client_ip))
        object.__setattr__(self, "subscribe", tuple(self.subscribe))
        object.__setattr__(self, "publish", tuple(self.publish))
        if not math.isfinite(self.expires_at):
            raise ValueError("expires_at must be a finite number")
        if self.session_ttl is not None and not (
            math.isfinite(self.session_ttl) and self.session_ttl > 0
        ):
            raise ValueError("session_ttl must be a positive number")

    def binds(self, peer_ip: str) -> bool:
        """Whether a connection from ``peer_ip`` may redeem this ticket."""
        if self.client_ip is None:
            return True
        try:
            return normalize_ip(peer_ip) == self.client_ip
        except ValueError:
            return False


class TicketRefused(Exception):
    """A redemption failed; ``reason`` says why, for the log only.

    The client is told 403 whatever the reason (SPEC section 3). The token
    is never passed in, so neither ``str()`` nor ``repr()`` can show it.
    """

    def __init__(self, reason: str) -> None:
        if reason not in REFUSAL_REASONS:
            raise ValueError(f"unknown refusal reason {reason!r}")
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"ticket refused: {self.reason}"


class StoreUnavailable(Exception):
    """The ticket store cannot answer now (e.g. Redis is down): answer 503."""


class ITicketStore(Interface):
    """Issues tickets and redeems each at most once, atomically.

    Both methods return Deferreds; an implementation may fire them
    synchronously (memory) or later (Redis), and callers handle both.
    """

    def issue(ticket: Ticket) -> Deferred[str]:
        """Store ``ticket`` and fire with a fresh token (base64url, 256 bits).

        Errbacks with ``StoreUnavailable`` when the store cannot take it.
        """

    def redeem(token: str, peer_ip: str) -> Deferred[Ticket]:
        """Consume the ticket for ``token``, presented from ``peer_ip``.

        The first attempt consumes the ticket whatever its outcome. Fires
        with the ``Ticket``, or errbacks with ``TicketRefused`` (reason
        ``unknown``, ``expired``, ``already_redeemed`` or ``wrong_ip``)
        or ``StoreUnavailable``.
        """

    def size() -> int:
        """Number of entries held (live tickets and tombstones), for metrics."""

    def revoke_user(user: str) -> Deferred[int]:
        """Make every unredeemed ticket of ``user`` unusable; fire with how many."""


def encode_token(raw: bytes) -> str:
    """A token's text: unpadded base64url of its random bytes."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def is_token(token: object) -> bool:
    """Whether ``token`` has a token's shape (checked before any lookup)."""
    return (
        isinstance(token, str)
        and len(token) == TOKEN_LENGTH
        and _TOKEN_SHAPE.fullmatch(token) is not None
    )


def token_key(token: str) -> bytes:
    """What a store keeps instead of the token: its SHA-256."""
    return hashlib.sha256(token.encode("ascii")).digest()
