"""Consistent hashing: which of several Redis servers holds a topic's or a ticket's data."""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

#: Points per server on the ring: enough for an even spread over a few servers.
REPLICAS = 160


def point(key: bytes) -> int:
    """A key's place on the ring: 64 bits of BLAKE2b."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


class Ring(Generic[T]):
    """Places keys on ``members`` by consistent hashing of their names.

    Every node builds the same ring from the same configured servers (in any
    order), so all agree on where a key lives; adding a server moves only
    about 1/N of the keys. With one member everything maps to it.
    """

    def __init__(self, members: Sequence[tuple[str, T]]) -> None:
        if not members:
            raise ValueError("a ring needs at least one member")
        names = [name for name, _ in members]
        if len(set(names)) != len(names):
            raise ValueError("ring members must have distinct names")
        self.members: tuple[T, ...] = tuple(member for _, member in members)
        points = []
        for index, (name, _) in enumerate(members):
            for replica in range(REPLICAS):
                points.append((point(f"{name}#{replica}".encode()), index))
        points.sort()
        self._points = [p for p, _ in points]
        self._owners = [index for _, index in points]

    def index_for(self, key: bytes) -> int:
        """The index (in ``members``) of the member holding ``key``."""
        if len(self.members) == 1:
            return 0
        at = bisect.bisect_left(self._points, point(key))
        return self._owners[at % len(self._owners)]

    def for_key(self, key: bytes) -> T:
        return self.members[self.index_for(key)]

    def for_topic(self, topic: str) -> T:
        """Where a topic's history, presence and channels live."""
        return self.for_key(b"topic:" + topic.encode("ascii"))
