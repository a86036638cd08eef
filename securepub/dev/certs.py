"""Development certificates: a throwaway CA, a localhost certificate and an API key."""

from __future__ import annotations

import contextlib
import datetime
import errno
import ipaddress
import os
import secrets
import shlex
from dataclasses import dataclass, replace

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from securepub.core.errors import ConfigError

__all__ = ["DevCerts", "describe", "ensure_dev_certs"]

CA_FILE = "ca.pem"
CERT_FILE = "server.pem"
KEY_FILE = "server.key"
API_KEY_FILE = "api-key"
_FILES = (CA_FILE, CERT_FILE, KEY_FILE, API_KEY_FILE)
# Only the key and the API key are secret; the certificates are meant to be
# handed to clients, so they keep the umask's usual readability.
_PRIVATE = frozenset({KEY_FILE, API_KEY_FILE})

CA_COMMON_NAME = "securepub development CA"
_CA_LIFETIME = datetime.timedelta(days=3650)
# Apple platforms reject TLS server certificates valid for more than 825
# days, even under a user-installed root; stay a day inside that.
_LEAF_LIFETIME = datetime.timedelta(days=824)
# Tolerate a client clock a little behind ours.
_BACKDATE = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class DevCerts:
    """Where the development files are; every path is absolute."""

    directory: str
    ca: str
    cert: str
    key: str
    api_key_file: str
    created: bool


def ensure_dev_certs(directory: str, *, now: datetime.datetime | None = None) -> DevCerts:
    """Return the development files in ``directory``, generating them on first use.

    An existing complete set is reused untouched, so a CA the developer has
    already trusted stays valid across restarts. A partial set is an error
    rather than something to repair: regenerating would silently replace a
    CA someone may have installed, or a key someone may be using.
    """
    root = os.path.abspath(directory)
    paths = {name: os.path.join(root, name) for name in _FILES}
    certs = DevCerts(
        directory=root,
        ca=paths[CA_FILE],
        cert=paths[CERT_FILE],
        key=paths[KEY_FILE],
        api_key_file=paths[API_KEY_FILE],
        created=False,
    )
    present = [name for name in _FILES if os.path.lexists(paths[name])]
    if len(present) == len(_FILES):
        return certs
    if present:
        raise _incomplete(root, present)
    _make_directory(root)
    when = now if now is not None else datetime.datetime.now(datetime.UTC)
    _install(root, _generate(when))
    return replace(certs, created=True)


def describe(certs: DevCerts, *, port: int = 8443) -> str:
    """Tell a developer where the files are and how to make clients trust them.

    Paths only: the API key's value is never printed, so this text is safe
    to log or paste into a bug report.
    """
    ca = shlex.quote(certs.ca)
    status = "generated" if certs.created else "reused"
    return "\n".join(
        [
            f"securepub development certificates ({status}) in {certs.directory}:",
            f"  CA certificate (trust this):   {certs.ca}",
            f"  server certificate and chain:  {certs.cert}",
            f"  server private key (0600):     {certs.key}",
            f"  backend API key (0600):        {certs.api_key_file}",
            "The CA's private key was discarded after signing: nothing can issue further",
            "certificates from this folder. For development only; never use these in production.",
            "",
            "To trust the CA and use the API key from a shell:",
            f"  export SECUREPUB_CA={ca}",
            f"  export SECUREPUB_API_KEY=$(cat {shlex.quote(certs.api_key_file)})",
            f"  curl --cacert {ca} https://localhost:{port}/healthz",
        ]
    )


def _incomplete(root: str, present: list[str]) -> ConfigError:
    missing = [name for name in _FILES if name not in present]
    return ConfigError(
        f"incomplete development certificates in {root}: found {', '.join(present)}, "
        f"missing {', '.join(missing)}; remove them or choose another directory"
    )


def _make_directory(root: str) -> None:
    """Create the directory private to its owner; an existing one is left as it is."""
    if os.path.lexists(root) and not os.path.isdir(root):
        raise ConfigError(f"development certificate directory {root} exists and is not a folder")
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"cannot create development certificate directory {root}: {e.strerror}"
        ) from None


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _generate(now: datetime.datetime) -> dict[str, bytes]:
    """Mint a CA, a localhost certificate it signs, and an API key.

    The CA's private key lives only in this function's frame and is never
    serialised: once the server certificate is signed it is dropped, so a
    copied or leaked dev folder cannot be used to mint certificates for
    other names that browsers trusting this CA would accept.
    """
    not_before = now - _BACKDATE

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(CA_COMMON_NAME))
        .issuer_name(_name(CA_COMMON_NAME))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + _CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + _LEAF_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    del ca_key  # explicit: the CA key goes no further than this line

    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    return {
        CA_FILE: ca_pem,
        CERT_FILE: server_cert.public_bytes(serialization.Encoding.PEM) + ca_pem,
        KEY_FILE: server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        API_KEY_FILE: (secrets.token_urlsafe(32) + "\n").encode("ascii"),
    }


def _write_new(path: str, data: bytes, *, private: bool) -> None:
    """Create ``path`` (never an existing file), write ``data`` and sync it.

    A private file gets mode 0600 from open() itself, rather than from a
    chmod afterwards: that is what keeps it from being readable by others
    even for an instant. The fchmod only undoes a umask stricter than 0600
    (the owner must be able to read it back). Public files follow the umask.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, 0o600 if private else 0o644)
    try:
        if private:
            os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _place(tmp: str, final: str) -> None:
    """Move a finished temp file to its final name, refusing to replace anything there.

    A hard link fails if the name exists, unlike rename(), which would
    silently overwrite a file another process created meanwhile. File
    systems without hard links fall back to an existence check and rename.
    """
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
        if os.path.lexists(final):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), final) from None
        os.rename(tmp, final)
    else:
        os.unlink(tmp)


def _fsync_directory(root: str) -> None:
    """Make the new names durable; best effort where directories cannot be opened."""
    try:
        fd = os.open(root, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _install(root: str, files: dict[str, bytes]) -> None:
    """Write every file under a temp name first, then move them all into place.

    All content is on disk before the first final name appears, and a
    failure while placing removes the names already placed: an interrupted
    run leaves no half set behind (short of a crash between two renames,
    which the next start reports as an incomplete set instead of using it).
    """
    temps: dict[str, str] = {}
    placed: list[str] = []
    try:
        for name, data in files.items():
            tmp = os.path.join(root, f".{name}.{secrets.token_hex(8)}.tmp")
            _write_new(tmp, data, private=name in _PRIVATE)
            temps[name] = tmp
        for name, tmp in temps.items():
            final = os.path.join(root, name)
            _place(tmp, final)
            placed.append(final)
        _fsync_directory(root)
    except OSError as e:
        for final in placed:
            with contextlib.suppress(OSError):
                os.unlink(final)
        if isinstance(e, FileExistsError):
            raise ConfigError(
                f"development certificate files appeared in {root} while generating them; "
                "remove them or choose another directory"
            ) from None
        raise ConfigError(
            f"cannot write development certificates in {root}: {e.strerror or e}"
        ) from None
    finally:
        for tmp in temps.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)
