"""Session lifetimes: one timer for all sessions, however many there are.

Each session has a deadline (its ``expires_at``) and, before it, a notice
time (SPEC section 9: about 60 seconds before, a quarter of the lifetime
if that is shorter). All of them sit in one heap; a single delayed call is
armed for the earliest, so idle sessions cost nothing until one is due, and
rescheduling (a refresh) pushes a new entry while the old one is skipped
when it surfaces.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable
from itertools import count
from typing import Any, Final, Generic, Protocol, TypeVar

#: The notice goes out this many seconds before expiry (less for short sessions).
NOTICE_SECONDS: Final = 60.0


class Scheduler(Protocol):
    """The part of ``IReactorTime`` used here: the reactor or a ``task.Clock``."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any) -> Any: ...


def notice_at(starts_at: float, expires_at: float) -> float:
    """When to send the ``expiring`` notice for a lifetime from ``starts_at``."""
    lead = min(NOTICE_SECONDS, (expires_at - starts_at) / 4)
    return expires_at - lead


K = TypeVar("K", bound=Hashable)

_NOTICE = 0
_EXPIRY = 1


class Lifetimes(Generic[K]):
    """Deadlines of many keys, with one delayed call armed for the earliest.

    ``on_notice(key, expires_at)`` runs at the notice time, ``on_expiry(key)``
    at ``expires_at``; `set` replaces a key's lifetime, `discard` forgets it.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        on_notice: Callable[[K, float], object],
        on_expiry: Callable[[K], object],
    ) -> None:
        self._scheduler = scheduler
        self._on_notice = on_notice
        self._on_expiry = on_expiry
        #: (when, tie-breaker, kind, key, generation)
        self._heap: list[tuple[float, int, int, K, int]] = []
        #: key -> (generation, expires_at) of its current lifetime
        self._current: dict[K, tuple[int, float]] = {}
        self._order = count()
        self._generations = count(1)
        self._armed: Any = None
        self._armed_for: float | None = None

    def __len__(self) -> int:
        return len(self._current)

    def expires_at(self, key: K) -> float | None:
        entry = self._current.get(key)
        return entry[1] if entry is not None else None

    def set(self, key: K, expires_at: float) -> None:
        """``key`` now expires at ``expires_at`` (a refresh replaces the old lifetime)."""
        now = self._scheduler.seconds()
        generation = next(self._generations)
        self._current[key] = (generation, expires_at)
        heapq.heappush(
            self._heap, (notice_at(now, expires_at), next(self._order), _NOTICE, key, generation)
        )
        heapq.heappush(self._heap, (expires_at, next(self._order), _EXPIRY, key, generation))
        self._arm()

    def discard(self, key: K) -> None:
        """Forget ``key``; its heap entries are skipped when they come up."""
        self._current.pop(key, None)
        # Entries of gone keys are dropped lazily; compact when they dominate.
        if len(self._heap) > 64 and len(self._heap) > 4 * len(self._current) + 64:
            self._heap = [e for e in self._heap if self._is_current(e)]
            heapq.heapify(self._heap)

    def _is_current(self, entry: tuple[float, int, int, K, int]) -> bool:
        current = self._current.get(entry[3])
        return current is not None and current[0] == entry[4]

    def _arm(self) -> None:
        heap = self._heap
        while heap and not self._is_current(heap[0]):
            heapq.heappop(heap)
        if not heap:
            self._disarm()
            return
        when = heap[0][0]
        if self._armed is not None and self._armed_for is not None and self._armed_for <= when:
            return
        self._disarm()
        delay = max(0.0, when - self._scheduler.seconds())
        self._armed = self._scheduler.callLater(delay, self._fire)
        self._armed_for = when

    def _disarm(self) -> None:
        armed, self._armed = self._armed, None
        self._armed_for = None
        if armed is not None and armed.active():
            armed.cancel()

    def _fire(self) -> None:
        self._armed = None
        self._armed_for = None
        now = self._scheduler.seconds()
        heap = self._heap
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if not self._is_current(entry):
                continue
            _, _, kind, key, _ = entry
            if kind == _NOTICE:
                self._on_notice(key, self._current[key][1])
            else:
                del self._current[key]
                self._on_expiry(key)
        self._arm()
