"""Tests for securepub.core.topics: grammar, matching, coverage and the subscription index."""

from __future__ import annotations

import functools
import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securepub.core.errors import RequestError
from securepub.core.topics import (
    Pattern,
    SubscriptionIndex,
    TopicError,
    covered_by_any,
    first_match,
    parse_patterns,
    validate_topic,
)

P = Pattern.parse

# --- topics -----------------------------------------------------------------

VALID_TOPICS = [
    "a",
    "news.sports",
    "A-z_09.x-Y",
    "a.b.c.d.e.f.g.h",  # 8 segments
    "x" * 255,  # 255 bytes, one segment
    ".".join(["abcdefghijklmnopqrstuvwxyzABCDEF"] * 7) + "." + "x" * 24,  # 8 segs, 255 bytes
]

INVALID_TOPICS = [
    "",
    ".",
    "a.",
    ".a",
    "a..b",
    "x" * 256,  # 256 bytes
    "a.b.c.d.e.f.g.h.i",  # 9 segments
    "*",
    "a.*",
    ">",
    "a.>",
    "a*",
    "a b",
    " a",
    "a\n",
    "a\x00",
    "caf\u00e9",
    "\u0430",  # Cyrillic a
    "a/b",
    "a:b",
]


def test_topic_byte_lengths_used_in_tables() -> None:
    """The boundary fixtures really are 255 and 256 bytes long and 8 segments."""
    assert len(VALID_TOPICS[4].encode()) == 255
    assert len(VALID_TOPICS[5].encode()) == 255
    assert len(VALID_TOPICS[5].split(".")) == 8
    assert len(INVALID_TOPICS[5].encode()) == 256


@pytest.mark.parametrize("topic", VALID_TOPICS)
def test_valid_topics_are_returned(topic: str) -> None:
    """A valid topic is returned unchanged."""
    assert validate_topic(topic) is topic


@pytest.mark.parametrize("topic", INVALID_TOPICS)
def test_invalid_topics_raise_invalid_topic(topic: str) -> None:
    """Malformed topics and wildcards raise TopicError, a RequestError coded invalid_topic."""
    with pytest.raises(TopicError) as info:
        validate_topic(topic)
    assert isinstance(info.value, RequestError)
    assert info.value.code == "invalid_topic"
    assert info.value.message


@pytest.mark.parametrize("value", [None, 1, 1.5, b"a", ["a"], {"a": 1}, True])
def test_non_string_topics_are_refused(value: object) -> None:
    """A topic that is not a str is invalid_topic, and the message names the type."""
    with pytest.raises(TopicError) as info:
        validate_topic(value)
    assert type(value).__name__ in info.value.message


@pytest.mark.parametrize(
    ("topic", "words"),
    [
        ("", "empty"),
        ("x" * 256, "256 bytes"),
        ("a.b.c.d.e.f.g.h.i", "9 segments"),
        ("a..b", "empty segment"),
        ("a.*", "wildcard"),
        ("a*", "outside [A-Za-z0-9_-]"),
        ("\u00e9" * 200, "400 bytes"),
    ],
)
def test_topic_messages_say_what_is_wrong(topic: str, words: str) -> None:
    """The message explains the specific problem."""
    with pytest.raises(TopicError) as info:
        validate_topic(topic)
    assert words in info.value.message


def test_topic_messages_quote_at_most_64_escaped_characters() -> None:
    """Bad input is quoted escaped (no raw control or non-ASCII characters), cut at 64."""
    bad = "\u202e\n" + "y" * 100 + ".."
    with pytest.raises(TopicError) as info:
        validate_topic(bad)
    message = info.value.message
    assert "\u202e" not in message and "\n" not in message
    assert "\\u202e" in message
    assert "y" * 62 in message and "y" * 63 not in message  # 2 + 62 = 64 characters


# --- patterns ---------------------------------------------------------------

VALID_PATTERNS = [
    "a",
    "*",
    ">",
    "a.*",
    "a.>",
    "*.*.>",
    "*.b",
    "a.*.c",
    "a.b.c.d.e.f.g.>",  # 8 segments, '>' last
    "*.*.*.*.*.*.*.*",
    "x" * 253 + ".>",  # 255 bytes
]

INVALID_PATTERNS = [
    "",
    "a..b",
    "a.",
    ".>",
    "a.>.b",
    ">.a",
    ">.>",
    "a*",
    "*a",
    "**",
    "a.>>",
    "a.b.c.d.e.f.g.h.>",  # 9 segments
    "x" * 254 + ".>",  # 256 bytes
    "caf\u00e9.*",
    "a .*",
    "#",
]


@pytest.mark.parametrize("text", VALID_PATTERNS)
def test_valid_patterns_parse(text: str) -> None:
    """Valid patterns parse into their text and dot-separated segments."""
    pattern = P(text)
    assert pattern.text == text
    assert pattern.segments == tuple(text.split("."))


@pytest.mark.parametrize("text", [*INVALID_PATTERNS, None, 3, b"a", ["a"]])
def test_invalid_patterns_raise(text: object) -> None:
    """Malformed patterns raise TopicError coded invalid_topic."""
    with pytest.raises(TopicError) as info:
        P(text)
    assert info.value.code == "invalid_topic"


def test_greater_than_not_last_is_explained() -> None:
    """'>' before the last segment gets a message saying so."""
    with pytest.raises(TopicError, match="before the last segment"):
        P("a.>.b")


def test_direct_construction_is_validated() -> None:
    """Pattern(...) cannot build a malformed pattern or inconsistent segments."""
    with pytest.raises(TopicError):
        Pattern("a.>.b", ("a", ">", "b"))
    with pytest.raises(ValueError, match="do not match"):
        Pattern("a.b", ("a", "c"))


def test_patterns_compare_and_hash_by_text() -> None:
    """Two parses of the same text are equal and hash alike; different texts differ."""
    assert P("a.*") == P("a.*")
    assert hash(P("a.*")) == hash(P("a.*"))
    assert P("a.*") != P("a.>")
    assert len({P("a.*"), P("a.*"), P("a.>")}) == 2


@pytest.mark.parametrize(
    ("text", "literal"),
    [("a", True), ("a.b.c", True), ("*", False), ("a.*", False), ("a.>", False), (">", False)],
)
def test_is_literal(text: str, literal: bool) -> None:
    """is_literal is True exactly when the pattern has no wildcard."""
    assert P(text).is_literal is literal


MATCHES = [
    ("a", "a", True),
    ("a", "b", False),
    ("a", "a.b", False),
    ("a.b", "a.b", True),
    ("a.b", "a.bc", False),
    ("*", "a", True),
    ("*", "a.b", False),
    ("a.*", "a.b", True),
    ("a.*", "a", False),
    ("a.*", "a.b.c", False),
    ("a.*", "b.b", False),
    ("*.b", "x.b", True),
    ("*.b", "x.c", False),
    ("a.*.c", "a.x.c", True),
    ("a.*.c", "a.x.d", False),
    (">", "a", True),
    (">", "a.b.c.d.e.f.g.h", True),
    ("a.>", "a", False),
    ("a.>", "a.b", True),
    ("a.>", "a.b.c", True),
    ("a.>", "b.c", False),
    ("*.>", "a", False),
    ("*.>", "a.b", True),
    ("a.*.>", "a.b", False),
    ("a.*.>", "a.b.c.d", True),
]


@pytest.mark.parametrize(("pattern", "topic", "expected"), MATCHES)
def test_matches_table(pattern: str, topic: str, expected: bool) -> None:
    """'*' matches exactly one segment, '>' one or more, literals themselves."""
    assert P(pattern).matches(topic) is expected


COVERS = [
    ("a.>", "a.*", True),
    ("a.>", "a.b.>", True),
    ("a.>", "a.*.c", True),
    ("a.>", "a.>", True),
    ("a.>", "a", False),
    ("a.>", "b.*", False),
    ("a.>", "*.b", False),
    ("a.*", "a.>", False),
    ("a.*", "a.*", True),
    ("a.*", "a.b", True),
    ("a.*", "a.b.c", False),
    ("a.*", "*.*", False),
    ("*.b", "a.b", True),
    ("*.b", "*.b", True),
    ("*.b", "*.*", False),
    ("*.*", "a.*", True),
    (">", "a", True),
    (">", "*", True),
    (">", ">", True),
    (">", "a.b.c.>", True),
    ("*", ">", False),
    ("*.>", ">", False),
    ("a", "a", True),
    ("a", "b", False),
    ("a", "*", False),
    ("a.b", "a.*", False),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a.>", False),
    ("a.b.>", "a.>", False),
    # The 8-segment maximum: a '>' in 8th position matches exactly one segment.
    ("a.b.c.d.e.f.g.*", "a.b.c.d.e.f.g.>", True),
    ("a.b.c.d.e.f.g.>", "a.b.c.d.e.f.g.*", True),
    ("*.*.*.*.*.*.*.*", "*.*.*.*.*.*.*.>", True),
    ("a.b.c.d.e.f.*", "a.b.c.d.e.f.>", False),
    ("a.b.c.d.e.f.*.*", "a.b.c.d.e.f.>", False),
]


@pytest.mark.parametrize(("mine", "theirs", "expected"), COVERS)
def test_covers_table(mine: str, theirs: str, expected: bool) -> None:
    """covers is exact inclusion of the sets of valid topics the patterns match."""
    assert P(mine).covers(P(theirs)) is expected


def test_covers_respects_the_byte_limit() -> None:
    """A '>' that can only ever match one segment within 255 bytes is covered by '*'."""
    head = "x" * 252
    # "head.>" is 254 bytes: its matches are "head.c" (one segment after head) or
    # longer only if 2 more bytes fit; 252 + 2 + 2 = 256 > 255, so exactly one.
    assert P(head + ".*").covers(P(head + ".>"))
    shorter = "x" * 250
    # 250 + 2 + 2 = 254: "shorter.a.b" is a valid topic, so '*' does not cover.
    assert not P(shorter + ".*").covers(P(shorter + ".>"))
    validate_topic(shorter + ".a.b")


def test_covered_by_any_needs_a_single_grant() -> None:
    """Coverage by several grants together is not enough: one grant must cover alone."""
    assert covered_by_any([P("a.*.c"), P("a.b.*")], P("a.b.c"))
    assert not covered_by_any([P("a.b"), P("a.c")], P("a.*"))
    assert not covered_by_any([P("a.*"), P("a.*.>")], P("a.>"))
    assert covered_by_any([P("x"), P("a.>")], P("a.*.>"))
    assert not covered_by_any([], P("a"))


def test_first_match_returns_the_first_index() -> None:
    """first_match gives the index of the earliest matching pattern, or None."""
    patterns = [P("a.b"), P("a.*"), P(">")]
    assert first_match(patterns, "a.b") == 0
    assert first_match(patterns, "a.c") == 1
    assert first_match(patterns, "z") == 2
    assert first_match(patterns[:2], "z") is None
    assert first_match([], "a") is None


def test_parse_patterns_dedups_keeping_order() -> None:
    """Duplicates are dropped; the first occurrences keep their order."""
    parsed = parse_patterns(["b.*", "a", "b.*", ">", "a"])
    assert [p.text for p in parsed] == ["b.*", "a", ">"]
    assert parse_patterns([]) == ()


@pytest.mark.parametrize("items", [None, "a.b", {"a": 1}, 3])
def test_parse_patterns_needs_a_list(items: object) -> None:
    """Anything but a list is invalid_topic."""
    with pytest.raises(TopicError, match="list of strings"):
        parse_patterns(items)


def test_parse_patterns_names_the_bad_item() -> None:
    """A bad item is named by its index, with the reason."""
    with pytest.raises(TopicError, match=r"item 2: .*'a\.\.b'.*empty segment"):
        parse_patterns(["a", "b", "a..b"])
    with pytest.raises(TopicError, match="item 1: pattern must be a string, not int"):
        parse_patterns(["a", 5])


# --- reference implementations for the property tests -------------------------

SEGMENTS = ["a", "b", "c"]
ALL_TOPICS = [
    ".".join(parts)
    for length in range(1, 9)
    for parts in itertools.product(SEGMENTS, repeat=length)
]


def _reference_regex(text: str) -> re.Pattern[str]:
    parts = []
    for segment in text.split("."):
        if segment == "*":
            parts.append(r"[^.]+")
        elif segment == ">":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        else:
            parts.append(re.escape(segment))
    return re.compile(r"\.".join(parts))


@functools.lru_cache(maxsize=4096)
def _reference_set(text: str) -> frozenset[str]:
    regex = _reference_regex(text)
    return frozenset(t for t in ALL_TOPICS if regex.fullmatch(t))


@st.composite
def patterns(draw: st.DrawFn, max_len: int = 8, literals: tuple[str, ...] = ("a", "b")) -> str:
    length = draw(st.integers(1, max_len))
    segments = draw(st.lists(st.sampled_from([*literals, "*"]), min_size=length, max_size=length))
    if draw(st.booleans()):
        segments[-1] = ">"
    return ".".join(segments)


topics = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=8).map(".".join)


@given(patterns(), topics)
@settings(max_examples=300)
def test_matches_agrees_with_a_regex_reference(text: str, topic: str) -> None:
    """Pattern.matches agrees with an independent regular-expression matcher."""
    assert P(text).matches(topic) is bool(_reference_regex(text).fullmatch(topic))


@given(patterns(), patterns())
@settings(max_examples=300, deadline=None)
def test_covers_agrees_with_brute_force(mine: str, theirs: str) -> None:
    """covers(P, Q) holds iff every topic (of up to 8 segments over a, b, c) Q matches, P does.

    Patterns use the literals a and b only, so c stands for "any other segment".
    """
    expected = _reference_set(theirs) <= _reference_set(mine)
    assert P(mine).covers(P(theirs)) is expected


# --- SubscriptionIndex --------------------------------------------------------


def test_index_literal_subscriptions() -> None:
    """Literal subscriptions match only their own topic."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    assert index.add(P("news.sports"), "s1")
    assert index.add(P("news.sports"), "s2")
    assert index.add(P("news.weather"), "s3")
    assert index.match("news.sports") == {"s1", "s2"}
    assert index.match("news.weather") == {"s3"}
    assert index.match("news") == set()
    assert index.match("news.sports.x") == set()
    assert len(index) == 3


def test_index_add_is_idempotent_per_pair() -> None:
    """Adding the same (pattern, key) twice returns False and counts once."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    assert index.add(P("a.*"), "s")
    assert not index.add(P("a.*"), "s")
    assert index.add(P("a.b"), "s")
    assert not index.add(P("a.b"), "s")
    assert len(index) == 2


def test_index_wildcards() -> None:
    """'*' and '>' subscriptions match like Pattern.matches does."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add(P("a.*"), "star")
    index.add(P("a.>"), "tail")
    index.add(P(">"), "all")
    index.add(P("*.b.c"), "mid")
    index.add(P("*"), "one")
    assert index.match("a") == {"all", "one"}
    assert index.match("a.b") == {"star", "tail", "all"}
    assert index.match("a.b.c") == {"tail", "all", "mid"}
    assert index.match("x.b.c") == {"all", "mid"}
    assert index.match("x.y") == {"all"}


def test_index_dedups_keys_across_overlapping_patterns() -> None:
    """A key whose several patterns match a topic is returned once."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    for text in ("a.b", "a.*", "a.>", ">", "*.b"):
        index.add(P(text), "s")
    index.add(P("a.b"), "t")
    result = index.match("a.b")
    assert result == {"s", "t"}
    assert len(list(result)) == 2


def test_index_remove() -> None:
    """remove drops one pair and reports whether it was there."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add(P("a.*"), "s")
    index.add(P("a.b"), "s")
    assert index.remove(P("a.*"), "s")
    assert not index.remove(P("a.*"), "s")
    assert not index.remove(P("a.b"), "other")
    assert not index.remove(P("x.>"), "s")
    assert not index.remove(P("a.b.c"), "s")
    assert index.match("a.b") == {"s"}
    assert index.match("a.c") == set()
    assert len(index) == 1


def test_index_remove_key() -> None:
    """remove_key drops every listed pattern of one key, skipping absent ones."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    mine = [P("a.b"), P("a.*"), P(">")]
    for pattern in mine:
        index.add(pattern, "s")
    index.add(P("a.b"), "t")
    index.remove_key("s", [*mine, P("never.added")])
    assert len(index) == 1
    assert index.match("a.b") == {"t"}
    assert index.match("z") == set()


def test_index_prunes_to_empty() -> None:
    """Removing every pair leaves no trie nodes and no literal entries behind."""
    index: SubscriptionIndex[int] = SubscriptionIndex()
    texts = ["a", "a.b", "a.*", "a.>", ">", "*", "*.*.c.>", "a.b.c.d.e.f.g.>", "*.b", "a.*.c"]
    for key in range(3):
        for text in texts:
            index.add(P(text), key)
    assert index._size() > 0
    for key in range(3):
        for text in reversed(texts):
            assert index.remove(P(text), key)
    assert len(index) == 0
    assert index._size() == 0
    assert index.match("a.b") == set()


def test_index_prunes_partially() -> None:
    """Removing a deep pattern keeps the shared prefix another pattern still needs."""
    index: SubscriptionIndex[str] = SubscriptionIndex()
    index.add(P("a.*.c.>"), "s")
    index.add(P("a.*"), "s")
    index.remove(P("a.*.c.>"), "s")
    assert index.match("a.x") == {"s"}
    assert index.match("a.x.c.d") == set()
    index.remove(P("a.*"), "s")
    assert index._size() == 0


def test_match_returns_a_stable_immutable_snapshot() -> None:
    """match returns a frozenset, reused while unchanged, safe to iterate during removal."""
    index: SubscriptionIndex[int] = SubscriptionIndex()
    topic = P("room.1")
    for key in range(1000):
        index.add(topic, key)
    first = index.match("room.1")
    assert isinstance(first, frozenset)
    assert index.match("room.1") is first  # no copy per publish
    for key in first:  # a subscriber leaving mid fan-out does not break iteration
        index.remove(topic, key)
    assert len(first) == 1000
    assert index.match("room.1") == set()
    index.add(topic, 5)
    assert index.match("room.1") == {5}


@st.composite
def operations(draw: st.DrawFn) -> list[tuple[bool, str, int]]:
    return draw(
        st.lists(
            st.tuples(st.booleans(), patterns(max_len=5), st.integers(0, 4)),
            max_size=40,
        )
    )


@given(operations(), st.lists(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6)))
@settings(max_examples=300)
def test_index_agrees_with_brute_force(
    ops: list[tuple[bool, str, int]], topic_parts: list[list[str]]
) -> None:
    """After any adds and removes, match(t) is {k for (p, k) in pairs if p.matches(t)}."""
    index: SubscriptionIndex[int] = SubscriptionIndex()
    pairs: set[tuple[Pattern, int]] = set()
    for adding, text, key in ops:
        pattern = P(text)
        if adding:
            assert index.add(pattern, key) is ((pattern, key) not in pairs)
            pairs.add((pattern, key))
        else:
            assert index.remove(pattern, key) is ((pattern, key) in pairs)
            pairs.discard((pattern, key))
        assert len(index) == len(pairs)
    for topic in [*map(".".join, topic_parts), "a", "a.b", "b.a.c"]:
        assert index.match(topic) == {k for (p, k) in pairs if p.matches(topic)}
    for pattern, key in list(pairs):
        index.remove(pattern, key)
    assert len(index) == 0
    assert index._size() == 0
