"""/static/securepub.js, /demo and /dev/ticket: routing, headers, and who may get a demo ticket.

Most tests drive the resources through a real `SecurePubSite` over an
in-memory transport; the last ones start real servers, with and without --dev.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from securepub.core.tickets import TicketRefused
from securepub.core.topics import Pattern
from securepub.core.validation import PayloadValidator, TopicRule
from securepub.dev.pages import (
    DEMO_CSP,
    DEMO_PATTERN,
    demo_topic_rule,
    own_origins,
    with_demo_rule,
)
from securepub.engines.memory.tickets import MemoryTicketStore
from securepub.node import client_routes
from securepub.server.site import Root, SecurePubSite
from tests.server import Server
from tests.test_api import Response

PORT = 8443
ORIGIN = f"https://localhost:{PORT}"


class PagesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = MemoryTicketStore(self.clock)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def site(self, dev: bool = True) -> SecurePubSite:
        routes = client_routes(dev=dev, port=PORT, tickets=self.store, clock=self.clock)
        return SecurePubSite(Root(routes), max_body_bytes=10_000, reactor=self.clock)

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        peer: str = "127.0.0.1",
        dev: bool = True,
    ) -> Response:
        address: Any = (
            IPv6Address("TCP", peer, 4000) if ":" in peer else IPv4Address("TCP", peer, 4000)
        )
        channel = self.site(dev).buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        lines = [f"{method} {path} HTTP/1.1", "Host: localhost:8443"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        lines.append(f"Content-Length: {len(body)}")
        channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        return Response(transport.value())

    def ticket_request(self, **kwargs: Any) -> Response:
        headers = {"Origin": ORIGIN, "Content-Type": "application/json"}
        headers.update(kwargs.pop("headers", {}))
        return self.request("POST", "/dev/ticket", headers=headers, body=b"{}", **kwargs)

    # -- /static

    def test_securepub_js_is_served_as_javascript_to_any_origin(self) -> None:
        """/static/securepub.js: 200, JavaScript, nosniff, importable cross-origin (CORS *)."""
        for dev in (True, False):
            response = self.request("GET", "/static/securepub.js", dev=dev)
            self.assertEqual(response.status, 200)
            self.assertEqual(response.headers[b"content-type"], b"text/javascript; charset=utf-8")
            self.assertEqual(response.headers[b"x-content-type-options"], b"nosniff")
            self.assertEqual(response.headers[b"access-control-allow-origin"], b"*")
            self.assertIn(b"export function connect", response.body)

    def test_static_serves_only_its_allow_list(self) -> None:
        """Any other name under /static, traversal included, is the JSON 404."""
        for path in (
            "/static",
            "/static/",
            "/static/demo.js",
            "/static/demo.html",
            "/static/../devpages.py",
            "/static/%2e%2e/devpages.py",
            "/static/securepub.js/x",
            "/static/SECUREPUB.JS",
        ):
            response = self.request("GET", path)
            self.assertEqual(response.status, 404, path)
            self.assertEqual(response.json()["error"], "not_found")

    def test_static_answers_get_and_head_only(self) -> None:
        """HEAD has the headers and no body; POST is 405 with Allow."""
        head = self.request("HEAD", "/static/securepub.js")
        self.assertEqual(head.status, 200)
        self.assertEqual(head.body, b"")
        post = self.request("POST", "/static/securepub.js")
        self.assertEqual(post.status, 405)
        self.assertEqual(post.headers[b"allow"], b"GET, HEAD")

    # -- /demo

    def test_demo_page_is_served_under_a_strict_csp(self) -> None:
        """/demo and its files come with a CSP that allows only the server's own files."""
        for path, media in (
            ("/demo", b"text/html; charset=utf-8"),
            ("/demo/", b"text/html; charset=utf-8"),
            ("/demo/demo.js", b"text/javascript; charset=utf-8"),
            ("/demo/demo.css", b"text/css; charset=utf-8"),
        ):
            response = self.request("GET", path)
            self.assertEqual(response.status, 200, path)
            self.assertEqual(response.headers[b"content-type"], media)
            self.assertEqual(response.headers[b"content-security-policy"], DEMO_CSP)
            self.assertEqual(response.headers[b"x-frame-options"], b"DENY")
        self.assertIn(b"default-src 'self'", DEMO_CSP)
        self.assertIn(b"require-trusted-types-for 'script'", DEMO_CSP)
        self.assertNotIn(b"unsafe", DEMO_CSP)

    def test_demo_and_dev_do_not_exist_without_dev(self) -> None:
        """Without --dev, /demo and /dev/ticket are the ordinary 404."""
        self.assertEqual(self.request("GET", "/demo", dev=False).status, 404)
        self.assertEqual(self.ticket_request(dev=False).status, 404)
        self.assertEqual(self.request("GET", "/demo/nothing").status, 404)

    # -- /dev/ticket

    def test_a_demo_ticket_is_bound_to_the_caller_and_the_demo_topics(self) -> None:
        """201 with a ticket for user demo, granting demo.> both ways, bound to the peer."""
        response = self.ticket_request()
        self.assertEqual(response.status, 201)
        answer = response.json()
        self.assertEqual(set(answer), {"ticket", "expires_at"})
        self.assertEqual(answer["expires_at"], self.clock.seconds() + 30)
        self.assertEqual(response.headers[b"cache-control"], b"no-store")
        ticket = self.successResultOf(self.store.redeem(answer["ticket"], "127.0.0.1"))
        self.assertEqual(ticket.user, "demo")
        self.assertEqual(ticket.client_ip, "127.0.0.1")
        self.assertEqual(ticket.subscribe, (Pattern.parse(DEMO_PATTERN),))
        self.assertEqual(ticket.publish, (Pattern.parse(DEMO_PATTERN),))
        [issued] = [e for e in self.events if e.get("securepub_event") == "ticket_issued"]
        self.assertEqual(issued["source"], "dev")
        self.assertNotIn(answer["ticket"], repr(issued))

    def test_a_demo_ticket_cannot_be_redeemed_from_elsewhere(self) -> None:
        """The ticket is bound to the requesting address: another address burns it."""
        answer = self.ticket_request(peer="127.0.0.5").json()
        failure = self.failureResultOf(self.store.redeem(answer["ticket"], "127.0.0.1"))
        self.assertEqual(failure.value.reason, "wrong_ip")
        failure.trap(TicketRefused)

    def test_ipv6_loopback_is_loopback(self) -> None:
        """::1 and IPv4-mapped loopback addresses may ask."""
        self.assertEqual(self.ticket_request(peer="::1").status, 201)
        self.assertEqual(self.ticket_request(peer="::ffff:127.0.0.1").status, 201)

    def test_only_loopback_peers_see_dev_ticket(self) -> None:
        """Any other peer gets the 404 of a path that does not exist, whatever it sends."""
        for peer in ("192.0.2.1", "10.0.0.1", "2001:db8::1", "::ffff:192.0.2.1"):
            response = self.ticket_request(peer=peer)
            self.assertEqual(response.status, 404, peer)
            self.assertEqual(self.request("GET", "/dev/ticket", peer=peer).status, 404)
        self.assertEqual(self.store.size(), 0)

    def test_other_paths_under_dev_are_404(self) -> None:
        """Only /dev/ticket exists under /dev."""
        for path in ("/dev", "/dev/", "/dev/ticket/x", "/dev/tickets"):
            self.assertEqual(
                self.request("POST", path, headers={"Origin": ORIGIN}).status, 404, path
            )

    def test_dev_ticket_needs_post(self) -> None:
        """GET (what a link or an <img> could send) is 405 and issues nothing."""
        response = self.request("GET", "/dev/ticket", headers={"Origin": ORIGIN})
        self.assertEqual(response.status, 405)
        self.assertEqual(response.headers[b"allow"], b"POST")
        self.assertEqual(self.store.size(), 0)

    def test_dev_ticket_needs_the_servers_own_origin(self) -> None:
        """No Origin, another site's, a null one or another port: 403, nothing issued, logged."""
        for origin in (
            None,
            "https://evil.example",
            "null",
            "http://localhost:8443",
            "https://localhost:9999",
            "https://localhost:8443/x",
        ):
            headers = {"Content-Type": "application/json"}
            if origin is not None:
                headers["Origin"] = origin
            response = self.request("POST", "/dev/ticket", headers=headers, body=b"{}")
            self.assertEqual(response.status, 403, origin)
            self.assertEqual(response.json()["error"], "forbidden")
        self.assertEqual(self.store.size(), 0)
        refused = [e for e in self.events if e.get("securepub_event") == "dev_ticket_refused"]
        self.assertEqual(len(refused), 6)
        self.assertEqual(refused[1]["origin"], "https://evil.example")

    def test_both_dev_origins_are_accepted(self) -> None:
        """https://localhost:PORT and https://127.0.0.1:PORT, the origins --dev allows."""
        self.assertEqual(own_origins(PORT), {ORIGIN, f"https://127.0.0.1:{PORT}"})
        for origin in (ORIGIN, f"https://127.0.0.1:{PORT}", "https://LOCALHOST:8443"):
            response = self.ticket_request(headers={"Origin": origin})
            self.assertEqual(response.status, 201, origin)

    def test_dev_ticket_needs_json(self) -> None:
        """A body type a cross-site form can send (text/plain, form data) is 415."""
        for media in ("text/plain", "application/x-www-form-urlencoded", "text/plain; a=b"):
            response = self.ticket_request(headers={"Content-Type": media})
            self.assertEqual(response.status, 415, media)
        self.assertEqual(self.store.size(), 0)


def test_the_demo_rule_opens_demo_topics_after_configured_rules() -> None:
    """--dev's extra rule lets browsers publish on demo.>, but configured rules still win."""
    rule = demo_topic_rule()
    assert rule.pattern.text == DEMO_PATTERN and rule.client_publish and rule.schema is None
    assert rule.history is not None and rule.history.size == 100
    closed = TopicRule(pattern=Pattern.parse("demo.closed"), client_publish=False)
    rules = with_demo_rule((closed,))
    assert rules == (closed, rule)
    validator = PayloadValidator(1000, 8, rules)
    assert validator.rule_for("demo.hello") == rule
    assert validator.rule_for("demo.closed") == closed
    assert validator.rule_for("other.topic") is None


@pytest.mark.parametrize(
    ("package", "name"), [("securepub.clients", "securepub.js"), ("securepub.dev", "demo.js")]
)
def test_scripts_never_turn_strings_into_markup_or_code(package: str, name: str) -> None:
    """No innerHTML, outerHTML, insertAdjacentHTML, document.write, eval or Function."""
    source = resources.files(package).joinpath("static", name).read_text("utf-8")
    for forbidden in (
        r"innerHTML",
        r"outerHTML",
        r"insertAdjacentHTML",
        r"document\.write",
        r"\beval\b",
        r"\bFunction\s*\(",
        r"setTimeout\(\s*['\"`]",
        r"setInterval\(\s*['\"`]",
    ):
        assert re.search(forbidden, source) is None, (name, forbidden)
    if name == "securepub.js":
        assert "JSON.parse" in source


def test_demo_html_has_no_inline_script_or_style() -> None:
    """The CSP forbids inline code, so the page must not need any."""
    html = resources.files("securepub.dev").joinpath("static", "demo.html").read_text("utf-8")
    assert re.search(r"<script(?![^>]*\bsrc=)", html) is None
    assert "<style" not in html and "style=" not in html
    assert re.search(r"\son[a-z]+\s*=", html) is None


# -- real servers ------------------------------------------------------------------


def test_a_real_server_without_dev_serves_the_script_but_no_demo() -> None:
    """A production start: /static/securepub.js is there; /demo and /dev/ticket are 404."""
    with Server() as server:
        status, headers, body = server.api("GET", "/static/securepub.js")
        assert status == 200 and b"export function connect" in body
        assert headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert server.api("GET", "/demo")[0] == 404
        origin = {"Origin": server.url}
        assert server.api("POST", "/dev/ticket", {}, headers=origin, key="")[0] == 404


def test_a_real_dev_server_serves_the_demo_and_demo_tickets() -> None:
    """With --dev: the demo page, and a demo ticket the WebSocket endpoint accepts."""
    with Server(dev=True) as server:
        status, headers, body = server.api("GET", "/demo")
        assert status == 200 and b"securepub demo" in body
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        origin = f"https://127.0.0.1:{server.port}"
        status, _, answer = server.api(
            "POST", "/dev/ticket", {}, headers={"Origin": origin}, key=""
        )
        assert status == 201, answer
        conn = server.ws(answer["ticket"], origin=origin)
        try:
            welcome = json.loads(conn.recv(timeout=5))
            assert welcome["user"] == "demo"
        finally:
            conn.close()
