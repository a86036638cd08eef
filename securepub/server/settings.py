"""The one place command-line options, the TOML file and defaults meet."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from securepub.core import jsonstrict
from securepub.core.apikeys import ApiKeys, load_api_keys
from securepub.core.clientip import ProxyPolicy
from securepub.core.errors import ConfigError, RequestError
from securepub.core.history import (
    DEFAULT_HISTORY_TTL,
    HISTORY_ENTRY_OVERHEAD,
    MAX_HISTORY_SIZE,
    MAX_HISTORY_TTL,
    MIN_HISTORY_TTL,
    HistoryPolicy,
)
from securepub.core.limits import Limits
from securepub.core.topics import Pattern
from securepub.core.validation import TopicRule
from securepub.engines.redis.link import RedisTarget
from securepub.engines.redis.signing import ClusterSigner, load_cluster_secret

DEFAULT_PORT = 8443
DEFAULT_INTERFACE = "127.0.0.1"

#: Keys settable both on the command line (dashes for underscores) and in TOML.
_OPTION_KEYS = (
    "port",
    "interface",
    "cert",
    "key",
    "client_ca",
    "api_key_file",
    "redis",
    "redis_ca",
    "cluster_secret_file",
    "audit_log",
)
_TOP_KEYS = frozenset(_OPTION_KEYS) | {
    "allowed_origins",
    "origin_policy",
    "limits",
    "topics",
    "trusted_proxies",
    "reuse_port",
}
_TOPIC_KEYS = frozenset(
    {
        "pattern",
        "schema",
        "client_publish",
        "history_size",
        "history_ttl",
        "presence",
        "join_leave",
    }
)
_PATH_KEYS = (
    "cert",
    "key",
    "client_ca",
    "api_key_file",
    "redis_ca",
    "cluster_secret_file",
    "audit_log",
)


# (key, type, minimum, maximum): bounds keep a typo from disabling a guard.
_LIMIT_SPECS: tuple[tuple[str, type, float, float], ...] = (
    ("max_message_bytes", int, 1, 16 * 1024 * 1024),
    ("max_json_depth", int, 1, 256),
    ("max_subscriptions", int, 1, 100_000),
    ("max_connections_per_ip", int, 1, 1_000_000),
    ("max_publish_rate", float, 0.001, 1_000_000),
    ("max_errors", int, 1, 1_000_000),
    ("max_queued_bytes", int, 64 * 1024, 1024 * 1024 * 1024),
    ("max_history_bytes", int, 1024 * 1024, 64 * 1024 * 1024 * 1024),
    ("max_session_seconds", int, 1, 86_400),
    ("min_session_seconds", int, 1, 86_400),
    ("max_opening_connections", int, 2, 1_000_000),
)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a node needs, validated once at start and passed down."""

    port: int
    interface: str
    cert: str
    key: str
    api_keys: ApiKeys = field(repr=False)
    api_key_file: str
    allowed_origins: tuple[str, ...] = ()
    origin_policy: str = "enforce"
    limits: Limits = field(default_factory=Limits)
    topics: tuple[TopicRule, ...] = ()
    dev: bool = False
    client_ca: str | None = None
    #: The Redis servers of the cluster (none: the embedded engine).
    redis: tuple[RedisTarget, ...] = ()
    cluster_signer: ClusterSigner | None = field(default=None, repr=False)
    audit_log: str | None = None
    proxies: ProxyPolicy = field(default_factory=lambda: ProxyPolicy(()))
    reuse_port: bool = False

    @property
    def enforce_origin(self) -> bool:
        return self.origin_policy == "enforce"


DEMO_PATTERN: Final = "demo.>"
DEMO_HISTORY_SIZE: Final = 100


def demo_topic_rule() -> TopicRule:
    """The ``[[topics]]`` rule --dev adds so the demo page's publish form can work.

    Equivalent to ``pattern = "demo.>"``, ``client_publish = true``, no schema,
    ``history_size = 100`` (so the quick tour can show a recovery).
    """
    return TopicRule(
        pattern=Pattern.parse(DEMO_PATTERN),
        client_publish=True,
        history=HistoryPolicy(size=DEMO_HISTORY_SIZE),
    )


def with_demo_rule(rules: Sequence[TopicRule]) -> tuple[TopicRule, ...]:
    """``rules`` with `demo_topic_rule` appended (for --dev).

    Appended, because the first matching rule governs a topic: a configured
    rule that matches a demo topic keeps deciding it (its schema, its
    ``client_publish``), and the demo rule only opens the demo topics that no
    configured rule mentions.
    """
    return (*rules, demo_topic_rule())


def _load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path} is not valid TOML: {e}") from None


def _relative_to(base: str, value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a non-empty path string")
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base, value))


def _as_int(key: str, value: object, low: float, high: float) -> int:
    if isinstance(value, str):
        text = value
        try:
            value = int(text, 10)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {text[:40]!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise ConfigError(f"{key}: {value} is out of range {low:g} to {high:g}")
    return value


def _as_float(key: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}: expected a number, got {type(value).__name__}")
    if not low <= value <= high:
        raise ConfigError(f"{key}: {value} is out of range {low:g} to {high:g}")
    return float(value)


def _limits(table: object) -> Limits:
    if not isinstance(table, Mapping):
        raise ConfigError("limits: expected a table")
    known = {spec[0] for spec in _LIMIT_SPECS}
    for key in table:
        if key not in known:
            raise ConfigError(f"limits: unknown key {key!r}")
    values: dict[str, Any] = {}
    for key, kind, low, high in _LIMIT_SPECS:
        if key in table:
            convert = _as_int if kind is int else _as_float
            values[key] = convert(f"limits.{key}", table[key], low, high)
    limits = Limits(**values)
    if limits.min_session_seconds > limits.max_session_seconds:
        raise ConfigError(
            f"limits.min_session_seconds: {limits.min_session_seconds} is over "
            f"limits.max_session_seconds ({limits.max_session_seconds})"
        )
    return limits


def _topic_rules(items: object, base: str) -> tuple[TopicRule, ...]:
    if not isinstance(items, list):
        raise ConfigError("topics: expected an array of tables ([[topics]])")
    rules = []
    for index, item in enumerate(items):
        where = f"topics[{index}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}: expected a table")
        for key in item:
            if key not in _TOPIC_KEYS:
                raise ConfigError(f"{where}: unknown key {key!r}")
        if "pattern" not in item:
            raise ConfigError(f"{where}: 'pattern' is required")
        try:
            pattern = Pattern.parse(item["pattern"])
        except RequestError as e:
            raise ConfigError(f"{where}.pattern: {e.message}") from None
        client_publish, presence, join_leave = (
            _flag(item, name, where) for name in ("client_publish", "presence", "join_leave")
        )
        if join_leave and not presence:
            raise ConfigError(f"{where}.join_leave: only used together with presence = true")
        schema = None
        source = None
        if "schema" in item:
            source = _relative_to(base, item["schema"], f"{where}.schema")
            schema = _load_schema(source, f"{where}.schema")
        rules.append(
            TopicRule(
                pattern=pattern,
                schema=schema,
                client_publish=client_publish,
                schema_source=source,
                history=_history(item, where),
                presence=presence,
                join_leave=join_leave,
            )
        )
    return tuple(rules)


def _flag(item: Mapping[str, Any], name: str, where: str) -> bool:
    value = item.get(name, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}.{name}: expected true or false")
    return value


def _history(item: Mapping[str, Any], where: str) -> HistoryPolicy | None:
    """A rule's ``history_size`` and ``history_ttl`` (SPEC section 8); None keeps none."""
    size = _as_int(f"{where}.history_size", item.get("history_size", 0), 0, MAX_HISTORY_SIZE)
    ttl = _as_int(
        f"{where}.history_ttl",
        item.get("history_ttl", DEFAULT_HISTORY_TTL),
        MIN_HISTORY_TTL,
        MAX_HISTORY_TTL,
    )
    if not size:
        if "history_ttl" in item:
            raise ConfigError(f"{where}.history_ttl: only used together with history_size")
        return None
    return HistoryPolicy(size=size, ttl=ttl)


def _check_history_bound(rules: Sequence[TopicRule], limits: Limits) -> None:
    """One topic's fullest history must fit the embedded engine's memory bound.

    The engine evicts whole topics (oldest first) to stay under
    ``max_history_bytes``; a rule whose single topic could outgrow the
    bound would evict everything else and still not fit, so it is refused.
    """
    for index, rule in enumerate(rules):
        if rule.history is None:
            continue
        worst = rule.history.size * (limits.max_message_bytes + HISTORY_ENTRY_OVERHEAD)
        if worst > limits.max_history_bytes:
            raise ConfigError(
                f"topics[{index}].history_size: {rule.history.size} messages of up to "
                f"{limits.max_message_bytes} bytes could take {worst} bytes, over "
                f"limits.max_history_bytes ({limits.max_history_bytes}); lower one or "
                "raise the bound"
            )


def _load_schema(path: str, key: str) -> Mapping[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None
    try:
        schema = jsonstrict.loads(raw)
    except RequestError as e:
        raise ConfigError(f"{key}: {path} is not strict JSON: {e.message}") from None
    if not isinstance(schema, (dict, bool)):
        raise ConfigError(f"{key}: {path} must hold a JSON object")
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    return schema


def _redis_targets(value: object, ca: object) -> tuple[RedisTarget, ...]:
    """``redis``: one URL, or a list of them (several servers share the load)."""
    if value is None:
        return ()
    urls = [value] if isinstance(value, str) else value
    if not isinstance(urls, (list, tuple)) or not urls or not all(isinstance(u, str) for u in urls):
        raise ConfigError("redis: expected a redis:// or rediss:// URL, or a list of them")
    if ca is not None and not isinstance(ca, str):
        raise ConfigError("redis_ca: expected a path")
    targets = tuple(RedisTarget.parse(url, ca) for url in urls)
    names = [t.display() for t in targets]
    if len(set(names)) != len(names):
        raise ConfigError("redis: the same server is listed twice")
    return targets


def _string_list(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: expected a list of strings")
    return tuple(value)


def load_settings(
    options: Mapping[str, Any],
    cwd: str | None = None,
    dev_paths: Mapping[str, str] | None = None,
) -> Settings:
    """Merge ``options`` (command line, ``None`` when not given) over the TOML file.

    ``dev_paths`` holds the generated ``cert``, ``key`` and ``api_key_file``
    used as defaults under ``--dev``. Raises `ConfigError` naming the key.
    """
    cwd = cwd or os.getcwd()
    merged: dict[str, Any] = {}
    config_path = options.get("config")
    if config_path:
        config_path = os.path.join(cwd, config_path)
        table = _load_toml(config_path)
        for key in table:
            if key not in _TOP_KEYS:
                raise ConfigError(f"config: unknown key {key!r} in {config_path}")
        base = os.path.dirname(os.path.abspath(config_path))
        for key, value in table.items():
            merged[key] = _relative_to(base, value, key) if key in _PATH_KEYS else value
    else:
        base = cwd
    for key in _OPTION_KEYS:
        value = options.get(key.replace("_", "-"), options.get(key))
        if value is not None:
            merged[key] = _relative_to(cwd, value, key) if key in _PATH_KEYS else value
    dev = bool(options.get("dev"))
    if dev and dev_paths:
        for key, value in dev_paths.items():
            merged.setdefault(key, value)

    port = _as_int("port", merged.get("port", DEFAULT_PORT), 0, 65535)
    interface = merged.get("interface", DEFAULT_INTERFACE)
    if not isinstance(interface, str):
        raise ConfigError("interface: expected an IP address string")
    try:
        ipaddress.ip_address(interface)
    except ValueError:
        raise ConfigError(f"interface: {interface[:60]!r} is not an IP address") from None
    for key in ("cert", "key", "api_key_file"):
        if not merged.get(key):
            raise ConfigError(f"{key}: required (or use --dev for generated development files)")
    redis = _redis_targets(merged.get("redis"), merged.get("redis_ca"))
    if not redis and merged.get("redis_ca") is not None:
        raise ConfigError("redis_ca: only used together with redis")
    signer = None
    if merged.get("cluster_secret_file") is not None:
        if not redis:
            raise ConfigError("cluster_secret_file: only used together with redis")
        signer = load_cluster_secret(merged["cluster_secret_file"])
    reuse_port = bool(options.get("reuse-port")) or merged.get("reuse_port", False)
    if not isinstance(reuse_port, bool):
        raise ConfigError("reuse_port: expected true or false")
    if reuse_port and not redis:
        raise ConfigError("reuse_port: needs redis, which carries messages between the processes")
    policy = merged.get("origin_policy", "enforce")
    if policy not in ("enforce", "log"):
        raise ConfigError(f"origin_policy: expected 'enforce' or 'log', got {str(policy)[:40]!r}")
    origins = _string_list(merged.get("allowed_origins", []), "allowed_origins")
    if dev:
        origins += (f"https://localhost:{port}", f"https://127.0.0.1:{port}")
    limits = _limits(merged.get("limits", {}))
    topics = _topic_rules(merged.get("topics", []), base)
    if not redis:
        _check_history_bound(topics, limits)
    if dev:
        # The demo page publishes on demo.> (after the configured rules, which win).
        topics = with_demo_rule(topics)
    api_key_file = merged["api_key_file"]
    return Settings(
        port=port,
        interface=interface,
        cert=merged["cert"],
        key=merged["key"],
        api_keys=load_api_keys(api_key_file),
        api_key_file=api_key_file,
        allowed_origins=origins,
        origin_policy=policy,
        limits=limits,
        topics=topics,
        dev=dev,
        redis=redis,
        cluster_signer=signer,
        audit_log=merged.get("audit_log"),
        client_ca=merged.get("client_ca"),
        reuse_port=reuse_port,
        proxies=ProxyPolicy(_string_list(merged.get("trusted_proxies", []), "trusted_proxies")),
    )
