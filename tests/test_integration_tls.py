"""The real listener's TLS, seen from real client sockets (SPEC section 1, "TLS: ...")."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import select
import socket
import ssl
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from tests.server import Server, server_fixture

srv = server_fixture()

T = TypeVar("T")

# Key exchanges whose TLS 1.2 suites are forward secret.
FORWARD_SECRET_KX = ("ECDHE-", "DHE-")


def _context(srv: Server, low: ssl.TLSVersion, high: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=srv.ca_path)
    # Let the client offer TLS compression if this OpenSSL can, so that the
    # "no compression" checks test the server's choice as far as possible.
    ctx.options &= ~ssl.OP_NO_COMPRESSION
    with warnings.catch_warnings():
        # TLS 1.0/1.1 are deprecated in the ssl module: using them is the point.
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = low
        ctx.maximum_version = high
    return ctx


def _handshake(srv: Server, ctx: ssl.SSLContext, hostname: str = "127.0.0.1") -> ssl.SSLSocket:
    raw = socket.create_connection((srv.host, srv.port), timeout=5)
    try:
        return ctx.wrap_socket(raw, server_hostname=hostname)
    except BaseException:
        raw.close()
        raise


@pytest.fixture
def opened() -> Iterator[list[ssl.SSLSocket]]:
    sockets: list[ssl.SSLSocket] = []
    yield sockets
    for s in sockets:
        s.close()


def _healthz_over(tls: ssl.SSLSocket) -> bytes:
    tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        chunk = tls.recv(4096)
        if not chunk:
            return data
        data += chunk


class TestAccepted:
    def test_tls12_handshake_with_forward_secret_aead(
        self, srv: Server, opened: list[ssl.SSLSocket]
    ) -> None:
        """A TLS 1.2-only client that verifies the CA connects, gets an ECDHE AEAD
        suite, no compression, and the HTTPS API answers over it."""
        tls = _handshake(srv, _context(srv, ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2))
        opened.append(tls)
        assert tls.version() == "TLSv1.2"
        name, _, _ = tls.cipher()  # type: ignore[misc]
        assert name.startswith(FORWARD_SECRET_KX), name
        assert "GCM" in name or "CHACHA20-POLY1305" in name, name
        assert tls.compression() is None
        assert _healthz_over(tls).startswith(b"HTTP/1.1 200")

    def test_tls13_handshake(self, srv: Server, opened: list[ssl.SSLSocket]) -> None:
        """A TLS 1.3-only client that verifies the CA connects and is served."""
        tls = _handshake(srv, _context(srv, ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3))
        opened.append(tls)
        assert tls.version() == "TLSv1.3"
        assert tls.compression() is None
        assert _healthz_over(tls).startswith(b"HTTP/1.1 200")

    def test_websocket_over_tls13(self, srv: Server, opened: list[ssl.SSLSocket]) -> None:
        """A ``wss://`` upgrade over TLS 1.3 (what browsers use) gets 101 with
        securepub.v1 and the welcome frame. Single-threaded on purpose: the
        other suites' ``websockets.sync`` client runs over TLS 1.2 (see
        ``Server.ws_ssl_context``)."""
        ticket = srv.ticket(user="tls13")
        tls = _handshake(srv, _context(srv, ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3))
        opened.append(tls)
        assert tls.version() == "TLSv1.3"
        key = base64.b64encode(os.urandom(16)).decode()
        tls.sendall(
            (
                f"GET /ws HTTP/1.1\r\nHost: {srv.host}:{srv.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Protocol: securepub.v1, ticket.{ticket}\r\n\r\n"
            ).encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = tls.recv(4096)
            assert chunk, data
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0].startswith("HTTP/1.1 101"), lines[0]
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])
        }
        assert headers["sec-websocket-protocol"] == "securepub.v1"
        accept = base64.b64encode(
            hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        ).decode()
        assert headers["sec-websocket-accept"] == accept
        while len(rest) < 2 or len(rest) < 2 + (rest[1] & 0x7F):
            chunk = tls.recv(4096)
            assert chunk, rest
            rest += chunk
        assert rest[0] == 0x81  # FIN + text, unmasked, short length
        welcome = json.loads(rest[2 : 2 + (rest[1] & 0x7F)])
        assert welcome["op"] == "welcome" and welcome["user"] == "tls13"

    @pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
    def test_certificate_verifies_for_name_and_address(
        self, srv: Server, opened: list[ssl.SSLSocket], hostname: str
    ) -> None:
        """The configured certificate is the one served: it verifies against the
        CA with hostname checking, by DNS name and by IP address."""
        tls = _handshake(srv, ssl.create_default_context(cafile=srv.ca_path), hostname)
        opened.append(tls)
        peer = tls.getpeercert()
        assert peer and peer.get("subjectAltName")

    def test_untrusted_client_refuses(self, srv: Server) -> None:
        """Sanity check of the test itself: without the test CA, verification fails,
        so the successful handshakes above really verified the server."""
        ctx = ssl.create_default_context()
        with pytest.raises(ssl.SSLCertVerificationError):
            _handshake(srv, ctx)


class TestRefused:
    @pytest.mark.parametrize(
        "version", [ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1], ids=["tls1.1", "tls1.0"]
    )
    def test_old_protocol_versions_refused(self, srv: Server, version: ssl.TLSVersion) -> None:
        """A client that only speaks TLS 1.1 (or 1.0), with every cipher allowed,
        is refused by the server with a protocol_version alert."""
        ctx = _context(srv, version, version)
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        with pytest.raises(ssl.SSLError) as info:
            _handshake(srv, ctx)
        # The refusal comes from the server (an alert), not from a client that
        # could not even offer the version.
        assert "ALERT_PROTOCOL_VERSION" in str(info.value) or "PROTOCOL_VERSION" in str(
            info.value.reason
        ), info.value

    @pytest.mark.parametrize(
        "suite",
        [
            "AES128-GCM-SHA256",  # static RSA key exchange: not forward secret
            "AES256-GCM-SHA384",  # same
            "ECDHE-RSA-AES128-SHA",  # forward secret but CBC, not AEAD
            "ECDHE-RSA-AES128-SHA256",  # same
            "aNULL:@SECLEVEL=0",  # anonymous: no certificate authentication
        ],
    )
    def test_weak_tls12_suites_refused(self, srv: Server, suite: str) -> None:
        """A TLS 1.2 client offering only a non-forward-secret, non-AEAD or
        anonymous suite gets a handshake failure (the server has an RSA
        certificate, so static-RSA suites would otherwise be possible)."""
        ctx = _context(srv, ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)
        ctx.set_ciphers(suite)
        with pytest.raises(ssl.SSLError) as info:
            _handshake(srv, ctx)
        assert "HANDSHAKE_FAILURE" in str(info.value) or "NO_SHARED_CIPHER" in str(info.value), (
            info.value
        )

    def test_plaintext_http_gets_no_http_answer(self, srv: Server) -> None:
        """Plain HTTP on the TLS port never gets an HTTP response: there is no
        plaintext listener, not even a redirect."""
        with socket.create_connection((srv.host, srv.port), timeout=5) as raw:
            raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            data = b""
            try:
                while len(data) < 65536:
                    chunk = raw.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except (ConnectionResetError, TimeoutError):
                pass
        assert b"HTTP/" not in data
        assert b"status" not in data
        # Whatever came back (if anything) is a TLS record, not text.
        assert data == b"" or data[0] in (0x15, 0x16), data[:20]

    def test_no_renegotiation(self, srv: Server) -> None:
        """A TLS 1.2 client asking to renegotiate does not get a second handshake:
        the server refuses (alert or closed connection)."""
        from OpenSSL import SSL

        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        ctx.load_verify_locations(srv.ca_path)
        ctx.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
        raw = socket.create_connection((srv.host, srv.port), timeout=5)
        raw.setblocking(False)
        conn = SSL.Connection(ctx, raw)
        conn.set_tlsext_host_name(b"localhost")
        conn.set_connect_state()
        deadline = time.monotonic() + 5

        def call(fn: Callable[[], T]) -> T:
            # Drive a non-blocking pyOpenSSL call to completion, bounded in time.
            while True:
                try:
                    return fn()
                except (SSL.WantReadError, SSL.WantWriteError):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError from None
                    select.select([raw], [raw], [], min(left, 0.05))

        try:
            call(conn.do_handshake)
            assert conn.total_renegotiations() == 0
            assert conn.renegotiate()
            renegotiated = False
            try:
                call(conn.do_handshake)
                # The server's answer (a no_renegotiation alert or a close)
                # arrives by the next read; a completed renegotiation would
                # let an HTTP exchange run after a second handshake.
                call(lambda: conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"))
                data = call(lambda: conn.recv(4096))
                renegotiated = conn.total_renegotiations() > 0 and data.startswith(b"HTTP/")
            except (SSL.Error, OSError):
                pass  # refused: OpenSSL reports the server's no_renegotiation alert
            assert not renegotiated
        finally:
            conn.close()
            raw.close()
