"""Tickets shared by every node through Redis, each redeemed once, atomically."""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.python.failure import Failure
from zope.interface import implementer

from securepub.core.errors import RequestError
from securepub.core.tickets import (
    ITicketStore,
    SecondsClock,
    StoreUnavailable,
    Ticket,
    TicketRefused,
    encode_token,
    is_token,
    token_key,
)
from securepub.core.topics import Pattern
from securepub.engines.redis.link import IRedisLink, RedisUnavailable, Script
from securepub.engines.redis.ring import Ring

KEY_PREFIX = "securepub:ticket:"
USED_PREFIX = "securepub:ticket-used:"
#: A set per user (keyed by the user's hash) of that user's ticket keys, for revocation.
USER_PREFIX = "securepub:user-tickets:"

# Store a ticket and add it to its user's set in one step; the set lives as
# long as the user's longest ticket.
ISSUE_SCRIPT = """
if not redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX') then return 0 end
redis.call('SADD', KEYS[2], KEYS[1])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return 1
"""

# Delete every ticket in the user's set, and the set: the count of tickets
# that were still there (not yet redeemed or expired) is returned.
REVOKE_SCRIPT = """
local revoked = 0
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  revoked = revoked + redis.call('DEL', key)
end
redis.call('DEL', KEYS[1])
return revoked
"""

# Redeem in one step on the server, so two nodes racing on a ticket cannot
# both win: take the ticket and leave a tombstone for the rest of its life
# (so a replay is logged as such), or say whether a tombstone is there.
REDEEM_SCRIPT = """
local value = redis.call('GET', KEYS[1])
if value then
  local ttl = redis.call('PTTL', KEYS[1])
  redis.call('DEL', KEYS[1])
  if ttl > 0 then redis.call('SET', KEYS[2], '1', 'PX', ttl) end
  return {1, value}
end
return {redis.call('EXISTS', KEYS[2]) * 2}
"""


ISSUE = Script(ISSUE_SCRIPT)
REVOKE = Script(REVOKE_SCRIPT)
REDEEM = Script(REDEEM_SCRIPT)
#: New tokens drawn, at most, to find one whose server is up.
ISSUE_ATTEMPTS = 32


def _dump(ticket: Ticket) -> str:
    return json.dumps(
        {
            "user": ticket.user,
            "client_ip": ticket.client_ip,
            "subscribe": [p.text for p in ticket.subscribe],
            "publish": [p.text for p in ticket.publish],
            "expires_at": ticket.expires_at,
            "session_ttl": ticket.session_ttl,
        },
        separators=(",", ":"),
    )


def _load(value: str) -> Ticket:
    """Rebuild a ticket from Redis; anything malformed there is refused, not trusted."""
    try:
        data = json.loads(value)
        return Ticket(
            user=data["user"],
            client_ip=data["client_ip"],
            subscribe=tuple(Pattern.parse(p) for p in data["subscribe"]),
            publish=tuple(Pattern.parse(p) for p in data["publish"]),
            expires_at=float(data["expires_at"]),
            session_ttl=_optional_seconds(data.get("session_ttl")),
        )
    except (RequestError, ValueError, KeyError, TypeError, AttributeError):
        raise TicketRefused("unknown") from None


def _optional_seconds(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("session_ttl is not a number")
    return float(value)


@implementer(ITicketStore)
class RedisTicketStore:
    """The cluster's ticket store: entries live in Redis under the token's hash.

    With several Redis servers each ticket lives on the one its hash places
    it on (consistent hashing over the servers' names, the same on every
    node), so it is still redeemed by one script on one server: exactly once.
    A new ticket whose server is down is simply drawn again, so issuing
    fails only when every server is. A user's ticket list lives beside each
    ticket, and revocation asks every server. Redis expires an entry with the
    ticket (its TTL is the ticket's life); the node still checks
    ``expires_at`` and the IP binding itself.
    """

    def __init__(
        self,
        servers: Sequence[tuple[str, IRedisLink]],
        clock: SecondsClock,
        randbytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self._ring: Ring[IRedisLink] = Ring(servers)
        self._clock = clock
        self._randbytes = randbytes

    def issue(self, ticket: Ticket) -> Deferred[str]:
        for _ in range(ISSUE_ATTEMPTS):
            token = encode_token(self._randbytes(32))
            digest = token_key(token)
            link = self._ring.for_key(digest)
            if link.is_connected():
                break
        key = KEY_PREFIX + digest.hex()
        ttl_ms = max(1, math.ceil((ticket.expires_at - self._clock.seconds()) * 1000))

        def stored(reply: Any) -> str:
            if reply != 1:  # NX refused: 256 random bits collided, or bad randomness
                raise StoreUnavailable("could not store a new ticket")
            return token

        d = ISSUE.run(link, (key, _user_key(ticket.user)), (_dump(ticket), ttl_ms))
        return d.addCallbacks(stored, _unavailable)

    def revoke_user(self, user: str) -> Deferred[int]:
        calls = [REVOKE.run(link, (_user_key(user),), ()) for link in self._ring.members]
        d = DeferredList(calls, fireOnOneErrback=True, consumeErrors=True)

        def total(results: list[tuple[bool, Any]]) -> int:
            return sum(int(reply) for _, reply in results)

        return d.addCallbacks(total, _first_unavailable)

    def redeem(self, token: str, peer_ip: str) -> Deferred[Ticket]:
        if not is_token(token):
            return fail(TicketRefused("unknown"))
        digest = token_key(token)
        hexed = digest.hex()
        d = REDEEM.run(self._ring.for_key(digest), (KEY_PREFIX + hexed, USED_PREFIX + hexed), ())
        return d.addCallbacks(self._judge, _unavailable, (peer_ip,))

    def _judge(self, reply: Any, peer_ip: str) -> Ticket:
        if not isinstance(reply, list) or not reply:
            raise StoreUnavailable("unexpected reply from redis")
        outcome = int(reply[0])
        if outcome == 2:
            raise TicketRefused("already_redeemed")
        if outcome != 1:
            raise TicketRefused("unknown")
        ticket = _load(reply[1])
        if self._clock.seconds() >= ticket.expires_at:
            raise TicketRefused("expired")
        if not ticket.binds(peer_ip):
            raise TicketRefused("wrong_ip")
        return ticket

    def size(self) -> int:
        # Entries live in Redis and expire there; this node holds none.
        return 0


def _user_key(user: str) -> str:
    # Hashed: user names never appear in Redis key names.
    return USER_PREFIX + hashlib.sha256(user.encode("utf-8")).hexdigest()


def _first_unavailable(failure: Failure) -> Failure:
    inner = getattr(failure.value, "subFailure", None)
    return _unavailable(inner if isinstance(inner, Failure) else failure)


def _unavailable(failure: Failure) -> Failure:
    if failure.check(RedisUnavailable):
        return Failure(StoreUnavailable(str(failure.value)))
    if failure.check(TicketRefused, StoreUnavailable):
        return failure
    # A Redis error reply (e.g. a script error) is an outage for our clients.
    return Failure(StoreUnavailable(f"redis error: {type(failure.value).__name__}"))
