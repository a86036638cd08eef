"""Tests for securepub.core.validation: payload size and depth limits, per-topic schemas."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securepub.core.errors import ConfigError, RequestError
from securepub.core.jsonstrict import loads
from securepub.core.topics import Pattern
from securepub.core.validation import PayloadValidator, TopicRule

P = Pattern.parse

CHAT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "text": {"type": "string", "maxLength": 10},
        "author": {"$ref": "#/$defs/name"},
        "email": {"type": "string", "format": "email"},
    },
    "required": ["text"],
    "additionalProperties": False,
    "$defs": {"name": {"type": "string", "minLength": 1}},
}


def _validator(max_bytes: int = 65536, max_depth: int = 32, *rules: TopicRule) -> PayloadValidator:
    return PayloadValidator(max_bytes, max_depth, rules)


def _refused(validator: PayloadValidator, topic: str, data: Any) -> str:
    with pytest.raises(RequestError) as info:
        validator.validate(topic, data)
    assert type(info.value) is RequestError
    assert info.value.code == "invalid_payload"
    return info.value.message


def _nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def test_validate_returns_compact_text() -> None:
    """The result is the compact serialization the caller will send."""
    validator = _validator()
    assert validator.validate("a", {"x": [1, 2.5, None], "y": "caf\u00e9"}) == (
        '{"x":[1,2.5,null],"y":"caf\u00e9"}'
    )
    assert validator.validate("a", None) == "null"


def test_size_limit_at_and_over() -> None:
    """A payload of exactly max_bytes passes; one byte more is refused with both numbers."""
    validator = _validator(100)
    at_limit = "x" * 98  # plus two quotes: 100 bytes
    assert len(validator.validate("a", at_limit)) == 100
    message = _refused(validator, "a", at_limit + "x")
    assert message == "payload is 101 bytes, over the 100-byte limit"


def test_size_counts_utf8_bytes_not_characters() -> None:
    """Non-ASCII text counts its UTF-8 bytes."""
    validator = _validator(100)
    assert validator.validate("a", "\u00e9" * 49)  # 98 bytes + 2 quotes
    assert _refused(validator, "a", "\u00e9" * 49 + "x") == (
        "payload is 101 bytes, over the 100-byte limit"
    )


def test_size_uses_the_compact_form() -> None:
    """Whitespace in the sender's text does not count: the compact serialization does."""
    data = loads('{ "a" : [ 1 , 2 ] }')  # 19 bytes as sent, 11 compact
    assert _validator(11).validate("a", data) == '{"a":[1,2]}'
    assert _refused(_validator(10), "a", data) == "payload is 11 bytes, over the 10-byte limit"


def test_default_limit_65536() -> None:
    """With the SPEC's default limit, 65536 bytes pass and 70000 do not."""
    validator = _validator(65536)
    validator.validate("a", "x" * 65534)
    assert _refused(validator, "a", "x" * 69998) == (
        "payload is 70000 bytes, over the 65536-byte limit"
    )


def test_depth_limit_at_and_over() -> None:
    """Depth max_depth passes; one more is refused with both numbers."""
    validator = _validator(max_depth=32)
    validator.validate("a", _nested(32))
    assert _refused(validator, "a", _nested(33)) == "payload nests 33 deep, over the limit of 32"
    assert _refused(validator, "a", _nested(40)) == "payload nests 40 deep, over the limit of 32"


def test_depth_is_checked_before_size_and_schema() -> None:
    """A payload too deep and too big (and off-schema) is reported as too deep."""
    validator = _validator(10, 3, TopicRule(P(">"), {"type": "string"}))
    message = _refused(validator, "a", [[[["x" * 100]]]])
    assert "nests 4 deep" in message


def test_size_is_checked_before_schema() -> None:
    """A payload too big and off-schema is reported as too big."""
    validator = _validator(10, 32, TopicRule(P(">"), {"type": "string"}))
    assert "bytes, over the 10-byte limit" in _refused(validator, "a", [1] * 20)


def test_very_deep_values_are_refused_without_recursing() -> None:
    """A value far deeper than the recursion limit is refused by the depth check."""
    validator = _validator(max_depth=32)
    assert "nests 100000 deep" in _refused(validator, "a", _nested(100_000))


def test_schema_pass_and_fail() -> None:
    """The schema of the matching rule is applied; a failure names pattern, path and reason."""
    validator = _validator(65536, 32, TopicRule(P("chat.*"), CHAT_SCHEMA, True, "chat.json"))
    assert validator.validate("chat.room1", {"text": "hi", "author": "al"}) == (
        '{"text":"hi","author":"al"}'
    )
    message = _refused(validator, "chat.room1", {"text": "far too long here"})
    assert message.startswith("payload does not match the schema for chat.*: ")
    assert "is too long" in message and "$.text" in message
    message = _refused(validator, "chat.room1", {"text": "hi", "author": ""})
    assert "$.author" in message
    assert "is a required property" in _refused(validator, "chat.room1", {})
    # Topics no rule matches carry no schema.
    assert validator.validate("news.x", {"anything": [1]}) == '{"anything":[1]}'


def test_formats_are_annotations_only() -> None:
    """'format' is not asserted (draft 2020-12 default): a bad email still validates."""
    validator = _validator(65536, 32, TopicRule(P("chat.*"), CHAT_SCHEMA))
    validator.validate("chat.a", {"text": "hi", "email": "not an email"})


def test_schema_message_is_truncated_and_one_line() -> None:
    """The schema detail is cut to 200 characters and carries no raw control characters."""
    validator = _validator(65536, 32, TopicRule(P(">"), {"type": "integer"}))
    message = _refused(validator, "a", "line\n\u202e" + "z" * 1000)
    detail = message.split(": ", 1)[1]
    assert len(detail) <= 200 + len("...") + 20  # escapes may lengthen a little
    assert "\n" not in message and "\u202e" not in message
    assert "z" * 300 not in message


def test_first_matching_rule_wins() -> None:
    """Rules apply in order: the first whose pattern matches governs the topic alone."""
    special = TopicRule(P("chat.special"), {"type": "string"}, schema_source="special.json")
    general = TopicRule(P("chat.*"), {"type": "integer"}, True, "general.json")
    validator = _validator(65536, 32, special, general)
    assert validator.rule_for("chat.special") is special
    assert validator.rule_for("chat.other") is general
    assert validator.rule_for("news") is None
    assert validator.validate("chat.special", "s") == '"s"'
    assert "schema for chat.special" in _refused(validator, "chat.special", 5)
    assert validator.validate("chat.other", 5) == "5"
    assert "schema for chat.*" in _refused(validator, "chat.other", "s")


def test_rule_without_schema_shadows_later_rules() -> None:
    """A first-matching rule with no schema means no schema, even if a later rule has one."""
    validator = _validator(
        65536, 32, TopicRule(P("a.b"), client_publish=True), TopicRule(P("a.*"), {"type": "string"})
    )
    assert validator.validate("a.b", 5) == "5"
    assert validator.rule_for("a.b") == TopicRule(P("a.b"), client_publish=True)


def test_rule_cache_is_bounded() -> None:
    """rule_for caches per topic but never holds more than 10000 entries."""
    rule = TopicRule(P("t.*"))
    validator = _validator(100, 3, rule)
    for number in range(25_000):
        assert validator.rule_for(f"t.{number}") is rule
        assert len(validator._cache) <= 10_000
    assert validator.rule_for("u") is None
    assert validator.rule_for("u") is None


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "nope"}, "not a valid draft 2020-12 JSON Schema"),
        ({"minLength": -1}, "not a valid draft 2020-12 JSON Schema"),
        ({"properties": []}, "not a valid draft 2020-12 JSON Schema"),
        (["not", "a", "schema"], "not a valid draft 2020-12 JSON Schema"),
        ({"$ref": "#/$defs/missing"}, "cannot resolve $ref"),
        ({"properties": {"a": {"$ref": "other.json"}}}, "cannot resolve $ref"),
        ({"$ref": "https://example.com/schema.json"}, "cannot resolve $ref"),
        ({"$ref": "#"}, "loop"),
        (
            {
                "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
                "$ref": "#/$defs/a",
            },
            "loop",
        ),
        ({"$schema": "http://json-schema.org/draft-07/schema#"}, "only draft 2020-12"),
    ],
)
def test_bad_schema_is_a_config_error_naming_its_source(schema: Any, words: str) -> None:
    """An invalid schema stops the start with a one-line ConfigError naming the file."""
    with pytest.raises(ConfigError) as info:
        _validator(100, 3, TopicRule(P("chat.*"), schema, schema_source="schemas/chat.json"))
    message = str(info.value)
    assert "schemas/chat.json" in message and "chat.*" in message
    assert words in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("schema", "data"),
    [
        (True, [1]),
        ({"$ref": "https://json-schema.org/draft/2020-12/schema"}, {"type": "integer"}),
        (
            {
                "$id": "https://example.test/root.json",
                "$defs": {"item": {"$id": "item.json", "type": "integer"}},
                "items": {"$ref": "item.json"},
            },
            [1],
        ),
        ({"$schema": "https://json-schema.org/draft/2020-12/schema#", "type": "array"}, [1]),
    ],
)
def test_good_schemas_compile(schema: Any, data: Any) -> None:
    """Local, embedded and metaschema references resolve without any network access."""
    validator = _validator(100, 3, TopicRule(P("a"), schema))
    validator.validate("a", data)


def test_embedded_id_reference_is_applied() -> None:
    """A $ref to a subschema identified by $id is enforced."""
    schema = {
        "$id": "https://example.test/root.json",
        "$defs": {"item": {"$id": "item.json", "type": "integer"}},
        "items": {"$ref": "item.json"},
    }
    validator = _validator(100, 3, TopicRule(P("a"), schema))
    assert "$[1]" in _refused(validator, "a", [1, "x"])


@pytest.mark.parametrize(
    ("max_bytes", "max_depth"), [(0, 32), (100, 0), (-1, 1), (True, 3), (10.5, 3), (10, "3")]
)
def test_bad_limits_are_config_errors(max_bytes: Any, max_depth: Any) -> None:
    """Limits must be positive integers."""
    with pytest.raises(ConfigError):
        PayloadValidator(max_bytes, max_depth, [])


@pytest.mark.parametrize(
    "data",
    [math.nan, [math.inf], {"a": -math.inf}, "\ud800", {"\udc00": 1}, 10**5000],
    ids=["nan", "inf", "-inf", "surrogate", "surrogate-key", "huge-int"],
)
def test_unserializable_values_are_invalid_payload(data: Any) -> None:
    """NaN, infinities, lone surrogates and huge integers are refused as invalid_payload."""
    _refused(_validator(), "a", data)


def test_schema_recursion_is_invalid_payload() -> None:
    """A schema recursing with the instance is stopped by RecursionError handling, not a crash."""
    schema = {"type": "array", "items": {"$ref": "#"}}
    validator = _validator(10**7, 10**6, TopicRule(P("a"), schema))
    message = _refused(validator, "a", _nested(700))
    assert "schema for a: the schema recurses too deeply" in message


def test_serializer_recursion_is_invalid_payload() -> None:
    """With a depth limit set absurdly high, the serializer's RecursionError is still contained."""
    validator = _validator(10**7, 10**6)
    assert _refused(validator, "a", _nested(5000)) == "payload nests too deeply to serialize"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=40,
)

PROPERTY_SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "array", "items": {"type": ["integer", "string"]}}},
    "additionalProperties": {"type": ["object", "null", "boolean"]},
}


@given(json_values, st.sampled_from(["a", "s.x", "free"]))
@settings(max_examples=400)
def test_validate_returns_text_or_raises_invalid_payload(data: Any, topic: str) -> None:
    """For any JSON value, validate returns its compact text or raises invalid_payload."""
    validator = _validator(
        200,
        4,
        TopicRule(P("s.*"), PROPERTY_SCHEMA, schema_source="p.json"),
        TopicRule(P("a"), {"type": "array"}),
    )
    try:
        text = validator.validate(topic, data)
    except RequestError as error:
        assert type(error) is RequestError
        assert error.code == "invalid_payload"
    else:
        assert isinstance(text, str)
        assert len(text.encode("utf-8")) <= 200
        assert loads(text) == data


def test_topic_rules_are_hashable_values() -> None:
    """TopicRule compares by value and hashes even though its schema is a dict."""
    first = TopicRule(P("a.*"), {"type": "string"}, True, "a.json")
    second = TopicRule(P("a.*"), {"type": "string"}, True, "a.json")
    assert first == second
    assert hash(first) == hash(second)
    assert first != TopicRule(P("a.*"), {"type": "integer"}, True, "a.json")
