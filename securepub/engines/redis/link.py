"""Reconnecting connections to Redis, behind a small interface of our own."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from securepub.core.errors import ConfigError
from securepub.ops.metrics import Metrics

_log = Logger()

#: Seconds a command may wait for Redis's answer before the link is cut.
REPLY_TIMEOUT = 3.0
#: Seconds a TCP connection attempt may take.
CONNECT_TIMEOUT = 5.0


class RedisUnavailable(Exception):
    """Redis cannot answer now: not connected, connection lost, or no reply in time."""


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where Redis is; ``repr`` and `display` never show the credentials."""

    host: str
    port: int
    db: int | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca: str | None = None

    @classmethod
    def parse(cls, url: str, ca: str | None = None) -> RedisTarget:
        """``redis://[user:password@]host[:port][/db]``, or ``rediss://`` for TLS."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise ConfigError("redis: not a valid redis:// or rediss:// URL") from None
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigError("redis: the URL must start with redis:// or rediss://")
        if not parts.hostname:
            raise ConfigError("redis: the URL names no host")
        if parts.query or parts.fragment:
            raise ConfigError("redis: query strings and fragments are not supported")
        db = None
        path = parts.path.strip("/")
        if path:
            if not path.isdigit() or int(path) > 1_000_000:
                raise ConfigError("redis: the database must be a number, as in redis://host/0")
            db = int(path)
        tls = parts.scheme == "rediss"
        if ca is not None and not tls:
            raise ConfigError("redis_ca: only used with rediss:// URLs")
        return cls(
            host=parts.hostname,
            port=port or 6379,
            db=db,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            tls=tls,
            ca=ca,
        )

    def display(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        db = f"/{self.db}" if self.db is not None else ""
        return f"{scheme}://{self.host}:{self.port}{db}"

    def endpoint(self, reactor: Any) -> IStreamClientEndpoint:
        """TCP, or TLS verifying the server's certificate and hostname."""
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            reactor, self.host, self.port, timeout=CONNECT_TIMEOUT
        )
        if not self.tls:
            return endpoint
        trust: Any
        if self.ca is None:
            trust = ssl.platformTrust()
        else:
            try:
                with open(self.ca, "rb") as f:
                    trust = ssl.Certificate.loadPEM(f.read())
            except (OSError, ValueError) as e:
                raise ConfigError(f"redis_ca: cannot load {self.ca}: {e}") from None
        # optionsForClientTLS checks the hostname with service_identity.
        options = ssl.optionsForClientTLS(self.host, trustRoot=trust)
        return wrapClientTLS(options, endpoint)


class IRedisLink(Interface):
    """One connection to Redis that comes back by itself after it is lost."""

    def execute(*args: Any) -> Deferred[Any]:
        """Run one command; errback `RedisUnavailable` at once when not connected."""

    def is_connected() -> bool:
        """Whether commands can be sent now."""


#: Every script defined (at import, as module constants): loaded on each connection.
_SCRIPTS: list[Script] = []


class Script:
    """A Lua script, run by its SHA-1 (EVALSHA), sent whole only when Redis lacks it.

    Every command link loads all scripts when it connects (SCRIPT LOAD), so
    the first crowd of calls after a (re)connect does not bounce on NOSCRIPT.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()  # noqa: S324 - Redis's name
        _SCRIPTS.append(self)

    def run(self, link: IRedisLink, keys: Sequence[str], args: Sequence[Any]) -> Deferred[Any]:
        """Run on ``link``; a Redis that restarted (NOSCRIPT) gets the source once more."""
        d = link.execute("EVALSHA", self.sha, len(keys), *keys, *args)

        def again(failure: Failure) -> Any:
            if failure.check(txredisapi.ResponseError) and str(failure.value).startswith(
                "NOSCRIPT"
            ):
                return link.execute("EVAL", self.source, len(keys), *keys, *args)
            return failure

        return d.addErrback(again)


def backoff(attempt: int) -> float:
    """0.5 s doubling to 10 s, with jitter so nodes do not reconnect in step."""
    delay = min(0.5 * math.pow(2, min(attempt, 10)), 10.0)
    return delay * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not a secret


class _RepliesInOneTurn(txredisapi.RedisProtocol):  # type: ignore[misc]
    """txredisapi's protocol, reading every buffered reply in the same reactor turn.

    After each bulk string, txredisapi's line reader pauses and hands what
    follows to ``callLater(0)``: k replies that arrive together are then read
    one per reactor turn. Under load (a turn that delivers a message to 1,000
    sockets takes milliseconds) that spread publishes on a history topic,
    whose script answers a bulk epoch, over as many turns, each delivered on
    its own: 0.18x the throughput of topics without history in
    ``bench/history.py``'s Redis flood. Here what follows is read at once,
    in a loop rather than by recursion.
    """

    _rest: bytes = b""
    _draining = False

    def setLineMode(self, extra: bytes = b"") -> None:
        self.line_mode = 1
        if extra:
            self._rest += extra

    def dataReceived(self, data: bytes, unpause: bool = False) -> None:
        if self._draining:  # called back from within a reply: take it in the loop
            self._rest += data
            return
        self._draining = True
        try:
            super().dataReceived(data, unpause)
            while self._rest and self.transport is not None:
                rest, self._rest = self._rest, b""
                super().dataReceived(rest)
        finally:
            self._draining = False


class _ProtocolFactory(Factory):
    """Builds txredisapi protocols; answers the factory calls they make."""

    isLazy = True  # txredisapi: log connection errors instead of failing a Deferred
    noisy = False

    def __init__(self, link: RedisLink, protocol_class: type) -> None:
        self._link = link
        self._protocol_class = protocol_class

    def buildProtocol(self, addr: Any) -> Any:
        target = self._link.target
        p = self._protocol_class(
            charset="utf-8",
            replyTimeout=REPLY_TIMEOUT,
            password=target.password,
            dbid=target.db,
            convertNumbers=False,
            username=target.username,
        )
        p.factory = self
        return p

    def stopTrying(self) -> None:
        # txredisapi gives up after an AUTH or SELECT failure; we keep the
        # backoff going so the node recovers when Redis is fixed.
        pass

    def connectionError(self, message: str) -> None:
        # txredisapi's text says which step failed; it never holds the password.
        _log.error(
            "redis {name}: {message}",
            name=self._link.role,
            message=message,
            securepub_event="redis_error",
        )


@implementer(IRedisLink)
class RedisLink(Service):
    """A reconnecting link to one Redis server for commands (txredisapi).

    Pub/sub has a link of its own (`securepub.engines.redis.subscriber`).
    """

    def __init__(
        self,
        reactor: Any,
        target: RedisTarget,
        role: str,
        metrics: Metrics | None = None,
        on_connected: Callable[[], None] | None = None,
    ) -> None:
        self._on_connected = on_connected
        self._reactor = reactor
        self._metrics = metrics if metrics is not None else Metrics()
        self.target = target
        self.role = role
        self._protocol: Any = None
        self._service = ClientService(
            target.endpoint(reactor),
            _ProtocolFactory(self, _RepliesInOneTurn),
            retryPolicy=backoff,
            clock=reactor,
            prepareConnection=self._prepare,
        )

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

    def execute(self, *args: Any) -> Deferred[Any]:
        protocol = self._protocol
        if protocol is None:
            return fail(RedisUnavailable(f"redis {self.role} link is not connected"))
        try:
            d: Deferred[Any] = protocol.execute_command(*args)
        except txredisapi.ConnectionError:
            return fail(RedisUnavailable(f"redis {self.role} link is not connected"))
        d.addBoth(self._timed, self._reactor.seconds())
        return d.addErrback(self._unavailable)

    def _timed(self, result: object, sent: float) -> object:
        self._metrics.redis_roundtrip.observe(self._reactor.seconds() - sent)
        return result

    @staticmethod
    def _unavailable(failure: Failure) -> Failure:
        if failure.check(txredisapi.ConnectionError):  # includes reply time-outs
            return Failure(RedisUnavailable(str(failure.value)))
        return failure

    def _prepare(self, protocol: Any) -> Deferred[None]:
        """Called by ClientService on each new connection: AUTH/SELECT, then a PING."""

        def ready(_: object) -> Deferred[Any]:
            # One round trip before the link counts as up (over TLS the
            # handshake and the server's certificate check are done by then),
            # which also loads every script.
            loads = [protocol.execute_command("SCRIPT", "LOAD", s.source) for s in _SCRIPTS]
            d: Deferred[Any] = DeferredList(
                [*loads, protocol.execute_command("PING")], fireOnOneErrback=True
            )
            return d

        def up(_: object) -> None:
            self._protocol = protocol
            protocol.whenDisconnected().addCallback(self._lost, protocol)
            _log.info(
                "redis {name} link connected to {target}",
                name=self.role,
                target=self.target.display(),
                securepub_event="redis_connected",
            )
            if self._on_connected is not None:
                self._on_connected()

        done: Deferred[None] = Deferred()

        def failed(_: object) -> None:
            # AUTH or SELECT refused, or the link dropped mid-setup: txredisapi
            # then closes without firing whenConnected; let ClientService retry.
            if not done.called:
                done.errback(RedisUnavailable(f"redis {self.role} link failed during setup"))

        protocol.whenDisconnected().addCallback(failed)
        protocol.whenConnected().addCallback(ready).addCallback(up).chainDeferred(done)
        return done

    def _lost(self, _: object, protocol: Any) -> None:
        if self._protocol is protocol:
            self._protocol = None
            _log.warn(
                "redis {name} link lost; reconnecting to {target}",
                name=self.role,
                target=self.target.display(),
                securepub_event="redis_lost",
            )
