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
  ``epoll``, exactly as before;
* :class:`LeanTLSProtocol` gives OpenSSL fresh memory BIOs once a big
  transfer has gone through them. A memory BIO's buffer never shrinks:
  every idle connection kept the 1.7 KiB of its handshake flight (and a
  browser's 1.5 KiB X25519MLKEM768 ClientHello), and one that was ever sent
  a 64 KiB message kept 21 KiB more (``bench/conn_breakdown.py
  --openssl-micro``).

Nothing else changes: the order of bytes, flow control (a producer is
paused and resumed by the same code as before) and the way a broken
connection is noticed (a failing send leaves the bytes queued and the
reactor's next write attempt reports the loss, never this call).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from OpenSSL.SSL import WantReadError
from twisted.internet import tcp
from twisted.internet.error import AlreadyCalled, AlreadyCancelled
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "ImmediateWriteServer",
    "LeanTLSProtocol",
    "TurnClock",
    "lean_tls_factory",
    "use_immediate_writes",
]

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
            call.func = _nothing
            call.args = ()


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


#: A flush this big leaves a buffer worth giving back (the handshake's is 1.7 KiB).
FRESH_BIO_AFTER = 1024

_binding: Any = None


def _openssl() -> Any:
    """cryptography's OpenSSL bindings (``lib``, ``ffi``), the ones pyOpenSSL itself calls."""
    global _binding
    if _binding is None:
        from cryptography.hazmat.bindings.openssl.binding import Binding

        _binding = Binding
    return _binding


def _bios(connection: Any) -> tuple[Any, Any, Any] | None:
    """``connection``'s SSL pointer and memory BIOs, where pyOpenSSL keeps them."""
    ssl = getattr(connection, "_ssl", None)
    into = getattr(connection, "_into_ssl", None)
    out = getattr(connection, "_from_ssl", None)
    if ssl is None or into is None or out is None:
        return None
    return ssl, into, out


def renew_write_bio(connection: Any) -> bool:
    """Give ``connection`` (a memory-BIO ``OpenSSL.SSL.Connection``) an empty outgoing BIO.

    Only call it with the outgoing BIO drained: what is left in it is lost.
    ``SSL_set_bio`` with the incoming BIO unchanged frees the old outgoing
    one (and moves OpenSSL's own write buffering onto the new one).
    Returns False, changing nothing, if this pyOpenSSL does not hold its
    BIOs where this expects them.
    """
    bios = _bios(connection)
    if bios is None:
        return False
    ssl, into, _ = bios
    lib = _openssl().lib
    fresh = lib.BIO_new(lib.BIO_s_mem())
    if not fresh:
        return False  # out of memory: keep the old one
    lib.SSL_set_bio(ssl, into, fresh)
    connection._from_ssl = fresh
    return True


def renew_read_bio(connection: Any) -> bool:
    """Give ``connection`` a new incoming BIO, moving into it what OpenSSL has not read.

    Normally nothing is left (OpenSSL takes every byte it was given into
    its own record buffer before it asks for more); whatever is, moves
    over in order. ``SSL_set_bio`` with the outgoing BIO unchanged frees
    the old incoming one. Returns False, changing nothing, where pyOpenSSL
    keeps its BIOs elsewhere or memory is short.
    """
    bios = _bios(connection)
    if bios is None:
        return False
    ssl, into, out = bios
    binding = _openssl()
    lib, ffi = binding.lib, binding.ffi
    fresh = lib.BIO_new(lib.BIO_s_mem())
    if not fresh:
        return False
    chunk = ffi.new("char[]", 4096)
    while (n := lib.BIO_read(into, chunk, 4096)) > 0:
        if lib.BIO_write(fresh, chunk, n) != n:  # pragma: no cover - malloc failed
            lib.BIO_free(fresh)
            # Bytes are lost: the connection cannot go on (Twisted drops it).
            raise MemoryError("cannot move TLS input to a new BIO")
    lib.SSL_set_bio(ssl, fresh, out)
    connection._into_ssl = fresh
    return True


class LeanTLSProtocol(BufferingTLSTransport):
    """Twisted's buffering TLS transport, handing back memory BIO buffers after big transfers.

    A BIO is renewed once the handshake is done after 1 KiB or more went
    through it at once: the handshake's own flights (a browser's
    X25519MLKEM768 ClientHello alone is 1.5 KiB) or a big message. It also
    sends everything OpenSSL has written, where Twisted takes at most 32 KiB
    per flush (twisted/twisted#5095).
    """

    _renew_bio = False
    _renew_rbio = False
    _can_renew = True

    def dataReceived(self, data: bytes) -> None:
        if len(data) >= FRESH_BIO_AFTER:
            self._renew_rbio = True
        super().dataReceived(data)
        connection = self._tlsConnection
        if (
            self._renew_rbio
            and self._handshakeDone
            and self._can_renew
            and connection is not None
            and not self._lostTLSConnection
        ):
            self._renew_rbio = False
            self._can_renew = renew_read_bio(connection)

    def _flushSendBIO(self) -> None:
        connection = self._tlsConnection
        transport = self.transport
        assert transport is not None  # flushed only while connected, as in Twisted
        while True:
            try:
                data = connection.bio_read(2**15)
            except WantReadError:
                break
            if len(data) >= FRESH_BIO_AFTER:
                self._renew_bio = True
            transport.write(data)
        if self._renew_bio and self._handshakeDone and self._can_renew:
            self._renew_bio = False
            self._can_renew = renew_write_bio(connection)


class _LeanTLSFactory(TLSMemoryBIOFactory):
    protocol = LeanTLSProtocol


def lean_tls_factory(tls: Any, factory: Any, clock: TurnClock) -> TLSMemoryBIOFactory:
    """The server-side TLS wrapper of ``factory``: lean protocols, flushing on ``clock``."""
    return _LeanTLSFactory(tls, False, factory, clock=clock)


def use_immediate_writes(port: IListeningPort) -> IListeningPort:
    """Make the connections ``port`` accepts from now on :class:`ImmediateWriteServer`."""
    port.transport = ImmediateWriteServer  # type: ignore[attr-defined]
    return port
