"""Backend API keys: loaded once, compared in constant time, never shown."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable

from securepub.errors import ConfigError

#: Keys shorter than this are refused: a backend credential must not be guessable.
MIN_KEY_LENGTH = 16


def _digest(key: bytes) -> bytes:
    # Comparing fixed-length digests keeps compare_digest from leaking the
    # length of the configured keys through timing.
    return hashlib.sha256(key).digest()


class ApiKeys:
    """The set of accepted backend API keys.

    Only SHA-256 digests are kept, and ``repr`` shows a count, so a key can
    reach neither a log line nor a traceback through this object.
    """

    __slots__ = ("_digests",)

    def __init__(self, keys: Iterable[bytes]) -> None:
        self._digests = tuple(_digest(k) for k in keys)

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"<ApiKeys: {len(self._digests)} key(s)>"

    def replace(self, other: ApiKeys) -> None:
        """Take ``other``'s keys (a reload): one assignment, so no check sees half."""
        self._digests = other._digests

    def check(self, candidate: bytes) -> bool:
        """Whether ``candidate`` is one of the keys, in time independent of which."""
        wanted = _digest(candidate)
        found = False
        for digest in self._digests:
            # No early exit: every key is compared whatever the outcome.
            found |= hmac.compare_digest(digest, wanted)
        return found


def load_api_keys(path: str) -> ApiKeys:
    """Read one key per line; blank lines and ``#`` comments are skipped."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"api_key_file: cannot read {path}: {e.strerror}") from None
    keys = []
    for number, line in enumerate(raw.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        if len(line) < MIN_KEY_LENGTH:
            raise ConfigError(
                f"api_key_file: {path} line {number}: key is shorter than "
                f"{MIN_KEY_LENGTH} characters"
            )
        if any(c <= 0x20 or c >= 0x7F for c in line):
            raise ConfigError(
                f"api_key_file: {path} line {number}: key must be printable ASCII without spaces"
            )
        keys.append(line)
    if not keys:
        raise ConfigError(f"api_key_file: {path} holds no API key")
    return ApiKeys(keys)


def world_readable(path: str) -> bool:
    """Whether other users may read the file (the start warns about it)."""
    try:
        return bool(os.stat(path).st_mode & 0o004)
    except OSError:
        return False
