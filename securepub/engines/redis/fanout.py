"""Fan-out through Redis: a message goes to its topic's channels on its topic's server,
and each node hears only the channels its sessions want (see `channels`)."""

from __future__ import annotations

import math
import secrets
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from securepub.core import jsonstrict
from securepub.core.engine import IFanout, IReceiver
from securepub.core.errors import RequestError
from securepub.core.history import HistoryPolicy, Position, Publication
from securepub.core.tickets import SecondsClock
from securepub.core.topics import Pattern, validate_topic
from securepub.engines.redis.channels import CONTROL, channels_for_topic
from securepub.engines.redis.codec import (
    DISCONNECT,
    JOIN,
    LEAVE,
    MESSAGE_ID,
    Codec,
    Malformed,
    parse_presence_body,
    split_history_prefix,
)
from securepub.engines.redis.keys import checked_position, history_keys, meta_ttl
from securepub.engines.redis.link import RedisUnavailable, Script
from securepub.engines.redis.shards import Shard, Shards

_log = Logger()

#: Signed messages older or newer than this (seconds) are dropped as replays.
MAX_CLOCK_SKEW: Final = 60.0
#: Origin nodes remembered for replay checks before the table starts over.
MAX_TRACKED_NODES: Final = 10_000
#: Message ids remembered to hand each message on once, whichever of its
#: channels brought it (a node can hold a topic's exact and prefix channels).
RECENT_IDS: Final = 1024

#: Publish one message on each of its topic's channels, in one step, so its
#: copies arrive next to each other. ARGV: message, then the channels.
FANOUT_SCRIPT: Final = Script("""
for i = 2, #ARGV do redis.call('PUBLISH', ARGV[i], ARGV[1]) end
return 1
""")

#: Number, store and fan out a message of a history topic in one step, so two
#: nodes publishing to one topic can never produce a gap, a duplicate offset,
#: or a message in history that was never published (or the reverse).
#: KEYS: stream, meta. ARGV: message, size, ttl, fresh epoch, meta ttl, channels...
PUBLISH_SCRIPT: Final = Script("""
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[4]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', epoch, 's', 0)
end
local offset = redis.call('HINCRBY', KEYS[2], 's', 1)
local id = offset .. '-1'
local added = redis.pcall('XADD', KEYS[1], 'MAXLEN', ARGV[2], id, 'm', ARGV[1])
if type(added) == 'table' and added.err then
  -- Only a stream newer than its meta gets here (e.g. the meta alone was evicted).
  redis.call('DEL', KEYS[1])
  redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[2], id, 'm', ARGV[1])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[5])
local live = 'H ' .. offset .. ' ' .. epoch .. '\\n' .. ARGV[1]
for i = 6, #ARGV do redis.call('PUBLISH', ARGV[i], live) end
return {offset, epoch}
""")


def new_epoch() -> str:
    """64 random bits as hex: a topic's epoch if Redis holds none for it."""
    return secrets.token_hex(8)


@implementer(IFanout)
class RedisFanout:
    """Publishes each message on its topic's server and channels; delivers what arrives.

    What arrives from Redis is not trusted (see `Codec`). With a cluster
    secret, a replay is refused too, because each node's message numbers
    only grow on each server and timestamps must be within `MAX_CLOCK_SKEW`
    of this node's clock. The offset and epoch line of a history topic's
    message is written by Redis itself (the publish script), so it is
    checked for shape, not signed.
    """

    def __init__(
        self,
        shards: Shards,
        codec: Codec,
        clock: SecondsClock,
        epochs: Callable[[], str] = new_epoch,
    ) -> None:
        self._shards = shards
        self._codec = codec
        self._clock = clock
        self._epochs = epochs
        self._receiver: IReceiver | None = None
        #: (server, origin node) -> highest message number seen (signed traffic)
        self._last_seen: dict[tuple[int, str], int] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()

    def start(self, receiver: IReceiver) -> None:
        self._receiver = receiver
        for shard in self._shards.all:
            shard.subscriber.hold(CONTROL)

    # -- sending

    def publish(
        self, publication: Publication, history: HistoryPolicy | None
    ) -> Deferred[Position | None]:
        p = publication
        message = self._codec.encode(p.topic, p.id, p.ts, p.body)
        shard = self._shards.for_topic(p.topic)
        channels = channels_for_topic(p.topic)
        if history is None:
            d = FANOUT_SCRIPT.run(shard.commands, (), (message, *channels))
            return d.addCallbacks(lambda _: None, _unavailable)
        stream, meta = history_keys(p.topic)
        d = PUBLISH_SCRIPT.run(
            shard.commands,
            (stream, meta),
            (
                message,
                history.size,
                math.ceil(history.ttl),
                self._epochs(),
                meta_ttl(history),
                *channels,
            ),
        )
        return d.addCallbacks(_position, _unavailable)

    def disconnect(self, user: str, message_id: str, ts: float) -> Deferred[None]:
        message = self._codec.encode(DISCONNECT, message_id, ts, jsonstrict.dumps(user))
        # Every node holds the control channel on every server: one server will do.
        shard = self._shards.for_key(b"user:" + user.encode("utf-8"))
        d = shard.commands.execute("PUBLISH", CONTROL, message)
        return d.addCallbacks(lambda _: None, _unavailable)

    # -- what this node wants

    def watch(self, pattern: Pattern) -> Deferred[None]:
        needed = self._shards.for_pattern(pattern)
        waits = [shard.subscriber.watch(channel) for shard, channel in needed]
        if len(waits) == 1:
            return waits[0].addErrback(_not_watched)
        done = DeferredList(waits, fireOnOneErrback=True, consumeErrors=True)
        return done.addCallbacks(lambda _: None, _first_failure)

    def unwatch(self, pattern: Pattern) -> None:
        for shard, channel in self._shards.for_pattern(pattern):
            shard.subscriber.unwatch(channel)

    def connected(self, shard: Shard) -> None:
        """A pub/sub link is (back) up: messages sent meanwhile were not heard here."""
        if self._receiver is not None:
            self._receiver.resync()

    # -- receiving

    def received(self, shard: Shard, channel: str, message: str) -> None:
        """A message from a pub/sub link; check it, then deliver it here once."""
        receiver = self._receiver
        if receiver is None:
            return
        try:
            offset, epoch, rest = split_history_prefix(message)
            publication = self._codec.decode(rest, controls=True)
        except Malformed as problem:
            _dropped(str(problem))
            return
        if publication.id in self._recent:
            return  # the same message through another of its channels
        self._remember(publication.id)
        if self._codec.signer is not None:
            try:
                self._check_fresh(shard.index, publication)
            except Malformed as problem:
                _dropped(str(problem))
                return
        topic = publication.topic
        if topic == DISCONNECT:
            user = jsonstrict.loads(publication.body)
            if isinstance(user, str):
                receiver.disconnect_local(user)
        elif topic in (JOIN, LEAVE):
            try:
                presence_topic, user = parse_presence_body(publication.body)
                validate_topic(presence_topic)
            except (ValueError, RequestError):
                _dropped("bad presence message")
                return
            receiver.presence_changed(presence_topic, user, topic == JOIN)
        elif offset is not None:
            receiver.deliver(
                Publication(topic, publication.id, publication.ts, publication.body, offset, epoch)
            )
        else:
            receiver.deliver(publication)

    def _remember(self, message_id: str) -> None:
        recent = self._recent
        recent[message_id] = None
        if len(recent) > RECENT_IDS:
            recent.popitem(last=False)

    def _check_fresh(self, server: int, publication: Publication) -> None:
        """Signed messages from one node through one server arrive in order: numbers grow."""
        if abs(self._clock.seconds() - publication.ts) > MAX_CLOCK_SKEW:
            raise Malformed("timestamp out of the accepted window (replay or clock skew)")
        match = MESSAGE_ID.fullmatch(publication.id)
        assert match is not None  # checked by the codec
        origin = (server, match.group(1))
        number = int(match.group(2))
        if number <= self._last_seen.get(origin, 0):
            raise Malformed("replayed message")
        if origin not in self._last_seen and len(self._last_seen) >= MAX_TRACKED_NODES:
            self._last_seen.clear()
        self._last_seen[origin] = number


def _dropped(problem: str) -> None:
    _log.warn(
        "dropped a malformed message from redis: {problem}",
        problem=problem,
        securepub_event="cluster_message_dropped",
    )


def _position(reply: Any) -> Position:
    if not isinstance(reply, list) or len(reply) != 2:
        raise RequestError("unavailable", "unexpected reply from the cluster engine")
    return checked_position(reply[0], reply[1])


def _first_failure(failure: Failure) -> Failure:
    inner = getattr(failure.value, "subFailure", None)
    return _not_watched(inner if isinstance(inner, Failure) else failure)


def _not_watched(failure: Failure) -> Failure:
    if not failure.check(RedisUnavailable):
        _log.failure("subscribing in redis failed", failure)
    return Failure(RequestError("unavailable", "the cluster engine is unavailable"))


def _unavailable(failure: Failure) -> Failure:
    if failure.check(RequestError):
        return failure
    if not failure.check(RedisUnavailable):
        _log.failure("publishing to redis failed", failure)
    return Failure(
        RequestError("unavailable", "the cluster engine is unavailable; nothing was published")
    )
