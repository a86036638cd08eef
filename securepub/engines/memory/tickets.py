"""The embedded ticket store: tickets held in this process, each redeemed once."""

from __future__ import annotations

import heapq
import secrets
from collections.abc import Callable
from typing import Final

from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import implementer

from securepub.core.tickets import (
    TOKEN_BYTES,
    ITicketStore,
    SecondsClock,
    StoreUnavailable,
    Ticket,
    TicketRefused,
    encode_token,
    is_token,
    token_key,
)

_ISSUE_ATTEMPTS: Final = 8


@implementer(ITicketStore)
class MemoryTicketStore:
    """A single-node ticket store held in process memory.

    Entries are keyed by the SHA-256 of the token; the token itself is never
    kept, so a dump of the store yields no usable ticket. A redeemed or
    burned ticket leaves a tombstone until its expiry so that a replay is
    reported as ``already_redeemed``. Expired entries are purged lazily on
    every ``issue``/``redeem`` from a heap ordered by expiry, which keeps
    memory bounded under a flood of unredeemed tickets without any timer.
    Because the purge is lazy, an expired ticket is reported as ``expired``
    only while it is still held; once purged it is ``unknown``.
    """

    def __init__(
        self,
        clock: SecondsClock,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self._clock = clock
        self._randbytes = randbytes
        self._live: dict[bytes, Ticket] = {}
        self._tombstones: dict[bytes, float] = {}
        # One (expires_at, key) entry per key in _live or _tombstones.
        self._expiries: list[tuple[float, bytes]] = []

    def __repr__(self) -> str:
        return f"<MemoryTicketStore live={len(self._live)} tombstones={len(self._tombstones)}>"

    def issue(self, ticket: Ticket) -> Deferred[str]:
        """Store ``ticket`` under the hash of a fresh token; fire with the token."""
        self.purge()
        for _ in range(_ISSUE_ATTEMPTS):
            raw = self._randbytes(TOKEN_BYTES)
            if len(raw) != TOKEN_BYTES:
                return defer.fail(StoreUnavailable("randomness source returned a short read"))
            token = encode_token(raw)
            key = token_key(token)
            if key not in self._live and key not in self._tombstones:
                self._live[key] = ticket
                heapq.heappush(self._expiries, (ticket.expires_at, key))
                return defer.succeed(token)
        # Only a broken randomness source gets here.
        return defer.fail(StoreUnavailable("could not generate a fresh ticket token"))

    def redeem(self, token: str, peer_ip: str) -> Deferred[Ticket]:
        """Consume the ticket for ``token`` if it is live, unexpired and ours."""
        try:
            return self._redeem(token, peer_ip)
        finally:
            # After the lookup, so a ticket at its deadline says "expired".
            self.purge()

    def _redeem(self, token: str, peer_ip: str) -> Deferred[Ticket]:
        if not is_token(token):
            return defer.fail(TicketRefused("unknown"))
        key = token_key(token)
        now = self._clock.seconds()
        ticket = self._live.pop(key, None)
        if ticket is None:
            tombstone = self._tombstones.get(key)
            if tombstone is not None and now < tombstone:
                return defer.fail(TicketRefused("already_redeemed"))
            return defer.fail(TicketRefused("unknown"))
        # Consumed from here on, whatever the outcome.
        if now >= ticket.expires_at:
            # No tombstone: the heap entry is purged right after this call.
            return defer.fail(TicketRefused("expired"))
        self._tombstones[key] = ticket.expires_at
        if not ticket.binds(peer_ip):
            return defer.fail(TicketRefused("wrong_ip"))
        return defer.succeed(ticket)

    def purge(self) -> int:
        """Drop live tickets and tombstones whose expiry has passed; return how many."""
        now = self._clock.seconds()
        expiries = self._expiries
        dropped = 0
        while expiries and expiries[0][0] <= now:
            _, key = heapq.heappop(expiries)
            if self._live.pop(key, None) is not None or self._tombstones.pop(key, None) is not None:
                dropped += 1
        return dropped

    def size(self) -> int:
        """Number of entries held (live tickets and tombstones)."""
        return len(self._live) + len(self._tombstones)

    def revoke_user(self, user: str) -> Deferred[int]:
        """Burn ``user``'s live tickets (a scan: revocation is rare, issuing is not)."""
        keys = [key for key, ticket in self._live.items() if ticket.user == user]
        for key in keys:
            self._tombstones[key] = self._live.pop(key).expires_at
        return defer.succeed(len(keys))
