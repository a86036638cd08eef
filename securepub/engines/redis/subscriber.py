"""A node's pub/sub link to one Redis server: the channels its sessions want, and nothing else.

Channels are reference-counted per node: the first session wanting a channel
subscribes it, the last one leaving unsubscribes it after a short linger (so a
reconnecting crowd does not churn Redis). Requests made in one reactor turn go
out as one SUBSCRIBE (or UNSUBSCRIBE) of up to `BATCH` channels, and `watch`
fires only once Redis has confirmed the subscription: a message published
after that reaches this node. A reconnect subscribes every wanted channel
again.

The link speaks RESP itself instead of through txredisapi: receiving a message
through txredisapi's protocol cost about 80 µs (three reactor turns per
message), this reader about 4 µs (bench/redis_routing.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Final

from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from securepub.engines.redis.link import RedisTarget, RedisUnavailable, backoff
from securepub.ops.metrics import Metrics

_log = Logger()

#: Channels per SUBSCRIBE or UNSUBSCRIBE command.
BATCH: Final = 1000
#: Seconds an unwanted channel stays subscribed, in case it is wanted again.
LINGER: Final = 5.0
#: Largest bulk string accepted from Redis (a message is at most a frame plus framing).
MAX_BULK: Final = 4 * 1024 * 1024
#: Seconds Redis may take to answer AUTH.
AUTH_TIMEOUT: Final = 5.0


class ProtocolViolation(Exception):
    """Redis sent something this reader does not accept; the link is dropped."""


def command(*args: str | bytes) -> bytes:
    """One RESP command (an array of bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode("utf-8") if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RespReader:
    """Incremental RESP2 reader for the replies a subscribed connection gets.

    Yields simple strings, errors (as `RedisReplyError`), integers, bulk
    strings (bytes) and flat arrays of those. Nested arrays, and anything over
    `MAX_BULK` or malformed, raise `ProtocolViolation`.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Any]:
        buffer = self._buffer + data if self._buffer else data
        out: list[Any] = []
        position = 0
        while True:
            parsed = self._one(buffer, position, top=True)
            if parsed is None:
                break
            value, position = parsed
            out.append(value)
        self._buffer = buffer[position:]
        if len(self._buffer) > MAX_BULK + 64:
            raise ProtocolViolation("reply too large")
        return out

    def _line(self, buffer: bytes, position: int) -> tuple[bytes, int] | None:
        end = buffer.find(b"\r\n", position)
        if end < 0:
            if len(buffer) - position > 64:
                raise ProtocolViolation("header line too long")
            return None
        return buffer[position:end], end + 2

    def _one(self, buffer: bytes, position: int, top: bool) -> tuple[Any, int] | None:
        if position >= len(buffer):
            return None
        kind = buffer[position : position + 1]
        found = self._line(buffer, position + 1)
        if found is None:
            return None
        line, after = found
        if kind == b"+":
            return line, after
        if kind == b"-":
            return RedisReplyError(line.decode("utf-8", "replace")), after
        if kind == b":":
            return _integer(line), after
        if kind == b"$":
            size = _integer(line)
            if size == -1:
                return None, after
            if not 0 <= size <= MAX_BULK:
                raise ProtocolViolation("bulk string out of bounds")
            if len(buffer) < after + size + 2:
                return None
            if buffer[after + size : after + size + 2] != b"\r\n":
                raise ProtocolViolation("bulk string not terminated")
            return buffer[after : after + size], after + size + 2
        if kind == b"*" and top:
            count = _integer(line)
            if not 0 <= count <= 8:
                raise ProtocolViolation("array out of bounds")
            items = []
            for _ in range(count):
                parsed = self._one(buffer, after, top=False)
                if parsed is None:
                    return None
                item, after = parsed
                items.append(item)
            return items, after
        raise ProtocolViolation("unexpected reply type")


def _integer(line: bytes) -> int:
    try:
        return int(line)
    except ValueError:
        raise ProtocolViolation("not an integer") from None


class RedisReplyError(Exception):
    """An error reply (``-ERR ...``) from Redis."""


class _Batch:
    __slots__ = ("channels", "kind", "remaining")

    def __init__(self, kind: bytes, channels: list[str]) -> None:
        self.kind = kind
        self.channels = channels
        self.remaining = len(channels)


class SubscriberProtocol(Protocol):
    """One connection: AUTH if needed, then SUBSCRIBE/UNSUBSCRIBE and messages."""

    def __init__(self, link: RedisSubscriber) -> None:
        self._link = link
        self._reader = RespReader()
        self._batches: deque[_Batch] = deque()
        self.ready: Deferred[SubscriberProtocol] = Deferred()
        self._authenticating = False
        self._pending_setup = 0
        self._auth_timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        # AUTH when needed, then a PING: one round trip before the link counts
        # as up, so over TLS the handshake (and the certificate check) is done.
        target = self._link.target
        assert self.transport is not None
        self._authenticating = True
        if target.password is not None:
            args = ["AUTH", *([target.username] if target.username else []), target.password]
            self.transport.write(command(*args))
        self.transport.write(command("PING"))
        self._pending_setup = 2 if target.password is not None else 1
        self._auth_timer = self._link.clock.callLater(AUTH_TIMEOUT, self._abort, "setup timed out")

    def _abort(self, why: str) -> None:
        _log.error(
            "redis {name}: {why}", name=self._link.role, why=why, securepub_event="redis_error"
        )
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def send(self, kind: bytes, channels: list[str]) -> None:
        """One SUBSCRIBE or UNSUBSCRIBE; Redis confirms each channel in order."""
        self._batches.append(_Batch(kind, channels))
        assert self.transport is not None
        self.transport.write(command(kind.decode(), *channels))

    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self._reader.feed(data)
        except ProtocolViolation as e:
            self._abort(f"protocol violation: {e}")
            return
        for reply in replies:
            if self._authenticating:
                self._authenticated(reply)
            elif isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                self._link.message(reply[1], reply[2])
            elif (
                isinstance(reply, list)
                and len(reply) == 3
                and reply[0]
                in (
                    b"subscribe",
                    b"unsubscribe",
                )
            ):
                self._confirmed(reply[0])
            else:
                self._abort("unexpected reply on a subscribed connection")
                return

    def _authenticated(self, reply: Any) -> None:
        if reply not in (b"OK", b"PONG"):
            # The reply names the failure; it never holds the password.
            self._authenticating = False
            self._abort("could not authenticate (check the password in the URL)")
            return
        self._pending_setup -= 1
        if self._pending_setup:
            return
        self._authenticating = False
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        self.ready.callback(self)

    def _confirmed(self, kind: bytes) -> None:
        if not self._batches or self._batches[0].kind != kind.upper():
            self._abort("a confirmation nobody asked for")
            return
        batch = self._batches[0]
        batch.remaining -= 1
        if batch.remaining == 0:
            self._batches.popleft()
            if batch.kind == b"SUBSCRIBE":
                self._link.active(batch.channels)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._auth_timer is not None and self._auth_timer.active():
            self._auth_timer.cancel()
        if not self.ready.called:
            self.ready.errback(
                RedisUnavailable(f"redis {self._link.role} link failed during setup")
            )
        self._link.lost(self)


class _Wanted:
    """What this node wants of one channel."""

    __slots__ = ("active", "linger", "refs", "requested", "waiters")

    def __init__(self) -> None:
        self.refs = 0
        self.active = False
        self.requested = False
        self.waiters: list[Deferred[None]] = []
        self.linger: IDelayedCall | None = None


class _Factory(Factory):
    noisy = False

    def __init__(self, link: RedisSubscriber) -> None:
        self._link = link

    def buildProtocol(self, addr: Any) -> SubscriberProtocol:
        return SubscriberProtocol(self._link)


class RedisSubscriber(Service):
    """The reference-counted, batched, reconnecting pub/sub link to one Redis server."""

    def __init__(
        self,
        reactor: Any,
        target: RedisTarget,
        role: str,
        on_message: Callable[[str, str], None],
        on_connected: Callable[[], None] = lambda: None,
        metrics: Metrics | None = None,
        linger: float = LINGER,
    ) -> None:
        self.target = target
        self.role = role
        self.clock = reactor
        self._on_message = on_message
        self._on_connected = on_connected
        self._metrics = metrics if metrics is not None else Metrics()
        self._linger = linger
        self._wanted: dict[str, _Wanted] = {}
        self._to_subscribe: list[str] = []
        self._to_unsubscribe: list[str] = []
        self._flush_call: IDelayedCall | None = None
        self._protocol: SubscriberProtocol | None = None
        self._service = ClientService(
            target.endpoint(reactor),
            _Factory(self),
            retryPolicy=backoff,
            clock=reactor,
            prepareConnection=self._prepare,
        )

    # -- service

    def startService(self) -> None:
        super().startService()
        self._service.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._protocol = None
        d: Deferred[None] = self._service.stopService()
        return d

    def is_connected(self) -> bool:
        return self._protocol is not None

    def channels(self) -> int:
        """Channels this node holds subscribed (or is subscribing)."""
        return sum(1 for w in self._wanted.values() if w.refs > 0)

    # -- what the node wants

    def watch(self, channel: str) -> Deferred[None]:
        """Want ``channel``; fires once Redis confirmed the subscription.

        Every call counts, failed or not, and is matched by one `unwatch`. While
        the link is down it fails at once (the channel is subscribed when the
        link comes back, if it is still wanted then).
        """
        wanted = self._wanted.get(channel)
        if wanted is None:
            wanted = self._wanted[channel] = _Wanted()
        wanted.refs += 1
        if wanted.linger is not None:
            if wanted.linger.active():
                wanted.linger.cancel()
            wanted.linger = None
        if wanted.active:
            return succeed(None)
        if self._protocol is None:
            return fail(RedisUnavailable(f"redis {self.role} link is not connected"))
        d: Deferred[None] = Deferred()
        wanted.waiters.append(d)
        if not wanted.requested:
            wanted.requested = True
            self._to_subscribe.append(channel)
            self._schedule_flush()
        return d

    def unwatch(self, channel: str) -> None:
        """One want of ``channel`` fewer; the last one unsubscribes it after a linger."""
        wanted = self._wanted.get(channel)
        if wanted is None or wanted.refs <= 0:
            return
        wanted.refs -= 1
        if wanted.refs == 0:
            if wanted.requested or wanted.active:
                wanted.linger = self.clock.callLater(self._linger, self._expire, channel)
            else:
                self._forget_if_unwanted(channel, wanted)

    def hold(self, channel: str) -> None:
        """Want ``channel`` for as long as the node runs (control messages)."""
        self.watch(channel).addErrback(lambda _: None)

    def _forget_if_unwanted(self, channel: str, wanted: _Wanted) -> None:
        if wanted.refs == 0 and not wanted.requested and not wanted.active:
            self._wanted.pop(channel, None)

    def _expire(self, channel: str) -> None:
        wanted = self._wanted.get(channel)
        if wanted is None or wanted.refs > 0:
            return
        wanted.linger = None
        del self._wanted[channel]
        if self._protocol is not None and (wanted.active or wanted.requested):
            self._to_unsubscribe.append(channel)
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        protocol = self._protocol
        subscribe, self._to_subscribe = self._to_subscribe, []
        unsubscribe, self._to_unsubscribe = self._to_unsubscribe, []
        if protocol is None:
            return
        # Unsubscribes first: a channel dropped and wanted again in one turn ends subscribed.
        for kind, channels in ((b"UNSUBSCRIBE", unsubscribe), (b"SUBSCRIBE", subscribe)):
            for start in range(0, len(channels), BATCH):
                protocol.send(kind, channels[start : start + BATCH])

    # -- called by the protocol

    def active(self, channels: Iterable[str]) -> None:
        for channel in channels:
            wanted = self._wanted.get(channel)
            if wanted is None:
                continue
            wanted.active = True
            wanted.requested = False
            waiters, wanted.waiters = wanted.waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def message(self, channel: bytes, payload: bytes) -> None:
        self._metrics.cluster_messages_received += 1
        try:
            self._on_message(channel.decode("utf-8"), payload.decode("utf-8"))
        except UnicodeDecodeError:
            _log.warn(
                "dropped a malformed message from redis: not UTF-8",
                securepub_event="cluster_message_dropped",
            )

    def lost(self, protocol: SubscriberProtocol) -> None:
        if self._protocol is not protocol:
            return
        self._protocol = None
        _log.warn(
            "redis {name} link lost; reconnecting to {target}",
            name=self.role,
            target=self.target.display(),
            securepub_event="redis_lost",
        )
        for channel, wanted in list(self._wanted.items()):
            wanted.active = False
            wanted.requested = False
            waiters, wanted.waiters = wanted.waiters, []
            for waiter in waiters:
                waiter.errback(RedisUnavailable(f"redis {self.role} link lost"))
            if wanted.refs == 0:
                if wanted.linger is not None and wanted.linger.active():
                    wanted.linger.cancel()
                del self._wanted[channel]

    def _prepare(self, proxy: Any) -> Deferred[None]:
        """On each connection: once authenticated, subscribe everything wanted again.

        ``proxy`` is ClientService's wrapper; ``ready`` fires with the protocol itself.
        """

        def up(protocol: SubscriberProtocol) -> None:
            self._protocol = protocol
            _log.info(
                "redis {name} link connected to {target}",
                name=self.role,
                target=self.target.display(),
                securepub_event="redis_connected",
            )
            again = [c for c, w in self._wanted.items() if w.refs > 0]
            for channel in again:
                self._wanted[channel].requested = True
            self._to_subscribe = again + [c for c in self._to_subscribe if c not in again]
            self._to_unsubscribe = []
            if self._to_subscribe:
                self._schedule_flush()
            self._on_connected()

        ready: Deferred[None] = proxy.ready.addCallback(up)
        return ready
