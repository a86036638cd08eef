"""A blocking publisher for backend scripts and web frameworks: stdlib only, no Twisted."""

from __future__ import annotations

import http.client
import json
import random
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote, urlsplit

__all__ = [
    "DEFAULT_RETRY",
    "DEFAULT_URL",
    "MAX_RETRY_AFTER",
    "APIError",
    "CertificateError",
    "ClientError",
    "ConnectionFailed",
    "HistoryPage",
    "IssuedTicket",
    "Published",
    "Publisher",
    "RetryPolicy",
    "ServerURL",
    "bearer",
    "encode_json",
    "history_page",
    "history_query",
    "parse_response",
    "parse_retry_after",
    "parse_url",
    "presence_query",
    "presence_users",
    "published",
    "ticket_request",
]

DEFAULT_URL: Final = "https://localhost:8443"

#: ``GET /v1/history`` returns at most this many messages per call (SPEC section 8).
MAX_HISTORY_LIMIT: Final = 1000
DEFAULT_HISTORY_LIMIT: Final = 100

#: The largest response body read from the server; a reply is a few hundred bytes.
MAX_RESPONSE_BYTES: Final = 1024 * 1024

#: A kept-alive connection idle longer than this is replaced before it is used:
#: the server closes idle HTTP connections after 60 seconds.
MAX_IDLE_SECONDS: Final = 45.0

#: The longest wait a ``Retry-After`` header can impose, in seconds.
MAX_RETRY_AFTER: Final = 60

#: Statuses whose ``Retry-After`` header is honoured (SPEC section 2: 429 and 503).
RETRY_AFTER_STATUSES: Final = frozenset({429, 503})

_USER_AGENT: Final = "securepub-python"

_RETRY_AFTER_SECONDS = re.compile(r"[0-9]{1,9}")


class ClientError(Exception):
    """Anything that kept a call from succeeding. Never holds the API key or a ticket."""


class ConnectionFailed(ClientError):
    """The server could not be reached, or the connection broke during a call.

    ``sent`` says whether the request may have reached the server: when it
    is true a publish may or may not have happened, so it is not retried.
    ``refused`` says the server's port refused the connection: nothing was
    sent, so that one is retried.
    """

    def __init__(self, message: str, *, sent: bool = False, refused: bool = False) -> None:
        super().__init__(message)
        self.sent = sent
        self.refused = refused


class CertificateError(ConnectionFailed):
    """The server's certificate was not trusted or does not name the server."""


class APIError(ClientError):
    """The server refused the call: ``status``, the SPEC's ``code`` and its ``message``.

    ``code`` is one of ``bad_request``, ``invalid_topic``, ``invalid_payload``,
    ``unauthorized``, ``forbidden``, ``too_large``, ``unsupported_media_type``,
    ``rate_limited``, ``unavailable`` (or ``unexpected_response`` when the
    answer was not securepub's JSON, e.g. from a proxy).

    ``retry_after`` is the server's ``Retry-After`` on a 429 or 503, in whole
    seconds (capped at `MAX_RETRY_AFTER`), or None when it sent none that is
    a plain number of seconds.
    """

    def __init__(
        self, status: int, code: str, message: str, *, retry_after: int | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class IssuedTicket:
    """A ticket from ``POST /v1/tickets``; ``repr()`` leaves the secret out."""

    ticket: str = field(repr=False)
    expires_at: float

    def as_json(self) -> dict[str, Any]:
        """The server's answer, ``{"ticket": ..., "expires_at": ...}``."""
        return {"ticket": self.ticket, "expires_at": self.expires_at}


@dataclass(frozen=True)
class Published:
    """A ``POST /v1/publish`` answer: the message id and, on a topic with history, its place.

    ``offset`` and ``epoch`` are None on a topic that keeps no history.
    """

    id: str
    offset: int | None = None
    epoch: str | None = None


@dataclass(frozen=True)
class HistoryPage:
    """A ``GET /v1/history`` answer (SPEC section 8).

    ``offset`` and ``epoch`` are the topic's position at the moment of the
    read (its latest offset, 0 when it holds nothing); ``messages`` are the
    message objects after ``since`` as subscribers got them
    (``{"op": "message", "topic": ..., "id": ..., "ts": ..., "data": ...,
    "offset": ..., "epoch": ...}``), in offset order. When the last message's
    offset is below ``offset``, more follow: ask again ``since`` it.
    """

    offset: int
    epoch: str
    messages: list[dict[str, Any]]

    @property
    def next_since(self) -> int | None:
        """The ``since`` of the next page when this one did not reach ``offset``, else None."""
        if not self.messages:
            return None
        last = self.messages[-1].get("offset")
        if isinstance(last, int) and not isinstance(last, bool) and last < self.offset:
            return last
        return None


@dataclass(frozen=True)
class ServerURL:
    """A checked ``https://host[:port][/prefix]`` server address."""

    host: str
    port: int
    prefix: str

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def path(self, path: str) -> str:
        """The request path of ``path`` (``/v1/publish``) under the URL's prefix."""
        return self.prefix + path

    @property
    def websocket(self) -> str:
        """The ``wss://`` URL of the server's WebSocket endpoint."""
        return "wss" + self.origin[len("https") :] + self.path("/ws")


def parse_url(url: str) -> ServerURL:
    """Check a server URL: https only (there is no plaintext securepub), no userinfo."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ClientError(f"bad server URL {url[:100]!r}: {e}") from None
    if parts.scheme != "https":
        raise ClientError(
            f"bad server URL {url[:100]!r}: it must start with https:// (securepub speaks TLS only)"
        )
    if not parts.hostname:
        raise ClientError(f"bad server URL {url[:100]!r}: no host")
    if parts.username is not None or parts.password is not None:
        raise ClientError(f"bad server URL {url[:100]!r}: credentials do not belong in the URL")
    if parts.query or parts.fragment:
        raise ClientError(f"bad server URL {url[:100]!r}: no query or fragment allowed")
    return ServerURL(host=parts.hostname, port=port or 443, prefix=parts.path.rstrip("/"))


def encode_json(value: Any) -> bytes:
    """Serialize compactly; NaN and Infinity are refused (the server would refuse them)."""
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ClientError(f"data is not JSON: {e}") from None
    return text.encode("utf-8")


def published_id(result: dict[str, Any]) -> str:
    """The message id in a ``POST /v1/publish`` answer (the server's data is checked too)."""
    return published(result).id


def _is_offset(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def published(result: dict[str, Any]) -> Published:
    """The whole ``POST /v1/publish`` answer: id, and offset and epoch when it has them."""
    message_id = result.get("id")
    if not isinstance(message_id, str):
        raise APIError(202, "unexpected_response", "the answer holds no message id")
    if "offset" not in result and "epoch" not in result:
        return Published(message_id)
    offset, epoch = result.get("offset"), result.get("epoch")
    if not _is_offset(offset) or offset == 0 or not isinstance(epoch, str):
        raise APIError(202, "unexpected_response", "the answer's offset or epoch is malformed")
    return Published(message_id, offset, epoch)


def history_query(topic: str, since: int = 0, limit: int = DEFAULT_HISTORY_LIMIT) -> str:
    """The path and query of ``GET /v1/history`` (the server checks the values' ranges)."""
    if not isinstance(topic, str):
        raise ClientError("the topic must be a string")
    for name, value in (("since", since), ("limit", limit)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ClientError(f"{name} must be an integer")
    try:
        quoted = quote(topic, safe="")
    except UnicodeEncodeError:
        raise ClientError("the topic is not valid text") from None
    return f"/v1/history?topic={quoted}&since={since}&limit={limit}"


def history_page(result: dict[str, Any]) -> HistoryPage:
    """A ``GET /v1/history`` answer, its shape checked."""
    offset, epoch, messages = result.get("offset"), result.get("epoch"), result.get("messages")
    if (
        not isinstance(offset, int)
        or not _is_offset(offset)
        or not isinstance(epoch, str)
        or not isinstance(messages, list)
        or not all(isinstance(message, dict) for message in messages)
    ):
        raise APIError(200, "unexpected_response", "the answer is not a history page")
    return HistoryPage(offset=offset, epoch=epoch, messages=messages)


def presence_query(topic: str) -> str:
    """The path and query of ``GET /v1/presence`` (the server checks the topic)."""
    if not isinstance(topic, str):
        raise ClientError("the topic must be a string")
    try:
        quoted = quote(topic, safe="")
    except UnicodeEncodeError:
        raise ClientError("the topic is not valid text") from None
    return f"/v1/presence?topic={quoted}"


def checked_users(users: Any) -> dict[str, int] | None:
    """A presence map (user -> open sessions, SPEC section 10) if well formed, else None:
    a JSON object of non-empty strings to positive integers."""
    if not isinstance(users, dict):
        return None
    for user, count in users.items():
        if not isinstance(user, str) or not user:
            return None
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            return None
    return dict(users)


def presence_users(result: dict[str, Any]) -> dict[str, int]:
    """The ``users`` of a ``GET /v1/presence`` answer, its shape checked."""
    users = checked_users(result.get("users"))
    if users is None:
        raise APIError(200, "unexpected_response", "the answer is not a presence map")
    return users


def issued_ticket(result: dict[str, Any]) -> IssuedTicket:
    """The ticket in a ``POST /v1/tickets`` answer."""
    ticket, expires_at = result.get("ticket"), result.get("expires_at")
    if not isinstance(ticket, str) or not isinstance(expires_at, (int, float)):
        raise APIError(201, "unexpected_response", "the answer holds no ticket")
    return IssuedTicket(ticket=ticket, expires_at=float(expires_at))


def ticket_request(
    user: str,
    *,
    client_ip: str | None = None,
    subscribe: Iterable[str] = (),
    publish: Iterable[str] = (),
    ttl: int | None = None,
    session_ttl: int | None = None,
) -> dict[str, Any]:
    """The body of ``POST /v1/tickets`` (SPEC sections 2 and 9); the server validates it.

    ``session_ttl`` bounds the session the ticket opens (or refreshes), in seconds.
    """
    body: dict[str, Any] = {"user": user}
    if client_ip is not None:
        body["client_ip"] = client_ip
    patterns = list(subscribe)
    if patterns:
        body["subscribe"] = patterns
    patterns = list(publish)
    if patterns:
        body["publish"] = patterns
    if ttl is not None:
        body["ttl"] = ttl
    if session_ttl is not None:
        body["session_ttl"] = session_ttl
    return body


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry what is safe to retry.

    Only two failures are retried: a refused connection (nothing was sent)
    and a 503 (the server says nothing was done). The delay before retry
    ``n`` (from 0) is ``min(max_delay, initial_delay * 2**n)``, scaled by a
    random factor between 0.5 and 1 so that many clients do not retry in step.

    When the server said how long to wait (``Retry-After``, see
    `parse_retry_after`), the delay is at least that, at most
    ``max_retry_after``, plus a random share of up to a quarter of it (and of
    ``initial_delay``), so the clients it turned away do not all come back in
    the same second.
    """

    retries: int = 3
    initial_delay: float = 0.25
    max_delay: float = 4.0
    max_retry_after: float = MAX_RETRY_AFTER

    def delay(
        self,
        attempt: int,
        rand: Callable[[], float] = random.random,
        retry_after: float | None = None,
    ) -> float:
        base = min(self.max_delay, self.initial_delay * 2.0**attempt)
        backoff = base * (0.5 + 0.5 * rand())
        if retry_after is None or retry_after < 0:
            return backoff
        wait = min(float(retry_after), self.max_retry_after)
        jitter = (0.25 * wait + self.initial_delay) * rand()
        return max(backoff, wait + jitter)


#: Three retries, 0.25 s doubling up to 4 s, jittered: about 2 s at most in all.
DEFAULT_RETRY: Final = RetryPolicy()


def parse_retry_after(value: str | None) -> int | None:
    """The seconds of a ``Retry-After`` header, capped at `MAX_RETRY_AFTER`.

    Only a plain non-negative integer counts; anything else (an HTTP date, a
    fraction, a negative number, several values) is ignored: None.
    """
    if value is None:
        return None
    value = value.strip(" \t")
    if not _RETRY_AFTER_SECONDS.fullmatch(value):
        return None
    return min(int(value), MAX_RETRY_AFTER)


def parse_response(status: int, data: bytes, retry_after: str | None = None) -> dict[str, Any]:
    """A success body as a dict, or raise the `APIError` the status and body describe.

    ``retry_after`` is the answer's ``Retry-After`` header, if any (kept for 429 and 503).
    """
    if status in (200, 201, 202):
        try:
            value = json.loads(data)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise APIError(status, "unexpected_response", "the answer is not a JSON object")
        return value
    error = error_from_response(status, data)
    if status in RETRY_AFTER_STATUSES:
        error.retry_after = parse_retry_after(retry_after)
    raise error


def bearer(api_key: str) -> str:
    """The Authorization header's value; refuses what a header cannot carry."""
    api_key = api_key.strip() if isinstance(api_key, str) else ""
    if not api_key:
        raise ClientError("an API key is required")
    if not api_key.isascii() or any(c.isspace() or not c.isprintable() for c in api_key):
        raise ClientError("the API key holds characters an HTTP header cannot carry")
    return f"Bearer {api_key}"


def error_from_response(status: int, body: bytes) -> APIError:
    """The SPEC's ``{"error": code, "message": text}``, or a generic error for anything else."""
    try:
        value = json.loads(body)
    except ValueError:
        value = None
    if (
        isinstance(value, dict)
        and isinstance(value.get("error"), str)
        and isinstance(value.get("message"), str)
    ):
        return APIError(status, value["error"], _one_line(value["message"]))
    return APIError(status, "unexpected_response", f"HTTP {status} without a securepub error")


def _one_line(text: str, limit: int = 300) -> str:
    """Server text made safe for one terminal line: no control characters, bounded."""
    text = text[:limit]
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _describe_os_error(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _stale(sock: socket.socket | None) -> bool:
    """Whether a kept-alive socket was closed by the server (readable while idle)."""
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class Publisher:
    """Publish messages and issue tickets over HTTPS, blocking; no Twisted needed.

    One TLS connection is kept alive across calls (and replaced when the
    server has closed it). The server's certificate is always verified,
    against ``ca`` (a PEM file) when given, else the system's trust store;
    there is no way to turn that off. Calls are serialized by a lock, so one
    Publisher may be shared by the threads of a web application.

    >>> with Publisher("https://localhost:8443", api_key, ca="certs/ca.pem") as p:
    ...     message_id = p.publish("news.sports", {"headline": "hello"})
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        ca: str | None = None,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._url = parse_url(url)
        self._authorization = bearer(api_key)
        try:
            self._context = ssl.create_default_context(cafile=ca)
        except FileNotFoundError:
            raise ClientError(f"CA file {ca} does not exist") from None
        except ssl.SSLError:
            raise ClientError(f"CA file {ca} holds no PEM certificate") from None
        except OSError as e:
            raise ClientError(f"cannot read CA file {ca}: {_describe_os_error(e)}") from None
        self._context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._timeout = timeout
        self._retry = retry
        self._sleep = sleep
        self._rand = rand
        self._lock = threading.Lock()
        self._conn: http.client.HTTPSConnection | None = None
        self._last_used = 0.0

    def __repr__(self) -> str:
        return f"<Publisher {self._url.origin}{self._url.prefix}>"

    @property
    def url(self) -> ServerURL:
        return self._url

    def publish(self, topic: str, data: Any) -> str:
        """Publish ``data`` (any JSON value) to ``topic``; return the message id.

        Raises `APIError` (``.code`` is ``invalid_topic``, ``invalid_payload``,
        ...) when the server refuses it, `ConnectionFailed` when it could not
        be reached or the connection broke.
        """
        return self.publish_message(topic, data).id

    def publish_message(self, topic: str, data: Any) -> Published:
        """Publish like `publish`, returning the whole answer: a `Published`.

        On a topic with history it carries the message's ``offset`` and the
        topic's ``epoch`` (a subscriber that has seen this message can resume
        from there); elsewhere they are None.
        """
        body = encode_json({"topic": topic, "data": data})
        return published(self._call("POST", "/v1/publish", body))

    def history(
        self, topic: str, since: int = 0, limit: int = DEFAULT_HISTORY_LIMIT
    ) -> HistoryPage:
        """Read what a topic with history holds after offset ``since`` (``GET /v1/history``).

        At most ``limit`` messages (1 to 1000) come back; `HistoryPage.next_since`
        says where the next page starts when there are more. A topic that keeps
        no history raises `APIError` ``bad_request``.
        """
        return history_page(self._call("GET", history_query(topic, since, limit)))

    def presence(self, topic: str) -> dict[str, int]:
        """Who is subscribed to ``topic`` (``GET /v1/presence``, SPEC section 10).

        Returns ``{user: open sessions subscribed to that exact topic}``, on every
        node. A topic whose rule does not track presence raises `APIError`
        ``bad_request``; an answer of another shape ``unexpected_response``.
        """
        return presence_users(self._call("GET", presence_query(topic)))

    def issue_ticket(
        self,
        user: str,
        *,
        client_ip: str | None = None,
        subscribe: Iterable[str] = (),
        publish: Iterable[str] = (),
        ttl: int | None = None,
        session_ttl: int | None = None,
    ) -> IssuedTicket:
        """Issue a single-use WebSocket ticket for one browser (SPEC sections 2 and 9).

        ``ttl`` is how long the ticket may wait to be redeemed; ``session_ttl`` how
        long the session it opens lasts before it must be refreshed (the server's
        default, ``[limits] max_session_seconds``, when None).
        """
        body = ticket_request(
            user,
            client_ip=client_ip,
            subscribe=subscribe,
            publish=publish,
            ttl=ttl,
            session_ttl=session_ttl,
        )
        return issued_ticket(self._call("POST", "/v1/tickets", encode_json(body)))

    def close(self) -> None:
        """Close the kept-alive connection; the next call opens a new one."""
        with self._lock:
            self._drop()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- one call, with retries

    def _call(self, method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
        with self._lock:
            attempt = 0
            while True:
                retry_after: int | None = None
                try:
                    return self._attempt(method, path, body)
                except ConnectionFailed as e:
                    if not e.refused or attempt >= self._retry.retries:
                        raise
                except APIError as e:
                    if e.status != 503 or attempt >= self._retry.retries:
                        raise
                    retry_after = e.retry_after
                self._sleep(self._retry.delay(attempt, self._rand, retry_after))
                attempt += 1

    def _attempt(self, method: str, path: str, body: bytes | None) -> dict[str, Any]:
        conn = self._connection()
        headers = {
            "Authorization": self._authorization,
            "Accept": "application/json",
            "User-Agent": _USER_AGENT,
        }
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, self._url.path(path), body=body, headers=headers)
            response = conn.getresponse()
            data = response.read(MAX_RESPONSE_BYTES + 1)
        except (OSError, http.client.HTTPException) as e:
            self._drop()
            reason = _describe_os_error(e) if isinstance(e, OSError) else type(e).__name__
            raise ConnectionFailed(
                f"the connection to {self._url.origin} broke during the request ({reason}); "
                "it may or may not have been carried out",
                sent=True,
            ) from None
        self._last_used = time.monotonic()
        if response.will_close or len(data) > MAX_RESPONSE_BYTES:
            self._drop()
        if len(data) > MAX_RESPONSE_BYTES:
            raise APIError(response.status, "unexpected_response", "the answer is too large")
        return parse_response(response.status, data, response.getheader("Retry-After"))

    def _connection(self) -> http.client.HTTPSConnection:
        """The kept-alive connection, or a new one when it is gone, stale or idle too long."""
        conn = self._conn
        if conn is not None:
            idle = time.monotonic() - self._last_used
            if idle > MAX_IDLE_SECONDS or _stale(conn.sock):
                self._drop()
                conn = None
        if conn is not None:
            return conn
        conn = http.client.HTTPSConnection(
            self._url.host, self._url.port, context=self._context, timeout=self._timeout
        )
        try:
            conn.connect()
        except ssl.SSLCertVerificationError as e:
            conn.close()
            raise CertificateError(
                f"the certificate of {self._url.origin} is not trusted: "
                f"{_one_line(e.verify_message or str(e))} (is SECUREPUB_CA the CA that "
                "signed it?)"
            ) from None
        except ssl.SSLError as e:
            conn.close()
            raise ConnectionFailed(
                f"TLS handshake with {self._url.origin} failed: {_one_line(e.reason or str(e))}"
            ) from None
        except ConnectionRefusedError:
            conn.close()
            raise ConnectionFailed(
                f"cannot connect to {self._url.origin}: connection refused", refused=True
            ) from None
        except OSError as e:
            conn.close()
            raise ConnectionFailed(
                f"cannot connect to {self._url.origin}: {_describe_os_error(e)}"
            ) from None
        self._conn = conn
        self._last_used = time.monotonic()
        return conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
