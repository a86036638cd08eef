"""Which Redis pub/sub channels carry a topic's messages, and which a subscription needs.

A message of topic ``a.b.c`` is published on ``securepub:t:a.b.c`` (exact
subscribers), on the prefix channels ``securepub:p:a`` and ``securepub:p:a.b``
(patterns whose literal part is that prefix, such as ``a.*`` or ``a.b.>``)
and on ``securepub:p:`` (patterns that start with a wildcard). A node
subscribes only to the channels of what its sessions want and refilters
locally, so a node with no matching session never hears a message.
Redis pattern subscriptions (PSUBSCRIBE) are not used: Redis checks every
pattern on every publish, and that doubled its cost per publish with some
50 patterns (bench/redis_routing.py); a publish on a channel nobody holds
costs Redis about 2 µs.
"""

from __future__ import annotations

from typing import Final

from securepub.core.topics import Pattern

TOPIC_PREFIX: Final = "securepub:t:"
PATTERN_PREFIX: Final = "securepub:p:"
#: Disconnections and other messages for every node.
CONTROL: Final = "securepub:control"
_WILDCARDS: Final = frozenset({"*", ">"})


def topic_channel(topic: str) -> str:
    return TOPIC_PREFIX + topic


def channels_for_topic(topic: str) -> list[str]:
    """Every channel a message of ``topic`` is published on, exact channel first."""
    segments = topic.split(".")
    channels = [TOPIC_PREFIX + topic, PATTERN_PREFIX]
    for end in range(1, len(segments)):
        channels.append(PATTERN_PREFIX + ".".join(segments[:end]))
    return channels


def channel_for_pattern(pattern: Pattern) -> str:
    """The one channel that carries everything ``pattern`` can match.

    An exact topic has its own channel; a wildcard pattern takes the prefix
    channel of its literal segments before the first wildcard (every topic it
    matches has more segments than that prefix, so that channel has it).
    """
    if pattern.is_literal:
        return topic_channel(pattern.text)
    literal = []
    for segment in pattern.segments:
        if segment in _WILDCARDS:
            break
        literal.append(segment)
    return PATTERN_PREFIX + ".".join(literal)
