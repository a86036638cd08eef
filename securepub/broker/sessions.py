"""Sessions as the broker sees them, and the small interface it delivers through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zope.interface import Interface, implementer

from securepub.core.ratelimit import TokenBucket
from securepub.core.topics import Pattern


class ISubscriber(Interface):
    """Where the broker hands a session's deliveries (a WebSocket, or a test fake)."""

    def send_prepared(prepared: Any) -> None:
        """Send one frame made by the broker's ``prepare`` callable."""

    def revoke() -> None:
        """The session was revoked: close the connection (it left the broker already)."""

    def expire() -> None:
        """The session's lifetime is over: close the connection (it left the broker already)."""


@implementer(ISubscriber)
class RecordingSubscriber:
    """An `ISubscriber` that keeps what it is sent; for tests and tools."""

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.revoked = False
        self.expired = False

    def send_prepared(self, prepared: Any) -> None:
        self.sent.append(prepared)

    def revoke(self) -> None:
        self.revoked = True

    def expire(self) -> None:
        self.expired = True


@dataclass(frozen=True, slots=True)
class Grants:
    """What a ticket allows: patterns to subscribe to and to publish on."""

    subscribe: tuple[Pattern, ...] = ()
    publish: tuple[Pattern, ...] = ()


class Session:
    """One authenticated connection as the broker sees it."""

    __slots__ = (
        "__weakref__",
        "bucket",
        "grants",
        "id",
        "peer",
        "present",
        "subscriber",
        "subscriptions",
        "user",
    )

    def __init__(
        self,
        id: str,
        user: str,
        grants: Grants,
        peer: str,
        subscriber: ISubscriber,
        bucket: TokenBucket,
    ) -> None:
        self.id = id
        self.user = user
        self.grants = grants
        self.peer = peer
        self.subscriber = subscriber
        self.bucket = bucket
        #: pattern text -> Pattern, in subscription order
        self.subscriptions: dict[str, Pattern] = {}
        #: exact topics this session is counted present on (made on first use)
        self.present: set[str] | None = None

    def __repr__(self) -> str:
        return f"<Session {self.id} user={self.user!r}>"
