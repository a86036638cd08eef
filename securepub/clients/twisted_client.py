"""Twisted clients: a publisher returning Deferreds and a reconnecting subscriber.

Certificates are verified against the given CA (or the platform's trust
store), the host name through ``service_identity``; nothing here can turn
that off.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from io import BytesIO
from typing import Any, Final

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from OpenSSL import SSL
from service_identity import CertificateError as ServiceIdentityCertificateError
from service_identity import VerificationError
from twisted.internet import error as netError
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import (
    Certificate,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS, IResponse
from zope.interface import implementer

from securepub.clients.blocking import (
    DEFAULT_HISTORY_LIMIT,
    DEFAULT_RETRY,
    MAX_IDLE_SECONDS,
    MAX_RESPONSE_BYTES,
    RETRY_AFTER_STATUSES,
    APIError,
    CertificateError,
    ClientError,
    ConnectionFailed,
    HistoryPage,
    IssuedTicket,
    Published,
    RetryPolicy,
    ServerURL,
    bearer,
    checked_users,
    encode_json,
    history_page,
    history_query,
    issued_ticket,
    parse_response,
    parse_retry_after,
    parse_url,
    presence_query,
    presence_users,
    published,
    published_id,
    ticket_request,
)

__all__ = [
    "CLOSE_SESSION_EXPIRED",
    "FATAL_CLOSE_CODES",
    "INSUFFICIENT_STATE",
    "SUBSCRIBE_BACKOFF",
    "NotConnected",
    "Position",
    "RecoverCallback",
    "RequestFailed",
    "SubscribeRefused",
    "Subscriber",
    "TwistedPublisher",
    "client_tls",
    "is_exact",
    "load_trust_root",
]

SUBPROTOCOL: Final = "securepub.v1"

#: Close codes after which reconnecting cannot help (README: "fix the client").
FATAL_CLOSE_CODES: Final = frozenset({1003, 1007, 1008, 1009})

#: Delays between reconnections of a `Subscriber` (``retries`` is not used: it never gives up).
SUBSCRIBE_BACKOFF: Final = RetryPolicy(retries=0, initial_delay=0.5, max_delay=30.0)

#: The server closes a session whose lifetime ended unrefreshed with this code (SPEC section 9).
CLOSE_SESSION_EXPIRED: Final = 4003

#: How long `Subscriber.presence` waits for the server's answer.
PRESENCE_TIMEOUT: Final = 10.0

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def load_trust_root(ca: str | None) -> IOpenSSLTrustRoot:
    """Every certificate in the PEM file ``ca``, or the platform's trust store."""
    if not ca:
        platform: IOpenSSLTrustRoot = platformTrust()
        return platform
    try:
        with open(ca, "rb") as f:
            pem = f.read()
    except FileNotFoundError:
        raise ClientError(f"CA file {ca} does not exist") from None
    except OSError as e:
        raise ClientError(f"cannot read CA file {ca}: {e.strerror or type(e).__name__}") from None
    blocks = _PEM_CERTIFICATE.findall(pem)
    try:
        certificates = [Certificate.loadPEM(block) for block in blocks]
    except SSL.Error:
        certificates = []
    if not certificates:
        raise ClientError(f"CA file {ca} holds no PEM certificate")
    root: IOpenSSLTrustRoot = trustRootFromCertificates(certificates)
    return root


def client_tls(host: str, root: IOpenSSLTrustRoot) -> IOpenSSLClientConnectionCreator:
    """TLS 1.2+ to ``host``, its certificate checked against ``root`` and its name."""
    creator: IOpenSSLClientConnectionCreator = optionsForClientTLS(
        host, trustRoot=root, extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2}
    )
    return creator


@implementer(IPolicyForHTTPS)
class _VerifyingPolicy:
    """The Agent's TLS policy: always `client_tls`, whatever the host."""

    def __init__(self, root: IOpenSSLTrustRoot) -> None:
        self._root = root

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return client_tls(hostname.decode("ascii"), self._root)


def _is_tls_failure(failure: Failure) -> bool:
    """Whether a connection failed in the TLS handshake (untrusted certificate, wrong name)."""
    reasons: list[Failure] = [failure]
    seen = 0
    while reasons and seen < 20:
        seen += 1
        current = reasons.pop()
        if current.check(SSL.Error, VerificationError, ServiceIdentityCertificateError):
            return True
        nested = getattr(current.value, "reasons", None)
        if isinstance(nested, list):
            reasons.extend(r for r in nested if isinstance(r, Failure))
    return False


def _as_client_error(failure: Failure, origin: str) -> Failure:
    """Turn Twisted's connection failures into securepub's `ClientError` classes."""
    if failure.check(ClientError):
        return failure
    if _is_tls_failure(failure):
        return Failure(
            CertificateError(
                f"TLS handshake with {origin} failed: its certificate is not trusted or "
                "does not name the host (is SECUREPUB_CA the CA that signed it?)"
            )
        )
    if failure.check(netError.ConnectionRefusedError):
        return Failure(
            ConnectionFailed(f"cannot connect to {origin}: connection refused", refused=True)
        )
    if failure.check(netError.ConnectError):
        return Failure(ConnectionFailed(f"cannot connect to {origin}: {failure.getErrorMessage()}"))
    if failure.check(CancelledError, netError.TimeoutError):
        return Failure(
            ConnectionFailed(
                f"no answer from {origin} in time; the request may or may not have been "
                "carried out",
                sent=True,
            )
        )
    if failure.check(ResponseFailed, netError.ConnectionLost, netError.ConnectionDone):
        return Failure(
            ConnectionFailed(
                f"the connection to {origin} broke during the request; it may or may not "
                "have been carried out",
                sent=True,
            )
        )
    return Failure(
        ConnectionFailed(f"request to {origin} failed: {type(failure.value).__name__}", sent=True)
    )


class _Body(Protocol):
    """Collects a response body of at most `MAX_RESPONSE_BYTES`."""

    def __init__(self, done: Deferred[bytes], status: int) -> None:
        self._done = done
        self._status = status
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self._size > MAX_RESPONSE_BYTES:
            return  # already over, and stopped
        self._size += len(data)
        if self._size <= MAX_RESPONSE_BYTES:
            self._parts.append(data)
            return
        self._parts = []
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._size > MAX_RESPONSE_BYTES:
            self._done.errback(
                APIError(self._status, "unexpected_response", "the answer is too large")
            )
        elif reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(b"".join(self._parts))
        else:
            self._done.errback(reason)


class TwistedPublisher:
    """`securepub.clients.blocking.Publisher` for Twisted code: the same calls, returning Deferreds.

    Connections are kept alive in an `HTTPConnectionPool`; only a refused
    connection and a 503 are retried, with the same `RetryPolicy`.
    """

    def __init__(
        self,
        reactor: Any,
        url: str,
        api_key: str,
        ca: str | None = None,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._reactor = reactor
        self._url: ServerURL = parse_url(url)
        self._authorization = bearer(api_key).encode("ascii")
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 1
        self._pool.cachedConnectionTimeout = int(MAX_IDLE_SECONDS)
        self._agent = Agent(
            reactor, contextFactory=_VerifyingPolicy(load_trust_root(ca)), pool=self._pool
        )
        self._timeout = timeout
        self._retry = retry
        self._rand = rand

    def __repr__(self) -> str:
        return f"<TwistedPublisher {self._url.origin}{self._url.prefix}>"

    @property
    def url(self) -> ServerURL:
        return self._url

    def publish(self, topic: str, data: Any) -> Deferred[str]:
        """Publish ``data`` to ``topic``; fires with the message id or fails with `ClientError`."""
        d = self._call(b"POST", "/v1/publish", encode_json({"topic": topic, "data": data}))
        return d.addCallback(published_id)

    def publish_message(self, topic: str, data: Any) -> Deferred[Published]:
        """Publish like `publish`; fires with a `Published` (id, and offset and epoch)."""
        d = self._call(b"POST", "/v1/publish", encode_json({"topic": topic, "data": data}))
        return d.addCallback(published)

    def history(
        self, topic: str, since: int = 0, limit: int = DEFAULT_HISTORY_LIMIT
    ) -> Deferred[HistoryPage]:
        """Read a topic's history after offset ``since``; fires with a `HistoryPage`."""
        try:
            path = history_query(topic, since, limit)
        except ClientError:
            return fail()
        return self._call(b"GET", path).addCallback(history_page)

    def presence(self, topic: str) -> Deferred[dict[str, int]]:
        """Who is subscribed to ``topic`` (``GET /v1/presence``); fires with ``{user: n}``."""
        try:
            path = presence_query(topic)
        except ClientError:
            return fail()
        return self._call(b"GET", path).addCallback(presence_users)

    def issue_ticket(
        self,
        user: str,
        *,
        client_ip: str | None = None,
        subscribe: Iterable[str] = (),
        publish: Iterable[str] = (),
        ttl: int | None = None,
        session_ttl: int | None = None,
    ) -> Deferred[IssuedTicket]:
        """Issue a single-use WebSocket ticket; fires with an `IssuedTicket`.

        ``session_ttl``: the lifetime of the session it opens or refreshes (SPEC section 9).
        """
        body = ticket_request(
            user,
            client_ip=client_ip,
            subscribe=subscribe,
            publish=publish,
            ttl=ttl,
            session_ttl=session_ttl,
        )
        return self._call(b"POST", "/v1/tickets", encode_json(body)).addCallback(issued_ticket)

    def close(self) -> Deferred[None]:
        """Close the kept-alive connections."""
        d: Deferred[None] = self._pool.closeCachedConnections()
        return d

    def _call(
        self, method: bytes, path: str, body: bytes | None = None
    ) -> Deferred[dict[str, Any]]:
        def attempt(number: int) -> Deferred[dict[str, Any]]:
            d = self._attempt(method, path, body)

            def retry(failure: Failure) -> Any:
                value = failure.value
                safe = (isinstance(value, ConnectionFailed) and value.refused) or (
                    isinstance(value, APIError) and value.status == 503
                )
                if not safe or number >= self._retry.retries:
                    return failure
                retry_after = value.retry_after if isinstance(value, APIError) else None
                delay = self._retry.delay(number, self._rand, retry_after)
                return deferLater(self._reactor, delay, attempt, number + 1)

            return d.addErrback(retry)

        return attempt(0)

    def _attempt(self, method: bytes, path: str, body: bytes | None) -> Deferred[dict[str, Any]]:
        origin = self._url.origin
        target = (origin + self._url.path(path)).encode("ascii")
        headers = Headers(
            {
                b"Authorization": [self._authorization],
                b"Accept": [b"application/json"],
                b"User-Agent": [b"securepub-python-twisted"],
            }
        )
        producer = None
        if body is not None:
            headers.setRawHeaders(b"Content-Type", [b"application/json"])
            producer = FileBodyProducer(BytesIO(body))
        d: Deferred[IResponse] = self._agent.request(method, target, headers, producer)

        def read(response: IResponse) -> Deferred[dict[str, Any]]:
            length = response.length
            if isinstance(length, int) and length > MAX_RESPONSE_BYTES:
                raise APIError(response.code, "unexpected_response", "the answer is too large")
            body: Deferred[bytes] = Deferred()
            response.deliverBody(_Body(body, response.code))
            retry_after = response.headers.getRawHeaders(b"retry-after")
            header = b", ".join(retry_after).decode("latin-1") if retry_after else None
            return body.addCallback(lambda data: parse_response(response.code, data, header))

        result: Deferred[dict[str, Any]] = d.addCallback(read)
        result.addTimeout(self._timeout, self._reactor)
        return result.addErrback(_as_client_error, origin)


# -- subscribing ------------------------------------------------------------


class _SubscriberProtocol(WebSocketClientProtocol):
    """One connection: subscribe after ``welcome``, hand ``message`` frames on."""

    factory: _SubscriberFactory

    def failHandshake(self, reason: str) -> None:
        """The upgrade failed; when the server refused it, note its status and Retry-After."""
        status = _status_code(getattr(self, "http_status_line", None))
        if status is not None and status != 101:
            self.factory.refused_status = status
            if status in RETRY_AFTER_STATUSES:
                headers = getattr(self, "http_headers", None)
                value = headers.get("retry-after") if isinstance(headers, dict) else None
                self.factory.retry_after = parse_retry_after(value)
        super().failHandshake(reason)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            return
        try:
            frame = json.loads(payload)
        except ValueError:
            return
        if isinstance(frame, dict):
            self.factory.owner._frame(self, frame)

    def send_json(self, frame: dict[str, Any]) -> None:
        self.sendMessage(json.dumps(frame, separators=(",", ":")).encode("utf-8"))

    def connectionLost(self, reason: Failure = netError.ConnectionDone) -> None:  # type: ignore[assignment]
        self.factory.lost_reason = reason
        super().connectionLost(reason)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.owner._closed(self, code, reason)


class _SubscriberFactory(WebSocketClientFactory):
    protocol = _SubscriberProtocol  # type: ignore[assignment]

    def __init__(self, owner: Subscriber, url: str, ticket: str) -> None:
        super().__init__(url, protocols=[SUBPROTOCOL, "ticket." + ticket])
        self.owner = owner
        self.lost_reason: Failure | None = None
        #: the HTTP status of a refused upgrade, and its Retry-After (429 and 503 only)
        self.refused_status: int | None = None
        self.retry_after: int | None = None
        self.setProtocolOptions(
            openHandshakeTimeout=10,
            closeHandshakeTimeout=2,
            autoPingInterval=30,
            autoPingTimeout=10,
        )


def _status_code(status_line: object) -> int | None:
    """The status of an HTTP status line (``HTTP/1.1 429 Too Many Requests``), if it has one."""
    if not isinstance(status_line, str):
        return None
    parts = status_line.split()
    if len(parts) < 2 or not parts[1].isdigit() or len(parts[1]) != 3:
        return None
    return int(parts[1])


def _close(protocol: _SubscriberProtocol) -> None:
    """A clean close once open; before that, drop the connection."""
    if protocol.state == protocol.STATE_OPEN:
        protocol.sendClose(1000)
    else:
        protocol.dropConnection(abort=True)


class SubscribeRefused(ClientError):
    """The server refused a subscription (``forbidden``, ``invalid_topic``, ...), or ended
    the last one left (``unsubscribed`` with reason ``forbidden``)."""


class NotConnected(ClientError):
    """A request over the connection (`Subscriber.presence`) while no session is open."""


class RequestFailed(ClientError):
    """The server answered a request made over the connection with an ``error`` frame.

    ``code`` is the SPEC's (``forbidden``, ``bad_request``, ``unavailable``, ...), or
    ``unexpected_response`` for an answer of the wrong shape; ``message`` its text.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


#: ``unsubscribed`` reason: the server lost track of a topic's order; subscribe again ``since``.
INSUFFICIENT_STATE: Final = "insufficient_state"

#: A topic's place in its history: (offset, epoch).
Position = tuple[int, str]

#: ``on_recover(topic, recovered, offset, epoch)``; see `Subscriber`.
RecoverCallback = Callable[[str, bool, int | None, str | None], None]


def is_exact(pattern: str) -> bool:
    """Whether a subscription names one topic (no ``*`` or ``>`` segment)."""
    return all(segment not in ("*", ">") for segment in pattern.split("."))


def _position(frame: dict[str, Any]) -> Position | None:
    """A frame's ``offset`` and ``epoch`` when it carries both, well formed."""
    offset, epoch = frame.get("offset"), frame.get("epoch")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        return None
    if not isinstance(epoch, str) or not epoch:
        return None
    return offset, epoch


def _printable(value: object, limit: int) -> str:
    """Text from the server made safe for a status line: bounded, no control characters."""
    text = str(value)[:limit]
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _timestamp(value: object) -> float | None:
    """An ``expires_at`` (epoch seconds) when it is a finite positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not 0 < value < 1e11:  # also refuses NaN
        return None
    return float(value)


def _clock(when: float) -> str:
    """``HH:MM:SS`` in local time, for status lines."""
    return time.strftime("%H:%M:%S", time.localtime(when))


def _describe(failure: Failure) -> str:
    """A failed ticket fetch, for a status line."""
    value = failure.value
    if isinstance(value, ClientError):
        return _printable(value, 300)
    return _printable(f"{type(value).__name__}: {value}", 300)


class Subscriber:
    """Subscribe to patterns over ``wss://``, for as long as it runs.

    Each connection starts with a fresh ticket from ``get_ticket`` (tickets
    are single use), subscribes to every pattern once the server's
    ``welcome`` arrives and hands each ``message`` frame to ``on_message``.
    A lost connection is retried with exponential backoff and jitter
    (`RetryPolicy` delays, restarting from the first after each successful
    subscription). What retrying cannot fix ends it: a refused ticket
    request other than 503/429, an untrusted certificate, a refused
    subscription, or a close code in `FATAL_CLOSE_CODES`. A subscribe
    refused with ``unavailable`` (the cluster engine is down) is tried
    again after the backoff instead.

    Recovery (SPEC section 8): for every exact topic with history it keeps
    the position of the last message handed on (or the subscription's
    starting position), and after a reconnect subscribes ``since`` it, so
    the messages missed meanwhile arrive first, in order, each once.
    ``since`` gives starting positions, e.g. from `TwistedPublisher.history`.
    Each answer to such a resume is reported to ``on_recover(topic,
    recovered, offset, epoch)`` (``offset``/``epoch``: the topic's position
    now, None when it no longer keeps history); when it was not recovered
    the messages in between are lost to this subscriber, ``on_status`` says
    so and the application must refetch the topic's state. An
    ``unsubscribed`` frame with reason ``insufficient_state`` is resumed at
    once the same way; any other reason (``forbidden``) ends that
    subscription, and when none is left, `run` fails with `SubscribeRefused`.

    Sessions (SPEC section 9): when the server says the session is
    ``expiring``, a fresh ticket from ``get_ticket`` is sent in a ``refresh``
    frame on the same connection, so nothing is missed and the subscriptions
    stay; ``on_status`` reports ``session refreshed until HH:MM:SS``. A
    refresh that fails (``forbidden``, ``unavailable``, no ticket) is
    reported too, and the session then ends at its expiry: the server closes
    with 4003 and the Subscriber reconnects (and resumes) as after any lost
    connection.

    Waiting: a ticket request refused with 429 or 503, and a handshake the
    server refused with 429 or 503, are retried after at least the
    ``Retry-After`` the server sent (see `RetryPolicy.delay`), jittered.

    Presence (SPEC section 10): ``join`` and ``leave`` frames for the
    subscribed topics are handed to ``on_event``; `presence` asks the server
    over the connection who is on a topic.

    ``run()`` fires when `stop` is called, or fails with the `ClientError`.
    """

    def __init__(
        self,
        reactor: Any,
        url: str,
        patterns: Sequence[str],
        get_ticket: Callable[[], Deferred[str]],
        on_message: Callable[[dict[str, Any]], None],
        *,
        ca: str | None = None,
        on_status: Callable[[str], None] = lambda text: None,
        on_recover: RecoverCallback = lambda topic, recovered, offset, epoch: None,
        on_event: Callable[[dict[str, Any]], None] = lambda frame: None,
        since: Mapping[str, Position] | None = None,
        backoff: RetryPolicy = SUBSCRIBE_BACKOFF,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not patterns:
            raise ClientError("at least one pattern is required")
        self._reactor = reactor
        self._url = parse_url(url)
        self._root = load_trust_root(ca)
        self._patterns = list(dict.fromkeys(patterns))
        self._get_ticket = get_ticket
        self._on_message = on_message
        self._on_status = on_status
        self._on_recover = on_recover
        self._on_event = on_event
        self._backoff = backoff
        self._rand = rand
        self._attempts = 0
        self._done: Deferred[None] | None = None
        self._stopping = False
        self._protocol: _SubscriberProtocol | None = None
        self._timer: IDelayedCall | None = None
        #: subscribe id -> (pattern, the since it was sent with)
        self._pending: dict[int, tuple[str, Position | None]] = {}
        self._next_id = 0
        #: exact topic -> position of the last message handed on (or its starting one)
        self._positions: dict[str, Position] = {}
        for topic, (offset, epoch) in (since or {}).items():
            if topic not in self._patterns or not is_exact(topic):
                raise ClientError(f"since names {topic[:100]!r}, not one of the exact topics")
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise ClientError(f"since: the offset of {topic[:100]!r} is not an integer >= 0")
            if not isinstance(epoch, str) or not epoch:
                raise ClientError(f"since: the epoch of {topic[:100]!r} is not a string")
            self._positions[topic] = (offset, epoch)
        #: patterns not yet subscribed on this connection, and whether to announce them
        self._awaiting: set[str] = set()
        self._announce = False
        #: subscribes refused with ``unavailable``, waiting to be sent again
        self._resubscribe_timers: dict[str, IDelayedCall] = {}
        self._resubscribe_attempts: dict[str, int] = {}
        #: the connection whose session is open (its welcome arrived), and until when
        self._session: _SubscriberProtocol | None = None
        self._expires_at: float | None = None
        #: a refresh under way on the open session: fetching its ticket, or sent with this id
        self._refreshing = False
        self._refresh_id: int | None = None
        #: presence requests waiting for their answer: id -> (connection, Deferred, timeout)
        self._presence_requests: dict[
            int, tuple[_SubscriberProtocol, Deferred[dict[str, int]], IDelayedCall]
        ] = {}

    @property
    def patterns(self) -> tuple[str, ...]:
        """The subscriptions still wanted (the server may have ended some)."""
        return tuple(self._patterns)

    @property
    def expires_at(self) -> float | None:
        """When the open session ends unless refreshed (epoch seconds); None when none is open."""
        return self._expires_at if self._session is not None else None

    def position(self, topic: str) -> Position | None:
        """The (offset, epoch) an exact topic would resume from, if known."""
        return self._positions.get(topic)

    def presence(self, topic: str, timeout: float = PRESENCE_TIMEOUT) -> Deferred[dict[str, int]]:
        """Ask over the open connection who is subscribed to ``topic`` (SPEC section 10).

        Fires with ``{user: open sessions}``. Fails with `NotConnected` when no
        session is open, `RequestFailed` when the server refuses (``forbidden``:
        this session may not subscribe to the topic; ``bad_request``: its rule
        keeps no presence), `ConnectionFailed` when the connection closes or
        ``timeout`` seconds pass before the answer.
        """
        protocol = self._session
        if protocol is None or protocol.state != protocol.STATE_OPEN or self._stopping:
            return fail(NotConnected("not connected: no session is open to ask for presence"))
        if not isinstance(topic, str):
            return fail(ClientError("the topic must be a string"))
        self._next_id += 1
        request_id = self._next_id
        answer: Deferred[dict[str, int]] = Deferred()
        timer = self._reactor.callLater(timeout, self._presence_timed_out, request_id, timeout)
        self._presence_requests[request_id] = (protocol, answer, timer)
        protocol.send_json({"op": "presence", "id": request_id, "topic": topic})
        return answer

    def run(self) -> Deferred[None]:
        """Start; the Deferred fires after `stop`, or fails with what ended it."""
        if self._done is not None:
            raise RuntimeError("a Subscriber runs once")
        self._done = Deferred()
        self._connect()
        return self._done

    def stop(self) -> None:
        """Close the connection and stop reconnecting."""
        self._stopping = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._cancel_resubscribes()
        if self._protocol is not None:
            _close(self._protocol)
        else:
            self._finish(None)

    # -- the connect / reconnect loop

    def _connect(self) -> None:
        self._timer = None
        if self._stopping:
            self._finish(None)
            return
        d = maybeDeferred(self._get_ticket)
        d.addCallbacks(self._open, self._ticket_failed)

    def _ticket_failed(self, failure: Failure) -> None:
        value = failure.value
        transient = (
            isinstance(value, ConnectionFailed) and not isinstance(value, CertificateError)
        ) or (isinstance(value, APIError) and value.status in RETRY_AFTER_STATUSES)
        if not transient:
            self._finish(failure)
            return
        retry_after = value.retry_after if isinstance(value, APIError) else None
        self._retry(f"no ticket ({value})", retry_after)

    def _open(self, ticket: str) -> Deferred[None]:
        if self._stopping:
            self._finish(None)
            return succeed(None)
        host = self._url.host
        factory = _SubscriberFactory(self, self._url.websocket, ticket)
        endpoint = wrapClientTLS(
            client_tls(host, self._root), HostnameEndpoint(self._reactor, host, self._url.port)
        )
        d: Deferred[Any] = endpoint.connect(factory)

        def connected(protocol: _SubscriberProtocol) -> None:
            self._protocol = protocol
            if self._stopping:
                _close(protocol)  # stopped while connecting

        def failed(failure: Failure) -> None:
            error = _as_client_error(failure, self._url.origin)
            if isinstance(error.value, CertificateError):
                self._finish(error)
            else:
                self._retry(str(error.value))

        return d.addCallbacks(connected, failed)

    def _retry(self, why: str, retry_after: int | None = None) -> None:
        if self._stopping:
            self._finish(None)
            return
        delay = self._backoff.delay(self._attempts, self._rand, retry_after)
        self._attempts += 1
        if retry_after is not None:
            why += f"; the server asked to wait {retry_after} s"
        self._on_status(f"{why}; reconnecting in {delay:.1f} s")
        self._timer = self._reactor.callLater(delay, self._connect)

    def _finish(self, result: Failure | None) -> None:
        done, self._done = self._done, None
        if done is None:
            return
        self._stopping = True
        self._cancel_resubscribes()
        self._fail_presence_requests(None, "the subscriber stopped")
        if result is None:
            done.callback(None)
        else:
            done.errback(result)

    def _end(self, protocol: _SubscriberProtocol, error: ClientError) -> None:
        self._stopping = True
        _close(protocol)
        self._finish(Failure(error))

    # -- subscribing on one connection

    def _subscribe(self, protocol: _SubscriberProtocol, pattern: str) -> None:
        """Send one subscribe, ``since`` the topic's position when one is known."""
        self._next_id += 1
        frame: dict[str, Any] = {"op": "subscribe", "id": self._next_id, "topic": pattern}
        since = self._positions.get(pattern)
        if since is not None:
            frame["since"] = {"offset": since[0], "epoch": since[1]}
        self._pending[self._next_id] = (pattern, since)
        protocol.send_json(frame)

    def _subscribe_later(self, protocol: _SubscriberProtocol, pattern: str, why: str) -> None:
        attempt = self._resubscribe_attempts.get(pattern, 0)
        self._resubscribe_attempts[pattern] = attempt + 1
        delay = self._backoff.delay(attempt, self._rand)
        self._on_status(f"{pattern}: {why}; subscribing again in {delay:.1f} s")

        def again() -> None:
            self._resubscribe_timers.pop(pattern, None)
            if (
                protocol is self._protocol
                and protocol.state == protocol.STATE_OPEN
                and pattern in self._patterns
                and not self._stopping
            ):
                self._subscribe(protocol, pattern)

        self._cancel_resubscribe(pattern)
        self._resubscribe_timers[pattern] = self._reactor.callLater(delay, again)

    def _cancel_resubscribe(self, pattern: str) -> None:
        timer = self._resubscribe_timers.pop(pattern, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _cancel_resubscribes(self) -> None:
        timers, self._resubscribe_timers = self._resubscribe_timers, {}
        for timer in timers.values():
            if timer.active():
                timer.cancel()

    def _subscribed(self, pattern: str, frame: dict[str, Any], since: Position | None) -> None:
        """An ``ok``: note where the topic stands, and report how a resume went."""
        self._resubscribe_attempts.pop(pattern, None)
        position = _position(frame)
        if since is None:
            if position is not None and is_exact(pattern):
                self._advance(pattern, position)
        elif frame.get("recovered") is True:
            # The missed messages follow: the position advances as they are handed on.
            offset, epoch = position if position is not None else since
            missed = max(0, offset - since[0])
            self._on_recover(pattern, True, offset, epoch)
            self._on_status(
                f"{pattern}: recovered, {missed} missed message{'s' if missed != 1 else ''} follow"
            )
        else:
            if position is not None:
                self._advance(pattern, position)
                why = (
                    "history no longer reaches back"
                    if position[1] == since[1]
                    else "the server lost the topic's history: new epoch"
                )
            else:
                self._positions.pop(pattern, None)
                why = "no position in the answer"
            self._on_recover(
                pattern,
                False,
                position[0] if position else None,
                position[1] if position else None,
            )
            self._on_status(f"{pattern}: not recovered ({why}): refetch")

    def _refused(
        self,
        protocol: _SubscriberProtocol,
        pattern: str,
        since: Position | None,
        frame: dict[str, Any],
    ) -> None:
        """An ``error`` answering a subscribe."""
        code = _printable(frame.get("code"), 40)
        message = _printable(frame.get("message"), 300)
        if code == "unavailable":
            self._subscribe_later(protocol, pattern, f"unavailable: {message}")
            return
        if code == "bad_request" and since is not None:
            # The topic keeps no history any more (the server's rules changed): no resume.
            self._positions.pop(pattern, None)
            self._on_recover(pattern, False, None, None)
            self._on_status(f"{pattern}: not recovered (since refused: {message}): refetch")
            self._subscribe(protocol, pattern)
            return
        self._end(protocol, SubscribeRefused(f"{code}: {message} ({pattern})"))

    def _unsubscribed(self, protocol: _SubscriberProtocol, frame: dict[str, Any]) -> None:
        """The server ended a subscription: resume it, or give it up."""
        topic, reason = frame.get("topic"), frame.get("reason")
        if not isinstance(topic, str) or topic not in self._patterns:
            return
        if reason == INSUFFICIENT_STATE:
            self._cancel_resubscribe(topic)
            since = self._positions.get(topic)
            where = f"since offset {since[0]}" if since is not None else "afresh"
            self._on_status(f"{topic}: the server lost track of its order; subscribing {where}")
            self._subscribe(protocol, topic)
            return
        why = _printable(reason, 40)
        self._patterns.remove(topic)
        self._positions.pop(topic, None)
        self._awaiting.discard(topic)
        self._cancel_resubscribe(topic)
        self._on_status(f"{topic}: the server ended the subscription ({why})")
        if not self._patterns:
            self._end(protocol, SubscribeRefused(f"no subscription left ({topic}: {why})"))

    def _advance(self, topic: str, position: Position) -> None:
        """Move a topic's position forward; within one epoch it never goes back (a
        pattern subscription may have handed on a later message already)."""
        known = self._positions.get(topic)
        if known is None or known[1] != position[1] or position[0] > known[0]:
            self._positions[topic] = position

    def _handed_on(self, frame: dict[str, Any]) -> None:
        """A message: advance its exact topic's position, then hand it to ``on_message``."""
        topic = frame.get("topic")
        if isinstance(topic, str) and topic in self._patterns and is_exact(topic):
            position = _position(frame)
            if position is not None:
                self._advance(topic, position)
        self._on_message(frame)

    # -- session refresh (SPEC section 9)

    def _expiring(self, protocol: _SubscriberProtocol) -> None:
        """The session ends soon: get a fresh ticket and refresh in-band."""
        if protocol is not self._session or self._stopping or self._refreshing:
            return
        self._refreshing = True
        d = maybeDeferred(self._get_ticket)
        d.addCallbacks(
            self._send_refresh,
            self._refresh_ticket_failed,
            callbackArgs=(protocol,),
            errbackArgs=(protocol,),
        )

    def _send_refresh(self, ticket: object, protocol: _SubscriberProtocol) -> None:
        if protocol is not self._session or protocol.state != protocol.STATE_OPEN:
            return  # that connection is gone; the ticket stays unused and expires
        if self._stopping:
            self._refreshing = False
            return
        if not isinstance(ticket, str) or not ticket:
            self._refresh_failed("get_ticket gave no ticket")
            return
        self._next_id += 1
        self._refresh_id = self._next_id
        protocol.send_json({"op": "refresh", "id": self._refresh_id, "ticket": ticket})

    def _refresh_ticket_failed(self, failure: Failure, protocol: _SubscriberProtocol) -> None:
        if protocol is self._session:
            self._refresh_failed(f"no ticket: {_describe(failure)}")

    def _refreshed(self, frame: dict[str, Any]) -> None:
        self._refreshing, self._refresh_id = False, None
        expires_at = _timestamp(frame.get("expires_at"))
        self._expires_at = expires_at
        if expires_at is None:
            self._on_status("session refreshed")
        else:
            self._on_status(f"session refreshed until {_clock(expires_at)}")

    def _refresh_failed(self, why: str) -> None:
        self._refreshing, self._refresh_id = False, None
        when = f" at {_clock(self._expires_at)}" if self._expires_at is not None else ""
        self._on_status(
            f"session not refreshed ({why}); it ends{when}, then the subscriber reconnects"
        )

    # -- presence requests (SPEC section 10)

    def _presence_answer(self, frame: dict[str, Any]) -> None:
        frame_id = frame.get("id")
        request = self._presence_requests.pop(frame_id, None) if type(frame_id) is int else None
        if request is None:
            return
        _, answer, timer = request
        if timer.active():
            timer.cancel()
        users = checked_users(frame.get("users"))
        if users is None:
            answer.errback(RequestFailed("unexpected_response", "the answer is not a presence map"))
        else:
            answer.callback(users)

    def _presence_refused(self, frame_id: int, frame: dict[str, Any]) -> None:
        _, answer, timer = self._presence_requests.pop(frame_id)
        if timer.active():
            timer.cancel()
        code = _printable(frame.get("code"), 40)
        answer.errback(RequestFailed(code, _printable(frame.get("message"), 300)))

    def _presence_timed_out(self, request_id: int, timeout: float) -> None:
        request = self._presence_requests.pop(request_id, None)
        if request is not None:
            request[1].errback(ConnectionFailed(f"no presence answer in {timeout:g} s", sent=True))

    def _fail_presence_requests(self, protocol: _SubscriberProtocol | None, why: str) -> None:
        """Fail the presence requests sent on ``protocol`` (all of them when None)."""
        for request_id, (sent_on, answer, timer) in list(self._presence_requests.items()):
            if protocol is None or sent_on is protocol:
                del self._presence_requests[request_id]
                if timer.active():
                    timer.cancel()
                answer.errback(ConnectionFailed(f"{why} before the presence answer", sent=True))

    # -- called by the protocol

    def _frame(self, protocol: _SubscriberProtocol, frame: dict[str, Any]) -> None:
        op, frame_id = frame.get("op"), frame.get("id")
        request: tuple[str, Position | None] | None
        if op == "message":
            self._handed_on(frame)
        elif op in ("join", "leave"):
            self._on_event(frame)
        elif op == "expiring":
            self._expiring(protocol)
        elif op == "presence":
            self._presence_answer(frame)
        elif op == "ok" and type(frame_id) is int and frame_id == self._refresh_id:
            self._refreshed(frame)
        elif op == "error" and type(frame_id) is int and frame_id == self._refresh_id:
            code = _printable(frame.get("code"), 40)
            self._refresh_failed(f"{code}: {_printable(frame.get('message'), 300)}")
        elif op == "error" and type(frame_id) is int and frame_id in self._presence_requests:
            self._presence_refused(frame_id, frame)
        elif op == "welcome":
            self._session = protocol
            self._expires_at = _timestamp(frame.get("expires_at"))
            self._refreshing, self._refresh_id = False, None
            self._pending = {}
            self._cancel_resubscribes()
            self._awaiting = set(self._patterns)
            self._announce = True
            for pattern in self._patterns:
                self._subscribe(protocol, pattern)
        elif op == "ok":
            request = self._pending.pop(frame_id, None) if isinstance(frame_id, int) else None
            if request is None or request[0] not in self._patterns:
                return
            pattern, since = request
            self._subscribed(pattern, frame, since)
            self._awaiting.discard(pattern)
            if self._announce and not self._awaiting:
                self._announce = False
                self._attempts = 0
                self._on_status(f"subscribed to {' '.join(self._patterns)}")
        elif op == "error":
            request = self._pending.pop(frame_id, None) if isinstance(frame_id, int) else None
            if request is not None and request[0] in self._patterns:
                self._refused(protocol, request[0], request[1], frame)
        elif op == "unsubscribed":
            self._unsubscribed(protocol, frame)

    def _closed(self, protocol: _SubscriberProtocol, code: int | None, reason: str | None) -> None:
        if protocol is self._protocol:
            self._protocol = None
            self._pending = {}
            self._cancel_resubscribes()
        if protocol is self._session:
            self._session = None
            self._expires_at = None
            self._refreshing, self._refresh_id = False, None
        self._fail_presence_requests(protocol, "the connection closed")
        if self._stopping:
            self._finish(None)
            return
        factory = protocol.factory
        lost = factory.lost_reason
        if lost is not None and _is_tls_failure(lost):
            self._finish(_as_client_error(lost, self._url.origin))
            return
        if factory.refused_status is not None:
            # The upgrade was refused (403: the ticket was spent or expired on the way;
            # 429: too many connections from here; 503: the ticket store is down).
            retry_after = factory.retry_after if factory.refused_status in (429, 503) else None
            self._retry(
                f"the server refused the connection (HTTP {factory.refused_status})", retry_after
            )
            return
        if code in FATAL_CLOSE_CODES:
            self._finish(Failure(ClientError(f"the server closed the connection with code {code}")))
            return
        if code == CLOSE_SESSION_EXPIRED:
            self._retry(f"connection closed (code {code}: the session expired)")
            return
        self._retry(f"connection closed (code {code})")
