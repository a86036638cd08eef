"""The twistd service of one node: start in order, and stop without losing work."""

from __future__ import annotations

import gc
import signal
import sys
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.logger import Logger, globalLogPublisher

_log = Logger()

#: gc thresholds while serving: generation 0 collected every 100,000 allocations.
GC_THRESHOLDS = (100_000, 50, 1000)

#: Seconds clients get to finish the closing handshake when the node stops.
DRAIN_TIMEOUT = 5.0


class Listener(StreamServerEndpointService):
    """The TLS listener; a port that can't be bound stops twistd at once."""

    def __init__(self, node: Any) -> None:
        super().__init__(node.endpoint(), node.site)
        self._raiseSynchronously = True
        self.node = node

    def privilegedStartService(self) -> None:
        self.node.log_warnings()
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            # twistd has replaced sys.stderr with its log by now; say it on the real one.
            (sys.__stderr__ or sys.stderr).write(
                f"twistd securepub: error: cannot listen on {e.interface or '*'}:{e.port}: "
                f"{reason}\n"
            )
            raise SystemExit(1) from None
        _log.info(
            "securepub listening on https://{interface}:{port} (wss://.../ws)",
            securepub_event="listening",
            interface=self.node.settings.interface,
            port=self.node.settings.port,
        )


class NodeService(MultiService):
    """The Redis links, then the listener; stopping (SIGTERM) runs the other way.

    A stop first closes the listening port, then closes every WebSocket
    with 1001 and waits for publishes already accepted to reach the
    fan-out engine, and only then drops the Redis links those publishes
    need. A plain MultiService would stop all of them at once.
    """

    _previous_sighup: Any = signal.SIG_DFL

    def __init__(self, node: Any, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        super().__init__()
        self.node = node
        self.drain_timeout = drain_timeout
        self.helpers = node.services()
        for helper in self.helpers:
            helper.setServiceParent(self)
        self.listener = Listener(node)
        self.listener.setServiceParent(self)

    def startService(self) -> None:
        globalLogPublisher.addObserver(self.node.metrics)
        # Objects made while starting live as long as the process: keep them
        # out of every collection, and collect the young generation less
        # often. Collection pauses were most of the p99 latency (bench/).
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        super().startService()
        reactor = self.node.reactor
        # SIGHUP reloads certificate, key and API keys; signal handlers run
        # between bytecodes, so the work is handed to the reactor's thread.
        self._previous_sighup = signal.signal(
            signal.SIGHUP, lambda *_: reactor.callFromThread(self.node.reload)
        )

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        globalLogPublisher.removeObserver(self.node.metrics)
        signal.signal(signal.SIGHUP, self._previous_sighup)
        node = self.node
        started = node.reactor.seconds()
        sessions = len(node.factory.open_connections)
        d: Deferred[Any] = maybeDeferred(self.listener.stopService)
        d.addCallback(lambda _: node.factory.close_all(self.drain_timeout))
        d.addCallback(lambda _: node.broker.idle())

        def drained(_: object) -> Deferred[Any]:
            _log.info(
                "stopped: {sessions} sessions closed and accepted publishes handed on "
                "in {seconds:.3f} s",
                securepub_event="drained",
                sessions=sessions,
                seconds=node.reactor.seconds() - started,
            )
            return DeferredList([maybeDeferred(helper.stopService) for helper in self.helpers])

        return d.addCallback(drained)
