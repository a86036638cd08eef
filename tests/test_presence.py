"""Presence (SPEC section 10) with the embedded engine: counts, join and leave, authorization."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from securepub.broker.broker import Broker
from securepub.broker.sessions import Grants, RecordingSubscriber, Session
from securepub.core.apikeys import ApiKeys
from securepub.core.engine import IPresence
from securepub.core.errors import RequestError
from securepub.core.limits import Limits
from securepub.core.topics import Pattern
from securepub.core.validation import PayloadValidator, TopicRule
from securepub.engines.memory.fanout import LocalFanout
from securepub.engines.memory.presence import MemoryPresence
from securepub.server.api import PresenceResource
from securepub.server.site import Root, SecurePubSite
from tests.test_api import KEY, Response
from tests.test_protocol import Harness

RULES = [
    TopicRule(Pattern.parse("room.*"), presence=True, join_leave=True),
    TopicRule(Pattern.parse("lobby.*"), presence=True),
]


def grants(*patterns: str) -> Grants:
    return Grants(subscribe=tuple(Pattern.parse(p) for p in patterns))


class PresenceBrokerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.presence = MemoryPresence()
        self.broker = Broker(
            PayloadValidator(1000, 8, RULES),
            Limits(),
            Clock(),
            fanout=LocalFanout(),
            presence=self.presence,
        )

    def session(self, user: str, *patterns: str) -> tuple[Session, RecordingSubscriber]:
        sub = RecordingSubscriber()
        return self.broker.open_session(user, grants(*patterns or (">",)), "ip", sub), sub

    def users(self, topic: str) -> dict[str, int]:
        answer: dict[str, int] = self.successResultOf(self.broker.read_presence(topic))
        return answer

    def frames(self, sub: RecordingSubscriber) -> list[dict[str, Any]]:
        return [json.loads(f) for f in sub.sent]

    def test_interface(self) -> None:
        """The embedded engine fully provides IPresence."""
        verifyObject(IPresence, self.presence)

    def test_counts_sessions_per_user(self) -> None:
        """user -> open sessions subscribed to that exact topic; patterns do not count."""
        a1, _ = self.session("alice")
        a2, _ = self.session("alice")
        b, _ = self.session("bob")
        for s in (a1, a2, b):
            self.broker.subscribe(s, "room.1")
        pattern_only, _ = self.session("carol")
        self.broker.subscribe(pattern_only, "room.*")
        self.assertEqual(self.users("room.1"), {"alice": 2, "bob": 1})
        self.broker.unsubscribe(a1, "room.1")
        self.broker.close_session(b)
        self.assertEqual(self.users("room.1"), {"alice": 1})
        self.broker.close_session(a2)
        self.assertEqual(self.users("room.1"), {})
        self.assertEqual(self.presence.topics, 0)

    def test_join_on_first_session_leave_on_last(self) -> None:
        """join when a user's first session subscribes, leave when the last one goes."""
        watcher, seen = self.session("watcher")
        self.broker.subscribe(watcher, "room.*")
        a1, _ = self.session("alice")
        a2, _ = self.session("alice")
        self.broker.subscribe(a1, "room.1")
        self.broker.subscribe(a2, "room.1")
        self.broker.unsubscribe(a1, "room.1")
        self.assertEqual(self.frames(seen), [{"op": "join", "topic": "room.1", "user": "alice"}])
        self.broker.close_session(a2)
        self.assertEqual(self.frames(seen)[-1], {"op": "leave", "topic": "room.1", "user": "alice"})

    def test_no_join_leave_without_the_rule_flag(self) -> None:
        """presence = true alone counts, but announces nothing."""
        watcher, seen = self.session("watcher")
        self.broker.subscribe(watcher, "lobby.*")
        alice, _ = self.session("alice")
        self.broker.subscribe(alice, "lobby.1")
        self.assertEqual(self.users("lobby.1"), {"alice": 1})
        self.broker.close_session(alice)
        self.assertEqual(seen.sent, [])

    def test_presence_is_authorized_like_a_subscribe(self) -> None:
        """A session that may not subscribe to the topic gets forbidden."""
        outsider, _ = self.session("eve", "lobby.*")
        error = self.assertRaises(RequestError, self.broker.presence, outsider, "room.1")
        self.assertEqual(error.code, "forbidden")
        member, _ = self.session("ann", "room.*")
        self.assertEqual(self.successResultOf(self.broker.presence(member, "room.1")), {})

    def test_topics_without_presence_are_bad_requests(self) -> None:
        """Presence on a pattern is invalid_topic; on a topic without the rule, bad_request."""
        member, _ = self.session("ann")
        for topic, code in (("room.*", "invalid_topic"), ("other.topic", "bad_request")):
            error = self.assertRaises(RequestError, self.broker.presence, member, topic)
            self.assertEqual(error.code, code)

    def test_refresh_that_narrows_grants_leaves(self) -> None:
        """A subscription ended by a refresh counts out (and announces the leave)."""
        watcher, seen = self.session("watcher")
        self.broker.subscribe(watcher, "room.*")
        alice, _ = self.session("alice")
        self.broker.subscribe(alice, "room.1")
        self.broker.refresh(alice, grants("lobby.*"), 99_999.0)
        self.assertEqual(self.users("room.1"), {})
        self.assertEqual(self.frames(seen)[-1]["op"], "leave")


class PresenceFrameTests(SynchronousTestCase):
    def test_presence_op_over_the_protocol(self) -> None:
        """{"op": "presence"} answers the users map with the request's id and topic."""
        h = Harness(self, Limits(max_errors=50, max_connections_per_ip=5), rules=RULES)
        alice = h.open(subscribe=("room.*",))
        alice.messages()
        alice.send({"op": "subscribe", "id": 1, "topic": "room.7"})
        alice.send({"op": "presence", "id": 2, "topic": "room.7"})
        frames = alice.messages()
        self.assertIn({"op": "join", "topic": "room.7", "user": "alice"}, frames)
        self.assertIn({"op": "presence", "id": 2, "topic": "room.7", "users": {"alice": 1}}, frames)
        outsider = h.open(user="eve", subscribe=("lobby.*",))
        outsider.messages()
        outsider.send({"op": "presence", "id": 3, "topic": "room.7"})
        self.assertEqual(outsider.messages()[0]["code"], "forbidden")


class PresenceApiTests(SynchronousTestCase):
    def test_get_presence(self) -> None:
        """GET /v1/presence?topic=T answers {"users": {...}}; bad topics are 400."""
        clock = Clock()
        presence = MemoryPresence()
        broker = Broker(
            PayloadValidator(1000, 8, RULES),
            Limits(),
            clock,
            fanout=LocalFanout(),
            presence=presence,
        )
        s = broker.open_session("alice", grants(">"), "ip", RecordingSubscriber())
        broker.subscribe(s, "room.1")
        site = SecurePubSite(
            Root({b"v1/presence": PresenceResource(ApiKeys([KEY.encode()]), clock, broker)}),
            max_body_bytes=1000,
            reactor=clock,
        )

        def get(path: str) -> Response:
            channel = site.buildProtocol(IPv4Address("TCP", "192.0.2.5", 4000))
            transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.5", 4000))
            channel.makeConnection(transport)
            channel.dataReceived(
                f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                f"Authorization: Bearer {KEY}\r\n\r\n".encode()
            )
            return Response(transport.value())

        ok = get("/v1/presence?topic=room.1")
        self.assertEqual((ok.status, ok.json()), (200, {"users": {"alice": 1}}))
        for path in ("/v1/presence", "/v1/presence?topic=room.*", "/v1/presence?topic=x.y"):
            self.assertEqual(get(path).status, 400, path)
