"""Message ids unique across a cluster, the same on every node."""

from __future__ import annotations

import secrets
from itertools import count


class MessageIds:
    """``<node>-<n>``: 48 random bits naming this node, then a counter that only grows.

    Receiving nodes rely on the counter growing (signed traffic is checked for
    replays by it), so everything a node sends through the cluster takes its
    id from this one object.
    """

    __slots__ = ("_numbers", "node")

    def __init__(self, node: str | None = None) -> None:
        self.node = node or secrets.token_hex(6)
        self._numbers = count(1)

    def next(self) -> str:
        return f"{self.node}-{next(self._numbers)}"
