"""The WebSocket opening handshake against a real server (SPEC section 3).

Every attempt carries a unique User-Agent, so each test can find the
``handshake`` log line of its own attempt and check peer, Origin and outcome.
The last test checks that no ticket issued in this module reached any log.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from tests.server import SUBPROTOCOL, Server, recv_json, server_fixture

APP_ORIGIN = "https://app.example.com"
MAX_CONNECTIONS = 3

srv = server_fixture(
    {
        "allowed_origins": [APP_ORIGIN],
        "limits": {"max_connections_per_ip": MAX_CONNECTIONS},
    }
)
log_srv = server_fixture({"allowed_origins": [APP_ORIGIN], "origin_policy": "log"})
no_origins_srv = server_fixture({})

_agents = itertools.count(1)
#: Tickets made up by tests (never issued): they must not reach the log either.
_made_up_tickets: list[str] = []


class Attempt:
    """One handshake: its status (101 or the refusal) and, if open, the connection."""

    def __init__(self, status: int, conn: Any, agent: str, response: Any = None) -> None:
        self.status = status
        self.conn = conn
        self.agent = agent
        #: The refusal's HTTP response (websockets ``Response``), if refused.
        self.response = response

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def attempt(server: Server, ticket: str | None = None, **kwargs: Any) -> Attempt:
    """Try a handshake with a unique User-Agent; never raises for a refusal."""
    agent = f"it-handshake/{next(_agents)}"
    try:
        conn = server.ws(ticket, user_agent=agent, **kwargs)
    except InvalidStatus as e:
        return Attempt(e.response.status_code, None, agent, e.response)
    return Attempt(101, conn, agent)


def expect(server: Server, status: int, ticket: str | None = None, **kwargs: Any) -> Attempt:
    """`attempt`, asserting its status and its ``handshake`` log line."""
    result = attempt(server, ticket, **kwargs)
    if result.status != status:
        result.close()
        pytest.fail(f"expected {status}, got {result.status}")
    line = handshake_line(server, result.agent)
    assert "peer=127.0.0.1" in line, line
    assert f"status={status}" in line, line
    assert ("accepted" if status == 101 else "refused") in line, line
    origin = kwargs.get("origin")
    assert (f"origin={origin!r}" if origin is not None else "origin=None") in line, line
    return result


def handshake_line(server: Server, agent: str) -> str:
    """The log line of the handshake made with User-Agent ``agent``."""
    needle = f"user_agent={agent!r}"
    text = server.wait_for_log(lambda t: needle in t)
    lines = [ln for ln in text.splitlines() if needle in ln and "handshake" in ln]
    assert len(lines) == 1, lines
    return lines[0]


def _close_all(attempts: list[Attempt]) -> None:
    for a in attempts:
        a.close()


class TestAccepted:
    def test_ticket_as_subprotocol(self, srv: Server) -> None:
        """101 with subprotocol securepub.v1 for a ticket offered as ``ticket.<t>``;
        the welcome frame names the ticket's user."""
        a = expect(srv, 101, srv.ticket(user="sub-alice"))
        try:
            assert a.conn.subprotocol == SUBPROTOCOL
            assert recv_json(a.conn)["user"] == "sub-alice"
        finally:
            a.close()
        assert "user='sub-alice'" in handshake_line(srv, a.agent)

    def test_ticket_as_query_parameter(self, srv: Server) -> None:
        """101 with subprotocol securepub.v1 for a ticket in ``?ticket=``."""
        a = expect(srv, 101, srv.ticket(user="query-bob"), via="query")
        try:
            assert a.conn.subprotocol == SUBPROTOCOL
            assert recv_json(a.conn)["user"] == "query-bob"
        finally:
            a.close()

    def test_no_subprotocol_when_not_offered(self, srv: Server) -> None:
        """A client that does not offer securepub.v1 (ticket in the query) is
        accepted without a subprotocol, as RFC 6455 requires."""
        a = expect(srv, 101, srv.ticket(), via="query", protocols=())
        try:
            assert a.conn.subprotocol is None
            assert "Sec-WebSocket-Protocol" not in a.conn.response.headers
            assert recv_json(a.conn)["op"] == "welcome"
        finally:
            a.close()

    def test_allowed_origin_with_explicit_default_port(self, srv: Server) -> None:
        """``Origin: https://app.example.com:443`` matches the configured
        ``https://app.example.com``: origins compare as scheme, host and port."""
        a = expect(srv, 101, srv.ticket(), origin=APP_ORIGIN + ":443")
        a.close()
        b = expect(srv, 101, srv.ticket(), origin=APP_ORIGIN)
        b.close()


class TestRefused:
    def test_no_ticket_is_401(self, srv: Server) -> None:
        """No ticket at all (only securepub.v1 offered) is 401."""
        expect(srv, 401)

    def test_unknown_ticket_is_403(self, srv: Server) -> None:
        """A well-formed ticket the server never issued is 403, both ways."""
        made_up = "A" * 43
        _made_up_tickets.append(made_up)
        expect(srv, 403, made_up)
        expect(srv, 403, made_up, via="query")

    def test_expired_ticket_is_403(self, srv: Server) -> None:
        """A ticket presented after its ttl is 403."""
        status, _, body = srv.api("POST", "/v1/tickets", {"user": "late", "ttl": 1})
        assert status == 201
        srv.tickets.append(body["ticket"])
        time.sleep(max(0.0, body["expires_at"] - time.time()) + 0.2)
        line = handshake_line(srv, expect(srv, 403, body["ticket"]).agent)
        assert "expired" in line

    def test_replayed_ticket_is_403(self, srv: Server) -> None:
        """A ticket is redeemed once: the second presentation is 403, in either
        variant."""
        ticket = srv.ticket()
        expect(srv, 101, ticket).close()
        expect(srv, 403, ticket)
        expect(srv, 403, ticket, via="query")

    def test_wrong_ip_is_403_and_burns_the_ticket(self, srv: Server) -> None:
        """A ticket bound to 203.0.113.9 presented from 127.0.0.1 is 403 (the log
        says why, the response does not), and the attempt burns it: presenting
        it again is still refused."""
        ticket = srv.ticket(client_ip="203.0.113.9")
        first = expect(srv, 403, ticket)
        assert "wrong_ip" in handshake_line(srv, first.agent)
        expect(srv, 403, ticket)

    def test_refusals_do_not_say_why(self, srv: Server) -> None:
        """Unknown, replayed and wrong-IP tickets get the same 403 response
        (status line, headers, body): only the log tells them apart."""
        replayed = srv.ticket()
        expect(srv, 101, replayed).close()
        made_up = "B" * 43
        _made_up_tickets.append(made_up)
        refusals = [
            expect(srv, 403, made_up),
            expect(srv, 403, replayed),
            expect(srv, 403, srv.ticket(client_ip="203.0.113.9")),
        ]
        reasons = {handshake_line(srv, a.agent).split("reason=")[1].split()[0] for a in refusals}
        assert len(reasons) == 3, reasons
        shapes = {
            (
                a.response.reason_phrase,
                bytes(a.response.body),
                tuple(a.response.headers.raw_items()),
            )
            for a in refusals
        }
        assert len(shapes) == 1, shapes

    def test_ticket_without_client_ip_redeems_anywhere(self, srv: Server) -> None:
        """A ticket issued without ``client_ip`` is not bound to an address."""
        status, _, body = srv.api("POST", "/v1/tickets", {"user": "anywhere"})
        assert status == 201
        srv.tickets.append(body["ticket"])
        expect(srv, 101, body["ticket"]).close()

    @pytest.mark.parametrize(
        "origin",
        [
            "https://evil.example",
            "null",
            "http://app.example.com",  # other scheme
            "https://app.example.com:8443",  # other port
            "https://app.example.com.evil.example",
        ],
    )
    def test_foreign_origin_is_403_and_ticket_survives(self, srv: Server, origin: str) -> None:
        """Under ``origin_policy = "enforce"`` an Origin not in allowed_origins
        (``null`` included) is 403, and the refused attempt does not consume
        the ticket: the Origin check runs before the ticket is redeemed."""
        ticket = srv.ticket()
        expect(srv, 403, ticket, origin=origin)
        expect(srv, 101, ticket).close()

    def test_origin_checked_before_ticket(self, srv: Server) -> None:
        """A foreign Origin without a ticket is 403, not 401: Origin runs first."""
        expect(srv, 403, origin="https://evil.example")

    def test_per_ip_cap_is_429_and_ticket_survives(self, srv: Server) -> None:
        """Past ``max_connections_per_ip`` open connections the next handshake is
        429 (before the ticket check: no ticket gives 429, not 401; a foreign
        Origin still gives 403), the refused attempt leaves its ticket
        usable, and closing a connection frees a slot."""
        held: list[Attempt] = []
        try:
            for _ in range(MAX_CONNECTIONS):
                held.append(_open_when_slot_free(srv))
            ticket = srv.ticket()
            expect(srv, 429, ticket)
            expect(srv, 429)
            expect(srv, 403, srv.ticket(), origin="https://evil.example")
            held.pop().close()
            late = _open_when_slot_free(srv, ticket)
            held.append(late)
            assert recv_json(late.conn)["op"] == "welcome"
        finally:
            _close_all(held)


def _open_when_slot_free(srv: Server, ticket: str | None = None) -> Attempt:
    """Open a connection, retrying (bounded) while slots freed by connections
    that were just closed are still being released by the server."""
    ticket = ticket or srv.ticket()
    deadline = time.monotonic() + 5
    while True:
        a = attempt(srv, ticket)
        if a.status == 101:
            return a
        assert a.status == 429, a.status
        assert time.monotonic() < deadline, "per-IP slot never freed"
        time.sleep(0.05)


class TestOriginPolicies:
    @pytest.mark.parametrize("origin", ["https://evil.example", "null"])
    def test_log_policy_lets_foreign_origin_through(self, log_srv: Server, origin: str) -> None:
        """With ``origin_policy = "log"`` a foreign Origin is accepted, and the
        handshake log line still records it."""
        a = expect(log_srv, 101, log_srv.ticket(), origin=origin)
        try:
            assert recv_json(a.conn)["op"] == "welcome"
        finally:
            a.close()

    def test_log_policy_still_needs_a_ticket(self, log_srv: Server) -> None:
        """``origin_policy = "log"`` relaxes the Origin check only."""
        expect(log_srv, 401, origin="https://evil.example")

    def test_empty_allowed_origins_refuses_every_origin(self, no_origins_srv: Server) -> None:
        """With allowed_origins empty under enforce, any Origin is 403 while a
        client without Origin connects with a ticket; the start logged a
        warning saying so."""
        expect(no_origins_srv, 403, no_origins_srv.ticket(), origin="https://localhost")
        expect(no_origins_srv, 101, no_origins_srv.ticket()).close()
        assert no_origins_srv.log_lines("allowed_origins is empty")

    def test_other_paths_do_not_upgrade(self, srv: Server) -> None:
        """Only ``/ws`` upgrades: a valid ticket at ``/ws/extra`` or ``/`` is
        refused with 404, and the ticket is not consumed there."""
        ticket = srv.ticket()
        for path in ("/ws/extra", "/"):
            with pytest.raises(InvalidStatus) as info:
                srv.ws(ticket, path=path)
            assert info.value.response.status_code == 404
        expect(srv, 101, ticket).close()


def test_no_ticket_in_any_log(srv: Server, log_srv: Server, no_origins_srv: Server) -> None:
    """No ticket used in this module (issued, replayed, sent as subprotocol or
    in the query string, refused or made up) appears in any server's log file
    or output, while the handshakes themselves were logged. Runs last, so it
    covers every test above; it makes a few handshakes of its own too."""
    servers = (srv, log_srv, no_origins_srv)
    for server in servers:
        for via in ("subprotocol", "query"):
            ticket = server.ticket()
            expect(server, 101, ticket, via=via).close()
            expect(server, 403, ticket, via=via)
            expect(server, 403, server.ticket(client_ip="203.0.113.9"), via=via)
    tickets = [t for s in servers for t in s.tickets] + _made_up_tickets
    for server in servers:
        assert server.log_lines("handshake", "peer=127.0.0.1")
        everything = server.log_text() + server.stdout_text() + server.stderr_text()
        leaked = [t for t in tickets if t in everything]
        assert not leaked, f"{len(leaked)} ticket(s) in the log"
        # Nor the query-string form of the request line.
        assert "ticket=" not in everything
