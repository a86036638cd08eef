"""The embedded fan-out engine: one node, messages go straight to its own sessions."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from securepub.core.engine import IFanout, IReceiver
from securepub.core.history import HistoryPolicy, Position, Publication
from securepub.core.topics import Pattern
from securepub.engines.memory.history import MemoryHistory


@implementer(IFanout)
class LocalFanout:
    """One node: a publication is numbered (with history), kept, and delivered here.

    Everything happens in one call on the reactor's thread, so numbering,
    storing and delivering a message cannot interleave with a subscribe.
    """

    def __init__(self, history: MemoryHistory | None = None) -> None:
        self._receiver: IReceiver | None = None
        self._history = history

    def start(self, receiver: IReceiver) -> None:
        self._receiver = receiver

    def publish(
        self, publication: Publication, history: HistoryPolicy | None
    ) -> Deferred[Position | None]:
        assert self._receiver is not None, "start() was not called"
        position = None
        if history is not None:
            assert self._history is not None, "a topic keeps history but the engine has none"
            publication = self._history.append(publication, history)
            assert publication.offset is not None and publication.epoch is not None
            position = Position(publication.offset, publication.epoch)
        self._receiver.deliver(publication)
        return succeed(position)

    def disconnect(self, user: str, message_id: str, ts: float) -> Deferred[None]:
        assert self._receiver is not None, "start() was not called"
        self._receiver.disconnect_local(user)
        return succeed(None)

    def watch(self, pattern: Pattern) -> Deferred[None]:
        """Everything published here is delivered here: nothing to wait for."""
        return succeed(None)

    def unwatch(self, pattern: Pattern) -> None:
        pass
