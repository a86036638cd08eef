"""Fan-out through Redis pub/sub: every node hears every message and keeps its own."""

from __future__ import annotations

import math
import re

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from securepub.core import jsonstrict
from securepub.core.engine import Deliver, Disconnect, IFanout
from securepub.core.errors import RequestError
from securepub.core.tickets import SecondsClock
from securepub.core.topics import validate_topic
from securepub.engines.redis.link import IRedisLink, RedisUnavailable
from securepub.engines.redis.signing import ClusterSigner

_log = Logger()

#: The one channel a cluster's nodes publish to and subscribe to.
CHANNEL = "securepub:messages"
#: First line of every message on the channel: the format's version, which
#: says whether a signature line follows.
UNSIGNED = "1"
SIGNED = "2"
#: Signed messages older or newer than this (seconds) are dropped as replays.
MAX_CLOCK_SKEW = 60.0
#: The "topic" of a control message closing a user's sessions on every node;
#: no real topic can take this name (``!`` is outside the topic grammar).
DISCONNECT = "!disconnect"
#: Origin nodes remembered for replay checks before the table starts over.
MAX_TRACKED_NODES = 10_000

_MESSAGE_ID = re.compile(r"([A-Za-z0-9_]{1,32})-([0-9]{1,20})")


def encode(
    topic: str, message_id: str, ts: float, body: str, signer: ClusterSigner | None = None
) -> str:
    """One message as it travels through Redis: a version line, then a
    signature line if signed, then topic, id, timestamp and the body last."""
    text = f"{topic}\n{message_id}\n{ts!r}\n{body}"
    if signer is None:
        return f"{UNSIGNED}\n{text}"
    return f"{SIGNED}\n{signer.sign(text)}\n{text}"


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
    reaches a browser, and anything malformed is dropped and logged. With a
    cluster secret, messages are signed (HMAC-SHA256) and only correctly
    signed ones are accepted; a replay is refused because each node's
    message numbers only grow and timestamps must be within
    `MAX_CLOCK_SKEW` of this node's clock.
    """

    def __init__(
        self,
        commands: IRedisLink,
        max_body_bytes: int,
        clock: SecondsClock,
        signer: ClusterSigner | None = None,
    ) -> None:
        self._commands = commands
        self._max_body_bytes = max_body_bytes
        self._clock = clock
        self._signer = signer
        self._deliver: Deliver | None = None
        self._disconnect: Disconnect | None = None
        #: origin node -> highest message number seen from it (signed traffic)
        self._last_seen: dict[str, int] = {}

    def start(self, deliver: Deliver, disconnect: Disconnect) -> None:
        self._deliver = deliver
        self._disconnect = disconnect

    def publish(self, topic: str, message_id: str, ts: float, body: str) -> Deferred[None]:
        message = encode(topic, message_id, ts, body, self._signer)
        d = self._commands.execute("PUBLISH", CHANNEL, message)
        return d.addCallbacks(lambda _: None, _unavailable)

    def disconnect(self, user: str, message_id: str, ts: float) -> Deferred[None]:
        return self.publish(DISCONNECT, message_id, ts, jsonstrict.dumps(user))

    def received(self, channel: str, message: str) -> None:
        """A message from the subscribed link; check it, then deliver it here."""
        if channel != CHANNEL or self._deliver is None or self._disconnect is None:
            return
        version, _, rest = message.partition("\n") if isinstance(message, str) else ("", "", "")
        problem = None
        if self._signer is not None:
            signature, _, rest = rest.partition("\n")
            if version != SIGNED:
                problem = "unsigned"
            elif not self._signer.verify(rest, signature):
                problem = "bad signature"
        elif version != UNSIGNED:
            problem = "signed, but this node has no cluster secret"
        parts = rest.split("\n", 3)
        if problem is None and len(parts) != 4:
            problem = "not in the expected format"
        if problem is None:
            topic, message_id, ts_text, body = parts
            problem = self._check(topic, message_id, ts_text, body)
        if problem is not None:
            _log.warn(
                "dropped a malformed message from redis: {problem}",
                problem=problem,
                securepub_event="cluster_message_dropped",
            )
            return
        if topic == DISCONNECT:
            user = jsonstrict.loads(body)
            if isinstance(user, str):
                self._disconnect(user)
            return
        self._deliver(topic, message_id, float(ts_text), body)

    def _check(self, topic: str, message_id: str, ts_text: str, body: str) -> str | None:
        try:
            if topic != DISCONNECT:
                validate_topic(topic)
        except RequestError:
            return "bad topic"
        match = _MESSAGE_ID.fullmatch(message_id)
        if match is None:
            return "bad message id"
        try:
            ts = float(ts_text)
        except ValueError:
            return "bad timestamp"
        if not math.isfinite(ts):
            return "bad timestamp"
        if self._signer is not None:
            problem = self._replayed(match.group(1), int(match.group(2)), ts)
            if problem is not None:
                return problem
        if len(body) > self._max_body_bytes:
            return "body over the size limit"
        try:
            jsonstrict.loads(body)
        except RequestError:
            return "body is not strict JSON"
        return None

    def _replayed(self, node: str, number: int, ts: float) -> str | None:
        """Signed messages from one node arrive in order: numbers must grow."""
        if abs(self._clock.seconds() - ts) > MAX_CLOCK_SKEW:
            return "timestamp out of the accepted window (replay or clock skew)"
        if number <= self._last_seen.get(node, 0):
            return "replayed message"
        if node not in self._last_seen and len(self._last_seen) >= MAX_TRACKED_NODES:
            self._last_seen.clear()
        self._last_seen[node] = number
        return None


def _unavailable(failure: Failure) -> Failure:
    if not failure.check(RedisUnavailable):
        _log.failure("publishing to redis failed", failure)
    return Failure(
        RequestError("unavailable", "the cluster engine is unavailable; nothing was published")
    )
