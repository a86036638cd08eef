"""Fan-out through Redis pub/sub: every node hears every message and keeps its own."""

from __future__ import annotations

import math
import re

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from securepub import jsonstrict
from securepub.errors import RequestError
from securepub.fanout import Deliver, IFanout
from securepub.redislink import IRedisLink, RedisUnavailable
from securepub.topics import validate_topic

_log = Logger()

#: The one channel a cluster's nodes publish to and subscribe to.
CHANNEL = "securepub:messages"
#: First line of every message on the channel: the format's version.
VERSION = "1"

_MESSAGE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def encode(topic: str, message_id: str, ts: float, body: str) -> str:
    """One message as it travels through Redis: five lines, body last."""
    return f"{VERSION}\n{topic}\n{message_id}\n{ts!r}\n{body}"


@implementer(IFanout)
class RedisFanout:
    """Publishes to `CHANNEL` and delivers what arrives on it to this node.

    Each node subscribes to the whole channel instead of to one channel per
    pattern its sessions want: a browser's subscribe then costs no Redis
    round trip and cannot race a publish, and a reconnect resubscribes one
    channel. The price is that a node also receives the messages none of
    its sessions want, which its subscription index drops in microseconds.

    What arrives from Redis is not trusted: anyone who can write to Redis
    can publish on the channel, so every field is checked again before it
    reaches a browser, and anything malformed is dropped and logged.
    """

    def __init__(self, commands: IRedisLink, max_body_bytes: int) -> None:
        self._commands = commands
        self._max_body_bytes = max_body_bytes
        self._deliver: Deliver | None = None

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver

    def publish(self, topic: str, message_id: str, ts: float, body: str) -> Deferred[None]:
        d = self._commands.execute("PUBLISH", CHANNEL, encode(topic, message_id, ts, body))
        return d.addCallbacks(lambda _: None, _unavailable)

    def received(self, channel: str, message: str) -> None:
        """A message from the subscribed link; check it, then deliver it here."""
        if channel != CHANNEL or self._deliver is None:
            return
        parts = message.split("\n", 4) if isinstance(message, str) else []
        problem = None
        if len(parts) != 5 or parts[0] != VERSION:
            problem = "not in the expected format"
        else:
            _, topic, message_id, ts_text, body = parts
            problem = self._check(topic, message_id, ts_text, body)
        if problem is not None:
            _log.warn(
                "dropped a malformed message from redis: {problem}",
                problem=problem,
                securepub_event="cluster_message_dropped",
            )
            return
        self._deliver(topic, message_id, float(ts_text), body)

    def _check(self, topic: str, message_id: str, ts_text: str, body: str) -> str | None:
        try:
            validate_topic(topic)
        except RequestError:
            return "bad topic"
        if _MESSAGE_ID.fullmatch(message_id) is None:
            return "bad message id"
        try:
            ts = float(ts_text)
        except ValueError:
            return "bad timestamp"
        if not math.isfinite(ts):
            return "bad timestamp"
        if len(body) > self._max_body_bytes:
            return "body over the size limit"
        try:
            jsonstrict.loads(body)
        except RequestError:
            return "body is not strict JSON"
        return None


def _unavailable(failure: Failure) -> Failure:
    if not failure.check(RedisUnavailable):
        _log.failure("publishing to redis failed", failure)
    return Failure(
        RequestError("unavailable", "the cluster engine is unavailable; nothing was published")
    )
