"""Bounded sessions, in-band refresh, presence and Retry-After in the Python clients
(SPEC sections 9 and 10).

The reconnecting `Subscriber`'s refresh, presence requests and waits are
driven frame by frame through a fake protocol and a `Clock`; then against
real ``twistd securepub`` servers (``min_session_seconds = 2``, so sessions
can be a few seconds long, and ``room.*`` tracking presence with join/leave):
sessions refreshed under a stream of messages, refreshes that fail and end
in 4003 and a reconnect, presence over the API and over the connection. A
scripted TLS server refuses handshakes with 429 and Retry-After.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import trustme
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock, LoopingCall
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase as TrialTestCase

from securepub.client import APIError, ClientError, ConnectionFailed, RetryPolicy
from securepub.client_twisted import (
    NotConnected,
    RequestFailed,
    Subscriber,
    TwistedPublisher,
)
from tests.server import Server, request_json, server_fixture
from tests.test_client import scripted
from tests.test_client_history import FakeProtocol

CONFIG = {
    "limits": {"min_session_seconds": 2, "max_session_seconds": 600},
    "topics": [
        {"pattern": "room.*", "presence": True, "join_leave": True},
        {"pattern": "feed.>", "history_size": 1000},
    ],
}

srv = server_fixture(CONFIG)

SECRET = "tk-secret-0123456789abcdefghijklmnop"


# -- the Subscriber, frame by frame ----------------------------------------------


class Tickets:
    """A get_ticket whose answers a test gives: each call returns the next Deferred."""

    def __init__(self) -> None:
        self.calls: list[Deferred[str]] = []

    def __call__(self) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        self.calls.append(d)
        return d


class Harness:
    """A Subscriber whose connections are `FakeProtocol`s, on a `Clock`."""

    def __init__(
        self, patterns: list[str], rand: float = 1.0, keep_connect_ticket: bool = False
    ) -> None:
        self.clock = Clock()
        self.tickets = Tickets()
        self.messages: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.status: list[str] = []
        self.sub = Subscriber(
            self.clock,
            "https://localhost:8443",
            patterns,
            self.tickets,
            self.messages.append,
            on_status=self.status.append,
            on_event=self.events.append,
            backoff=RetryPolicy(retries=0, initial_delay=1.0, max_delay=1.0),
            rand=lambda: rand,
        )
        self.outcome: list[Any] = []
        self.sub.run().addBoth(self.outcome.append)
        if not keep_connect_ticket:
            # The first connection's ticket request never answers: connections are fakes.
            self.tickets.calls.clear()
        self.protocol = FakeProtocol()

    def connect(self, expires_at: float = 1_000_004.0) -> FakeProtocol:
        """A new connection, its welcome received and every subscribe answered ok."""
        self.protocol = FakeProtocol()
        self.sub._protocol = self.protocol  # type: ignore[assignment]
        self.frame({"op": "welcome", "session": "s", "user": "u", "expires_at": expires_at})
        for subscribe in self.protocol.subscribes():
            self.frame({"op": "ok", "id": subscribe["id"]})
        return self.protocol

    def frame(self, frame: dict[str, Any]) -> None:
        self.sub._frame(self.protocol, frame)  # type: ignore[arg-type]

    def close(self, code: int = 1006, protocol: Any = None) -> None:
        closing = protocol or self.protocol
        closing.state = FakeProtocol.STATE_CLOSED
        self.sub._closed(closing, code, None)

    def sent(self, op: str) -> list[dict[str, Any]]:
        return [f for f in self.protocol.sent if f.get("op") == op]


def clock_time(when: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when))


def test_expiring_refreshes_in_band_with_a_fresh_ticket() -> None:
    """On expiring, a ticket from get_ticket goes out in a refresh frame on the same
    connection; its ok moves the expiry and is reported; nothing is resubscribed."""
    h = Harness(["news.a", "news.*"])
    h.connect(expires_at=1_000_004.0)
    assert h.sub.expires_at == 1_000_004.0
    h.frame({"op": "expiring", "expires_at": 1_000_004.0})
    assert len(h.tickets.calls) == 1
    h.tickets.calls[0].callback(SECRET)
    [refresh] = h.sent("refresh")
    assert refresh == {"op": "refresh", "id": refresh["id"], "ticket": SECRET}
    h.frame({"op": "ok", "id": refresh["id"], "expires_at": 1_000_008.5})
    assert h.sub.expires_at == 1_000_008.5
    assert h.status[-1] == f"session refreshed until {clock_time(1_000_008.5)}"
    assert len(h.protocol.subscribes()) == 2
    assert h.sub.patterns == ("news.a", "news.*")
    assert h.outcome == [] and h.protocol.closes == []
    # The next lifetime's notice refreshes again.
    h.frame({"op": "expiring", "expires_at": 1_000_008.5})
    h.tickets.calls[1].callback(SECRET)
    assert len(h.sent("refresh")) == 2
    assert all(SECRET not in line for line in h.status)


def test_one_refresh_at_a_time() -> None:
    """A second expiring while a refresh is under way fetches no second ticket."""
    h = Harness(["news.a"])
    h.connect()
    h.frame({"op": "expiring", "expires_at": 1_000_004.0})
    h.frame({"op": "expiring", "expires_at": 1_000_004.0})
    assert len(h.tickets.calls) == 1
    h.tickets.calls[0].callback(SECRET)
    h.frame({"op": "expiring", "expires_at": 1_000_004.0})
    assert len(h.tickets.calls) == 1 and len(h.sent("refresh")) == 1


def test_a_refused_refresh_is_reported_and_the_4003_close_reconnects() -> None:
    """error forbidden to a refresh: a status line (no ticket in it), the connection is
    left to expire; the 4003 close is not fatal: a new ticket and connection follow."""
    h = Harness(["news.a"])
    h.connect(expires_at=1_000_004.0)
    h.frame({"op": "expiring", "expires_at": 1_000_004.0})
    h.tickets.calls[0].callback(SECRET)
    [refresh] = h.sent("refresh")
    h.frame({"op": "error", "id": refresh["id"], "code": "forbidden", "message": "not valid"})
    assert h.status[-1] == (
        f"session not refreshed (forbidden: not valid); it ends at {clock_time(1_000_004.0)}, "
        "then the subscriber reconnects"
    )
    assert h.outcome == [] and h.protocol.closes == []
    h.close(4003)
    assert h.status[-1] == (
        "connection closed (code 4003: the session expired); reconnecting in 1.0 s"
    )
    assert h.sub.expires_at is None
    h.clock.advance(1.0)
    assert len(h.tickets.calls) == 2  # the reconnect's ticket
    assert h.outcome == []
    assert all(SECRET not in line for line in h.status)


def test_a_failed_ticket_fetch_for_a_refresh_is_reported() -> None:
    """get_ticket failing at refresh time (any error) sends nothing and ends nothing."""
    h = Harness(["news.a"])
    h.connect()
    h.frame({"op": "expiring", "expires_at": 1_000_004.0})
    h.tickets.calls[0].errback(APIError(503, "unavailable", "redis is down"))
    assert h.sent("refresh") == []
    assert h.status[-1].startswith("session not refreshed (no ticket: unavailable: redis is down)")
    assert h.outcome == []
    # A later notice (e.g. after a reconnect) tries again.
    h.close(4003)
    h.clock.advance(1.0)
    h.connect()
    h.frame({"op": "expiring", "expires_at": 1_000_008.0})
    assert len(h.tickets.calls) == 3


def test_a_ticket_for_a_closed_connection_is_not_sent() -> None:
    """A refresh ticket that arrives after its connection closed is dropped, not sent on
    the next connection."""
    h = Harness(["news.a"])
    old = h.connect()
    h.frame({"op": "expiring", "expires_at": 1_000_004.0})
    h.close(4003)
    h.clock.advance(1.0)
    new = h.connect()
    h.tickets.calls[0].callback(SECRET)
    assert [f for f in old.sent + new.sent if f.get("op") == "refresh"] == []


def test_unsubscribed_forbidden_after_a_refresh_ends_that_subscription() -> None:
    """A refresh whose grants no longer cover a pattern: the server's unsubscribed ends it
    (status line, gone from patterns, next tickets ask only for the rest)."""
    h = Harness(["news.a", "secret.b"])
    h.connect()
    h.frame({"op": "expiring", "expires_at": 1_000_004.0})
    h.tickets.calls[0].callback(SECRET)
    [refresh] = h.sent("refresh")
    h.frame({"op": "ok", "id": refresh["id"], "expires_at": 1_000_008.0})
    h.frame({"op": "unsubscribed", "topic": "secret.b", "reason": "forbidden"})
    assert "secret.b: the server ended the subscription (forbidden)" in h.status
    assert h.sub.patterns == ("news.a",)
    assert h.outcome == []


def test_join_and_leave_go_to_on_event() -> None:
    """join/leave frames reach on_event as they are, never on_message."""
    h = Harness(["room.*"])
    h.connect()
    join = {"op": "join", "topic": "room.1", "user": "alice"}
    leave = {"op": "leave", "topic": "room.1", "user": "alice"}
    h.frame(join)
    h.frame(leave)
    assert h.events == [join, leave]
    assert h.messages == []


def test_presence_over_the_connection() -> None:
    """presence(topic) sends the op with a fresh id and fires with the users map; an error
    frame is RequestFailed with its code; a malformed map is unexpected_response."""
    h = Harness(["room.*"])
    h.connect()
    results: list[Any] = []
    for topic in ("room.1", "room.2", "room.3"):
        h.sub.presence(topic).addBoth(results.append)
    asks = h.sent("presence")
    assert [a["topic"] for a in asks] == ["room.1", "room.2", "room.3"]
    assert len({a["id"] for a in asks}) == 3
    assert all(set(a) == {"op", "id", "topic"} for a in asks)
    h.frame({"op": "presence", "id": asks[0]["id"], "topic": "room.1", "users": {"a": 2}})
    h.frame({"op": "error", "id": asks[1]["id"], "code": "forbidden", "message": "no"})
    h.frame({"op": "presence", "id": asks[2]["id"], "topic": "room.3", "users": {"a": 0}})
    assert results[0] == {"a": 2}
    assert isinstance(results[1], Failure) and results[1].check(RequestFailed)
    assert (results[1].value.code, results[1].value.message) == ("forbidden", "no")
    assert results[2].check(RequestFailed)
    assert results[2].value.code == "unexpected_response"
    assert h.outcome == [] and not h.clock.getDelayedCalls()


def test_presence_needs_an_open_session_and_fails_when_it_goes() -> None:
    """Before welcome: NotConnected. A request outstanding when the connection closes, or
    unanswered past its timeout, fails with ConnectionFailed."""
    h = Harness(["room.*"])
    before: list[Any] = []
    h.sub.presence("room.1").addErrback(before.append)
    assert before[0].check(NotConnected) and isinstance(before[0].value, ClientError)
    h.connect()
    lost: list[Any] = []
    h.sub.presence("room.1").addErrback(lost.append)
    h.close()
    assert lost[0].check(ConnectionFailed) and "closed" in str(lost[0].value)
    after: list[Any] = []
    h.sub.presence("room.1").addErrback(after.append)
    assert after[0].check(NotConnected)
    h.clock.advance(1.0)
    h.connect()
    timed_out: list[Any] = []
    h.sub.presence("room.1", timeout=5).addErrback(timed_out.append)
    h.clock.advance(4.9)
    assert timed_out == []
    h.clock.advance(0.1)
    assert timed_out[0].check(ConnectionFailed) and "5 s" in str(timed_out[0].value)


def test_a_ticket_refused_with_retry_after_waits_at_least_that() -> None:
    """A 503 (or 429) ticket request with Retry-After 5: the reconnect waits 5 s plus
    jitter instead of the 1 s backoff, and says so."""
    h = Harness(["news.a"], rand=0.5, keep_connect_ticket=True)
    h.tickets.calls[0].errback(APIError(503, "unavailable", "down", retry_after=5))
    # 5 s, plus half of (a quarter of 5 s + the 1 s initial delay): 6.125 s.
    assert h.status[-1] == (
        "no ticket (unavailable: down); the server asked to wait 5 s; reconnecting in 6.1 s"
    )
    h.clock.advance(6.1)
    assert len(h.tickets.calls) == 1
    h.clock.advance(0.03)
    assert len(h.tickets.calls) == 2
    h.tickets.calls[1].errback(APIError(429, "rate_limited", "slow", retry_after=None))
    assert h.status[-1] == "no ticket (rate_limited: slow); reconnecting in 0.8 s"
    assert h.outcome == []


def test_a_handshake_refused_with_retry_after_waits_at_least_that() -> None:
    """A 429/503 refusal of the upgrade waits for its Retry-After; a 403 (ticket spent on
    the way) takes the usual backoff; neither is fatal."""
    h = Harness(["news.a"], rand=0.0)
    for status, retry_after, expected in ((429, 3, 3.0), (503, None, 0.5), (403, 3, 0.5)):
        protocol = FakeProtocol()
        protocol.factory.refused_status = status
        protocol.factory.retry_after = retry_after
        h.sub._protocol = protocol  # type: ignore[assignment]
        h.close(1006, protocol)
        assert h.status[-1].startswith(f"the server refused the connection (HTTP {status})")
        assert h.status[-1].endswith(f"reconnecting in {expected:.1f} s")
        assert ("asked to wait" in h.status[-1]) == (status == 429)
    assert h.outcome == []


# -- against real servers --------------------------------------------------------


class Source:
    """Tickets from the real server; a test can make a call fail, or name another user."""

    def __init__(self, pub: TwistedPublisher, user: str, patterns: list[str], ttl: int) -> None:
        self.pub = pub
        self.user = user
        self.patterns = patterns
        self.session_ttl = ttl
        self.calls = 0
        #: call number (from 1) -> what that call does instead: "fail" or another user
        self.instead: dict[int, str] = {}

    def get_ticket(self) -> Deferred[str]:
        self.calls += 1
        what = self.instead.get(self.calls)
        if what == "fail":
            return fail(RuntimeError("no ticket today"))
        d = self.pub.issue_ticket(
            what or self.user, subscribe=self.patterns, ttl=30, session_ttl=self.session_ttl
        )
        return d.addCallback(lambda issued: issued.ticket)


class Watcher:
    """Collects a Subscriber's messages, events and status lines; Deferreds to await them."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.status: list[str] = []
        self._waits: list[tuple[Callable[[], bool], Deferred[None]]] = []

    def on_message(self, frame: dict[str, Any]) -> None:
        self.messages.append(frame)
        self._check()

    def on_event(self, frame: dict[str, Any]) -> None:
        self.events.append(frame)
        self._check()

    def on_status(self, text: str) -> None:
        self.status.append(text)
        self._check()

    def until(self, condition: Callable[[], bool]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waits.append((condition, d))
        self._check()
        return d

    def count(self, needle: str) -> int:
        return sum(needle in line for line in self.status)

    def status_count(self, needle: str, n: int) -> Deferred[None]:
        return self.until(lambda: self.count(needle) >= n)

    def _check(self) -> None:
        for entry in list(self._waits):
            condition, d = entry
            if condition():
                self._waits.remove(entry)
                reactor.callLater(0, d.callback, None)


@pytest.fixture(scope="class")
def sessions_env(request: pytest.FixtureRequest, srv: Server) -> None:
    request.cls.srv = srv


@pytest.mark.usefixtures("sessions_env")
class SessionTests(TrialTestCase):
    """The Subscriber on the real reactor against a server with short sessions."""

    srv: Server
    timeout = 40

    def publisher(self) -> TwistedPublisher:
        pub = TwistedPublisher(reactor, self.srv.url, self.srv.api_key, ca=self.srv.ca_path)
        self.addCleanup(pub.close)
        return pub

    def subscriber(
        self, patterns: list[str], user: str, session_ttl: int
    ) -> tuple[Subscriber, Watcher, Source]:
        watcher = Watcher()
        source = Source(self.publisher(), user, patterns, session_ttl)
        sub = Subscriber(
            reactor,
            self.srv.url,
            patterns,
            source.get_ticket,
            watcher.on_message,
            ca=self.srv.ca_path,
            on_status=watcher.on_status,
            on_event=watcher.on_event,
            backoff=RetryPolicy(retries=0, initial_delay=0.05, max_delay=0.5),
        )
        done = sub.run()

        def stop() -> Deferred[None]:
            sub.stop()
            return done

        self.addCleanup(stop)
        return sub, watcher, source

    def test_a_short_session_is_refreshed_without_losing_a_message(self) -> Deferred[None]:
        """session_ttl 4 s: the Subscriber refreshes at each expiring notice and stays on
        one connection past its first expiry through two refreshes, every message
        published meanwhile arriving once, in order."""

        async def run() -> None:
            topic = "feed.refresh"
            sub, watch, source = self.subscriber([topic, "room.*"], "refresher", 4)
            await watch.status_count("subscribed to", 1)
            first_expiry = sub.expires_at
            assert first_expiry is not None
            assert first_expiry - time.time() == pytest.approx(4, abs=1)
            pub = self.publisher()
            sent = 0

            def publish() -> Deferred[Any]:
                nonlocal sent
                sent += 1
                return pub.publish(topic, sent)

            loop = LoopingCall(publish)
            loop.start(0.1)
            await watch.status_count("session refreshed until", 2)
            loop.stop()
            await watch.until(lambda: len(watch.messages) == sent)
            assert time.time() > first_expiry
            assert [m["data"] for m in watch.messages] == list(range(1, sent + 1))
            assert sent > 10
            assert watch.count("subscribed to") == 1
            assert watch.count("connection closed") == 0
            assert source.calls == 3  # one connection, two refreshes
            expires_at = sub.expires_at
            assert expires_at is not None and expires_at > first_expiry + 4
            log = self.srv.log_text()
            assert log.count("session refresh accepted") >= 2

        return ensureDeferred(run())

    def test_a_failed_refresh_ends_in_4003_and_a_reconnect(self) -> Deferred[None]:
        """get_ticket failing at the refresh, then a ticket for another user (forbidden):
        each is reported, the server closes with 4003, the Subscriber reconnects and
        resumes, and no message is lost."""

        async def run() -> None:
            topic = "feed.fail"
            _, watch, source = self.subscriber([topic], "refresh-fails", 2)
            source.instead = {2: "fail", 4: "someone-else"}
            await watch.status_count("subscribed to", 1)
            await watch.status_count("session not refreshed (no ticket: RuntimeError", 1)
            await self.srv_publish(topic, 1)
            await watch.status_count("connection closed (code 4003: the session expired)", 1)
            await self.srv_publish(topic, 2)  # while it reconnects, or after: recovered
            await watch.status_count("subscribed to", 2)
            await watch.status_count("session not refreshed (forbidden", 1)
            await watch.status_count("connection closed (code 4003", 2)
            await watch.status_count("subscribed to", 3)
            await self.srv_publish(topic, 3)
            await watch.until(lambda: len(watch.messages) == 3)
            assert [m["data"] for m in watch.messages] == [1, 2, 3]
            assert source.calls >= 5
            log = self.srv.log_text()
            assert "reason=other_user" in log

        return ensureDeferred(run())

    def srv_publish(self, topic: str, data: Any) -> Deferred[str]:
        return deferToThread(self.srv.publish, topic, data)

    def test_presence_over_the_api_and_the_connection(self) -> Deferred[None]:
        """Presence: join/leave frames reach on_event; Subscriber.presence, the blocking and
        the Twisted publishers agree on the users map; refusals carry their code."""

        async def run() -> None:
            sub, watch, _ = self.subscriber(["room.*", "room.lobby"], "watcher", 600)
            await watch.status_count("subscribed to", 1)
            alice = await deferToThread(self.srv.session, "alice", subscribe=["room.*"])
            self.addCleanup(deferToThread, alice.close)
            answer = await deferToThread(
                request_json, alice, {"op": "subscribe", "id": 1, "topic": "room.lobby"}
            )
            assert answer["op"] == "ok"
            join = {"op": "join", "topic": "room.lobby", "user": "alice"}
            await watch.until(lambda: join in watch.events)
            expected = {"alice": 1, "watcher": 1}
            assert await sub.presence("room.lobby") == expected
            assert await self.publisher().presence("room.lobby") == expected
            blocking = await deferToThread(self.blocking_presence, "room.lobby")
            assert blocking == expected
            for topic, code in (("feed.x", "forbidden"), ("room.*", "invalid_topic")):
                try:
                    await sub.presence(topic)
                except RequestFailed as e:
                    assert e.code == code, (topic, e)
                else:
                    raise AssertionError(f"no RequestFailed for {topic}")
            try:
                await self.publisher().presence("feed.x")
            except APIError as e:
                assert (e.status, e.code) == (400, "bad_request")
            else:
                raise AssertionError("no APIError")
            await deferToThread(alice.close)
            leave = {"op": "leave", "topic": "room.lobby", "user": "alice"}
            await watch.until(lambda: leave in watch.events)
            assert await sub.presence("room.lobby") == {"watcher": 1}
            assert all(m["op"] == "message" for m in watch.messages)

        return ensureDeferred(run())

    def blocking_presence(self, topic: str) -> dict[str, int]:
        from securepub.client import Publisher

        with Publisher(self.srv.url, self.srv.api_key, ca=self.srv.ca_path) as pub:
            return pub.presence(topic)


@pytest.fixture(scope="class")
def stub_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    ca = trustme.CA()
    path = tmp_path_factory.mktemp("stub-sessions") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    request.cls.stub_ca = ca
    request.cls.stub_ca_file = str(path)


@pytest.mark.usefixtures("stub_env")
class HandshakeRetryAfterTests(TrialTestCase):
    """A scripted TLS server refusing the WebSocket upgrade with 429 and Retry-After."""

    stub_ca: trustme.CA
    stub_ca_file: str
    timeout = 20

    def test_a_429_handshake_waits_for_retry_after(self) -> Deferred[None]:
        """Refused with 429 and Retry-After: 1, the Subscriber comes back no sooner than a
        second later (with a fresh ticket), and a 403 then is retried as usual."""

        async def run() -> None:
            limited = (429, b"", {"Retry-After": "1"})
            forbidden = (403, b"")
            with scripted(self.stub_ca, [limited, forbidden]) as server:
                watch = Watcher()
                times: list[float] = []
                tickets = 0

                def get_ticket() -> Deferred[str]:
                    nonlocal tickets
                    tickets += 1
                    return succeed(f"{SECRET}-{tickets}")

                def on_status(text: str) -> None:
                    times.append(time.monotonic())
                    watch.on_status(text)

                sub = Subscriber(
                    reactor,
                    server.url,
                    ["news.a"],
                    get_ticket,
                    watch.on_message,
                    ca=self.stub_ca_file,
                    on_status=on_status,
                    backoff=RetryPolicy(retries=0, initial_delay=0.05, max_delay=0.05),
                )
                done = sub.run()
                await watch.status_count("the server refused the connection", 2)
                sub.stop()
                await done
            first, second = watch.status[:2]
            assert first.startswith(
                "the server refused the connection (HTTP 429); the server asked to wait 1 s; "
                "reconnecting in 1."
            ), first
            assert second.startswith("the server refused the connection (HTTP 403); reconnect")
            assert times[1] - times[0] >= 1.0
            assert server.requests == ["/ws", "/ws"]
            assert tickets == 2
            assert all(SECRET not in line for line in watch.status)

        return ensureDeferred(run())
