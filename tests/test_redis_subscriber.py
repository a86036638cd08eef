"""The lean pub/sub link: RESP reading, reference-counted and batched subscriptions."""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from securepub.engines.redis.link import RedisTarget, RedisUnavailable
from securepub.engines.redis.subscriber import (
    BATCH,
    LINGER,
    MAX_BULK,
    ProtocolViolation,
    RedisReplyError,
    RedisSubscriber,
    RespReader,
    SubscriberProtocol,
    command,
)


def reply(kind: str, channel: str, count: int) -> bytes:
    """A subscribe/unsubscribe confirmation as Redis writes it."""
    return b"*3\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n:%d\r\n" % (
        len(kind),
        kind.encode(),
        len(channel),
        channel.encode(),
        count,
    )


def message(channel: str, payload: str) -> bytes:
    return command("message", channel, payload)


class ReaderTests(SynchronousTestCase):
    def test_reads_in_pieces(self) -> None:
        """Replies split anywhere come out whole, in order."""
        data = b"+OK\r\n" + reply("subscribe", "a", 1) + message("a", "hé\nllo") + b":7\r\n"
        for cut in range(1, len(data)):
            reader = RespReader()
            out = reader.feed(data[:cut]) + reader.feed(data[cut:])
            self.assertEqual(
                out,
                [b"OK", [b"subscribe", b"a", 1], [b"message", b"a", "hé\nllo".encode()], 7],
            )

    def test_errors_and_nulls(self) -> None:
        """Error replies become RedisReplyError values; a null bulk is None."""
        [error, null] = RespReader().feed(b"-ERR no\r\n$-1\r\n")
        self.assertIsInstance(error, RedisReplyError)
        self.assertIsNone(null)

    def test_refuses_what_it_does_not_expect(self) -> None:
        """Nested arrays, oversized bulks, bad lengths and long header lines are violations."""
        for data in (
            b"*1\r\n*1\r\n:1\r\n",
            b"$%d\r\n" % (MAX_BULK + 1),
            b"$abc\r\n",
            b"*9\r\n",
            b"$3\r\nabcXY",
            b"?\r\n",
            b"+" + b"x" * 100,
        ):
            self.assertRaises(ProtocolViolation, RespReader().feed, data)


class Harness:
    def __init__(self, password: str | None = None) -> None:
        self.clock = MemoryReactorClock()
        self.messages: list[tuple[str, str]] = []
        self.connected = 0
        target = RedisTarget("127.0.0.1", 6379, password=password)
        self.link = RedisSubscriber(
            self.clock,
            target,
            "messages",
            on_message=lambda c, m: self.messages.append((c, m)),
            on_connected=self._up,
        )
        self.transport = StringTransport()

    def _up(self) -> None:
        self.connected += 1

    def connect(self, answer: bool = True) -> SubscriberProtocol:
        """A new connection; ``answer`` replies to its PING, which makes it ready."""
        protocol = SubscriberProtocol(self.link)
        self.transport = StringTransport()
        protocol.makeConnection(self.transport)
        self.link._prepare(protocol)
        self.protocol = protocol
        if answer:
            assert self.sent() == command("PING")
            protocol.dataReceived(b"+PONG\r\n")
        return protocol

    def sent(self) -> bytes:
        value: bytes = self.transport.value()
        self.transport.clear()
        return value

    def flush(self) -> None:
        self.clock.advance(0)


class SubscriberTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness()
        self.protocol = self.h.connect()

    def test_watch_fires_once_confirmed(self) -> None:
        """A watch waits for Redis's confirmation; messages then reach on_message."""
        d = self.h.link.watch("securepub:t:a")
        self.h.flush()
        self.assertEqual(self.h.sent(), command("SUBSCRIBE", "securepub:t:a"))
        self.assertNoResult(d)
        self.protocol.dataReceived(reply("subscribe", "securepub:t:a", 1))
        self.successResultOf(d)
        self.protocol.dataReceived(message("securepub:t:a", "hello"))
        self.assertEqual(self.h.messages, [("securepub:t:a", "hello")])

    def test_one_turn_is_one_batched_command(self) -> None:
        """Watches made in one turn go out as one SUBSCRIBE of up to BATCH channels."""
        channels = [f"securepub:t:c{n}" for n in range(BATCH + 5)]
        waits = [self.h.link.watch(c) for c in channels]
        self.h.flush()
        sent = self.h.sent()
        self.assertEqual(
            sent, command("SUBSCRIBE", *channels[:BATCH]) + command("SUBSCRIBE", *channels[BATCH:])
        )
        confirmations = b"".join(reply("subscribe", c, n) for n, c in enumerate(channels, 1))
        self.protocol.dataReceived(confirmations[: len(confirmations) // 2])
        self.assertNoResult(waits[0])  # its batch is not confirmed whole yet
        self.protocol.dataReceived(confirmations[len(confirmations) // 2 :])
        for d in waits:
            self.successResultOf(d)

    def test_reference_counted_with_a_linger(self) -> None:
        """A channel is subscribed once, and unsubscribed a linger after its last want."""
        first = self.h.link.watch("c")
        second = self.h.link.watch("c")
        self.h.flush()
        self.assertEqual(self.h.sent(), command("SUBSCRIBE", "c"))
        self.protocol.dataReceived(reply("subscribe", "c", 1))
        self.successResultOf(first)
        self.successResultOf(second)
        self.successResultOf(self.h.link.watch("c"))  # already active: at once
        for _ in range(3):
            self.h.link.unwatch("c")
        self.h.clock.advance(LINGER - 0.001)
        self.h.flush()
        self.assertEqual(self.h.sent(), b"")
        self.successResultOf(self.h.link.watch("c"))  # wanted again within the linger
        self.h.link.unwatch("c")
        self.h.clock.advance(LINGER)
        self.h.flush()
        self.assertEqual(self.h.sent(), command("UNSUBSCRIBE", "c"))
        self.protocol.dataReceived(reply("unsubscribe", "c", 0))
        self.assertEqual(self.h.link.channels(), 0)

    def test_reconnect_subscribes_everything_wanted_again(self) -> None:
        """After a lost link every wanted channel is subscribed again, in one batch."""
        for channel in ("a", "b"):
            self.h.link.watch(channel)
        self.h.flush()
        self.h.sent()
        self.protocol.dataReceived(reply("subscribe", "a", 1) + reply("subscribe", "b", 2))
        pending = self.h.link.watch("c")
        self.h.flush()
        self.protocol.connectionLost()
        self.failureResultOf(pending, RedisUnavailable)
        self.h.link.unwatch("c")  # the broker drops what failed
        self.failureResultOf(self.h.link.watch("d"), RedisUnavailable)
        self.h.link.unwatch("d")
        self.h.connect()
        self.h.flush()
        self.assertEqual(self.h.sent(), command("SUBSCRIBE", "a", "b"))
        self.assertEqual(self.h.connected, 2)

    def test_not_up_before_the_first_round_trip(self) -> None:
        """Until Redis answered the PING (over TLS: the handshake is done) it is not up."""
        h = Harness()
        h.connect(answer=False)
        self.assertEqual((h.connected, h.link.is_connected()), (0, False))

    def test_unexpected_replies_drop_the_link(self) -> None:
        """A confirmation nobody asked for, or garbage, aborts the connection."""
        self.protocol.dataReceived(reply("subscribe", "x", 1))
        self.assertTrue(self.h.transport.disconnecting or self.h.transport.disconnected)

    def test_auth_first_and_never_logged(self) -> None:
        """With a password the link authenticates before anything, and says nothing of it."""
        events: list[dict[str, Any]] = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        h = Harness(password="s3cret-password")
        protocol = h.connect(answer=False)
        self.assertEqual(h.sent(), command("AUTH", "s3cret-password") + command("PING"))
        protocol.dataReceived(b"+OK\r\n")
        self.assertEqual(h.connected, 0)
        protocol.dataReceived(b"+PONG\r\n")
        self.assertEqual(h.connected, 1)
        bad = Harness(password="wrong-password")
        refused = bad.connect(answer=False)
        refused.dataReceived(b"-WRONGPASS invalid username-password pair\r\n")
        self.assertTrue(bad.transport.disconnecting or bad.transport.disconnected)
        self.assertNotIn("wrong-password", repr(events))
        self.assertNotIn("s3cret-password", repr(events))
