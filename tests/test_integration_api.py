"""The HTTPS API of a real server (SPEC section 2), over verified TLS."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import time
from typing import Any

import pytest

from tests.server import Server, server_fixture

MAX_MESSAGE_BYTES = 1024
BODY_CAP = MAX_MESSAGE_BYTES + 4096


srv = server_fixture({"limits": {"max_message_bytes": MAX_MESSAGE_BYTES}})


def assert_error(result: tuple[int, Any, Any], status: int, code: str) -> None:
    """A SPEC error: the status, ``{"error": code, "message": text}``, JSON, no-store."""
    got_status, headers, body = result
    assert got_status == status, (got_status, body)
    assert isinstance(body, dict), body
    assert body.get("error") == code, body
    assert isinstance(body.get("message"), str) and body["message"]
    assert headers["Content-Type"].split(";")[0] == "application/json"
    assert headers["Cache-Control"] == "no-store"


class RawTLS:
    """One verified TLS connection for requests http.client can't make."""

    def __init__(self, srv: Server, timeout: float = 5) -> None:
        raw = socket.create_connection((srv.host, srv.port), timeout=timeout)
        self.tls = srv.ssl_context().wrap_socket(raw, server_hostname=srv.host)
        self.buffer = b""

    def __enter__(self) -> RawTLS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.tls.close()

    def response(self, timeout: float = 5) -> bytes:
        """The first complete response (head and Content-Length body) received."""
        deadline = time.monotonic() + timeout
        while True:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if sep:
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if len(rest) >= length:
                    return head + sep + rest[:length]
            left = deadline - time.monotonic()
            assert left > 0, f"no complete response in {timeout}s: {self.buffer[:200]!r}"
            self.tls.settimeout(left)
            chunk = self.tls.recv(65536)
            assert chunk, f"connection closed before a complete response: {self.buffer[:200]!r}"
            self.buffer += chunk

    def closed_within(self, seconds: float) -> bool:
        """Whether the server closes the connection within ``seconds``."""
        deadline = time.monotonic() + seconds
        try:
            while (left := deadline - time.monotonic()) > 0:
                self.tls.settimeout(left)
                if not self.tls.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            return True
        except TimeoutError:
            return False
        return False


def post_head(srv: Server, path: str, extra: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\n"
        f"Authorization: Bearer {srv.api_key}\r\nContent-Type: application/json\r\n"
        f"{extra}\r\n"
    ).encode()


class TestPublicEndpoints:
    def test_healthz(self, srv: Server) -> None:
        """GET /healthz is 200 ``{"status": "ok"}`` without authentication."""
        status, headers, body = srv.api("GET", "/healthz")
        assert (status, body) == (200, {"status": "ok"})
        assert headers["Content-Type"].split(";")[0] == "application/json"
        assert headers["Cache-Control"] == "no-store"

    @pytest.mark.parametrize(
        ("method", "path"),
        [
            ("GET", "/"),
            ("GET", "/nope"),
            ("GET", "/v1"),
            ("GET", "/v1/nope"),
            ("POST", "/v1/nope"),
            ("GET", "/healthz/extra"),
            ("GET", "/ws/extra"),
            ("GET", "/v1/tickets/extra"),
            ("GET", "/demo"),
        ],
    )
    def test_unknown_paths_are_json_404(self, srv: Server, method: str, path: str) -> None:
        """Any path the API does not name, ``/ws/extra`` included, is a JSON 404
        (``/demo`` only exists under ``--dev``)."""
        assert_error(srv.api(method, path, key=""), 404, "not_found")

    def test_plain_get_on_ws_is_a_json_error(self, srv: Server) -> None:
        """A GET of /ws that is not a WebSocket upgrade gets a JSON 4xx error,
        not a page naming the server's libraries."""
        status, headers, body = srv.api("GET", "/ws")
        assert 400 <= status < 500, status
        assert headers["Content-Type"].split(";")[0] == "application/json"
        assert isinstance(body, dict) and "error" in body
        assert b"Autobahn" not in srv.response_bodies[-1]

    @pytest.mark.parametrize("path", ["/v1/tickets", "/v1/publish"])
    def test_get_on_post_endpoints_is_405(self, srv: Server, path: str) -> None:
        """The backend endpoints answer only POST: GET is 405 with an Allow header."""
        result = srv.api("GET", path, key=srv.api_key)
        assert result[0] == 405
        assert result[1]["Allow"] == "POST"
        assert result[2]["error"] == "method_not_allowed"


class TestAuthentication:
    @pytest.mark.parametrize(
        "authorization",
        [
            None,
            "Bearer wrong-key-0123456789abcdef",
            "Bearer ",
            "Basic {key}",
            "Bearer {key}x",
            "Bearer {key_prefix}",
        ],
    )
    @pytest.mark.parametrize("path", ["/v1/tickets", "/v1/publish"])
    def test_missing_or_wrong_key_is_401(
        self, srv: Server, path: str, authorization: str | None
    ) -> None:
        """No key, a wrong key, a near miss of the key or another scheme is 401
        ``unauthorized``, whatever the body, and the body does not echo the key."""
        headers = {}
        if authorization is not None:
            headers["Authorization"] = authorization.format(
                key=srv.api_key, key_prefix=srv.api_key[:-1]
            )
        body = {"user": "alice"} if path == "/v1/tickets" else {"topic": "a.b", "data": 1}
        result = srv.api("POST", path, body, headers=headers, key="")
        assert_error(result, 401, "unauthorized")
        assert srv.api_key not in repr(result[2])

    def test_unauthorized_checked_before_body(self, srv: Server) -> None:
        """Without a key, even a malformed body or media type gets 401, not 400/415."""
        result = srv.api(
            "POST", "/v1/tickets", b"{nope", headers={"Content-Type": "text/plain"}, key=""
        )
        assert_error(result, 401, "unauthorized")


class TestTickets:
    def test_issue_ticket(self, srv: Server) -> None:
        """POST /v1/tickets is 201 with a base64url ticket of >= 128 bits and an
        ``expires_at`` about ttl seconds ahead; tickets differ every time."""
        before = time.time()
        status, headers, body = srv.api(
            "POST",
            "/v1/tickets",
            {
                "user": "alice",
                "client_ip": "203.0.113.7",
                "subscribe": ["news.*", "user.alice.>"],
                "publish": ["chat.room1"],
                "ttl": 60,
            },
        )
        assert status == 201, body
        assert set(body) == {"ticket", "expires_at"}
        ticket = body["ticket"]
        assert isinstance(ticket, str) and len(ticket) >= 43
        assert set(ticket) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        )
        assert len(base64.urlsafe_b64decode(ticket + "=" * (-len(ticket) % 4))) >= 16
        assert before + 59 <= body["expires_at"] <= time.time() + 61
        assert headers["Cache-Control"] == "no-store"
        assert headers["Content-Type"].split(";")[0] == "application/json"
        assert srv.ticket() != srv.ticket()

    @pytest.mark.parametrize(
        "body",
        [
            {"user": "u"},
            {"user": "x" * 255},
            {"user": "é" * 127},
            {"user": "u", "ttl": 1},
            {"user": "u", "ttl": 300},
            {"user": "u", "client_ip": "::1"},
            {"user": "u", "client_ip": "2001:db8::7"},
            {"user": "u", "subscribe": [], "publish": []},
            {"user": "u", "subscribe": ["a.*.c", "b.>", "c"], "publish": ["chat.*"]},
        ],
    )
    def test_valid_ticket_requests(self, srv: Server, body: dict[str, Any]) -> None:
        """Boundary values that the SPEC allows are accepted (201)."""
        status, _, answer = srv.api("POST", "/v1/tickets", body)
        assert status == 201, answer

    @pytest.mark.parametrize(
        "body",
        [
            {"user": "u", "extra": 1},
            {},
            {"client_ip": "127.0.0.1"},
            {"user": ""},
            {"user": None},
            {"user": 5},
            {"user": "x" * 256},
            {"user": "é" * 128},  # 128 characters, 256 bytes
            {"user": "u", "ttl": 0},
            {"user": "u", "ttl": 301},
            {"user": "u", "ttl": -1},
            {"user": "u", "ttl": "30"},
            {"user": "u", "ttl": True},
            {"user": "u", "ttl": 30.5},
            {"user": "u", "ttl": None},
            {"user": "u", "client_ip": "not-an-ip"},
            {"user": "u", "client_ip": 7},
            {"user": "u", "client_ip": "127.0.0.1/32"},
            {"user": "u", "subscribe": "news.*"},
            {"user": "u", "subscribe": [5]},
            {"user": "u", "publish": {"a": 1}},
        ],
    )
    def test_bad_ticket_requests_are_400(self, srv: Server, body: dict[str, Any]) -> None:
        """Unknown fields, a missing/empty/oversized (in bytes) user, a ttl out of
        1..300 or not an integer, a client_ip that is not an address and
        non-list grants are 400 ``bad_request``."""
        assert_error(srv.api("POST", "/v1/tickets", body), 400, "bad_request")

    @pytest.mark.parametrize(
        "raw",
        [
            b'{"user": NaN}',
            b'{"user": "u", "ttl": NaN}',
            b'{"user": "u", "ttl": Infinity}',
            b'{"user": "u", "ttl": -Infinity}',
            b'{"user": "a", "user": "b"}',
            b"[]",
            b'"user"',
            b"42",
            b"null",
            b"",
            b"{",
            b'{"user": "u"} trailing',
            b'{"user": "\xff"}',
        ],
    )
    def test_malformed_bodies_are_400(self, srv: Server, raw: bytes) -> None:
        """Strict JSON: NaN/Infinity, duplicate keys, non-objects, empty, truncated
        or non-UTF-8 bodies are 400 ``bad_request``."""
        assert_error(srv.api("POST", "/v1/tickets", raw), 400, "bad_request")

    @pytest.mark.parametrize(
        "grants",
        [
            {"subscribe": ["news..x"]},
            {"subscribe": ["news.>.x"]},
            {"subscribe": [""]},
            {"subscribe": ["news.sp ort"]},
            {"publish": ["a.b.c.d.e.f.g.h.i"]},
            {"publish": ["news.**"]},
        ],
    )
    def test_bad_grant_pattern_is_invalid_topic(self, srv: Server, grants: dict[str, Any]) -> None:
        """A grant that is not a valid pattern (section 5) is 400 ``invalid_topic``."""
        assert_error(srv.api("POST", "/v1/tickets", {"user": "u", **grants}), 400, "invalid_topic")

    @pytest.mark.parametrize(
        "content_type", ["", "text/plain", "application/x-www-form-urlencoded", "json"]
    )
    def test_wrong_content_type_is_415(self, srv: Server, content_type: str) -> None:
        """A body not declared ``application/json`` (an empty Content-Type
        included) is 415 ``unsupported_media_type``."""
        headers = {"Content-Type": content_type}
        result = srv.api("POST", "/v1/tickets", {"user": "u"}, headers=headers)
        assert_error(result, 415, "unsupported_media_type")

    def test_json_with_charset_is_accepted(self, srv: Server) -> None:
        """``application/json; charset=utf-8`` is JSON."""
        status, _, _ = srv.api(
            "POST",
            "/v1/tickets",
            {"user": "u"},
            headers={"Content-Type": "application/json; charset=utf-8"},
        )
        assert status == 201


class TestPublish:
    def test_publish_is_202_with_id(self, srv: Server) -> None:
        """POST /v1/publish to a valid topic is 202 ``{"id": ...}``; ids differ."""
        status, headers, body = srv.api(
            "POST", "/v1/publish", {"topic": "news.sports", "data": {"headline": "hello"}}
        )
        assert status == 202, body
        assert set(body) == {"id"} and isinstance(body["id"], str) and body["id"]
        assert headers["Cache-Control"] == "no-store"
        assert srv.publish("news.sports", None) != srv.publish("news.sports", [1])

    @pytest.mark.parametrize(
        "topic", ["news.*", "news.>", ">", "", "news..x", "a.b.c.d.e.f.g.h.i", "x" * 256, "news.é"]
    )
    def test_publish_to_pattern_or_bad_topic_is_invalid_topic(
        self, srv: Server, topic: str
    ) -> None:
        """One publishes to a topic, not a pattern: wildcards and malformed
        topics are 400 ``invalid_topic``."""
        result = srv.api("POST", "/v1/publish", {"topic": topic, "data": 1})
        assert_error(result, 400, "invalid_topic")

    @pytest.mark.parametrize(
        "body",
        [
            {"topic": "a.b"},
            {"data": 1},
            {"topic": "a.b", "data": 1, "extra": 2},
            {"topic": 5, "data": 1},
        ],
    )
    def test_bad_publish_bodies_are_400(self, srv: Server, body: dict[str, Any]) -> None:
        """Missing or unknown fields, or a topic that is not a string, are 400."""
        assert_error(srv.api("POST", "/v1/publish", body), 400, "bad_request")

    def test_payload_over_max_message_bytes_is_invalid_payload(self, srv: Server) -> None:
        """A body under the 4 KiB slack whose payload is over max_message_bytes
        is 400 ``invalid_payload`` (not 413)."""
        result = srv.api(
            "POST", "/v1/publish", {"topic": "a.b", "data": "x" * (MAX_MESSAGE_BYTES + 10)}
        )
        assert_error(result, 400, "invalid_payload")


def _chunked(size: int, piece: int = 1000) -> bytes:
    chunk = b"x" * piece
    return b"".join(b"%x\r\n%s\r\n" % (piece, chunk) for _ in range(size // piece + 1))


class TestBodyCap:
    def test_declared_length_over_cap_is_413_without_reading_it(self, srv: Server) -> None:
        """``Content-Length: 10000000`` with only a few bytes sent is answered 413
        ``too_large`` at once: the server does not wait for the body."""
        with RawTLS(srv) as conn:
            started = time.monotonic()
            conn.tls.sendall(
                post_head(srv, "/v1/publish", "Content-Length: 10000000\r\n") + b'{"topic":'
            )
            response = conn.response(timeout=5)
            elapsed = time.monotonic() - started
        assert response.startswith(b"HTTP/1.1 413"), response[:200]
        assert elapsed < 2, elapsed
        head, _, body = response.partition(b"\r\n\r\n")
        assert b"\r\ncontent-type: application/json" in head.lower()
        assert b"\r\ncache-control: no-store" in head.lower()
        assert json.loads(body)["error"] == "too_large"

    def test_declared_length_just_over_cap_is_413(self, srv: Server) -> None:
        """The cap is max_message_bytes + 4 KiB: one byte more is 413 too."""
        with RawTLS(srv) as conn:
            conn.tls.sendall(
                post_head(srv, "/v1/tickets", f"Content-Length: {BODY_CAP + 1}\r\n") + b"{"
            )
            assert conn.response().startswith(b"HTTP/1.1 413")

    def test_chunked_body_growing_past_cap_is_413(self, srv: Server) -> None:
        """A chunked body is cut with 413 as soon as it grows past the cap."""
        with RawTLS(srv) as conn:
            started = time.monotonic()
            conn.tls.sendall(
                post_head(srv, "/v1/publish", "Transfer-Encoding: chunked\r\n")
                + _chunked(BODY_CAP + 1000)
            )
            response = conn.response(timeout=5)
            assert time.monotonic() - started < 2
        assert response.startswith(b"HTTP/1.1 413"), response[:200]
        assert json.loads(response.partition(b"\r\n\r\n")[2])["error"] == "too_large"

    def test_chunked_body_under_cap_is_accepted(self, srv: Server) -> None:
        """A chunked body under the cap is read and handled normally."""
        body = b'{"topic": "news.chunked", "data": {"n": 1}}'
        with RawTLS(srv) as conn:
            conn.tls.sendall(
                post_head(srv, "/v1/publish", "Transfer-Encoding: chunked\r\n")
                + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
            )
            assert conn.response().startswith(b"HTTP/1.1 202")

    @pytest.mark.parametrize("framing", ["content-length", "chunked"])
    def test_connection_closed_after_413(self, srv: Server, framing: str) -> None:
        """After answering 413 with ``Connection: close`` the server closes the
        connection promptly instead of holding it open (a cheap way to pin
        server resources otherwise)."""
        if framing == "chunked":
            extra, body = "Transfer-Encoding: chunked\r\n", _chunked(BODY_CAP + 1000)
        else:
            extra, body = "Content-Length: 10000000\r\n", b'{"topic":'
        with RawTLS(srv) as conn:
            conn.tls.sendall(post_head(srv, "/v1/publish", extra) + body)
            assert conn.response().startswith(b"HTTP/1.1 413")
            assert conn.closed_within(1.5)


def test_no_error_body_contains_the_api_key(srv: Server) -> None:
    """No response body received in this module (this test runs last) contains
    the API key, not even for requests that carried it or a near miss of it."""
    near_miss = {"Authorization": f"Bearer {srv.api_key}0"}
    srv.api("POST", "/v1/tickets", {"user": "u"}, headers=near_miss, key="")
    srv.api("POST", "/v1/tickets", {"user": ""})
    srv.api("POST", "/v1/publish", b"{nope")
    srv.api("POST", "/v1/publish", {"topic": "a.*", "data": srv.api_key})
    srv.api("GET", "/v1/publish", key=srv.api_key)
    key = srv.api_key.encode()
    assert not [b for b in srv.response_bodies if key in b]


def test_metrics_parse_with_prometheus_clients_own_parser(srv: Server) -> None:
    """/metrics of a real node is valid Prometheus text: every family parses, histograms too."""
    from prometheus_client.parser import text_string_to_metric_families

    conn = srv.session()
    conn.close()
    status, headers, body = srv.api("GET", "/metrics", key=srv.api_key)
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode("utf-8"))}
    for name in (
        "securepub_handshakes",
        "securepub_errors",
        "securepub_messages_in",
        "securepub_messages_out",
        "securepub_cluster_messages_received",
        "securepub_open_connections",
        "securepub_handshake_seconds",
        "securepub_ticket_redemption_seconds",
        "securepub_publish_to_write_seconds",
        "securepub_redis_roundtrip_seconds",
    ):
        assert name in families, name
    accepted = [
        s
        for s in families["securepub_handshake_seconds"].samples
        if s.name.endswith("_count") and s.labels.get("outcome") == "accepted"
    ]
    assert accepted and accepted[0].value >= 1
