"""``securepub history`` and the recovery of ``securepub subscribe`` (SPEC section 8),
as the installed console script against real ``--dev`` servers (``demo.>`` keeps
100 messages of history)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.server import Server, server_fixture
from tests.test_cli import Subscribe, assert_one_line_error, cli_env, run

srv = server_fixture(dev=True)


@pytest.fixture
def subscribers() -> Iterator[list[Subscribe]]:
    """Subscribe processes started by a test, stopped after it."""
    started: list[Subscribe] = []
    yield started
    for process in started:
        process.stop()


def publish(server: Server, topic: str, data: object) -> dict[str, object]:
    """Publish through the API (milliseconds, unlike starting the command); the answer."""
    status, _, answer = server.api("POST", "/v1/publish", {"topic": topic, "data": data})
    assert status == 202, (status, answer)
    assert isinstance(answer, dict)
    return answer


def test_history_prints_each_message_as_one_json_line(srv: Server) -> None:
    """``history TOPIC`` prints the messages oldest first as subscribe prints them (ASCII
    JSON lines) and the count and position on one stderr line."""
    answers = [publish(srv, "demo.cli.hist", data) for data in ({"n": 1}, "\x1b[31mé", [3])]
    result = run("history", "demo.cli.hist", env=cli_env(srv))
    assert result.returncode == 0, result.stderr
    assert result.stdout.isascii() and "\x1b" not in result.stdout
    lines = result.stdout.splitlines()
    frames = [json.loads(line) for line in lines]
    assert [f["data"] for f in frames] == [{"n": 1}, "\x1b[31mé", [3]]
    assert [f["id"] for f in frames] == [a["id"] for a in answers]
    assert [f["offset"] for f in frames] == [1, 2, 3]
    assert all(f["op"] == "message" and f["topic"] == "demo.cli.hist" for f in frames)
    assert lines[0] == json.dumps(frames[0], separators=(",", ":"), ensure_ascii=True)
    epoch = answers[0]["epoch"]
    assert result.stderr == (
        f"securepub: demo.cli.hist: 3 messages after offset 0; "
        f"the topic is at offset 3, epoch {epoch}\n"
    )


def test_history_since_limit_and_quiet(srv: Server) -> None:
    """--since skips what was read, --limit cuts the page and the status line says how to
    go on; --quiet leaves stderr empty."""
    for n in range(1, 6):
        publish(srv, "demo.cli.page", n)
    page = run("history", "demo.cli.page", "--since", "1", "--limit", "2", env=cli_env(srv))
    assert page.returncode == 0, page.stderr
    assert [json.loads(line)["data"] for line in page.stdout.splitlines()] == [2, 3]
    assert page.stderr.endswith(
        "the topic is at offset 5, epoch "
        + _epoch(srv, "demo.cli.page")
        + "; more with --since 3\n"
    )
    rest = run("history", "demo.cli.page", "--since", "3", "--quiet", env=cli_env(srv))
    assert rest.returncode == 0 and rest.stderr == ""
    assert [json.loads(line)["data"] for line in rest.stdout.splitlines()] == [4, 5]
    empty = run("history", "demo.cli.never", env=cli_env(srv))
    assert empty.returncode == 0 and empty.stdout == ""
    assert "demo.cli.never: 0 messages after offset 0; the topic is at offset 0" in empty.stderr


def _epoch(server: Server, topic: str) -> str:
    status, _, answer = server.api("GET", f"/v1/history?topic={topic}&limit=1", key=server.api_key)
    assert status == 200, answer
    epoch: str = answer["epoch"]
    return epoch


@pytest.mark.parametrize(
    ("topic", "code"),
    [("plain.topic", "bad_request"), ("demo.>", "invalid_topic"), ("bad topic", "invalid_topic")],
)
def test_history_refusals_are_one_line(srv: Server, topic: str, code: str) -> None:
    """A topic without history or not a topic: exit 1, the server's code, nothing on stdout."""
    result = run("history", topic, env=cli_env(srv))
    assert_one_line_error(result, 1, code, key=srv.api_key)
    assert result.stdout == ""


def test_history_with_a_wrong_key_is_unauthorized(srv: Server) -> None:
    """The API key is sent, and a wrong one is never printed."""
    key = "not-the-key-0123456789abcdefghij"
    result = run("history", "demo.cli.hist", env=cli_env(srv, SECUREPUB_API_KEY=key))
    assert_one_line_error(result, 1, "unauthorized", key=key)


def test_subscribe_catches_up_after_the_server_cuts_its_connection(
    srv: Server, subscribers: list[Subscribe]
) -> None:
    """The README's tour: /v1/disconnect for user securepub-cli (tickets kept) closes the
    subscriber; what is published while it reconnects is printed after it resubscribes
    since its last offset, each message once, in order, then live ones."""
    sub = Subscribe(cli_env(srv), "demo.cli.tour")
    subscribers.append(sub)
    sub.wait_status("subscribed to demo.cli.tour")
    publish(srv, "demo.cli.tour", "before")
    assert sub.line()["data"] == "before"
    status, _, answer = srv.api(
        "POST", "/v1/disconnect", {"user": "securepub-cli", "revoke_tickets": False}
    )
    assert (status, answer) == (202, {"user": "securepub-cli", "revoked_tickets": 0})
    sub.wait_status("connection closed (code 4001); reconnecting")
    for n in (1, 2, 3):  # the reconnect waits at least 0.25 s
        publish(srv, "demo.cli.tour", f"away {n}")
    seen = sub.wait_status("subscribed to demo.cli.tour", timeout=20)
    assert "demo.cli.tour: recovered, 3 missed messages follow" in seen
    publish(srv, "demo.cli.tour", "after")
    frames = [sub.line() for _ in range(4)]
    assert [f["data"] for f in frames] == ["away 1", "away 2", "away 3", "after"]
    assert [f["offset"] for f in frames] == [2, 3, 4, 5]


def test_subscribe_reports_a_resume_that_could_not_be_recovered(
    subscribers: list[Subscribe],
) -> None:
    """After a restart (a new epoch) the resume is not recovered: a status line says so and
    to refetch, and the messages published after it are printed."""
    server = Server(dev=True).start()
    restarted: Server | None = None
    try:
        sub = Subscribe(cli_env(server), "demo.cli.epoch")
        subscribers.append(sub)
        sub.wait_status("subscribed")
        publish(server, "demo.cli.epoch", 1)
        old = sub.line()
        server.stop()
        sub.wait_status("reconnecting")
        restarted = Server(dev=True, directory=server.directory, port=server.port).start()
        seen = sub.wait_status("subscribed to demo.cli.epoch", timeout=40)
        assert (
            "securepub: demo.cli.epoch: not recovered "
            "(the server lost the topic's history: new epoch): refetch" in seen
        )
        publish(restarted, "demo.cli.epoch", 2)
        new = sub.line()
        assert new["data"] == 2 and new["offset"] == 1 and new["epoch"] != old["epoch"]
    finally:
        if restarted is not None:
            restarted.stop()
        server.cleanup()
