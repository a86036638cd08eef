"""Tests for securepub.dev.certs: the files --dev and `securepub certs` generate."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import re
import shutil
import ssl
import stat
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from twisted.trial.unittest import SynchronousTestCase

from securepub.core.errors import ConfigError
from securepub.dev import certs as devcerts
from securepub.dev.certs import DevCerts, describe, ensure_dev_certs
from securepub.server.tls import server_context_factory

_NAMES = ("api-key", "ca.pem", "server.key", "server.pem")
_NOW = datetime.datetime(2030, 6, 1, 12, 0, tzinfo=datetime.UTC)
_PEM_KEY = re.compile(
    rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S
)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _spki(key: ec.EllipticCurvePublicKey | object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _handshake(certs: DevCerts, server_hostname: str) -> str | None:
    """Run a stdlib TLS handshake in memory: server from the files, client trusting ca.pem."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.cert, certs.key)
    client_ctx = ssl.create_default_context(cafile=certs.ca)
    # Python 3.13's default; it demands the AKI/SKI and critical constraints.
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client_done = server_done = False
    for _ in range(10):
        for side, done in ((client, client_done), (server, server_done)):
            if done:
                continue
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            else:
                if side is client:
                    client_done = True
                else:
                    server_done = True
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if client_done and server_done:
            return client.version()
    raise AssertionError("handshake did not finish")


class EnsureDevCertsTests(SynchronousTestCase):
    """First call generates a complete, private, verifiable set; later calls reuse it."""

    def setUp(self) -> None:
        parent = tempfile.mkdtemp(prefix="securepub-devcerts-")
        self.addCleanup(shutil.rmtree, parent, ignore_errors=True)
        self.dir = os.path.join(parent, "certs")

    def _certs(self) -> DevCerts:
        return ensure_dev_certs(self.dir, now=_NOW)

    def _chain(
        self, certs: DevCerts
    ) -> tuple[x509.Certificate, x509.Certificate, x509.Certificate]:
        ca = x509.load_pem_x509_certificate(_read(certs.ca))
        leaf, *rest = x509.load_pem_x509_certificates(_read(certs.cert))
        self.assertEqual(len(rest), 1)
        return ca, leaf, rest[0]

    def test_creates_four_files(self) -> None:
        """The four files appear, with absolute paths, and nothing else (no temp files left)."""
        certs = self._certs()
        self.assertTrue(certs.created)
        self.assertEqual(certs.directory, os.path.abspath(self.dir))
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(_NAMES))
        for path, name in (
            (certs.ca, "ca.pem"),
            (certs.cert, "server.pem"),
            (certs.key, "server.key"),
            (certs.api_key_file, "api-key"),
        ):
            self.assertEqual(path, os.path.join(certs.directory, name))

    def test_relative_directory_made_absolute(self) -> None:
        """A relative directory (as --dev uses, 'certs') is reported as an absolute path."""
        cwd = os.getcwd()
        os.makedirs(os.path.dirname(self.dir), exist_ok=True)
        os.chdir(os.path.dirname(self.dir))
        self.addCleanup(os.chdir, cwd)
        certs = ensure_dev_certs("certs", now=_NOW)
        self.assertTrue(os.path.isabs(certs.ca))
        self.assertEqual(certs.directory, os.path.realpath(self.dir))

    def test_private_modes(self) -> None:
        """The key and the API key are 0600 and a directory created here is 0700."""
        certs = self._certs()
        self.assertEqual(stat.S_IMODE(os.stat(certs.key).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(certs.api_key_file).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(certs.directory).st_mode), 0o700)

    def test_private_even_with_open_umask(self) -> None:
        """A permissive umask does not make the private files group/world readable."""
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        certs = self._certs()
        self.assertEqual(stat.S_IMODE(os.stat(certs.key).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(certs.api_key_file).st_mode), 0o600)

    def test_api_key_format(self) -> None:
        """The API key file is one newline-terminated base64url key of 32 random bytes."""
        certs = self._certs()
        content = _read(certs.api_key_file).decode("ascii")
        self.assertTrue(content.endswith("\n"))
        key = content[:-1]
        self.assertNotIn("\n", key)
        self.assertRegex(key, r"^[A-Za-z0-9_-]+$")
        self.assertEqual(len(base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))), 32)

    def test_api_keys_differ(self) -> None:
        """Two generated folders never share an API key."""
        first = self._certs()
        second = ensure_dev_certs(self.dir + "-2", now=_NOW)
        self.addCleanup(shutil.rmtree, second.directory, ignore_errors=True)
        self.assertNotEqual(_read(first.api_key_file), _read(second.api_key_file))

    def test_second_call_reuses(self) -> None:
        """A second call returns created=False and leaves every file byte-identical."""
        first = self._certs()
        before = {name: _read(os.path.join(self.dir, name)) for name in _NAMES}
        inodes = {name: os.stat(os.path.join(self.dir, name)).st_ino for name in _NAMES}
        second = ensure_dev_certs(self.dir)
        self.assertFalse(second.created)
        self.assertEqual(second.ca, first.ca)
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(_NAMES))
        for name in _NAMES:
            path = os.path.join(self.dir, name)
            self.assertEqual(_read(path), before[name], name)
            self.assertEqual(os.stat(path).st_ino, inodes[name], name)

    def test_partial_set_refused(self) -> None:
        """With only some files present, ConfigError names found and missing, touching nothing."""
        self._certs()
        os.unlink(os.path.join(self.dir, "server.key"))
        os.unlink(os.path.join(self.dir, "api-key"))
        ca_before = _read(os.path.join(self.dir, "ca.pem"))
        e = self.assertRaises(ConfigError, ensure_dev_certs, self.dir)
        message = str(e)
        self.assertNotIn("\n", message)
        self.assertIn("found ca.pem, server.pem", message)
        self.assertIn("missing server.key, api-key", message)
        self.assertIn("remove them or choose another directory", message)
        self.assertEqual(sorted(os.listdir(self.dir)), ["ca.pem", "server.pem"])
        self.assertEqual(_read(os.path.join(self.dir, "ca.pem")), ca_before)

    def test_one_stray_file_refused(self) -> None:
        """A lone api-key in an otherwise empty folder is not overwritten either."""
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "api-key"), "w") as f:
            f.write("mine\n")
        e = self.assertRaises(ConfigError, ensure_dev_certs, self.dir)
        self.assertIn("found api-key", str(e))
        self.assertEqual(_read(os.path.join(self.dir, "api-key")), b"mine\n")

    def test_directory_is_a_file(self) -> None:
        """A file where the folder should be is a one-line ConfigError."""
        os.makedirs(os.path.dirname(self.dir), exist_ok=True)
        with open(self.dir, "w") as f:
            f.write("")
        e = self.assertRaises(ConfigError, ensure_dev_certs, self.dir)
        self.assertIn(self.dir, str(e))

    def test_failure_while_placing_leaves_no_half_set(self) -> None:
        """If moving files into place fails midway, the placed ones and temp files are removed."""
        real_link = os.link
        calls: list[str] = []

        def failing_link(src: str, dst: str) -> None:
            calls.append(dst)
            if len(calls) == 3:
                raise OSError(28, "No space left on device")
            real_link(src, dst)

        self.patch(devcerts.os, "link", failing_link)
        e = self.assertRaises(ConfigError, self._certs)
        self.assertIn("No space left on device", str(e))
        self.assertEqual(len(calls), 3)
        self.assertEqual(os.listdir(self.dir), [])

    def test_ca_certificate(self) -> None:
        """The CA is a P-256 root that can sign end-entity certificates only, for ~10 years."""
        ca, _, _ = self._chain(self._certs())
        self.assertEqual(ca.subject, ca.issuer)
        self.assertEqual(
            ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,
            "securepub development CA",
        )
        self.assertIsInstance(ca.public_key(), ec.EllipticCurvePublicKey)
        self.assertEqual(ca.public_key().curve.name, "secp256r1")  # type: ignore[union-attr]
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(bc.critical)
        self.assertTrue(bc.value.ca)
        self.assertEqual(bc.value.path_length, 0)
        ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(ku.key_cert_sign)
        self.assertTrue(ku.crl_sign)
        self.assertFalse(ku.digital_signature)
        lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
        self.assertGreaterEqual(lifetime, datetime.timedelta(days=3649))
        self.assertLessEqual(lifetime, datetime.timedelta(days=3660))

    def test_server_certificate(self) -> None:
        """The leaf is a P-256 localhost/127.0.0.1/::1 serverAuth cert, valid now, <= 825 days."""
        ca, leaf, chained_ca = self._chain(self._certs())
        self.assertEqual(chained_ca, ca)
        self.assertEqual(leaf.issuer, ca.subject)
        self.assertEqual(
            leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "localhost"
        )
        self.assertIsInstance(leaf.public_key(), ec.EllipticCurvePublicKey)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(
            set(san.get_values_for_type(x509.IPAddress)),
            {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")},
        )
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(eku), [ExtendedKeyUsageOID.SERVER_AUTH])
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        self.assertFalse(bc.ca)
        ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self.assertEqual(ski, x509.SubjectKeyIdentifier.from_public_key(leaf.public_key()))  # type: ignore[arg-type]
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self.assertEqual(aki.key_identifier, ca_ski.digest)
        self.assertLessEqual(
            leaf.not_valid_after_utc - leaf.not_valid_before_utc, datetime.timedelta(days=825)
        )
        self.assertLess(leaf.not_valid_before_utc, _NOW)
        self.assertGreater(leaf.not_valid_after_utc, _NOW + datetime.timedelta(days=800))

    def test_chain_verifies_for_localhost_and_loopback(self) -> None:
        """server.pem verifies against ca.pem for localhost, 127.0.0.1 and ::1, not others."""
        ca, leaf, chained = self._chain(self._certs())
        store = Store([ca])
        for name in (
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ):
            verifier = PolicyBuilder().store(store).time(_NOW).build_server_verifier(name)
            self.assertEqual(verifier.verify(leaf, [chained])[0], leaf)
        other = (
            PolicyBuilder()
            .store(store)
            .time(_NOW)
            .build_server_verifier(x509.DNSName("example.com"))
        )
        self.assertRaises(VerificationError, other.verify, leaf, [chained])

    def test_real_handshake(self) -> None:
        """A stdlib client trusting only ca.pem completes a strict handshake by name and by IP."""
        certs = ensure_dev_certs(self.dir)  # real clock: the handshake checks validity now
        self.assertIn(_handshake(certs, "localhost"), ("TLSv1.2", "TLSv1.3"))
        self.assertIn(_handshake(certs, "127.0.0.1"), ("TLSv1.2", "TLSv1.3"))

    def test_usable_by_server(self) -> None:
        """The generated pair passes securepub.server.tls's checks, as `--dev` needs."""
        certs = self._certs()
        server_context_factory(certs.cert, certs.key)

    def test_ca_key_not_written(self) -> None:
        """The only private key on disk is the server's; the CA's exists nowhere in the folder."""
        certs = self._certs()
        ca, leaf, _ = self._chain(certs)
        keys = []
        for name in os.listdir(self.dir):
            for block in _PEM_KEY.findall(_read(os.path.join(self.dir, name))):
                key = serialization.load_pem_private_key(block, password=None)
                keys.append((name, _spki(key.public_key())))
        self.assertEqual(keys, [("server.key", _spki(leaf.public_key()))])
        self.assertNotIn(_spki(ca.public_key()), [spki for _, spki in keys])


class DescribeTests(SynchronousTestCase):
    """describe() tells where the files are and how to trust them, never a secret."""

    def setUp(self) -> None:
        parent = tempfile.mkdtemp(prefix="securepub devcerts ")  # a space, to test quoting
        self.addCleanup(shutil.rmtree, parent, ignore_errors=True)
        self.certs = ensure_dev_certs(os.path.join(parent, "certs"), now=_NOW)
        self.text = describe(self.certs)

    def test_names_the_files(self) -> None:
        """Every file's absolute path is in the text."""
        for path in (self.certs.ca, self.certs.cert, self.certs.key, self.certs.api_key_file):
            self.assertIn(path, self.text)

    def test_trust_instructions(self) -> None:
        """The text gives the export and curl lines, with paths quoted for the shell."""
        ca = f"'{self.certs.ca}'"
        self.assertIn(f"export SECUREPUB_CA={ca}", self.text)
        self.assertIn(f"curl --cacert {ca} https://localhost:8443/healthz", self.text)
        self.assertIn(f"export SECUREPUB_API_KEY=$(cat '{self.certs.api_key_file}')", self.text)

    def test_port(self) -> None:
        """A non-default port shows up in the curl line."""
        self.assertIn("https://localhost:9443/healthz", describe(self.certs, port=9443))

    def test_no_secrets(self) -> None:
        """No private key and not the API key's value appear in the text."""
        api_key = _read(self.certs.api_key_file).decode().strip()
        for text in (self.text, describe(ensure_dev_certs(self.certs.directory))):
            self.assertNotIn("PRIVATE KEY", text)
            self.assertNotIn(api_key, text)
            self.assertNotIn(api_key[:12], text)

    def test_says_created_or_reused(self) -> None:
        """The text says whether the files were just generated or already there."""
        self.assertIn("generated", self.text)
        self.assertIn("reused", describe(ensure_dev_certs(self.certs.directory)))
