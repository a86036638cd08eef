"""Tests for securepub.core.jsonstrict: strict parsing, compact serialization, iterative depth."""

from __future__ import annotations

import math
import sys
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from securepub.core.errors import RequestError
from securepub.core.jsonstrict import PayloadTooDeep, StrictJSONError, depth, dumps, loads


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('{"a":1,"b":[true,false,null],"c":"x"}', {"a": 1, "b": [True, False, None], "c": "x"}),
        (" [1, 2.5, -0, 1e3] ", [1, 2.5, 0, 1000.0]),
        ('"caf\\u00e9 \\ud83d\\ude00"', "caf\u00e9 \U0001f600"),
        ("{}", {}),
        ('{"a":{"a":1}}', {"a": {"a": 1}}),  # the same key in different objects is fine
        ("1" * 4000, int("1" * 4000)),
    ],
)
def test_loads_accepts_strict_json(text: str, value: Any) -> None:
    """Ordinary JSON parses, from str and from UTF-8 bytes alike."""
    assert loads(text) == value
    assert loads(text.encode("utf-8")) == value
    assert loads(bytearray(text.encode("utf-8"))) == value


BAD_REQUEST = [
    "NaN",
    "[NaN]",
    "Infinity",
    '{"a":-Infinity}',
    "1e400",  # overflows to infinity
    "[-1e999]",
    '{"a":1,"a":2}',
    '{"a":1,"b":{"c":1,"c":1}}',
    "{} x",
    "[1] [2]",
    "1 2",
    "",
    " ",
    "[1,]",
    "{'a':1}",
    "\ufeff{}",  # byte order mark
    '"\\ud800"',  # escaped lone surrogate
    '{"\\udc00":1}',  # ... in a key
    '["ok","\\uDBFF"]',
    '"\ud800"',  # raw lone surrogate in a str
    "1" * 5000,  # more digits than Python converts
]


@pytest.mark.parametrize("text", BAD_REQUEST)
def test_loads_refuses_non_strict_json_as_bad_request(text: str) -> None:
    """NaN, infinities, duplicate keys, trailing data, lone surrogates: bad_request."""
    with pytest.raises(StrictJSONError) as info:
        loads(text)
    assert isinstance(info.value, RequestError)
    assert info.value.code == "bad_request"


@pytest.mark.parametrize(
    "data",
    [b"\xff", b'"\xc3"', b'"\xed\xa0\x80"', b'"\xc0\xaf"', b'{"a":"\xe9"}', b"\xfe\xff\x00{"],
)
def test_loads_refuses_invalid_utf8(data: bytes) -> None:
    """Bytes that are not valid UTF-8 (overlongs and encoded surrogates too) are bad_request."""
    with pytest.raises(StrictJSONError, match="UTF-8"):
        loads(data)


def test_duplicate_key_is_named() -> None:
    """The duplicate key appears, quoted, in the message."""
    with pytest.raises(StrictJSONError, match="duplicate key 'b'"):
        loads('{"a":1,"b":2,"b":3}')


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000,
        "[" * 100_000 + "]" * 100_000,
        '{"a":' * 100_000,
        '{"a":' * 50_000 + "1" + "}" * 50_000,
        '[{"a":' * 50_000,
        "[" * (sys.getrecursionlimit() + 10) + "]" * (sys.getrecursionlimit() + 10),
    ],
)
def test_loads_refuses_deep_nesting_as_invalid_payload(text: str) -> None:
    """Nesting that would exhaust the parser's recursion is PayloadTooDeep, never RecursionError."""
    with pytest.raises(PayloadTooDeep) as info:
        loads(text)
    assert info.value.code == "invalid_payload"
    with pytest.raises(PayloadTooDeep):
        loads(text.encode())


@pytest.mark.parametrize("value", [None, 1, {"a": 1}, ["x"]])
def test_loads_refuses_other_argument_types(value: object) -> None:
    """Passing something that is not str or bytes is a programming error: TypeError."""
    with pytest.raises(TypeError):
        loads(value)  # type: ignore[arg-type]


@given(st.binary(max_size=64))
def test_loads_raises_only_request_errors_on_arbitrary_bytes(data: bytes) -> None:
    """Whatever the bytes, loads returns a value or raises a RequestError subclass."""
    try:
        loads(data)
    except (StrictJSONError, PayloadTooDeep):
        pass


@given(st.text(alphabet='[]{}":,0123456789.eE+-tfnulrasNIyi\\ud8c', max_size=64))
def test_loads_raises_only_request_errors_on_json_like_text(text: str) -> None:
    """Near-JSON text also yields a value or a RequestError subclass, nothing else."""
    try:
        loads(text)
    except (StrictJSONError, PayloadTooDeep):
        pass


def test_dumps_is_compact_and_keeps_unicode() -> None:
    """dumps uses no spaces and writes non-ASCII characters as they are."""
    value = {"a": [1, 2.5, None, True], "b": "caf\u00e9"}
    assert dumps(value) == '{"a":[1,2.5,null,true],"b":"caf\u00e9"}'
    assert dumps("</script>") == '"</script>"'


@pytest.mark.parametrize("value", [math.nan, [math.inf], {"a": -math.inf}])
def test_dumps_refuses_nan_and_infinity(value: Any) -> None:
    """NaN and infinities are not JSON: ValueError."""
    with pytest.raises(ValueError, match="not JSON compliant"):
        dumps(value)


def _nested(levels: int) -> Any:
    value: Any = 0
    for index in range(levels):
        value = [value] if index % 2 else {"k": value}
    return value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, 0),
        (1, 0),
        ("[[[", 0),
        ([], 1),
        ({}, 1),
        ([1, "a", None], 1),
        ({"a": [1]}, 2),
        ([[], [[]], {}], 3),
        ({"a": 1, "b": {"c": {"d": []}}, "e": [1]}, 4),
        ((1, (2,)), 2),
        (OrderedDict(a=[OrderedDict()]), 3),
        (_nested(32), 32),
        (_nested(33), 33),
        (_nested(100_000), 100_000),  # far past the recursion limit: depth never recurses
    ],
)
def test_depth_table(value: Any, expected: int) -> None:
    """A scalar is 0 deep, an empty container 1, each enclosing container adds 1."""
    assert depth(value) == expected


def test_depth_of_a_parsed_document() -> None:
    """depth measures what loads returns."""
    assert depth(loads('{"a":[{"b":[[]]}],"c":{}}')) == 5
