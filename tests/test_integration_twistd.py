"""``twistd securepub`` from the installed package: plugin discovery, ``--dev``,
start-up errors and the README's quick tour (SPEC section 1)."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from tests.server import (
    TWISTD,
    Server,
    server_env,
    session_ca,
    write_credentials,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBSCRIBE_EXAMPLE = os.path.join(REPO, "examples", "subscribe.py")
#: A bad configuration must be reported within this many seconds.
QUICK = 10.0


def run(args: list[str], cwd: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=cwd,
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _digests(directory: str) -> dict[str, tuple[str, float]]:
    found = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
            found[name] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime)
    return found


class TestInstalledPlugin:
    def test_help_lists_securepub(self, tmp_path: Any) -> None:
        """``twistd --help`` (from the venv's bin, in an unrelated folder) lists
        the securepub plugin, found through the installed dropin."""
        result = run([TWISTD, "--help"], cwd=str(tmp_path))
        assert result.returncode == 0, result.stderr
        assert "securepub" in result.stdout

    def test_plugin_help(self, tmp_path: Any) -> None:
        """``twistd securepub --help`` documents the SPEC's options."""
        result = run([TWISTD, "securepub", "--help"], cwd=str(tmp_path))
        assert result.returncode == 0, result.stderr
        for option in (
            "--config",
            "--port",
            "--interface",
            "--cert",
            "--key",
            "--api-key-file",
            "--dev",
        ):
            assert option in result.stdout, option

    def test_installed_package_is_the_one_used(self, tmp_path: Any) -> None:
        """Servers in these tests import securepub and the dropin from
        site-packages, not from this source tree."""
        code = (
            "import securepub, twisted.plugins.securepub_plugin as p; "
            "print(securepub.__file__); print(p.__file__)"
        )
        result = run([sys.executable, "-c", code], cwd=str(tmp_path))
        assert result.returncode == 0, result.stderr
        paths = result.stdout.split()
        assert len(paths) == 2
        # tox keeps its site-packages inside the checkout (.tox/), so compare
        # against the source tree's own package folders, not the whole checkout.
        source_dirs = [
            os.path.realpath(os.path.join(REPO, "securepub")) + os.sep,
            os.path.realpath(os.path.join(REPO, "twisted")) + os.sep,
        ]
        for path in paths:
            assert "site-packages" in path, path
            assert not any(os.path.realpath(path).startswith(d) for d in source_dirs), path


class TestDev:
    def test_dev_generates_then_reuses_certificates(self, tmp_path: Any) -> None:
        """``--dev`` writes certs/ (key and API key 0600), prints where the CA is,
        serves /healthz verifiable against certs/ca.pem and allows the
        ``https://localhost:PORT`` origin; a second start reuses the same files."""
        directory = str(tmp_path)
        certs = os.path.join(directory, "certs")
        with Server(dev=True, directory=directory) as first:
            assert first.ca_path == os.path.join(certs, "ca.pem")
            assert sorted(os.listdir(certs)) == ["api-key", "ca.pem", "server.key", "server.pem"]
            for secret in ("server.key", "api-key"):
                mode = stat.S_IMODE(os.stat(os.path.join(certs, secret)).st_mode)
                assert mode == 0o600, (secret, oct(mode))
            out = first.stdout_text()
            assert first.ca_path in out
            assert "generated" in out
            assert first.api_key not in out + first.log_text()
            status, _, body = first.api("GET", "/healthz")
            assert (status, body) == (200, {"status": "ok"})
            # The dev origins (and no others) are allowed.
            conn = first.ws(first.ticket(), origin=f"https://localhost:{first.port}")
            conn.close()
            with pytest.raises(InvalidStatus) as info:
                first.ws(first.ticket(), origin="https://localhost:1")
            assert info.value.response.status_code == 403
        before = _digests(certs)
        with Server(dev=True, directory=directory) as second:
            assert "reused" in second.stdout_text()
            assert second.ca_path in second.stdout_text()
            assert second.api("GET", "/healthz")[0] == 200
        assert _digests(certs) == before

    def test_dev_serves_localhost_name(self, tmp_path: Any) -> None:
        """The generated certificate verifies for ``localhost``, the README's URL."""
        import http.client
        import ssl

        with Server(dev=True, directory=str(tmp_path)) as server:
            ctx = ssl.create_default_context(cafile=server.ca_path)
            conn = http.client.HTTPSConnection("localhost", server.port, context=ctx, timeout=5)
            try:
                conn.request("GET", "/healthz")
                assert conn.getresponse().status == 200
            except ConnectionRefusedError:
                pytest.skip("localhost does not resolve to 127.0.0.1 here")
            finally:
                conn.close()


def _mismatched_key(directory: str) -> list[str]:
    paths = write_credentials(directory)
    other = session_ca().issue_cert("localhost")
    other.private_key_pem.write_to_path(paths["key"])
    return ["--cert", paths["cert"], "--key", paths["key"], "--api-key-file", paths["api_key_file"]]


def _empty_api_keys(directory: str) -> list[str]:
    paths = write_credentials(directory)
    with open(paths["api_key_file"], "w"):
        pass
    return ["--cert", paths["cert"], "--key", paths["key"], "--api-key-file", paths["api_key_file"]]


def _missing_cert(directory: str) -> list[str]:
    paths = write_credentials(directory)
    return [
        "--cert",
        os.path.join(directory, "missing.pem"),
        "--key",
        paths["key"],
        "--api-key-file",
        paths["api_key_file"],
    ]


def _not_a_cert(directory: str) -> list[str]:
    paths = write_credentials(directory)
    with open(paths["cert"], "w") as f:
        f.write("hello\n")
    return ["--cert", paths["cert"], "--key", paths["key"], "--api-key-file", paths["api_key_file"]]


def _toml(text: str) -> Any:
    def make(directory: str) -> list[str]:
        path = os.path.join(directory, "securepub.toml")
        with open(path, "w") as f:
            f.write(text)
        return ["--dev", "--config", path]

    return make


BAD_STARTS = {
    "port-not-a-number": (lambda d: ["--dev", "--port", "http"], "port"),
    "port-out-of-range": (lambda d: ["--dev", "--port", "70000"], "port"),
    "interface-not-an-address": (lambda d: ["--dev", "--interface", "example"], "interface"),
    "max-json-depth-zero": (_toml("[limits]\nmax_json_depth = 0\n"), "max_json_depth"),
    "unknown-limit": (_toml("[limits]\nmax_frobs = 1\n"), "max_frobs"),
    "unknown-key": (_toml("frobnicate = true\n"), "frobnicate"),
    "bad-origin-policy": (_toml('origin_policy = "maybe"\n'), "origin_policy"),
    "toml-syntax": (_toml("port = [\n"), "TOML"),
    "missing-schema": (_toml('[[topics]]\npattern = "chat.*"\nschema = "nope.json"\n'), "schema"),
    "key-not-matching-cert": (_mismatched_key, "does not match"),
    "empty-api-key-file": (_empty_api_keys, "api_key_file"),
    "missing-cert": (_missing_cert, "missing.pem"),
    "cert-not-pem": (_not_a_cert, "certificate"),
    "no-cert-no-dev": (lambda d: [], "cert"),
}


@pytest.mark.parametrize("case", sorted(BAD_STARTS))
def test_bad_configuration_stops_with_one_line(tmp_path: Any, case: str) -> None:
    """A bad option, config value, certificate, key or API key file makes
    ``twistd -n securepub`` exit non-zero quickly with exactly one line on
    stderr naming the problem, and no traceback anywhere."""
    make_args, needle = BAD_STARTS[case]
    args = [TWISTD, "-n", "securepub", *make_args(str(tmp_path))]
    started = time.monotonic()
    result = run(args, cwd=str(tmp_path))
    assert time.monotonic() - started < QUICK
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert "listening" not in result.stdout


def test_port_in_use_stops_with_one_line(tmp_path: Any) -> None:
    """A port that cannot be bound stops the start with one clear line on stderr
    naming the address, not a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = run([TWISTD, "-n", "securepub", "--dev", "--port", str(port)], cwd=str(tmp_path))
    assert time.monotonic() - started < QUICK
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and str(port) in lines[0], result.stderr


class LineReader:
    """Collects a subprocess's stdout lines on a thread, for bounded waits."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        assert proc.stdout is not None
        stream = proc.stdout
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))

    def next_json(self, timeout: float = 10) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no JSON line in {timeout}s; saw {self.seen}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(line)
            if line.startswith("{"):
                return json.loads(line)


@pytest.fixture
def dev_server(tmp_path: Any) -> Iterator[Server]:
    with Server(dev=True, directory=str(tmp_path)) as server:
        yield server


def test_readme_quick_tour(dev_server: Server) -> None:
    """The README's quick tour works as written: a ticket from the API,
    ``examples/subscribe.py TICKET 'news.*' wss://localhost:PORT/ws`` with
    SECUREPUB_CA prints welcome and ok, a backend publish is printed as a
    message line, and the same ticket presented again is refused with 403."""
    status, _, body = dev_server.api(
        "POST",
        "/v1/tickets",
        {"user": "alice", "client_ip": "127.0.0.1", "subscribe": ["news.*"]},
    )
    assert status == 201, body
    ticket = body["ticket"]
    env = server_env()
    env["SECUREPUB_CA"] = dev_server.ca_path
    proc = subprocess.Popen(
        [
            sys.executable,
            SUBSCRIBE_EXAMPLE,
            ticket,
            "news.*",
            f"wss://localhost:{dev_server.port}/ws",
        ],
        cwd=dev_server.directory,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        out = LineReader(proc)
        welcome = out.next_json()
        assert welcome["op"] == "welcome" and welcome["user"] == "alice", welcome
        assert out.next_json() == {"op": "ok", "id": 1}
        message_id = dev_server.publish("news.sports", {"headline": "hello"})
        message = out.next_json()
        assert message["op"] == "message", message
        assert message["topic"] == "news.sports"
        assert message["id"] == message_id
        assert message["data"] == {"headline": "hello"}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    with pytest.raises(InvalidStatus) as info:
        dev_server.ws(ticket)
    assert info.value.response.status_code == 403
    assert ticket not in dev_server.log_text()
