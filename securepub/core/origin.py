"""The WebSocket Origin check: which web pages may open a connection."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from securepub.core.errors import ConfigError

__all__ = ["OriginDecision", "OriginPolicy", "normalize_origin"]

DEFAULT_PORTS: Final = MappingProxyType({"http": 80, "https": 443})

LOGGED_ORIGIN_CHARS: Final = 200
"""How much of a raw Origin header a decision keeps for the log."""

_MAX_ORIGIN_CHARS: Final = 1024

# scheme "://" authority, and nothing after it: browsers serialize an origin
# without path, query or fragment, so anything more (even "/") is malformed.
_ORIGIN: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#@\\]*)")
_IPV6_AUTHORITY: Final = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::([0-9]{1,5}))?")
_NAME_AUTHORITY: Final = re.compile(r"([A-Za-z0-9._-]+)(?::([0-9]{1,5}))?")
_LABEL: Final = re.compile(r"[a-z0-9_-]{1,63}")
_NUMERIC_LABEL: Final = re.compile(r"[0-9]+|0x[0-9a-f]*")


def normalize_origin(value: str) -> str | None:
    """Return ``scheme://host:port`` for a serialized origin, or ``None``.

    Scheme and host are lowercased and the default port is made explicit
    (``https://Example.COM`` -> ``https://example.com:443``), so origins
    compare as scheme, host and port (SPEC section 3). IPv6 hosts are kept
    in brackets in their compressed form. ``None`` for ``null``, for
    schemes other than http and https, for anything with userinfo, a path
    (even ``/``), a query or a fragment, for bad ports, for non-ASCII hosts
    (browsers send IDNA as ``xn--`` ASCII) and for any other garbage.
    """
    if not isinstance(value, str) or len(value) > _MAX_ORIGIN_CHARS or not value.isascii():
        return None
    match = _ORIGIN.fullmatch(value)
    if match is None:
        return None
    scheme = match.group(1).lower()
    if scheme not in DEFAULT_PORTS:
        return None
    authority = match.group(2)
    ipv6 = _IPV6_AUTHORITY.fullmatch(authority)
    if ipv6 is not None:
        try:
            address = ipaddress.IPv6Address(ipv6.group(1))
        except ValueError:
            return None
        host = f"[{address.compressed}]"
        port_text = ipv6.group(2)
    else:
        name = _NAME_AUTHORITY.fullmatch(authority)
        if name is None:
            return None
        normalized = _normalize_host(name.group(1))
        if normalized is None:
            return None
        host = normalized
        port_text = name.group(2)
    if port_text is None:
        port = DEFAULT_PORTS[scheme]
    else:
        port = int(port_text)
        if not 1 <= port <= 65535:
            return None
    return f"{scheme}://{host}:{port}"


def _normalize_host(text: str) -> str | None:
    """Lowercase a DNS name or dotted-quad IPv4 address; ``None`` if it is neither.

    A name whose last label is numeric is an IPv4 address to a browser, which
    would have serialized it as a dotted quad: other spellings are refused.
    """
    host = text.lower()
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return None
    if _NUMERIC_LABEL.fullmatch(labels[-1]) is not None:
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            return None
    return host


@dataclass(frozen=True)
class OriginDecision:
    """The outcome of one Origin check, with a reason for the log.

    ``reason`` is one of ``no_origin``, ``allowed``, ``not_allowed``,
    ``malformed`` and ``log_only`` (log mode, would have been refused).
    ``origin`` is the raw header, cut to ``LOGGED_ORIGIN_CHARS`` characters.
    """

    allowed: bool
    origin: str | None
    reason: str


class OriginPolicy:
    """Decides on the ``Origin`` header of a WebSocket handshake.

    A request without Origin comes from a non-browser client and passes this
    check (it still needs a ticket). With ``enforce`` an Origin must be in
    ``allowed_origins`` (``null`` and malformed values never are); without
    it every request passes and would-be refusals are marked ``log_only``.
    """

    def __init__(self, allowed_origins: Iterable[str], enforce: bool) -> None:
        if isinstance(allowed_origins, str):
            raise ConfigError("allowed_origins: expected a list of origins, not one string")
        normalized: set[str] = set()
        for configured in allowed_origins:
            origin = normalize_origin(configured)
            if origin is None:
                raise ConfigError(
                    f"allowed_origins: {str(configured)[:LOGGED_ORIGIN_CHARS]!r} is not "
                    "an origin (expected scheme://host[:port], http or https, no path)"
                )
            normalized.add(origin)
        self._allowed: frozenset[str] = frozenset(normalized)
        self._enforce = enforce

    @property
    def allowed_origins(self) -> frozenset[str]:
        """The configured origins, normalized."""
        return self._allowed

    @property
    def enforce(self) -> bool:
        """Whether a refused Origin refuses the handshake (else it is only logged)."""
        return self._enforce

    @property
    def allows_nothing(self) -> bool:
        """Every request with an Origin is refused: enforcing with an empty list."""
        return self._enforce and not self._allowed

    def check(self, header: str | None) -> OriginDecision:
        """Decide on one handshake's ``Origin`` header (``None`` when absent)."""
        if header is None:
            return OriginDecision(allowed=True, origin=None, reason="no_origin")
        logged = header[:LOGGED_ORIGIN_CHARS]
        origin = normalize_origin(header)
        if origin is not None and origin in self._allowed:
            return OriginDecision(allowed=True, origin=logged, reason="allowed")
        if not self._enforce:
            return OriginDecision(allowed=True, origin=logged, reason="log_only")
        reason = "malformed" if origin is None else "not_allowed"
        return OriginDecision(allowed=False, origin=logged, reason=reason)
