"""One securepub node: builds the store, broker, site and TLS listener from Settings."""

from __future__ import annotations

from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.application.service import Service
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.web.resource import IResource

from securepub.broker.broker import Broker
from securepub.core.apikeys import load_api_keys
from securepub.core.engine import IFanout, IHistory, IPresence
from securepub.core.errors import ConfigError
from securepub.core.ids import MessageIds
from securepub.core.origin import OriginPolicy
from securepub.core.tickets import ITicketStore
from securepub.core.validation import PayloadValidator
from securepub.dev.pages import dev_routes
from securepub.engines.memory.fanout import LocalFanout
from securepub.engines.memory.history import HistorySweeper, MemoryHistory
from securepub.engines.memory.presence import MemoryPresence
from securepub.engines.memory.tickets import MemoryTicketStore
from securepub.engines.redis.codec import Codec
from securepub.engines.redis.fanout import RedisFanout
from securepub.engines.redis.history import RedisHistory
from securepub.engines.redis.presence import PresenceKeeper, RedisPresence
from securepub.engines.redis.shards import Shard, Shards
from securepub.engines.redis.tickets import RedisTicketStore
from securepub.ops.metrics import Metrics
from securepub.server.api import (
    DisconnectResource,
    Health,
    HistoryResource,
    MetricsResource,
    PresenceResource,
    PublishResource,
    TicketsResource,
)
from securepub.server.endpoints import ReusePortTLSEndpoint, TLSEndpoint
from securepub.server.files import StaticFiles
from securepub.server.protocol import SecurePubFactory
from securepub.server.settings import Settings
from securepub.server.site import Opening, Root, SecurePubSite, WebSocketOnly
from securepub.server.tls import ReloadableServerTLS, server_context_factory

_log = Logger()

#: Seconds an HTTP connection may stay idle before it is closed.
HTTP_IDLE_TIMEOUT = 60


class Node:
    """Everything one process serves; ``listen()`` opens the TLS port.

    Construction does all the checking that can fail (certificates, schemas,
    origins), so a bad configuration stops the start before anything listens.
    """

    def __init__(self, settings: Settings, reactor: Any) -> None:
        self.settings = settings
        self.reactor = reactor
        limits = settings.limits
        self.tls = ReloadableServerTLS(
            server_context_factory(settings.cert, settings.key, settings.client_ca)
        )
        self.origin_policy = OriginPolicy(settings.allowed_origins, settings.enforce_origin)
        self.validator = PayloadValidator(
            limits.max_message_bytes, limits.max_json_depth, settings.topics
        )
        self.metrics = Metrics()
        self.shards: Shards | None = None
        self.history_memory: MemoryHistory | None = None
        self.redis_presence: RedisPresence | None = None
        self._services: list[Service] = []
        self.ids = MessageIds()
        fanout: IFanout
        history: IHistory
        presence: IPresence
        if not settings.redis:
            self.tickets: ITicketStore = MemoryTicketStore(reactor)
            self.history_memory = MemoryHistory(reactor, limits.max_history_bytes)
            history = self.history_memory
            fanout = LocalFanout(self.history_memory)
            self._services.append(HistorySweeper(self.history_memory, reactor))
            presence = MemoryPresence()
        else:
            codec = Codec(limits.max_frame_bytes, settings.cluster_signer)
            self.shards = shards = Shards(
                reactor,
                settings.redis,
                self.metrics,
                on_message=lambda shard, channel, message: self._redis_fanout.received(
                    shard, channel, message
                ),
                on_connected=self._redis_connected,
            )
            self._redis_fanout = RedisFanout(shards, codec, reactor)
            fanout = self._redis_fanout
            self._services.extend(shards.services())
            self.tickets = RedisTicketStore(
                [(shard.name, shard.commands) for shard in shards.all], reactor
            )
            history = RedisHistory(shards, codec, reactor)
            self.redis_presence = RedisPresence(
                shards, codec, reactor, self.ids, self.validator.announces_join_leave
            )
            presence = self.redis_presence
            self._services.append(PresenceKeeper(self.redis_presence, reactor))
        # The broker frames messages with the factory's prepareMessage (looked
        # up at call time, see _prepare), so it can be built first.
        self.broker = Broker(
            self.validator,
            limits,
            reactor,
            prepare=self._prepare,
            fanout=fanout,
            history=history,
            presence=presence,
            ids=self.ids,
            metrics=self.metrics,
        )
        self.opening = Opening(limits.max_opening_connections)
        self.factory = SecurePubFactory(
            broker=self.broker,
            tickets=self.tickets,
            origin_policy=self.origin_policy,
            limits=limits,
            clock=reactor,
            proxies=settings.proxies,
            metrics=self.metrics,
            opening=self.opening,
        )
        self._register_gauges()
        routes = {
            b"ws": WebSocketOnly(WebSocketResource(self.factory)),
            b"healthz": Health(self.health_problem),
            b"v1/tickets": TicketsResource(settings.api_keys, reactor, self.tickets, limits),
            b"v1/publish": PublishResource(settings.api_keys, reactor, self.broker),
            b"v1/history": HistoryResource(settings.api_keys, reactor, self.broker),
            b"v1/presence": PresenceResource(settings.api_keys, reactor, self.broker),
            b"metrics": MetricsResource(settings.api_keys, reactor, self.metrics.render),
            b"v1/disconnect": DisconnectResource(
                settings.api_keys, reactor, self.broker, self.tickets
            ),
            # /static/securepub.js always; /demo and /dev/ticket only with --dev.
            **client_routes(
                dev=settings.dev, port=settings.port, tickets=self.tickets, clock=reactor
            ),
        }
        # An HTTP connection idle this long is closed (Twisted's default is 12
        # hours); it also bounds a TLS or HTTP handshake that never completes.
        self.site = SecurePubSite(
            Root(routes),
            max_body_bytes=limits.max_frame_bytes,
            timeout=HTTP_IDLE_TIMEOUT,
            reactor=reactor,
            proxies=settings.proxies,
            opening=self.opening,
            websocket=self.factory,
            # Our bodies are JSON: skip twisted.web's form parsing, whose
            # Content-Type parsing alone was 22% of issuing a ticket (bench/).
            parsePOSTFormSubmission=False,
        )

    def _redis_connected(self, shard: Shard, link: str) -> None:
        """A link to one Redis server is (back) up.

        Its commands link: this node's presence there is written back. Its
        pub/sub link (which subscribed again what the sessions want): what
        it missed meanwhile is filled from history.
        """
        if link == "commands" and self.redis_presence is not None:
            self.redis_presence.restore(shard)
        elif link == "messages":
            self._redis_fanout.connected(shard)

    def services(self) -> list[Service]:
        """Services to run beside the listener: the Redis links, or the history sweeper."""
        return list(self._services)

    def reload(self) -> None:
        """Reload the certificate, key and API keys (SIGHUP).

        New connections get the new certificate; open ones keep theirs. A
        file that does not load is refused with a log line and the old one
        is kept, so a bad deploy cannot take the node down.
        """
        settings = self.settings
        try:
            self.tls.current = server_context_factory(
                settings.cert, settings.key, settings.client_ca
            )
            _log.info("reloaded certificate {cert}", cert=settings.cert, securepub_event="reloaded")
        except ConfigError as e:
            _log.error(
                "reload refused, keeping the current certificate: {problem}",
                problem=str(e),
                securepub_event="reload_refused",
            )
        try:
            settings.api_keys.replace(load_api_keys(settings.api_key_file))
            _log.info(
                "reloaded API keys from {path}",
                path=settings.api_key_file,
                securepub_event="reloaded",
            )
        except ConfigError as e:
            _log.error(
                "reload refused, keeping the current API keys: {problem}",
                problem=str(e),
                securepub_event="reload_refused",
            )

    def _register_gauges(self) -> None:
        gauge = self.metrics.gauge
        gauge(
            "open_connections",
            "Open WebSocket connections.",
            lambda: len(self.factory.open_connections),
        )
        opening = self.opening
        gauge(
            "opening_connections",
            "Connections still opening: TLS, first request headers, or ticket redemption.",
            lambda: opening.count + opening.redeeming,
        )
        gauge(
            "shed_connections",
            "Connections dropped at once since start: max_opening_connections were opening.",
            lambda: opening.shed,
        )
        gauge(
            "ticket_store_entries",
            "Tickets and tombstones this node holds (0 with Redis, which holds them).",
            self.tickets.size,
        )
        memory = self.history_memory
        if memory is not None:
            gauge("history_messages", "Messages held in history.", lambda: memory.messages)
            gauge("history_bytes", "Bytes counted for history.", lambda: memory.bytes)
            gauge("history_topics", "Topics holding history.", lambda: memory.topics)
            gauge(
                "history_evicted_topics",
                "Topics evicted from history over max_history_bytes (since start).",
                lambda: memory.evicted,
            )
        shards = self.shards
        if shards is not None:
            gauge(
                "redis_up",
                "1 while both links to a Redis server are connected.",
                lambda: {(s.name,): float(s.is_up()) for s in shards.all},
                labels=("server",),
            )
            gauge(
                "redis_channels",
                "Pub/sub channels this node holds on each Redis server.",
                lambda: {(s.name,): float(s.subscriber.channels()) for s in shards.all},
                labels=("server",),
            )

    def health_problem(self) -> str | None:
        """Why this node cannot serve now, or None (``/healthz``).

        With several Redis servers the node serves while any is up: what
        hashes to a server that is down answers 503 on its own.
        """
        if self.shards is None:
            return None
        if any(shard.is_up() for shard in self.shards.all):
            return None
        names = ", ".join(shard.name for shard in self.shards.all)
        return f"redis unreachable ({names})"

    def _prepare(self, frame: bytes) -> Any:
        return self.factory.prepareMessage(frame)

    def warnings(self) -> list[str]:
        """Start-time warnings about a configuration that works but may surprise."""
        found = []
        if self.settings.redis and self.settings.cluster_signer is None:
            found.append(
                "redis is set without cluster_secret_file: messages between nodes are "
                "not signed, so anyone who can write to Redis can publish to browsers"
            )
        if self.origin_policy.allows_nothing:
            found.append(
                "allowed_origins is empty and origin_policy is 'enforce': every browser "
                "request carrying an Origin header will be refused"
            )
        return found

    def log_warnings(self) -> None:
        for text in self.warnings():
            _log.warn("{warning}", warning=text, securepub_event="config_warning")

    def endpoint(self) -> IStreamServerEndpoint:
        """The TLS endpoint; there is no plaintext listener."""
        settings = self.settings
        if settings.reuse_port:
            return ReusePortTLSEndpoint(self.reactor, settings.port, self.tls, settings.interface)
        return TLSEndpoint(self.reactor, settings.port, self.tls, settings.interface)


def client_routes(
    *, dev: bool, port: int, tickets: ITicketStore, clock: Any
) -> dict[bytes, IResource]:
    """The routes for browsers: ``static`` always, ``demo`` and ``dev`` with --dev."""
    routes: dict[bytes, IResource] = {b"static": StaticFiles()}
    if dev:
        routes.update(dev_routes(port=port, tickets=tickets, clock=clock))
    return routes
