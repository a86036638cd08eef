"""History and recovery (SPEC section 8) on a real server over real TLS."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.server import Server, recv_json, request_json

CONFIG = {
    "topics": [
        {"pattern": "news.>", "history_size": 100, "history_ttl": 300},
        {"pattern": "chat.*", "client_publish": True},
    ]
}


@pytest.fixture
def srv() -> Iterator[Server]:
    server = Server(CONFIG)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def subscribe(conn: Any, topic: str, message_id: int = 1, **extra: Any) -> Any:
    return request_json(conn, {"op": "subscribe", "id": message_id, "topic": topic, **extra})


def messages(conn: Any, count: int) -> list[dict[str, Any]]:
    got = [recv_json(conn) for _ in range(count)]
    assert all(m["op"] == "message" for m in got), got
    return got


def test_reconnect_with_since_gets_exactly_the_missed_then_live(srv: Server) -> None:
    """Disconnect, publish, reconnect with a new ticket and since: missed ones, then live."""
    conn = srv.session(subscribe=["news.>"])
    ok = subscribe(conn, "news.sports")
    assert (ok["op"], ok["offset"]) == ("ok", 0)
    epoch = ok["epoch"]
    first = srv.api("POST", "/v1/publish", {"topic": "news.sports", "data": {"n": 1}})[2]
    assert (first["offset"], first["epoch"]) == (1, epoch)
    [live] = messages(conn, 1)
    assert (live["offset"], live["epoch"], live["id"]) == (1, epoch, first["id"])
    conn.close()
    missed = [srv.publish("news.sports", {"n": n}) for n in (2, 3, 4)]
    again = srv.session(subscribe=["news.>"])
    since = {"offset": live["offset"], "epoch": epoch}
    ok = subscribe(again, "news.sports", 7, since=since)
    assert ok == {"op": "ok", "id": 7, "recovered": True, "offset": 4, "epoch": epoch}
    recovered = messages(again, 3)
    assert [m["offset"] for m in recovered] == [2, 3, 4]
    assert [m["id"] for m in recovered] == missed
    assert [m["data"]["n"] for m in recovered] == [2, 3, 4]
    srv.publish("news.sports", {"n": 5})
    [after] = messages(again, 1)
    assert after["offset"] == 5
    again.close()


def test_restart_changes_the_epoch_and_recovery_fails(srv: Server) -> None:
    """The embedded engine keeps nothing over a restart: recovered false, no old message."""
    conn = srv.session(subscribe=["news.>"])
    ok = subscribe(conn, "news.a")
    srv.publish("news.a", 1)
    [seen] = messages(conn, 1)
    conn.close()
    srv.stop()
    srv.start()
    srv.publish("news.a", 2)
    again = srv.session(subscribe=["news.>"])
    answer = subscribe(again, "news.a", 2, since={"offset": seen["offset"], "epoch": ok["epoch"]})
    assert answer["recovered"] is False
    assert answer["epoch"] != ok["epoch"] and answer["offset"] == 1
    srv.publish("news.a", 3)
    [live] = messages(again, 1)
    assert live["offset"] == 2 and live["data"] == 3
    again.close()


def test_since_on_a_pattern_or_plain_topic_is_bad_request(srv: Server) -> None:
    """since on a pattern, or on a topic without history, is bad_request."""
    conn = srv.session(subscribe=["news.>", "chat.*"])
    since = {"offset": 0, "epoch": "x"}
    for n, topic in enumerate(("news.*", "news.>", "chat.room")):
        answer = subscribe(conn, topic, n, since=since)
        assert (answer["op"], answer["code"], answer["id"]) == ("error", "bad_request", n)
    conn.close()


def test_recovery_without_the_grant_is_forbidden_and_sends_no_history(srv: Server) -> None:
    """A ticket that does not grant the topic gets forbidden, not its history."""
    srv.publish("news.secret", {"n": 1})
    conn = srv.session(subscribe=["chat.*"])
    answer = subscribe(conn, "news.secret", 1, since={"offset": 0, "epoch": "x"})
    assert (answer["op"], answer["code"]) == ("error", "forbidden")
    with pytest.raises(TimeoutError):
        conn.recv(timeout=0.5)
    conn.close()


def test_history_api_over_tls(srv: Server) -> None:
    """GET /v1/history answers the position and the message objects as delivered."""
    ids = [srv.publish("news.api", {"n": n}) for n in range(3)]
    status, _, page = srv.api("GET", "/v1/history?topic=news.api&since=1", key=srv.api_key)
    assert status == 200, page
    if isinstance(page, bytes):
        page = json.loads(page)
    assert page["offset"] == 3
    assert [m["id"] for m in page["messages"]] == ids[1:]
    assert [m["offset"] for m in page["messages"]] == [2, 3]
    status, _, _ = srv.api("GET", "/v1/history?topic=news.api")
    assert status == 401
    status, _, answer = srv.api("GET", "/v1/history?topic=chat.room", key=srv.api_key)
    assert (status, answer["error"]) == (400, "bad_request")
