"""The client's address behind trusted reverse proxies (Forwarded / X-Forwarded-For)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from securepub.core.errors import ConfigError
from securepub.core.tickets import normalize_ip

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ClientAddress:
    """Who the client is, and whether forwarding headers were ignored to say so."""

    ip: str
    #: The TCP peer sent forwarding headers but is not a trusted proxy.
    ignored_headers: bool = False


def _forwarded_for(values: Sequence[str]) -> list[str] | None:
    """The ``for=`` addresses of RFC 7239 ``Forwarded`` headers, oldest first."""
    hops: list[str] = []
    for value in values:
        for element in value.split(","):
            found = None
            for pair in element.split(";"):
                name, _, token = pair.strip().partition("=")
                if name.strip().lower() == "for":
                    found = token.strip().strip('"')
            if found is None:
                return None
            if found.startswith("["):  # "[2001:db8::1]:4711"
                found = found[1:].partition("]")[0]
            elif found.count(":") == 1:  # "192.0.2.1:4711"
                found = found.partition(":")[0]
            hops.append(found)
    return hops


def _x_forwarded_for(values: Sequence[str]) -> list[str]:
    return [hop.strip() for value in values for hop in value.split(",")]


class ProxyPolicy:
    """Which TCP peers are trusted proxies, and how to find the client behind them.

    Only when the TCP peer is a trusted proxy are forwarding headers read,
    and then from the right: the client is the rightmost address that is not
    itself a trusted proxy (every hop before it could have been written by
    the client). Anything unparseable ends the walk at the last trusted hop.
    """

    def __init__(self, trusted: Iterable[str]) -> None:
        networks: list[Network] = []
        for text in trusted:
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
            except (ValueError, TypeError):
                raise ConfigError(f"trusted_proxies: {str(text)[:60]!r} is not a network") from None
        self._networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    def client(
        self, peer: str, forwarded: Sequence[str], x_forwarded_for: Sequence[str]
    ) -> ClientAddress:
        """The client's address given the TCP peer and the request's headers."""
        if not self.trusts(peer):
            return ClientAddress(peer, ignored_headers=bool(forwarded or x_forwarded_for))
        if forwarded:
            hops = _forwarded_for(forwarded)
        elif x_forwarded_for:
            hops = _x_forwarded_for(x_forwarded_for)
        else:
            return ClientAddress(peer)
        client = peer
        for hop in reversed(hops or []):
            try:
                client = normalize_ip(hop)
            except ValueError:
                break
            if not self.trusts(client):
                break
        return ClientAddress(client)
