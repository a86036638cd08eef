"""The HTTPS API: /v1/tickets, /v1/publish and /healthz, JSON in and out."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from securepub.broker.broker import Broker, Published
from securepub.broker.frames import history_frames
from securepub.core import jsonstrict
from securepub.core.apikeys import ApiKeys, Scopes
from securepub.core.clientip import ProxyPolicy
from securepub.core.errors import RequestError
from securepub.core.history import MAX_OFFSET, HistoryPage
from securepub.core.limits import Limits
from securepub.core.ratelimit import TokenBucket
from securepub.core.tickets import ITicketStore, StoreUnavailable, Ticket, normalize_ip
from securepub.core.topics import covered_by_any, parse_patterns, validate_topic
from securepub.ops.metrics import CONTENT_TYPE

_log = Logger()

#: HTTP status for each SPEC error code.
STATUS = {
    "bad_request": 400,
    "invalid_topic": 400,
    "invalid_payload": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "too_large": 413,
    "unsupported_media_type": 415,
    "rate_limited": 429,
    "internal_error": 500,
    "unavailable": 503,
}

MAX_USER_BYTES = 255
MIN_TTL, MAX_TTL, DEFAULT_TTL = 1, 300, 30
_TICKET_FIELDS = frozenset({"user", "client_ip", "subscribe", "publish", "ttl", "session_ttl"})
_PUBLISH_FIELDS = frozenset({"topic", "data"})

#: Failed API authentications tolerated per client address before 429.
AUTH_FAILURE_RATE = 1.0
AUTH_FAILURE_BURST = 20.0
_MAX_TRACKED_ADDRESSES = 10_000

#: Headers on every API response: nothing here may be cached or sniffed.
COMMON_HEADERS = (
    (b"content-type", b"application/json"),
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"strict-transport-security", b"max-age=63072000"),
    (b"server", b"securepub"),
)


def _body(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def respond(request: Request, status: int, value: dict[str, Any]) -> bytes:
    """Set the status and the common headers; return the JSON body to write."""
    request.setResponseCode(status)
    for name, header in COMMON_HEADERS:
        request.setHeader(name, header)
    return _body(value)


def error_body(request: Request, code: str, message: str) -> bytes:
    """The SPEC's ``{"error": code, "message": text}`` with the code's status.

    A 429 or a 503 says when to try again (1 to 5 s, spread so that many
    clients do not come back in step).
    """
    status = STATUS[code]
    body = respond(request, status, {"error": code, "message": message})
    if status in (429, 503):
        request.setHeader(b"retry-after", b"%d" % retry_after())
    return body


#: The Retry-After of a 429 or 503, in seconds: a random value in this range.
RETRY_AFTER_SECONDS = (1, 5)


def retry_after() -> int:
    """Seconds a refused client should wait, spread so a crowd comes back apart."""
    return random.randint(*RETRY_AFTER_SECONDS)  # noqa: S311 - jitter, not a secret


def client_ip(request: Request) -> str:
    """The client's address: the TCP peer, or behind a trusted proxy the client it names."""
    known = getattr(request, "_securepub_client_ip", None)
    if isinstance(known, str):
        return known
    peer = str(getattr(request.getClientAddress(), "host", "unknown"))
    proxies: ProxyPolicy | None = getattr(getattr(request, "site", None), "proxies", None)
    address = peer
    if proxies is not None:
        headers = request.requestHeaders
        found = proxies.client(
            peer,
            [v.decode("latin-1") for v in headers.getRawHeaders(b"forwarded", [])],
            [v.decode("latin-1") for v in headers.getRawHeaders(b"x-forwarded-for", [])],
        )
        if found.ignored_headers:
            _log.info(
                "forwarding headers from an untrusted peer ignored peer={peer}",
                securepub_event="proxy_headers_ignored",
                peer=peer,
            )
        address = found.ip
    request._securepub_client_ip = address  # type: ignore[attr-defined]
    return address


class JSONResource(Resource):
    """A leaf answering only the methods it names, with JSON errors."""

    isLeaf = True
    allowed_methods: tuple[bytes, ...] = ()

    def render(self, request: Request) -> bytes | int:
        if request.postpath not in ([], [b""]):
            return error_body(request, "not_found", "no such resource")
        if request.method not in self.allowed_methods:
            request.setHeader(b"allow", b", ".join(self.allowed_methods))
            return error_body(request, "method_not_allowed", "method not allowed here")
        return super().render(request)  # type: ignore[no-any-return]


class NotFound(JSONResource):
    """Every path the API does not name."""

    def render(self, request: Request) -> bytes:
        return error_body(request, "not_found", "no such resource")


class Health(JSONResource):
    """``GET /healthz``: 200 while this node can serve."""

    allowed_methods = (b"GET", b"HEAD")

    def __init__(self, check: Callable[[], str | None] = lambda: None) -> None:
        super().__init__()
        self._check = check

    def render_GET(self, request: Request) -> bytes:
        problem = self._check()
        if problem is not None:
            return respond(request, 503, {"status": "unavailable", "reason": problem})
        return respond(request, 200, {"status": "ok"})

    render_HEAD = render_GET


class BackendResource(JSONResource):
    """A POST endpoint for backends: API key, then JSON body, then `handle`."""

    allowed_methods = (b"POST",)
    #: Whether an API key limited to publish scopes may use this endpoint.
    scoped_credentials_allowed = True

    def __init__(self, api_keys: ApiKeys, clock: IReactorTime) -> None:
        super().__init__()
        self._api_keys = api_keys
        self._clock = clock
        self._failures: dict[str, TokenBucket] = {}

    def refusal(self, request: Request) -> bytes | None:
        """The error body if the caller may not use the backend API, else None."""
        peer = client_ip(request)
        bucket = self._failures.get(peer)
        if bucket is not None and bucket.available() < 1:
            return error_body(request, "rate_limited", "too many failed authentications")
        if not self._authenticated(request, peer):
            return error_body(request, "unauthorized", "a valid API key is required")
        if not self.scoped_credentials_allowed and scopes_of(request) is not None:
            _refused(request, peer, request.path.decode("ascii", "replace"), "")
            return error_body(
                request, "forbidden", "this API key may only publish and issue tickets"
            )
        return None

    def render_POST(self, request: Request) -> bytes | int:
        refused = self.refusal(request)
        if refused is not None:
            return refused
        media = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if media != b"application/json":
            return error_body(request, "unsupported_media_type", "send application/json")
        assert request.content is not None
        try:
            body = jsonstrict.loads(request.content.read())
            if not isinstance(body, dict):
                raise RequestError("bad_request", "the body must be a JSON object")
            result = self.handle(request, body)
        except RequestError as e:
            return error_body(request, e.code, e.message)
        if isinstance(result, Deferred):
            result.addCallback(self._finish, request)
            result.addErrback(self._fail, request)
            return NOT_DONE_YET
        return result

    def _finish(self, body: bytes, request: Request) -> None:
        if not request.finished and not request._disconnected:
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()

    def _fail(self, failure: Failure, request: Request) -> None:
        if isinstance(failure.value, RequestError):
            body = error_body(request, failure.value.code, failure.value.message)
        elif failure.check(StoreUnavailable):
            body = error_body(request, "unavailable", "the ticket store is unavailable")
        else:
            _log.failure("API request failed", failure)
            body = error_body(request, "unavailable", "internal error; nothing was done")
        self._finish(body, request)

    def _authenticated(self, request: Request, peer: str) -> bool:
        if _client_certificate(request) is not None:
            # Verified during the TLS handshake against --client-ca (tls.py).
            return True
        header = request.getHeader(b"authorization") or b""
        scheme, _, credential = header.partition(b" ")
        ok, scopes = self._api_keys.lookup(credential.strip())
        ok = ok and scheme.lower() == b"bearer"
        request._securepub_scopes = scopes  # type: ignore[attr-defined]
        if not ok:
            reason = "missing" if not header else "invalid"
            _log.info(
                "API authentication refused reason={reason} peer={peer} path={path}",
                securepub_event="api_auth_refused",
                reason=reason,
                peer=peer,
                path=request.path.decode("ascii", "replace"),
            )
            self._count_failure(peer)
        return ok

    def _count_failure(self, peer: str) -> None:
        if len(self._failures) >= _MAX_TRACKED_ADDRESSES:
            self._failures.clear()
        bucket = self._failures.get(peer)
        if bucket is None:
            bucket = TokenBucket(self._clock, AUTH_FAILURE_RATE, AUTH_FAILURE_BURST)
            self._failures[peer] = bucket
        bucket.take()

    def handle(self, request: Request, body: dict[str, Any]) -> bytes | Deferred[bytes]:
        raise NotImplementedError


def scopes_of(request: Request) -> Scopes:
    """The publish scopes of the credential that authenticated ``request``."""
    scopes: Scopes = getattr(request, "_securepub_scopes", None)
    return scopes


def _refused(request: Request, peer: str, action: str, topic: str) -> None:
    _log.info(
        "authorization refused: {action} {topic} peer={peer} (API key scopes)",
        securepub_event="authorization_refused",
        action=action,
        topic=topic,
        user=None,
        peer=peer,
    )


def _client_certificate(request: Request) -> object | None:
    """The client certificate of the request's TLS connection, if it presented one."""
    transport = getattr(request.channel, "transport", None)
    get = getattr(transport, "getPeerCertificate", None)
    return get() if get is not None else None


def _check_fields(body: dict[str, Any], allowed: frozenset[str], required: tuple[str, ...]) -> None:
    unknown = body.keys() - allowed
    if unknown:
        raise RequestError("bad_request", f"unknown field {sorted(unknown)[0][:40]!r}")
    for name in required:
        if name not in body:
            raise RequestError("bad_request", f"missing field {name!r}")


def log_ticket_issued(ticket: Ticket, peer: str, source: str) -> None:
    """The ``ticket_issued`` security event (never the token itself)."""
    _log.info(
        "ticket issued user={user!r} client_ip={client_ip} expires_at={expires_at} "
        "peer={peer} source={source}",
        securepub_event="ticket_issued",
        source=source,
        user=ticket.user,
        client_ip=ticket.client_ip,
        expires_at=ticket.expires_at,
        subscribe=[p.text for p in ticket.subscribe],
        publish=[p.text for p in ticket.publish],
        session_ttl=ticket.session_ttl,
        peer=peer,
    )


def _user(body: dict[str, Any]) -> str:
    user = body["user"]
    if not isinstance(user, str) or not user or len(user.encode("utf-8")) > MAX_USER_BYTES:
        raise RequestError("bad_request", "'user' must be a non-empty string of at most 255 bytes")
    return user


_DEFAULT_LIMITS = Limits()


def parse_ticket_request(
    body: dict[str, Any], now: float, limits: Limits = _DEFAULT_LIMITS
) -> Ticket:
    """Validate a ``POST /v1/tickets`` body into a `Ticket` (SPEC sections 2 and 9)."""
    _check_fields(body, _TICKET_FIELDS, ("user",))
    user = _user(body)
    ip = body.get("client_ip")
    if ip is not None or "client_ip" in body:
        if not isinstance(ip, str):
            raise RequestError("bad_request", "'client_ip' must be an IP address string")
        try:
            ip = normalize_ip(ip)
        except ValueError:
            raise RequestError("bad_request", "'client_ip' is not an IP address") from None
    for name in ("subscribe", "publish"):
        grants = body.get(name, [])
        if not isinstance(grants, list) or not all(isinstance(g, str) for g in grants):
            raise RequestError("bad_request", f"'{name}' must be a list of topic patterns")
    ttl = body.get("ttl", DEFAULT_TTL)
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not MIN_TTL <= ttl <= MAX_TTL:
        raise RequestError("bad_request", "'ttl' must be an integer from 1 to 300")
    session_ttl = body.get("session_ttl", limits.max_session_seconds)
    low, high = limits.min_session_seconds, limits.max_session_seconds
    if (
        isinstance(session_ttl, bool)
        or not isinstance(session_ttl, int)
        or not (low <= session_ttl <= high)
    ):
        raise RequestError("bad_request", f"'session_ttl' must be an integer from {low} to {high}")
    return Ticket(
        user=user,
        client_ip=ip,
        subscribe=parse_patterns(body.get("subscribe", [])),
        publish=parse_patterns(body.get("publish", [])),
        expires_at=now + ttl,
        session_ttl=session_ttl,
    )


class TicketsResource(BackendResource):
    """``POST /v1/tickets``: issue a single-use ticket for one browser."""

    def __init__(
        self,
        api_keys: ApiKeys,
        clock: IReactorTime,
        store: ITicketStore,
        limits: Limits = _DEFAULT_LIMITS,
    ) -> None:
        super().__init__(api_keys, clock)
        self._store = store
        self._limits = limits

    def handle(self, request: Request, body: dict[str, Any]) -> Deferred[bytes]:
        ticket = parse_ticket_request(body, self._clock.seconds(), self._limits)
        peer = client_ip(request)
        scopes = scopes_of(request)
        if scopes is not None:
            # A browser must not get more publishing rights than the key itself.
            for pattern in ticket.publish:
                if not covered_by_any(scopes, pattern):
                    _refused(request, peer, "grant publish", pattern.text)
                    raise RequestError(
                        "forbidden", f"this API key may not grant publishing on {pattern.text}"
                    )

        def issued(token: str) -> bytes:
            log_ticket_issued(ticket, peer, source="api")
            return respond(request, 201, {"ticket": token, "expires_at": ticket.expires_at})

        d: Deferred[bytes] = self._store.issue(ticket).addCallback(issued)
        return d


class PublishResource(BackendResource):
    """``POST /v1/publish``: a backend publishes; payload checks still apply."""

    def __init__(self, api_keys: ApiKeys, clock: IReactorTime, broker: Broker) -> None:
        super().__init__(api_keys, clock)
        self._broker = broker

    def handle(self, request: Request, body: dict[str, Any]) -> Deferred[bytes]:
        _check_fields(body, _PUBLISH_FIELDS, ("topic", "data"))
        if not isinstance(body["topic"], str):
            raise RequestError("bad_request", "'topic' must be a string")
        scopes = scopes_of(request)
        if scopes is not None:
            topic = validate_topic(body["topic"])
            if not any(pattern.matches(topic) for pattern in scopes):
                _refused(request, client_ip(request), "publish", topic)
                raise RequestError("forbidden", f"this API key may not publish on {topic}")
        d = self._broker.publish(body["topic"], body["data"])
        return d.addCallback(lambda published: respond(request, 202, _published(published)))


def _published(published: Published) -> dict[str, Any]:
    """``{"id": ...}``, with ``offset`` and ``epoch`` on a topic with history."""
    answer: dict[str, Any] = {"id": published.id}
    if published.position is not None:
        answer["offset"] = published.position.offset
        answer["epoch"] = published.position.epoch
    return answer


MAX_HISTORY_LIMIT, DEFAULT_HISTORY_LIMIT = 1000, 100


def _query(request: Request, known: frozenset[bytes]) -> dict[bytes, bytes]:
    """The query string's parameters, each at most once, none unknown."""
    args: dict[bytes, list[bytes]] = request.args or {}
    for name, values in args.items():
        if name not in known:
            raise RequestError("bad_request", f"unknown parameter {name[:40].decode('latin-1')!r}")
        if len(values) != 1:
            raise RequestError("bad_request", f"parameter {name.decode()!r} given more than once")
    return {name: values[0] for name, values in args.items()}


def _bounded(value: bytes | None, name: str, low: int, high: int, default: int) -> int:
    if value is None:
        return default
    if not value.isdigit() or len(value) > 16 or not low <= int(value) <= high:
        raise RequestError("bad_request", f"'{name}' must be an integer from {low} to {high}")
    return int(value)


class _TopicQueryResource(BackendResource):
    """A ``GET`` about one topic (``?topic=T``), for backends.

    A key limited to publish scopes may ask only about topics it may publish on.
    """

    allowed_methods = (b"GET",)
    parameters: frozenset[bytes] = frozenset({b"topic"})

    def __init__(self, api_keys: ApiKeys, clock: IReactorTime, broker: Broker) -> None:
        super().__init__(api_keys, clock)
        self._broker = broker

    def render_GET(self, request: Request) -> bytes | int:
        refused = self.refusal(request)
        if refused is not None:
            return refused
        try:
            query = _query(request, self.parameters)
            raw_topic = query.get(b"topic")
            if raw_topic is None:
                raise RequestError("bad_request", "missing parameter 'topic'")
            topic = validate_topic(raw_topic.decode("ascii", "replace"))
            scopes = scopes_of(request)
            if scopes is not None and not any(p.matches(topic) for p in scopes):
                _refused(request, client_ip(request), "read", topic)
                raise RequestError("forbidden", f"this API key may not read {topic}")
            body = self.answer(request, topic, query)
        except RequestError as e:
            return error_body(request, e.code, e.message)
        body.addCallback(self._finish, request)
        body.addErrback(self._fail, request)
        return NOT_DONE_YET

    def answer(self, request: Request, topic: str, query: dict[bytes, bytes]) -> Deferred[bytes]:
        raise NotImplementedError


class HistoryResource(_TopicQueryResource):
    """``GET /v1/history?topic=T&since=OFFSET&limit=N``: a topic's history (SPEC 8).

    The messages are the frames subscribers got, spliced in as they are.
    """

    parameters = frozenset({b"topic", b"since", b"limit"})

    def answer(self, request: Request, topic: str, query: dict[bytes, bytes]) -> Deferred[bytes]:
        since = _bounded(query.get(b"since"), "since", 0, MAX_OFFSET, 0)
        limit = _bounded(query.get(b"limit"), "limit", 1, MAX_HISTORY_LIMIT, DEFAULT_HISTORY_LIMIT)
        d = self._broker.read_history(topic, since, limit)
        page: Deferred[bytes] = d.addCallback(self._page, request)
        return page

    @staticmethod
    def _page(page: HistoryPage, request: Request) -> bytes:
        head = respond(request, 200, {"offset": page.position.offset, "epoch": page.position.epoch})
        return head[:-1] + b',"messages":[' + b",".join(history_frames(page)) + b"]}"


class PresenceResource(_TopicQueryResource):
    """``GET /v1/presence?topic=T``: who is subscribed to a topic, on every node (SPEC 10)."""

    def answer(self, request: Request, topic: str, query: dict[bytes, bytes]) -> Deferred[bytes]:
        d = self._broker.read_presence(topic)
        body: Deferred[bytes] = d.addCallback(lambda users: respond(request, 200, {"users": users}))
        return body


class MetricsResource(BackendResource):
    """``GET /metrics``: Prometheus text, for holders of an API key only."""

    allowed_methods = (b"GET",)
    scoped_credentials_allowed = False

    def __init__(
        self,
        api_keys: ApiKeys,
        clock: IReactorTime,
        render_metrics: Callable[[], bytes],
    ) -> None:
        super().__init__(api_keys, clock)
        self._render_metrics = render_metrics

    def render_GET(self, request: Request) -> bytes:
        refused = self.refusal(request)
        if refused is not None:
            return refused
        respond(request, 200, {})
        request.setHeader(b"content-type", CONTENT_TYPE.encode("ascii"))
        return self._render_metrics()


_DISCONNECT_FIELDS = frozenset({"user", "revoke_tickets"})


class DisconnectResource(BackendResource):
    """``POST /v1/disconnect``: close a user's sessions on every node, and by
    default revoke the user's unredeemed tickets first so none can reconnect."""

    scoped_credentials_allowed = False

    def __init__(
        self, api_keys: ApiKeys, clock: IReactorTime, broker: Broker, store: ITicketStore
    ) -> None:
        super().__init__(api_keys, clock)
        self._broker = broker
        self._store = store

    def handle(self, request: Request, body: dict[str, Any]) -> Deferred[bytes]:
        _check_fields(body, _DISCONNECT_FIELDS, ("user",))
        user = _user(body)
        revoke = body.get("revoke_tickets", True)
        if not isinstance(revoke, bool):
            raise RequestError("bad_request", "'revoke_tickets' must be true or false")
        peer = client_ip(request)
        d: Deferred[int] = self._store.revoke_user(user) if revoke else succeed(0)

        def disconnect(revoked: int) -> Deferred[bytes]:
            _log.info(
                "user disconnected user={user!r} revoked_tickets={revoked} peer={peer}",
                securepub_event="user_disconnected",
                user=user,
                revoked=revoked,
                peer=peer,
            )
            done = self._broker.disconnect_user(user)
            return done.addCallback(
                lambda _: respond(request, 202, {"user": user, "revoked_tickets": revoked})
            )

        return d.addCallback(disconnect)
