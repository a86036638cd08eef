"""The listener's TLS context: TLS 1.2+, forward-secret AEAD only, nothing negotiable."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from OpenSSL import SSL
from twisted.internet.interfaces import IAcceptableCiphers, IOpenSSLServerConnectionCreator
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from zope.interface import implementer

from securepub.core.errors import ConfigError

__all__ = ["server_context_factory"]

# TLS 1.2 suites: ephemeral ECDH key exchange (forward secrecy), a
# certificate-authenticated server (ECDSA or RSA: no anonymous or PSK
# suites) and an AEAD cipher (no CBC, whose MAC-then-encrypt construction
# gave us Lucky13 and friends). TLS 1.3 suites are all forward-secret AEAD
# and are configured separately by OpenSSL; its defaults are fine.
_TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
    ]
)

# The key types the TLS 1.2 suites above can authenticate with.
_ServerKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class _HardenedCertificateOptions(CertificateOptions):
    """CertificateOptions that also refuses renegotiation and pins the protocol floor.

    Twisted already sets ``OP_NO_COMPRESSION`` and, for ``raiseMinimumTo``,
    the ``OP_NO_TLSv1``/``OP_NO_TLSv1_1`` flags, but not
    ``OP_NO_RENEGOTIATION``: a client-initiated renegotiation costs the
    server a full handshake per request (a cheap DoS) and has a history of
    injection bugs. The floor is also set with ``set_min_proto_version``
    because the ``OP_NO_*`` version flags are deprecated in OpenSSL.

    The certificate, chain and key are installed here rather than passed
    to Twisted, which wants pyOpenSSL ``X509``/``PKey`` objects that
    pyOpenSSL has deprecated in favour of ``cryptography`` ones.
    """

    def __init__(
        self,
        leaf: x509.Certificate,
        chain: Sequence[x509.Certificate],
        key: _ServerKey,
        client_ca: str | None = None,
    ) -> None:
        super().__init__(raiseMinimumTo=TLSVersion.TLSv1_2, acceptableCiphers=_acceptable_ciphers())
        self._leaf = leaf
        self._chain = tuple(chain)
        self._key = key
        self._client_ca = client_ca

    def _makeContext(self, skipCiphers: bool = False) -> SSL.Context:
        ctx = super()._makeContext(skipCiphers=skipCiphers)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_COMPRESSION | getattr(SSL, "OP_NO_RENEGOTIATION", 0))
        ctx.use_certificate(self._leaf)
        ctx.use_privatekey(self._key)
        for cert in self._chain:
            ctx.add_extra_chain_cert(cert)
        ctx.check_privatekey()
        if self._client_ca is not None:
            # Ask for a client certificate, never require one: browsers on /ws
            # have none. Only this CA is named in the request, so a browser
            # holding unrelated certificates has nothing to offer and is not
            # prompted; a certificate that is offered must verify or the
            # handshake fails, so one that is present has been verified.
            ctx.load_verify_locations(self._client_ca)
            ctx.load_client_ca(self._client_ca.encode())
            ctx.set_verify(SSL.VERIFY_PEER, None)
        return ctx


def _read(path: str, what: str) -> bytes:
    """Read a whole file, turning every I/O failure into one ConfigError line."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(f"cannot read {what} file {path}: {reason}") from None


def _load_chain(cert_path: str) -> list[x509.Certificate]:
    """Parse every certificate in a PEM file; the first one is the leaf."""
    data = _read(cert_path, "certificate")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(f"no PEM certificate found in certificate file {cert_path}")
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(f"cannot parse certificate file {cert_path}: malformed PEM") from None
    if not chain:  # pragma: no cover - cryptography raises instead
        raise ConfigError(f"no PEM certificate found in certificate file {cert_path}")
    return chain


def _load_key(key_path: str) -> _ServerKey:
    """Parse an unencrypted RSA or EC private key.

    The library's own error text is never passed on: messages must not be
    able to echo any part of the key file into a log.
    """
    data = _read(key_path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # cryptography raises TypeError when a password would be needed.
        raise ConfigError(
            f"private key file {key_path} is encrypted; the server needs an unencrypted key"
        ) from None
    except ValueError:
        raise ConfigError(
            f"cannot parse private key file {key_path}: not a PEM private key"
        ) from None
    except UnsupportedAlgorithm:
        raise ConfigError(
            f"private key file {key_path} holds an unsupported key type; use RSA or EC"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError(
            f"private key file {key_path} holds an unsupported key type; use RSA or EC"
        )
    return key


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    """DER SubjectPublicKeyInfo of a public key, the canonical form to compare."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _acceptable_ciphers() -> IAcceptableCiphers:
    """Our TLS 1.2 suites, intersected by Twisted with what this OpenSSL offers."""
    # Twisted ships this classmethod without annotations; adapting to the
    # interface gives mypy the type and checks the object at run time.
    return IAcceptableCiphers(AcceptableCiphers.fromOpenSSLCipherString(_TLS12_CIPHERS))


def server_context_factory(
    cert_path: str, key_path: str, client_ca: str | None = None
) -> CertificateOptions:
    """Build the listener's TLS options from a PEM chain and a PEM key.

    Everything is checked here, before the port opens, so a bad file stops
    the start with one line naming it instead of failing every handshake
    later. The whole chain is served because clients usually trust only
    the root, and a missing intermediate is the classic "works in my
    browser, fails in curl" outage.
    """
    chain = _load_chain(cert_path)
    key = _load_key(key_path)
    leaf = chain[0]
    if _spki(leaf.public_key()) != _spki(key.public_key()):
        raise ConfigError(f"key {key_path} does not match certificate {cert_path}")
    try:
        if client_ca is not None:
            _load_chain(client_ca)  # readable and holds certificates, or a ConfigError
        options = _HardenedCertificateOptions(leaf, chain[1:], key, client_ca)
        # Build the context now: a chain OpenSSL refuses should stop the
        # start here, not surface as a failure in the first handshake.
        options.getContext()
    except (ValueError, SSL.Error) as e:
        # Not reachable with the checks above short of an odd OpenSSL build;
        # still one line, and only the exception's type, never its text.
        raise ConfigError(
            f"cannot use certificate {cert_path} with key {key_path}: {type(e).__name__}"
        ) from None
    return options


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerTLS:
    """The listener's TLS settings, which a reload can swap for new ones.

    Each new connection takes the options current when it arrives; open
    connections keep the ones they were made with.
    """

    def __init__(self, options: CertificateOptions) -> None:
        self.current = options

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection: SSL.Connection = self.current.serverConnectionForTLS(tlsProtocol)
        return connection
