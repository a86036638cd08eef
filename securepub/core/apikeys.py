"""Backend API keys: loaded once, compared in constant time, never shown."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable

from securepub.core.errors import ConfigError, RequestError
from securepub.core.topics import Pattern

#: Keys shorter than this are refused: a backend credential must not be guessable.
MIN_KEY_LENGTH = 16


def _digest(key: bytes) -> bytes:
    # Comparing fixed-length digests keeps compare_digest from leaking the
    # length of the configured keys through timing.
    return hashlib.sha256(key).digest()


#: What a credential may publish on: None for any topic, else these patterns.
Scopes = tuple[Pattern, ...] | None


class ApiKeys:
    """The accepted backend API keys, each with its publish scopes.

    Only SHA-256 digests are kept, and ``repr`` shows a count, so a key can
    reach neither a log line nor a traceback through this object.
    """

    __slots__ = ("_entries",)

    def __init__(self, keys: Iterable[bytes | tuple[bytes, Scopes]]) -> None:
        entries = []
        for key in keys:
            raw, scopes = key if isinstance(key, tuple) else (key, None)
            entries.append((_digest(raw), scopes))
        self._entries: tuple[tuple[bytes, Scopes], ...] = tuple(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<ApiKeys: {len(self._entries)} key(s)>"

    def replace(self, other: ApiKeys) -> None:
        """Take ``other``'s keys (a reload): one assignment, so no check sees half."""
        self._entries = other._entries

    def lookup(self, candidate: bytes) -> tuple[bool, Scopes]:
        """Whether ``candidate`` is a key, and its scopes; in time independent of which."""
        wanted = _digest(candidate)
        found = False
        scopes: Scopes = None
        for digest, key_scopes in self._entries:
            # No early exit: every key is compared whatever the outcome.
            if hmac.compare_digest(digest, wanted):
                found = True
                scopes = key_scopes
        return found, scopes

    def check(self, candidate: bytes) -> bool:
        """Whether ``candidate`` is one of the keys."""
        return self.lookup(candidate)[0]


def _scopes(options: list[bytes], path: str, number: int) -> Scopes:
    """``publish=orders.>,news.*`` after a key limits what it may publish on."""
    scopes: Scopes = None
    for option in options:
        name, _, value = option.partition(b"=")
        if name != b"publish" or not value or scopes is not None:
            raise ConfigError(
                f"api_key_file: {path} line {number}: after the key only one "
                "publish=PATTERN[,PATTERN...] may follow"
            )
        try:
            scopes = tuple(Pattern.parse(p) for p in value.decode("ascii").split(","))
        except (RequestError, UnicodeDecodeError):
            raise ConfigError(
                f"api_key_file: {path} line {number}: publish= holds a bad topic pattern"
            ) from None
    return scopes


def load_api_keys(path: str) -> ApiKeys:
    """Read one key per line; blank lines and ``#`` comments are skipped."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"api_key_file: cannot read {path}: {e.strerror}") from None
    keys: list[tuple[bytes, Scopes]] = []
    for number, text in enumerate(raw.splitlines(), start=1):
        fields = text.split()
        if not fields or fields[0].startswith(b"#"):
            continue
        line, options = fields[0], fields[1:]
        if len(line) < MIN_KEY_LENGTH:
            raise ConfigError(
                f"api_key_file: {path} line {number}: key is shorter than "
                f"{MIN_KEY_LENGTH} characters"
            )
        if any(c <= 0x20 or c >= 0x7F for c in line):
            raise ConfigError(
                f"api_key_file: {path} line {number}: key must be printable ASCII without spaces"
            )
        keys.append((line, _scopes(options, path, number)))
    if not keys:
        raise ConfigError(f"api_key_file: {path} holds no API key")
    return ApiKeys(keys)


def world_readable(path: str) -> bool:
    """Whether other users may read the file (the start warns about it)."""
    try:
        return bool(os.stat(path).st_mode & 0o004)
    except OSError:
        return False
