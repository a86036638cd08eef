"""Per-topic delivery order on one node for topics with history.

A *feed* exists for each history topic that has exact subscribers on this
node. It follows the topic's live stream (its *cursor*: the last offset handed
to this node's sessions) so that every session gets each offset once and in
order: a duplicate is dropped, a gap is filled from history before newer
messages go out (see `Broker`), and a session that is just starting is held
apart (`Catchup`) until the live stream has caught up with where it started.
"""

from __future__ import annotations

import enum
from typing import Any

from securepub.core.history import HistoryPolicy, Position, Publication


class Verdict(enum.Enum):
    """What to do with a live publication arriving on a feed."""

    SEND = "send"  # hand it to the topic's sessions
    DROP = "drop"  # this node already handed it on
    HOLD = "hold"  # a gap is being filled: it waits in the feed's queue
    GAP = "gap"  # it comes after a gap: fill the gap from history first


class Catchup:
    """One session starting on a feed.

    While its history read is in flight the live messages it would get are
    buffered (``buffered``); once the read is in, it has been sent everything up
    to ``last``, and from then on it only takes messages newer than that,
    until the feed's cursor reaches ``last`` and it becomes an ordinary
    subscriber (it then leaves the feed's ``starting`` table).
    """

    __slots__ = ("buffered", "last")

    def __init__(self) -> None:
        self.buffered: list[tuple[Publication, Any]] | None = []
        self.last: Position | None = None

    def offer(self, publication: Publication, prepared: Any) -> bool:
        """Whether to send this live message to the session now (else it is held or old)."""
        if self.buffered is not None:
            self.buffered.append((publication, prepared))
            return False
        last = self.last
        assert last is not None and publication.offset is not None
        if publication.epoch != last.epoch or publication.offset > last.offset:
            self.last = Position(publication.offset, publication.epoch or last.epoch)
            return True
        return False


class Feed:
    """The live stream of one history topic as this node hands it on."""

    __slots__ = (
        "cursor",
        "live",
        "policy",
        "queue",
        "refill",
        "starting",
        "subscribers",
        "topic",
    )

    def __init__(self, topic: str, policy: HistoryPolicy) -> None:
        self.topic = topic
        self.policy = policy
        #: The last position handed on (``live``), or read from history (a lower bound).
        self.cursor: Position | None = None
        self.live = False
        #: Sessions still catching up.
        self.starting: dict[Any, Catchup] = {}
        #: Exact subscriptions to the topic on this node.
        self.subscribers = 0
        #: While a gap is being filled: the live publications waiting behind it.
        self.queue: list[Publication] | None = None
        #: The engine's link dropped while a fill was in flight: fill once more after it.
        self.refill = False

    def accept(self, publication: Publication) -> Verdict:
        """Judge a live publication (one with an offset) against the cursor."""
        if self.queue is not None:
            self.queue.append(publication)
            return Verdict.HOLD
        cursor = self.cursor
        offset = publication.offset
        assert offset is not None
        if cursor is not None and publication.epoch == cursor.epoch:
            if offset <= cursor.offset:
                # Handed on already; with a cursor only read from history it is
                # an older message still on its way, and pattern subscribers want it.
                return Verdict.DROP if self.live else Verdict.SEND
            if offset > cursor.offset + 1:
                self.queue = [publication]
                return Verdict.GAP
        self.advance(publication)
        return Verdict.SEND

    def advance(self, publication: Publication) -> None:
        """The cursor moves to ``publication``, which is being handed on."""
        assert publication.offset is not None and publication.epoch is not None
        self.cursor = Position(publication.offset, publication.epoch)
        self.live = True

    def read(self, position: Position) -> None:
        """A session starts at ``position``: until the live stream is heard, the cursor
        is the earliest such start, so a gap after it is filled for every session."""
        cursor = self.cursor
        if cursor is None or (
            not self.live and cursor.epoch == position.epoch and position.offset < cursor.offset
        ):
            self.cursor = position
            self.live = False

    def caught_up(self, catchup: Catchup) -> bool:
        """Whether the live stream has reached where a starting session is."""
        last = catchup.last
        cursor = self.cursor
        if last is None or cursor is None or not self.live:
            return False
        return cursor.epoch != last.epoch or cursor.offset >= last.offset

    def promote(self) -> None:
        """Let every session the live stream has caught up with go the fast way."""
        done = [session for session, c in self.starting.items() if self.caught_up(c)]
        for session in done:
            del self.starting[session]
