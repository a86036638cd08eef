"""The embedded fan-out engine: one node, messages go straight to its own sessions."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from securepub.core.engine import Deliver, Disconnect, IFanout


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
