"""The one twisted.web site behind the TLS listener: routing, body cap, access log."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from securepub.core.clientip import ProxyPolicy
from securepub.server.api import NotFound, error_body
from securepub.server.upgrade import hand_over, is_websocket_upgrade, tls_wrapper

_log = Logger()


def _max_body(request: Request) -> int:
    limit: int = getattr(request.channel, "site").max_body_bytes  # noqa: B009
    return limit


class CappedRequest(Request):
    """A request whose body is refused (413) once it passes the site's cap.

    twisted.web buffers a whole body before rendering, so the cap is applied
    while it arrives: a declared Content-Length over the cap is answered at
    once, and a chunked body is cut as soon as it grows past it.
    """

    _too_large = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > _max_body(self):
            self._refuse_too_large()
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_large:
            return
        self._received += len(data)
        if self._received > _max_body(self):
            self._refuse_too_large()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._too_large:
            return
        super().requestReceived(command, path, version)

    def processingFailed(self, reason: Failure) -> None:
        """A bug answers 500 in JSON, like every other error, never a traceback."""
        _log.failure("request failed {path}", reason, path=self.path.decode("ascii", "replace"))
        if self.finished or self._disconnected:
            return
        body = error_body(self, "internal_error", "internal error; nothing was done")
        self.setHeader(b"content-length", b"%d" % len(body))
        self.write(body)
        self.finish()

    def _refuse_too_large(self) -> None:
        self._too_large = True
        limit = _max_body(self)
        body = b'{"error":"too_large","message":"the body is over the %d-byte limit"}' % limit
        transport = self.channel.transport
        if transport is None:
            return
        transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Cache-Control: no-store\r\n"
            b"Connection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        # Through the channel, which unregisters itself as the transport's
        # producer first: TLS would otherwise wait for that before closing.
        self.channel.loseConnection()
        _log.info(
            "request refused: body over {limit} bytes peer={peer}",
            securepub_event="body_too_large",
            limit=limit,
            peer=getattr(transport.getPeer(), "host", None),
        )


class Opening:
    """Connections still opening: counted by the site, consulted at each upgrade.

    ``count`` is connections accepted whose first request's headers have not
    all arrived (their TLS handshake included), ``redeeming`` upgrades whose
    ticket the store has not answered yet. Past ``limit`` a new connection is
    dropped at once; past half of it an upgrade is answered 503 (see the
    protocol), so a reconnect storm becomes refusals with Retry-After and
    the node keeps answering ``/healthz``.
    """

    __slots__ = ("count", "limit", "redeeming", "shed")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.redeeming = 0
        self.shed = 0

    def full(self) -> bool:
        return self.count + self.redeeming >= self.limit

    def crowded(self) -> bool:
        return self.count + self.redeeming > self.limit // 2


#: Longest first-request head held back to see whether it is a /ws upgrade;
#: past it the bytes go to twisted.web, which has its own limit (16 KiB).
MAX_SNIFFED_HEAD = 17 * 1024


class DeadlineChannel(HTTPChannel):
    """An HTTP channel that must receive a request's headers within a deadline.

    Twisted's idle timeout restarts with every byte, so a client dribbling a
    byte at a time (slowloris), or one that never finishes its TLS
    handshake, could hold a connection for ever. The deadline runs from the
    connection's start, and from the first byte of each later request.
    """

    headers_timeout: float = 10.0
    _deadline: IDelayedCall | None = None
    _between_requests = False
    #: Counted in the site's `Opening` until its first request's headers are in.
    _opening: Opening | None = None
    #: The first request's bytes while its head is incomplete (None: decided).
    _head: bytes | None = b""

    def connectionMade(self) -> None:
        opening: Opening | None = getattr(getattr(self, "site", None), "opening", None)
        if opening is not None:
            if opening.full():
                # A storm: shed it before any TLS work, the cheapest answer there is.
                opening.shed += 1
                assert self.transport is not None
                self.transport.abortConnection()  # type: ignore[attr-defined]
                return
            opening.count += 1
            self._opening = opening
        super().connectionMade()
        self._arm()

    def _opened(self) -> None:
        opening, self._opening = self._opening, None
        if opening is not None:
            opening.count -= 1

    def dataReceived(self, data: bytes) -> None:
        if self._head is not None:
            data = self._first_request(data)
            if not data:
                return
        if self._between_requests:
            self._between_requests = False
            self._arm()
        super().dataReceived(data)

    def _first_request(self, data: bytes) -> bytes:
        """Hold the first request's head; hand a plain /ws upgrade to Autobahn.

        What is returned goes on to twisted.web (everything, unless handed over).
        """
        data = self._head + data if self._head else data
        end = data.find(b"\r\n\r\n")
        if end < 0 and len(data) <= MAX_SNIFFED_HEAD:
            self._head = data
            return b""
        self._head = None
        websocket = getattr(getattr(self, "site", None), "websocket", None)
        if websocket is None or not 0 <= end <= MAX_SNIFFED_HEAD:
            return data
        wrapper = tls_wrapper(self.transport)
        if wrapper is None or not is_websocket_upgrade(data[:end]):
            return data
        # Its headers are in (as at allHeadersReceived), and it leaves the site.
        self._disarm()
        self._opened()
        hand_over(self, wrapper, websocket, data)
        return b""

    def allHeadersReceived(self) -> None:
        self._disarm()
        self._opened()
        super().allHeadersReceived()

    def requestDone(self, request: Request) -> None:
        super().requestDone(request)
        self._between_requests = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm()
        self._opened()
        super().connectionLost(reason)

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.callLater(self.headers_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        transport = self.transport
        if transport is None:
            return
        _log.info(
            "dropping a connection that sent no complete request headers in {timeout} s "
            "peer={peer}",
            securepub_event="headers_timeout",
            timeout=self.headers_timeout,
            peer=getattr(transport.getPeer(), "host", None),
        )
        transport.abortConnection()  # type: ignore[attr-defined]


class SecurePubSite(Site):
    """A Site that caps bodies, hides tracebacks and never logs query strings.

    The access log leaves the query string out because ``/ws?ticket=...``
    carries a ticket there.
    """

    requestFactory = CappedRequest
    # Plain HTTP/1.1 channels (no HTTP/2 negotiation), with a headers deadline.
    protocol = DeadlineChannel  # type: ignore[assignment]
    displayTracebacks = False

    def __init__(
        self,
        resource: IResource,
        max_body_bytes: int,
        headers_timeout: float = 10.0,
        proxies: ProxyPolicy | None = None,
        opening: Opening | None = None,
        websocket: Factory | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, **kwargs)
        #: Builds the protocol of a connection that opens with a /ws upgrade
        #: (see `securepub.server.upgrade`); None: every request goes to the resource.
        self.websocket = websocket
        #: Connections still opening (None: not counted).
        self.opening = opening
        self.max_body_bytes = max_body_bytes
        self.headers_timeout = headers_timeout
        #: Trusted reverse proxies, for the client's address (see `api.client_ip`).
        self.proxies = proxies

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.headers_timeout = self.headers_timeout
        return channel

    def log(self, request: Request) -> None:  # type: ignore[override]
        """No per-request access log.

        Twisted's would hold ``/ws?ticket=...`` query strings, and even a
        sanitized debug line per request cost 15% of issuing a ticket
        (bench/). Security decisions are logged as events of their own, and
        /metrics counts the rest.
        """


class WebSocketOnly(Resource):
    """``/ws`` exactly (query allowed); anything below it is 404."""

    isLeaf = True

    def __init__(self, websocket: WebSocketResource) -> None:
        super().__init__()
        self._websocket = websocket

    def render(self, request: Request) -> Any:
        if request.postpath not in ([], [b""]):
            return error_body(request, "not_found", "no such resource")
        upgrade = (request.getHeader(b"upgrade") or b"").strip().lower()
        if request.method != b"GET" or upgrade != b"websocket":
            return error_body(request, "bad_request", "/ws only accepts WebSocket upgrades")
        channel = request.channel
        result = self._websocket.render(request)
        if channel is not None and channel.transport is None:
            # The connection is the WebSocket's now. The channel and its
            # request hold each other (and the request's headers and body):
            # unlink them, so they are freed now rather than at the next
            # full garbage collection, which at 0.6 KiB per connection is
            # what a crowd of reconnecting clients would otherwise pile up.
            channel.requests = []
            channel._networkProducer = None  # type: ignore[assignment]
            request.channel = None  # type: ignore[assignment]
            request.content = None
        return result


class Root(Resource):
    """Routes exact paths to their resources; everything else is a JSON 404."""

    def __init__(self, routes: Mapping[bytes, IResource]) -> None:
        super().__init__()
        self._routes = routes
        self._not_found = NotFound()

    def getChild(self, path: bytes, request: Request) -> IResource:
        # Two-segment API paths (/v1/tickets) are looked up whole.
        if path == b"v1" and request.postpath and request.prepath is not None:
            segment = request.postpath.pop(0)
            request.prepath.append(segment)
            return self._routes.get(b"v1/" + segment, self._not_found)
        return self._routes.get(path, self._not_found)

    def render(self, request: Request) -> bytes:
        return self._not_found.render(request)
