"""The WebSocket protocol on fakes: handshake decisions and replies to every bad frame."""

from __future__ import annotations

import json
import struct
from typing import Any

import txaio
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from txaio.testutil import replace_loop

from securepub.broker.broker import Broker
from securepub.core.clientip import ProxyPolicy
from securepub.core.history import HistoryPolicy
from securepub.core.limits import Limits
from securepub.core.origin import OriginPolicy
from securepub.core.tickets import StoreUnavailable, Ticket
from securepub.core.topics import Pattern
from securepub.core.validation import PayloadValidator, TopicRule
from securepub.engines.memory.fanout import LocalFanout
from securepub.engines.memory.history import MemoryHistory
from securepub.engines.memory.presence import MemoryPresence
from securepub.engines.memory.tickets import MemoryTicketStore
from securepub.server.protocol import SecurePubFactory, SecurePubServerProtocol
from securepub.server.site import Opening
from tests.wsframes import client_frame, handshake, server_frames, split_response

txaio.use_twisted()

PEER = "203.0.113.7"
ORIGIN = "https://app.example.com"


class _Transport(StringTransport):
    """StringTransport that, like real transports, tolerates unregistering twice."""

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


class Harness:
    """A factory on a Clock, with helpers to open connections over StringTransport."""

    def __init__(
        self,
        test: SynchronousTestCase,
        limits: Limits | None = None,
        enforce: bool = True,
        rules: list[TopicRule] | None = None,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.limits = limits or Limits(max_errors=5, max_connections_per_ip=2)
        self.store = MemoryTicketStore(self.clock)
        rules = rules or [
            TopicRule(Pattern.parse("chat.*"), None, True),
            TopicRule(Pattern.parse("news.>"), history=HistoryPolicy(size=100, ttl=300)),
        ]
        validator = PayloadValidator(self.limits.max_message_bytes, 8, rules)
        self.history = MemoryHistory(self.clock, 10**8)
        broker = Broker(
            validator,
            self.limits,
            self.clock,
            fanout=LocalFanout(self.history),
            history=self.history,
            presence=MemoryPresence(),
        )
        self.factory = SecurePubFactory(
            broker=broker,
            tickets=self.store,
            origin_policy=OriginPolicy([ORIGIN], enforce),
            limits=self.limits,
            clock=self.clock,
        )
        self.factory.broker._prepare = self.factory.prepareMessage
        loop = replace_loop(self.clock)
        loop.__enter__()
        test.addCleanup(loop.__exit__, None, None, None)

    def ticket(
        self,
        user: str = "alice",
        client_ip: str | None = PEER,
        ttl: float = 30,
        subscribe: tuple[str, ...] = ("chat.*",),
        publish: tuple[str, ...] = ("chat.*",),
        session_ttl: float | None = None,
    ) -> str:
        t = Ticket(
            user=user,
            client_ip=client_ip,
            subscribe=tuple(Pattern.parse(p) for p in subscribe),
            publish=tuple(Pattern.parse(p) for p in publish),
            expires_at=self.clock.seconds() + ttl,
            session_ttl=session_ttl,
        )
        token: str = self.store.issue(t).result
        return token

    def connect(self, request: bytes, peer: str = PEER) -> Connection:
        proto = self.factory.buildProtocol(IPv4Address("TCP", peer, 50000))
        transport = _Transport(peerAddress=IPv4Address("TCP", peer, 50000))
        proto.makeConnection(transport)
        proto.dataReceived(request)
        if transport.disconnecting:
            proto.connectionLost(Failure(ConnectionDone()))
        return Connection(proto, transport)

    def open(self, peer: str = PEER, **ticket: Any) -> Connection:
        token = self.ticket(**ticket)
        conn = self.connect(handshake(protocols=["securepub.v1", "ticket." + token]), peer)
        assert conn.status() == 101, conn.transport.value()
        return conn


class Connection:
    def __init__(self, proto: SecurePubServerProtocol, transport: StringTransport) -> None:
        self.proto = proto
        self.transport = transport
        self._seen = 0

    def head(self) -> bytes:
        return split_response(self.transport.value())[0]

    def status(self) -> int:
        return int(self.head().split(b" ")[1])

    def send(self, payload: bytes | str | dict[str, Any], opcode: int = 1) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        if isinstance(payload, str):
            payload = payload.encode()
        self.proto.dataReceived(client_frame(payload, opcode))

    def frames(self) -> list[tuple[int, bytes]]:
        return server_frames(split_response(self.transport.value())[1])

    def messages(self) -> list[dict[str, Any]]:
        """New text frames since the last call, parsed."""
        frames = [f for f in self.frames() if f[0] == 1]
        new = frames[self._seen :]
        self._seen = len(frames)
        return [json.loads(p) for _, p in new]

    def close_code(self) -> int | None:
        for opcode, payload in self.frames():
            if opcode == 8:
                return int(struct.unpack("!H", payload[:2])[0])
        return None


class HandshakeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(self)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def handshakes(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("securepub_event") == "handshake"]

    def test_accepted_by_subprotocol(self) -> None:
        """A valid ticket in the subprotocol is accepted; only securepub.v1 is echoed."""
        token = self.h.ticket()
        conn = self.h.connect(
            handshake(protocols=["securepub.v1", "ticket." + token], origin=ORIGIN)
        )
        self.assertEqual(conn.status(), 101)
        self.assertIn(b"Sec-WebSocket-Protocol: securepub.v1\r\n", conn.head())
        self.assertNotIn(token.encode(), conn.transport.value())
        welcome = conn.messages()[0]
        self.assertEqual((welcome["op"], welcome["user"]), ("welcome", "alice"))
        [event] = self.handshakes()
        self.assertEqual(
            (
                event["outcome"],
                event["status"],
                event["user"],
                event["origin"],
                event["peer"],
                event["user_agent"],
            ),
            ("accepted", 101, "alice", ORIGIN, PEER, "test-agent/1.0"),
        )

    def test_accepted_by_query(self) -> None:
        """The ticket may travel as a query parameter instead."""
        conn = self.h.connect(
            handshake(path="/ws?ticket=" + self.h.ticket(), protocols=["securepub.v1"])
        )
        self.assertEqual(conn.status(), 101)

    def test_a_compression_offer_is_declined_not_failed(self) -> None:
        """Browsers offer permessage-deflate: the upgrade succeeds without it."""
        extra = {"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"}
        conn = self.h.connect(
            handshake(protocols=["securepub.v1", "ticket." + self.h.ticket()], extra=extra)
        )
        self.assertEqual(conn.status(), 101)
        self.assertNotIn(b"Sec-WebSocket-Extensions", conn.head())
        self.assertEqual(conn.messages()[0]["op"], "welcome")

    def test_no_subprotocol_offered(self) -> None:
        """A client that offered no subprotocol gets none back (RFC 6455)."""
        conn = self.h.connect(handshake(path="/ws?ticket=" + self.h.ticket()))
        self.assertEqual(conn.status(), 101)
        self.assertNotIn(b"Sec-WebSocket-Protocol", conn.head())

    def test_no_ticket(self) -> None:
        """No ticket is 401."""
        conn = self.h.connect(handshake(protocols=["securepub.v1"]))
        self.assertEqual(conn.status(), 401)
        self.assertEqual(self.handshakes()[0]["reason"], "no_ticket")

    def test_refused_tickets_are_403_and_the_log_says_why(self) -> None:
        """Unknown, expired, replayed and wrong-IP tickets all look alike: 403."""
        expired = self.h.ticket(ttl=1)
        used = self.h.ticket()
        self.h.connect(handshake(protocols=["ticket." + used]))
        wrong_ip = self.h.ticket(client_ip="198.51.100.1")
        self.h.clock.advance(1)
        # The expired one goes first: the store purges expired entries lazily,
        # after which they read as unknown (the client sees 403 either way).
        cases = [
            (expired, "ticket_expired"),
            ("A" * 43, "ticket_unknown"),
            (used, "ticket_already_redeemed"),
            (wrong_ip, "ticket_wrong_ip"),
        ]
        for token, reason in cases:
            self.events.clear()
            conn = self.h.connect(handshake(protocols=["securepub.v1", "ticket." + token]))
            self.assertEqual(conn.status(), 403, reason)
            self.assertIn(b"HTTP/1.1 403 Forbidden\r\n", conn.transport.value())
            self.assertEqual(self.handshakes()[0]["reason"], reason)
            for event in self.events:
                self.assertNotIn(token, repr(event))

    def test_wrong_ip_burns_the_ticket(self) -> None:
        """A ticket presented from the wrong address can't be used afterwards."""
        token = self.h.ticket()
        self.assertEqual(
            self.h.connect(handshake(protocols=["ticket." + token]), "198.51.100.1").status(), 403
        )
        self.assertEqual(self.h.connect(handshake(protocols=["ticket." + token])).status(), 403)

    def test_origin_enforced_before_ticket(self) -> None:
        """A foreign or null Origin is 403 and does not consume the ticket."""
        token = self.h.ticket()
        for origin in ("https://evil.example", "null", "https://app.example.com:8443"):
            conn = self.h.connect(handshake(protocols=["ticket." + token], origin=origin))
            self.assertEqual(conn.status(), 403, origin)
        ok = self.h.connect(
            handshake(protocols=["ticket." + token], origin="https://APP.example.com:443")
        )
        self.assertEqual(ok.status(), 101)

    def test_origin_log_mode(self) -> None:
        """origin_policy = "log" lets a foreign Origin through and logs it."""
        h = Harness(self, enforce=False)
        conn = h.connect(handshake(protocols=["ticket." + h.ticket()], origin="null"))
        self.assertEqual(conn.status(), 101)
        self.assertEqual(self.handshakes()[-1]["origin_decision"], "log_only")

    def test_per_ip_cap(self) -> None:
        """Past max_connections_per_ip open connections an address gets 429."""
        a = self.h.open()
        self.h.open()
        token = self.h.ticket()
        self.assertEqual(self.h.connect(handshake(protocols=["ticket." + token])).status(), 429)
        a.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.h.connect(handshake(protocols=["ticket." + token])).status(), 101)
        self.assertEqual(self.h.open(peer="198.51.100.2", client_ip=None).status(), 101)

    def test_refused_handshakes_release_the_slot(self) -> None:
        """Failed handshakes do not leak per-IP connection slots."""
        for _ in range(5):
            conn = self.h.connect(handshake(protocols=["ticket." + "B" * 43]))
            conn.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.h.factory.connections.count(PEER), 0)

    def test_store_unavailable(self) -> None:
        """A store that can't answer is 503, never an accept."""
        self.h.factory.tickets = _FailingStore()
        conn = self.h.connect(handshake(protocols=["ticket." + "C" * 43]))
        self.assertEqual(conn.status(), 503)

    def test_deferred_redemption(self) -> None:
        """The store may answer later; the handshake waits for it."""
        store = _SlowStore()
        self.h.factory.tickets = store
        conn = self.h.connect(handshake(protocols=["securepub.v1", "ticket." + "D" * 43]))
        self.assertEqual(conn.transport.value(), b"")
        store.d.callback(Ticket("bob", None, (), (), 2000.0))
        self.assertEqual(conn.status(), 101)

    def test_malformed_handshake_logged(self) -> None:
        """A request Autobahn itself refuses is logged as a handshake too."""
        bad = handshake().replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 7")
        conn = self.h.connect(bad)
        self.assertEqual(conn.status(), 400)
        self.assertEqual(self.handshakes()[0]["reason"], "malformed_handshake")


class _FailingStore:
    def redeem(self, token: str, peer_ip: str) -> Deferred[Ticket]:
        raise StoreUnavailable("down")


class _SlowStore:
    def redeem(self, token: str, peer_ip: str) -> Deferred[Ticket]:
        self.d: Deferred[Ticket] = Deferred()
        return self.d


class MessageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(self)
        self.conn = self.h.open()
        self.conn.messages()

    def reply(self, payload: bytes | str | dict[str, Any]) -> dict[str, Any]:
        self.conn.send(payload)
        [reply] = self.conn.messages()
        return reply

    def assertError(
        self, payload: bytes | str | dict[str, Any], code: str, message_id: Any = None
    ) -> None:
        reply = self.reply(payload)
        self.assertEqual(
            (reply["op"], reply["code"], reply["id"]), ("error", code, message_id), payload
        )
        self.assertIsInstance(reply["message"], str)

    def test_subscribe_publish_round_trip(self) -> None:
        """Subscribe, publish, receive; ids are echoed."""
        self.assertEqual(
            self.reply({"op": "subscribe", "id": 1, "topic": "chat.a"}), {"op": "ok", "id": 1}
        )
        self.conn.send({"op": "publish", "id": "p", "topic": "chat.a", "data": {"x": 1}})
        message, ok = self.conn.messages()
        self.assertEqual(ok, {"op": "ok", "id": "p"})
        self.assertEqual(
            (message["op"], message["topic"], message["data"]), ("message", "chat.a", {"x": 1})
        )
        self.assertEqual(
            self.reply({"op": "unsubscribe", "id": 2, "topic": "chat.a"}), {"op": "ok", "id": 2}
        )

    def test_bad_frames(self) -> None:
        """Every malformed frame is answered with bad_request and the connection stays."""
        cases: list[tuple[Any, Any]] = [
            (b"not json", None),
            ('{"op": "subscribe", "id": 1, "topic": "chat.a", "id": 2}', None),
            ('{"op": "publish", "id": 1, "topic": "chat.a", "data": NaN}', None),
            ("[1, 2]", None),
            ('"text"', None),
            ({"op": "subscribe", "topic": "chat.a"}, None),
            ({"op": "subscribe", "id": True, "topic": "chat.a"}, None),
            ({"op": "subscribe", "id": 1.5, "topic": "chat.a"}, None),
            ({"op": "subscribe", "id": "x" * 65, "topic": "chat.a"}, None),
            ({"op": "subscribe", "id": 2**53, "topic": "chat.a"}, None),
            ({"op": "dance", "id": 1, "topic": "chat.a"}, 1),
            ({"id": 1, "topic": "chat.a"}, 1),
            ({"op": "subscribe", "id": 1}, 1),
            ({"op": "subscribe", "id": 1, "topic": 5}, 1),
            ({"op": "subscribe", "id": 1, "topic": "chat.a", "extra": 1}, 1),
            ({"op": "publish", "id": "q", "topic": "chat.a"}, "q"),
        ]
        h = Harness(self, limits=Limits(max_errors=100))
        self.conn = h.open()
        self.conn.messages()
        for payload, message_id in cases:
            self.assertError(payload, "bad_request", message_id)
        self.assertIsNone(self.conn.close_code())
        self.assertEqual(self.reply({"op": "subscribe", "id": 9, "topic": "chat.a"})["op"], "ok")

    def test_domain_errors(self) -> None:
        """Topic, grant and payload problems get their own codes."""
        self.assertError({"op": "subscribe", "id": 1, "topic": "chat..a"}, "invalid_topic", 1)
        self.assertError({"op": "subscribe", "id": 2, "topic": "news.a"}, "forbidden", 2)
        self.assertError(
            {"op": "publish", "id": 3, "topic": "chat.a", "data": [[[[[[[[[1]]]]]]]]]},
            "invalid_payload",
            3,
        )

    def test_max_errors_closes_with_1008(self) -> None:
        """After max_errors error replies the connection is closed with 1008."""
        for i in range(4):
            self.assertError({"op": "nope", "id": i, "topic": "a"}, "bad_request", i)
        self.assertIsNone(self.conn.close_code())
        self.conn.send({"op": "nope", "id": 4, "topic": "a"})
        self.assertEqual(self.conn.close_code(), 1008)

    def test_binary_frame_closes_with_1003(self) -> None:
        """A binary frame closes with 1003 (a close frame is sent, not a dropped socket)."""
        self.conn.send(b"\x00\x01", opcode=2)
        self.assertEqual(self.conn.close_code(), 1003)

    def test_too_large_closes_with_1009(self) -> None:
        """A message over max_message_bytes + 4 KiB closes with 1009."""
        self.conn.send(b'"' + b"x" * (self.h.limits.max_frame_bytes + 1) + b'"')
        self.assertEqual(self.conn.close_code(), 1009)

    def test_invalid_utf8_closes(self) -> None:
        """A text frame that is not UTF-8 is a protocol error (1007), not a crash."""
        self.conn.send(b'"\xff\xfe"')
        self.assertEqual(self.conn.close_code(), 1007)

    def test_rate_limited(self) -> None:
        """Publishing past twice the rate in a burst is rate_limited."""
        h = Harness(self, limits=Limits(max_publish_rate=1, max_errors=10))
        conn = h.open()
        conn.messages()
        for i in range(2):
            conn.send({"op": "publish", "id": i, "topic": "chat.a", "data": i})
        conn.send({"op": "publish", "id": 2, "topic": "chat.a", "data": 2})
        replies = conn.messages()
        self.assertEqual([r["op"] for r in replies], ["ok", "ok", "error"])
        self.assertEqual(replies[2]["code"], "rate_limited")

    def test_close_detaches_session(self) -> None:
        """A closed connection's session leaves the broker."""
        self.reply({"op": "subscribe", "id": 1, "topic": "chat.a"})
        self.conn.proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.h.factory.broker.sessions, {})


class SlowConsumerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(self, limits=Limits(max_queued_bytes=64 * 1024))
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def subscriber(self) -> Connection:
        conn = self.h.open(client_ip=None, peer=f"198.51.100.{len(self.events) + 1}")
        conn.send({"op": "subscribe", "id": 1, "topic": "chat.a"})
        return conn

    def test_an_open_connection_keeps_no_handshake_state_or_option_copies(self) -> None:
        """Lean idle connections: Autobahn's options live on the class, the opening
        handshake's request is dropped once open, and no send queue is allocated."""
        proto = self.h.open().proto
        state = vars(proto)
        for name in ("http_request_data", "http_headers", "_hs", "_ticket"):
            self.assertNotIn(name, state)
        for name in type(self.h.factory).protocol.__mro__[1].CONFIG_ATTRS:
            self.assertNotIn(name, state)
        self.assertEqual(proto.maxMessagePayloadSize, self.h.factory.maxMessagePayloadSize)
        # A callable option reads back unbound, as it would from the instance.
        self.assertIs(proto.perMessageCompressionAccept, self.h.factory.perMessageCompressionAccept)
        self.assertEqual(proto.send_queue, ())
        self.assertEqual(proto._peer, PEER)

    def test_idle_values_live_on_the_class_until_changed(self) -> None:
        """Autobahn's per-connection flags at their idle values are not stored per
        instance; they read back the same, and a change is stored and seen."""
        first, second = self.h.open().proto, self.h.open().proto
        state = vars(first)
        for name in ("closedByMe", "wasClean", "localCloseCode", "current_frame", "data"):
            self.assertNotIn(name, state)
        self.assertIs(first.closedByMe, False)
        self.assertIsNone(first.localCloseCode)
        self.assertEqual(first.data, b"")
        self.assertIs(first.trafficStats, second.trafficStats)  # one, never read
        first.closedByMe = True
        self.assertIs(first.closedByMe, True)
        self.assertIs(second.closedByMe, False)
        # And the connections still work as before: a frame in, a reply out.
        conn = self.subscriber()
        self.assertEqual(conn.messages()[-1]["op"], "ok")

    def test_a_queued_send_still_goes_out_in_order(self) -> None:
        """Autobahn's chopped sends get a real queue on first use, and it drains."""
        conn = self.h.open()
        conn.proto.sendData(b"ab", chopsize=1)
        self.assertIsNot(conn.proto.send_queue, ())
        self.h.clock.pump([0.01] * 3)
        self.assertTrue(conn.transport.value().endswith(b"ab"))

    def test_later_protocol_options_reach_new_connections(self) -> None:
        """setProtocolOptions after the factory is made still applies (per-class copy)."""
        self.h.factory.setProtocolOptions(autoPingInterval=0)
        self.assertEqual(self.h.open().proto.autoPingInterval, 0)

    def test_registered_as_producer(self) -> None:
        """An open connection registers itself with its transport for flow control."""
        conn = self.subscriber()
        self.assertIs(conn.transport.producer, conn.proto)
        self.assertTrue(conn.transport.streaming)

    def test_paused_past_limit_closes_with_4008(self) -> None:
        """Past max_queued_bytes queued while paused: closed with 4008, others unaffected."""
        slow = self.subscriber()
        fast = self.subscriber()
        slow.messages()
        fast.messages()
        slow.proto.pauseProducing()
        broker = self.h.factory.broker
        for i in range(70):
            self.successResultOf(broker.publish("chat.a", {"i": i, "pad": "x" * 1000}))
        self.assertEqual(slow.close_code(), 4008)
        self.assertEqual(len(fast.messages()), 70)
        written = len(slow.transport.value())
        self.successResultOf(broker.publish("chat.a", {"after": True}))
        self.assertEqual(len(slow.transport.value()), written)
        self.assertEqual(len(broker.sessions), 1)
        [event] = [e for e in self.events if e.get("securepub_event") == "slow_consumer"]
        self.assertEqual(event["user"], "alice")

    def test_resume_resets_the_count(self) -> None:
        """A client that catches up (resume) starts counting from zero again."""
        conn = self.subscriber()
        broker = self.h.factory.broker
        for _ in range(3):
            conn.proto.pauseProducing()
            for i in range(40):
                self.successResultOf(broker.publish("chat.a", {"i": i, "pad": "x" * 1000}))
            conn.proto.resumeProducing()
        self.assertIsNone(conn.close_code())


class CloseAllTests(SynchronousTestCase):
    def test_close_all_sends_1001_then_cuts_off(self) -> None:
        """A stopping node closes every connection with 1001, cutting off laggards."""
        h = Harness(self)
        polite = h.open()
        laggard = h.open()
        done = h.factory.close_all(timeout=5)
        self.assertEqual((polite.close_code(), laggard.close_code()), (1001, 1001))
        polite.proto.connectionLost(Failure(ConnectionDone()))
        self.assertNoResult(done)
        h.clock.advance(4.9)
        self.assertNoResult(done)
        h.clock.advance(0.1)
        self.assertTrue(laggard.transport.disconnecting)
        laggard.proto.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(done)
        self.assertEqual(h.factory.open_connections, set())

    def test_close_all_with_nobody(self) -> None:
        """With no connection open, closing all is done at once."""
        self.successResultOf(Harness(self).factory.close_all(timeout=5))


class ProxyHandshakeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(self)
        self.h.factory.proxies = ProxyPolicy(["10.0.0.0/8"])
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_ticket_bound_to_the_forwarded_client(self) -> None:
        """Through a trusted proxy, the ticket's IP is checked against the forwarded client."""
        token = self.h.ticket(client_ip=PEER)
        extra = {"X-Forwarded-For": f"6.6.6.6, {PEER}"}
        conn = self.h.connect(handshake(protocols=["ticket." + token], extra=extra), "10.1.2.3")
        self.assertEqual(conn.status(), 101)
        [event] = [e for e in self.events if e.get("securepub_event") == "handshake"]
        self.assertEqual((event["peer"], event["tcp_peer"]), (PEER, "10.1.2.3"))
        self.assertEqual(self.h.factory.connections.count(PEER), 1)

    def test_untrusted_forwarding_ignored(self) -> None:
        """A client cannot claim another address: its X-Forwarded-For is ignored and logged."""
        token = self.h.ticket(client_ip=PEER)
        extra = {"X-Forwarded-For": PEER}
        conn = self.h.connect(handshake(protocols=["ticket." + token], extra=extra), "198.51.100.9")
        self.assertEqual(conn.status(), 403)
        [event] = [e for e in self.events if e.get("securepub_event") == "handshake"]
        self.assertEqual(
            (event["reason"], event["proxy_headers_ignored"]), ("ticket_wrong_ip", True)
        )


class RevokeTests(SynchronousTestCase):
    def test_revoked_session_closes_with_4001(self) -> None:
        """A revoked user's connection is closed with 4001 and takes no more frames."""
        h = Harness(self)
        conn = h.open()
        other = h.open(user="bob")
        self.successResultOf(h.factory.broker.disconnect_user("alice"))
        self.assertEqual(conn.close_code(), 4001)
        self.assertIsNone(other.close_code())
        conn.messages()
        conn.send({"op": "subscribe", "id": 1, "topic": "chat.a"})
        self.assertEqual(conn.messages(), [])


class TimeoutTests(SynchronousTestCase):
    """Deadlines on the injected clock (txaio's loop replaced by a Clock)."""

    def test_opening_handshake_deadline(self) -> None:
        """A handshake still incomplete after 10 s (here: the store never answers) is dropped."""
        h = Harness(self)
        h.factory.tickets = _SlowStore()
        conn = h.connect(handshake(protocols=["ticket." + "D" * 43]))
        h.clock.advance(9.9)
        self.assertFalse(conn.transport.disconnecting)
        h.clock.advance(0.1)
        self.assertTrue(conn.transport.disconnecting)

    def test_ping_and_pong_deadline(self) -> None:
        """Every 30 s a ping is sent; no pong within 10 s closes the connection."""
        h = Harness(self)
        conn = h.open()
        h.clock.advance(29.9)
        self.assertNotIn(9, [opcode for opcode, _ in conn.frames()])
        h.clock.advance(0.1)
        self.assertIn(9, [opcode for opcode, _ in conn.frames()])
        h.clock.advance(9.9)
        self.assertFalse(conn.transport.disconnecting)
        h.clock.advance(0.1)
        self.assertTrue(conn.transport.disconnecting or conn.close_code() is not None)

    def test_pong_keeps_the_connection(self) -> None:
        """A client that answers pings stays connected."""
        h = Harness(self)
        conn = h.open()
        for _ in range(3):
            h.clock.advance(30)
            ping = [payload for opcode, payload in conn.frames() if opcode == 9][-1]
            conn.send(ping, opcode=10)
            h.clock.advance(10)
        self.assertFalse(conn.transport.disconnecting)
        self.assertIsNone(conn.close_code())


class HistoryFrameTests(SynchronousTestCase):
    """SPEC section 8 over the protocol: positions in ok frames, since, recovery."""

    def setUp(self) -> None:
        self.h = Harness(self, Limits(max_errors=50, max_connections_per_ip=5))
        self.conn = self.h.open(subscribe=("news.>", "chat.*"))
        self.conn.messages()  # welcome

    def publish(self, topic: str = "news.a") -> None:
        self.h.factory.broker.publish(topic, {"n": 1})

    def test_subscribe_answers_the_position(self) -> None:
        """An exact history topic's ok carries offset and epoch; messages carry theirs."""
        self.publish()
        self.conn.send({"op": "subscribe", "id": 1, "topic": "news.a"})
        [ok] = self.conn.messages()
        self.assertEqual((ok["op"], ok["id"], ok["offset"]), ("ok", 1, 1))
        self.assertNotIn("recovered", ok)
        self.publish()
        [message] = self.conn.messages()
        self.assertEqual((message["offset"], message["epoch"]), (2, ok["epoch"]))

    def test_patterns_and_plain_topics_answer_a_plain_ok(self) -> None:
        """Patterns and topics without history get {"op":"ok","id":...} as before."""
        self.conn.send({"op": "subscribe", "id": 1, "topic": "news.*"})
        self.conn.send({"op": "subscribe", "id": 2, "topic": "chat.x"})
        self.assertEqual(self.conn.messages(), [{"op": "ok", "id": 1}, {"op": "ok", "id": 2}])

    def test_since_recovers_the_missed_messages_in_order(self) -> None:
        """recovered: true with the position, then the missed messages, then live ones."""
        self.conn.send({"op": "subscribe", "id": 1, "topic": "news.a"})
        [ok] = self.conn.messages()
        self.conn.send({"op": "unsubscribe", "id": 2, "topic": "news.a"})
        self.conn.messages()
        for _ in range(3):
            self.publish()
        since = {"offset": 0, "epoch": ok["epoch"]}
        self.conn.send({"op": "subscribe", "id": 3, "topic": "news.a", "since": since})
        frames = self.conn.messages()
        self.assertEqual(
            frames[0], {"op": "ok", "id": 3, "recovered": True, "offset": 3, "epoch": ok["epoch"]}
        )
        self.assertEqual([f["offset"] for f in frames[1:]], [1, 2, 3])
        self.publish()
        self.assertEqual([f["offset"] for f in self.conn.messages()], [4])

    def test_since_from_another_epoch_is_not_recovered(self) -> None:
        """recovered: false and the current position, no old message."""
        self.publish()
        since = {"offset": 0, "epoch": "not-the-epoch"}
        self.conn.send({"op": "subscribe", "id": 1, "topic": "news.a", "since": since})
        [ok] = self.conn.messages()
        self.assertEqual((ok["recovered"], ok["offset"]), (False, 1))

    def test_bad_since_is_bad_request(self) -> None:
        """since on a pattern or a plain topic, or of the wrong shape, is bad_request."""
        good = {"offset": 1, "epoch": "e"}
        for n, (topic, since) in enumerate(
            [
                ("news.*", good),
                ("chat.x", good),
                ("news.a", {"offset": 1}),
                ("news.a", {"offset": -1, "epoch": "e"}),
                ("news.a", {"offset": 1.5, "epoch": "e"}),
                ("news.a", {"offset": True, "epoch": "e"}),
                ("news.a", {"offset": 2**53, "epoch": "e"}),
                ("news.a", {"offset": 1, "epoch": 7}),
                ("news.a", {"offset": 1, "epoch": "e" * 65}),
                ("news.a", {"offset": 1, "epoch": "e", "x": 1}),
                ("news.a", [1, "e"]),
            ]
        ):
            self.conn.send({"op": "subscribe", "id": n, "topic": topic, "since": since})
            [error] = self.conn.messages()
            self.assertEqual((error["op"], error["code"], error["id"]), ("error", "bad_request", n))

    def test_since_without_the_grant_is_forbidden(self) -> None:
        """Recovery is checked like any subscribe: no history for a ticket without the grant."""
        self.publish("news.a")
        conn = self.h.open(subscribe=("chat.*",))
        conn.messages()
        conn.send(
            {"op": "subscribe", "id": 1, "topic": "news.a", "since": {"offset": 0, "epoch": "e"}}
        )
        [error] = conn.messages()
        self.assertEqual(error["code"], "forbidden")


class OpeningTests(SynchronousTestCase):
    """A storm of opening connections degrades into 503s with Retry-After, then drops."""

    def test_crowded_upgrades_get_503_with_retry_after_and_keep_their_ticket(self) -> None:
        """Past half the limit of opening connections an upgrade is refused before its
        ticket is looked at; the ticket still works once the crowd is gone."""
        h = Harness(self)
        opening = Opening(limit=4)
        h.factory.opening = opening
        opening.count = 3
        token = h.ticket()
        conn = h.connect(handshake(protocols=["securepub.v1", "ticket." + token]))
        self.assertEqual(conn.status(), 503)
        retry = int(
            dict(line.split(b": ", 1) for line in conn.head().split(b"\r\n")[1:] if b": " in line)[
                b"Retry-After"
            ]
        )
        self.assertTrue(1 <= retry <= 5)
        opening.count = 0
        again = h.connect(handshake(protocols=["securepub.v1", "ticket." + token]))
        self.assertEqual(again.status(), 101)
