"""``securepub presence``, ``--session-ttl`` and the refreshing ``securepub subscribe``
(SPEC sections 9 and 10), as the installed console script against a real server with
short sessions allowed (``min_session_seconds = 2``) and ``room.*`` tracking presence
with join/leave."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import pytest

from tests.server import Server, recv_json, request_json, server_fixture
from tests.test_cli import Subscribe, assert_one_line_error, cli_env, run

CONFIG = {
    "limits": {"min_session_seconds": 2, "max_session_seconds": 600},
    "topics": [
        {"pattern": "room.*", "presence": True, "join_leave": True},
        {"pattern": "feed.>", "history_size": 100},
    ],
}

srv = server_fixture(CONFIG)


@pytest.fixture
def subscribers() -> Iterator[list[Subscribe]]:
    """Subscribe processes started by a test, stopped after it."""
    started: list[Subscribe] = []
    yield started
    for process in started:
        process.stop()


def test_presence_prints_the_users_as_one_ascii_json_line(srv: Server) -> None:
    """``presence TOPIC`` prints {user: sessions} as one JSON line, non-ASCII escaped."""
    sessions = [srv.session(user=user, subscribe=["room.*"]) for user in ("zoë", "zoë", "bob")]
    try:
        for n, conn in enumerate(sessions):
            answer = request_json(conn, {"op": "subscribe", "id": n, "topic": "room.cli"})
            assert answer["op"] == "ok", answer
        result = run("presence", "room.cli", env=cli_env(srv))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"zoë": 2, "bob": 1}
        assert '"zo\\u00eb":2' in result.stdout
        assert result.stdout.isascii() and result.stdout.count("\n") == 1
        assert result.stderr == ""
    finally:
        for conn in sessions:
            conn.close()
    empty = run("presence", "room.nobody", env=cli_env(srv))
    assert (empty.returncode, empty.stdout) == (0, "{}\n")


@pytest.mark.parametrize(
    ("topic", "code"), [("feed.a", "bad_request"), ("room.*", "invalid_topic")]
)
def test_presence_refusals_are_one_line(srv: Server, topic: str, code: str) -> None:
    """A topic whose rule keeps no presence, or a pattern: exit 1, the server's code."""
    result = run("presence", topic, env=cli_env(srv))
    assert_one_line_error(result, 1, code, key=srv.api_key)
    assert result.stdout == ""


def test_ticket_session_ttl_bounds_the_session(srv: Server) -> None:
    """``ticket --session-ttl S``: the session it opens expires S seconds after the welcome;
    one outside the server's range is bad_request."""
    result = run("ticket", "--user", "u", "--session-ttl", "30", env=cli_env(srv))
    assert result.returncode == 0, result.stderr
    conn = srv.ws(json.loads(result.stdout)["ticket"])
    try:
        welcome = recv_json(conn)
        assert welcome["expires_at"] - time.time() == pytest.approx(30, abs=3)
    finally:
        conn.close()
    refused = run("ticket", "--user", "u", "--session-ttl", "601", env=cli_env(srv))
    assert_one_line_error(refused, 1, "bad_request", "session_ttl", key=srv.api_key)


def test_subscribe_refreshes_its_session_and_prints_join_and_leave(
    srv: Server, subscribers: list[Subscribe]
) -> None:
    """``subscribe --session-ttl 3`` refreshes in-band (a status line each time) without
    reconnecting, keeps printing messages, and prints join/leave frames as JSON lines."""
    sub = Subscribe(cli_env(srv), "room.hall", "--session-ttl", "3", "--user", "cli-refresh")
    subscribers.append(sub)
    sub.wait_status("subscribed to room.hall")
    srv.publish("room.hall", {"n": 1})
    # Its own arrival is announced to the topic's subscribers, itself included.
    first = [sub.line(), sub.line()]
    assert {"op": "join", "topic": "room.hall", "user": "cli-refresh"} in first
    assert [f["data"] for f in first if f["op"] == "message"] == [{"n": 1}]
    seen = sub.wait_status("session refreshed until ", timeout=8)
    assert "reconnecting" not in seen
    assert re.search(r"^securepub: session refreshed until \d\d:\d\d:\d\d$", seen, re.M), seen
    alice = srv.session(user="alice", subscribe=["room.*"])
    try:
        assert request_json(alice, {"op": "subscribe", "id": 1, "topic": "room.hall"})["op"] == "ok"
        assert sub.line() == {"op": "join", "topic": "room.hall", "user": "alice"}
    finally:
        alice.close()
    assert sub.line() == {"op": "leave", "topic": "room.hall", "user": "alice"}
    seen = sub.wait_status("session refreshed until ", timeout=8)
    assert "reconnecting" not in seen
    srv.publish("room.hall", {"n": 2})
    assert sub.line()["data"] == {"n": 2}
    assert len(srv.log_lines("session refresh accepted", "cli-refresh")) >= 2


def test_subscribe_quiet_refreshes_silently(srv: Server, subscribers: list[Subscribe]) -> None:
    """With --quiet the refreshes happen (the server logs them) but print nothing."""
    sub = Subscribe(
        cli_env(srv), "feed.quiet", "--session-ttl", "2", "--user", "cli-quiet", "--quiet"
    )
    subscribers.append(sub)
    srv.wait_for_log(
        lambda text: any(
            "session refresh accepted" in line and "cli-quiet" in line for line in text.splitlines()
        ),
        timeout=10,
    )
    srv.publish("feed.quiet", "after")
    assert sub.line()["data"] == "after"
    status, rest = sub.stop()
    assert status == 0
    assert sub.stderr_text + rest == ""


def test_subscribe_session_ttl_out_of_range_fails_with_the_servers_code(srv: Server) -> None:
    """A --session-ttl the server does not allow ends subscribe with bad_request."""
    result = run("subscribe", "feed.x", "--session-ttl", "1", env=cli_env(srv))
    assert_one_line_error(result, 1, "bad_request", "session_ttl", key=srv.api_key)
