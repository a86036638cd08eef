"""Fan-out through Redis pub/sub: every node hears every message and keeps its own."""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from securepub.core import jsonstrict
from securepub.core.engine import IFanout, IReceiver
from securepub.core.errors import RequestError
from securepub.core.history import HistoryPolicy, Position, Publication
from securepub.core.tickets import SecondsClock
from securepub.core.topics import validate_topic
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
from securepub.engines.redis.link import IRedisLink, RedisUnavailable, Script

_log = Logger()

#: The one channel a cluster's nodes publish to and subscribe to.
CHANNEL: Final = "securepub:messages"
#: Signed messages older or newer than this (seconds) are dropped as replays.
MAX_CLOCK_SKEW: Final = 60.0
#: Origin nodes remembered for replay checks before the table starts over.
MAX_TRACKED_NODES: Final = 10_000

#: Number, store and fan out a message of a history topic in one step, so two
#: nodes publishing to one topic can never produce a gap, a duplicate offset,
#: or a message in history that was never published (or the reverse).
#: KEYS: stream, meta. ARGV: channel, message, size, ttl, fresh epoch, meta ttl.
PUBLISH_SCRIPT: Final = Script("""
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[5]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', epoch, 's', 0)
end
local offset = redis.call('HINCRBY', KEYS[2], 's', 1)
local id = offset .. '-1'
local added = redis.pcall('XADD', KEYS[1], 'MAXLEN', ARGV[3], id, 'm', ARGV[2])
if type(added) == 'table' and added.err then
  -- Only a stream newer than its meta gets here (e.g. the meta alone was evicted).
  redis.call('DEL', KEYS[1])
  redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], id, 'm', ARGV[2])
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('PUBLISH', ARGV[1], 'H ' .. offset .. ' ' .. epoch .. '\\n' .. ARGV[2])
return {offset, epoch}
""")


def new_epoch() -> str:
    """64 random bits as hex: a topic's epoch if Redis holds none for it."""
    return secrets.token_hex(8)


@implementer(IFanout)
class RedisFanout:
    """Publishes to `CHANNEL` and delivers what arrives on it to this node.

    Each node subscribes to the whole channel instead of to one channel per
    pattern its sessions want: a browser's subscribe then costs no Redis
    round trip and cannot race a publish, and a reconnect resubscribes one
    channel. The price is that a node also receives the messages none of
    its sessions want, which its subscription index drops in microseconds.

    What arrives from Redis is not trusted (see `Codec`). With a cluster
    secret, a replay is refused too, because each node's message numbers
    only grow and timestamps must be within `MAX_CLOCK_SKEW` of this
    node's clock. The offset and epoch line of a history topic's message is
    written by Redis itself (the publish script), so it is checked for shape,
    not signed.
    """

    def __init__(
        self,
        commands: IRedisLink,
        codec: Codec,
        clock: SecondsClock,
        epochs: Callable[[], str] = new_epoch,
    ) -> None:
        self._commands = commands
        self._codec = codec
        self._clock = clock
        self._epochs = epochs
        self._receiver: IReceiver | None = None
        #: origin node -> highest message number seen from it (signed traffic)
        self._last_seen: dict[str, int] = {}

    def start(self, receiver: IReceiver) -> None:
        self._receiver = receiver

    def publish(
        self, publication: Publication, history: HistoryPolicy | None
    ) -> Deferred[Position | None]:
        p = publication
        message = self._codec.encode(p.topic, p.id, p.ts, p.body)
        if history is None:
            d = self._commands.execute("PUBLISH", CHANNEL, message)
            return d.addCallbacks(lambda _: None, _unavailable)
        stream, meta = history_keys(p.topic)
        d = PUBLISH_SCRIPT.run(
            self._commands,
            (stream, meta),
            (
                CHANNEL,
                message,
                history.size,
                math.ceil(history.ttl),
                self._epochs(),
                meta_ttl(history),
            ),
        )
        return d.addCallbacks(_position, _unavailable)

    def disconnect(self, user: str, message_id: str, ts: float) -> Deferred[None]:
        message = self._codec.encode(DISCONNECT, message_id, ts, jsonstrict.dumps(user))
        d = self._commands.execute("PUBLISH", CHANNEL, message)
        return d.addCallbacks(lambda _: None, _unavailable)

    def connected(self) -> None:
        """The subscribed link is (back) up: messages sent meanwhile were not heard."""
        if self._receiver is not None:
            self._receiver.resync()

    def received(self, channel: str, message: str) -> None:
        """A message from the subscribed link; check it, then deliver it here."""
        receiver = self._receiver
        if channel != CHANNEL or receiver is None:
            return
        try:
            offset, epoch, rest = split_history_prefix(message)
            publication = self._codec.decode(rest, controls=True)
            if self._codec.signer is not None:
                self._check_fresh(publication)
        except Malformed as problem:
            _log.warn(
                "dropped a malformed message from redis: {problem}",
                problem=str(problem),
                securepub_event="cluster_message_dropped",
            )
            return
        if publication.topic == DISCONNECT:
            user = jsonstrict.loads(publication.body)
            if isinstance(user, str):
                receiver.disconnect_local(user)
            return
        if publication.topic in (JOIN, LEAVE):
            try:
                topic, user = parse_presence_body(publication.body)
                validate_topic(topic)
            except (ValueError, RequestError):
                _log.warn(
                    "dropped a malformed message from redis: bad presence message",
                    securepub_event="cluster_message_dropped",
                )
                return
            receiver.presence_changed(topic, user, publication.topic == JOIN)
            return
        if offset is not None:
            publication = Publication(
                publication.topic,
                publication.id,
                publication.ts,
                publication.body,
                offset,
                epoch,
            )
        receiver.deliver(publication)

    def _check_fresh(self, publication: Publication) -> None:
        """Signed messages from one node arrive in order: numbers must grow."""
        if abs(self._clock.seconds() - publication.ts) > MAX_CLOCK_SKEW:
            raise Malformed("timestamp out of the accepted window (replay or clock skew)")
        match = MESSAGE_ID.fullmatch(publication.id)
        assert match is not None  # checked by the codec
        node, number = match.group(1), int(match.group(2))
        if number <= self._last_seen.get(node, 0):
            raise Malformed("replayed message")
        if node not in self._last_seen and len(self._last_seen) >= MAX_TRACKED_NODES:
            self._last_seen.clear()
        self._last_seen[node] = number


def _position(reply: Any) -> Position:
    if not isinstance(reply, list) or len(reply) != 2:
        raise RequestError("unavailable", "unexpected reply from the cluster engine")
    return checked_position(reply[0], reply[1])


def _unavailable(failure: Failure) -> Failure:
    if failure.check(RequestError):
        return failure
    if not failure.check(RedisUnavailable):
        _log.failure("publishing to redis failed", failure)
    return Failure(
        RequestError("unavailable", "the cluster engine is unavailable; nothing was published")
    )
