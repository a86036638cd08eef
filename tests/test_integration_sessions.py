"""Session lifetimes, in-band refresh and presence on a real server over real TLS."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from tests.server import Server, recv_json, request_json, server_fixture

CONFIG = {
    "limits": {"min_session_seconds": 2, "max_session_seconds": 600, "max_errors": 100},
    "topics": [
        {"pattern": "room.*", "presence": True, "join_leave": True},
        {"pattern": "feed.>", "history_size": 1000},
    ],
}

srv = server_fixture(CONFIG)


def refresh(conn: Any, ticket: str, message_id: int = 7) -> Any:
    return request_json(conn, {"op": "refresh", "id": message_id, "ticket": ticket})


def test_session_expires_with_4003_after_its_notice(srv: Server) -> None:
    """A 4-second session gets expiring (a quarter before the end), then a 4003 close."""
    conn = srv.ws(srv.ticket(session_ttl=4))
    welcome = recv_json(conn)
    assert welcome["expires_at"] - time.time() == pytest.approx(4, abs=1)
    notice = recv_json(conn, timeout=5)
    assert notice == {"op": "expiring", "expires_at": welcome["expires_at"]}
    with pytest.raises(ConnectionClosed) as closed:
        recv_json(conn, timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4003


def test_refresh_refusals_are_forbidden(srv: Server) -> None:
    """A reused, expired, wrong-IP or other user's ticket is forbidden; the session stays."""
    conn = srv.session(user="alice", session_ttl=60, subscribe=["room.*"])
    used = srv.ticket(user="alice", subscribe=["room.*"])
    assert refresh(conn, used, 1)["op"] == "ok"
    expired = srv.ticket(user="alice", ttl=1)
    others = (srv.ticket(user="alice", client_ip="198.51.100.7"), srv.ticket(user="bob"))
    time.sleep(1.1)  # the only way a real ticket expires is for real time to pass
    # The expired one first: the embedded store forgets expired tickets as it works,
    # and a forgotten one would be logged as unknown.
    for n, ticket in enumerate((expired, used, *others), start=2):
        answer = refresh(conn, ticket, n)
        assert (answer["op"], answer["code"], answer["id"]) == ("error", "forbidden", n), answer
    assert request_json(conn, {"op": "subscribe", "id": 9, "topic": "room.1"})["op"] == "ok"
    conn.close()
    log = srv.wait_for_log(lambda text: text.count("session refresh refused") >= 4)
    for reason in ("ticket_already_redeemed", "ticket_expired", "ticket_wrong_ip", "other_user"):
        assert f"reason={reason}" in log
    for ticket in srv.tickets:
        assert ticket not in log


def test_a_refreshed_session_keeps_receiving_with_no_gap(srv: Server) -> None:
    """Messages published while a refresh happens all arrive, once, in order."""
    conn = srv.session(user="alice", subscribe=["feed.>"], session_ttl=60)
    assert request_json(conn, {"op": "subscribe", "id": 1, "topic": "feed.live"})["op"] == "ok"
    done = threading.Event()

    def publish() -> None:
        for n in range(200):
            srv.publish("feed.live", n)
        done.set()

    worker = threading.Thread(target=publish)
    worker.start()
    conn.send(json.dumps({"op": "refresh", "id": 2, "ticket": srv.ticket(subscribe=["feed.>"])}))
    got: list[int] = []
    answered = False
    while len(got) < 200:
        frame = recv_json(conn, timeout=10)
        if frame["op"] == "ok":
            answered = frame["id"] == 2 and frame["expires_at"] > time.time()
        else:
            assert frame["op"] == "message", frame
            got.append(frame["offset"])
    worker.join(30)
    assert answered and done.is_set()
    assert got == list(range(got[0], got[0] + 200))
    conn.close()


def test_presence_and_join_leave_on_one_node(srv: Server) -> None:
    """presence answers who is subscribed; join and leave reach the topic's subscribers."""
    watcher = srv.session(user="watcher", subscribe=["room.*"])
    assert request_json(watcher, {"op": "subscribe", "id": 1, "topic": "room.*"})["op"] == "ok"
    alice = srv.session(user="alice", subscribe=["room.*"])
    alice.send(json.dumps({"op": "subscribe", "id": 1, "topic": "room.9"}))
    assert recv_json(watcher) == {"op": "join", "topic": "room.9", "user": "alice"}
    answer = request_json(watcher, {"op": "presence", "id": 2, "topic": "room.9"})
    assert answer == {"op": "presence", "id": 2, "topic": "room.9", "users": {"alice": 1}}
    status, _, body = srv.api("GET", "/v1/presence?topic=room.9", key=srv.api_key)
    assert (status, body) == (200, {"users": {"alice": 1}})
    alice.close()
    assert recv_json(watcher) == {"op": "leave", "topic": "room.9", "user": "alice"}
    watcher.close()
