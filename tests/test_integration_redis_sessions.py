"""Refresh and presence across nodes sharing a real redis-server (SPEC sections 9 and 10)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.redis_server import RedisServer
from tests.server import Server, recv_json, request_json
from tests.test_integration_redis import SECRET

CONFIG = {
    "limits": {"max_errors": 100},
    "topics": [{"pattern": "room.*", "presence": True, "join_leave": True}],
}


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


def node(redis: RedisServer) -> Server:
    args = ["--redis", redis.url(db=0), "--cluster-secret-file", "cluster-secret"]
    return Server(CONFIG, files=SECRET, extra_args=args)


@pytest.fixture(scope="module")
def nodes(redis: RedisServer) -> Iterator[tuple[Server, Server]]:
    a, b = node(redis), node(redis)
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        a.cleanup()
        b.cleanup()


def joined(conn: Any, topic: str) -> None:
    answer = request_json(conn, {"op": "subscribe", "id": 1, "topic": topic})
    assert answer["op"] == "ok", answer


def presence(conn: Any, topic: str) -> dict[str, int]:
    answer = request_json(conn, {"op": "presence", "id": 99, "topic": topic})
    assert answer["op"] == "presence", answer
    users: dict[str, int] = answer["users"]
    return users


def settles_to(conn: Any, topic: str, expected: dict[str, int], timeout: float = 10) -> None:
    """Presence reaches ``expected`` (a close is processed by the server a moment later)."""
    deadline = time.monotonic() + timeout
    while presence(conn, topic) != expected:
        assert time.monotonic() < deadline, presence(conn, topic)
        time.sleep(0.05)


def test_refresh_ticket_from_a_redeemed_on_b_once(nodes: tuple[Server, Server]) -> None:
    """A ticket issued through A refreshes a session on B, and only once."""
    a, b = nodes
    conn = b.session(user="alice", session_ttl=600)
    ticket = a.ticket(user="alice", session_ttl=900)
    first = request_json(conn, {"op": "refresh", "id": 1, "ticket": ticket})
    assert first["op"] == "ok" and first["expires_at"] > time.time() + 800
    again = request_json(conn, {"op": "refresh", "id": 2, "ticket": ticket})
    assert (again["op"], again["code"]) == ("error", "forbidden")
    conn.close()


def test_presence_counts_sessions_on_both_nodes_and_joins_once(
    nodes: tuple[Server, Server],
) -> None:
    """Alice's first session anywhere sends one join; her second (on the other node) none;
    presence counts both; the last one leaving sends one leave."""
    a, b = nodes
    watcher = a.session(user="watcher", subscribe=["room.*"])
    joined(watcher, "room.*")
    first = a.session(user="alice", subscribe=["room.*"])
    joined(first, "room.both")
    assert recv_json(watcher) == {"op": "join", "topic": "room.both", "user": "alice"}
    second = b.session(user="alice", subscribe=["room.*"])
    joined(second, "room.both")
    bob = b.session(user="bob", subscribe=["room.*"])
    joined(bob, "room.both")
    assert recv_json(watcher) == {"op": "join", "topic": "room.both", "user": "bob"}
    assert presence(watcher, "room.both") == {"alice": 2, "bob": 1}
    status, _, body = b.api("GET", "/v1/presence?topic=room.both", key=b.api_key)
    assert (status, body) == (200, {"users": {"alice": 2, "bob": 1}})
    first.close()
    settles_to(watcher, "room.both", {"alice": 1, "bob": 1})
    second.close()
    assert recv_json(watcher) == {"op": "leave", "topic": "room.both", "user": "alice"}
    for conn in (bob, watcher):
        conn.close()


def test_a_killed_node_leaves_presence_within_30_seconds(
    nodes: tuple[Server, Server], redis: RedisServer
) -> None:
    """SIGKILL a node: its users vanish from presence and their leave is sent within 30 s."""
    a, _ = nodes
    doomed = node(redis).start()
    try:
        watcher = a.session(user="watcher", subscribe=["room.*"])
        joined(watcher, "room.*")
        victim = doomed.session(user="carol", subscribe=["room.*"])
        joined(victim, "room.kill")
        assert recv_json(watcher) == {"op": "join", "topic": "room.kill", "user": "carol"}
        assert presence(watcher, "room.kill") == {"carol": 1}
        assert doomed.proc is not None
        killed_at = time.monotonic()
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait(10)
        leave = recv_json(watcher, timeout=30)
        assert leave == {"op": "leave", "topic": "room.kill", "user": "carol"}
        assert time.monotonic() - killed_at < 30
        assert presence(watcher, "room.kill") == {}
        watcher.close()
    finally:
        doomed.cleanup()
