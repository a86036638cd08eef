"""The listener's TCP side: bytes go out when they are written, TLS flushes once per turn.

Twisted's TLS layer already gathers one connection's writes of a reactor turn
into one TLS record (``_AggregateSmallWrites``), but it pays for that with a
``DelayedCall`` per connection per turn, and the TCP transport under it then
waits for the next ``epoll`` round to send: two ``epoll_ctl`` calls, a
wake-up and a dispatch per connection per turn. In a fan-out, where every
subscriber gets a few frames each turn, those were a quarter of the server's
time (``bench/run.py --profile``). Here:

* :class:`TurnClock` is the clock handed to ``TLSMemoryBIOFactory``: every
  ``callLater(0, ...)`` of a turn is run by one ``DelayedCall``, in order;
* :class:`ImmediateWriteServer` sends written bytes at once when nothing is
  queued before them; only what the socket does not take waits for
  ``epoll``, exactly as before.

The TLS protocol above it is ``securepub.server.tls_bios``'s.

Nothing else changes: the order of bytes, flow control (a producer is
paused and resumed by the same code as before) and the way a broken
connection is noticed (a failing send leaves the bytes queued and the
reactor's next write attempt reports the loss, never this call).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.error import AlreadyCalled, AlreadyCancelled
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["ImmediateWriteServer", "TurnClock", "use_immediate_writes"]

_log = Logger()


@implementer(IDelayedCall)
class _TurnCall:
    """One ``callLater(0, ...)`` waiting for the end of the turn; cancel() drops it."""

    __slots__ = ("_clock", "args", "func", "state")

    def __init__(
        self, clock: TurnClock, func: Callable[..., object], args: tuple[Any, ...]
    ) -> None:
        self._clock = clock
        self.func = func
        self.args = args
        self.state = 0  # 0 pending, 1 called, 2 cancelled

    def getTime(self) -> float:
        return self._clock.seconds()

    def cancel(self) -> None:
        if self.state:
            raise AlreadyCalled() if self.state == 1 else AlreadyCancelled()
        self.state = 2
        self.func = _nothing  # let go of what it would have called
        self.args = ()

    def delay(self, secondsLater: float) -> None:
        raise NotImplementedError("a turn call runs at the end of this turn")

    def reset(self, secondsFromNow: float) -> None:
        raise NotImplementedError("a turn call runs at the end of this turn")

    def active(self) -> bool:
        return self.state == 0


def _nothing(*args: Any) -> None:
    return None


@implementer(IReactorTime)
class TurnClock:
    """An ``IReactorTime`` whose zero-delay calls of one turn share one ``DelayedCall``.

    Calls run in the order they were made, each on its own: one that raises
    is logged (as the reactor would) and the others still run. A call made
    while the batch runs waits for the next turn, as ``callLater(0)`` would.
    Non-zero delays go to the reactor unchanged.
    """

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        self._pending: list[_TurnCall] = []
        self._scheduled: IDelayedCall | None = None

    def seconds(self) -> float:
        return self._reactor.seconds()

    def getDelayedCalls(self) -> list[IDelayedCall]:
        return [*self._reactor.getDelayedCalls(), *(c for c in self._pending if c.state == 0)]

    def callLater(
        self,
        delay: float,
        callable: Callable[..., Any],
        *args: object,
        **kwargs: object,
    ) -> IDelayedCall:
        if delay > 0 or kwargs:
            return self._reactor.callLater(delay, callable, *args, **kwargs)
        call = _TurnCall(self, callable, args)
        self._pending.append(call)
        if self._scheduled is None:
            self._scheduled = self._reactor.callLater(0, self._run)
        return call

    def _run(self) -> None:
        self._scheduled = None
        batch, self._pending = self._pending, []
        for call in batch:
            if call.state:
                continue
            call.state = 1
            try:
                call.func(*call.args)
            except Exception:  # noqa: BLE001 - logged; the rest of the batch still runs
                _log.failure("a write flush failed", Failure(), securepub_event="internal_error")


class ImmediateWriteServer(tcp.Server):
    """A ``tcp.Server`` that sends at once what it is given while nothing waits before it.

    ``FileDescriptor.write`` queues the bytes and then calls
    :meth:`startWriting`; when these bytes are all that is queued (so no
    earlier ones wait for ``epoll`` and the transport is not registered for
    writing), they are sent now. Whatever the socket does not take, and
    everything in the cases below, takes Twisted's usual way.
    """

    def startWriting(self) -> None:
        if (
            self._tempDataLen
            and not self.dataBuffer
            and self.connected
            and not self.disconnecting
            and not self._writeDisconnecting
            and not self._aborting
            and not self.producerPaused
        ):
            pending = self._tempDataBuffer
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            try:
                sent = self.socket.send(data)
            except OSError:
                # Gone or not now: either way the bytes stay queued, and the
                # reactor's doWrite() sends them or reports the loss in its turn.
                sent = 0
            if sent == len(data):
                pending.clear()
                self._tempDataLen = 0
                return
            self.dataBuffer = data
            self.offset = sent
            self._tempDataBuffer = []
            self._tempDataLen = 0
        super().startWriting()


def use_immediate_writes(port: IListeningPort) -> IListeningPort:
    """Make the connections ``port`` accepts from now on :class:`ImmediateWriteServer`."""
    port.transport = ImmediateWriteServer  # type: ignore[attr-defined]
    return port
