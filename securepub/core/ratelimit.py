"""Rate and connection limits: a token bucket per connection, a counter per IP."""

from __future__ import annotations

import math
from typing import Final, Protocol

__all__ = ["ConnectionCounter", "SecondsClock", "TokenBucket"]


class SecondsClock(Protocol):
    """The part of ``IReactorTime`` used here: the reactor or a ``task.Clock``.

    A Protocol rather than ``IReactorTime`` itself because mypy, without the
    mypy-zope plugin, misreads zope interface methods (no ``self``).
    """

    def seconds(self) -> float: ...


_EPSILON: Final = 1e-9
"""Slack for float rounding, so a token is there at its exact refill instant."""


class TokenBucket:
    """Allows ``rate`` events per second on average and ``burst`` at once.

    The bucket starts full and refills continuously from ``clock.seconds()``;
    ``take`` is called on every publish, so it allocates no objects. A clock
    that steps backwards refills nothing until it passes the last reading.
    """

    __slots__ = ("_burst", "_clock", "_last", "_rate", "_tokens")

    def __init__(self, clock: SecondsClock, rate: float, burst: float) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive number, got {rate!r}")
        if not (math.isfinite(burst) and burst > 0):
            raise ValueError(f"burst must be a positive number, got {burst!r}")
        self._clock = clock
        self._rate = float(rate)
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = clock.seconds()

    def take(self, n: float = 1.0) -> bool:
        """Take ``n`` tokens if the bucket holds them; ``False`` (taking none) if not."""
        now = self._clock.seconds()
        elapsed = now - self._last
        if elapsed > 0:
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
            self._last = now
        if self._tokens + _EPSILON >= n:
            self._tokens = max(0.0, self._tokens - n)
            return True
        return False

    @property
    def tokens(self) -> float:
        """Tokens held at the last ``take`` (for tests and metrics)."""
        return self._tokens

    def available(self) -> float:
        """Tokens held now, refill included, without taking any."""
        self.take(0.0)
        return self._tokens


class ConnectionCounter:
    """Counts open WebSocket connections per client IP, up to ``max_per_ip``.

    Keys are whatever the caller passes; pass normalized addresses (see
    ``securepub.core.tickets.normalize_ip``) so one client is counted once. An IP
    whose count drops to zero is forgotten, so memory follows the number of
    IPs with open connections, not the number ever seen.
    """

    def __init__(self, max_per_ip: int) -> None:
        if isinstance(max_per_ip, bool) or not isinstance(max_per_ip, int) or max_per_ip < 1:
            raise ValueError(f"max_per_ip must be a positive integer, got {max_per_ip!r}")
        self._max = max_per_ip
        self._counts: dict[str, int] = {}

    @property
    def max_per_ip(self) -> int:
        """The cap on open connections from one IP."""
        return self._max

    def acquire(self, ip: str) -> bool:
        """Count one more connection from ``ip``; ``False`` (counting nothing) at the cap."""
        current = self._counts.get(ip, 0)
        if current >= self._max:
            return False
        self._counts[ip] = current + 1
        return True

    def release(self, ip: str) -> None:
        """Count one connection from ``ip`` fewer; never below zero."""
        current = self._counts.get(ip, 0)
        if current <= 1:
            self._counts.pop(ip, None)
        else:
            self._counts[ip] = current - 1

    def count(self, ip: str) -> int:
        """Open connections counted for ``ip``."""
        return self._counts.get(ip, 0)

    def __len__(self) -> int:
        """Number of IPs with at least one open connection."""
        return len(self._counts)
