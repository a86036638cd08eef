"""The broker: authorization against grants and rules, validation, fan-out."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from securepub.broker.broker import Broker, Grants, ISubscriber, RecordingSubscriber, Session
from securepub.core.engine import IFanout, IReceiver
from securepub.core.errors import RequestError
from securepub.core.history import HistoryPolicy, Position, Publication
from securepub.core.limits import Limits
from securepub.core.topics import Pattern
from securepub.core.validation import PayloadValidator, TopicRule
from securepub.engines.memory.fanout import LocalFanout


def grants(subscribe: tuple[str, ...] = (), publish: tuple[str, ...] = ()) -> Grants:
    return Grants(
        tuple(Pattern.parse(p) for p in subscribe), tuple(Pattern.parse(p) for p in publish)
    )


class BrokerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.limits = Limits(max_subscriptions=3, max_publish_rate=2, max_message_bytes=100)
        rules = [
            TopicRule(Pattern.parse("chat.*"), {"type": "object", "required": ["text"]}, True),
            TopicRule(Pattern.parse("chat.>"), None, False),
            TopicRule(Pattern.parse("open.>"), None, True),
        ]
        self.broker = Broker(
            PayloadValidator(self.limits.max_message_bytes, 4, rules),
            self.limits,
            self.clock,
            fanout=LocalFanout(),
        )
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def session(self, g: Grants) -> tuple[Session, RecordingSubscriber]:
        sub = RecordingSubscriber()
        return self.broker.open_session("alice", g, "203.0.113.7", sub), sub

    def code(self, f: Any, *args: Any) -> str:
        return self.assertRaises(RequestError, f, *args).code

    def test_recording_subscriber_provides_interface(self) -> None:
        """The test fake and the protocol share one small interface."""
        verifyObject(ISubscriber, RecordingSubscriber())

    def test_subscribe_needs_covering_grant(self) -> None:
        """A topic or pattern is allowed only when one grant covers all it can match."""
        s, _ = self.session(grants(subscribe=("news.*", "user.alice.>")))
        self.broker.subscribe(s, "news.sports")
        self.broker.subscribe(s, "news.*")
        self.broker.subscribe(s, "user.alice.inbox.*")
        self.assertEqual(self.code(self.broker.subscribe, s, "news.>"), "forbidden")
        self.assertEqual(self.code(self.broker.subscribe, s, "user.bob"), "forbidden")
        self.assertEqual(self.code(self.broker.subscribe, s, "news..x"), "invalid_topic")

    def test_refusal_is_one_structured_event(self) -> None:
        """A refused subscription is logged once with stable fields."""
        s, _ = self.session(grants())
        self.code(self.broker.subscribe, s, "secret.x")
        refused = [e for e in self.events if e.get("securepub_event") == "authorization_refused"]
        self.assertEqual(len(refused), 1)
        self.assertEqual(
            (refused[0]["action"], refused[0]["topic"], refused[0]["user"]),
            ("subscribe", "secret.x", "alice"),
        )

    def test_subscription_limit_counts_once(self) -> None:
        """Resubscribing is ok and counts once; past max_subscriptions is limit_exceeded."""
        s, _ = self.session(grants(subscribe=(">",)))
        for topic in ("a", "b", "c", "a"):
            self.broker.subscribe(s, topic)
        self.assertEqual(self.code(self.broker.subscribe, s, "d"), "limit_exceeded")
        self.broker.unsubscribe(s, "a")
        self.broker.subscribe(s, "d")

    def test_fanout_once_per_connection(self) -> None:
        """Overlapping subscriptions deliver one copy; the frame is built once."""
        prepared: list[bytes] = []

        def prepare(frame: bytes) -> bytes:
            prepared.append(frame)
            return frame

        self.broker._prepare = prepare
        a, sub_a = self.session(grants(subscribe=("news.>",)))
        b, sub_b = self.session(grants(subscribe=("news.>",)))
        for topic in ("news.sports", "news.*", "news.>"):
            self.broker.subscribe(a, topic)
        self.broker.subscribe(b, "news.sports")
        message_id = self.successResultOf(self.broker.publish("news.sports", {"score": [1, 2]})).id
        self.assertEqual(len(prepared), 1)
        self.assertEqual(len(sub_a.sent), 1)
        self.assertEqual(sub_a.sent, sub_b.sent)
        frame = json.loads(sub_a.sent[0])
        self.assertEqual(
            frame,
            {
                "op": "message",
                "topic": "news.sports",
                "id": message_id,
                "ts": 1000.0,
                "data": {"score": [1, 2]},
            },
        )

    def test_publisher_gets_own_message_only_if_subscribed(self) -> None:
        """A browser publish reaches its sender only through a subscription."""
        s, sub = self.session(grants(subscribe=("open.>",), publish=("open.>",)))
        self.broker.client_publish(s, "open.x", 1)
        self.assertEqual(sub.sent, [])
        self.broker.subscribe(s, "open.x")
        self.broker.client_publish(s, "open.x", 2)
        self.assertEqual(json.loads(sub.sent[0])["data"], 2)

    def test_client_publish_rules(self) -> None:
        """Browsers need a publish grant and a client_publish rule; default deny."""
        s, _ = self.session(grants(publish=(">",)))
        self.broker.client_publish(s, "chat.room1", {"text": "hi"})
        self.assertEqual(self.code(self.broker.client_publish, s, "chat.a.b", {}), "forbidden")
        self.assertEqual(self.code(self.broker.client_publish, s, "other", {}), "forbidden")
        t, _ = self.session(grants(publish=("open.a",)))
        self.clock.advance(10)
        self.assertEqual(self.code(self.broker.client_publish, t, "open.b", 1), "forbidden")
        self.assertEqual(self.code(self.broker.client_publish, t, "open.*", 1), "invalid_topic")

    def test_payload_checks_apply_to_everyone(self) -> None:
        """Schema, size and depth are checked for backends as for browsers."""
        s, _ = self.session(grants(publish=(">",)))
        self.assertEqual(
            self.code(self.broker.client_publish, s, "chat.room1", {"no": 1}), "invalid_payload"
        )
        self.assertEqual(self.code(self.broker.publish, "chat.room1", {"no": 1}), "invalid_payload")
        self.assertEqual(self.code(self.broker.publish, "x", "y" * 200), "invalid_payload")
        self.assertEqual(self.code(self.broker.publish, "x", [[[[[1]]]]]), "invalid_payload")
        self.assertEqual(self.code(self.broker.publish, "x.*", 1), "invalid_topic")

    def test_publish_rate(self) -> None:
        """A session may burst to twice its rate, then is rate_limited until refill."""
        s, _ = self.session(grants(publish=("open.>",)))
        for _ in range(4):
            self.broker.client_publish(s, "open.x", 1)
        self.assertEqual(self.code(self.broker.client_publish, s, "open.x", 1), "rate_limited")
        self.clock.advance(0.49)
        self.assertEqual(self.code(self.broker.client_publish, s, "open.x", 1), "rate_limited")
        self.clock.advance(0.01)
        self.broker.client_publish(s, "open.x", 1)

    def test_close_session_forgets_subscriptions(self) -> None:
        """A closed session receives nothing and leaves no index entries."""
        s, sub = self.session(grants(subscribe=(">",)))
        self.broker.subscribe(s, "a.*")
        self.broker.close_session(s)
        self.broker.close_session(s)
        self.broker.publish("a.b", 1)
        self.assertEqual(sub.sent, [])
        self.assertEqual(len(self.broker._index), 0)

    def test_broken_subscriber_does_not_stop_fanout(self) -> None:
        """One subscriber raising still lets the others receive."""

        class Broken(RecordingSubscriber):
            def send_prepared(self, prepared: Any) -> None:
                raise OSError("gone")

        bad = self.broker.open_session("bob", grants(subscribe=("a",)), "ip", Broken())
        good, sub = self.session(grants(subscribe=("a",)))
        self.broker.subscribe(bad, "a")
        self.broker.subscribe(good, "a")
        self.broker.publish("a", 1)
        self.assertEqual(len(sub.sent), 1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_message_ids_unique(self) -> None:
        """Each publish gets a new id."""
        ids = {self.successResultOf(self.broker.publish("a", i)).id for i in range(100)}
        self.assertEqual(len(ids), 100)


@implementer(IFanout)
class RecordingFanout:
    """A fan-out engine that records calls and answers with Deferreds the test fires."""

    def __init__(self) -> None:
        self.published: list[tuple[Publication, HistoryPolicy | None]] = []
        self.pending: list[Deferred[Position | None]] = []

    def start(self, receiver: IReceiver) -> None:
        self.receiver = receiver

    def watch(self, pattern: Pattern) -> Deferred[None]:
        return succeed(None)

    def unwatch(self, pattern: Pattern) -> None:
        pass

    def disconnect(self, user: str, message_id: str, ts: float) -> Deferred[None]:
        self.receiver.disconnect_local(user)
        return succeed(None)

    def publish(
        self, publication: Publication, history: HistoryPolicy | None
    ) -> Deferred[Position | None]:
        self.published.append((publication, history))
        d: Deferred[Position | None] = Deferred()
        self.pending.append(d)
        return d


class FanoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fanout = RecordingFanout()
        limits = Limits()
        self.broker = Broker(PayloadValidator(1000, 8, ()), limits, self.clock, fanout=self.fanout)

    def test_interfaces(self) -> None:
        """Both engines provide IFanout."""
        verifyObject(IFanout, LocalFanout())
        verifyObject(IFanout, self.fanout)

    def test_publish_waits_for_the_engine(self) -> None:
        """The id is returned once the engine took the message; its failure is ours."""
        d = self.broker.publish("news.a", {"k": 1})
        self.assertNoResult(d)
        [(publication, history)] = self.fanout.published
        self.assertEqual(
            (publication.topic, publication.body, history), ("news.a", '{"k":1}', None)
        )
        self.fanout.pending[0].callback(None)
        self.assertEqual(self.successResultOf(d).id, publication.id)
        d2 = self.broker.publish("news.a", 2)
        self.fanout.pending[1].errback(RequestError("unavailable", "engine down"))
        self.assertEqual(self.failureResultOf(d2, RequestError).value.code, "unavailable")

    def test_engine_delivers_through_broker(self) -> None:
        """Messages coming back from the engine reach local subscribers once."""
        sub = RecordingSubscriber()
        s = self.broker.open_session("a", grants(subscribe=(">",)), "ip", sub)
        self.broker.subscribe(s, "news.*")
        self.fanout.receiver.deliver(Publication("news.a", "n-1", 5.0, "[1]"))
        self.assertEqual(json.loads(sub.sent[0])["data"], [1])


class IdleTests(SynchronousTestCase):
    def test_idle_waits_for_accepted_publishes(self) -> None:
        """idle() fires only once every publish handed to the engine is answered."""
        fanout = RecordingFanout()
        broker = Broker(PayloadValidator(1000, 8, ()), Limits(), Clock(), fanout=fanout)
        self.successResultOf(broker.idle())
        first = broker.publish("a", 1)
        second = broker.publish("a", 2)
        idle = broker.idle()
        fanout.pending[0].callback(None)
        self.assertNoResult(idle)
        fanout.pending[1].errback(RequestError("unavailable", "down"))
        self.successResultOf(idle)
        self.successResultOf(first)
        self.failureResultOf(second, RequestError)


class RevocationTests(SynchronousTestCase):
    def test_disconnect_user_closes_only_that_user(self) -> None:
        """Revoking a user closes each of its sessions (and only its) and forgets them."""
        broker = Broker(PayloadValidator(1000, 8, ()), Limits(), Clock(), fanout=LocalFanout())
        g = grants(subscribe=(">",))
        alice = [RecordingSubscriber() for _ in range(2)]
        bob = RecordingSubscriber()
        for sub in alice:
            broker.subscribe(broker.open_session("alice", g, "ip", sub), "a")
        broker.subscribe(broker.open_session("bob", g, "ip", bob), "a")
        self.successResultOf(broker.disconnect_user("alice"))
        self.assertEqual([s.revoked for s in alice], [True, True])
        self.assertFalse(bob.revoked)
        self.assertEqual([s.user for s in broker.sessions.values()], ["bob"])
        self.successResultOf(broker.publish("a", 1))
        self.assertEqual((len(alice[0].sent), len(bob.sent)), (0, 1))
