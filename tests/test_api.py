"""The HTTPS API on fakes: statuses, bodies and error codes of SPEC section 2."""

from __future__ import annotations

import json
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from securepub.broker.broker import Broker, Grants, RecordingSubscriber
from securepub.core.apikeys import ApiKeys
from securepub.core.clientip import ProxyPolicy
from securepub.core.history import HistoryPolicy
from securepub.core.limits import Limits
from securepub.core.origin import OriginPolicy
from securepub.core.topics import Pattern
from securepub.core.validation import PayloadValidator, TopicRule
from securepub.engines.memory.fanout import LocalFanout
from securepub.engines.memory.history import MemoryHistory
from securepub.engines.memory.tickets import MemoryTicketStore
from securepub.ops.metrics import Metrics
from securepub.server.api import (
    DisconnectResource,
    Health,
    HistoryResource,
    MetricsResource,
    PublishResource,
    TicketsResource,
)
from securepub.server.protocol import SecurePubFactory
from securepub.server.site import Opening, Root, SecurePubSite, WebSocketOnly

KEY = "test-api-key-0123456789abcdef"


class Response:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split(b" ")[1])
        self.headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])
        }

    def json(self) -> Any:
        return json.loads(self.body)


class ApiTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.limits = Limits(max_message_bytes=1000)
        self.store = MemoryTicketStore(self.clock)
        self.broker = Broker(
            PayloadValidator(1000, 4, ()), self.limits, self.clock, fanout=LocalFanout()
        )
        keys = ApiKeys([KEY.encode()])
        factory = SecurePubFactory(
            self.broker, self.store, OriginPolicy([], True), self.limits, self.clock
        )
        self.site = SecurePubSite(
            Root(
                {
                    b"ws": WebSocketOnly(WebSocketResource(factory)),
                    b"healthz": Health(),
                    b"v1/tickets": TicketsResource(keys, self.clock, self.store),
                    b"v1/publish": PublishResource(keys, self.clock, self.broker),
                }
            ),
            max_body_bytes=self.limits.max_frame_bytes,
            reactor=self.clock,
        )
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def raw(self, data: bytes) -> bytes:
        channel = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.5", 4000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.5", 4000))
        channel.makeConnection(transport)
        channel.dataReceived(data)
        return transport.value()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | dict[str, Any] | None = None,
        key: str | None = KEY,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> Response:
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        lines = [f"{method} {path} HTTP/1.1", "Host: localhost", "Connection: close"]
        if key is not None:
            lines.append(f"Authorization: Bearer {key}")
        if body is not None:
            lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        return Response(self.raw(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")))

    def assertError(self, response: Response, status: int, code: str) -> None:
        self.assertEqual((response.status, response.json()["error"]), (status, code), response.body)
        self.assertIsInstance(response.json()["message"], str)
        self.assertNotIn(KEY.encode(), response.body)

    def test_healthz(self) -> None:
        """GET /healthz is 200 {"status": "ok"} with no authentication."""
        r = self.request("GET", "/healthz", key=None)
        self.assertEqual((r.status, r.json()), (200, {"status": "ok"}))
        self.assertEqual(r.headers[b"content-type"], b"application/json")
        self.assertEqual(r.headers[b"cache-control"], b"no-store")
        self.assertEqual(r.headers[b"server"], b"securepub")

    def test_unhealthy(self) -> None:
        """A failing check turns /healthz into 503 with the reason."""
        self.site.resource._routes[b"healthz"] = Health(lambda: "redis unreachable")
        r = self.request("GET", "/healthz")
        self.assertEqual(
            (r.status, r.json()), (503, {"status": "unavailable", "reason": "redis unreachable"})
        )

    def test_unknown_paths_are_404(self) -> None:
        """Anything but the named paths is a JSON 404, including under /ws and /v1."""
        for path in ("/", "/nope", "/v1", "/v1/nope", "/v1/tickets/x", "/ws/x", "/healthz/x"):
            self.assertError(self.request("GET", path), 404, "not_found")

    def test_methods(self) -> None:
        """The API answers only its methods."""
        r = self.request("GET", "/v1/tickets")
        self.assertError(r, 405, "method_not_allowed")
        self.assertEqual(r.headers[b"allow"], b"POST")
        self.assertError(self.request("DELETE", "/healthz"), 405, "method_not_allowed")

    def test_issue_ticket(self) -> None:
        """A valid request gets a 201 with an opaque ticket and its expiry."""
        r = self.request(
            "POST",
            "/v1/tickets",
            {
                "user": "alice",
                "client_ip": "203.0.113.7",
                "subscribe": ["news.*", "user.alice.>"],
                "publish": ["chat.room1"],
                "ttl": 30,
            },
        )
        self.assertEqual(r.status, 201, r.body)
        body = r.json()
        self.assertEqual(set(body), {"ticket", "expires_at"})
        self.assertEqual(body["expires_at"], 1_000_030.0)
        self.assertGreaterEqual(len(body["ticket"]), 43)
        ticket = self.store.redeem(body["ticket"], "203.0.113.7").result
        self.assertEqual(ticket.user, "alice")
        self.assertEqual([p.text for p in ticket.subscribe], ["news.*", "user.alice.>"])
        issued = [e for e in self.events if e.get("securepub_event") == "ticket_issued"]
        self.assertEqual(len(issued), 1)
        self.assertNotIn(body["ticket"], repr(self.events))

    def test_ticket_defaults(self) -> None:
        """ttl defaults to 30 and grants to nothing."""
        body = self.request("POST", "/v1/tickets", {"user": "bob"}).json()
        ticket = self.store.redeem(body["ticket"], "198.51.100.1").result
        self.assertEqual((ticket.subscribe, ticket.publish, ticket.client_ip), ((), (), None))
        self.assertEqual(ticket.expires_at, 1_000_030.0)
        self.assertEqual(ticket.session_ttl, 3600)

    def test_session_ttl(self) -> None:
        """session_ttl is kept with the ticket, from 60 s to max_session_seconds."""
        for asked in (60, 3600):
            body = self.request("POST", "/v1/tickets", {"user": "b", "session_ttl": asked}).json()
            self.assertEqual(self.store.redeem(body["ticket"], "x").result.session_ttl, asked)

    def test_bad_ticket_requests(self) -> None:
        """Every malformed ticket request is 400 with the right code."""
        cases: list[tuple[Any, str]] = [
            ({"user": "a", "role": "admin"}, "bad_request"),
            ({"client_ip": "203.0.113.7"}, "bad_request"),
            ({"user": ""}, "bad_request"),
            ({"user": "é" * 128}, "bad_request"),
            ({"user": 5}, "bad_request"),
            ({"user": "a", "ttl": 0}, "bad_request"),
            ({"user": "a", "ttl": 301}, "bad_request"),
            ({"user": "a", "ttl": "30"}, "bad_request"),
            ({"user": "a", "ttl": True}, "bad_request"),
            ({"user": "a", "ttl": 1.5}, "bad_request"),
            ({"user": "a", "session_ttl": 59}, "bad_request"),
            ({"user": "a", "session_ttl": 3601}, "bad_request"),
            ({"user": "a", "session_ttl": 120.5}, "bad_request"),
            ({"user": "a", "session_ttl": "600"}, "bad_request"),
            ({"user": "a", "client_ip": "not-an-ip"}, "bad_request"),
            ({"user": "a", "client_ip": None}, "bad_request"),
            ({"user": "a", "subscribe": "news.*"}, "bad_request"),
            ({"user": "a", "subscribe": [5]}, "bad_request"),
            ({"user": "a", "publish": {"a": 1}}, "bad_request"),
            ({"user": "a", "subscribe": ["news..x"]}, "invalid_topic"),
            ({"user": "a", "publish": ["a.>.b"]}, "invalid_topic"),
        ]
        for body, code in cases:
            self.assertError(self.request("POST", "/v1/tickets", body), 400, code)
        for raw in (b'{"user": NaN}', b'{"user": "a", "user": "b"}', b"[1]", b"{", b"\xff"):
            self.assertError(self.request("POST", "/v1/tickets", raw), 400, "bad_request")
        self.assertEqual(self.request("POST", "/v1/tickets", {"user": "é" * 127}).status, 201)

    def test_authentication(self) -> None:
        """Missing, wrong or non-Bearer credentials are 401 and logged without the key."""
        for key in (None, "wrong-key-wrong-key", KEY + "x", ""):
            self.assertError(
                self.request("POST", "/v1/tickets", {"user": "a"}, key=key), 401, "unauthorized"
            )
        r = self.request(
            "POST",
            "/v1/tickets",
            {"user": "a"},
            key=None,
            headers={"Authorization": f"Basic {KEY}"},
        )
        self.assertError(r, 401, "unauthorized")
        refused = [e for e in self.events if e.get("securepub_event") == "api_auth_refused"]
        self.assertEqual(len(refused), 5)
        self.assertNotIn(KEY, repr(self.events))

    def test_auth_failures_rate_limited(self) -> None:
        """An address that keeps failing authentication is answered 429 for a while."""
        for _ in range(20):
            self.request("POST", "/v1/publish", {"topic": "a", "data": 1}, key="bad-key-123456789")
        self.assertError(
            self.request("POST", "/v1/publish", {"topic": "a", "data": 1}), 429, "rate_limited"
        )
        self.clock.advance(1)
        self.assertEqual(self.request("POST", "/v1/publish", {"topic": "a", "data": 1}).status, 202)

    def test_content_type(self) -> None:
        """Only application/json bodies are read (parameters allowed)."""
        self.assertError(
            self.request(
                "POST", "/v1/publish", {"topic": "a", "data": 1}, content_type="text/plain"
            ),
            415,
            "unsupported_media_type",
        )
        r = self.request(
            "POST",
            "/v1/publish",
            {"topic": "a", "data": 1},
            content_type="application/json; charset=utf-8",
        )
        self.assertEqual(r.status, 202)

    def test_publish(self) -> None:
        """A backend publish is 202 with the id subscribers see."""
        sub = RecordingSubscriber()
        session = self.broker.open_session("u", Grants(subscribe=(Pattern.parse(">"),)), "ip", sub)
        self.broker.subscribe(session, "news.sports")
        r = self.request("POST", "/v1/publish", {"topic": "news.sports", "data": {"a": 1}})
        self.assertEqual(r.status, 202)
        self.assertEqual(json.loads(sub.sent[0])["id"], r.json()["id"])

    def test_bad_publish(self) -> None:
        """Publish bodies are checked like browser frames."""
        cases: list[tuple[Any, str]] = [
            ({"topic": "a"}, "bad_request"),
            ({"data": 1}, "bad_request"),
            ({"topic": "a", "data": 1, "x": 2}, "bad_request"),
            ({"topic": 1, "data": 1}, "bad_request"),
            ({"topic": "news.*", "data": 1}, "invalid_topic"),
            ({"topic": "a", "data": [[[[[1]]]]]}, "invalid_payload"),
            ({"topic": "a", "data": "x" * 1001}, "invalid_payload"),
        ]
        for body, code in cases:
            self.assertError(self.request("POST", "/v1/publish", body), 400, code)

    def test_declared_length_over_cap(self) -> None:
        """A Content-Length over the cap is refused with 413 before any body arrives."""
        head = (
            "POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: 10000000\r\n\r\n"
        ).encode()
        r = Response(self.raw(head))
        self.assertError(r, 413, "too_large")

    def test_chunked_body_over_cap(self) -> None:
        """A chunked body is cut off with 413 as soon as it passes the cap."""
        chunk = b"x" * 4096
        data = (
            "POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
        data += b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3))
        r = Response(self.raw(data))
        self.assertError(r, 413, "too_large")

    def test_body_at_cap_is_read(self) -> None:
        """A body just at the cap is read (and then judged on its content)."""
        body = json.dumps({"topic": "a", "data": "x"}).encode()
        body += b" " * (self.limits.max_frame_bytes - len(body))
        self.assertEqual(self.request("POST", "/v1/publish", body).status, 202)

    def test_access_log_drops_query(self) -> None:
        """The access log never holds a query string (tickets travel in it)."""
        self.request("GET", "/healthz?ticket=SECRET-TICKET-VALUE")
        self.site.log(_Req())
        self.assertNotIn("SECRET-TICKET-VALUE", repr(self.events))


class _Req:
    method = b"GET"
    path = b"/ws"
    uri = b"/ws?ticket=SECRET-TICKET-VALUE"
    code = 101

    def getClientAddress(self) -> IPv4Address:
        return IPv4Address("TCP", "192.0.2.5", 1)


class HeadersDeadlineTests(SynchronousTestCase):
    """Slowloris: request headers must arrive within the deadline, however dribbled."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.site = SecurePubSite(
            Root({b"healthz": Health()}),
            max_body_bytes=1000,
            headers_timeout=10,
            reactor=self.clock,
        )

    def connect(self) -> tuple[Any, StringTransport]:
        channel = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.9", 1))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 1))
        channel.makeConnection(transport)
        return channel, transport

    def test_dribbling_client_dropped_at_deadline(self) -> None:
        """A byte every second keeps the idle timer happy but not the deadline."""
        channel, transport = self.connect()
        for byte in b"GET /healthz HTTP/1.1\r\nHo":
            if self.clock.seconds() >= 9.5:
                break
            channel.dataReceived(bytes([byte]))
            self.clock.advance(0.5)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.5)
        self.assertTrue(transport.disconnecting)

    def test_complete_headers_in_time(self) -> None:
        """Headers completed in time are answered; the next request gets its own deadline."""
        channel, transport = self.connect()
        self.clock.advance(9.9)
        channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", transport.value())
        self.clock.advance(30)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"GET /healthz HTTP/1.1\r\n")
        self.clock.advance(10)
        self.assertTrue(transport.disconnecting)
        channel.connectionLost(None)


class MetricsAndProxyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryTicketStore(self.clock)
        keys = ApiKeys([KEY.encode()])
        self.metrics = Metrics()
        self.metrics.messages_in = 3
        self.metrics.gauge("open_connections", "Open connections.", lambda: 2)
        self.site = SecurePubSite(
            Root(
                {
                    b"metrics": MetricsResource(
                        keys,
                        self.clock,
                        self.metrics.render,
                    ),
                    b"v1/tickets": TicketsResource(keys, self.clock, self.store),
                }
            ),
            max_body_bytes=5000,
            reactor=self.clock,
            proxies=ProxyPolicy(["192.0.2.0/24"]),
        )
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def raw(self, data: bytes, peer: str = "192.0.2.5") -> Response:
        channel = self.site.buildProtocol(IPv4Address("TCP", peer, 4000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 4000))
        channel.makeConnection(transport)
        channel.dataReceived(data)
        return Response(transport.value())

    def test_metrics_need_a_key(self) -> None:
        """/metrics answers Prometheus text to API key holders, 401 to others."""
        r = self.raw(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertEqual(r.status, 401)
        r = self.raw(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\n\r\n"
        )
        self.assertEqual(r.status, 200)
        self.assertTrue(r.headers[b"content-type"].startswith(b"text/plain; version=0.0.4"))
        self.assertIn(b"securepub_messages_in_total 3.0\n", r.body)
        self.assertIn(b"securepub_open_connections 2.0\n", r.body)

    def ticket_peer(self, peer: str, forwarded_for: str) -> str:
        body = b'{"user": "u"}'
        self.raw(
            b"POST /v1/tickets HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\n"
            b"Content-Type: application/json\r\nX-Forwarded-For: "
            + forwarded_for.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body,
            peer=peer,
        )
        [issued] = [e for e in self.events if e.get("securepub_event") == "ticket_issued"]
        self.events.clear()
        return str(issued["peer"])

    def test_client_address_behind_trusted_proxy(self) -> None:
        """Behind a trusted proxy the client's address is taken from X-Forwarded-For."""
        self.assertEqual(self.ticket_peer("192.0.2.5", "6.6.6.6, 203.0.113.7"), "203.0.113.7")

    def test_untrusted_peer_cannot_claim_an_address(self) -> None:
        """An untrusted peer's X-Forwarded-For is ignored, and that is logged."""
        self.assertEqual(self.ticket_peer("198.51.100.1", "203.0.113.7"), "198.51.100.1")
        self.raw(b"GET /metrics HTTP/1.1\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n", peer="198.51.100.1")
        self.assertTrue(
            any(e.get("securepub_event") == "proxy_headers_ignored" for e in self.events)
        )


class DisconnectTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryTicketStore(self.clock)
        self.broker = Broker(
            PayloadValidator(1000, 4, ()), Limits(), self.clock, fanout=LocalFanout()
        )
        keys = ApiKeys([KEY.encode()])
        self.site = SecurePubSite(
            Root({b"v1/disconnect": DisconnectResource(keys, self.clock, self.broker, self.store)}),
            max_body_bytes=5000,
            reactor=self.clock,
        )

    def post(self, body: bytes) -> Response:
        channel = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.5", 1))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.5", 1))
        channel.makeConnection(transport)
        channel.dataReceived(
            b"POST /v1/disconnect HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        return Response(transport.value())

    def test_disconnect_revokes_tickets_and_sessions(self) -> None:
        """202 with the number of revoked tickets; the user's sessions are closed."""
        from securepub.core.tickets import Ticket

        self.store.issue(Ticket("alice", None, (), (), 30.0))
        sub = RecordingSubscriber()
        self.broker.open_session("alice", Grants(), "ip", sub)
        r = self.post(b'{"user": "alice"}')
        self.assertEqual((r.status, r.json()), (202, {"user": "alice", "revoked_tickets": 1}))
        self.assertTrue(sub.revoked)
        r = self.post(b'{"user": "alice", "revoke_tickets": false}')
        self.assertEqual(r.json()["revoked_tickets"], 0)

    def test_bad_disconnect_requests(self) -> None:
        """A missing or bad user, or a bad flag, is 400 bad_request."""
        for body in (
            b"{}",
            b'{"user": ""}',
            b'{"user": 1}',
            b'{"user": "a", "revoke_tickets": 1}',
            b'{"user": "a", "x": 1}',
        ):
            r = self.post(body)
            self.assertEqual((r.status, r.json()["error"]), (400, "bad_request"), body)


class ScopedKeyTests(SynchronousTestCase):
    """A key limited to publish scopes cannot write, grant or administer beyond them."""

    SCOPED = "scoped-key-0123456789abcdef"

    def setUp(self) -> None:
        from securepub.core.topics import Pattern

        self.clock = Clock()
        self.store = MemoryTicketStore(self.clock)
        self.broker = Broker(
            PayloadValidator(1000, 4, ()), Limits(), self.clock, fanout=LocalFanout()
        )
        keys = ApiKeys([KEY.encode(), (self.SCOPED.encode(), (Pattern.parse("orders.>"),))])
        metrics = Metrics()
        self.site = SecurePubSite(
            Root(
                {
                    b"v1/publish": PublishResource(keys, self.clock, self.broker),
                    b"v1/tickets": TicketsResource(keys, self.clock, self.store),
                    b"v1/disconnect": DisconnectResource(keys, self.clock, self.broker, self.store),
                    b"metrics": MetricsResource(keys, self.clock, metrics.render),
                }
            ),
            max_body_bytes=5000,
            reactor=self.clock,
        )

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, key: str = SCOPED
    ) -> Response:
        channel = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.5", 1))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.5", 1))
        channel.makeConnection(transport)
        data = json.dumps(body).encode() if body is not None else b""
        channel.dataReceived(
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        return Response(transport.value())

    def test_publish_within_scope_only(self) -> None:
        """A scoped key publishes inside its patterns; elsewhere it is 403 forbidden."""
        self.assertEqual(
            self.call("POST", "/v1/publish", {"topic": "orders.new", "data": 1}).status, 202
        )
        r = self.call("POST", "/v1/publish", {"topic": "news.x", "data": 1})
        self.assertEqual((r.status, r.json()["error"]), (403, "forbidden"))
        r = self.call("POST", "/v1/publish", {"topic": "news.x", "data": 1}, key=KEY)
        self.assertEqual(r.status, 202)

    def test_tickets_cannot_grant_more(self) -> None:
        """A scoped key's tickets may grant publishing only within its own scopes."""
        ok = self.call(
            "POST",
            "/v1/tickets",
            {"user": "u", "publish": ["orders.eu.*"], "subscribe": ["news.*"]},
        )
        self.assertEqual(ok.status, 201)
        r = self.call("POST", "/v1/tickets", {"user": "u", "publish": [">"]})
        self.assertEqual((r.status, r.json()["error"]), (403, "forbidden"))

    def test_no_administration(self) -> None:
        """A scoped key may neither disconnect users nor read metrics."""
        r = self.call("POST", "/v1/disconnect", {"user": "alice"})
        self.assertEqual((r.status, r.json()["error"]), (403, "forbidden"))
        self.assertEqual(self.call("GET", "/metrics").status, 403)
        self.assertEqual(self.call("GET", "/metrics", key=KEY).status, 200)


class HistoryApiTests(SynchronousTestCase):
    """``/v1/publish`` with positions and ``GET /v1/history`` (SPEC section 8)."""

    SCOPED = "scoped-key-0123456789"

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        rules = [TopicRule(Pattern.parse("news.>"), history=HistoryPolicy(size=5, ttl=60))]
        self.history = MemoryHistory(self.clock, 10**8)
        self.broker = Broker(
            PayloadValidator(1000, 4, rules),
            Limits(),
            self.clock,
            fanout=LocalFanout(self.history),
            history=self.history,
        )
        keys = ApiKeys([KEY.encode(), (self.SCOPED.encode(), (Pattern.parse("news.mine"),))])
        self.site = SecurePubSite(
            Root(
                {
                    b"v1/publish": PublishResource(keys, self.clock, self.broker),
                    b"v1/history": HistoryResource(keys, self.clock, self.broker),
                }
            ),
            max_body_bytes=5000,
            reactor=self.clock,
        )

    def call(self, method: str, path: str, body: Any = None, key: str = KEY) -> Response:
        channel = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.5", 4000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.5", 4000))
        channel.makeConnection(transport)
        data = json.dumps(body).encode() if body is not None else b""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        channel.dataReceived(head.encode() + data)
        return Response(transport.value())

    def test_publish_answers_the_position_on_history_topics(self) -> None:
        """202 {"id", "offset", "epoch"} on a topic with history, {"id"} elsewhere."""
        first = self.call("POST", "/v1/publish", {"topic": "news.a", "data": 1}).json()
        second = self.call("POST", "/v1/publish", {"topic": "news.a", "data": 2}).json()
        self.assertEqual((first["offset"], second["offset"]), (1, 2))
        self.assertEqual(first["epoch"], second["epoch"])
        plain = self.call("POST", "/v1/publish", {"topic": "other", "data": 1}).json()
        self.assertEqual(set(plain), {"id"})

    def test_history_returns_messages_as_delivered(self) -> None:
        """offset, epoch and the message objects after since, at most limit of them."""
        ids = [
            self.call("POST", "/v1/publish", {"topic": "news.a", "data": n}).json()["id"]
            for n in range(7)
        ]
        r = self.call("GET", "/v1/history?topic=news.a&since=3&limit=2")
        self.assertEqual(r.status, 200, r.body)
        page = r.json()
        self.assertEqual(page["offset"], 7)
        self.assertEqual([m["offset"] for m in page["messages"]], [4, 5])
        self.assertEqual([m["id"] for m in page["messages"]], ids[3:5])
        first = page["messages"][0]
        self.assertEqual((first["op"], first["topic"], first["data"]), ("message", "news.a", 3))
        whole = self.call("GET", "/v1/history?topic=news.a").json()
        self.assertEqual([m["offset"] for m in whole["messages"]], [3, 4, 5, 6, 7])
        empty = self.call("GET", "/v1/history?topic=news.never").json()
        self.assertEqual((empty["offset"], empty["messages"]), (0, []))

    def test_history_refusals(self) -> None:
        """Bad parameters are 400, a topic without history too; scoped keys read their own."""
        for query in (
            "",
            "?topic=news.*",
            "?topic=plain.topic",
            "?topic=news.a&since=-1",
            "?topic=news.a&since=x",
            "?topic=news.a&limit=0",
            "?topic=news.a&limit=1001",
            "?topic=news.a&topic=news.b",
            "?topic=news.a&other=1",
        ):
            r = self.call("GET", "/v1/history" + query)
            self.assertEqual(r.status, 400, query)
            self.assertIn(r.json()["error"], ("bad_request", "invalid_topic"), query)
        self.assertEqual(self.call("GET", "/v1/history?topic=news.a", key="nope" * 5).status, 401)
        self.assertEqual(self.call("GET", "/v1/history?topic=news.a", key=self.SCOPED).status, 403)
        self.assertEqual(
            self.call("GET", "/v1/history?topic=news.mine", key=self.SCOPED).status, 200
        )
        self.assertEqual(self.call("POST", "/v1/history?topic=news.a", {}).status, 405)


class OpeningSiteTests(SynchronousTestCase):
    def test_connections_past_the_limit_are_dropped_at_once(self) -> None:
        """With max_opening_connections opening, a new one is dropped before any work;
        one whose headers are in no longer counts."""
        clock = Clock()
        opening = Opening(limit=2)
        site = SecurePubSite(
            Root({b"healthz": Health()}), max_body_bytes=100, reactor=clock, opening=opening
        )
        transports = []
        for n in range(3):
            channel = site.buildProtocol(IPv4Address("TCP", "192.0.2.5", 4000 + n))
            transport = StringTransport()
            channel.makeConnection(transport)
            transports.append((channel, transport))
        self.assertEqual((opening.count, opening.shed), (2, 1))
        self.assertTrue(transports[2][1].disconnecting)
        channel, transport = transports[0]
        channel.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(opening.count, 1)
        self.assertIn(b"200", transport.value().split(b"\r\n")[0])
        transports[1][0].connectionLost(Failure(ConnectionDone()))
        self.assertEqual(opening.count, 0)
