"""The --dev pages: ``/demo``, built on securepub.js, and the ``/dev/ticket`` it uses."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from securepub.core.origin import normalize_origin
from securepub.core.tickets import ITicketStore, StoreUnavailable, Ticket, normalize_ip
from securepub.core.topics import Pattern
from securepub.server.api import client_ip, error_body, log_ticket_issued, respond
from securepub.server.files import CSS, HTML, JS, Files, package_file
from securepub.server.settings import DEMO_PATTERN, demo_topic_rule, with_demo_rule

__all__ = [
    "DEMO_PATTERN",
    "DemoPage",
    "DevTicket",
    "demo_topic_rule",
    "dev_routes",
    "own_origins",
    "with_demo_rule",
]

_log = Logger()

#: What a demo ticket may subscribe and publish to, and what `demo_topic_rule` opens.
DEMO_USER: Final = "demo"
DEMO_TICKET_TTL: Final = 30

#: The demo page runs only its own files: no inline script or style, no
#: plugins, no framing, and (Trusted Types) no string may become HTML or code.
DEMO_CSP: Final = (
    b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    b"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    b"frame-ancestors 'none'; require-trusted-types-for 'script'"
)


def own_origins(port: int) -> frozenset[str]:
    """The origins of pages this server serves under --dev (SPEC section 3), normalized."""
    origins = set()
    for origin in (f"https://localhost:{port}", f"https://127.0.0.1:{port}"):
        normalized = normalize_origin(origin)
        if normalized is not None:
            origins.add(normalized)
    return frozenset(origins)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(normalize_ip(address)).is_loopback
    except ValueError:
        return False


class DemoPage(Files):
    """``/demo`` (--dev only): the page, its script and its style, under a strict CSP."""

    def __init__(self) -> None:
        page = (HTML, package_file("securepub.dev", "demo.html"))
        super().__init__(
            {
                b"": page,
                b"demo.js": (JS, package_file("securepub.dev", "demo.js")),
                b"demo.css": (CSS, package_file("securepub.dev", "demo.css")),
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


def dev_routes(*, port: int, tickets: ITicketStore, clock: IReactorTime) -> dict[bytes, IResource]:
    """The routes --dev adds: ``/demo`` and ``/dev/ticket``."""
    return {b"demo": DemoPage(), b"dev": DevTicket(tickets, clock, own_origins(port))}
