"""The listener's TLS protocol: Twisted's, with memory BIOs that give their buffers back.

pyOpenSSL talks to OpenSSL through two memory BIOs per connection, and a
memory BIO's buffer never shrinks: every idle connection kept the 1.7 KiB
of its handshake flight (and a browser's 1.5 KiB X25519MLKEM768
ClientHello), and one that was ever sent a 64 KiB message kept 21 KiB
more (``bench/conn_breakdown.py --openssl-micro``). :class:`LeanTLSProtocol`
gives OpenSSL fresh BIOs once a big transfer has gone through them.

The BIOs are where pyOpenSSL keeps them (``Connection._into_ssl`` and
``_from_ssl``); where a pyOpenSSL release keeps them elsewhere, nothing is
renewed and everything else works as before (tests/test_transport.py fails
loudly first).
"""

from __future__ import annotations

from typing import Any

from OpenSSL.SSL import WantReadError
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory

from securepub.server.transport import TurnClock

__all__ = ["LeanTLSProtocol", "lean_tls_factory", "renew_read_bio", "renew_write_bio"]

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
            if len(data) < 2**15:
                break  # a memory BIO gives all it holds: it is empty now
        if self._renew_bio and self._handshakeDone and self._can_renew:
            self._renew_bio = False
            self._can_renew = renew_write_bio(connection)


class _LeanTLSFactory(TLSMemoryBIOFactory):
    protocol = LeanTLSProtocol


def lean_tls_factory(tls: Any, factory: Any, clock: TurnClock) -> TLSMemoryBIOFactory:
    """The server-side TLS wrapper of ``factory``: lean protocols, flushing on ``clock``."""
    return _LeanTLSFactory(tls, False, factory, clock=clock)
