"""The lean listener: one flush call per turn, bytes sent when written, BIOs that shrink."""

from __future__ import annotations

import socket
from typing import Any

from OpenSSL import SSL
from twisted.internet import main
from twisted.internet.error import AlreadyCalled, AlreadyCancelled
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from securepub.dev.certs import ensure_dev_certs
from securepub.server.tls import server_context_factory
from securepub.server.tls_bios import (
    LeanTLSProtocol,
    lean_tls_factory,
    renew_read_bio,
    renew_write_bio,
)
from securepub.server.transport import ImmediateWriteServer, TurnClock
from tests.tmp import private_tmpdir


class TurnClockTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = Clock()
        self.clock = TurnClock(self.reactor)
        self.calls: list[Any] = []

    def test_one_reactor_call_runs_a_turns_calls_in_order(self) -> None:
        for n in range(3):
            self.clock.callLater(0, self.calls.append, n)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 4)  # the batch + its 3 calls
        self.reactor.advance(0)
        self.assertEqual(self.calls, [0, 1, 2])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_a_cancelled_call_does_not_run(self) -> None:
        first = self.clock.callLater(0, self.calls.append, 1)
        second = self.clock.callLater(0, self.calls.append, 2)
        self.assertTrue(first.active())
        first.cancel()
        self.assertFalse(first.active())
        self.assertRaises(AlreadyCancelled, first.cancel)
        self.reactor.advance(0)
        self.assertEqual(self.calls, [2])
        self.assertFalse(second.active())
        self.assertRaises(AlreadyCalled, second.cancel)

    def test_a_call_made_by_the_batch_goes_into_a_new_batch(self) -> None:
        def again() -> None:
            self.calls.append("first")
            self.clock.callLater(0, self.calls.append, "next turn")
            # Its own reactor call: the reactor runs it in its next turn.
            self.calls.append(len(self.reactor.getDelayedCalls()))

        self.clock.callLater(0, again)
        self.reactor.advance(0)
        self.assertEqual(self.calls, ["first", 1, "next turn"])

    def test_one_failing_call_is_logged_and_the_others_run(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def boom() -> None:
            raise ValueError("flush failed")

        self.clock.callLater(0, boom)
        self.clock.callLater(0, self.calls.append, "after")
        self.reactor.advance(0)
        self.assertEqual(self.calls, ["after"])
        failed = [e for e in events if e.get("securepub_event") == "internal_error"]
        self.assertEqual(len(failed), 1)
        self.assertIsInstance(failed[0]["log_failure"].value, ValueError)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_delays_and_keywords_go_to_the_reactor(self) -> None:
        call = self.clock.callLater(5, self.calls.append, "later")
        self.clock.callLater(0, lambda **kw: self.calls.append(kw), key="word")
        self.assertEqual(len(self.reactor.getDelayedCalls()), 2)
        self.reactor.advance(0)
        self.assertEqual(self.calls, [{"key": "word"}])
        self.assertTrue(call.active())
        self.reactor.advance(5)
        self.assertEqual(self.calls, [{"key": "word"}, "later"])
        self.assertEqual(self.clock.seconds(), 5)


class _Port:
    _realPortNumber = 443


class ImmediateWriteServerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactor()
        ours, self.peer = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(self.peer.close)
        ours.setblocking(False)
        self.peer.setblocking(False)
        # Small buffers, so that "the socket takes only part" is easy to reach.
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.protocol = Protocol()
        self.server = ImmediateWriteServer(
            ours, self.protocol, ("127.0.0.1", 1), _Port(), 1, self.reactor
        )
        self.protocol.makeConnection(self.server)

    def received(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                return b"".join(chunks)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def test_a_write_with_nothing_queued_is_sent_at_once(self) -> None:
        self.server.write(b"hello")
        self.server.writeSequence([b" ", b"world"])
        self.assertEqual(self.received(), b"hello world")
        self.assertNotIn(self.server, self.reactor.getWriters())
        self.assertEqual(self.server.dataBuffer, b"")
        self.assertEqual(self.server._tempDataBuffer, [])

    def test_what_the_socket_does_not_take_waits_in_order(self) -> None:
        big = bytes(range(256)) * 4096  # 1 MiB: more than the socket buffers hold
        self.server.write(big)
        self.assertIn(self.server, self.reactor.getWriters())
        self.server.write(b"tail")  # queued behind, never sent ahead
        got = b""
        for _ in range(10_000):
            got += self.received()
            if self.server.doWrite() is not None:
                self.fail("write failed")
            if self.server not in self.reactor.getWriters():
                break
        got += self.received()
        self.assertEqual(got, big + b"tail")

    def test_nothing_is_sent_at_once_after_lose_connection(self) -> None:
        self.server.write(b"x" * (1 << 20))
        self.server.loseConnection()
        self.received()
        self.server.write(b"late")  # queued; doWrite sends it before closing
        self.assertIn(self.server, self.reactor.getWriters())

    def test_a_paused_producer_takes_the_usual_way(self) -> None:
        self.server.producerPaused = True
        self.server.write(b"held")
        self.assertIn(self.server, self.reactor.getWriters())
        self.assertEqual(self.received(), b"")
        self.assertIsNone(self.server.doWrite())
        self.assertEqual(self.received(), b"held")

    def test_a_broken_connection_is_reported_by_do_write_not_by_write(self) -> None:
        self.peer.close()
        self.server.write(b"one")  # may still reach the kernel before the reset
        self.server.write(b"two")
        for _ in range(3):
            result = self.server.doWrite()
            if result is not None:
                break
            self.server.write(b"more")
        self.assertIs(result, main.CONNECTION_LOST)


class _Echo(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if data == b"ping":
            self.transport.write(b"pong")  # type: ignore[union-attr]


class LeanTLSProtocolTests(SynchronousTestCase):
    """Over a real TLS 1.3 session (pyOpenSSL on both ends, bytes pumped in memory)."""

    def setUp(self) -> None:
        certs = ensure_dev_certs(private_tmpdir(self))
        self.clock = Clock()
        server_factory = lean_tls_factory(
            server_context_factory(certs.cert, certs.key),
            Factory.forProtocol(_Echo),
            TurnClock(self.clock),
        )
        client_factory = TLSMemoryBIOFactory(
            CertificateOptions(), True, Factory.forProtocol(_Echo), clock=self.clock
        )
        self.client, self.server, self.pump = connectedServerAndClient(
            lambda: server_factory.buildProtocol(None),
            lambda: client_factory.buildProtocol(None),
            greet=False,
            clock=self.clock,
        )

    def flush(self) -> None:
        for _ in range(20):
            self.clock.advance(0)
            self.pump.pump()

    def outgoing_bio(self) -> Any:
        return self.server._tlsConnection._from_ssl

    def test_the_handshakes_buffer_is_handed_back(self) -> None:
        self.assertIsInstance(self.server, LeanTLSProtocol)
        handshake_bio = self.outgoing_bio()
        self.client.write(b"ping")
        self.flush()  # the first flush after the handshake renews the BIO
        self.assertTrue(self.server._handshakeDone)
        self.assertNotEqual(self.outgoing_bio(), handshake_bio)
        self.assertEqual(self.client.wrappedProtocol.received, b"pong")

    def test_a_big_write_arrives_whole_and_the_session_goes_on(self) -> None:
        self.flush()
        self.client.write(b"ping")
        self.flush()
        small_bio = self.outgoing_bio()
        self.server.write(b"pong")
        self.flush()
        self.assertEqual(self.outgoing_bio(), small_bio)  # small flushes keep it
        big = bytes(range(256)) * 400  # 100 KiB: several records, over 32 KiB a flush
        self.server.write(big)
        self.flush()
        self.assertNotEqual(self.outgoing_bio(), small_bio)
        self.assertEqual(self.client.wrappedProtocol.received, b"pongpong" + big)
        self.server.write(b"after")
        self.client.write(b"ping")
        self.flush()
        self.assertTrue(self.client.wrappedProtocol.received.endswith(b"afterpong"))

    def test_a_big_client_hello_leaves_no_buffer_behind(self) -> None:
        """The client offers X25519MLKEM768 (a 1.5 KiB ClientHello): once the
        handshake is done the incoming BIO is a fresh one too."""
        hello_bio = self.server._tlsConnection._into_ssl
        self.client.write(b"ping")
        self.flush()
        self.assertNotEqual(self.server._tlsConnection._into_ssl, hello_bio)
        self.client.write(b"ping")
        self.flush()
        self.assertEqual(self.client.wrappedProtocol.received, b"pongpong")

    def test_renewing_the_incoming_bio_moves_what_openssl_has_not_read(self) -> None:
        server, client = _handshaken_pair(private_tmpdir(self))
        client.send(b"first")
        client.send(b"second")
        server.bio_write(client.bio_read(65536))  # two records, not read yet
        old = server._into_ssl
        self.assertTrue(renew_read_bio(server))
        self.assertNotEqual(server._into_ssl, old)
        got = b""
        while len(got) < len(b"firstsecond"):
            got += server.recv(100)
        self.assertEqual(got, b"firstsecond")

    def test_renewal_changes_nothing_where_pyopenssl_keeps_its_bios_elsewhere(self) -> None:
        class Elsewhere:
            _ssl = object()

        self.assertFalse(renew_write_bio(Elsewhere()))
        self.assertFalse(renew_read_bio(Elsewhere()))


def _handshaken_pair(directory: str) -> tuple[SSL.Connection, SSL.Connection]:
    """A server and a client ``SSL.Connection`` over memory BIOs, handshake done."""
    certs = ensure_dev_certs(directory)
    server = SSL.Connection(server_context_factory(certs.cert, certs.key).getContext(), None)
    server.set_accept_state()
    client = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    client.set_connect_state()
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
        for src, dst in ((client, server), (server, client)):
            try:
                dst.bio_write(src.bio_read(65536))
            except SSL.WantReadError:
                pass
    return server, client
