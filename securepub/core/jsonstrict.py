"""Strict JSON: parse untrusted text without surprises, serialize compactly, measure nesting."""

from __future__ import annotations

import json
import math
import re
from typing import Any, NoReturn

from securepub.core.errors import RequestError

__all__ = ["PayloadTooDeep", "StrictJSONError", "depth", "dumps", "loads"]


class StrictJSONError(RequestError):
    """The input is not strict JSON (SPEC: ``bad_request``)."""

    def __init__(self, message: str) -> None:
        super().__init__("bad_request", message)


class PayloadTooDeep(RequestError):
    """The input nests too deeply to be parsed at all (SPEC: ``invalid_payload``)."""

    def __init__(self, message: str) -> None:
        super().__init__("invalid_payload", message)


def _object_from_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Building the dict in C and comparing lengths measured cheapest of the
    # duplicate checks tried; the slow search for the culprit runs only on error.
    result = dict(pairs)
    if len(result) != len(pairs):
        _raise_duplicate(pairs)
    return result


def _raise_duplicate(pairs: list[tuple[str, Any]]) -> NoReturn:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise StrictJSONError(f"duplicate key {_quote(key)} in an object")
        seen.add(key)
    raise StrictJSONError("duplicate key in an object")  # pragma: no cover


def _reject_constant(name: str) -> NoReturn:
    raise StrictJSONError(f"{name} is not allowed in JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise StrictJSONError(f"number {_quote(text)} is out of range")
    return value


def _quote(text: str) -> str:
    if len(text) > 64:
        return ascii(text[:64]) + "..."
    return ascii(text)


# One decoder and one encoder for the process: json.loads/json.dumps with
# keyword arguments build a new one per call, which costs more than the work.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_object_from_pairs,
    parse_constant=_reject_constant,
    parse_float=_finite_float,
)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_SURROGATE = re.compile("[\ud800-\udfff]")


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse one strict JSON document.

    Refused with StrictJSONError (``bad_request``): invalid UTF-8, syntax
    errors, trailing data, NaN/Infinity/-Infinity, numbers that overflow a
    float, integers longer than Python's digit limit, duplicate object keys,
    and unpaired UTF-16 surrogates (raw or as ``\\uD800`` escapes), which
    could not be re-encoded as UTF-8 later. Nesting deep enough to exhaust
    the parser's recursion raises PayloadTooDeep (``invalid_payload``). No
    other exception escapes for any input of the accepted types; any other
    argument type is a programming error and raises TypeError.
    """
    if isinstance(data, str):
        text = data
        if not text.isascii():
            try:
                text.encode("utf-8")  # several times faster than a regex search
            except UnicodeEncodeError:
                raise StrictJSONError("text contains an unpaired surrogate") from None
    elif isinstance(data, bytes | bytearray | memoryview):
        try:
            text = str(data, "utf-8")
        except UnicodeDecodeError as error:
            raise StrictJSONError(
                f"not valid UTF-8 at byte {error.start}: {error.reason}"
            ) from None
    else:
        raise TypeError(f"loads() takes str or bytes, not {type(data).__name__}")
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise PayloadTooDeep("JSON nests too deeply to be parsed") from None
    except json.JSONDecodeError as error:
        raise StrictJSONError(
            f"not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    except ValueError:
        # int() refusing more digits than sys.get_int_max_str_digits() allows.
        raise StrictJSONError("not acceptable JSON: a number has too many digits") from None
    # An escape like "\ud800" decodes to a lone surrogate; only look when one might be there.
    if ("\\ud" in text or "\\uD" in text) and _has_surrogate(value):
        raise StrictJSONError("a string escapes an unpaired surrogate")
    return value


def _has_surrogate(value: Any) -> bool:
    """Whether any string (key or value) in a parsed document holds a lone surrogate."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item) is not None:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def dumps(value: Any) -> str:
    """Serialize compactly (no spaces, raw UTF-8 text); ValueError for NaN or infinity."""
    return _ENCODER.encode(value)


_CONTAINERS = (list, tuple, dict)
# Exact types seen in parsed JSON, so the hot loop is one dict lookup per item;
# any other type (a dict subclass, say) falls back to isinstance.
_IS_CONTAINER: dict[type, bool] = {
    dict: True,
    list: True,
    tuple: True,
    str: False,
    int: False,
    float: False,
    bool: False,
    type(None): False,
}


def depth(value: Any) -> int:
    """Nesting depth, computed iteratively: a scalar is 0, ``[]`` or ``{}`` is 1, ``{"a": [1]}`` 2.

    Lists, tuples and dicts (subclasses included) count as containers.
    """
    kinds = _IS_CONTAINER
    level = [value] if isinstance(value, _CONTAINERS) else []
    result = 0
    while level:
        result += 1
        below: list[Any] = []
        append = below.append
        for container in level:
            for item in container.values() if isinstance(container, dict) else container:
                try:
                    if kinds[type(item)]:
                        append(item)
                except KeyError:
                    if isinstance(item, _CONTAINERS):
                        append(item)
        level = below
    return result
