"""Where the Redis engine keeps a topic's history, and checks on what Redis says of it."""

from __future__ import annotations

import math

from securepub.core.errors import RequestError
from securepub.core.history import (
    EPOCH_SHAPE,
    MAX_OFFSET,
    POSITION_MEMORY_SECONDS,
    HistoryPolicy,
    Position,
)

HISTORY_PREFIX = "securepub:history:"
META_PREFIX = "securepub:history-meta:"


def history_keys(topic: str) -> tuple[str, str]:
    """The topic's stream (its messages) and meta hash (epoch, latest offset).

    The topic is a hash tag (``{...}``), so both keys of a topic share one
    Redis Cluster slot; topics hold no brace.
    """
    return f"{HISTORY_PREFIX}{{{topic}}}", f"{META_PREFIX}{{{topic}}}"


def meta_ttl(policy: HistoryPolicy) -> int:
    """Seconds the meta hash outlives the last message: the stream's TTL plus a day."""
    return math.ceil(policy.ttl) + POSITION_MEMORY_SECONDS


def checked_position(offset: object, epoch: object) -> Position:
    """A position as Redis answered it, refused unless it has the right shape."""
    if (
        isinstance(offset, bool)
        or not isinstance(offset, int)
        or not 0 <= offset <= MAX_OFFSET
        or not isinstance(epoch, str)
        or EPOCH_SHAPE.fullmatch(epoch) is None
    ):
        raise RequestError("unavailable", "unexpected reply from the cluster engine")
    return Position(offset, epoch)
