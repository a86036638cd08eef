"""The WebSocket protocol: handshake checks, then frames translated to broker calls."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from typing import Any, NoReturn, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import TrafficStats
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from securepub.broker.broker import Broker
from securepub.broker.sessions import Grants, ISubscriber, Session
from securepub.core import jsonstrict
from securepub.core.clientip import ProxyPolicy
from securepub.core.errors import RequestError
from securepub.core.history import MAX_OFFSET, Position, Subscribed
from securepub.core.limits import Limits
from securepub.core.origin import OriginPolicy
from securepub.core.ratelimit import ConnectionCounter
from securepub.core.tickets import ITicketStore, StoreUnavailable, Ticket, TicketRefused
from securepub.ops.metrics import Metrics
from securepub.server.api import retry_after
from securepub.server.site import Opening

SUBPROTOCOL = "securepub.v1"
TICKET_PREFIX = "ticket."

#: Close codes (RFC 6455) this protocol sends.
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY_VIOLATION = 1008
#: The connection could not keep up: more than ``max_queued_bytes`` waited for it.
CLOSE_SLOW_CONSUMER = 4008
#: The server is shutting down: reconnect (to another node) with a new ticket.
CLOSE_GOING_AWAY = 1001
#: The user's sessions were revoked (POST /v1/disconnect).
CLOSE_REVOKED = 4001
#: The session's lifetime ended without a refresh (SPEC section 9).
CLOSE_SESSION_EXPIRED = 4003

#: Largest integer ``id`` echoed back: JavaScript's Number.MAX_SAFE_INTEGER.
MAX_INT_ID = 2**53 - 1
MAX_STR_ID = 64

#: Each op's required fields, and the optional ones it also takes.
_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "subscribe": (frozenset({"op", "id", "topic"}), frozenset({"since"})),
    "unsubscribe": (frozenset({"op", "id", "topic"}), frozenset()),
    "publish": (frozenset({"op", "id", "topic", "data"}), frozenset()),
    "refresh": (frozenset({"op", "id", "ticket"}), frozenset()),
    "presence": (frozenset({"op", "id", "topic"}), frozenset()),
}
#: Longest epoch a client may send back (the server's own are 16 characters).
MAX_EPOCH_CHARS = 64

#: What Autobahn keeps of the opening handshake and never reads once the
#: connection is open (about 2.4 KiB per idle connection, bench/conn_breakdown.py).
_HANDSHAKE_ONLY = (
    "http_request_data",
    "http_headers",
    "http_status_line",
    "http_request_uri",
    "http_request_path",
    "http_request_params",
    "http_request_host",
    "http_response_data",
    "websocket_protocols",
    "websocket_extensions",
    "_transport_details",  # reads None from the class (see _IDLE_DEFAULTS) once dropped
    "_hs",
)

#: What an open, idle connection holds in these Autobahn attributes. They are
#: also class attributes of the protocol, so an instance still holding exactly
#: these values need not store them: ``_shed_handshake_state`` drops them from
#: its ``__dict__`` (1.5 KiB down to 0.8 KiB). Setting one again stores it
#: again; reading one is unchanged. Only immutable values, compared by identity.
_IDLE_DEFAULTS: dict[str, object] = {
    **dict.fromkeys(
        (
            "closedByMe",
            "failedByMe",
            "droppedByMe",
            "wasClean",
            "wasServerConnectionDropTimeout",
            "wasOpenHandshakeTimeout",
            "wasCloseHandshakeTimeout",
            "wasServingFlashSocketPolicyFile",
            "wasMaxFramePayloadSizeExceeded",
            "wasMaxMessagePayloadSizeExceeded",
            "inside_message",
            "triggered",
        ),
        False,
    ),
    **dict.fromkeys(
        (
            "_perMessageCompress",
            "trackedTimings",
            "wasNotCleanReason",
            "localCloseCode",
            "localCloseReason",
            "remoteCloseCode",
            "remoteCloseReason",
            "openHandshakeTimeoutCall",
            "closeHandshakeTimeoutCall",
            "autoPingTimeoutCall",
            "autoPingPending",
            "autoPingPendingSent",
            "current_frame",
            "_transport_details",
        ),
        None,
    ),
    "autoPingPendingSeq": 0,
    "data": b"",
    "websocket_version": 13,
}

#: Stands for Autobahn's send queue while nothing waits in it: a deque costs
#: 760 bytes per connection, and frames are written straight to the transport.
_NO_QUEUE: Any = ()

#: The one TrafficStats all open connections count into (nobody reads it).
_UNREAD_STATS = TrafficStats()

#: Status lines of refused handshakes: generic on purpose, the log says why.
_REASON_PHRASES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _message_id(message: Any) -> int | str:
    """The client's ``id``, checked first so every later error can echo it."""
    if not isinstance(message, dict):
        raise RequestError("bad_request", "a frame must hold one JSON object")
    message_id = message.get("id")
    if isinstance(message_id, bool) or not isinstance(message_id, (int, str)):
        raise RequestError("bad_request", "'id' is required: a string or an integer")
    if isinstance(message_id, int) and abs(message_id) > MAX_INT_ID:
        raise RequestError("bad_request", "an integer 'id' must be at most 2**53-1")
    if isinstance(message_id, str) and len(message_id) > MAX_STR_ID:
        raise RequestError("bad_request", f"a string 'id' must be at most {MAX_STR_ID} characters")
    return message_id


def _op(message: dict[str, Any]) -> str:
    """The frame's ``op``, once its fields are exactly the ones that op takes."""
    op = message.get("op")
    fields = _FIELDS.get(op) if isinstance(op, str) else None
    if fields is None:
        raise RequestError("bad_request", "unknown or missing 'op'")
    required, optional = fields
    extra = message.keys() - required - optional
    if extra:
        raise RequestError("bad_request", f"unknown field {sorted(extra)[0][:40]!r}")
    missing = required - message.keys()
    if missing:
        raise RequestError("bad_request", f"missing field {sorted(missing)[0]!r}")
    if "topic" in required and not isinstance(message["topic"], str):
        raise RequestError("bad_request", "'topic' must be a string")
    assert isinstance(op, str)
    return op


def _since(value: Any) -> Position:
    """A subscribe's ``since``: ``{"offset": N, "epoch": "E"}`` and nothing else."""
    if not isinstance(value, dict) or value.keys() != {"offset", "epoch"}:
        raise RequestError("bad_request", '\'since\' must be {"offset": N, "epoch": "E"}')
    offset, epoch = value["offset"], value["epoch"]
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= MAX_OFFSET:
        raise RequestError("bad_request", "'since.offset' must be an integer from 0 to 2**53-1")
    if not isinstance(epoch, str) or len(epoch) > MAX_EPOCH_CHARS:
        raise RequestError(
            "bad_request", f"'since.epoch' must be a string of at most {MAX_EPOCH_CHARS} characters"
        )
    return Position(offset, epoch)


def _ok(message_id: int | str, subscribed: Subscribed) -> dict[str, Any]:
    """The ``ok`` of a subscribe, with the position of a history topic (SPEC section 8)."""
    frame: dict[str, Any] = {"op": "ok", "id": message_id}
    if subscribed.recovered is not None:
        frame["recovered"] = subscribed.recovered
    if subscribed.position is not None:
        frame["offset"] = subscribed.position.offset
        frame["epoch"] = subscribed.position.epoch
    return frame


def _peer_ip(transport: Any) -> str:
    peer = transport.getPeer()
    return str(getattr(peer, "host", "unknown"))


@implementer(ISubscriber, IPushProducer)
class SecurePubServerProtocol(WebSocketServerProtocol):
    """One browser or script connection. Autobahn owns ``.log``; ours is ``_log``."""

    _log = Logger()
    factory: SecurePubFactory

    _session: Session | None = None
    _counted_ip: str | None = None
    _handshake_logged = False
    _errors_sent = 0
    _started: float | None = None
    _hs: dict[str, Any]
    #: The client's address (after trusted proxies), kept once ``_hs`` is dropped.
    _peer: str | None = None
    #: Whether the transport asked us to stop producing (its buffer is full).
    _paused = False
    #: Bytes handed to the transport since it paused us.
    _queued = 0

    # -- lean connection state --------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        self.send_queue = _NO_QUEUE  # a real deque only once something must wait

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        if self.send_queue is _NO_QUEUE and (sync or (chopsize is not None and chopsize > 0)):
            self.send_queue = deque()
        super().sendData(data, sync, chopsize)

    def _shed_handshake_state(self) -> None:
        """Drop what only the opening handshake needed, and compact what is left.

        An instance ``__dict__`` never shrinks: rebuilding it once the
        handshake attributes are gone returns their table slots too. The
        traffic counters Autobahn keeps per connection are never read here:
        open connections all count into one object.
        """
        state = self.__dict__
        for name in _HANDSHAKE_ONLY:
            state.pop(name, None)
        state["trafficStats"] = _UNREAD_STATS
        idle = _IDLE_DEFAULTS
        self.__dict__ = {
            name: value
            for name, value in state.items()
            if name not in idle or idle[name] is not value
        }

    # -- opening handshake ------------------------------------------------

    def onConnect(self, request: ConnectionRequest) -> Any:  # Deferred[str | None]
        f = self.factory
        self._started = f.clock.seconds()
        headers = request.headers
        tcp_peer = _peer_ip(self.transport)
        found = f.proxies.client(
            tcp_peer,
            [headers["forwarded"]] if "forwarded" in headers else [],
            [headers["x-forwarded-for"]] if "x-forwarded-for" in headers else [],
        )
        peer = found.ip
        self._hs = {
            "peer": peer,
            "origin": (headers.get("origin") or "")[:200] or None,
            "user_agent": (headers.get("user-agent") or "")[:200] or None,
            "user": None,
            "tcp_peer": tcp_peer,
            "proxy_headers_ignored": found.ignored_headers,
        }
        decision = f.origin_policy.check(headers.get("origin"))
        self._hs["origin_decision"] = decision.reason
        if not decision.allowed:
            self._deny(403, "origin_" + decision.reason)
        if not f.connections.acquire(peer):
            self._deny(429, "too_many_connections")
        self._counted_ip = peer
        opening = f.opening
        if opening is not None and opening.crowded():
            # Before the ticket: it stays good for the retry.
            self._deny(503, "too_many_opening")
        tokens = [p[len(TICKET_PREFIX) :] for p in request.protocols if p.startswith(TICKET_PREFIX)]
        tokens += request.params.get("ticket", [])
        if not tokens:
            self._deny(401, "no_ticket")
        if len(tokens) > 1:
            self._deny(400, "several_tickets")
        offered = SUBPROTOCOL in request.protocols
        d = self._redeem(tokens[0], peer)
        return d.addCallbacks(self._redeemed, self._not_redeemed, callbackArgs=(offered,))

    def _redeem(self, token: str, peer: str) -> Deferred[Ticket]:
        """Redeem at the store, timed, and counted as opening while it is out."""
        f = self.factory
        if f.opening is not None:
            f.opening.redeeming += 1
        d: Deferred[Ticket] = maybeDeferred(f.tickets.redeem, token, peer)
        d.addBoth(self._redemption_done, f.clock.seconds())
        return d

    def _redemption_done(self, result: object, started: float) -> object:
        f = self.factory
        if f.opening is not None:
            f.opening.redeeming -= 1
        f.metrics.ticket_redemption.observe(f.clock.seconds() - started)
        return result

    def _redeemed(self, ticket: Ticket, offered: bool) -> str | None:
        self._hs["user"] = ticket.user
        if self.transport is None or self.state == self.STATE_CLOSED:
            # The client left while the store answered: the ticket is spent.
            self._deny(400, "client_gone")
        self._ticket = ticket
        self._log_handshake("accepted", 101, "ticket_redeemed")
        return SUBPROTOCOL if offered else None

    def _not_redeemed(self, failure: Failure) -> NoReturn:
        if isinstance(failure.value, TicketRefused):
            self._deny(403, "ticket_" + failure.value.reason)
        if failure.check(StoreUnavailable):
            self._deny(503, "ticket_store_unavailable")
        self._log.failure("ticket redemption failed", failure)
        self._deny(500, "internal_error")

    def _deny(self, status: int, reason: str) -> NoReturn:
        self._log_handshake("refused", status, reason)
        raise ConnectionDeny(status, _REASON_PHRASES.get(status, "Refused"))

    def _log_handshake(self, outcome: str, status: int, reason: str) -> None:
        self._handshake_logged = True
        f = self.factory
        if self._started is not None:
            f.metrics.handshake_duration.labels(outcome).observe(f.clock.seconds() - self._started)
        hs = getattr(self, "_hs", None) or {"peer": _peer_ip(self.transport)}
        self._log.info(
            "handshake {outcome} status={status} reason={reason} peer={peer} "
            "origin={origin!r} user={user!r} user_agent={user_agent!r}",
            securepub_event="handshake",
            outcome=outcome,
            status=status,
            reason=reason,
            peer=hs.get("peer"),
            origin=hs.get("origin"),
            origin_decision=hs.get("origin_decision"),
            user=hs.get("user"),
            user_agent=hs.get("user_agent"),
            tcp_peer=hs.get("tcp_peer"),
            proxy_headers_ignored=hs.get("proxy_headers_ignored"),
        )

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        if not self._handshake_logged:
            # Refused by Autobahn itself (malformed request, bad version, ...).
            self._log_handshake("refused", code, "malformed_handshake")
        headers = [*(responseHeaders or []), ("Content-Length", "0"), ("Connection", "close")]
        if code in (429, 503):
            headers.append(("Retry-After", str(retry_after())))
        super().failHandshake(_REASON_PHRASES.get(code, "Refused"), code, headers)

    # -- open connection --------------------------------------------------

    def onOpen(self) -> None:
        ticket = self._ticket
        del self._ticket
        grants = Grants(subscribe=ticket.subscribe, publish=ticket.publish)
        expires_at = self._session_end(ticket)
        self._peer = self._hs["peer"]
        self._shed_handshake_state()
        self._session = self.factory.broker.open_session(
            ticket.user, grants, self._peer, self, expires_at
        )
        self.factory.open_connections.add(self)
        # As a push producer, we hear from the transport when its buffer is
        # full, and can bound what waits there for a client that stopped reading.
        # twisted.web's channel registered itself before handing the transport
        # over to us; it no longer uses it, so its registration is replaced.
        consumer = cast(IConsumer, self.transport)
        consumer.unregisterProducer()
        consumer.registerProducer(self, True)
        self._send_json(
            {
                "op": "welcome",
                "session": self._session.id,
                "user": ticket.user,
                "expires_at": expires_at,
            }
        )

    def _session_end(self, ticket: Ticket) -> float:
        """When a session opened or refreshed with ``ticket`` ends (SPEC section 9)."""
        f = self.factory
        lifetime = ticket.session_ttl or f.limits.max_session_seconds
        return f.clock.seconds() + min(lifetime, f.limits.max_session_seconds)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self._close(CLOSE_UNSUPPORTED_DATA, "binary frames are not accepted")
            return
        session = self._session
        if session is None or self.state != self.STATE_OPEN:
            # Closing (too many errors, slow consumer, shutdown): take nothing more.
            return
        message_id: int | str | None = None
        try:
            message = jsonstrict.loads(payload)
            message_id = _message_id(message)
            op = _op(message)
            handler: Callable[[Session, dict[str, Any], int | str], Deferred[Any] | None]
            handler = getattr(self, "_handle_" + op)
            d = handler(session, message, message_id)
            if d is not None:
                d.addErrback(self._not_done, message_id)
        except RequestError as e:
            self._error(message_id, e.code, e.message)
        except Exception:  # noqa: BLE001 - a bug must cost one reply, not the connection
            self._log.failure("frame handling failed session={session}", session=session.id)
            self._error(message_id, "unavailable", "internal error; nothing was done")

    def _handle_subscribe(
        self, session: Session, message: dict[str, Any], message_id: int | str
    ) -> Deferred[Any]:
        since = _since(message["since"]) if "since" in message else None

        def confirm(subscribed: Subscribed) -> None:
            self._send_json(_ok(message_id, subscribed))

        return self.factory.broker.subscribe(session, message["topic"], since, confirm)

    def _handle_unsubscribe(
        self, session: Session, message: dict[str, Any], message_id: int | str
    ) -> None:
        self.factory.broker.unsubscribe(session, message["topic"])
        self._send_json({"op": "ok", "id": message_id})

    def _handle_publish(
        self, session: Session, message: dict[str, Any], message_id: int | str
    ) -> Deferred[Any]:
        d = self.factory.broker.client_publish(session, message["topic"], message["data"])
        return d.addCallback(lambda _: self._send_json({"op": "ok", "id": message_id}))

    def _handle_refresh(
        self, session: Session, message: dict[str, Any], message_id: int | str
    ) -> Deferred[Any]:
        """Redeem a fresh ticket in-band: as at the handshake, then for the same user only."""
        token = message["ticket"]
        if not isinstance(token, str):
            raise RequestError("bad_request", "'ticket' must be a string")
        assert self._peer is not None  # set at onOpen
        d = self._redeem(token, self._peer)
        return d.addCallbacks(
            self._refreshed,
            self._refresh_refused,
            callbackArgs=(session, message_id),
            errbackArgs=(session,),
        )

    def _refreshed(self, ticket: Ticket, session: Session, message_id: int | str) -> None:
        if self._session is not session:
            return  # closed (or revoked) while the store answered; the ticket is spent
        if ticket.user != session.user:
            self._log_refresh(session, "refused", "other_user")
            raise RequestError("forbidden", "the ticket is not valid for this session")
        expires_at = self._session_end(ticket)
        self._log_refresh(session, "accepted", "ticket_redeemed", expires_at)
        self._send_json({"op": "ok", "id": message_id, "expires_at": expires_at})
        grants = Grants(subscribe=ticket.subscribe, publish=ticket.publish)
        self.factory.broker.refresh(session, grants, expires_at)

    def _refresh_refused(self, failure: Failure, session: Session) -> Failure:
        if isinstance(failure.value, TicketRefused):
            self._log_refresh(session, "refused", "ticket_" + failure.value.reason)
            return Failure(RequestError("forbidden", "the ticket is not valid for this session"))
        if failure.check(StoreUnavailable):
            self._log_refresh(session, "refused", "ticket_store_unavailable")
            return Failure(RequestError("unavailable", "the ticket store is unavailable"))
        return failure

    def _log_refresh(
        self, session: Session, outcome: str, reason: str, expires_at: float | None = None
    ) -> None:
        """The ``session_refresh`` security event; the ticket itself is never logged."""
        self._log.info(
            "session refresh {outcome} reason={reason} session={session} user={user} peer={peer}",
            securepub_event="session_refresh",
            outcome=outcome,
            reason=reason,
            session=session.id,
            user=session.user,
            peer=self._peer,
            expires_at=expires_at,
        )

    def _handle_presence(
        self, session: Session, message: dict[str, Any], message_id: int | str
    ) -> Deferred[Any]:
        topic = message["topic"]
        d = self.factory.broker.presence(session, topic)
        return d.addCallback(
            lambda users: self._send_json(
                {"op": "presence", "id": message_id, "topic": topic, "users": users}
            )
        )

    def _not_done(self, failure: Failure, message_id: int | str) -> None:
        if isinstance(failure.value, RequestError):
            self._error(message_id, failure.value.code, failure.value.message)
            return
        self._log.failure("request failed", failure)
        self._error(message_id, "unavailable", "internal error; nothing was done")

    def _error(self, message_id: int | str | None, code: str, message: str) -> None:
        self._send_json({"op": "error", "id": message_id, "code": code, "message": message})
        self.factory.metrics.errors[code] += 1
        self._errors_sent += 1
        if self._errors_sent >= self.factory.limits.max_errors:
            self._log.info(
                "closing session={session} user={user} after {errors} errors",
                securepub_event="too_many_errors",
                session=self._session.id if self._session else None,
                user=self._session.user if self._session else None,
                errors=self._errors_sent,
            )
            self._close(CLOSE_POLICY_VIOLATION, "too many errors")

    def _send_json(self, message: dict[str, Any]) -> None:
        """Send one reply (welcome, ok, error) through the same path as messages."""
        if self.state == self.STATE_OPEN:
            data = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()
            self.send_prepared(self.factory.prepareMessage(data))

    def _close(self, code: int, reason: str) -> None:
        # sendClose() only takes 1000 and 3000-4999; the RFC codes need the frame API.
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8"), isReply=False)

    def send_prepared(self, prepared: Any) -> None:
        if self.state == self.STATE_OPEN:
            frame = prepared.payloadHybi
            if self._paused and self._over_queue_limit(len(frame)):
                return
            transport = self.transport
            if transport is not None and self._perMessageCompress is None and not self.send_queue:
                # The frame is complete: write it straight to the transport.
                # Autobahn's sendData would do the same after building the
                # arguments of a debug log line nobody reads, which was 20% of
                # a fan-out's time (bench/). Compression is never negotiated
                # here; the fallback covers a queue Autobahn itself started.
                transport.write(frame)
            else:
                self.sendPreparedMessage(prepared)

    # -- IPushProducer: the transport's flow control ----------------------

    def pauseProducing(self) -> None:
        self._paused = True
        self._queued = 0

    def resumeProducing(self) -> None:
        self._paused = False
        self._queued = 0

    def stopProducing(self) -> None:
        self._paused = True

    def _over_queue_limit(self, size: int) -> bool:
        """Count bytes queued while paused; past the limit, close as a slow consumer.

        One client that stopped reading must neither grow the server's memory
        without bound nor hold up the others: its messages are dropped from
        here on and the connection is closed with `CLOSE_SLOW_CONSUMER`.
        """
        self._queued += size
        limit = self.factory.limits.max_queued_bytes
        if self._queued <= limit:
            return False
        session = self._session
        self._log.info(
            "closing slow consumer session={session} user={user} peer={peer}: "
            "over {limit} bytes queued",
            securepub_event="slow_consumer",
            session=session.id if session else None,
            user=session.user if session else None,
            peer=self._peer,
            limit=limit,
        )
        if session is not None:
            # Deliver nothing more, and take no more frames, while it closes.
            self.factory.broker.close_session(session)
            self._session = None
        self._close(CLOSE_SLOW_CONSUMER, "slow consumer")
        return True

    def revoke(self) -> None:
        """ISubscriber: the broker revoked this session; close with 4001."""
        self._session = None
        self._close(CLOSE_REVOKED, "revoked")

    def expire(self) -> None:
        """ISubscriber: the session's lifetime is over; close with 4003."""
        self._session = None
        self._close(CLOSE_SESSION_EXPIRED, "session expired")

    def going_away(self) -> None:
        """Close with 1001 because this node is stopping."""
        self._close(CLOSE_GOING_AWAY, "server shutting down")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.connection_gone(self)
        if self._session is not None:
            self.factory.broker.close_session(self._session)
            self._session = None
        if self._counted_ip is not None:
            self.factory.connections.release(self._counted_ip)
            self._counted_ip = None
        super().connectionLost(reason)


for _name, _value in _IDLE_DEFAULTS.items():
    setattr(SecurePubServerProtocol, _name, _value)


class SecurePubFactory(WebSocketServerFactory):
    """Holds what every connection shares, and Autobahn's limits from settings."""

    protocol = SecurePubServerProtocol  # type: ignore[assignment]

    def __init__(
        self,
        broker: Broker,
        tickets: ITicketStore,
        origin_policy: OriginPolicy,
        limits: Limits,
        clock: IReactorTime,
        open_handshake_timeout: float = 10.0,
        auto_ping_interval: float = 30.0,
        auto_ping_timeout: float = 10.0,
        proxies: ProxyPolicy | None = None,
        metrics: Metrics | None = None,
        opening: Opening | None = None,
    ) -> None:
        super().__init__(server="securepub")
        #: Connections still opening, shared with the site (None: not counted).
        self.opening = opening
        self.broker = broker
        self.tickets = tickets
        self.origin_policy = origin_policy
        self.limits = limits
        self.clock = clock
        self.connections = ConnectionCounter(limits.max_connections_per_ip)
        self.proxies = proxies if proxies is not None else ProxyPolicy(())
        self.metrics = metrics if metrics is not None else Metrics()
        #: Open WebSocket connections (past the handshake), for a clean stop.
        self.open_connections: set[SecurePubServerProtocol] = set()
        self._all_gone: list[Deferred[None]] = []
        self.setProtocolOptions(
            # Origin is decided in onConnect (scheme, host and port), so
            # Autobahn's own check is opened up, null origin included.
            allowedOrigins=["*"],
            allowNullOrigin=True,
            maxFramePayloadSize=limits.max_frame_bytes,
            maxMessagePayloadSize=limits.max_frame_bytes,
            openHandshakeTimeout=open_handshake_timeout,
            closeHandshakeTimeout=2,
            autoPingInterval=auto_ping_interval,
            autoPingTimeout=auto_ping_timeout,
            # Send close frames (1003/1008/1009) instead of cutting the socket.
            failByDrop=False,
            trustXForwardedFor=0,
            requireMaskedClientFrames=True,
            echoCloseCodeReason=False,
        )

    def setProtocolOptions(self, *args: Any, **kwargs: Any) -> None:
        """Autobahn's options, held once by a protocol subclass of this factory.

        Autobahn copies each option from the factory into every new
        connection's ``__dict__`` (29 entries, 1.5 KiB per idle connection)
        and pretty-prints them all for a debug line (80 µs per handshake),
        unless the protocol already has them: a subclass made for this
        factory holds them as class attributes, and leaves nothing to copy.
        """
        super().setProtocolOptions(*args, **kwargs)
        base = type(self).protocol  # the class attribute, not an earlier subclass
        options = {name: _class_attribute(getattr(self, name)) for name in base.CONFIG_ATTRS}
        lean: type[SecurePubServerProtocol] = type(
            base.__name__, (base,), {**options, "CONFIG_ATTRS": ()}
        )
        self.protocol = lean

    def connection_gone(self, protocol: SecurePubServerProtocol) -> None:
        self.open_connections.discard(protocol)
        if not self.open_connections:
            waiters, self._all_gone = self._all_gone, []
            for waiter in waiters:
                waiter.callback(None)

    def close_all(self, timeout: float) -> Deferred[None]:
        """Close every open connection with 1001; fires when all are gone.

        Clients that do not finish the closing handshake within ``timeout``
        seconds are cut off, so a stop cannot hang on them.
        """
        if not self.open_connections:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._all_gone.append(done)
        for protocol in list(self.open_connections):
            protocol.going_away()

        def cut_off() -> None:
            for protocol in list(self.open_connections):
                if protocol.transport is not None:
                    protocol.transport.abortConnection()  # type: ignore[attr-defined]

        deadline = self.clock.callLater(timeout, cut_off)
        return done.addBoth(_cancel_call, deadline)


def _class_attribute(value: Any) -> Any:
    """``value`` as a class attribute that reads back as itself (functions unbound)."""
    return staticmethod(value) if callable(value) else value


def _cancel_call(result: object, call: IDelayedCall) -> object:
    if call.active():
        call.cancel()
    return result
