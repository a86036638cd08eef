"""The Python publishers (blocking and Twisted) against real servers.

Success paths and server refusals run against a real ``twistd securepub --dev``
over verified TLS. Retry behaviour (503, connections dropped mid-request,
non-JSON answers) and host-name checks need answers a correct server never
gives, so those run against a small scripted TLS server in this file.
"""

from __future__ import annotations

import contextlib
import http.server
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trustme
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase as TrialTestCase

from securepub.clients.blocking import (
    APIError,
    CertificateError,
    ClientError,
    ConnectionFailed,
    HistoryPage,
    IssuedTicket,
    Published,
    Publisher,
    RetryPolicy,
    history_query,
    parse_url,
)
from securepub.clients.twisted_client import TwistedPublisher
from tests.server import Server, free_port, recv_json, request_json, server_fixture

srv = server_fixture(dev=True)


class SleepRecorder:
    """Stands in for ``time.sleep``: records the delays, and may run a hook on the first."""

    def __init__(self, on_first: Callable[[], None] | None = None) -> None:
        self.delays: list[float] = []
        self._on_first = on_first

    def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if len(self.delays) == 1 and self._on_first is not None:
            self._on_first()


def publisher(server: Server, **kwargs: Any) -> Publisher:
    kwargs.setdefault("ca", server.ca_path)
    return Publisher(server.url, server.api_key, **kwargs)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A CA that did not sign the server's certificate."""
    path = tmp_path_factory.mktemp("other-ca") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


# -- the blocking Publisher against a real server ---------------------------


def test_publish_returns_the_id_the_subscriber_sees(srv: Server) -> None:
    """publish() returns the server's message id, and the data arrives unchanged."""
    conn = srv.session(subscribe=["client.>"])
    try:
        assert request_json(conn, {"op": "subscribe", "id": 1, "topic": "client.>"})["op"] == "ok"
        data = {"text": "hé", "n": [1, 2.5, None, True], "nested": {"a": {}}}
        with publisher(srv) as pub:
            message_id = pub.publish("client.one", data)
        frame = recv_json(conn)
        assert frame["op"] == "message"
        assert frame["id"] == message_id
        assert frame["topic"] == "client.one"
        assert frame["data"] == data
    finally:
        conn.close()


def test_issue_ticket_returns_a_ticket_the_server_redeems(srv: Server) -> None:
    """issue_ticket() returns an IssuedTicket whose token opens a session; repr hides it."""
    with publisher(srv) as pub:
        issued = pub.issue_ticket("bob", client_ip="127.0.0.1", subscribe=["a.*"], ttl=20)
    assert isinstance(issued, IssuedTicket)
    assert issued.ticket not in repr(issued)
    assert issued.expires_at > 0
    conn = srv.ws(issued.ticket)
    try:
        welcome = recv_json(conn)
        assert welcome["op"] == "welcome" and welcome["user"] == "bob"
        assert request_json(conn, {"op": "subscribe", "id": 1, "topic": "a.b"})["op"] == "ok"
        refused = request_json(conn, {"op": "subscribe", "id": 2, "topic": "b.c"})
        assert refused["code"] == "forbidden"
    finally:
        conn.close()


def test_one_connection_is_kept_alive_across_calls(srv: Server) -> None:
    """Several calls reuse one TLS connection (same local port), not one per call."""
    with publisher(srv) as pub:
        pub.publish("client.keep", 1)
        conn = pub._conn
        assert conn is not None and conn.sock is not None
        port = conn.sock.getsockname()[1]
        pub.publish("client.keep", 2)
        pub.issue_ticket("carol")
        assert pub._conn is conn
        assert conn.sock.getsockname()[1] == port


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda p: p.publish("bad topic", 1), "invalid_topic"),
        (lambda p: p.publish("client.x.>", 1), "invalid_topic"),
        (lambda p: p.publish("client.big", "x" * 66_000), "invalid_payload"),
        (lambda p: p.publish("client.deep", _deep(40)), "invalid_payload"),
        (lambda p: p.issue_ticket("dave", ttl=0), "bad_request"),
        (lambda p: p.issue_ticket("", subscribe=["a"]), "bad_request"),
        (lambda p: p.issue_ticket("dave", client_ip="not-an-ip"), "bad_request"),
        (lambda p: p.issue_ticket("dave", subscribe=["a..b"]), "invalid_topic"),
    ],
)
def test_a_400_raises_apierror_with_the_servers_code(
    srv: Server, call: Callable[[Publisher], Any], code: str
) -> None:
    """Each refusal raises APIError carrying status 400 and the server's code; no retry."""
    sleep = SleepRecorder()
    with publisher(srv, sleep=sleep) as pub:
        with pytest.raises(APIError) as caught:
            call(pub)
        assert caught.value.status == 400
        assert caught.value.code == code
        assert caught.value.message
        assert sleep.delays == []
        # The connection stays usable after a refusal.
        assert pub.publish("client.after", 1)


def _deep(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def test_a_wrong_api_key_is_unauthorized_and_never_echoed(srv: Server) -> None:
    """A wrong key raises APIError 401 ``unauthorized``; the key is in no message or repr."""
    key = "wrong-key-0123456789-abcdefghij"
    sleep = SleepRecorder()
    pub = Publisher(srv.url, key, ca=srv.ca_path, sleep=sleep)
    with pytest.raises(APIError) as caught:
        pub.publish("client.x", 1)
    assert (caught.value.status, caught.value.code) == (401, "unauthorized")
    assert key not in str(caught.value) and key not in repr(caught.value)
    assert key not in repr(pub)
    assert sleep.delays == []
    pub.close()


def test_an_untrusted_ca_fails_verification_without_retrying(srv: Server, other_ca: str) -> None:
    """A server certificate not signed by ``ca`` raises CertificateError at once."""
    sleep = SleepRecorder()
    pub = Publisher(srv.url, srv.api_key, ca=other_ca, sleep=sleep)
    with pytest.raises(CertificateError) as caught:
        pub.publish("client.x", 1)
    assert "not trusted" in str(caught.value)
    assert sleep.delays == []


def test_the_system_trust_store_does_not_trust_a_dev_ca(srv: Server) -> None:
    """Without ``ca`` the system's trust store is used, which knows nothing of the dev CA."""
    with pytest.raises(CertificateError):
        Publisher(srv.url, srv.api_key).publish("client.x", 1)


def test_a_refused_connection_is_retried_with_backoff_then_reported() -> None:
    """Connection refused is retried ``retries`` times with growing delays, then raised."""
    sleep = SleepRecorder()
    url = f"https://127.0.0.1:{free_port()}"
    policy = RetryPolicy(retries=3, initial_delay=0.1, max_delay=0.3)
    pub = Publisher(url, "k" * 32, sleep=sleep, retry=policy)
    with pytest.raises(ConnectionFailed) as caught:
        pub.publish("client.x", 1)
    assert caught.value.refused and not caught.value.sent
    assert "connection refused" in str(caught.value)
    assert len(sleep.delays) == 3
    bounds = [(0.05, 0.1), (0.1, 0.2), (0.15, 0.3)]
    for delay, (low, high) in zip(sleep.delays, bounds, strict=True):
        assert low <= delay <= high


def test_a_server_coming_up_during_the_retries_gets_the_message() -> None:
    """A publish that first meets a closed port succeeds once the server listens."""
    server = Server(dev=True)
    sleep = SleepRecorder(on_first=server.start)
    try:
        # The dev credentials exist only once the server ran: make them first.
        server.start()
        server.stop()
        pub = Publisher(server.url, server.api_key, ca=server.ca_path, sleep=sleep)
        assert pub.publish("client.late", 1)
        assert len(sleep.delays) >= 1
        pub.close()
    finally:
        server.cleanup()


def test_a_connection_the_server_closed_between_calls_is_replaced() -> None:
    """After the server drops the kept-alive connection, the next call reconnects quietly."""
    server = Server(dev=True).start()
    try:
        pub = Publisher(server.url, server.api_key, ca=server.ca_path)
        pub.publish("client.x", 1)
        server.stop()
        restarted = Server(dev=True, directory=server.directory, port=server.port).start()
        try:
            assert pub.publish("client.x", 2)
        finally:
            restarted.stop()
        pub.close()
    finally:
        server.cleanup()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://localhost:8443", "https://"),
        ("ws://localhost:8443", "https://"),
        ("https://", "no host"),
        ("https://user:pw@localhost:8443", "credentials"),
        ("https://localhost:99999", "bad server URL"),
        ("https://localhost:8443/?x=1", "query"),
    ],
)
def test_bad_urls_are_refused_before_connecting(url: str, problem: str) -> None:
    """Only https:// URLs without credentials, query or fragment are accepted."""
    with pytest.raises(ClientError) as caught:
        Publisher(url, "k" * 32)
    assert problem in str(caught.value)


def test_a_url_prefix_is_kept_and_the_websocket_url_derived() -> None:
    """A path prefix (behind a proxy) prefixes every request; the wss URL follows."""
    url = parse_url("https://example.com/pubsub/")
    assert url.path("/v1/publish") == "/pubsub/v1/publish"
    assert url.websocket == "wss://example.com:443/pubsub/ws"
    assert parse_url("https://[::1]:8443").websocket == "wss://[::1]:8443/ws"


def test_missing_or_bad_ca_files_and_keys_are_refused(tmp_path: Any) -> None:
    """A CA file that is missing or not PEM, or an empty API key, raises ClientError."""
    with pytest.raises(ClientError, match="does not exist"):
        Publisher("https://localhost:8443", "k" * 32, ca=str(tmp_path / "nope.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ClientError, match="no PEM certificate"):
        Publisher("https://localhost:8443", "k" * 32, ca=str(junk))
    with pytest.raises(ClientError, match="API key is required"):
        Publisher("https://localhost:8443", " ")
    with pytest.raises(ClientError, match="cannot carry"):
        Publisher("https://localhost:8443", "a b\r\nX-Injected: 1")


def test_data_that_is_not_json_is_refused_locally(srv: Server) -> None:
    """NaN, Infinity and non-JSON types never leave the client."""
    with publisher(srv) as pub:
        for data in (float("nan"), float("inf"), {1, 2}, b"bytes"):
            with pytest.raises(ClientError, match="not JSON"):
                pub.publish("client.x", data)


# -- retries and odd answers, against a scripted TLS server -----------------


@pytest.fixture(scope="module")
def stub_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def stub_ca_file(stub_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("stub") / "ca.pem"
    stub_ca.cert_pem.write_to_path(str(path))
    return str(path)


class Scripted:
    """A TLS HTTP server answering request N with ``script[N]``.

    An action is ``(status, body)``, ``(status, body, headers)`` (extra
    response headers, e.g. ``{"Retry-After": "2"}``) or ``"drop"`` (close
    without answering, after reading the request). ``requests`` records each
    request's path, ``methods`` its method.
    """

    def __init__(self, cert: trustme.LeafCert, script: list[Any]) -> None:
        self.script = list(script)
        self.requests: list[str] = []
        self.methods: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.do_POST()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                self.rfile.read(length)
                outer.requests.append(self.path)
                outer.methods.append(self.command)
                action = outer.script.pop(0) if outer.script else (500, b"{}")
                if action == "drop":
                    self.close_connection = True
                    return
                status, body, *extra = action
                self.send_response(status)
                for name, value in (extra[0] if extra else {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def scripted(ca: trustme.CA, script: list[Any], name: str = "127.0.0.1") -> Iterator[Scripted]:
    server = Scripted(ca.issue_cert(name), script)
    try:
        yield server
    finally:
        server.close()


UNAVAILABLE = (503, b'{"error":"unavailable","message":"redis is down"}')
ACCEPTED = (202, b'{"id":"m-1"}')


def test_a_503_is_retried_until_it_passes(stub_ca: trustme.CA, stub_ca_file: str) -> None:
    """503 means nothing was done: the same request is sent again after a delay."""
    sleep = SleepRecorder()
    with scripted(stub_ca, [UNAVAILABLE, UNAVAILABLE, ACCEPTED]) as server:
        pub = Publisher(server.url, "k" * 32, ca=stub_ca_file, sleep=sleep)
        assert pub.publish("a.b", 1) == "m-1"
        pub.close()
    assert server.requests == ["/v1/publish"] * 3
    assert len(sleep.delays) == 2


def test_retries_are_bounded(stub_ca: trustme.CA, stub_ca_file: str) -> None:
    """After ``retries`` retries of a 503 the APIError is raised."""
    sleep = SleepRecorder()
    with scripted(stub_ca, [UNAVAILABLE] * 10) as server:
        pub = Publisher(server.url, "k" * 32, ca=stub_ca_file, sleep=sleep, retry=RetryPolicy(2))
        with pytest.raises(APIError) as caught:
            pub.publish("a.b", 1)
        pub.close()
    assert (caught.value.status, caught.value.code) == (503, "unavailable")
    assert len(server.requests) == 3 and len(sleep.delays) == 2


def test_a_connection_dropped_after_sending_is_not_retried(
    stub_ca: trustme.CA, stub_ca_file: str
) -> None:
    """The request may have been carried out: ConnectionFailed(sent=True), sent once."""
    sleep = SleepRecorder()
    with scripted(stub_ca, ["drop", ACCEPTED]) as server:
        pub = Publisher(server.url, "k" * 32, ca=stub_ca_file, sleep=sleep)
        with pytest.raises(ConnectionFailed) as caught:
            pub.publish("a.b", 1)
        assert caught.value.sent
        assert "may or may not" in str(caught.value)
        assert server.requests == ["/v1/publish"]
        assert sleep.delays == []
        # The next call opens a new connection and works.
        assert pub.publish("a.b", 2) == "m-1"
        pub.close()


@pytest.mark.parametrize(
    "answer",
    [(502, b"<html>bad gateway</html>"), (202, b"not json"), (202, b"[]"), (202, b'{"id":5}')],
)
def test_answers_that_are_not_securepubs_raise_unexpected_response(
    stub_ca: trustme.CA, stub_ca_file: str, answer: tuple[int, bytes]
) -> None:
    """A proxy's HTML page or a malformed answer is an APIError ``unexpected_response``."""
    with scripted(stub_ca, [answer]) as server:
        pub = Publisher(server.url, "k" * 32, ca=stub_ca_file, sleep=SleepRecorder())
        with pytest.raises(APIError) as caught:
            pub.publish("a.b", 1)
        pub.close()
    assert caught.value.code == "unexpected_response"


def test_a_certificate_for_another_name_is_refused(stub_ca: trustme.CA, stub_ca_file: str) -> None:
    """A trusted CA is not enough: the certificate must name the host connected to."""
    with scripted(stub_ca, [ACCEPTED], name="other.example") as server:
        pub = Publisher(server.url, "k" * 32, ca=stub_ca_file, sleep=SleepRecorder())
        with pytest.raises(CertificateError):
            pub.publish("a.b", 1)
    assert server.requests == []


PAGE = (200, b'{"offset":2,"epoch":"e1","messages":[{"op":"message","offset":2}]}')
POSITIONED = (202, b'{"id":"m-1","offset":7,"epoch":"e1"}')

MALFORMED_PAGES = [
    (200, b"[]"),
    (200, b'{"offset":2,"epoch":"e1"}'),
    (200, b'{"offset":"2","epoch":"e1","messages":[]}'),
    (200, b'{"offset":true,"epoch":"e1","messages":[]}'),
    (200, b'{"offset":-1,"epoch":"e1","messages":[]}'),
    (200, b'{"offset":2,"epoch":3,"messages":[]}'),
    (200, b'{"offset":2,"epoch":"e1","messages":{}}'),
    (200, b'{"offset":2,"epoch":"e1","messages":[1]}'),
    (502, b"<html>bad gateway</html>"),
]

MALFORMED_PUBLISHED = [
    (202, b'{"id":"m-1","offset":"7","epoch":"e1"}'),
    (202, b'{"id":"m-1","offset":7}'),
    (202, b'{"id":"m-1","epoch":"e1"}'),
    (202, b'{"id":"m-1","offset":0,"epoch":"e1"}'),
    (202, b'{"id":"m-1","offset":false,"epoch":"e1"}'),
]


def test_history_is_a_get_retried_on_503(stub_ca: trustme.CA, stub_ca_file: str) -> None:
    """history() sends GET /v1/history with the topic quoted, retries a 503, returns the page."""
    sleep = SleepRecorder()
    with scripted(stub_ca, [UNAVAILABLE, PAGE]) as server:
        pub = Publisher(server.url, "k" * 32, ca=stub_ca_file, sleep=sleep)
        page = pub.history("a.b", since=1, limit=5)
        pub.close()
    assert page == HistoryPage(offset=2, epoch="e1", messages=[{"op": "message", "offset": 2}])
    assert server.methods == ["GET", "GET"]
    assert server.requests == ["/v1/history?topic=a.b&since=1&limit=5"] * 2
    assert len(sleep.delays) == 1


def test_history_is_not_retried_after_a_dropped_connection(
    stub_ca: trustme.CA, stub_ca_file: str
) -> None:
    """Only refused connections and 503 are retried, for history() as for publish()."""
    sleep = SleepRecorder()
    with scripted(stub_ca, ["drop", PAGE]) as server:
        pub = Publisher(server.url, "k" * 32, ca=stub_ca_file, sleep=sleep)
        with pytest.raises(ConnectionFailed):
            pub.history("a.b")
        pub.close()
    assert len(server.requests) == 1 and sleep.delays == []


@pytest.mark.parametrize("answer", MALFORMED_PAGES)
def test_a_malformed_history_page_raises_unexpected_response(
    stub_ca: trustme.CA, stub_ca_file: str, answer: tuple[int, bytes]
) -> None:
    """A page without an integer offset, a string epoch and a list of objects is refused."""
    with scripted(stub_ca, [answer]) as server:
        pub = Publisher(server.url, "k" * 32, ca=stub_ca_file, sleep=SleepRecorder())
        with pytest.raises(APIError) as caught:
            pub.history("a.b")
        pub.close()
    assert caught.value.code == "unexpected_response"


@pytest.mark.parametrize("answer", MALFORMED_PUBLISHED)
def test_a_malformed_position_in_a_publish_answer_raises_unexpected_response(
    stub_ca: trustme.CA, stub_ca_file: str, answer: tuple[int, bytes]
) -> None:
    """offset and epoch come together, a positive integer and a string, or not at all."""
    with scripted(stub_ca, [answer, answer]) as server:
        pub = Publisher(server.url, "k" * 32, ca=stub_ca_file, sleep=SleepRecorder())
        with pytest.raises(APIError) as message_caught:
            pub.publish_message("a.b", 1)
        with pytest.raises(APIError) as id_caught:
            pub.publish("a.b", 1)
        pub.close()
    assert message_caught.value.code == id_caught.value.code == "unexpected_response"


def test_publish_message_returns_the_position(stub_ca: trustme.CA, stub_ca_file: str) -> None:
    """publish_message() returns Published(id, offset, epoch); publish() the same id alone."""
    with scripted(stub_ca, [POSITIONED, POSITIONED, ACCEPTED]) as server:
        pub = Publisher(server.url, "k" * 32, ca=stub_ca_file, sleep=SleepRecorder())
        assert pub.publish_message("a.b", 1) == Published("m-1", 7, "e1")
        assert pub.publish("a.b", 1) == "m-1"
        assert pub.publish_message("a.b", 1) == Published("m-1", None, None)
        pub.close()


def test_history_arguments_are_checked_and_the_topic_quoted() -> None:
    """The topic cannot add query parameters; since and limit must be integers."""
    assert history_query("a&since=5 #") == "/v1/history?topic=a%26since%3D5%20%23&since=0&limit=100"
    for since, limit in (("1", 5), (1, 2.0), (True, 5)):
        with pytest.raises(ClientError, match="must be an integer"):
            history_query("a.b", since, limit)  # type: ignore[arg-type]
    with pytest.raises(ClientError, match="not valid text"):
        history_query("a\udc80")


def test_a_page_says_where_the_next_one_starts() -> None:
    """next_since is the last offset of a page that did not reach the topic's offset."""
    assert HistoryPage(5, "e", [{"offset": 3}]).next_since == 3
    assert HistoryPage(5, "e", [{"offset": 5}]).next_since is None
    assert HistoryPage(5, "e", []).next_since is None


# -- presence and Retry-After, against the scripted server ----------------------

PRESENCE = (200, b'{"users":{"alice":2,"bob":1}}')

MALFORMED_PRESENCE = [
    (200, b"[]"),
    (200, b"{}"),
    (200, b'{"users":[]}'),
    (200, b'{"users":{"alice":"2"}}'),
    (200, b'{"users":{"alice":0}}'),
    (200, b'{"users":{"alice":-1}}'),
    (200, b'{"users":{"alice":true}}'),
    (200, b'{"users":{"alice":1.5}}'),
    (200, b'{"users":{"":1}}'),
    (502, b"<html>bad gateway</html>"),
]


def unavailable(retry_after: str) -> tuple[int, bytes, dict[str, str]]:
    return (*UNAVAILABLE, {"Retry-After": retry_after})


def test_presence_is_a_get_retried_on_503(stub_ca: trustme.CA, stub_ca_file: str) -> None:
    """presence() sends GET /v1/presence with the topic quoted, retries a 503 and returns
    the users map."""
    sleep = SleepRecorder()
    with scripted(stub_ca, [UNAVAILABLE, PRESENCE]) as server:
        pub = Publisher(server.url, "k" * 32, ca=stub_ca_file, sleep=sleep)
        assert pub.presence("room.1&x=1") == {"alice": 2, "bob": 1}
        pub.close()
    assert server.methods == ["GET", "GET"]
    assert server.requests == ["/v1/presence?topic=room.1%26x%3D1"] * 2
    assert len(sleep.delays) == 1


@pytest.mark.parametrize("answer", MALFORMED_PRESENCE)
def test_a_malformed_presence_answer_raises_unexpected_response(
    stub_ca: trustme.CA, stub_ca_file: str, answer: tuple[int, bytes]
) -> None:
    """users must map non-empty strings to positive integers; anything else is refused."""
    with scripted(stub_ca, [answer]) as server:
        pub = Publisher(server.url, "k" * 32, ca=stub_ca_file, sleep=SleepRecorder())
        with pytest.raises(APIError) as caught:
            pub.presence("room.1")
        pub.close()
    assert caught.value.code == "unexpected_response"


def test_a_503_waits_at_least_the_servers_retry_after(
    stub_ca: trustme.CA, stub_ca_file: str
) -> None:
    """Retry-After: 2 on a 503 makes the retry wait 2 s plus jitter (up to a quarter of it
    and initial_delay), never less, however short the backoff would have been."""
    for rand, expected in ((lambda: 0.0, 2.0), (lambda: 1.0, 2.0 + 0.5 + 0.25)):
        sleep = SleepRecorder()
        with scripted(stub_ca, [unavailable("2"), ACCEPTED]) as server:
            pub = Publisher(server.url, "k" * 32, ca=stub_ca_file, sleep=sleep, rand=rand)
            assert pub.publish("a.b", 1) == "m-1"
            pub.close()
        assert sleep.delays == [pytest.approx(expected)]


@pytest.mark.parametrize(
    "header", ["soon", "-1", "1.5", "Wed, 21 Oct 2015 07:28:00 GMT", "2, 3", "", "0x10"]
)
def test_a_retry_after_that_is_not_whole_seconds_is_ignored(
    stub_ca: trustme.CA, stub_ca_file: str, header: str
) -> None:
    """A date, a fraction, a negative or repeated value: the usual backoff applies."""
    sleep = SleepRecorder()
    with scripted(stub_ca, [unavailable(header), ACCEPTED]) as server:
        pub = Publisher(server.url, "k" * 32, ca=stub_ca_file, sleep=sleep, rand=lambda: 1.0)
        assert pub.publish("a.b", 1) == "m-1"
        pub.close()
    assert sleep.delays == [pytest.approx(0.25)]


def test_a_long_retry_after_is_capped(stub_ca: trustme.CA, stub_ca_file: str) -> None:
    """Retry-After: 3600 waits MAX_RETRY_AFTER (60 s), not an hour; the APIError of the
    last attempt carries the capped value."""
    sleep = SleepRecorder()
    with scripted(stub_ca, [unavailable("3600")] * 2) as server:
        pub = Publisher(
            server.url,
            "k" * 32,
            ca=stub_ca_file,
            sleep=sleep,
            rand=lambda: 0.0,
            retry=RetryPolicy(retries=1),
        )
        with pytest.raises(APIError) as caught:
            pub.history("a.b")
        pub.close()
    assert sleep.delays == [60.0]
    assert caught.value.retry_after == 60


def test_a_429_is_not_retried_but_carries_retry_after(
    stub_ca: trustme.CA, stub_ca_file: str
) -> None:
    """429 is a refusal: raised at once, its Retry-After in APIError.retry_after; other
    statuses never carry one."""
    limited = (429, b'{"error":"rate_limited","message":"slow down"}', {"Retry-After": "7"})
    refused = (400, b'{"error":"bad_request","message":"no"}', {"Retry-After": "7"})
    sleep = SleepRecorder()
    with scripted(stub_ca, [limited, refused]) as server:
        pub = Publisher(server.url, "k" * 32, ca=stub_ca_file, sleep=sleep)
        with pytest.raises(APIError) as caught:
            pub.publish("a.b", 1)
        assert (caught.value.status, caught.value.code) == (429, "rate_limited")
        assert caught.value.retry_after == 7
        with pytest.raises(APIError) as other:
            pub.issue_ticket("u")
        assert other.value.retry_after is None
        pub.close()
    assert sleep.delays == [] and len(server.requests) == 2


def test_retry_policy_delays() -> None:
    """Without Retry-After the jittered backoff; with it at least the server's value (capped
    at max_retry_after), the backoff when that is longer."""
    policy = RetryPolicy(initial_delay=1.0, max_delay=8.0, max_retry_after=10.0)
    assert policy.delay(2, lambda: 1.0) == 4.0
    assert policy.delay(2, lambda: 0.0) == 2.0
    assert policy.delay(0, lambda: 0.0, retry_after=3) == 3.0
    assert policy.delay(0, lambda: 1.0, retry_after=3) == 3.0 + 0.75 + 1.0
    assert policy.delay(3, lambda: 1.0, retry_after=1) == 8.0  # the backoff is longer
    assert policy.delay(0, lambda: 0.0, retry_after=100) == 10.0


def test_session_ttl_bounds_the_session_a_ticket_opens(srv: Server) -> None:
    """issue_ticket(session_ttl=S): the session's welcome expires S seconds later; a value
    outside the server's range (60 to 3600 by default) is bad_request."""
    with publisher(srv) as pub:
        issued = pub.issue_ticket("sess", subscribe=["a.*"], session_ttl=120)
        with pytest.raises(APIError) as caught:
            pub.issue_ticket("sess", session_ttl=30)
    assert (caught.value.status, caught.value.code) == (400, "bad_request")
    assert "session_ttl" in caught.value.message
    conn = srv.ws(issued.ticket)
    try:
        welcome = recv_json(conn)
        assert welcome["expires_at"] - time.time() == pytest.approx(120, abs=5)
    finally:
        conn.close()


# -- the Twisted publisher -----------------------------------------------------


@pytest.fixture(scope="class")
def twisted_env(
    request: pytest.FixtureRequest,
    srv: Server,
    other_ca: str,
    stub_ca: trustme.CA,
    stub_ca_file: str,
) -> None:
    request.cls.srv = srv
    request.cls.other_ca = other_ca
    request.cls.stub_ca = stub_ca
    request.cls.stub_ca_file = stub_ca_file


@pytest.mark.usefixtures("twisted_env")
class TwistedPublisherTests(TrialTestCase):
    """TwistedPublisher on the real reactor, against the same servers."""

    srv: Server
    other_ca: str
    stub_ca: trustme.CA
    stub_ca_file: str
    timeout = 20

    def publisher(self, **kwargs: Any) -> TwistedPublisher:
        kwargs.setdefault("ca", self.srv.ca_path)
        url = kwargs.pop("url", self.srv.url)
        key = kwargs.pop("api_key", self.srv.api_key)
        pub = TwistedPublisher(reactor, url, key, **kwargs)
        self.addCleanup(pub.close)
        return pub

    def test_publish_and_issue_ticket(self) -> Deferred[None]:
        """publish() fires with the message id, issue_ticket() with a redeemable ticket."""

        async def run() -> None:
            pub = self.publisher()
            message_id = await pub.publish("twisted.one", {"a": 1})
            assert isinstance(message_id, str) and message_id
            issued = await pub.issue_ticket("erin", subscribe=["twisted.*"], ttl=10)
            conn = self.srv.ws(issued.ticket)
            try:
                assert recv_json(conn)["user"] == "erin"
            finally:
                conn.close()

        return ensureDeferred(run())

    def test_a_400_fails_with_the_servers_code(self) -> Deferred[None]:
        """A refused publish fails with APIError carrying ``invalid_topic``."""

        async def run() -> None:
            pub = self.publisher()
            try:
                await pub.publish("bad topic", 1)
            except APIError as e:
                assert (e.status, e.code) == (400, "invalid_topic")
            else:
                raise AssertionError("no APIError")

        return ensureDeferred(run())

    def test_an_untrusted_ca_fails_verification(self) -> Deferred[None]:
        """A certificate from another CA fails with CertificateError."""

        async def run() -> None:
            pub = self.publisher(ca=self.other_ca)
            try:
                await pub.publish("twisted.x", 1)
            except CertificateError:
                pass
            else:
                raise AssertionError("no CertificateError")

        return ensureDeferred(run())

    def test_the_host_name_is_verified(self) -> Deferred[None]:
        """service_identity refuses a trusted certificate issued for another name."""

        async def run() -> None:
            with scripted(self.stub_ca, [ACCEPTED], name="other.example") as server:
                pub = self.publisher(url=server.url, ca=self.stub_ca_file, api_key="k" * 32)
                try:
                    await pub.publish("a.b", 1)
                except CertificateError:
                    pass
                else:
                    raise AssertionError("no CertificateError")
                await pub.close()
            assert server.requests == []

        return ensureDeferred(run())

    def test_503_is_retried_and_refused_connections_are_bounded(self) -> Deferred[None]:
        """503 is retried until it passes; a closed port is retried, then reported."""

        async def run() -> None:
            policy = RetryPolicy(retries=2, initial_delay=0.01, max_delay=0.02)
            with scripted(self.stub_ca, [UNAVAILABLE, ACCEPTED]) as server:
                pub = self.publisher(
                    url=server.url, ca=self.stub_ca_file, api_key="k" * 32, retry=policy
                )
                assert await pub.publish("a.b", 1) == "m-1"
                await pub.close()
            assert len(server.requests) == 2
            closed = self.publisher(url=f"https://127.0.0.1:{free_port()}", retry=policy)
            try:
                await closed.publish("a.b", 1)
            except ConnectionFailed as e:
                assert e.refused
            else:
                raise AssertionError("no ConnectionFailed")

        return ensureDeferred(run())

    def test_history_and_publish_message(self) -> Deferred[None]:
        """publish_message() fires with offsets, history() with the page holding them."""

        async def run() -> None:
            pub = self.publisher()
            first = await pub.publish_message("demo.twisted.history", {"n": 1})
            second = await pub.publish_message("demo.twisted.history", {"n": 2})
            assert isinstance(first, Published) and first.offset is not None
            assert second.offset == first.offset + 1 and second.epoch == first.epoch
            page = await pub.history("demo.twisted.history", since=first.offset - 1)
            assert (page.offset, page.epoch) == (second.offset, second.epoch)
            assert [m["data"] for m in page.messages] == [{"n": 1}, {"n": 2}]
            assert [m["id"] for m in page.messages] == [first.id, second.id]
            plain = await pub.publish_message("twisted.no.history", 1)
            assert (plain.offset, plain.epoch) == (None, None)
            try:
                await pub.history("twisted.no.history")
            except APIError as e:
                assert (e.status, e.code) == (400, "bad_request")
            else:
                raise AssertionError("no APIError")
            try:
                await pub.history("a.b", since="0")  # type: ignore[arg-type]
            except ClientError as e:
                assert "integer" in str(e)
            else:
                raise AssertionError("no ClientError")

        return ensureDeferred(run())

    def test_history_retries_503_and_checks_the_page(self) -> Deferred[None]:
        """history() is a GET, retried on 503; a malformed page is unexpected_response."""

        async def run() -> None:
            policy = RetryPolicy(retries=2, initial_delay=0.01, max_delay=0.02)
            script = [UNAVAILABLE, PAGE, MALFORMED_PAGES[2], MALFORMED_PUBLISHED[0]]
            with scripted(self.stub_ca, script) as server:
                pub = self.publisher(
                    url=server.url, ca=self.stub_ca_file, api_key="k" * 32, retry=policy
                )
                page = await pub.history("a.b", since=1, limit=5)
                assert page.offset == 2 and page.messages == [{"op": "message", "offset": 2}]
                calls: list[Callable[[], Deferred[Any]]] = [
                    lambda: pub.history("a.b"),
                    lambda: pub.publish_message("a.b", 1),
                ]
                for call in calls:
                    try:
                        await call()
                    except APIError as e:
                        assert e.code == "unexpected_response"
                    else:
                        raise AssertionError("no APIError")
                await pub.close()
            assert server.methods == ["GET", "GET", "GET", "POST"]
            assert server.requests[0] == "/v1/history?topic=a.b&since=1&limit=5"

        return ensureDeferred(run())

    def test_presence_retries_503_and_checks_the_answer(self) -> Deferred[None]:
        """presence() is a GET retried on 503; the users map comes back, a malformed one
        fails with unexpected_response."""

        async def run() -> None:
            policy = RetryPolicy(retries=2, initial_delay=0.01, max_delay=0.02)
            script = [UNAVAILABLE, PRESENCE, MALFORMED_PRESENCE[4]]
            with scripted(self.stub_ca, script) as server:
                pub = self.publisher(
                    url=server.url, ca=self.stub_ca_file, api_key="k" * 32, retry=policy
                )
                assert await pub.presence("room.1") == {"alice": 2, "bob": 1}
                try:
                    await pub.presence("room.1")
                except APIError as e:
                    assert e.code == "unexpected_response"
                else:
                    raise AssertionError("no APIError")
                await pub.close()
            assert server.methods == ["GET"] * 3
            assert server.requests[0] == "/v1/presence?topic=room.1"

        return ensureDeferred(run())

    def test_retry_after_is_handed_to_the_retry_policy(self) -> Deferred[None]:
        """A 503's Retry-After reaches RetryPolicy.delay (which waits at least that); a
        429 is not retried and fails with its retry_after."""

        async def run() -> None:
            seen: list[float | None] = []

            class Recording(RetryPolicy):
                def delay(
                    self,
                    attempt: int,
                    rand: Callable[[], float] = random.random,
                    retry_after: float | None = None,
                ) -> float:
                    seen.append(retry_after)
                    return 0.01

            limited = (429, b'{"error":"rate_limited","message":"slow"}', {"Retry-After": "9"})
            script = [unavailable("5"), unavailable("later"), ACCEPTED, limited]
            with scripted(self.stub_ca, script) as server:
                pub = self.publisher(
                    url=server.url, ca=self.stub_ca_file, api_key="k" * 32, retry=Recording()
                )
                assert await pub.publish("a.b", 1) == "m-1"
                try:
                    await pub.issue_ticket("u", session_ttl=60)
                except APIError as e:
                    assert (e.status, e.retry_after) == (429, 9)
                else:
                    raise AssertionError("no APIError")
                await pub.close()
            assert seen == [5, None]
            assert len(server.requests) == 4

        return ensureDeferred(run())


def test_nothing_in_the_client_turns_verification_off() -> None:
    """No CERT_NONE, check_hostname=False or unverified context anywhere in the clients."""
    import securepub.clients.blocking
    import securepub.clients.cli
    import securepub.clients.twisted_client

    for module in (
        securepub.clients.blocking,
        securepub.clients.twisted_client,
        securepub.clients.cli,
    ):
        assert module.__file__ is not None
        with open(module.__file__, encoding="utf-8") as f:
            source = f.read()
        for forbidden in (
            "CERT_NONE",
            "check_hostname",
            "_create_unverified_context",
            "verify=False",
        ):
            assert forbidden not in source, (module.__name__, forbidden)
