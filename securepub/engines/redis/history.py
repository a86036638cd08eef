"""History in Redis: a stream per topic, read back and checked like everything from Redis."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from securepub.core.engine import IHistory
from securepub.core.errors import RequestError
from securepub.core.history import HistoryPage, HistoryPolicy, Position, Publication
from securepub.core.tickets import SecondsClock
from securepub.engines.redis.codec import Codec, Malformed, parse_offset
from securepub.engines.redis.fanout import new_epoch
from securepub.engines.redis.keys import checked_position, history_keys, meta_ttl
from securepub.engines.redis.link import RedisUnavailable, Script
from securepub.engines.redis.shards import Shards

_log = Logger()

#: The topic's position and the entries after an offset, read in one step.
#: A topic Redis knows nothing of (never published, or Redis lost it) gets a
#: fresh epoch here, and any stream left without its meta is dropped.
#: KEYS: stream, meta. ARGV: first offset wanted, count, fresh epoch, meta ttl.
READ_SCRIPT: Final = Script("""
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', ARGV[3], 's', 0)
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  return {0, ARGV[3], {}}
end
local top = tonumber(redis.call('HGET', KEYS[2], 's'))
if tonumber(ARGV[2]) == 0 or tonumber(ARGV[1]) > top then return {top, epoch, {}} end
return {top, epoch, redis.call('XRANGE', KEYS[1], ARGV[1] .. '-0', '+', 'COUNT', ARGV[2])}
""")


@implementer(IHistory)
class RedisHistory:
    """Reads topic histories the publish script (`securepub.engines.redis.fanout`) wrote.

    Every entry is decoded and verified like a live message (signature,
    topic, id, timestamp, strict JSON); an entry of another topic, out of
    order, beyond the topic's latest offset, repeated or past the rule's age
    is left out, so a forged entry reaches no one and the page shows a hole
    (a recovery over it fails instead of replaying it).
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

    def position(self, topic: str, history: HistoryPolicy) -> Deferred[Position]:
        d = self._read(topic, history, 0, 0)
        return d.addCallback(lambda page: page.position)

    def read(
        self, topic: str, history: HistoryPolicy, since: int, limit: int
    ) -> Deferred[HistoryPage]:
        return self._read(topic, history, since, limit)

    def _read(
        self, topic: str, history: HistoryPolicy, since: int, limit: int
    ) -> Deferred[HistoryPage]:
        d = READ_SCRIPT.run(
            self._shards.for_topic(topic).commands,
            history_keys(topic),
            (since + 1, limit, self._epochs(), meta_ttl(history)),
        )
        return d.addCallbacks(
            self._page, _unavailable, callbackArgs=(topic, history, since), errbackArgs=()
        )

    def _page(self, reply: Any, topic: str, history: HistoryPolicy, since: int) -> HistoryPage:
        if not isinstance(reply, list) or len(reply) != 3 or not isinstance(reply[2], list):
            raise RequestError("unavailable", "unexpected reply from the cluster engine")
        position = checked_position(reply[0], reply[1])
        oldest = self._clock.seconds() - history.ttl
        found: list[Publication] = []
        seen: set[str] = set()
        last = since
        for entry in reply[2]:
            try:
                publication = self._entry(entry, topic, position, last)
            except Malformed as problem:
                _log.warn(
                    "dropped a history entry of {topic} read from redis: {problem}",
                    topic=topic,
                    problem=str(problem),
                    securepub_event="cluster_message_dropped",
                )
                continue
            if publication.id in seen or publication.ts <= oldest:
                continue
            seen.add(publication.id)
            assert publication.offset is not None
            last = publication.offset
            found.append(publication)
        return HistoryPage(position, tuple(found))

    def _entry(self, entry: Any, topic: str, position: Position, last: int) -> Publication:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list)):
            raise Malformed("not a stream entry")
        offset = parse_offset(entry[0])
        fields = entry[1]
        if len(fields) != 2 or fields[0] != "m":
            raise Malformed("unexpected fields")
        if not last < offset <= position.offset:
            raise Malformed("offset out of order or beyond the topic's latest")
        publication = self._codec.decode(fields[1])
        if publication.topic != topic:
            raise Malformed("entry of another topic")
        return Publication(
            publication.topic,
            publication.id,
            publication.ts,
            publication.body,
            offset,
            position.epoch,
        )


def _unavailable(failure: Failure) -> Failure:
    if failure.check(RequestError):
        return failure
    if not failure.check(RedisUnavailable):
        _log.failure("reading history from redis failed", failure)
    return Failure(RequestError("unavailable", "the cluster engine is unavailable"))
