"""Recovery through the broker: every offset once and in order, however publishes race.

The engine here behaves like the Redis engine at its most awkward: a publish
is numbered and stored at once but reaches the node's subscription later, a
history read is executed at one moment and answered at a later one, and live
messages can be lost on the way (a dropped Redis link) until a resync. The
broker must still hand each session every offset once, in order, from where
its subscription started.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from securepub.broker.broker import Broker
from securepub.broker.sessions import Grants, ISubscriber, Session
from securepub.core.engine import IFanout, IHistory, IReceiver
from securepub.core.errors import RequestError
from securepub.core.history import HistoryPage, HistoryPolicy, Position, Publication, Subscribed
from securepub.core.limits import Limits
from securepub.core.topics import Pattern
from securepub.core.validation import PayloadValidator, TopicRule

TOPIC = "news.a"


@implementer(IFanout, IHistory)
class LaggyEngine:
    """Numbers and stores at once; delivers, executes reads and answers them when told."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self.epoch = "E1"
        self.top = 0
        self.stored: list[Publication] = []
        self.in_flight: deque[Publication] = deque()
        self.reads: deque[tuple[Deferred[HistoryPage], int, int]] = deque()
        self.executed: deque[tuple[Deferred[HistoryPage], HistoryPage]] = deque()
        self.receiver: IReceiver | None = None
        self.lost = 0

    # IFanout
    def start(self, receiver: IReceiver) -> None:
        self.receiver = receiver

    def publish(
        self, publication: Publication, history: HistoryPolicy | None
    ) -> Deferred[Position | None]:
        self.top += 1
        numbered = Publication(
            publication.topic,
            publication.id,
            publication.ts,
            publication.body,
            self.top,
            self.epoch,
        )
        self.stored.append(numbered)
        del self.stored[: -self.size]
        self.in_flight.append(numbered)
        return succeed(Position(self.top, self.epoch))

    def watch(self, pattern: Pattern) -> Deferred[None]:
        return succeed(None)

    def unwatch(self, pattern: Pattern) -> None:
        pass

    def disconnect(self, user: str, message_id: str, ts: float) -> Deferred[None]:
        return succeed(None)

    # IHistory
    def position(self, topic: str, history: HistoryPolicy) -> Deferred[Position]:
        return self.read(topic, history, 0, 0).addCallback(lambda page: page.position)

    def read(
        self, topic: str, history: HistoryPolicy, since: int, limit: int
    ) -> Deferred[HistoryPage]:
        d: Deferred[HistoryPage] = Deferred()
        self.reads.append((d, since, limit))
        return d

    # the steps the test interleaves
    def deliver_one(self) -> None:
        if self.in_flight:
            assert self.receiver is not None
            self.receiver.deliver(self.in_flight.popleft())

    def lose_one(self) -> None:
        if self.in_flight:
            self.in_flight.popleft()
            self.lost += 1

    def execute_one(self) -> None:
        if self.reads:
            d, since, limit = self.reads.popleft()
            found = tuple(p for p in self.stored if p.offset and p.offset > since)[:limit]
            self.executed.append((d, HistoryPage(Position(self.top, self.epoch), found)))

    def answer_one(self) -> None:
        if self.executed:
            d, page = self.executed.popleft()
            d.callback(page)

    def settle(self) -> None:
        """Run everything still pending, resyncing once if something was lost."""
        if self.lost:
            assert self.receiver is not None
            self.lost = 0
            self.receiver.resync()
        for _ in range(100):
            if not (self.in_flight or self.reads or self.executed):
                return
            self.deliver_one()
            self.execute_one()
            self.answer_one()
        raise AssertionError("the engine did not settle")


@implementer(ISubscriber)
class Recorder:
    """Keeps, in order, the ok of each subscribe and every frame the broker sends."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def send_prepared(self, prepared: Any) -> None:
        self.events.append(json.loads(prepared))

    def revoke(self) -> None:
        pass

    def confirm(self, subscribed: Subscribed) -> None:
        self.events.append(subscribed)

    def offsets(self) -> list[int]:
        return [e["offset"] for e in self.events if isinstance(e, dict) and e["op"] == "message"]


def make_broker(engine: LaggyEngine, size: int = 10_000) -> Broker:
    rules = [TopicRule(Pattern.parse("news.>"), history=HistoryPolicy(size=size, ttl=3600))]
    return Broker(
        PayloadValidator(1000, 8, rules),
        Limits(),
        Clock(),
        fanout=engine,
        history=engine,
    )


def session(broker: Broker, recorder: Recorder) -> Session:
    grants = Grants(subscribe=(Pattern.parse("news.>"),))
    return broker.open_session("alice", grants, "192.0.2.1", recorder)


STEPS = st.lists(st.sampled_from(["publish", "deliver", "execute", "answer", "lose"]), max_size=60)


class RecoveryPropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        before=st.integers(min_value=0, max_value=8),
        resume_at=st.integers(min_value=0, max_value=8),
        steps=STEPS,
        use_since=st.booleans(),
        pattern_too=st.booleans(),
    )
    def test_every_offset_once_in_order(
        self, before: int, resume_at: int, steps: list[str], use_since: bool, pattern_too: bool
    ) -> None:
        """A recovering subscribe gets since+1.. (or ok+1..) once each, in order, to the end.

        An ordinary subscriber, there from the start, gets 1..top likewise.
        """
        engine = LaggyEngine()
        broker = make_broker(engine)
        steady = Recorder()
        broker.subscribe(session(broker, steady), TOPIC, confirm=steady.confirm)
        engine.settle()
        for _ in range(before):
            broker.publish(TOPIC, 1)
        engine.settle()
        recovering = Recorder()
        s = session(broker, recovering)
        if pattern_too:
            broker.subscribe(s, "news.*", confirm=recovering.confirm)
        since = Position(min(resume_at, before), "E1") if use_since else None
        broker.subscribe(s, TOPIC, since, confirm=recovering.confirm)
        for step in steps:
            if step == "publish":
                broker.publish(TOPIC, 1)
            else:
                getattr(engine, step + "_one")()
        engine.settle()
        top = engine.top
        self.assertEqual(steady.offsets(), list(range(1, top + 1)))
        oks = [e for e in recovering.events if isinstance(e, Subscribed) and e.position]
        self.assertEqual(len(oks), 1)
        ok = oks[0]
        assert ok.position is not None
        after_ok = recovering.events[recovering.events.index(ok) + 1 :]
        got = [e["offset"] for e in after_ok if isinstance(e, dict) and e["op"] == "message"]
        if use_since:
            assert since is not None
            self.assertTrue(ok.recovered)
            start = since.offset
        else:
            start = ok.position.offset
        self.assertEqual(got, list(range(start + 1, top + 1)))

    @settings(max_examples=200, deadline=None)
    @given(steps=STEPS)
    def test_an_unfillable_gap_ends_the_subscription(self, steps: list[str]) -> None:
        """With a tiny history, a loss is filled or the subscription ends: never a silent gap."""
        engine = LaggyEngine(size=2)
        broker = make_broker(engine, size=2)
        steady = Recorder()
        broker.subscribe(session(broker, steady), TOPIC, confirm=steady.confirm)
        engine.settle()
        for step in steps:
            if step == "publish":
                broker.publish(TOPIC, 1)
            else:
                getattr(engine, step + "_one")()
        engine.settle()
        got: list[int] = []
        for event in steady.events:
            if isinstance(event, dict) and event["op"] == "unsubscribed":
                self.assertEqual(event["reason"], "insufficient_state")
                break
            if isinstance(event, dict) and event["op"] == "message":
                got.append(event["offset"])
        self.assertEqual(got, list(range(1, len(got) + 1)))


class RecoveryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.engine = LaggyEngine()
        self.broker = make_broker(self.engine)
        self.recorder = Recorder()
        self.session = session(self.broker, self.recorder)

    def test_ok_waits_for_the_position(self) -> None:
        """The subscribe's ok carries the position read from the engine, and comes first."""
        self.broker.publish(TOPIC, 1)
        self.engine.settle()
        d = self.broker.subscribe(self.session, TOPIC, confirm=self.recorder.confirm)
        self.assertNoResult(d)
        self.engine.settle()
        subscribed = self.successResultOf(d)
        self.assertEqual(subscribed.position, Position(1, "E1"))
        self.assertEqual(self.recorder.events, [subscribed])

    def test_since_needs_an_exact_history_topic(self) -> None:
        """since on a pattern, or on a topic without history, is bad_request."""
        for topic in ("news.*", "other.topic"):
            error = self.assertRaises(
                RequestError, self.broker.subscribe, self.session, topic, Position(1, "E1")
            )
            self.assertEqual(error.code, "bad_request")

    def test_recovery_is_authorized_like_any_subscribe(self) -> None:
        """A ticket without the grant gets forbidden, never history."""
        self.broker.publish(TOPIC, 1)
        self.engine.settle()
        outsider = self.broker.open_session("eve", Grants(), "192.0.2.9", self.recorder)
        error = self.assertRaises(
            RequestError, self.broker.subscribe, outsider, TOPIC, Position(0, "E1")
        )
        self.assertEqual(error.code, "forbidden")
        self.assertEqual(self.engine.reads, deque())

    def test_engine_down_drops_the_subscription(self) -> None:
        """A failed read answers unavailable and leaves nothing subscribed."""
        d = self.broker.subscribe(self.session, TOPIC, confirm=self.recorder.confirm)
        read, _, _ = self.engine.reads.popleft()
        read.errback(RequestError("unavailable", "down"))
        self.assertEqual(self.failureResultOf(d, RequestError).value.code, "unavailable")
        self.assertEqual(self.session.subscriptions, {})
        self.assertEqual(self.broker._feeds, {})

    def test_unsubscribed_while_reading_sends_nothing(self) -> None:
        """A subscription dropped before its read came back gets its ok and no message."""
        self.broker.publish(TOPIC, 1)
        d = self.broker.subscribe(self.session, TOPIC, Position(0, "E1"), self.recorder.confirm)
        self.broker.unsubscribe(self.session, TOPIC)
        self.engine.settle()
        self.successResultOf(d)
        self.assertEqual(self.recorder.offsets(), [])
        self.assertEqual(self.broker._feeds, {})

    def test_closed_sessions_leave_no_feed(self) -> None:
        """Feeds exist only while a topic has exact subscribers on the node."""
        self.broker.subscribe(self.session, TOPIC, confirm=self.recorder.confirm)
        self.engine.settle()
        self.assertIn(TOPIC, self.broker._feeds)
        self.broker.close_session(self.session)
        self.assertEqual(self.broker._feeds, {})

    def test_since_on_a_held_subscription_replays_nothing(self) -> None:
        """Subscribing again with since: recovered only when since is where the topic stands."""
        self.broker.subscribe(self.session, TOPIC, confirm=self.recorder.confirm)
        self.engine.settle()
        self.broker.publish(TOPIC, 1)
        self.engine.settle()
        here = self.successResultOf(self.broker.subscribe(self.session, TOPIC, Position(1, "E1")))
        self.assertEqual((here.position, here.recovered), (Position(1, "E1"), True))
        behind = self.successResultOf(self.broker.subscribe(self.session, TOPIC, Position(0, "E1")))
        self.assertFalse(behind.recovered)
        self.assertEqual(self.recorder.offsets(), [1])
