"""The ``securepub`` command, run as the installed console script against real servers.

Every error path checks the contract of the command line: one line on
stderr, a non-zero exit, no traceback, and never the API key.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

import pytest
import trustme

from tests.server import Server, free_port, recv_json, request_json, server_fixture

SECUREPUB = os.path.join(os.path.dirname(sys.executable), "securepub")

srv = server_fixture(dev=True)


def cli_env(server: Server | None = None, **overrides: str | None) -> dict[str, str]:
    """The environment of a command: ours without SECUREPUB_*, then the server's, then overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECUREPUB_")}
    env.pop("PYTHONPATH", None)
    if server is not None:
        env["SECUREPUB_URL"] = server.url
        env["SECUREPUB_API_KEY"] = server.api_key
        env["SECUREPUB_CA"] = server.ca_path
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run(
    *args: str, env: dict[str, str], stdin: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SECUREPUB, *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], status: int = 1, *needles: str, key: str = ""
) -> None:
    """A failed command: the exit status, one stderr line naming the problem, no traceback."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("securepub"), lines[0]
    assert "error:" in lines[0]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if key:
        assert key not in result.stderr and key not in result.stdout


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A CA that did not sign the server's certificate."""
    path = tmp_path_factory.mktemp("other-ca") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


class Subscribe:
    """A ``securepub subscribe`` subprocess; threads collect its stdout and stderr lines."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [SECUREPUB, "subscribe", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: queue.Queue[str | None] = queue.Queue()
        self.err: queue.Queue[str | None] = queue.Queue()
        self.stdout_text = ""
        self.stderr_text = ""
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _pump(stream: IO[str] | None, lines: queue.Queue[str | None]) -> None:
        assert stream is not None
        for line in stream:
            lines.put(line)
        lines.put(None)

    def line(self, timeout: float = 10) -> Any:
        """The next stdout line, parsed; fails after ``timeout`` seconds."""
        try:
            text = self.out.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line in {timeout}s; stderr: {self.stderr_text!r}") from None
        assert text is not None, ("stdout closed", self.stderr_text)
        self.stdout_text += text
        return json.loads(text)

    def wait_status(self, needle: str, timeout: float = 10) -> str:
        """Read stderr lines until one contains ``needle``; return what was read."""
        seen = ""
        deadline = time.monotonic() + timeout
        while needle not in seen:
            try:
                line = self.err.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {needle!r} on stderr in {timeout}s: {seen!r}") from None
            if line is None:
                raise AssertionError(f"stderr closed before {needle!r}: {seen!r}")
            seen += line
            self.stderr_text += line
        return seen

    def stop(self) -> tuple[int, str]:
        """Interrupt it (SIGINT) if still running; return its status and remaining stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for thread in self._threads:
            thread.join(5)
        rest = ""
        while True:
            try:
                line = self.err.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                rest += line
        return self.proc.returncode, rest


@pytest.fixture
def subscriber() -> Iterator[list[Subscribe]]:
    """Subscribe processes started by a test, stopped after it."""
    started: list[Subscribe] = []
    yield started
    for process in started:
        process.stop()


# -- help and usage ------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [[], ["certs"], ["ticket"], ["publish"], ["subscribe"], ["history"], ["presence"]],
)
def test_every_command_has_help(command: list[str]) -> None:
    """``--help`` works on the command and on every subcommand, naming the environment."""
    result = run(*command, "--help", env=cli_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: securepub")
    if command and command != ["certs"]:
        for name in ("SECUREPUB_URL", "SECUREPUB_API_KEY", "SECUREPUB_CA", "--url", "--ca"):
            assert name in result.stdout, name


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "required"),
        (["nope"], "invalid choice"),
        (["ticket"], "--user"),
        (["ticket", "--user", "u", "--ttl", "0"], "1 to 300"),
        (["ticket", "--user", "u", "--ttl", "x"], "not an integer"),
        (["publish", "demo.x"], "JSON"),
        (["subscribe"], "PATTERN"),
        (["subscribe", "a.b", "--count", "0"], "at least 1"),
        (["history"], "TOPIC"),
        (["history", "demo.a", "--limit", "0"], "1 to 1000"),
        (["history", "demo.a", "--limit", "1001"], "1 to 1000"),
        (["history", "demo.a", "--since", "-1"], "from 0"),
        (["history", "demo.a", "--since", "x"], "not an integer"),
        (["presence"], "TOPIC"),
        (["ticket", "--user", "u", "--session-ttl", "0"], "1 to 86400"),
        (["subscribe", "a.b", "--session-ttl", "x"], "not an integer"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str], needle: str) -> None:
    """A command line that does not parse: exit 2, one line naming the problem, no usage dump."""
    result = run(*args, env=cli_env())
    assert_one_line_error(result, 2, needle)


def test_certs_still_writes_the_development_files(tmp_path: Any) -> None:
    """``securepub certs`` generates ca.pem, server.pem, server.key and api-key once."""
    result = run("certs", "--certs-dir", str(tmp_path / "c"), env=cli_env())
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "c")) == ["api-key", "ca.pem", "server.key", "server.pem"]
    assert "generated" in result.stdout
    again = run("certs", "--certs-dir", str(tmp_path / "c"), env=cli_env())
    assert again.returncode == 0 and "reused" in again.stdout


# -- ticket ---------------------------------------------------------------------


def test_ticket_prints_the_ticket_json(srv: Server) -> None:
    """``ticket`` prints the server's JSON; the ticket carries the requested user and grants."""
    result = run(
        "ticket",
        "--user",
        "alice",
        "--client-ip",
        "127.0.0.1",
        "--subscribe",
        "news.*",
        "chat.>",
        "--publish",
        "chat.room1",
        "--ttl",
        "20",
        env=cli_env(srv),
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert set(answer) == {"ticket", "expires_at"}
    assert result.stdout.count("\n") == 1
    conn = srv.ws(answer["ticket"])
    try:
        assert recv_json(conn)["user"] == "alice"
        assert request_json(conn, {"op": "subscribe", "id": 1, "topic": "chat.x.y"})["op"] == "ok"
        refused = request_json(conn, {"op": "subscribe", "id": 2, "topic": "sports.x"})
        assert refused["code"] == "forbidden"
    finally:
        conn.close()


def test_ticket_refusals_carry_the_servers_code(srv: Server) -> None:
    """A pattern or address the server refuses: exit 1, the server's code on one line."""
    bad_pattern = run("ticket", "--user", "u", "--subscribe", "a..b", env=cli_env(srv))
    assert_one_line_error(bad_pattern, 1, "invalid_topic", key=srv.api_key)
    bad_ip = run("ticket", "--user", "u", "--client-ip", "nowhere", env=cli_env(srv))
    assert_one_line_error(bad_ip, 1, "bad_request", key=srv.api_key)


# -- publish ---------------------------------------------------------------------


def test_publish_prints_the_id_and_the_message_arrives(srv: Server) -> None:
    """``publish TOPIC JSON`` prints the message id; a subscriber gets exactly that data."""
    conn = srv.session(subscribe=["cli.>"])
    try:
        assert request_json(conn, {"op": "subscribe", "id": 1, "topic": "cli.>"})["op"] == "ok"
        result = run("publish", "cli.one", '{"text": "hi", "n": [1, 2]}', env=cli_env(srv))
        assert result.returncode == 0, result.stderr
        frame = recv_json(conn)
        assert frame["id"] == result.stdout.strip()
        assert frame["data"] == {"text": "hi", "n": [1, 2]}
    finally:
        conn.close()


def test_publish_from_stdin_sends_one_message_per_line(srv: Server) -> None:
    """With ``-`` each non-empty stdin line is a message, in order, each id printed."""
    conn = srv.session(subscribe=["cli.>"])
    try:
        assert request_json(conn, {"op": "subscribe", "id": 1, "topic": "cli.>"})["op"] == "ok"
        lines = '{"n": 1}\n\n"two"\n[3]\n   \n{"n": 4}'
        result = run("publish", "cli.lines", "-", env=cli_env(srv), stdin=lines)
        assert result.returncode == 0, result.stderr
        ids = result.stdout.split()
        assert len(ids) == 4 and len(set(ids)) == 4
        frames = [recv_json(conn) for _ in range(4)]
        assert [f["data"] for f in frames] == [{"n": 1}, "two", [3], {"n": 4}]
        assert [f["id"] for f in frames] == ids
    finally:
        conn.close()


def test_publish_from_stdin_stops_at_the_first_bad_line(srv: Server) -> None:
    """Lines before a bad one are published; the error names the line's number."""
    result = run("publish", "cli.lines", "-", env=cli_env(srv), stdin='{"n": 1}\n{oops\n{"n": 3}\n')
    assert_one_line_error(result, 2, "line 2")
    assert len(result.stdout.split()) == 1
    refused = run(
        "publish", "cli.lines", "-", env=cli_env(srv), stdin='1\n"' + "x" * 66_000 + '"\n'
    )
    assert_one_line_error(refused, 1, "line 2", "invalid_payload")


@pytest.mark.parametrize(
    ("args", "status", "needles"),
    [
        (["publish", "bad topic", "1"], 1, ["invalid_topic"]),
        (["publish", "cli.x.>", "1"], 1, ["invalid_topic"]),
        (["publish", "cli.x", "{nope"], 2, ["JSON argument"]),
        (["publish", "cli.x", "NaN"], 2, ["JSON argument"]),
        (["publish", "cli.x", '{"a": 1, "a": 2}'], 2, ["duplicate"]),
        (["publish", "cli.x", "[" * 40 + "]" * 40], 1, ["invalid_payload"]),
    ],
)
def test_publish_errors(srv: Server, args: list[str], status: int, needles: list[str]) -> None:
    """Refused or malformed publishes: one line with the reason, non-zero exit."""
    result = run(*args, env=cli_env(srv))
    assert_one_line_error(result, status, *needles, key=srv.api_key)
    assert result.stdout == ""


def test_a_missing_api_key_is_named(srv: Server) -> None:
    """Without SECUREPUB_API_KEY the command says which variable to set."""
    for args in (["publish", "cli.x", "1"], ["ticket", "--user", "u"], ["subscribe", "cli.x"]):
        result = run(*args, env=cli_env(srv, SECUREPUB_API_KEY=None))
        assert_one_line_error(result, 2, "SECUREPUB_API_KEY")


def test_a_wrong_api_key_is_unauthorized_and_not_printed(srv: Server) -> None:
    """A wrong key: ``unauthorized``, and the key appears nowhere in the output."""
    key = "not-the-key-0123456789abcdefghij"
    for args in (["publish", "cli.x", "1"], ["ticket", "--user", "u"], ["subscribe", "cli.x"]):
        result = run(*args, env=cli_env(srv, SECUREPUB_API_KEY=key))
        assert_one_line_error(result, 1, "unauthorized", key=key)


def test_an_untrusted_ca_fails_verification(srv: Server, other_ca: str) -> None:
    """SECUREPUB_CA naming another CA: every command fails verification, nothing is sent."""
    for args in (["publish", "cli.x", "1"], ["ticket", "--user", "u"], ["subscribe", "cli.x"]):
        result = run(*args, env=cli_env(srv, SECUREPUB_CA=other_ca))
        assert_one_line_error(result, 1, "not trusted", key=srv.api_key)


def test_without_securepub_ca_the_system_store_does_not_trust_the_dev_ca(srv: Server) -> None:
    """No SECUREPUB_CA means the system's trust store, which refuses the dev certificate."""
    result = run("publish", "cli.x", "1", env=cli_env(srv, SECUREPUB_CA=None))
    assert_one_line_error(result, 1, "not trusted")


def test_the_url_and_ca_options_override_the_environment(srv: Server, other_ca: str) -> None:
    """``--url`` and ``--ca`` win over SECUREPUB_URL and SECUREPUB_CA."""
    env = cli_env(srv, SECUREPUB_URL="https://127.0.0.1:1", SECUREPUB_CA=other_ca)
    result = run("publish", "--url", srv.url, "--ca", srv.ca_path, "cli.x", "1", env=env)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("url", "needle"),
    [("http://127.0.0.1:8443", "https://"), ("https://u:p@localhost", "credentials")],
)
def test_bad_urls_are_refused(srv: Server, url: str, needle: str) -> None:
    """A plaintext or credential-bearing URL is refused before connecting."""
    result = run("publish", "cli.x", "1", env=cli_env(srv, SECUREPUB_URL=url))
    assert_one_line_error(result, 1, needle)


def test_missing_ca_file_is_named(srv: Server, tmp_path: Any) -> None:
    """A SECUREPUB_CA that does not exist is reported with its path."""
    missing = str(tmp_path / "missing.pem")
    result = run("publish", "cli.x", "1", env=cli_env(srv, SECUREPUB_CA=missing))
    assert_one_line_error(result, 1, "missing.pem")


def test_no_server_is_connection_refused_after_retries(srv: Server) -> None:
    """A closed port is retried briefly with backoff, then reported as refused."""
    url = f"https://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run("publish", "cli.x", "1", env=cli_env(srv, SECUREPUB_URL=url))
    assert_one_line_error(result, 1, "connection refused")
    assert 0.3 < time.monotonic() - started < 10


# -- subscribe ---------------------------------------------------------------------


def test_subscribe_prints_each_message_as_one_json_line(
    srv: Server, subscriber: list[Subscribe]
) -> None:
    """Messages on any of the patterns arrive as single JSON lines; --count ends it with 0."""
    sub = Subscribe(cli_env(srv), "cli.sub.*", "other.>", "--count", "3")
    subscriber.append(sub)
    sub.wait_status("subscribed to cli.sub.* other.>")
    ids = [
        run("publish", topic, data, env=cli_env(srv)).stdout.strip()
        for topic, data in [
            ("cli.sub.a", '{"text": "<b>hé</b>\\u001b[31m"}'),
            ("nothere.x", "0"),
            ("other.x.y", "[1, 2]"),
            ("cli.sub.b", "null"),
        ]
    ]
    frames = [sub.line() for _ in range(3)]
    assert [f["topic"] for f in frames] == ["cli.sub.a", "other.x.y", "cli.sub.b"]
    assert [f["id"] for f in frames] == [ids[0], ids[2], ids[3]]
    assert frames[0]["data"] == {"text": "<b>hé</b>\x1b[31m"}
    assert frames[2]["data"] is None
    assert sub.proc.wait(10) == 0


def test_subscribe_output_is_ascii_so_data_cannot_steer_a_terminal(
    srv: Server, subscriber: list[Subscribe]
) -> None:
    """Escape and C1 control characters in data are printed as JSON escapes, never raw."""
    sub = Subscribe(cli_env(srv), "cli.term", "--count", "1")
    subscriber.append(sub)
    sub.wait_status("subscribed")
    run("publish", "cli.term", '"\\u001b]0;x\\u0007\\u009b2J\\u202e"', env=cli_env(srv))
    assert sub.line()["data"] == "\x1b]0;x\x07\x9b2J\u202e"
    assert sub.stdout_text.isascii() and "\x1b" not in sub.stdout_text
    assert sub.proc.wait(10) == 0


def test_subscribe_reconnects_with_a_fresh_ticket_and_resubscribes(
    subscriber: list[Subscribe],
) -> None:
    """After the server goes away and comes back, subscribe gets a new ticket and resubscribes."""
    server = Server(dev=True).start()
    restarted: Server | None = None
    try:
        sub = Subscribe(cli_env(server), "cli.re.>")
        subscriber.append(sub)
        sub.wait_status("subscribed")
        run("publish", "cli.re.a", "1", env=cli_env(server))
        assert sub.line()["data"] == 1
        server.stop()
        sub.wait_status("reconnecting")
        restarted = Server(dev=True, directory=server.directory, port=server.port).start()
        sub.wait_status("subscribed", timeout=40)
        run("publish", "cli.re.b", "2", env=cli_env(restarted))
        assert sub.line()["data"] == 2
        # The restarted server knows no earlier ticket: the connection used a new one.
        assert restarted.log_lines("handshake accepted")
    finally:
        if restarted is not None:
            restarted.stop()
        server.cleanup()


def test_subscribe_waits_for_a_server_that_is_not_up_yet(subscriber: list[Subscribe]) -> None:
    """Started before the server, subscribe retries with backoff until it can subscribe."""
    server = Server(dev=True).start()  # makes the dev credentials
    server.stop()
    try:
        sub = Subscribe(cli_env(server), "cli.late")
        subscriber.append(sub)
        sub.wait_status("reconnecting")
        assert sub.proc.poll() is None
        server.start()
        sub.wait_status("subscribed", timeout=40)
        run("publish", "cli.late", '"ok"', env=cli_env(server))
        assert sub.line()["data"] == "ok"
    finally:
        server.cleanup()


def test_subscribe_refusals_end_with_one_line(srv: Server) -> None:
    """A pattern the server refuses ends subscribe at once with its code."""
    result = run("subscribe", "cli..x", env=cli_env(srv))
    assert_one_line_error(result, 1, "invalid_topic", key=srv.api_key)


def test_subscribe_stops_quietly_on_ctrl_c(srv: Server) -> None:
    """SIGINT ends subscribe with status 0 and no traceback."""
    sub = Subscribe(cli_env(srv), "cli.int")
    sub.wait_status("subscribed")
    status, rest = sub.stop()
    assert status == 0
    assert "Traceback" not in rest
