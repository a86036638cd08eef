"""The embedded engine's history: a bounded ring per topic, trimmed by size, age and memory."""

from __future__ import annotations

import secrets
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from securepub.core.engine import IHistory
from securepub.core.history import (
    HISTORY_ENTRY_OVERHEAD,
    POSITION_MEMORY_SECONDS,
    HistoryPage,
    HistoryPolicy,
    Position,
    Publication,
)
from securepub.core.tickets import SecondsClock

_log = Logger()

#: At most this many such positions are remembered (the oldest are forgotten first).
MAX_IDLE_POSITIONS: Final = 100_000


def new_epoch(randbytes: Callable[[int], bytes] = secrets.token_bytes) -> str:
    """A fresh epoch: 64 random bits as hex (opaque to clients)."""
    return randbytes(8).hex()


class _Stream:
    """One topic's retained messages, oldest first, and its numbering."""

    __slots__ = ("bytes", "entries", "epoch", "policy", "top")

    def __init__(self, epoch: str, top: int, policy: HistoryPolicy) -> None:
        self.epoch = epoch
        self.top = top
        self.policy = policy
        self.entries: deque[Publication] = deque()
        self.bytes = 0


def _cost(publication: Publication) -> int:
    return len(publication.body) + len(publication.topic) + HISTORY_ENTRY_OVERHEAD


@implementer(IHistory)
class MemoryHistory:
    """History for one node, bounded three ways.

    Each topic keeps at most its rule's ``size`` messages, each for at most
    its ``ttl`` (`sweep` trims them, called on a schedule); and all topics
    together hold at most ``max_bytes``: past that, whole topics are evicted,
    least recently published first. A topic whose messages have all expired
    keeps only its position (epoch and latest offset) for a day, so a
    subscriber that missed nothing still recovers; an evicted topic keeps
    nothing, so its epoch changes and subscribers are told to refetch.
    Nothing here survives a restart: every epoch is new after one.
    """

    def __init__(
        self,
        clock: SecondsClock,
        max_bytes: int,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self._clock = clock
        self._max_bytes = max_bytes
        self._randbytes = randbytes
        #: topics with retained messages, least recently published first
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        #: topic -> (epoch, latest offset, forget at) for topics retaining nothing
        self._idle: OrderedDict[str, tuple[str, int, float]] = OrderedDict()
        self.bytes = 0
        self.messages = 0
        self.evicted = 0

    @property
    def topics(self) -> int:
        """Topics retaining at least one message."""
        return len(self._streams)

    # -- writing

    def append(self, publication: Publication, policy: HistoryPolicy) -> Publication:
        """Number ``publication``, keep it, and return it with its offset and epoch."""
        topic = publication.topic
        stream = self._streams.get(topic)
        if stream is None:
            idle = self._idle.pop(topic, None)
            if idle is None:
                stream = _Stream(new_epoch(self._randbytes), 0, policy)
            else:
                stream = _Stream(idle[0], idle[1], policy)
            self._streams[topic] = stream
        else:
            self._streams.move_to_end(topic)
            stream.policy = policy
        stream.top += 1
        numbered = replace(publication, offset=stream.top, epoch=stream.epoch)
        stream.entries.append(numbered)
        cost = _cost(numbered)
        stream.bytes += cost
        self.bytes += cost
        self.messages += 1
        while len(stream.entries) > policy.size:
            self._drop_oldest(stream)
        if self.bytes > self._max_bytes:
            self._evict(keep=topic)
        return numbered

    def _drop_oldest(self, stream: _Stream) -> None:
        cost = _cost(stream.entries.popleft())
        stream.bytes -= cost
        self.bytes -= cost
        self.messages -= 1

    def _evict(self, keep: str) -> None:
        """Drop whole topics, least recently published first, until under the bound."""
        evicted = 0
        while self.bytes > self._max_bytes and self._streams:
            topic, stream = next(iter(self._streams.items()))
            if topic == keep and len(self._streams) == 1:
                break
            if topic == keep:
                self._streams.move_to_end(topic)
                continue
            del self._streams[topic]
            self.bytes -= stream.bytes
            self.messages -= len(stream.entries)
            evicted += 1
        if evicted:
            self.evicted += evicted
            _log.warn(
                "history over limits.max_history_bytes: evicted {count} topic(s); "
                "their subscribers will have to refetch",
                count=evicted,
                securepub_event="history_evicted",
            )

    # -- reading

    def current(self, topic: str) -> Position:
        """The topic's position, remembering a fresh epoch for a topic never seen."""
        stream = self._streams.get(topic)
        if stream is not None:
            return Position(stream.top, stream.epoch)
        idle = self._idle.get(topic)
        now = self._clock.seconds()
        if idle is None:
            idle = (new_epoch(self._randbytes), 0, now + POSITION_MEMORY_SECONDS)
            self._remember_idle(topic, idle)
        else:
            # Asked for again: remember it for another while.
            self._idle[topic] = (idle[0], idle[1], now + POSITION_MEMORY_SECONDS)
            self._idle.move_to_end(topic)
        return Position(idle[1], idle[0])

    def page(self, topic: str, policy: HistoryPolicy, since: int, limit: int) -> HistoryPage:
        """Position and up to ``limit`` unexpired publications after ``since``."""
        position = self.current(topic)
        stream = self._streams.get(topic)
        if stream is None or since >= stream.top:
            return HistoryPage(position)
        oldest = self._clock.seconds() - policy.ttl
        entries = stream.entries
        # Offsets in a stream are consecutive: index straight to since + 1.
        first = entries[0].offset or 0
        start = max(0, since + 1 - first)
        found = []
        for index in range(start, min(len(entries), start + limit)):
            publication = entries[index]
            if publication.ts > oldest:
                found.append(publication)
            elif found:
                break  # not reached: entries are oldest first
        return HistoryPage(position, tuple(found))

    def position(self, topic: str, history: HistoryPolicy) -> Deferred[Position]:
        return succeed(self.current(topic))

    def read(
        self, topic: str, history: HistoryPolicy, since: int, limit: int
    ) -> Deferred[HistoryPage]:
        return succeed(self.page(topic, history, since, limit))

    # -- housekeeping

    def sweep(self) -> int:
        """Trim messages past their topic's age limit; forget old idle positions.

        Returns how many messages were dropped. Topics left empty keep only
        their position, in the idle table.
        """
        now = self._clock.seconds()
        dropped = 0
        emptied = []
        for topic, stream in self._streams.items():
            oldest = now - stream.policy.ttl
            entries = stream.entries
            while entries and entries[0].ts <= oldest:
                self._drop_oldest(stream)
                dropped += 1
            if not entries:
                emptied.append((topic, stream))
        for topic, stream in emptied:
            del self._streams[topic]
            self._remember_idle(topic, (stream.epoch, stream.top, now + POSITION_MEMORY_SECONDS))
        idle = self._idle
        while idle:
            topic, (_, _, forget_at) = next(iter(idle.items()))
            if forget_at > now:
                break
            del idle[topic]
        return dropped

    def _remember_idle(self, topic: str, entry: tuple[str, int, float]) -> None:
        self._idle[topic] = entry
        self._idle.move_to_end(topic)
        while len(self._idle) > MAX_IDLE_POSITIONS:
            self._idle.popitem(last=False)


class HistorySweeper(Service):
    """Runs `MemoryHistory.sweep` every ``interval`` seconds while the node runs."""

    def __init__(self, history: MemoryHistory, clock: Any, interval: float = 1.0) -> None:
        self._loop = LoopingCall(history.sweep)
        self._loop.clock = clock
        self._interval = interval

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
