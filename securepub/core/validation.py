"""Payload limits and per-topic JSON Schemas (SPEC section 5), each schema compiled once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import referencing
import referencing.exceptions
import referencing.jsonschema
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from jsonschema_specifications import REGISTRY as METASCHEMAS  # type: ignore[import-untyped]

from securepub.core.errors import ConfigError, RequestError
from securepub.core.history import HistoryPolicy
from securepub.core.jsonstrict import depth, dumps
from securepub.core.topics import Pattern

__all__ = ["PayloadValidator", "TopicRule"]

_RULE_CACHE_SIZE = 10_000
_DETAIL_CHARS = 200
_DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"


@dataclass(frozen=True)
class TopicRule:
    """One ``[[topics]]`` entry: the first rule whose pattern matches a topic governs it."""

    pattern: Pattern
    # A loaded JSON Schema (draft 2020-12) document; left out of the hash (dicts have none).
    schema: Mapping[str, Any] | None = field(default=None, hash=False)
    client_publish: bool = False
    schema_source: str | None = None  # where the schema came from, for messages
    #: How much history each matching topic keeps (None: none, the default).
    history: HistoryPolicy | None = None
    #: Whether who is subscribed to each matching topic is tracked (SPEC 10) ...
    presence: bool = False
    #: ... and announced to the topic's subscribers as users join and leave.
    join_leave: bool = False


@dataclass(frozen=True, slots=True)
class _Compiled:
    rule: TopicRule
    validator: Any  # jsonschema.Draft202012Validator | None (jsonschema is untyped here)


def _one_line(text: str, limit: int = _DETAIL_CHARS) -> str:
    """Make untrusted or multi-line text safe for a one-line message: escaped, truncated."""
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


def _invalid(message: str) -> RequestError:
    return RequestError("invalid_payload", message)


def _compile(rule: TopicRule) -> _Compiled:
    """Check and compile a rule's schema; ConfigError names the schema's source."""
    schema = rule.schema
    if schema is None:
        return _Compiled(rule, None)
    where = f"schema {rule.schema_source or '(inline)'} for topics {rule.pattern.text}"
    if isinstance(schema, Mapping):
        declared = schema.get("$schema", _DRAFT_2020_12)
        if not isinstance(declared, str) or declared.rstrip("#") != _DRAFT_2020_12:
            raise ConfigError(
                f"{where}: declares $schema {_one_line(repr(declared))}; "
                f"only draft 2020-12 ({_DRAFT_2020_12}) is supported"
            )
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as error:
        raise ConfigError(
            f"{where} is not a valid draft 2020-12 JSON Schema: "
            f"{_one_line(error.message)} (at {_one_line(error.json_path)})"
        ) from None
    # An empty registry: no $ref is ever fetched over the network (jsonschema's
    # default would fetch remote references, blocking, while validating).
    validator = Draft202012Validator(schema, registry=referencing.Registry())
    _check_references(schema, where)
    try:
        validator.is_valid(None)
    except RecursionError:
        # {"$ref": "#"} and friends: would fail every publish, so fail the start.
        raise ConfigError(f"{where}: its references loop without end") from None
    return _Compiled(rule, validator)


def _check_references(schema: Any, where: str) -> None:
    """Resolve every ``$ref`` now, so a dangling one stops the start, not every publish.

    Walks the schema's subschemas as the JSON Schema specification defines
    them, tracking ``$id`` base URIs; remote references fail (nothing is fetched).
    """
    spec = referencing.jsonschema.DRAFT202012
    root = spec.create_resource(schema)
    registry: referencing.Registry[Any] = METASCHEMAS.combine(referencing.Registry())
    stack = [(registry.resolver_with_root(root), root)]
    while stack:
        resolver, resource = stack.pop()
        contents = resource.contents
        if isinstance(contents, Mapping):
            ref = contents.get("$ref")
            if isinstance(ref, str):
                try:
                    resolver.lookup(ref)
                except referencing.exceptions.Unresolvable:
                    raise ConfigError(
                        f"{where}: cannot resolve $ref {_one_line(repr(ref))} "
                        "(only references within the schema itself are supported)"
                    ) from None
        for sub in resource.subresources():
            stack.append((resolver.in_subresource(sub), sub))


class PayloadValidator:
    """Checks published payloads against the size and depth limits and the topic's schema.

    Built once from settings; every schema is checked and compiled here, so
    ``validate`` does no compilation and raises nothing but ``invalid_payload``.
    """

    def __init__(self, max_bytes: int, max_depth: int, rules: Sequence[TopicRule]) -> None:
        for name, value in (("max_message_bytes", max_bytes), ("max_json_depth", max_depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, not {value!r}")
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self.rules: tuple[TopicRule, ...] = tuple(rules)
        self._compiled = tuple(_compile(rule) for rule in self.rules)
        self._cache: dict[str, _Compiled | None] = {}

    def _lookup(self, topic: str) -> _Compiled | None:
        cache = self._cache
        try:
            return cache[topic]
        except KeyError:
            pass
        found = None
        for compiled in self._compiled:
            if compiled.rule.pattern.matches(topic):
                found = compiled
                break
        if len(cache) >= _RULE_CACHE_SIZE:
            cache.clear()  # crude but bounded; a busy server refills it at once
        cache[topic] = found
        return found

    def announces_join_leave(self, topic: str) -> bool:
        """Whether the rule of ``topic`` (assumed valid) announces join and leave."""
        rule = self.rule_for(topic)
        return rule is not None and rule.join_leave

    def rule_for(self, topic: str) -> TopicRule | None:
        """The first rule whose pattern matches ``topic`` (assumed valid), or None."""
        compiled = self._lookup(topic)
        return None if compiled is None else compiled.rule

    def validate(self, topic: str, data: Any) -> str:
        """Check ``data`` (a strictly parsed JSON value) for ``topic``; return it serialized.

        In order: nesting depth, compact UTF-8 size, then the schema of the
        first matching rule. The depth check runs first so that neither the
        serializer nor the schema validator ever recurses through a deep value.
        The returned compact text is what the caller should send, so the
        payload is serialized exactly once. Raises RequestError
        ``invalid_payload`` and nothing else for any JSON value. ``data`` must
        be a tree as ``jsonstrict.loads`` builds it: a Python object that is not
        JSON at all (a set, bytes) makes the serializer raise TypeError, and
        circular structures are not supported.
        """
        nesting = depth(data)
        if nesting > self.max_depth:
            raise _invalid(f"payload nests {nesting} deep, over the limit of {self.max_depth}")
        try:
            text = dumps(data)
            size = len(text) if text.isascii() else len(text.encode("utf-8"))
        except RecursionError:
            raise _invalid("payload nests too deeply to serialize") from None
        except UnicodeEncodeError:
            raise _invalid("payload contains an unpaired surrogate") from None
        except ValueError as error:
            # NaN or infinity, a circular structure, an integer with too many digits.
            raise _invalid(f"payload is not valid JSON: {_one_line(str(error))}") from None
        if size > self.max_bytes:
            raise _invalid(f"payload is {size} bytes, over the {self.max_bytes}-byte limit")
        compiled = self._lookup(topic)
        if compiled is not None and compiled.validator is not None:
            self._check_schema(compiled, data)
        return text

    @staticmethod
    def _check_schema(compiled: _Compiled, data: Any) -> None:
        pattern = compiled.rule.pattern.text
        try:
            error = next(iter(compiled.validator.iter_errors(data)), None)
        except RecursionError:
            raise _invalid(
                f"payload could not be checked against the schema for {pattern}: "
                "the schema recurses too deeply"
            ) from None
        except referencing.exceptions.Unresolvable as unresolvable:
            raise _invalid(
                f"payload could not be checked against the schema for {pattern}: "
                f"{_one_line(str(unresolvable))}"
            ) from None
        if error is not None:
            detail = _one_line(f"{error.message} (at {error.json_path})")
            raise _invalid(f"payload does not match the schema for {pattern}: {detail}")
