"""How a validated message travels to every node's subscribers: the fan-out engine."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from zope.interface import Interface, implementer

#: ``deliver(topic, message_id, ts, body)``: hands a message to this node's sessions.
Deliver = Callable[[str, str, float, str], object]
#: ``disconnect(user)``: closes that user's sessions on this node.
Disconnect = Callable[[str], object]


class IFanout(Interface):
    """Carries messages between the nodes of a cluster (or within one node).

    The broker validates and numbers a message once, then hands it here;
    the engine brings it back to ``deliver`` on every node, this one
    included, where the broker's subscription index picks the sessions.
    """

    def start(deliver: Deliver, disconnect: Disconnect) -> None:
        """Remember where arriving messages and disconnections go (once, by the broker)."""

    def publish(topic: str, message_id: str, ts: float, body: str) -> Deferred[None]:
        """Send a message; errbacks with ``RequestError("unavailable", ...)``
        when the engine cannot take it (nothing was published then)."""

    def disconnect(user: str, message_id: str, ts: float) -> Deferred[None]:
        """Close ``user``'s sessions on every node; errbacks like `publish`."""


@implementer(IFanout)
class LocalFanout:
    """One node: a published message goes straight to this node's sessions."""

    def __init__(self) -> None:
        self._deliver: Deliver | None = None
        self._disconnect: Disconnect | None = None

    def start(self, deliver: Deliver, disconnect: Disconnect) -> None:
        self._deliver = deliver
        self._disconnect = disconnect

    def publish(self, topic: str, message_id: str, ts: float, body: str) -> Deferred[None]:
        assert self._deliver is not None, "start() was not called"
        self._deliver(topic, message_id, ts, body)
        return succeed(None)

    def disconnect(self, user: str, message_id: str, ts: float) -> Deferred[None]:
        assert self._disconnect is not None, "start() was not called"
        self._disconnect(user)
        return succeed(None)
