"""Presence in Redis: per topic, each node's users, and one heartbeat per node.

Every node renews its score in ``securepub:presence-nodes`` (a sorted set,
scored with the moment the node counts as dead) every `BEAT_SECONDS`. Per
topic ``T``, ``securepub:presence:{T}`` is the set of nodes with sessions on
it and ``securepub:presence:{T}:<node>`` that node's ``user -> sessions``;
``securepub:presence-topics:<node>`` lists a node's topics. A node not renewed
for `ENTRY_SECONDS` is dead: its entries no longer count, and the next live
node to beat reaps them, announcing the ``leave`` of each of its users with no
session left on a live node. Join and leave are decided inside Redis, in the
script that changes the counts, so a user's first session anywhere gives one
``join`` and its last one ``leave``, however many nodes there are; the
messages themselves are signed by the node before the script publishes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from securepub.core import jsonstrict
from securepub.core.engine import IPresence, IReceiver
from securepub.core.errors import RequestError
from securepub.core.ids import MessageIds
from securepub.core.tickets import SecondsClock
from securepub.engines.redis.channels import channels_for_topic
from securepub.engines.redis.codec import JOIN, LEAVE, Codec, presence_body
from securepub.engines.redis.link import RedisUnavailable, Script
from securepub.engines.redis.shards import Shard, Shards

_log = Logger()

#: A node renews its heartbeat this often ...
BEAT_SECONDS: Final = 5.0
#: ... and one not renewed for this long is dead: its users leave.
ENTRY_SECONDS: Final = 20.0
NODES: Final = "securepub:presence-nodes"
PREFIX: Final = "securepub:presence:"
TOPICS_PREFIX: Final = "securepub:presence-topics:"

# Helpers shared by the scripts. Liveness is the node's score in the nodes set,
# compared with Redis's own clock, so the nodes' clocks do not matter.
_COMMON = """
local NODES = 'securepub:presence-nodes'
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function alive(node, now)
  local score = redis.call('ZSCORE', NODES, node)
  return score and tonumber(score) >= now
end
local function announce(message, first)
  if message == '' then return end
  for i = first, #ARGV do redis.call('PUBLISH', ARGV[i], message) end
end
local function total(set, user, now)
  local sum = 0
  for _, node in ipairs(redis.call('SMEMBERS', set)) do
    if alive(node, now) then
      local n = redis.call('HGET', set .. ':' .. node, user)
      if n then sum = sum + tonumber(n) end
    end
  end
  return sum
end
"""

#: One session more (or fewer) of a user on this node; join or leave if it was
#: the user's first (or last) session on any live node.
#: KEYS: topic set, this node's topic list. ARGV: node, topic, user, delta, entry ms,
#: join message, leave message, then the topic's channels.
UPDATE_SCRIPT: Final = Script(
    _COMMON
    + """
local now = now_ms()
local set, node, user = KEYS[1], ARGV[1], ARGV[3]
local hash = set .. ':' .. node
redis.call('ZADD', NODES, now + tonumber(ARGV[5]), node)
local before = total(set, user, now)
local n = redis.call('HINCRBY', hash, user, tonumber(ARGV[4]))
if n <= 0 then redis.call('HDEL', hash, user) end
if redis.call('EXISTS', hash) == 1 then
  redis.call('SADD', set, node)
  redis.call('SADD', KEYS[2], ARGV[2])
else
  redis.call('SREM', set, node)
  redis.call('SREM', KEYS[2], ARGV[2])
end
local after = total(set, user, now)
if before == 0 and after > 0 then announce(ARGV[6], 8) end
if before > 0 and after == 0 then announce(ARGV[7], 8) end
return {before, after}
"""
)

#: Renew this node's heartbeat; answer the dead nodes and, for each, its topics
#: and their users: {{dead, {topic, {users}}, ...}, ...}. ARGV: node, entry ms.
BEAT_SCRIPT: Final = Script(
    _COMMON
    + """
local now = now_ms()
redis.call('ZADD', NODES, now + tonumber(ARGV[2]), ARGV[1])
local found = {}
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', NODES, '-inf', '(' .. now, 'LIMIT', 0, 10)) do
  local topics = {}
  for _, topic in ipairs(redis.call('SMEMBERS', 'securepub:presence-topics:' .. dead)) do
    local users = redis.call('HKEYS', 'securepub:presence:{' .. topic .. '}:' .. dead)
    table.insert(topics, {topic, users})
  end
  table.insert(found, {dead, topics})
end
return found
"""
)

#: Remove a dead node's entry on one topic (if the node is still dead) and
#: announce the leave of each listed user with no session left on a live node.
#: KEYS: topic set. ARGV: dead node, topic, n, n channels, then (user, leave message) pairs.
REAP_SCRIPT: Final = Script(
    _COMMON
    + """
local now = now_ms()
local set, dead = KEYS[1], ARGV[1]
if alive(dead, now) or redis.call('SISMEMBER', set, dead) == 0 then return 0 end
redis.call('SREM', set, dead)
redis.call('DEL', set .. ':' .. dead)
redis.call('SREM', 'securepub:presence-topics:' .. dead, ARGV[2])
local channels = tonumber(ARGV[3])
local left = 0
for i = 4 + channels, #ARGV, 2 do
  if ARGV[i + 1] ~= '' and total(set, ARGV[i], now) == 0 then
    for c = 4, 3 + channels do redis.call('PUBLISH', ARGV[c], ARGV[i + 1]) end
    left = left + 1
  end
end
return left
"""
)

#: Forget a dead node once its topics are reaped (it is still dead, and has none).
#: ARGV: dead node.
FORGET_SCRIPT: Final = Script(
    _COMMON
    + """
local now = now_ms()
local topics = 'securepub:presence-topics:' .. ARGV[1]
if alive(ARGV[1], now) or redis.call('SCARD', topics) > 0 then return 0 end
redis.call('ZREM', NODES, ARGV[1])
return 1
"""
)

#: This node's entry on a topic, rewritten whole (after a reconnect: Redis may
#: have lost it). KEYS: topic set, this node's topic list.
#: ARGV: node, topic, entry ms, then (user, sessions) pairs.
RESTORE_SCRIPT: Final = Script(
    _COMMON
    + """
local now = now_ms()
local set, hash = KEYS[1], KEYS[1] .. ':' .. ARGV[1]
redis.call('ZADD', NODES, now + tonumber(ARGV[3]), ARGV[1])
redis.call('DEL', hash)
for i = 4, #ARGV, 2 do redis.call('HSET', hash, ARGV[i], ARGV[i + 1]) end
redis.call('SADD', set, ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
return 1
"""
)

#: ``{user: sessions}`` summed over the topic's live nodes, as one JSON text (a
#: reply of thousands of elements costs txredisapi far more to parse). KEYS: topic set.
QUERY_SCRIPT: Final = Script(
    _COMMON
    + """
local now = now_ms()
local users = {}
for _, node in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if alive(node, now) then
    local entry = redis.call('HGETALL', KEYS[1] .. ':' .. node)
    for i = 1, #entry, 2 do users[entry[i]] = (users[entry[i]] or 0) + tonumber(entry[i + 1]) end
  end
end
local present = {}
local any = false
for user, n in pairs(users) do
  if n > 0 then present[user] = n; any = true end
end
if not any then return '{}' end
return cjson.encode(present)
"""
)


def presence_key(topic: str) -> str:
    return f"{PREFIX}{{{topic}}}"


@implementer(IPresence)
class RedisPresence:
    """The cluster's presence, with a local mirror of this node's own sessions.

    A topic's entries live on its topic's server; every server keeps its own
    heartbeat table, renewed on each beat. The mirror is what is written
    back after a server comes back; answers always come from Redis.
    ``announces(topic)`` says whether a topic's rule announces join and
    leave, for the leaves of a dead node's users.
    """

    def __init__(
        self,
        shards: Shards,
        codec: Codec,
        clock: SecondsClock,
        ids: MessageIds,
        announces: Callable[[str], bool],
    ) -> None:
        self._shards = shards
        self._codec = codec
        self._clock = clock
        self._ids = ids
        self._announces = announces
        #: topic -> user -> this node's sessions
        self._local: dict[str, dict[str, int]] = {}

    def start(self, receiver: IReceiver) -> None:
        """Join and leave reach the broker through the topic's channels, not from here."""

    def _control(self, kind: str, topic: str, user: str) -> str:
        body = presence_body(topic, user)
        return self._codec.encode(kind, self._ids.next(), self._clock.seconds(), body)

    def add(self, topic: str, user: str, join_leave: bool) -> Deferred[None]:
        users = self._local.setdefault(topic, {})
        users[user] = users.get(user, 0) + 1
        return self._update(topic, user, 1, join_leave)

    def remove(self, topic: str, user: str, join_leave: bool) -> Deferred[None]:
        users = self._local.get(topic)
        if users is None or user not in users:
            return succeed(None)
        users[user] -= 1
        if users[user] <= 0:
            del users[user]
            if not users:
                del self._local[topic]
        return self._update(topic, user, -1, join_leave)

    def _update(self, topic: str, user: str, delta: int, join_leave: bool) -> Deferred[None]:
        join = self._control(JOIN, topic, user) if join_leave and delta > 0 else ""
        leave = self._control(LEAVE, topic, user) if join_leave and delta < 0 else ""
        node = self._ids.node
        d = UPDATE_SCRIPT.run(
            self._shards.for_topic(topic).commands,
            (presence_key(topic), TOPICS_PREFIX + node),
            (node, topic, user, delta, _entry_ms(), join, leave, *channels_for_topic(topic)),
        )
        return d.addCallbacks(lambda _: None, _unavailable)

    def query(self, topic: str) -> Deferred[dict[str, int]]:
        d = QUERY_SCRIPT.run(self._shards.for_topic(topic).commands, (presence_key(topic),), ())
        return d.addCallbacks(_users, _unavailable)

    # -- upkeep

    def beat(self) -> Deferred[Any]:
        """Renew this node's heartbeat on every server, and reap dead nodes' entries."""
        calls = []
        for shard in self._shards.all:
            d = BEAT_SCRIPT.run(shard.commands, (), (self._ids.node, _entry_ms()))
            d.addCallback(self._reap, shard)
            d.addErrback(_quietly, "renew presence")
            calls.append(d)
        return DeferredList(calls)

    def _reap(self, found: Any, shard: Shard) -> Deferred[Any] | None:
        if not isinstance(found, list):
            return None
        calls = []
        for entry in found:
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list)):
                continue
            dead, topics = entry
            if not isinstance(dead, str):
                continue
            reaped = [self._reap_topic(shard, dead, item) for item in topics]
            d: Deferred[Any] = DeferredList([r for r in reaped if r is not None])
            d.addCallback(self._forget, shard, dead)
            d.addErrback(_quietly, "forget a dead node")
            calls.append(d)
        return DeferredList(calls) if calls else None

    def _forget(self, _: object, shard: Shard, dead: str) -> Deferred[Any]:
        return FORGET_SCRIPT.run(shard.commands, (), (dead,))

    def _reap_topic(self, shard: Shard, dead: str, item: Any) -> Deferred[Any] | None:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], list)):
            return None
        topic, users = item
        if not isinstance(topic, str):
            return None
        channels = channels_for_topic(topic)
        announce = self._announces(topic)
        args: list[Any] = [dead, topic, len(channels), *channels]
        for user in users:
            if isinstance(user, str):
                args += [user, self._control(LEAVE, topic, user) if announce else ""]
        d = REAP_SCRIPT.run(shard.commands, (presence_key(topic),), args)
        return d.addErrback(_quietly, "reap presence")

    def restore(self, shard: Shard | None = None) -> Deferred[Any]:
        """Write this node's entries back whole (a server's commands link is back)."""
        calls = []
        node = self._ids.node
        for topic, users in self._local.items():
            home = self._shards.for_topic(topic)
            if shard is not None and home is not shard:
                continue
            args: list[Any] = [node, topic, _entry_ms()]
            for user, n in users.items():
                args += [user, n]
            d = RESTORE_SCRIPT.run(home.commands, (presence_key(topic), TOPICS_PREFIX + node), args)
            d.addErrback(_quietly, "restore presence")
            calls.append(d)
        return DeferredList(calls)

    @property
    def topics(self) -> int:
        return len(self._local)


class PresenceKeeper(Service):
    """Beats every `BEAT_SECONDS` while the node runs."""

    def __init__(self, presence: RedisPresence, clock: Any) -> None:
        self._loop = LoopingCall(presence.beat)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self._loop.start(BEAT_SECONDS, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()


def _entry_ms() -> int:
    return int(ENTRY_SECONDS * 1000)


def _users(reply: Any) -> dict[str, int]:
    """The users map from Redis, checked: names and positive integer counts only."""
    try:
        value = jsonstrict.loads(reply) if isinstance(reply, str) else None
    except RequestError:
        value = None
    if not isinstance(value, dict):
        raise RequestError("unavailable", "unexpected reply from the cluster engine")
    users: dict[str, int] = {}
    for user, n in value.items():
        if isinstance(n, int | float) and not isinstance(n, bool) and n >= 1 and n == int(n):
            if user and len(user.encode("utf-8")) <= 255:
                users[user] = int(n)
    return users


def _unavailable(failure: Failure) -> Failure:
    if failure.check(RequestError):
        return failure
    if not failure.check(RedisUnavailable):
        _log.failure("presence in redis failed", failure)
    return Failure(RequestError("unavailable", "the cluster engine is unavailable"))


def _quietly(failure: Failure, what: str) -> None:
    if not failure.check(RedisUnavailable):
        _log.failure("could not {what}", failure, what=what)
