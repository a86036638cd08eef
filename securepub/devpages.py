"""Browser pages: ``/static/securepub.js`` always; ``/demo`` and ``/dev/ticket`` with --dev."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Final

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from securepub.api import client_ip, error_body, log_ticket_issued, respond
from securepub.origin import normalize_origin
from securepub.settings import DEMO_PATTERN, demo_topic_rule, with_demo_rule
from securepub.tickets import ITicketStore, StoreUnavailable, Ticket, normalize_ip
from securepub.topics import Pattern

__all__ = [
    "DEMO_PATTERN",
    "DemoPage",
    "DevTicket",
    "StaticFiles",
    "client_routes",
    "demo_topic_rule",
    "own_origins",
    "with_demo_rule",
]

_log = Logger()

#: What a demo ticket may subscribe and publish to, and what `demo_topic_rule` opens.
DEMO_USER: Final = "demo"
DEMO_TICKET_TTL: Final = 30

_JS: Final = b"text/javascript; charset=utf-8"
_CSS: Final = b"text/css; charset=utf-8"
_HTML: Final = b"text/html; charset=utf-8"

#: The demo page runs only its own files: no inline script or style, no
#: plugins, no framing, and (Trusted Types) no string may become HTML or code.
DEMO_CSP: Final = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    b"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    b"frame-ancestors 'none'; require-trusted-types-for 'script'"
)

_COMMON_HEADERS: Final = (
    (b"x-content-type-options", b"nosniff"),
    (b"strict-transport-security", b"max-age=63072000"),
    (b"server", b"securepub"),
)


def own_origins(port: int) -> frozenset[str]:
    """The origins of pages this server serves under --dev (SPEC section 3), normalized."""
    origins = set()
    for origin in (f"https://localhost:{port}", f"https://127.0.0.1:{port}"):
        normalized = normalize_origin(origin)
        if normalized is not None:
            origins.add(normalized)
    return frozenset(origins)


def _asset(name: str) -> bytes:
    return resources.files("securepub").joinpath("static", name).read_bytes()


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(normalize_ip(address)).is_loopback
    except ValueError:
        return False


class _Files(Resource):
    """A fixed allow-list of in-memory files, looked up by the rest of the path.

    Files are read once at start; nothing maps a request path to the file
    system, so there is nothing to traverse.
    """

    isLeaf = True

    def __init__(
        self,
        files: Mapping[bytes, tuple[bytes, bytes]],
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__()
        self._files = dict(files)
        self._headers = tuple(headers)

    def _key(self, request: Request) -> bytes | None:
        postpath = request.postpath or []
        if len(postpath) > 1:
            return None
        return postpath[0] if postpath else b""

    def render(self, request: Request) -> bytes:
        key = self._key(request)
        found = self._files.get(key) if key is not None else None
        if found is None:
            return error_body(request, "not_found", "no such resource")
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return error_body(request, "method_not_allowed", "method not allowed here")
        content_type, body = found
        request.setResponseCode(200)
        for name, value in (*_COMMON_HEADERS, *self._headers):
            request.setHeader(name, value)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"content-length", b"%d" % len(body))
        # twisted.web drops the body of a HEAD response itself.
        return body


class StaticFiles(_Files):
    """``/static/securepub.js``, always served, importable from other origins.

    A cross-origin ``<script type="module">`` needs CORS; the file is public
    and sent without credentials, so ``Access-Control-Allow-Origin: *``.
    """

    def __init__(self) -> None:
        super().__init__(
            {b"securepub.js": (_JS, _asset("securepub.js"))},
            headers=(
                (b"cache-control", b"no-cache"),
                (b"access-control-allow-origin", b"*"),
                (b"cross-origin-resource-policy", b"cross-origin"),
            ),
        )


class DemoPage(_Files):
    """``/demo`` (--dev only): the page, its script and its style, under a strict CSP."""

    def __init__(self) -> None:
        page = (_HTML, _asset("demo.html"))
        super().__init__(
            {
                b"": page,
                b"demo.js": (_JS, _asset("demo.js")),
                b"demo.css": (_CSS, _asset("demo.css")),
            },
            headers=(
                (b"cache-control", b"no-store"),
                (b"content-security-policy", DEMO_CSP),
                (b"referrer-policy", b"no-referrer"),
                (b"x-frame-options", b"DENY"),
                (b"cross-origin-opener-policy", b"same-origin"),
                (b"cross-origin-resource-policy", b"same-origin"),
            ),
        )


class DevTicket(Resource):
    """``POST /dev/ticket`` (--dev only): a demo ticket for the page asking.

    Only loopback peers see it at all (anyone else gets the 404 of a path
    that does not exist). The request must carry this server's own Origin,
    so another site open in the same browser cannot mint tickets through it,
    and ``application/json``, which a cross-site form cannot send. The
    ticket is bound to the requesting address and grants `DEMO_PATTERN` for
    subscribing and publishing. The request body is ignored.
    """

    isLeaf = True

    def __init__(self, store: ITicketStore, clock: IReactorTime, origins: Iterable[str]) -> None:
        super().__init__()
        self._store = store
        self._clock = clock
        self._origins = frozenset(origins)
        self._grant = (Pattern.parse(DEMO_PATTERN),)

    def render(self, request: Request) -> bytes | int:
        peer = client_ip(request)
        if not _is_loopback(peer) or (request.postpath or []) != [b"ticket"]:
            return error_body(request, "not_found", "no such resource")
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            return error_body(request, "method_not_allowed", "method not allowed here")
        raw = request.getHeader(b"origin")
        header = raw.decode("latin-1") if raw is not None else None
        origin = normalize_origin(header) if header is not None else None
        if origin is None or origin not in self._origins:
            _log.info(
                "demo ticket refused: origin {origin!r} is not this server peer={peer}",
                securepub_event="dev_ticket_refused",
                origin=(header or "")[:200] or None,
                peer=peer,
            )
            return error_body(request, "forbidden", "the Origin must be this server's own")
        media = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if media != b"application/json":
            return error_body(request, "unsupported_media_type", "send application/json")
        ticket = Ticket(
            user=DEMO_USER,
            client_ip=peer,
            subscribe=self._grant,
            publish=self._grant,
            expires_at=self._clock.seconds() + DEMO_TICKET_TTL,
        )
        d: Deferred[str] = self._store.issue(ticket)
        d.addCallbacks(
            self._issued,
            self._failed,
            callbackArgs=(request, ticket, peer),
            errbackArgs=(request,),
        )
        d.addErrback(self._failed_late, request)
        return NOT_DONE_YET

    def _issued(self, token: str, request: Request, ticket: Ticket, peer: str) -> None:
        log_ticket_issued(ticket, peer, source="dev")
        _finish(request, respond(request, 201, {"ticket": token, "expires_at": ticket.expires_at}))

    def _failed(self, failure: Failure, request: Request) -> None:
        if not failure.check(StoreUnavailable):
            _log.failure("demo ticket failed", failure)
        _finish(request, error_body(request, "unavailable", "the ticket store is unavailable"))

    def _failed_late(self, failure: Failure, request: Request) -> None:
        _log.failure("demo ticket response failed", failure)


def _finish(request: Request, body: bytes) -> None:
    if not request.finished and not request._disconnected:
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()


def client_routes(
    *, dev: bool, port: int, tickets: ITicketStore, clock: IReactorTime
) -> dict[bytes, IResource]:
    """The routes `Node` adds for browsers: ``static`` always, ``demo`` and ``dev`` with --dev."""
    routes: dict[bytes, IResource] = {b"static": StaticFiles()}
    if dev:
        routes[b"demo"] = DemoPage()
        routes[b"dev"] = DevTicket(tickets, clock, own_origins(port))
    return routes
