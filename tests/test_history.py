"""History: the merge that makes recovery exact, and the embedded engine's bounded rings."""

from __future__ import annotations

from itertools import count

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from securepub.core.history import (
    HISTORY_ENTRY_OVERHEAD,
    HistoryPage,
    HistoryPolicy,
    Position,
    Publication,
    continuous,
    merge,
)
from securepub.engines.memory.history import (
    MAX_IDLE_POSITIONS,
    POSITION_MEMORY_SECONDS,
    HistorySweeper,
    MemoryHistory,
)


def pub(offset: int, epoch: str = "E", topic: str = "news.a", ts: float = 0.0) -> Publication:
    return Publication(topic, f"n-{offset}", ts, str(offset), offset, epoch)


def offsets(publications: list[Publication]) -> list[int | None]:
    return [p.offset for p in publications]


class MergeTests(SynchronousTestCase):
    def test_plain_subscribe_starts_after_the_read(self) -> None:
        """Without since: the position of the read, then only buffered messages newer than it."""
        page = HistoryPage(Position(5, "E"))
        subscribed, out = merge(None, page, [pub(4), pub(5), pub(6), pub(7)])
        self.assertEqual(subscribed.position, Position(5, "E"))
        self.assertIsNone(subscribed.recovered)
        self.assertEqual(offsets(out), [6, 7])

    def test_recovery_sends_missed_then_newer_live(self) -> None:
        """Same epoch, history back to since+1: missed ones, then live ones, each once."""
        page = HistoryPage(Position(5, "E"), (pub(3), pub(4), pub(5)))
        subscribed, out = merge(Position(2, "E"), page, [pub(5), pub(6)])
        self.assertTrue(subscribed.recovered)
        self.assertEqual(offsets(out), [3, 4, 5, 6])

    def test_nothing_missed_is_recovered(self) -> None:
        """since equal to the latest offset: recovered, nothing to send."""
        subscribed, out = merge(Position(5, "E"), HistoryPage(Position(5, "E")), [])
        self.assertTrue(subscribed.recovered)
        self.assertEqual(out, [])

    def test_refusals_send_no_old_message(self) -> None:
        """Another epoch, a trimmed history, or a since from the future: not recovered."""
        cases = [
            (Position(2, "OLD"), HistoryPage(Position(5, "E"), (pub(3), pub(4), pub(5)))),
            (Position(1, "E"), HistoryPage(Position(5, "E"), (pub(3), pub(4), pub(5)))),
            (Position(9, "E"), HistoryPage(Position(5, "E"))),
            (Position(2, "E"), HistoryPage(Position(5, "E"), (pub(3), pub(5)))),
        ]
        for since, page in cases:
            subscribed, out = merge(since, page, [pub(6)])
            self.assertFalse(subscribed.recovered, since)
            self.assertEqual(offsets(out), [6])

    def test_live_epoch_change_is_passed_on(self) -> None:
        """A buffered message of a new epoch (history lost after the read) still goes out."""
        _, out = merge(None, HistoryPage(Position(5, "E")), [pub(6), pub(1, "F")])
        self.assertEqual([(p.offset, p.epoch) for p in out], [(6, "E"), (1, "F")])

    def test_continuous(self) -> None:
        """Exactly since+1..top, in order, none missing."""
        self.assertTrue(continuous(2, [pub(3), pub(4)], 4))
        self.assertTrue(continuous(4, [], 4))
        self.assertFalse(continuous(2, [pub(3)], 4))
        self.assertFalse(continuous(2, [pub(4), pub(3)], 4))
        self.assertFalse(continuous(5, [], 4))


class MemoryHistoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.numbers = count(1)
        self.history = MemoryHistory(self.clock, max_bytes=10**9)
        self.policy = HistoryPolicy(size=3, ttl=10)

    def publish(self, topic: str = "news.a", policy: HistoryPolicy | None = None) -> Publication:
        raw = Publication(topic, f"n-{next(self.numbers)}", self.clock.seconds(), '"x"')
        return self.history.append(raw, policy or self.policy)

    def page(self, since: int = 0, topic: str = "news.a", limit: int = 100) -> HistoryPage:
        return self.history.page(topic, self.policy, since, limit)

    def test_offsets_count_from_one_in_one_epoch(self) -> None:
        """Offsets 1, 2, 3 per topic, one epoch per topic, independent topics."""
        a = [self.publish() for _ in range(3)]
        b = self.publish("news.b")
        self.assertEqual(offsets(a), [1, 2, 3])
        self.assertEqual(len({p.epoch for p in a}), 1)
        self.assertEqual(b.offset, 1)
        self.assertNotEqual(b.epoch, a[0].epoch)

    def test_trimmed_to_size(self) -> None:
        """At most history_size messages stay; the position keeps counting."""
        for _ in range(5):
            self.publish()
        page = self.page()
        self.assertEqual(page.position.offset, 5)
        self.assertEqual(offsets(list(page.publications)), [3, 4, 5])
        self.assertEqual(self.history.messages, 3)

    def test_trimmed_by_age_on_the_sweep(self) -> None:
        """A message stays history_ttl seconds: there just before, gone at the deadline."""
        self.publish()
        self.clock.advance(5)
        self.publish()
        self.clock.advance(4.999)
        self.history.sweep()
        self.assertEqual(offsets(list(self.page().publications)), [1, 2])
        self.clock.advance(0.001)
        self.history.sweep()
        self.assertEqual(offsets(list(self.page().publications)), [2])
        self.clock.advance(5)
        self.assertEqual(self.history.sweep(), 1)
        self.assertEqual(self.history.messages, 0)
        self.assertEqual(self.history.topics, 0)

    def test_reads_leave_out_expired_messages_before_the_sweep(self) -> None:
        """A read never returns a message past its age, swept or not."""
        self.publish()
        self.clock.advance(10)
        self.assertEqual(self.page().publications, ())

    def test_expired_topic_costs_no_ring_but_keeps_its_position(self) -> None:
        """Once all its messages expired a topic holds no ring; a later one continues it."""
        first = self.publish()
        self.clock.advance(11)
        self.history.sweep()
        self.assertEqual(self.history.topics, 0)
        self.assertEqual(self.page().position, Position(1, first.epoch or ""))
        later = self.publish()
        self.assertEqual((later.offset, later.epoch), (2, first.epoch))

    def test_forgotten_positions_start_a_new_epoch(self) -> None:
        """After a day without messages or reads, a topic starts over in a new epoch."""
        first = self.publish()
        self.clock.advance(11)
        self.history.sweep()
        self.clock.advance(POSITION_MEMORY_SECONDS)
        self.history.sweep()
        again = self.publish()
        self.assertEqual(again.offset, 1)
        self.assertNotEqual(again.epoch, first.epoch)

    def test_unknown_topic_gets_a_stable_epoch(self) -> None:
        """A subscriber's first position (0, E) is the epoch the first message gets."""
        position = self.history.current("news.new")
        self.assertEqual(position.offset, 0)
        self.assertEqual(self.publish("news.new").epoch, position.epoch)

    def test_idle_positions_are_bounded(self) -> None:
        """Remembered positions of empty topics are capped (oldest forgotten first)."""
        for n in range(MAX_IDLE_POSITIONS + 5):
            self.history.current(f"t.{n}")
        self.assertEqual(len(self.history._idle), MAX_IDLE_POSITIONS)
        self.assertNotIn("t.0", self.history._idle)

    def test_memory_bound_evicts_least_recently_published(self) -> None:
        """Past max_history_bytes whole topics go, oldest publish first, with their epoch."""
        cost = len('"x"') + len("t.a") + HISTORY_ENTRY_OVERHEAD
        history = MemoryHistory(self.clock, max_bytes=cost * 4)
        policy = HistoryPolicy(size=10, ttl=100)

        def append(topic: str) -> Publication:
            return history.append(Publication(topic, "n-1", 1000.0, '"x"'), policy)

        a = append("t.a")
        append("t.b")
        append("t.a")
        append("t.c")
        self.assertEqual(history.bytes, cost * 4)
        append("t.c")  # over the bound: t.b published least recently goes
        self.assertEqual(history.evicted, 1)
        self.assertEqual(history.bytes, cost * 4)
        self.assertEqual(history.page("t.b", policy, 0, 10).publications, ())
        self.assertNotEqual(history.current("t.b").epoch, "")
        self.assertEqual(history.current("t.a").epoch, a.epoch)
        self.assertEqual(len(history.page("t.a", policy, 0, 10).publications), 2)

    def test_page_since_and_limit(self) -> None:
        """A page starts right after since and holds at most limit messages."""
        policy = HistoryPolicy(size=100, ttl=100)
        for _ in range(10):
            self.publish(policy=policy)
        page = self.history.page("news.a", policy, 4, 3)
        self.assertEqual(offsets(list(page.publications)), [5, 6, 7])
        self.assertEqual(page.position.offset, 10)
        self.assertEqual(self.history.page("news.a", policy, 10, 3).publications, ())

    def test_restart_means_new_epochs(self) -> None:
        """Another engine (a restarted node) numbers the same topic in another epoch."""
        first = self.publish()
        other = MemoryHistory(self.clock, max_bytes=10**9)
        self.assertNotEqual(other.current("news.a").epoch, first.epoch)

    def test_sweeper_runs_on_the_clock(self) -> None:
        """The sweeper service sweeps every interval while it runs, and stops with it."""
        self.publish()
        sweeper = HistorySweeper(self.history, self.clock, interval=1.0)
        sweeper.startService()
        self.clock.advance(10)
        self.assertEqual(self.history.messages, 0)
        sweeper.stopService()
        self.publish()
        self.clock.advance(20)
        self.assertEqual(self.history.messages, 1)
