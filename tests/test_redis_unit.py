"""The Redis ticket store and fan-out on a fake link: commands sent, replies judged."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from securepub.core.engine import IReceiver
from securepub.core.errors import ConfigError, RequestError
from securepub.core.history import Publication
from securepub.core.tickets import ITicketStore, StoreUnavailable, Ticket, TicketRefused, token_key
from securepub.core.topics import Pattern
from securepub.engines.redis.channels import channel_for_pattern, channels_for_topic
from securepub.engines.redis.codec import Codec
from securepub.engines.redis.fanout import FANOUT_SCRIPT, RedisFanout
from securepub.engines.redis.link import IRedisLink, RedisLink, RedisTarget, RedisUnavailable
from securepub.engines.redis.ring import Ring
from securepub.engines.redis.shards import Shards
from securepub.engines.redis.signing import ClusterSigner
from securepub.engines.redis.tickets import (
    ISSUE,
    KEY_PREFIX,
    USED_PREFIX,
    USER_PREFIX,
    RedisTicketStore,
)
from securepub.ops.metrics import Metrics


@implementer(IRedisLink)
class FakeRedisLink:
    """Records commands; each answer is a Deferred the test fires by hand."""

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []
        self.pending: list[Deferred[Any]] = []
        self.connected = True

    def execute(self, *args: Any) -> Deferred[Any]:
        if not self.connected:
            return fail(RedisUnavailable("not connected"))
        self.commands.append(args)
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d

    def is_connected(self) -> bool:
        return self.connected


@implementer(IReceiver)
class Receiver:
    """Records what an engine hands the node, as (topic, id, ts, body) tuples."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, str, float, str]] = []
        self.disconnected: list[str] = []
        self.resyncs = 0

    def deliver(self, publication: Publication) -> None:
        p = publication
        self.delivered.append((p.topic, p.id, p.ts, p.body))

    def disconnect_local(self, user: str) -> int:
        self.disconnected.append(user)
        return 1

    def resync(self) -> None:
        self.resyncs += 1


def encode(
    topic: str, message_id: str, ts: float, body: str, signer: ClusterSigner | None = None
) -> str:
    return Codec(10_000, signer).encode(topic, message_id, ts, body)


def ticket(expires_at: float = 130.0, client_ip: str | None = "203.0.113.7") -> Ticket:
    return Ticket(
        user="alice",
        client_ip=client_ip,
        subscribe=(Pattern.parse("news.*"),),
        publish=(Pattern.parse("chat.>"),),
        expires_at=expires_at,
    )


class RedisTicketStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(100)
        self.redis = FakeRedisLink()
        self.store = RedisTicketStore(
            [("r", self.redis)], self.clock, randbytes=lambda n: b"\x01" * n
        )

    def issue(self, t: Ticket | None = None) -> str:
        d = self.store.issue(t or ticket())
        self.redis.pending[-1].callback(1)
        token: str = self.successResultOf(d)
        return token

    def test_interfaces(self) -> None:
        """The fake and the real link share IRedisLink; the store is an ITicketStore."""
        verifyObject(ITicketStore, self.store)
        verifyObject(IRedisLink, self.redis)
        link = RedisLink(MemoryReactorClock(), RedisTarget("127.0.0.1", 1), "commands")
        verifyObject(IRedisLink, link)
        self.assertFalse(link.is_connected())
        self.failureResultOf(link.execute("PING"), RedisUnavailable)

    def test_issue_stores_hash_with_ttl(self) -> None:
        """A ticket is stored NX under its token's hash, expiring with the ticket, and
        indexed under its user's hash for revocation."""
        token = self.issue()
        [(command, script, nkeys, key, user_key, value, ttl)] = self.redis.commands
        self.assertEqual((command, script, nkeys, ttl), ("EVALSHA", ISSUE.sha, 2, 30000))
        self.assertEqual(key, KEY_PREFIX + token_key(token).hex())
        self.assertTrue(user_key.startswith(USER_PREFIX))
        self.assertNotIn("alice", user_key)
        self.assertNotIn(token, repr(self.redis.commands))
        self.assertEqual(
            json.loads(value),
            {
                "user": "alice",
                "client_ip": "203.0.113.7",
                "subscribe": ["news.*"],
                "publish": ["chat.>"],
                "expires_at": 130.0,
                "session_ttl": None,
            },
        )

    def test_redeem_is_one_script(self) -> None:
        """Redemption is one EVAL on the ticket's key and its tombstone."""
        token = self.issue()
        value = self.redis.commands[0][5]
        d = self.store.redeem(token, "203.0.113.7")
        command, _, nkeys, key, used = self.redis.commands[1]
        self.assertEqual((command, nkeys), ("EVALSHA", 2))
        digest = token_key(token).hex()
        self.assertEqual((key, used), (KEY_PREFIX + digest, USED_PREFIX + digest))
        self.redis.pending[1].callback([1, value])
        got = self.successResultOf(d)
        self.assertEqual((got.user, [p.text for p in got.subscribe]), ("alice", ["news.*"]))

    def refusal(self, reply: Any, peer: str = "203.0.113.7", token: str | None = None) -> str:
        d = self.store.redeem(token or self.issue(), peer)
        self.redis.pending[-1].callback(reply)
        reason: str = self.failureResultOf(d, TicketRefused).value.reason
        return reason

    def test_refusals(self) -> None:
        """Unknown, replayed, expired, wrong-IP and corrupt entries are refused."""
        value = json.dumps(
            {
                "user": "a",
                "client_ip": "203.0.113.7",
                "subscribe": [],
                "publish": [],
                "expires_at": 130.0,
            }
        )
        self.assertEqual(self.refusal([0]), "unknown")
        self.assertEqual(self.refusal([2]), "already_redeemed")
        self.assertEqual(self.refusal([1, value], peer="198.51.100.1"), "wrong_ip")
        self.assertEqual(self.refusal([1, "{not json"]), "unknown")
        self.assertEqual(self.refusal([1, json.dumps({"user": "a"})]), "unknown")
        self.assertEqual(self.refusal([1, value.replace("[]", '["a..b"]', 1)]), "unknown")
        token = self.issue()
        self.clock.advance(30)
        self.assertEqual(self.refusal([1, value], token=token), "expired")

    def test_just_before_deadline(self) -> None:
        """A ticket redeemed just before its expiry is accepted."""
        value = json.dumps(
            {"user": "a", "client_ip": None, "subscribe": [], "publish": [], "expires_at": 130.0}
        )
        token = self.issue()
        self.clock.advance(29.999)
        d = self.store.redeem(token, "198.51.100.1")
        self.redis.pending[-1].callback([1, value])
        self.assertEqual(self.successResultOf(d).user, "a")

    def test_malformed_token_never_reaches_redis(self) -> None:
        """A token of the wrong shape is unknown without a round trip."""
        for token in ("", "x" * 43 + "!", "é" * 43, "a" * 10_000):
            self.failureResultOf(self.store.redeem(token, "203.0.113.7"), TicketRefused)
        self.assertEqual(self.redis.commands, [])

    def test_unavailable(self) -> None:
        """No connection, an error reply or a lost reply is StoreUnavailable, never a pass."""
        self.redis.connected = False
        self.failureResultOf(self.store.issue(ticket()), StoreUnavailable)
        self.failureResultOf(self.store.redeem("A" * 43, "203.0.113.7"), StoreUnavailable)
        self.redis.connected = True
        d = self.store.redeem("A" * 43, "203.0.113.7")
        self.redis.pending[-1].errback(RedisUnavailable("lost"))
        self.failureResultOf(d, StoreUnavailable)
        d = self.store.redeem("A" * 43, "203.0.113.7")
        self.redis.pending[-1].errback(ValueError("ERR script"))
        self.failureResultOf(d, StoreUnavailable)
        d = self.store.issue(ticket())
        self.redis.pending[-1].callback(0)  # NX refused
        self.failureResultOf(d, StoreUnavailable)


class FakeSubscriber:
    """Counts watches per channel, as the real pub/sub link's reference counts do."""

    def __init__(self) -> None:
        self.watched: Counter[str] = Counter()
        self.held: list[str] = []

    def watch(self, channel: str) -> Deferred[None]:
        self.watched[channel] += 1
        return succeed(None)

    def unwatch(self, channel: str) -> None:
        self.watched[channel] -= 1

    def hold(self, channel: str) -> None:
        self.held.append(channel)


def fake_shards(links: list[FakeRedisLink]) -> Shards:
    """Real shards (ring and all) whose links are fakes."""
    targets = [RedisTarget("127.0.0.1", 7000 + n) for n in range(len(links))]
    shards = Shards(MemoryReactorClock(), targets, Metrics(), lambda *a: None, lambda *a: None)
    for shard, link in zip(shards.all, links, strict=True):
        shard.commands = link  # type: ignore[assignment]
        shard.subscriber = FakeSubscriber()  # type: ignore[assignment]
    return shards


class RedisFanoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.redis = FakeRedisLink()
        self.clock = Clock()
        self.clock.advance(1000)
        self.shards = fake_shards([self.redis])
        self.shard = self.shards.all[0]
        self.fanout = RedisFanout(self.shards, Codec(100), clock=self.clock)
        self.receiver = Receiver()
        self.delivered = self.receiver.delivered
        self.disconnected = self.receiver.disconnected
        self.fanout.start(self.receiver)
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def receive(self, message: str, channel: str = "securepub:t:news.a") -> None:
        self.fanout.received(self.shard, channel, message)

    def test_publish_goes_to_the_topics_channels_in_one_script(self) -> None:
        """One script publishes on the exact channel, the root and each prefix channel."""
        d = self.fanout.publish(Publication("news.a", "n1-1", 5.5, '{"k":1}'), None)
        [(command, sha, nkeys, message, *channels)] = self.redis.commands
        self.assertEqual((command, sha, nkeys), ("EVALSHA", FANOUT_SCRIPT.sha, 0))
        self.assertEqual(message, '1\nnews.a\nn1-1\n5.5\n{"k":1}')
        self.assertEqual(channels, ["securepub:t:news.a", "securepub:p:", "securepub:p:news"])
        self.assertNoResult(d)
        self.redis.pending[0].callback(1)
        self.successResultOf(d)

    def test_the_control_channel_is_held_everywhere(self) -> None:
        """Every node holds the control channel on every server (disconnections)."""
        self.assertEqual(self.shard.subscriber.held, ["securepub:control"])  # type: ignore[attr-defined]

    def test_publish_unavailable(self) -> None:
        """While Redis is down a publish fails with 'unavailable' and nothing is sent."""
        self.redis.connected = False
        f = self.failureResultOf(
            self.fanout.publish(Publication("a", "i", 1.0, "1"), None), RequestError
        )
        self.assertEqual(f.value.code, "unavailable")

    def test_round_trip(self) -> None:
        """A message that arrives is delivered here as it was sent, once per id."""
        self.receive(encode("news.a", "n1-1", 5.5, '{"k":"a\\nb"}'))
        self.receive(encode("news.a", "n1-1", 5.5, '{"k":"a\\nb"}'), "securepub:p:news")
        self.assertEqual(self.delivered, [("news.a", "n1-1", 5.5, '{"k":"a\\nb"}')])
        self.receive(encode("news.a", "n1-2", 5.5, "1", SIGNER))
        self.assertEqual(len(self.delivered), 1)

    def test_untrusted_input_dropped(self) -> None:
        """Anything malformed arriving from Redis is dropped and logged, never delivered."""
        bad = [
            "garbage",
            "2\nnews.a\nid\n1.0\n1",
            "1\nnews.*\nid\n1.0\n1",
            "1\nnews.a\nbad id!\n1.0\n1",
            "1\nnews.a\nid-1\nnan\n1",
            "1\nnews.a\nid-2\nsoon\n1",
            "1\nnews.a\nid-3\n1.0\n<script>",
            '1\nnews.a\nid-4\n1.0\n{"a":1,"a":2}',
            "1\nnews.a\nid-5\n1.0\n" + '"' + "x" * 200 + '"',
            "H 5\n1\nnews.a\nid-6\n1.0\n1",
            "H 0 e\n1\nnews.a\nid-7\n1.0\n1",
            "H 5 bad epoch!\n1\nnews.a\nid-8\n1.0\n1",
        ]
        for message in bad:
            self.receive(message)
        self.assertEqual(self.delivered, [])
        dropped = [e for e in self.events if e.get("securepub_event") == "cluster_message_dropped"]
        self.assertEqual(len(dropped), len(bad))

    def test_watch_maps_subscriptions_to_channels(self) -> None:
        """An exact topic watches its own channel; a pattern its literal prefix's."""
        cases = {
            "news.a": "securepub:t:news.a",
            "news.*": "securepub:p:news",
            "user.alice.>": "securepub:p:user.alice",
            "a.*.c": "securepub:p:a",
            "*.x": "securepub:p:",
            ">": "securepub:p:",
        }
        for text, channel in cases.items():
            pattern = Pattern.parse(text)
            self.successResultOf(self.fanout.watch(pattern))
            self.assertEqual(self.shard.subscriber.watched[channel], 1, text)  # type: ignore[attr-defined]
            self.fanout.unwatch(pattern)
            self.assertEqual(self.shard.subscriber.watched[channel], 0, text)  # type: ignore[attr-defined]

    def test_prefix_channels_cover_every_match(self) -> None:
        """Each topic a pattern matches is published on the pattern's channel."""
        for pattern_text, topic in (
            ("news.*", "news.a"),
            ("news.>", "news.a.b"),
            ("user.alice.>", "user.alice.x.y"),
            ("*.x", "a.x"),
            (">", "a"),
            ("a.*.c", "a.b.c"),
        ):
            channel = channel_for_pattern(Pattern.parse(pattern_text))
            self.assertIn(channel, channels_for_topic(topic), (pattern_text, topic))


class ShardingTests(SynchronousTestCase):
    def test_ring_is_stable_and_spreads(self) -> None:
        """Every node places keys alike whatever the order; two servers share the keys."""
        a = Ring([("x", "X"), ("y", "Y")])
        b = Ring([("y", "Y"), ("x", "X")])
        keys = [f"topic.{n}".encode() for n in range(2000)]
        self.assertEqual([a.for_key(k) for k in keys], [b.for_key(k) for k in keys])
        share = sum(a.for_key(k) == "X" for k in keys) / len(keys)
        self.assertTrue(0.35 < share < 0.65, share)
        moved = Ring([("x", "X"), ("y", "Y"), ("z", "Z")])
        kept = sum(moved.for_key(k) == a.for_key(k) for k in keys) / len(keys)
        self.assertGreater(kept, 0.55)

    def test_topics_publish_on_their_own_server(self) -> None:
        """A topic's publishes go to the server the ring names, and only there."""
        links = [FakeRedisLink(), FakeRedisLink()]
        shards = fake_shards(links)
        fanout = RedisFanout(shards, Codec(100), clock=Clock())
        fanout.start(Receiver())
        for n in range(40):
            topic = f"user.u{n}.inbox"
            fanout.publish(Publication(topic, f"n-{n}", 1.0, "1"), None)
            home = shards.for_topic(topic).index
            self.assertEqual(links[home].commands[-1][4], f"securepub:t:{topic}")
        self.assertTrue(links[0].commands and links[1].commands)

    def test_patterns_watch_every_server_exact_topics_one(self) -> None:
        """A wildcard pattern needs its channel on every server; an exact topic on its own."""
        links = [FakeRedisLink(), FakeRedisLink()]
        shards = fake_shards(links)
        fanout = RedisFanout(shards, Codec(100), clock=Clock())
        fanout.watch(Pattern.parse("news.*"))
        fanout.watch(Pattern.parse("news.a"))
        watched = [s.subscriber.watched for s in shards.all]  # type: ignore[attr-defined]
        self.assertEqual([w["securepub:p:news"] for w in watched], [1, 1])
        self.assertEqual(sum(w["securepub:t:news.a"] for w in watched), 1)

    def test_tickets_are_drawn_again_when_their_server_is_down(self) -> None:
        """A new ticket avoids a server that is down; redemption goes to the ticket's server."""
        links = [FakeRedisLink(), FakeRedisLink()]
        links[0].connected = False
        store = RedisTicketStore([("x", links[0]), ("y", links[1])], Clock())
        for _ in range(10):
            d = store.issue(ticket(expires_at=10**9))
            links[1].pending[-1].callback(1)
            token = self.successResultOf(d)
            redeemed = store.redeem(token, "203.0.113.7")
            self.assertEqual(links[1].commands[-1][0], "EVALSHA")
            links[1].pending[-1].callback([0])
            self.failureResultOf(redeemed, TicketRefused)
        self.assertEqual(links[0].commands, [])

    def test_revocation_asks_every_server(self) -> None:
        """revoke_user runs on every server and sums what each revoked."""
        links = [FakeRedisLink(), FakeRedisLink()]
        store = RedisTicketStore([("x", links[0]), ("y", links[1])], Clock())
        d = store.revoke_user("alice")
        links[0].pending[0].callback(2)
        links[1].pending[0].callback(1)
        self.assertEqual(self.successResultOf(d), 3)
        d = store.revoke_user("alice")
        links[0].pending[1].callback(1)
        links[1].pending[1].errback(RedisUnavailable("down"))
        self.failureResultOf(d, StoreUnavailable)


class RedisTargetTests(SynchronousTestCase):
    def test_display_hides_credentials(self) -> None:
        """Neither repr nor display shows the password."""
        t = RedisTarget.parse("rediss://u:hunter2hunter2@cache:6390/3")
        self.assertEqual(t.display(), "rediss://cache:6390/3")
        self.assertNotIn("hunter2", repr(t))

    def test_bad_urls(self) -> None:
        """Malformed URLs are ConfigErrors naming 'redis'."""
        for url in ("", "redis:/x", "unix:///tmp/s", "redis://h:port", "redis://h/-1"):
            self.assertIn("redis", str(self.assertRaises(ConfigError, RedisTarget.parse, url)))

    def test_missing_ca(self) -> None:
        """An unreadable Redis CA is named when the endpoint is made."""
        t = RedisTarget.parse("rediss://h", ca="/nonexistent/ca.pem")
        self.assertIn(
            "redis_ca", str(self.assertRaises(ConfigError, t.endpoint, MemoryReactorClock()))
        )


SIGNER = ClusterSigner(b"k" * 32)


class SignedFanoutTests(SynchronousTestCase):
    """With a cluster secret, only fresh, correctly signed messages are delivered."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.redis = FakeRedisLink()
        self.shards = fake_shards([self.redis])
        self.fanout = RedisFanout(self.shards, Codec(100, SIGNER), clock=self.clock)
        self.receiver = Receiver()
        self.delivered = self.receiver.delivered
        self.fanout.start(self.receiver)

    def receive(self, message: str) -> None:
        self.fanout.received(self.shards.all[0], "securepub:t:news.a", message)

    def test_publish_is_signed(self) -> None:
        """What a node publishes carries an HMAC another node accepts."""
        self.fanout.publish(Publication("news.a", "n1-1", 1000.0, "[1]"), None)
        message = self.redis.commands[0][3]
        self.receive(message)
        self.assertEqual(self.delivered, [("news.a", "n1-1", 1000.0, "[1]")])
        self.assertTrue(message.startswith("2\n"))

    def test_forgeries_dropped(self) -> None:
        """Unsigned, wrongly keyed and tampered messages reach no one."""
        other = ClusterSigner(b"x" * 32)
        good = encode("news.a", "n1-1", 1000.0, "1", SIGNER)
        for message in (
            encode("news.a", "n1-2", 1000.0, "1"),
            encode("news.a", "n1-3", 1000.0, "1", other),
            good.replace("news.a", "news.b"),
            good.replace("\n1", "\n2")[:-1] + "2",
            "2\n\nnews.a\nn1-4\n1000.0\n1",
        ):
            self.receive(message)
        self.assertEqual(self.delivered, [])

    def test_replays_dropped(self) -> None:
        """A message seen before, an older number from a node, or a stale one is dropped."""
        first = encode("news.a", "n1-5", 1000.0, "1", SIGNER)
        self.receive(first)
        self.receive(first)
        self.receive(encode("news.a", "n1-4", 1000.0, "1", SIGNER))
        self.receive(encode("news.a", "n2-1", 1000.0 - 61, "1", SIGNER))
        self.receive(encode("news.a", "n2-2", 1000.0 + 61, "1", SIGNER))
        self.receive(encode("news.a", "n1-6", 1000.0 + 60, "1", SIGNER))
        self.assertEqual([d[1] for d in self.delivered], ["n1-5", "n1-6"])

    def test_numbers_grow_per_server_not_across_servers(self) -> None:
        """A node's messages through two servers may interleave: each server counts apart."""
        shards = fake_shards([FakeRedisLink(), FakeRedisLink()])
        fanout = RedisFanout(shards, Codec(100, SIGNER), clock=self.clock)
        receiver = Receiver()
        fanout.start(receiver)
        fanout.received(shards.all[1], "c", encode("news.a", "n1-7", 1000.0, "1", SIGNER))
        fanout.received(shards.all[0], "c", encode("news.b", "n1-6", 1000.0, "1", SIGNER))
        self.assertEqual([d[1] for d in receiver.delivered], ["n1-7", "n1-6"])

    def test_short_secret_refused(self) -> None:
        """A cluster secret under 32 bytes stops the start."""
        self.assertRaises(ConfigError, ClusterSigner, b"short")
        self.assertNotIn("k" * 32, repr(SIGNER))


class RevocationOverRedisTests(SynchronousTestCase):
    def test_revoke_user_is_one_script(self) -> None:
        """Revoking a user's tickets is one script over the user's set."""
        redis = FakeRedisLink()
        store = RedisTicketStore([("r", redis)], Clock())
        d = store.revoke_user("alice")
        [(command, _, nkeys, user_key)] = redis.commands
        self.assertEqual((command, nkeys), ("EVALSHA", 1))
        self.assertTrue(user_key.startswith(USER_PREFIX))
        redis.pending[0].callback(3)
        self.assertEqual(self.successResultOf(d), 3)

    def test_disconnect_travels_signed(self) -> None:
        """A disconnect crosses Redis as a signed control message; forgeries are dropped."""
        clock = Clock()
        clock.advance(1000)
        redis = FakeRedisLink()
        shards = fake_shards([redis])
        fanout = RedisFanout(shards, Codec(100, SIGNER), clock=clock)
        receiver = Receiver()
        fanout.start(receiver)
        fanout.disconnect("alice", "n1-1", 1000.0)
        [(command, channel, message)] = redis.commands
        self.assertEqual((command, channel), ("PUBLISH", "securepub:control"))
        fanout.received(shards.all[0], channel, message)
        fanout.received(shards.all[0], channel, encode("!disconnect", "n2-1", 1000.0, '"bob"'))
        self.assertEqual((receiver.disconnected, receiver.delivered), (["alice"], []))


class _QuietFactory:
    """What txredisapi's protocol asks of its factory."""

    isLazy = True

    def addConnection(self, _protocol: Any) -> None:
        pass

    def delConnection(self, _protocol: Any) -> None:
        pass

    def connectionError(self, _message: str) -> None:
        pass


class RepliesInOneTurnTests(SynchronousTestCase):
    def test_every_buffered_reply_is_read_at_once(self) -> None:
        """Replies that arrive together are all answered now, bulk strings or not:
        txredisapi alone answers the first and leaves the rest to later reactor turns."""
        from twisted.internet.testing import StringTransport

        from securepub.engines.redis.link import _RepliesInOneTurn

        protocol = _RepliesInOneTurn(charset="utf-8", convertNumbers=False)
        protocol.factory = _QuietFactory()
        protocol.makeConnection(StringTransport())
        answers: list[Any] = []
        for key in ("a", "b", "c", "d"):
            protocol.execute_command("GET", key).addCallback(answers.append)
        replies = b"$1\r\nx\r\n*2\r\n:5\r\n$2\r\nep\r\n$-1\r\n$3\r\nyz"
        protocol.dataReceived(replies)
        self.assertEqual(answers, ["x", [5, "ep"], None])
        protocol.dataReceived(b"w\r\n")  # a bulk string cut between reads
        self.assertEqual(answers, ["x", [5, "ep"], None, "yzw"])
