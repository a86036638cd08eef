"""How a validated message travels to every node's subscribers: the fan-out engine."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from zope.interface import Interface, implementer

#: ``deliver(topic, message_id, ts, body)``: hands a message to this node's sessions.
Deliver = Callable[[str, str, float, str], object]


class IFanout(Interface):
    """Carries messages between the nodes of a cluster (or within one node).

    The broker validates and numbers a message once, then hands it here;
    the engine brings it back to ``deliver`` on every node, this one
    included, where the broker's subscription index picks the sessions.
    """

    def start(deliver: Deliver) -> None:
        """Remember where arriving messages go; called once by the broker."""

    def publish(topic: str, message_id: str, ts: float, body: str) -> Deferred[None]:
        """Send a message; errbacks with ``RequestError("unavailable", ...)``
        when the engine cannot take it (nothing was published then)."""


@implementer(IFanout)
class LocalFanout:
    """One node: a published message goes straight to this node's sessions."""

    def __init__(self) -> None:
        self._deliver: Deliver | None = None

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver

    def publish(self, topic: str, message_id: str, ts: float, body: str) -> Deferred[None]:
        assert self._deliver is not None, "start() was not called"
        self._deliver(topic, message_id, ts, body)
        return succeed(None)
