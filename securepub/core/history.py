"""Per-topic history: positions, publications, and the merge that makes recovery exact.

A topic with history numbers its messages 1, 2, 3, ... (its *offsets*) within
an *epoch*, an opaque string that changes whenever the history may have been
lost. A subscriber resuming "since offset 41 of epoch E" gets 42..N from
history, then live messages; live messages that arrive while history is read
are held back and merged by offset, so each offset is delivered once and in
order however publishes race the subscribe (`merge`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

#: What a valid epoch looks like (it travels in frames and comes back from clients).
EPOCH_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]{1,32}")
MAX_HISTORY_SIZE: Final = 10_000
MIN_HISTORY_TTL, MAX_HISTORY_TTL, DEFAULT_HISTORY_TTL = 1, 86_400, 300
#: The largest offset a client may send back: what JavaScript numbers hold exactly.
MAX_OFFSET: Final = 2**53 - 1
#: How long an engine remembers a topic's position (epoch and latest offset)
#: after its last message expired, so a subscriber that missed nothing recovers.
POSITION_MEMORY_SECONDS: Final = 86_400
#: Bytes the embedded engine counts per retained message beyond its payload and
#: topic: the Python objects holding it, fragmentation included (bench/history.py
#: measured 646 bytes of RSS per 200-byte message beyond those, 218 traced).
HISTORY_ENTRY_OVERHEAD: Final = 640


@dataclass(frozen=True, slots=True)
class HistoryPolicy:
    """How much history a ``[[topics]]`` rule keeps for each topic it matches."""

    size: int
    ttl: float = DEFAULT_HISTORY_TTL


@dataclass(frozen=True, slots=True)
class Position:
    """Where a topic's history stands: its latest offset (0 when empty) and epoch."""

    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class Publication:
    """One message as the engines carry it; ``offset``/``epoch`` are set on history topics.

    ``body`` is the compact JSON text of the payload, validated once by the
    publishing node; ``id`` is the same on every node.
    """

    topic: str
    id: str
    ts: float
    body: str
    offset: int | None = None
    epoch: str | None = None


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """A read of a topic's history: its position then, and the messages after ``since``.

    ``publications`` are in offset order, each within the history's age limit;
    ``position`` is the latest offset at the moment of the read.
    """

    position: Position
    publications: tuple[Publication, ...] = ()


@dataclass(frozen=True, slots=True)
class Subscribed:
    """How a subscription started: its position, and whether ``since`` was honoured.

    ``recovered`` is None when no ``since`` was asked for, and ``position`` is
    None on a topic without history.
    """

    position: Position | None = None
    recovered: bool | None = None


def continuous(since: int, publications: Sequence[Publication], top: int) -> bool:
    """Whether ``publications`` are exactly offsets ``since+1 .. top``, none missing."""
    if since > top:
        return False
    if len(publications) != top - since:
        return False
    expected = since + 1
    for publication in publications:
        if publication.offset != expected:
            return False
        expected += 1
    return True


def merge(
    since: Position | None,
    page: HistoryPage,
    buffered: Iterable[Publication],
) -> tuple[Subscribed, list[Publication]]:
    """Start a subscription from a history read and the live messages held meanwhile.

    ``page`` was read after the subscription began to receive live messages,
    so every message is in ``page`` (offset <= its position), in ``buffered``,
    or in both. Returns how the subscription starts and what to send, in order:
    the missed messages when ``since`` can be honoured (same epoch, history
    reaching back to ``since + 1``), then the buffered live messages newer
    than the read. A live message of another epoch (the history was lost
    after the read) is passed on too: the subscriber sees the epoch change.
    """
    position = page.position
    out: list[Publication] = []
    recovered: bool | None = None
    if since is not None:
        recovered = since.epoch == position.epoch and continuous(
            since.offset, page.publications, position.offset
        )
        if recovered:
            out.extend(page.publications)
    last = position.offset
    epoch = position.epoch
    for publication in buffered:
        if publication.offset is None:
            continue
        if publication.epoch != epoch:
            epoch = publication.epoch or epoch
            last = publication.offset
            out.append(publication)
        elif publication.offset > last:
            last = publication.offset
            out.append(publication)
    return Subscribed(position=position, recovered=recovered), out
