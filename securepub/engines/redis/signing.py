"""Signatures on messages passed between nodes, so Redis write access cannot forge them."""

from __future__ import annotations

import hashlib
import hmac

from securepub.core.errors import ConfigError

#: Shortest accepted cluster secret, in bytes.
MIN_SECRET_BYTES = 32


class ClusterSigner:
    """HMAC-SHA256 under the cluster's shared secret; ``repr`` never shows it."""

    __slots__ = ("_key",)

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"cluster_secret_file: the secret must be at least {MIN_SECRET_BYTES} bytes"
            )
        self._key = secret

    def __repr__(self) -> str:
        return "<ClusterSigner>"

    def sign(self, text: str) -> str:
        return hmac.new(self._key, text.encode("utf-8"), hashlib.sha256).hexdigest()

    def verify(self, text: str, signature: str) -> bool:
        return hmac.compare_digest(self.sign(text), signature)


def load_cluster_secret(path: str) -> ClusterSigner:
    """The secret is the file's content, surrounding whitespace removed."""
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise ConfigError(f"cluster_secret_file: cannot read {path}: {e.strerror}") from None
    return ClusterSigner(secret)
