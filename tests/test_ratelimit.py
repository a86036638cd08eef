"""Tests for securepub.core.ratelimit: the publish token bucket and per-IP connection cap."""

from __future__ import annotations

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from securepub.core.ratelimit import ConnectionCounter, TokenBucket


class TokenBucketTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()

    def drain(self, bucket: TokenBucket) -> int:
        taken = 0
        while bucket.take():
            taken += 1
            assert taken < 10_000
        return taken

    def test_burst_then_refuse(self) -> None:
        """A fresh bucket allows exactly `burst` events at once, then refuses."""
        bucket = TokenBucket(self.clock, rate=50, burst=100)
        self.assertEqual(self.drain(bucket), 100)
        self.assertFalse(bucket.take())

    def test_refill_just_before_and_at_the_instant(self) -> None:
        """One token returns exactly 1/rate seconds after draining, not a millisecond before."""
        for rate in [50.0, 3.0, 0.5, 7.0]:
            clock = task.Clock()
            clock.advance(1234.5678)
            bucket = TokenBucket(clock, rate=rate, burst=2 * rate)
            self.drain(bucket)
            clock.advance(1 / rate - 0.001)
            self.assertFalse(bucket.take(), rate)
            clock.advance(0.001)
            self.assertTrue(bucket.take(), rate)
            self.assertFalse(bucket.take(), rate)

    def test_refill_is_capped_at_burst(self) -> None:
        """However long the bucket idles, it holds at most `burst` tokens."""
        bucket = TokenBucket(self.clock, rate=10, burst=5)
        self.drain(bucket)
        self.clock.advance(3600)
        self.assertEqual(self.drain(bucket), 5)

    def test_sustained_rate(self) -> None:
        """Past the burst, the bucket lets through `rate` events per second."""
        bucket = TokenBucket(self.clock, rate=10, burst=20)
        self.drain(bucket)
        allowed = 0
        for _ in range(1000):
            self.clock.advance(0.01)
            allowed += bucket.take()
        self.assertEqual(allowed, 100)

    def test_refused_take_takes_nothing(self) -> None:
        """A refused take of several tokens leaves the tokens in the bucket."""
        bucket = TokenBucket(self.clock, rate=1, burst=3)
        self.assertFalse(bucket.take(4))
        self.assertTrue(bucket.take(3))
        self.assertFalse(bucket.take(0.5))

    def test_clock_stepping_back_refills_nothing(self) -> None:
        """A clock that steps backwards neither refills nor breaks the bucket."""
        bucket = TokenBucket(self.clock, rate=1, burst=1)
        self.clock.advance(100)
        self.assertTrue(bucket.take())
        self.clock.rightNow = 50.0
        self.assertFalse(bucket.take())
        self.clock.rightNow = 100.5
        self.assertFalse(bucket.take())
        self.clock.rightNow = 101.0
        self.assertTrue(bucket.take())

    def test_bad_parameters(self) -> None:
        """Rate and burst must be positive finite numbers."""
        for rate, burst in [(0, 1), (-1, 1), (1, 0), (1, -1), (float("nan"), 1), (1, float("inf"))]:
            self.assertRaises(ValueError, TokenBucket, self.clock, rate, burst)


class ConnectionCounterTests(SynchronousTestCase):
    def test_caps_per_ip(self) -> None:
        """acquire succeeds up to max_per_ip for one IP, independently of other IPs."""
        counter = ConnectionCounter(max_per_ip=2)
        self.assertTrue(counter.acquire("192.0.2.1"))
        self.assertTrue(counter.acquire("192.0.2.1"))
        self.assertFalse(counter.acquire("192.0.2.1"))
        self.assertEqual(counter.count("192.0.2.1"), 2)
        self.assertTrue(counter.acquire("192.0.2.2"))
        self.assertEqual(len(counter), 2)

    def test_release_frees_a_slot(self) -> None:
        """Releasing one connection lets one more in."""
        counter = ConnectionCounter(max_per_ip=1)
        self.assertTrue(counter.acquire("2001:db8::1"))
        self.assertFalse(counter.acquire("2001:db8::1"))
        counter.release("2001:db8::1")
        self.assertTrue(counter.acquire("2001:db8::1"))

    def test_never_negative_and_memory_freed(self) -> None:
        """Counts never go below zero and an IP at zero is forgotten."""
        counter = ConnectionCounter(max_per_ip=3)
        counter.release("192.0.2.9")
        self.assertEqual(counter.count("192.0.2.9"), 0)
        self.assertEqual(len(counter), 0)
        counter.acquire("192.0.2.1")
        counter.acquire("192.0.2.1")
        counter.release("192.0.2.1")
        counter.release("192.0.2.1")
        counter.release("192.0.2.1")
        self.assertEqual(counter.count("192.0.2.1"), 0)
        self.assertEqual(len(counter), 0)
        for _ in range(3):
            self.assertTrue(counter.acquire("192.0.2.1"))
        self.assertFalse(counter.acquire("192.0.2.1"))

    def test_many_ips_come_and_go(self) -> None:
        """Memory follows open connections: 10000 IPs connecting and leaving leave nothing."""
        counter = ConnectionCounter(max_per_ip=5)
        for i in range(10_000):
            ip = f"10.{i // 256 % 256}.{i % 256}.1"
            counter.acquire(ip)
        self.assertEqual(len(counter), 10_000)
        for i in range(10_000):
            counter.release(f"10.{i // 256 % 256}.{i % 256}.1")
        self.assertEqual(len(counter), 0)
        self.assertEqual(counter.max_per_ip, 5)

    def test_bad_cap(self) -> None:
        """max_per_ip must be a positive integer."""
        for bad in [0, -1, 1.5, True]:
            self.assertRaises(ValueError, ConnectionCounter, bad)


class AvailableTests(SynchronousTestCase):
    def test_available_refills_without_taking(self) -> None:
        """available() reports the refilled level and takes nothing."""
        from twisted.internet.task import Clock

        from securepub.core.ratelimit import TokenBucket

        clock = Clock()
        bucket = TokenBucket(clock, rate=1, burst=2)
        self.assertTrue(bucket.take(2))
        self.assertEqual(bucket.available(), 0)
        clock.advance(1)
        self.assertEqual(bucket.available(), 1)
        self.assertEqual(bucket.available(), 1)
