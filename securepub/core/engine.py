"""How a validated message travels to every node's subscribers: the fan-out engine."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from zope.interface import Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

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
