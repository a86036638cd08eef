"""Session lifetimes: one timer for all, notices and expiries at their exact instants."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from securepub.core.lifetimes import Lifetimes, notice_at


class LifetimesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.notices: list[tuple[str, float]] = []
        self.expired: list[str] = []
        self.lifetimes: Lifetimes[str] = Lifetimes(
            self.clock, lambda key, at: self.notices.append((key, at)), self.expired.append
        )

    def test_notice_sixty_seconds_before_or_a_quarter(self) -> None:
        """The notice comes 60 s before expiry, or a quarter of a shorter lifetime before."""
        self.assertEqual(notice_at(0, 3600), 3540)
        self.assertEqual(notice_at(0, 240), 180)
        self.assertEqual(notice_at(0, 100), 75)

    def test_notice_and_expiry_at_their_instants(self) -> None:
        """Nothing just before the notice time, the notice at it; the same for expiry."""
        self.lifetimes.set("a", 1300.0)
        self.clock.advance(239.999)
        self.assertEqual(self.notices, [])
        self.clock.advance(0.001)
        self.assertEqual(self.notices, [("a", 1300.0)])
        self.clock.advance(59.999)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.001)
        self.assertEqual(self.expired, ["a"])
        self.assertEqual(len(self.lifetimes), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refresh_replaces_the_lifetime(self) -> None:
        """A new expiry before the old one is due: the old notice and expiry never come."""
        self.lifetimes.set("a", 1300.0)
        self.clock.advance(250)  # 1250: the notice for 1300 went out
        self.lifetimes.set("a", 1550.0)  # its notice is due at 1490
        self.clock.advance(60)  # 1310: the old expiry is skipped
        self.assertEqual((self.expired, len(self.notices)), ([], 1))
        self.clock.advance(179.999)
        self.assertEqual(len(self.notices), 1)
        self.clock.advance(0.001)
        self.assertEqual(self.notices[-1], ("a", 1550.0))
        self.clock.advance(60)
        self.assertEqual(self.expired, ["a"])

    def test_discard_forgets(self) -> None:
        """A closed session's deadlines never fire."""
        self.lifetimes.set("a", 1100.0)
        self.lifetimes.discard("a")
        self.clock.advance(200)
        self.assertEqual((self.notices, self.expired), ([], []))

    def test_ten_thousand_sessions_arm_one_timer(self) -> None:
        """However many sessions, one delayed call waits, for the earliest deadline."""
        for n in range(10_000):
            self.lifetimes.set(f"s{n}", 2000.0 + n)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), notice_at(1000, 2000))
        self.clock.advance(1000 + 9_999)
        self.assertEqual(len(self.expired), 10_000)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_discarded_entries_are_compacted(self) -> None:
        """Heap entries of gone sessions do not pile up."""
        for n in range(1000):
            self.lifetimes.set(f"s{n}", 5000.0)
            self.lifetimes.discard(f"s{n}")
        self.assertLess(len(self.lifetimes._heap), 200)

    def test_callbacks_may_reschedule(self) -> None:
        """A notice handler that refreshes its session (in-band refresh) is honoured."""

        def refresh(key: str, at: float) -> None:
            self.notices.append((key, at))
            if len(self.notices) == 1:
                lifetimes.set(key, at + 75)

        lifetimes: Lifetimes[str] = Lifetimes(self.clock, refresh, self.expired.append)
        lifetimes.set("a", 1100.0)  # notice at 1075, which moves the expiry to 1175
        self.clock.advance(100)
        self.assertEqual(self.expired, [])
        self.clock.advance(75)
        self.assertEqual(self.expired, ["a"])
        self.assertEqual(self.notices, [("a", 1100.0), ("a", 1175.0)])
