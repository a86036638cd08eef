"""Start and stop a real ``redis-server`` on a free port for integration tests.

Tests that need one call `require_redis()` first: without ``redis-server`` on
the PATH they skip, unless ``SECUREPUB_REQUIRE_REDIS=1`` (as in CI), where
they fail instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence

import pytest

from tests.server import free_port, session_ca

REDIS_SERVER = shutil.which("redis-server")


def require_redis() -> None:
    if REDIS_SERVER is None:
        message = "redis-server is not installed"
        if os.environ.get("SECUREPUB_REQUIRE_REDIS") == "1":
            pytest.fail(message + " (SECUREPUB_REQUIRE_REDIS=1)")
        pytest.skip(message)


class RedisServer:
    """One ``redis-server`` process; `stop` and `start` again keep its port.

    With ``tls=True`` it serves TLS only, with a certificate for
    ``localhost`` signed by the test session's CA (`ca_path`).
    """

    def __init__(self, tls: bool = False, password: str | None = None) -> None:
        require_redis()
        self.port = free_port()
        self.tls = tls
        self.password = password
        self.directory = tempfile.mkdtemp(prefix="securepub-redis-")
        self.ca_path = os.path.join(self.directory, "ca.pem")
        self.proc: subprocess.Popen[bytes] | None = None
        if tls:
            ca = session_ca()
            cert = ca.issue_cert("localhost")
            ca.cert_pem.write_to_path(self.ca_path)
            cert.private_key_pem.write_to_path(os.path.join(self.directory, "key.pem"))
            cert.cert_chain_pems[0].write_to_path(os.path.join(self.directory, "cert.pem"))

    def url(self, db: int | None = None, password: str | None = None) -> str:
        scheme = "rediss" if self.tls else "redis"
        host = "localhost" if self.tls else "127.0.0.1"
        auth = f":{password}@" if password else ""
        path = f"/{db}" if db is not None else ""
        return f"{scheme}://{auth}{host}:{self.port}{path}"

    def args(self) -> Sequence[str]:
        assert REDIS_SERVER is not None
        args = [
            REDIS_SERVER,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self.directory,
        ]
        if self.tls:
            args += [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                os.path.join(self.directory, "cert.pem"),
                "--tls-key-file",
                os.path.join(self.directory, "key.pem"),
                "--tls-ca-cert-file",
                self.ca_path,
                "--tls-auth-clients",
                "no",
            ]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        return args

    def start(self) -> RedisServer:
        log = open(os.path.join(self.directory, "redis.log"), "ab")
        self.proc = subprocess.Popen(self.args(), stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def command(self, *args: str) -> str:
        """Run one command with redis-cli (plain TCP servers only)."""
        cli = shutil.which("redis-cli")
        assert cli is not None and not self.tls
        auth = ["-a", self.password, "--no-auth-warning"] if self.password else []
        out = subprocess.run(
            [cli, "-p", str(self.port), *auth, *args], capture_output=True, timeout=10, check=True
        )
        return out.stdout.decode().strip()
