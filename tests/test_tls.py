"""Tests for securepub.server.tls: file checks in memory, protocol policy over real sockets."""

from __future__ import annotations

import os
import re
import select
import socket
import ssl
import time
import warnings
from collections.abc import Callable, Generator
from typing import Any

import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from OpenSSL import SSL
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, ContextFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from securepub.core.errors import ConfigError
from securepub.server.tls import server_context_factory
from tests.tmp import private_tmpdir

# Every blocking client call in a thread is bounded by this, so a server
# that stops answering fails the test instead of hanging the reactor's
# thread pool (and with it the end of the run).
_TIMEOUT = 10.0

_TLS12_SUITE = re.compile(r"^ECDHE-(ECDSA|RSA)-(AES(128|256)-GCM-SHA(256|384)|CHACHA20-POLY1305)$")
_TLS13_SUITES = {"TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256"}


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def _write_leaf(
    directory: str, name: str, leaf: trustme.LeafCert, *, chain: bool = True
) -> tuple[str, str]:
    """Write a trustme leaf as (cert file, key file); the cert file holds the chain."""
    pems = leaf.cert_chain_pems if chain else leaf.cert_chain_pems[:1]
    cert = _write(os.path.join(directory, name + ".pem"), b"".join(p.bytes() for p in pems))
    key = _write(os.path.join(directory, name + ".key"), leaf.private_key_pem.bytes())
    return cert, key


def _one_line(test: SynchronousTestCase, error: ConfigError) -> str:
    message = str(error)
    test.assertNotIn("\n", message)
    test.assertNotIn("PRIVATE KEY", message)
    return message


class ServerContextFactoryConfigTests(SynchronousTestCase):
    """Bad files stop the start with one line; good ones give a hardened context."""

    def setUp(self) -> None:
        self.dir = private_tmpdir(self)
        self.ca = trustme.CA(key_type=trustme.KeyType.RSA)
        leaf = self.ca.issue_cert("localhost", key_type=trustme.KeyType.RSA)
        self.key_pem = leaf.private_key_pem.bytes()
        self.cert, self.key = _write_leaf(self.dir, "server", leaf)

    def test_loads_rsa_chain(self) -> None:
        """A matching RSA certificate, with or without intermediates, and its key load."""
        self.assertIsInstance(server_context_factory(self.cert, self.key), CertificateOptions)
        inter = self.ca.create_child_ca(key_type=trustme.KeyType.RSA)
        cert, key = _write_leaf(self.dir, "chained", inter.issue_cert("localhost"))
        self.assertIsInstance(server_context_factory(cert, key), CertificateOptions)

    def test_loads_ec_key(self) -> None:
        """An ECDSA key (the dev certificates' kind) is accepted as well as RSA."""
        ec_leaf = trustme.CA().issue_cert("localhost", key_type=trustme.KeyType.ECDSA)
        cert, key = _write_leaf(self.dir, "ec", ec_leaf)
        self.assertIsInstance(server_context_factory(cert, key), CertificateOptions)

    def test_missing_cert_file(self) -> None:
        """A missing certificate file is named in the error."""
        missing = os.path.join(self.dir, "nope.pem")
        e = self.assertRaises(ConfigError, server_context_factory, missing, self.key)
        message = _one_line(self, e)
        self.assertIn(missing, message)
        self.assertIn("certificate", message)

    def test_missing_key_file(self) -> None:
        """A missing key file is named in the error."""
        missing = os.path.join(self.dir, "nope.key")
        e = self.assertRaises(ConfigError, server_context_factory, self.cert, missing)
        self.assertIn(missing, _one_line(self, e))

    def test_unreadable_file(self) -> None:
        """A path that cannot be read as a file (here a directory) is a ConfigError, not OSError."""
        e = self.assertRaises(ConfigError, server_context_factory, self.dir, self.key)
        self.assertIn(self.dir, _one_line(self, e))

    def test_garbage_cert_file(self) -> None:
        """A certificate file without any PEM certificate says so."""
        garbage = _write(os.path.join(self.dir, "garbage.pem"), b"hello, world\n")
        e = self.assertRaises(ConfigError, server_context_factory, garbage, self.key)
        message = _one_line(self, e)
        self.assertIn(garbage, message)
        self.assertIn("no PEM certificate", message)

    def test_key_given_as_cert(self) -> None:
        """Swapping --cert and --key is caught without echoing the key into the message."""
        e = self.assertRaises(ConfigError, server_context_factory, self.key, self.cert)
        message = _one_line(self, e)
        self.assertIn(self.key, message)
        self.assertNotIn(self.key_pem.decode().splitlines()[1], message)

    def test_malformed_cert_pem(self) -> None:
        """A CERTIFICATE block whose body is not a certificate is a ConfigError."""
        bad = _write(
            os.path.join(self.dir, "bad.pem"),
            b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        e = self.assertRaises(ConfigError, server_context_factory, bad, self.key)
        self.assertIn(bad, _one_line(self, e))

    def test_garbage_key_file(self) -> None:
        """An unparseable key file is named, and its content is not quoted."""
        body = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7"
        label = " ".join(("PRIVATE", "KEY"))
        garbage = _write(
            os.path.join(self.dir, "garbage.key"),
            # Armour built at run time: no private-key marker sits in the source.
            f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n".encode(),
        )
        e = self.assertRaises(ConfigError, server_context_factory, self.cert, garbage)
        message = _one_line(self, e)
        self.assertIn(garbage, message)
        self.assertNotIn(body[:16], message)

    def test_unsupported_key_type(self) -> None:
        """An Ed25519 key, which no allowed TLS 1.2 suite can use, is refused by type."""
        ed_key = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path = _write(os.path.join(self.dir, "ed25519.key"), ed_key)
        e = self.assertRaises(ConfigError, server_context_factory, self.cert, path)
        message = _one_line(self, e)
        self.assertIn(path, message)
        self.assertIn("unsupported key type", message)

    def test_encrypted_key(self) -> None:
        """A passphrase-protected key is refused with a message saying it is encrypted."""
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        encrypted = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"correct horse"),
        )
        path = _write(os.path.join(self.dir, "encrypted.key"), encrypted)
        e = self.assertRaises(ConfigError, server_context_factory, self.cert, path)
        message = _one_line(self, e)
        self.assertIn(path, message)
        self.assertIn("encrypted", message)

    def test_mismatched_key(self) -> None:
        """A key from another certificate is refused as 'key X does not match certificate Y'."""
        other = self.ca.issue_cert("localhost", key_type=trustme.KeyType.RSA)
        other_key = _write(os.path.join(self.dir, "other.key"), other.private_key_pem.bytes())
        e = self.assertRaises(ConfigError, server_context_factory, self.cert, other_key)
        self.assertEqual(
            _one_line(self, e), f"key {other_key} does not match certificate {self.cert}"
        )

    def test_context_options(self) -> None:
        """The context refuses SSLv3/TLS 1.0/1.1, compression and renegotiation."""
        ctx = server_context_factory(self.cert, self.key).getContext()
        options = ctx.set_options(0)  # returns the options now in force
        for flag in ("OP_NO_SSLv3", "OP_NO_TLSv1", "OP_NO_TLSv1_1", "OP_NO_COMPRESSION"):
            self.assertTrue(options & getattr(SSL, flag), flag)
        self.assertTrue(options & SSL.OP_NO_RENEGOTIATION)
        self.assertFalse(options & SSL.OP_NO_TLSv1_2)
        self.assertFalse(options & SSL.OP_NO_TLSv1_3)

    def test_cipher_suites(self) -> None:
        """Only forward-secret, certificate-authenticated AEAD suites are on offer."""
        ctx = server_context_factory(self.cert, self.key).getContext()
        suites = SSL.Connection(ctx).get_cipher_list()
        tls12 = [s for s in suites if s not in _TLS13_SUITES]
        self.assertTrue(tls12)
        for suite in tls12:
            self.assertRegex(suite, _TLS12_SUITE)
        self.assertTrue(any(s.startswith("ECDHE-RSA-") for s in tls12))
        self.assertTrue(any(s.startswith("ECDHE-ECDSA-") for s in tls12))


# --- Real sockets ----------------------------------------------------------


class _Echo(Protocol):
    """Echo, so a test can see application data cross the TLS session."""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class _PermissiveContextFactory(ContextFactory):
    """A deliberately weak server: the control proving a test client offers what it claims.

    Without it, a refusal test would also pass if the client were
    misconfigured and could talk to nobody.
    """

    def __init__(self, cert_path: str, key_path: str) -> None:
        self._cert_path = cert_path
        self._key_path = key_path

    def getContext(self) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_VERSION)
        ctx.set_cipher_list(b"ALL:@SECLEVEL=0")
        ctx.use_certificate_chain_file(self._cert_path)
        ctx.use_privatekey_file(self._key_path)
        return ctx


def _client_context(
    ca_path: str,
    minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
    maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
    ciphers: str | None = None,
) -> ssl.SSLContext:
    """A verifying stdlib client context; versions below 1.2 warn, which is the point."""
    ctx = ssl.create_default_context(cafile=ca_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = minimum
        ctx.maximum_version = maximum
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    return ctx


def _tls_echo(port: int, ctx: ssl.SSLContext) -> tuple[str | None, str, str | None]:
    """Handshake as 'localhost', echo a few bytes; return (version, suite, compression)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=_TIMEOUT) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"ping")
        received = b""
        while len(received) < 4:
            chunk = tls.recv(4 - len(received))
            if not chunk:
                break
            received += chunk
        if received != b"ping":
            raise AssertionError(f"echo returned {received!r}")
        cipher = tls.cipher()
        assert cipher is not None
        return tls.version(), cipher[0], tls.compression()


def _plaintext_get(port: int) -> tuple[bytes, bool]:
    """Send a plaintext HTTP request; return (bytes received, whether the server closed)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=_TIMEOUT) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        try:
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    return received, True
                received += chunk
        except ConnectionResetError:
            return received, True
        except TimeoutError:
            return received, False


def _wait_for(sock: socket.socket, call: Callable[[], Any], deadline: float) -> Any:
    """Drive a pyOpenSSL call on a non-blocking socket until done or the deadline."""
    while True:
        try:
            return call()
        except (SSL.WantReadError, SSL.WantWriteError) as e:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("TLS peer did not answer") from None
            reading = isinstance(e, SSL.WantReadError)
            select.select([sock] if reading else [], [] if reading else [sock], [], remaining)


def _renegotiate(port: int) -> int:
    """Handshake TLS 1.2, then ask for a renegotiation; return the renegotiation count."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    deadline = time.monotonic() + _TIMEOUT
    with socket.create_connection(("127.0.0.1", port), timeout=_TIMEOUT) as sock:
        sock.setblocking(False)
        conn = SSL.Connection(ctx, sock)
        conn.set_connect_state()
        _wait_for(sock, conn.do_handshake, deadline)
        _wait_for(sock, lambda: conn.send(b"x"), deadline)
        _wait_for(sock, lambda: conn.recv(1), deadline)
        conn.renegotiate()
        _wait_for(sock, conn.do_handshake, deadline)
        _wait_for(sock, lambda: conn.send(b"y"), deadline)
        _wait_for(sock, lambda: conn.recv(1), deadline)
        return int(conn.total_renegotiations())


class TLSListenerTests(TestCase):
    """Integration: a real reactor.listenSSL port on 127.0.0.1, stdlib clients in threads.

    The server's chain is root -> intermediate -> leaf (RSA, so the RSA-only
    suites of the control clients can be negotiated); clients trust the root.
    """

    def setUp(self) -> None:
        self.dir = private_tmpdir(self)
        self.root = trustme.CA(key_type=trustme.KeyType.RSA)
        self.intermediate = self.root.create_child_ca(key_type=trustme.KeyType.RSA)
        leaf = self.intermediate.issue_cert("localhost", "127.0.0.1", key_type=trustme.KeyType.RSA)
        self.ca_path = _write(os.path.join(self.dir, "root.pem"), self.root.cert_pem.bytes())
        self.cert, self.key = _write_leaf(self.dir, "server", leaf)
        self.leaf_only_cert, _ = _write_leaf(self.dir, "leaf-only", leaf, chain=False)
        self.options = server_context_factory(self.cert, self.key)

    def _listen(self, context_factory: Any) -> int:
        port = reactor.listenSSL(
            0, Factory.forProtocol(_Echo), context_factory, interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def _echo(self, port: int, ctx: ssl.SSLContext) -> Deferred[tuple[str | None, str, str | None]]:
        return threads.deferToThread(_tls_echo, port, ctx)

    @inlineCallbacks
    def _refused_but_control_accepts(
        self, ctx: ssl.SSLContext, expected_version: str
    ) -> Generator[Deferred[Any], Any, None]:
        """The client handshakes with a permissive server, and fails with ours."""
        control = self._listen(_PermissiveContextFactory(self.cert, self.key))
        version, _, _ = yield self._echo(control, ctx)
        self.assertEqual(version, expected_version)
        ours = self._listen(self.options)
        error = yield self.assertFailure(self._echo(ours, ctx), ssl.SSLError)
        self.assertNotIsInstance(error, ssl.SSLCertVerificationError)

    @inlineCallbacks
    def test_tls12_accepted(self) -> Generator[Deferred[Any], Any, None]:
        """A TLS 1.2 client gets an ECDHE AEAD suite, no compression, and data flows."""
        port = self._listen(self.options)
        ctx = _client_context(self.ca_path, maximum=ssl.TLSVersion.TLSv1_2)
        version, suite, compression = yield self._echo(port, ctx)
        self.assertEqual(version, "TLSv1.2")
        self.assertRegex(suite, _TLS12_SUITE)
        self.assertIsNone(compression)

    @inlineCallbacks
    def test_tls12_ecdsa_certificate(self) -> Generator[Deferred[Any], Any, None]:
        """With an ECDSA certificate (like the dev certs) TLS 1.2 uses an ECDHE-ECDSA suite."""
        ca = trustme.CA()
        cert, key = _write_leaf(self.dir, "ec", ca.issue_cert("localhost"))
        ca_path = _write(os.path.join(self.dir, "ec-ca.pem"), ca.cert_pem.bytes())
        port = self._listen(server_context_factory(cert, key))
        ctx = _client_context(ca_path, maximum=ssl.TLSVersion.TLSv1_2)
        version, suite, _ = yield self._echo(port, ctx)
        self.assertEqual(version, "TLSv1.2")
        self.assertTrue(suite.startswith("ECDHE-ECDSA-"), suite)

    @inlineCallbacks
    def test_tls13_accepted(self) -> Generator[Deferred[Any], Any, None]:
        """A TLS 1.3-only client connects, with no compression."""
        port = self._listen(self.options)
        ctx = _client_context(self.ca_path, minimum=ssl.TLSVersion.TLSv1_3)
        version, suite, compression = yield self._echo(port, ctx)
        self.assertEqual(version, "TLSv1.3")
        self.assertIn(suite, _TLS13_SUITES)
        self.assertIsNone(compression)

    def test_tls11_refused(self) -> Deferred[None]:
        """A client that can only speak TLS 1.1 (and does, to a weak server) is refused."""
        ctx = _client_context(
            self.ca_path,
            minimum=ssl.TLSVersion.TLSv1_1,
            maximum=ssl.TLSVersion.TLSv1_1,
            ciphers="DEFAULT:@SECLEVEL=0",
        )
        return self._refused_but_control_accepts(ctx, "TLSv1.1")

    def test_tls10_refused(self) -> Deferred[None]:
        """A client that can only speak TLS 1.0 is refused too."""
        ctx = _client_context(
            self.ca_path,
            minimum=ssl.TLSVersion.TLSv1,
            maximum=ssl.TLSVersion.TLSv1,
            ciphers="DEFAULT:@SECLEVEL=0",
        )
        return self._refused_but_control_accepts(ctx, "TLSv1")

    def test_non_forward_secret_suite_refused(self) -> Deferred[None]:
        """A TLS 1.2 client offering only static-RSA key exchange (no forward secrecy) fails."""
        ctx = _client_context(
            self.ca_path, maximum=ssl.TLSVersion.TLSv1_2, ciphers="AES128-GCM-SHA256"
        )
        return self._refused_but_control_accepts(ctx, "TLSv1.2")

    def test_cbc_suite_refused(self) -> Deferred[None]:
        """A TLS 1.2 client offering only a forward-secret CBC (non-AEAD) suite is refused."""
        ctx = _client_context(
            self.ca_path, maximum=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-RSA-AES128-SHA"
        )
        return self._refused_but_control_accepts(ctx, "TLSv1.2")

    @inlineCallbacks
    def test_plaintext_http_gets_no_answer(self) -> Generator[Deferred[Any], Any, None]:
        """Plain HTTP on the TLS port gets no HTTP response and the connection is closed."""
        port = self._listen(self.options)
        received, closed = yield threads.deferToThread(_plaintext_get, port)
        self.assertFalse(received.startswith(b"HTTP/"), received)
        self.assertTrue(closed)

    @inlineCallbacks
    def test_full_chain_served(self) -> Generator[Deferred[Any], Any, None]:
        """A client trusting only the root verifies, because the intermediate is sent.

        The control listener serves the leaf alone, and the same client
        fails verification there: the success is the chain's doing.
        """
        ctx = _client_context(self.ca_path)
        port = self._listen(self.options)
        version, _, _ = yield self._echo(port, ctx)
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        leaf_only = self._listen(server_context_factory(self.leaf_only_cert, self.key))
        yield self.assertFailure(self._echo(leaf_only, ctx), ssl.SSLCertVerificationError)

    @inlineCallbacks
    def test_renegotiation_refused(self) -> Generator[Deferred[Any], Any, None]:
        """A TLS 1.2 client asking to renegotiate gets an error, not a second handshake.

        OpenSSL 3 servers already refuse client-initiated renegotiation by
        default; this pins the behaviour, test_context_options pins our flag.
        """
        port = self._listen(self.options)
        yield self.assertFailure(threads.deferToThread(_renegotiate, port), SSL.Error)
