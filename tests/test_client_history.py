"""History and recovery in the Python clients (SPEC section 8).

The publishers' ``history()`` and ``publish_message()`` and the reconnecting
`Subscriber`'s resume run against real ``twistd securepub --dev`` servers
(the ``demo.>`` rule keeps 100 messages; a configured ``small.>`` rule keeps
2). The Subscriber's handling of answers a healthy single node rarely gives
(``unsubscribed``, ``unavailable``, a refused ``since``) is driven frame by
frame through a fake protocol and a `Clock`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase as TrialTestCase

from securepub.client import APIError, ClientError, HistoryPage, Publisher, RetryPolicy
from securepub.client_twisted import Subscriber, SubscribeRefused, TwistedPublisher
from securepub.clients.twisted_client import is_exact
from tests.server import Server, server_fixture

SMALL_HISTORY = {"topics": [{"pattern": "small.>", "history_size": 2}]}

srv = server_fixture(SMALL_HISTORY, dev=True)


def publisher(server: Server) -> Publisher:
    return Publisher(server.url, server.api_key, ca=server.ca_path)


# -- the blocking publisher against a real server --------------------------------


def test_history_returns_what_was_published_with_offsets(srv: Server) -> None:
    """publish_message() numbers messages 1, 2, 3 in one epoch; history() returns them."""
    with publisher(srv) as pub:
        sent = [pub.publish_message("demo.hist.a", {"n": n}) for n in range(3)]
        assert [p.offset for p in sent] == [1, 2, 3]
        assert len({p.epoch for p in sent}) == 1 and isinstance(sent[0].epoch, str)
        page = pub.history("demo.hist.a")
    assert isinstance(page, HistoryPage)
    assert (page.offset, page.epoch) == (3, sent[0].epoch)
    assert [m["data"] for m in page.messages] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert [m["id"] for m in page.messages] == [p.id for p in sent]
    assert [(m["op"], m["topic"], m["offset"], m["epoch"]) for m in page.messages] == [
        ("message", "demo.hist.a", n, sent[0].epoch) for n in (1, 2, 3)
    ]
    assert page.next_since is None


def test_since_and_limit_page_through_the_history(srv: Server) -> None:
    """since skips what was read, limit cuts the page, next_since says where to go on."""
    with publisher(srv) as pub:
        for n in range(5):
            pub.publish("demo.hist.pages", n)
        first = pub.history("demo.hist.pages", since=1, limit=2)
        assert [m["data"] for m in first.messages] == [1, 2]
        assert (first.offset, first.next_since) == (5, 3)
        assert first.next_since is not None
        rest = pub.history("demo.hist.pages", since=first.next_since, limit=1000)
        assert [m["data"] for m in rest.messages] == [3, 4]
        assert rest.next_since is None
        assert pub.history("demo.hist.pages", since=5).messages == []


def test_publish_still_returns_the_id_and_a_plain_topic_has_no_position(srv: Server) -> None:
    """publish() returns the id string; on a topic without history offset/epoch are None."""
    with publisher(srv) as pub:
        message_id = pub.publish("demo.hist.id", 1)
        assert isinstance(message_id, str)
        assert pub.history("demo.hist.id").messages[-1]["id"] == message_id
        plain = pub.publish_message("plain.topic", 1)
    assert isinstance(plain.id, str) and plain.id
    assert (plain.offset, plain.epoch) == (None, None)


@pytest.mark.parametrize(
    ("topic", "kwargs", "code"),
    [
        ("plain.topic", {}, "bad_request"),
        ("demo.>", {}, "invalid_topic"),
        ("bad topic", {}, "invalid_topic"),
        ("demo.hist.a", {"limit": 0}, "bad_request"),
        ("demo.hist.a", {"limit": 1001}, "bad_request"),
        ("demo.hist.a", {"since": -1}, "bad_request"),
    ],
)
def test_history_refusals_raise_apierror_400(
    srv: Server, topic: str, kwargs: dict[str, int], code: str
) -> None:
    """A topic without history is bad_request, a pattern invalid_topic, limits are checked."""
    with publisher(srv) as pub:
        with pytest.raises(APIError) as caught:
            pub.history(topic, **kwargs)
    assert (caught.value.status, caught.value.code) == (400, code)


def test_history_with_a_wrong_key_is_unauthorized(srv: Server) -> None:
    """history() sends the API key: a wrong one is 401 and appears in no error."""
    key = "wrong-key-0123456789-abcdefghij"
    with Publisher(srv.url, key, ca=srv.ca_path) as pub:
        with pytest.raises(APIError) as caught:
            pub.history("demo.hist.a")
    assert (caught.value.status, caught.value.code) == (401, "unauthorized")
    assert key not in str(caught.value)


# -- the Subscriber, frame by frame ------------------------------------------------


class FakeFactory:
    lost_reason = None
    refused_status: int | None = None
    retry_after: int | None = None


class FakeProtocol:
    """Stands in for `_SubscriberProtocol`: records frames sent and closes."""

    STATE_OPEN = 1
    STATE_CLOSED = 3

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.state = self.STATE_OPEN
        self.closes: list[int] = []
        self.factory = FakeFactory()

    def send_json(self, frame: dict[str, Any]) -> None:
        self.sent.append(frame)

    def sendClose(self, code: int) -> None:
        self.closes.append(code)
        self.state = self.STATE_CLOSED

    def dropConnection(self, abort: bool = False) -> None:
        self.state = self.STATE_CLOSED

    def subscribes(self) -> list[dict[str, Any]]:
        return [f for f in self.sent if f.get("op") == "subscribe"]


class Harness:
    """A Subscriber whose connections are `FakeProtocol`s, on a `Clock`."""

    def __init__(self, patterns: list[str], **kwargs: Any) -> None:
        self.clock = Clock()
        self.messages: list[dict[str, Any]] = []
        self.status: list[str] = []
        self.recoveries: list[tuple[str, bool, int | None, str | None]] = []
        self.sub = Subscriber(
            self.clock,
            "https://localhost:8443",
            patterns,
            lambda: Deferred(),  # never fires: no real connection is made
            self.messages.append,
            on_status=self.status.append,
            on_recover=lambda *args: self.recoveries.append(args),
            backoff=RetryPolicy(retries=0, initial_delay=1.0, max_delay=1.0),
            rand=lambda: 1.0,
            **kwargs,
        )
        self.outcome: list[Any] = []
        self.sub.run().addBoth(self.outcome.append)
        self.protocol = FakeProtocol()

    def connect(self) -> FakeProtocol:
        """A new connection, its welcome received; returns it."""
        self.protocol = FakeProtocol()
        self.sub._protocol = self.protocol  # type: ignore[assignment]
        self.frame({"op": "welcome", "session": "s", "user": "u"})
        return self.protocol

    def frame(self, frame: dict[str, Any]) -> None:
        self.sub._frame(self.protocol, frame)  # type: ignore[arg-type]

    def close(self, code: int = 1006) -> None:
        self.protocol.state = FakeProtocol.STATE_CLOSED
        self.sub._closed(self.protocol, code, None)  # type: ignore[arg-type]

    def ok(self, subscribe: dict[str, Any], **fields: Any) -> None:
        self.frame({"op": "ok", "id": subscribe["id"], **fields})

    def message(self, topic: str, offset: int | None, epoch: str | None = "E1") -> None:
        frame: dict[str, Any] = {"op": "message", "topic": topic, "id": f"m{offset}", "data": 0}
        if offset is not None:
            frame.update(offset=offset, epoch=epoch)
        self.frame(frame)


def test_exact_topics_are_told_from_patterns() -> None:
    """Only a subscription without * or > names one topic, and only those resume."""
    assert is_exact("news.sports") and is_exact("a")
    assert not is_exact("news.*") and not is_exact("news.>") and not is_exact("*.a")


def test_a_reconnect_resumes_exact_topics_after_the_last_message() -> None:
    """After a reconnect an exact topic with history subscribes since its last offset;
    patterns and topics without history subscribe plainly."""
    h = Harness(["news.a", "news.*", "plain.b"])
    first = h.connect().subscribes()
    assert [(f["topic"], "since" in f) for f in first] == [
        ("news.a", False),
        ("news.*", False),
        ("plain.b", False),
    ]
    h.ok(first[0], offset=4, epoch="E1")
    h.ok(first[1])
    h.ok(first[2])
    assert h.status == ["subscribed to news.a news.* plain.b"]
    assert h.sub.position("news.a") == (4, "E1")
    h.message("news.a", 5)
    h.message("news.a", 6)
    h.message("news.b", 9)  # through the pattern: no position of its own
    h.message("plain.b", None)
    assert len(h.messages) == 4
    assert h.sub.position("news.a") == (6, "E1")
    assert h.sub.position("news.b") is None
    h.close()
    assert "connection closed (code 1006); reconnecting in 1.0 s" in h.status
    again = h.connect().subscribes()
    assert [f.get("since") for f in again] == [{"offset": 6, "epoch": "E1"}, None, None]
    assert h.recoveries == []


def test_a_recovered_resume_keeps_the_position_until_the_missed_messages_arrive() -> None:
    """recovered=true: on_recover(topic, True, N, E), a status line, and the position
    advances message by message, so a second loss mid-replay resumes where it stopped."""
    h = Harness(["news.a"], since={"news.a": (3, "E1")})
    sub = h.connect().subscribes()[0]
    assert sub["since"] == {"offset": 3, "epoch": "E1"}
    h.ok(sub, recovered=True, offset=6, epoch="E1")
    assert h.recoveries == [("news.a", True, 6, "E1")]
    assert "news.a: recovered, 3 missed messages follow" in h.status
    assert h.sub.position("news.a") == (3, "E1")
    h.message("news.a", 4)
    h.close()
    resumed = h.connect().subscribes()[0]
    assert resumed["since"] == {"offset": 4, "epoch": "E1"}


@pytest.mark.parametrize(
    ("answer_epoch", "why"),
    [
        ("E1", "history no longer reaches back"),
        ("E2", "the server lost the topic's history: new epoch"),
    ],
)
def test_a_resume_that_was_not_recovered_is_reported(answer_epoch: str, why: str) -> None:
    """recovered=false: a 'not recovered ... refetch' status line, on_recover(False, ...),
    and the next resume starts from the position the server gave."""
    h = Harness(["news.sports"], since={"news.sports": (41, "E1")})
    sub = h.connect().subscribes()[0]
    h.ok(sub, recovered=False, offset=90, epoch=answer_epoch)
    assert h.recoveries == [("news.sports", False, 90, answer_epoch)]
    assert f"news.sports: not recovered ({why}): refetch" in h.status
    assert h.status[-1] == "subscribed to news.sports"
    assert h.sub.position("news.sports") == (90, answer_epoch)
    h.close()
    assert h.connect().subscribes()[0]["since"] == {"offset": 90, "epoch": answer_epoch}


def test_insufficient_state_resubscribes_since_the_last_offset_at_once() -> None:
    """unsubscribed with reason insufficient_state: subscribe again since the last
    offset on the same connection, without waiting and without ending anything."""
    h = Harness(["news.a", "news.b"])
    first = h.connect().subscribes()
    h.ok(first[0], offset=0, epoch="E1")
    h.ok(first[1], offset=0, epoch="F1")
    h.message("news.a", 1)
    h.frame({"op": "unsubscribed", "topic": "news.a", "reason": "insufficient_state"})
    again = h.protocol.subscribes()[2:]
    assert again == [
        {
            "op": "subscribe",
            "id": again[0]["id"],
            "topic": "news.a",
            "since": {"offset": 1, "epoch": "E1"},
        }
    ]
    assert "news.a: the server lost track of its order; subscribing since offset 1" in h.status
    h.ok(again[0], recovered=True, offset=3, epoch="E1")
    h.message("news.a", 2)
    h.message("news.a", 3)
    assert h.sub.position("news.a") == (3, "E1")
    assert h.outcome == [] and h.protocol.closes == []
    assert h.sub.patterns == ("news.a", "news.b")


def test_unsubscribed_for_another_reason_ends_that_subscription_then_the_run() -> None:
    """unsubscribed with reason forbidden ends that subscription (not resubscribed after a
    reconnect); when none is left, run() fails with SubscribeRefused."""
    h = Harness(["news.a", "news.*"])
    first = h.connect().subscribes()
    h.ok(first[0], offset=0, epoch="E1")
    h.ok(first[1])
    h.frame({"op": "unsubscribed", "topic": "news.*", "reason": "forbidden"})
    assert "news.*: the server ended the subscription (forbidden)" in h.status
    assert h.sub.patterns == ("news.a",)
    assert h.outcome == []
    h.frame({"op": "unsubscribed", "topic": "not.ours", "reason": "forbidden"})
    assert h.outcome == []
    h.close()
    assert [f["topic"] for f in h.connect().subscribes()] == ["news.a"]
    h.frame({"op": "unsubscribed", "topic": "news.a", "reason": "\x1b[2Jsomething else"})
    assert "news.a: the server ended the subscription (\\x1b[2Jsomething else)" in h.status
    assert h.protocol.closes == [1000]
    assert len(h.outcome) == 1 and isinstance(h.outcome[0], Failure)
    assert h.outcome[0].check(SubscribeRefused)
    assert "no subscription left" in str(h.outcome[0].value)


def test_an_unavailable_subscribe_is_tried_again_after_the_backoff() -> None:
    """error unavailable answering a subscribe does not end the Subscriber: the same
    subscribe (same since) is sent again after the backoff, until it is ok."""
    h = Harness(["news.a", "news.b"], since={"news.a": (2, "E1")})
    first = h.connect().subscribes()
    h.ok(first[1])
    h.frame({"op": "error", "id": first[0]["id"], "code": "unavailable", "message": "down"})
    assert h.outcome == []
    assert "news.a: unavailable: down; subscribing again in 1.0 s" in h.status
    assert "subscribed to news.a news.b" not in h.status
    h.clock.advance(0.9)
    assert len(h.protocol.subscribes()) == 2
    h.clock.advance(0.1)
    retried = h.protocol.subscribes()[2]
    assert (retried["topic"], retried["since"]) == ("news.a", {"offset": 2, "epoch": "E1"})
    h.ok(retried, recovered=True, offset=2, epoch="E1")
    assert h.status[-1] == "subscribed to news.a news.b"
    assert h.outcome == []


def test_a_pending_subscribe_retry_dies_with_its_connection() -> None:
    """A retry timer of a connection that closed is cancelled: nothing is sent on it,
    and the next connection subscribes to everything anyway."""
    h = Harness(["news.a"])
    old = h.connect()
    h.frame({"op": "error", "id": old.subscribes()[0]["id"], "code": "unavailable", "message": ""})
    h.close()
    assert h.clock.getDelayedCalls() and all(
        c.func.__name__ == "_connect"
        for c in h.clock.getDelayedCalls()  # type: ignore[attr-defined]
    )
    h.clock.advance(5)
    assert len(old.subscribes()) == 1


def test_insufficient_state_replaces_a_pending_unavailable_retry() -> None:
    """A resume sent at once for insufficient_state cancels the topic's unavailable retry,
    so no second subscribe (answered without recovered) follows it."""
    h = Harness(["news.a", "news.b"])
    first = h.connect().subscribes()
    h.ok(first[0], offset=3, epoch="E1")
    h.frame({"op": "error", "id": first[1]["id"], "code": "unavailable", "message": ""})
    h.frame({"op": "unsubscribed", "topic": "news.b", "reason": "insufficient_state"})
    assert len(h.protocol.subscribes()) == 3
    h.clock.advance(10)
    assert len(h.protocol.subscribes()) == 3


def test_a_position_never_goes_back_within_an_epoch() -> None:
    """An ok whose offset is below a message already handed on (through a pattern) does
    not move the resume point back; a new epoch does replace it."""
    h = Harness(["news.>", "news.a"])
    first = h.connect().subscribes()
    h.ok(first[0])
    h.message("news.a", 8)  # through news.>, before news.a's own ok
    h.ok(first[1], offset=7, epoch="E1")
    assert h.sub.position("news.a") == (8, "E1")
    h.message("news.a", 2, epoch="E2")
    assert h.sub.position("news.a") == (2, "E2")


def test_a_refused_since_falls_back_to_a_plain_subscribe() -> None:
    """bad_request to a since (the topic keeps no history any more) is reported as not
    recovered and the topic subscribed without since; other refusals still end it."""
    h = Harness(["news.a"], since={"news.a": (5, "E1")})
    sub = h.connect().subscribes()[0]
    h.frame({"op": "error", "id": sub["id"], "code": "bad_request", "message": "no history"})
    plain = h.protocol.subscribes()[1]
    assert "since" not in plain
    assert h.recoveries == [("news.a", False, None, None)]
    assert "news.a: not recovered (since refused: no history): refetch" in h.status
    h.ok(plain)
    assert h.sub.position("news.a") is None and h.outcome == []
    h.close()
    again = h.connect().subscribes()[0]
    assert "since" not in again
    h.frame({"op": "error", "id": again["id"], "code": "bad_request", "message": "still"})
    assert len(h.outcome) == 1 and h.outcome[0].check(SubscribeRefused)


def test_since_must_name_exact_topics_subscribed_to() -> None:
    """Starting positions are checked: only exact topics among the patterns, well formed."""
    for since in ({"news.*": (1, "E")}, {"other": (1, "E")}, {"a": (-1, "E")}, {"a": (1, "")}):
        with pytest.raises(ClientError):
            Subscriber(
                reactor, "https://localhost:8443", ["a", "news.*"], Deferred, print, since=since
            )


# -- the Subscriber against real servers ------------------------------------------


@pytest.fixture(scope="class")
def history_env(request: pytest.FixtureRequest, srv: Server) -> None:
    request.cls.srv = srv


class Gate:
    """A ticket source that can be held closed: `get_ticket` waits while it is."""

    def __init__(self, pub: TwistedPublisher, user: str, patterns: list[str]) -> None:
        self.pub = pub
        self.user = user
        self.patterns = patterns
        self.calls = 0
        self._held: Deferred[None] | None = None

    def hold(self) -> None:
        self._held = Deferred()

    def release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.callback(None)

    def get_ticket(self) -> Deferred[str]:
        self.calls += 1

        def issue(_: object) -> Deferred[str]:
            d = self.pub.issue_ticket(self.user, subscribe=self.patterns, ttl=30)
            return d.addCallback(lambda issued: issued.ticket)

        if self._held is not None:
            waiting: Deferred[None] = Deferred()
            self._held.addCallback(lambda _: waiting.callback(None))
            return waiting.addCallback(issue)
        return issue(None)


class Watcher:
    """Collects a Subscriber's messages and status lines; Deferreds for what a test awaits."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.status: list[str] = []
        self.recoveries: list[tuple[str, bool, int | None, str | None]] = []
        self._waits: list[tuple[Callable[[], bool], Deferred[None]]] = []

    def on_message(self, frame: dict[str, Any]) -> None:
        self.messages.append(frame)
        self._check()

    def on_status(self, text: str) -> None:
        self.status.append(text)
        self._check()

    def on_recover(self, *args: Any) -> None:
        self.recoveries.append(args)  # type: ignore[arg-type]
        self._check()

    def until(self, condition: Callable[[], bool]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waits.append((condition, d))
        self._check()
        return d

    def status_with(self, needle: str, start: int = 0) -> Deferred[None]:
        return self.until(lambda: any(needle in s for s in self.status[start:]))

    def _check(self) -> None:
        # Resume the test on the next turn of the reactor, once the Subscriber has
        # finished handling the frame that met the condition.
        for entry in list(self._waits):
            condition, d = entry
            if condition():
                self._waits.remove(entry)
                reactor.callLater(0, d.callback, None)


@pytest.mark.usefixtures("history_env")
class SubscriberRecoveryTests(TrialTestCase):
    """The Subscriber on the real reactor, resuming against real servers."""

    srv: Server
    timeout = 60

    def publisher(self, server: Server) -> TwistedPublisher:
        pub = TwistedPublisher(reactor, server.url, server.api_key, ca=server.ca_path)
        self.addCleanup(pub.close)
        return pub

    def subscriber(
        self, server: Server, patterns: list[str], user: str, pub: TwistedPublisher
    ) -> tuple[Subscriber, Watcher, Gate, Deferred[None]]:
        watcher = Watcher()
        gate = Gate(pub, user, patterns)
        sub = Subscriber(
            reactor,
            server.url,
            patterns,
            gate.get_ticket,
            watcher.on_message,
            ca=server.ca_path,
            on_status=watcher.on_status,
            on_recover=watcher.on_recover,
            backoff=RetryPolicy(retries=0, initial_delay=0.05, max_delay=0.5),
        )
        done = sub.run()

        def stop() -> Deferred[None]:
            sub.stop()
            return done

        self.addCleanup(stop)
        return sub, watcher, gate, done

    def disconnect(self, pub: TwistedPublisher, user: str) -> Deferred[Any]:
        """POST /v1/disconnect for ``user``, keeping its tickets (the server closes with 4001)."""
        return deferToThread(
            self.srv.api, "POST", "/v1/disconnect", {"user": user, "revoke_tickets": False}
        )

    def test_a_cut_connection_resumes_and_every_message_arrives_once_in_order(
        self,
    ) -> Deferred[None]:
        """The server closes the connection (4001); messages published while the
        Subscriber is away arrive after its resubscribe since, then live ones: every
        offset once, in order, and on_recover reports the recovery."""

        async def run() -> None:
            topic, user = "demo.resume.a", "history-resume"
            pub = self.publisher(self.srv)
            sub, watch, gate, _ = self.subscriber(self.srv, [topic, "plain.>"], user, pub)
            await watch.status_with("subscribed to")
            for n in (1, 2):
                await pub.publish(topic, n)
            await watch.until(lambda: len(watch.messages) == 2)
            gate.hold()
            closed_at = len(watch.status)
            answer = await self.disconnect(pub, user)
            assert answer[0] == 202, answer
            await watch.status_with("connection closed (code 4001)", closed_at)
            for n in (3, 4, 5):  # while it cannot reconnect
                await pub.publish(topic, n)
            await pub.publish("plain.x", "not recovered: no history")
            assert len(watch.messages) == 2
            gate.release()
            await watch.until(lambda: len(watch.messages) == 5)
            await watch.status_with("subscribed to", closed_at)
            await pub.publish(topic, 6)
            await watch.until(lambda: len(watch.messages) == 6)
            on_topic = [m for m in watch.messages if m["topic"] == topic]
            assert [m["data"] for m in on_topic] == [1, 2, 3, 4, 5, 6]
            assert [m["offset"] for m in on_topic] == [1, 2, 3, 4, 5, 6]
            assert len({m["id"] for m in on_topic}) == 6
            epoch = on_topic[0]["epoch"]
            assert watch.recoveries == [(topic, True, 5, epoch)]
            assert f"{topic}: recovered, 3 missed messages follow" in watch.status
            assert sub.position(topic) == (6, epoch)
            assert gate.calls == 2

        return ensureDeferred(run())

    def test_history_trimmed_past_the_position_is_not_recovered(self) -> Deferred[None]:
        """With history_size 2, three messages missed cannot be recovered: on_recover
        says False with the current position, on_status says refetch, none is replayed."""

        async def run() -> None:
            topic, user = "small.trim", "history-trim"
            pub = self.publisher(self.srv)
            _, watch, gate, _ = self.subscriber(self.srv, [topic], user, pub)
            await watch.status_with("subscribed to")
            await pub.publish(topic, 1)
            await watch.until(lambda: len(watch.messages) == 1)
            gate.hold()
            closed_at = len(watch.status)
            await self.disconnect(pub, user)
            await watch.status_with("connection closed", closed_at)
            for n in (2, 3, 4):
                await pub.publish(topic, n)
            gate.release()
            await watch.until(lambda: bool(watch.recoveries))
            epoch = watch.messages[0]["epoch"]
            assert watch.recoveries == [(topic, False, 4, epoch)]
            assert (
                f"{topic}: not recovered (history no longer reaches back): refetch" in watch.status
            )
            await watch.status_with("subscribed to", closed_at)
            await pub.publish(topic, 5)
            await watch.until(lambda: len(watch.messages) == 2)
            assert [(m["data"], m["offset"]) for m in watch.messages] == [(1, 1), (5, 5)]

        return ensureDeferred(run())

    def test_a_restarted_server_is_a_new_epoch_and_not_recovered(self) -> Deferred[None]:
        """The in-memory engine loses everything on restart: the resume since the old
        epoch is answered recovered=false, reported, and later messages arrive."""

        async def run() -> None:
            server = Server(dev=True)
            await deferToThread(server.start)
            self.addCleanup(deferToThread, server.cleanup)
            topic, user = "demo.restart", "history-restart"
            pub = self.publisher(server)
            sub, watch, gate, _ = self.subscriber(server, [topic], user, pub)
            await watch.status_with("subscribed to")
            await pub.publish(topic, 1)
            await watch.until(lambda: len(watch.messages) == 1)
            old_epoch = watch.messages[0]["epoch"]
            gate.hold()
            closed_at = len(watch.status)
            await deferToThread(server.stop)
            await watch.status_with("connection closed", closed_at)
            restarted = Server(dev=True, directory=server.directory, port=server.port)
            await deferToThread(restarted.start)
            self.addCleanup(deferToThread, restarted.stop)
            gate.release()
            await watch.until(lambda: bool(watch.recoveries))
            assert len(watch.recoveries) == 1
            name, recovered, offset, epoch = watch.recoveries[0]
            assert (name, recovered, offset) == (topic, False, 0)
            assert epoch != old_epoch
            assert (
                f"{topic}: not recovered (the server lost the topic's history: new epoch): refetch"
                in watch.status
            )
            await watch.status_with("subscribed to", closed_at)
            await pub.publish(topic, 2)
            await watch.until(lambda: len(watch.messages) == 2)
            assert (watch.messages[1]["offset"], watch.messages[1]["epoch"]) == (1, epoch)
            assert sub.position(topic) == (1, epoch)

        return ensureDeferred(run())
