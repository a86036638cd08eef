"""twistd integration: the ``securepub`` options and the service they make."""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from securepub.core.errors import ConfigError


class Options(usage.Options):
    """Command-line options of ``twistd securepub`` (SPEC section 1).

    Values are checked when the service is made, all in one place with the
    TOML file, so a bad value gives one line naming it rather than twistd's
    whole usage text.
    """

    synopsis = "[--dev | --config PATH] [options]"
    optFlags = [
        [
            "reuse-port",
            None,
            "Share the port with other securepub processes on this host (SO_REUSEPORT; "
            "needs --redis).",
        ],
        [
            "dev",
            None,
            "Generate (once) development certificates and an API key under "
            "./certs and allow https://localhost:PORT origins.",
        ],
    ]
    optParameters = [
        ["config", None, None, "TOML configuration file."],
        ["port", None, None, "TLS port for the HTTPS API and wss:// (default 8443)."],
        ["interface", None, None, "Address to bind (default 127.0.0.1)."],
        ["cert", None, None, "PEM certificate chain."],
        ["key", None, None, "PEM private key."],
        ["client-ca", None, None, "CA whose client certificates may call the backend API."],
        ["api-key-file", None, None, "Backend API keys, one per line."],
        [
            "redis-ca",
            None,
            None,
            "CA of a rediss:// server's certificate (default: the system's CAs).",
        ],
        [
            "cluster-secret-file",
            None,
            None,
            "Secret shared by the cluster's nodes; messages through Redis are signed with it.",
        ],
        [
            "audit-log",
            None,
            None,
            "Write every security decision as one JSON line to this file (rotated by size).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["redis"] = None

    def opt_redis(self, url: str) -> None:
        """redis:// or rediss:// URL for a multi-node cluster; repeat it for several
        servers sharing the load."""
        if self["redis"] is None:
            self["redis"] = []
        self["redis"].append(url)


def _fail(message: str) -> None:
    sys.stderr.write(f"twistd securepub: error: {message}\n")
    raise SystemExit(1)


def makeService(options: Options | dict[str, Any], reactor: Any = None) -> IService:
    """Build the node; a bad configuration exits with one line on stderr."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    from twisted.logger import globalLogPublisher

    from securepub.dev.certs import describe, ensure_dev_certs
    from securepub.node import Node
    from securepub.ops.audit import AuditLogObserver
    from securepub.server.service import NodeService
    from securepub.server.settings import load_settings

    try:
        dev_paths = None
        certs = None
        if options.get("dev"):
            certs = ensure_dev_certs(os.path.join(os.getcwd(), "certs"))
            dev_paths = {"cert": certs.cert, "key": certs.key, "api_key_file": certs.api_key_file}
        settings = load_settings(options, dev_paths=dev_paths)
        node = Node(settings, reactor)
        if settings.audit_log is not None:
            try:
                audit = AuditLogObserver(settings.audit_log)
            except OSError as e:
                raise ConfigError(
                    f"audit_log: cannot open {settings.audit_log}: {e.strerror}"
                ) from None
            globalLogPublisher.addObserver(audit)
        if certs is not None:
            sys.stdout.write(describe(certs, port=settings.port) + "\n")
            sys.stdout.flush()
    except ConfigError as e:
        _fail(str(e))
        raise  # unreachable: _fail exits
    return NodeService(node)
