"""Topic and pattern grammar, matching, coverage and a subscription index (SPEC section 5)."""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from securepub.core.errors import RequestError

__all__ = [
    "MAX_TOPIC_BYTES",
    "MAX_TOPIC_SEGMENTS",
    "Pattern",
    "SubscriptionIndex",
    "TopicError",
    "covered_by_any",
    "first_match",
    "parse_patterns",
    "validate_topic",
]

MAX_TOPIC_BYTES = 255
MAX_TOPIC_SEGMENTS = 8

_SEGMENT = r"[A-Za-z0-9_-]+"
_SEGMENT_RE = re.compile(_SEGMENT)
# Only ASCII is admitted, so a string's length in characters is its length in bytes.
_TOPIC_RE = re.compile(rf"{_SEGMENT}(?:\.{_SEGMENT}){{0,{MAX_TOPIC_SEGMENTS - 1}}}")
_PATTERN_SEGMENT = rf"(?:{_SEGMENT}|\*)"
_PATTERN_RE = re.compile(
    rf"(?:{_PATTERN_SEGMENT}\.){{0,{MAX_TOPIC_SEGMENTS - 1}}}(?:{_PATTERN_SEGMENT}|>)"
)

_STAR = "*"
_TAIL = ">"
_QUOTE_CHARS = 64


class TopicError(RequestError):
    """A topic or pattern is malformed; the SPEC's ``invalid_topic`` error."""

    def __init__(self, message: str) -> None:
        super().__init__("invalid_topic", message)


def _quote(text: str) -> str:
    """Quote untrusted input for a message: at most 64 characters, every non-ASCII escaped."""
    if len(text) > _QUOTE_CHARS:
        return ascii(text[:_QUOTE_CHARS]) + "..."
    return ascii(text)


def _diagnose(text: object, kind: str, wildcards: bool) -> TopicError:
    """Explain why ``text`` is not a valid topic (or pattern). Only called on the error path."""
    if not isinstance(text, str):
        return TopicError(f"{kind} must be a string, not {type(text).__name__}")
    if not text:
        return TopicError(f"{kind} is empty")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_TOPIC_BYTES:
        return TopicError(
            f"{kind} {_quote(text)} is {size} bytes, over the {MAX_TOPIC_BYTES}-byte limit"
        )
    segments = text.split(".")
    if len(segments) > MAX_TOPIC_SEGMENTS:
        return TopicError(
            f"{kind} {_quote(text)} has {len(segments)} segments, "
            f"over the limit of {MAX_TOPIC_SEGMENTS}"
        )
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if not segment:
            return TopicError(f"{kind} {_quote(text)} has an empty segment")
        if segment in (_STAR, _TAIL):
            if not wildcards:
                return TopicError(
                    f"{kind} {_quote(text)} contains the wildcard {segment!r}; "
                    "only patterns may use wildcards"
                )
            if segment == _TAIL and index != last:
                return TopicError(f"{kind} {_quote(text)} uses '>' before the last segment")
            continue
        if _SEGMENT_RE.fullmatch(segment) is None:
            return TopicError(
                f"{kind} {_quote(text)} has the segment {_quote(segment)}, "
                "which holds characters outside [A-Za-z0-9_-]"
            )
    # Unreachable for inputs the regular expression refused; kept as a safe default.
    return TopicError(f"{kind} {_quote(text)} is malformed")


def validate_topic(topic: object) -> str:
    """Return ``topic`` if it is a valid concrete topic; raise TopicError otherwise.

    Wildcards are refused: a topic names exactly one destination.
    """
    if (
        isinstance(topic, str)
        and len(topic) <= MAX_TOPIC_BYTES
        and _TOPIC_RE.fullmatch(topic) is not None
    ):
        return topic
    raise _diagnose(topic, "topic", wildcards=False)


@dataclass(frozen=True, slots=True)
class Pattern:
    """A validated topic pattern; construct it with :meth:`parse`.

    Equality and hashing use ``text`` only (``segments`` is derived from it).
    Direct construction is validated too, so a Pattern is never malformed.
    """

    text: str
    segments: tuple[str, ...] = field(compare=False)
    _literal: bool = field(init=False, repr=False, compare=False)
    _tail: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        text = self.text
        if not (
            isinstance(text, str)
            and len(text) <= MAX_TOPIC_BYTES
            and _PATTERN_RE.fullmatch(text) is not None
        ):
            raise _diagnose(text, "pattern", wildcards=True)
        if self.segments != tuple(text.split(".")):
            raise ValueError(f"segments {self.segments!r} do not match pattern {text!r}")
        tail = self.segments[-1] == _TAIL
        object.__setattr__(self, "_tail", tail)
        object.__setattr__(self, "_literal", not tail and _STAR not in self.segments)

    def __hash__(self) -> int:
        return hash(self.text)

    @classmethod
    def parse(cls, text: object) -> Pattern:
        """Parse and validate a pattern; raise TopicError if it is malformed."""
        if not isinstance(text, str):
            raise _diagnose(text, "pattern", wildcards=True)
        return cls(text, tuple(text.split(".")))

    @property
    def is_literal(self) -> bool:
        """True if the pattern has no wildcard, so it matches exactly one topic."""
        return self._literal

    def matches(self, topic: str) -> bool:
        """Return whether this pattern matches ``topic`` (assumed valid)."""
        if self._literal:
            return topic == self.text
        parts = topic.split(".")
        segments = self.segments
        if self._tail:
            fixed = len(segments) - 1
            if len(parts) <= fixed:
                return False
        else:
            fixed = len(segments)
            if len(parts) != fixed:
                return False
        for index in range(fixed):
            segment = segments[index]
            if segment != _STAR and segment != parts[index]:
                return False
        return True

    def _length_range(self) -> tuple[int, int]:
        """The fewest and most segments of a valid topic this pattern matches.

        Each segment past the pattern's own length costs at least two bytes
        (a dot and one character), and the shortest match is exactly as long
        as the pattern text, so the 255-byte limit can lower the maximum below 8.
        """
        count = len(self.segments)
        if not self._tail:
            return count, count
        spare = (MAX_TOPIC_BYTES - len(self.text)) // 2
        return count, min(MAX_TOPIC_SEGMENTS, count + spare)

    def covers(self, other: Pattern) -> bool:
        """Return True iff every valid topic ``other`` matches is matched by this pattern.

        Exact set inclusion over valid topics (at most 8 segments and 255 bytes).
        A literal segment here is satisfied only by the same literal in ``other``:
        a wildcard there can take any of at least 64 one-character values.
        """
        mine = self.segments
        theirs = other.segments
        low, high = other._length_range()
        if self._tail:
            if low < len(mine):
                return False
            fixed = len(mine) - 1
        else:
            if not low == high == len(mine):
                return False
            fixed = len(mine)
        their_fixed = len(theirs) - 1 if other._tail else len(theirs)
        for index in range(fixed):
            segment = mine[index]
            if segment == _STAR:
                continue
            if index >= their_fixed or theirs[index] != segment:
                return False
        return True


def parse_patterns(items: object) -> tuple[Pattern, ...]:
    """Parse a JSON list of pattern strings, dropping duplicates but keeping order.

    Raise TopicError if ``items`` is not a list, or naming the first bad item.
    """
    if not isinstance(items, list | tuple):
        raise TopicError(f"patterns must be a list of strings, not {type(items).__name__}")
    seen: dict[str, Pattern] = {}
    for index, item in enumerate(items):
        if isinstance(item, str) and item in seen:
            continue
        try:
            pattern = Pattern.parse(item)
        except TopicError as error:
            raise TopicError(f"item {index}: {error.message}") from None
        seen[pattern.text] = pattern
    return tuple(seen.values())


def covered_by_any(grants: Sequence[Pattern], wanted: Pattern) -> bool:
    """True iff a single grant matches every topic ``wanted`` can match (SPEC section 5)."""
    return any(grant.covers(wanted) for grant in grants)


def first_match(patterns: Sequence[Pattern], topic: str) -> int | None:
    """Index of the first pattern matching ``topic``, or None."""
    for index, pattern in enumerate(patterns):
        if pattern.matches(topic):
            return index
    return None


K = TypeVar("K", bound=Hashable)


class _Bucket(Generic[K]):
    """The keys subscribed at one place, plus a cached immutable snapshot of them.

    The snapshot lets ``match`` hand out the same frozenset to every publish
    until the bucket changes, so a stable fan-out costs no copy at all.
    """

    __slots__ = ("keys", "snapshot")

    def __init__(self) -> None:
        self.keys: set[K] = set()
        self.snapshot: frozenset[K] | None = None

    def frozen(self) -> frozenset[K]:
        snapshot = self.snapshot
        if snapshot is None:
            snapshot = self.snapshot = frozenset(self.keys)
        return snapshot


class _Node(Generic[K]):
    """A trie node for wildcard patterns; every part is created on demand."""

    __slots__ = ("children", "star", "tail", "terminal")

    def __init__(self) -> None:
        self.children: dict[str, _Node[K]] | None = None
        self.star: _Node[K] | None = None
        self.terminal: _Bucket[K] | None = None  # patterns ending at this node
        self.tail: _Bucket[K] | None = None  # patterns ending with '>' after this node

    def is_empty(self) -> bool:
        return (
            self.children is None
            and self.star is None
            and self.terminal is None
            and self.tail is None
        )


class SubscriptionIndex(Generic[K]):
    """Which keys (sessions) subscribe to which patterns, queried by concrete topic.

    Literal patterns live in a dict keyed by topic; wildcard patterns in a
    segment trie with a child per literal segment, a ``*`` child and, at each
    node, the keys of patterns ending in ``>`` there. ``match`` therefore costs
    one dict lookup plus a walk whose width is the number of wildcard branches
    along the topic, never a scan of all subscriptions. Empty trie nodes and
    buckets are pruned on removal, so memory returns to zero.
    """

    __slots__ = ("_count", "_literal", "_root", "_wildcards")

    def __init__(self) -> None:
        self._literal: dict[str, _Bucket[K]] = {}
        self._root: _Node[K] = _Node()
        self._count = 0
        self._wildcards = 0

    def __len__(self) -> int:
        """The number of (pattern, key) pairs."""
        return self._count

    def _bucket_for(self, pattern: Pattern) -> _Bucket[K]:
        """The bucket holding ``pattern``'s keys, creating the path to it."""
        if pattern.is_literal:
            bucket = self._literal.get(pattern.text)
            if bucket is None:
                bucket = self._literal[pattern.text] = _Bucket()
            return bucket
        node = self._root
        segments = pattern.segments
        last = len(segments) - 1
        for index, segment in enumerate(segments):
            if index == last:
                if segment == _TAIL:
                    if node.tail is None:
                        node.tail = _Bucket()
                    return node.tail
            if segment == _STAR:
                if node.star is None:
                    node.star = _Node()
                node = node.star
            else:
                if node.children is None:
                    node.children = {}
                child = node.children.get(segment)
                if child is None:
                    child = node.children[segment] = _Node()
                node = child
        if node.terminal is None:
            node.terminal = _Bucket()
        return node.terminal

    def add(self, pattern: Pattern, key: K) -> bool:
        """Subscribe ``key`` to ``pattern``; False if that pair was already present."""
        bucket = self._bucket_for(pattern)
        if key in bucket.keys:
            return False
        bucket.keys.add(key)
        bucket.snapshot = None
        self._count += 1
        if not pattern.is_literal:
            self._wildcards += 1
        return True

    def remove(self, pattern: Pattern, key: K) -> bool:
        """Unsubscribe ``key`` from ``pattern``; False if that pair was absent."""
        if pattern.is_literal:
            bucket = self._literal.get(pattern.text)
            if bucket is None or key not in bucket.keys:
                return False
            bucket.keys.discard(key)
            bucket.snapshot = None
            if not bucket.keys:
                del self._literal[pattern.text]
            self._count -= 1
            return True
        return self._remove_wildcard(pattern, key)

    def _remove_wildcard(self, pattern: Pattern, key: K) -> bool:
        segments = pattern.segments
        tail = segments[-1] == _TAIL
        walk = segments[:-1] if tail else segments
        path: list[tuple[_Node[K], str]] = []
        node: _Node[K] | None = self._root
        for segment in walk:
            assert node is not None
            path.append((node, segment))
            if segment == _STAR:
                node = node.star
            else:
                node = node.children.get(segment) if node.children is not None else None
            if node is None:
                return False
        assert node is not None
        bucket = node.tail if tail else node.terminal
        if bucket is None or key not in bucket.keys:
            return False
        bucket.keys.discard(key)
        bucket.snapshot = None
        if not bucket.keys:
            if tail:
                node.tail = None
            else:
                node.terminal = None
        self._count -= 1
        self._wildcards -= 1
        # Prune the emptied nodes, deepest first.
        for parent, segment in reversed(path):
            if not node.is_empty():
                break
            if segment == _STAR:
                parent.star = None
            else:
                assert parent.children is not None
                del parent.children[segment]
                if not parent.children:
                    parent.children = None
            node = parent
        return True

    def remove_key(self, key: K, patterns: Iterable[Pattern]) -> None:
        """Remove every pair of ``key`` with one of ``patterns`` (absent pairs are skipped)."""
        for pattern in patterns:
            self.remove(pattern, key)

    def exact(self, topic: str) -> frozenset[K]:
        """The keys subscribed to ``topic`` itself (not through a wildcard pattern)."""
        bucket = self._literal.get(topic)
        return bucket.frozen() if bucket is not None else frozenset()

    def match(self, topic: str) -> frozenset[K]:
        """Every key with at least one pattern matching ``topic`` (assumed valid), once each.

        The result is an immutable snapshot: callers may iterate it while
        subscriptions change (a send that closes a connection and unsubscribes
        it, say) and must not expect it to reflect later changes. When a single
        bucket matches (the common case: a literal topic, no overlapping
        wildcards) the bucket's cached snapshot is returned without copying;
        it is rebuilt only after that bucket changes.
        """
        buckets: list[_Bucket[K]] = []
        literal = self._literal.get(topic)
        if literal is not None:
            buckets.append(literal)
        if self._wildcards:
            nodes = [self._root]
            for segment in topic.split("."):
                following: list[_Node[K]] = []
                for node in nodes:
                    if node.tail is not None:
                        buckets.append(node.tail)
                    if node.children is not None:
                        child = node.children.get(segment)
                        if child is not None:
                            following.append(child)
                    if node.star is not None:
                        following.append(node.star)
                nodes = following
                if not nodes:
                    break
            for node in nodes:
                if node.terminal is not None:
                    buckets.append(node.terminal)
        if not buckets:
            return frozenset()
        first = buckets[0].frozen()
        if len(buckets) == 1:
            return first
        return first.union(*(bucket.keys for bucket in buckets[1:]))

    def _size(self) -> int:
        """Trie nodes below the root plus literal topics held; 0 once everything is removed."""
        nodes = 0
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.children is not None:
                stack.extend(node.children.values())
                nodes += len(node.children)
            if node.star is not None:
                stack.append(node.star)
                nodes += 1
        return nodes + len(self._literal)
