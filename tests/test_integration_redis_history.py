"""History and recovery across nodes sharing a real redis-server (SPEC section 8)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.redis_server import RedisServer
from tests.server import Server, recv_json, request_json
from tests.test_integration_redis import SECRET, health, wait_for

CONFIG = {"topics": [{"pattern": "news.>", "history_size": 2000, "history_ttl": 600}]}


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def nodes(redis: RedisServer) -> Iterator[tuple[Server, Server]]:
    args = ["--redis", redis.url(db=0), "--cluster-secret-file", "cluster-secret"]
    a = Server(CONFIG, files=SECRET, extra_args=args)
    b = Server(CONFIG, files=SECRET, extra_args=args)
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        a.cleanup()
        b.cleanup()


def subscribe(conn: Any, topic: str, message_id: int = 1, **extra: Any) -> Any:
    return request_json(conn, {"op": "subscribe", "id": message_id, "topic": topic, **extra})


def test_two_nodes_publishing_concurrently_number_without_gaps(
    nodes: tuple[Server, Server],
) -> None:
    """1,000 publishes racing through A and B get offsets 1..1000, each once, in one
    epoch; a subscriber on each node receives all of them in offset order."""
    a, b = nodes
    watchers = [node.session(subscribe=["news.>"]) for node in (a, b)]
    epochs = {subscribe(conn, "news.race")["epoch"] for conn in watchers}
    assert len(epochs) == 1
    answers: list[dict[str, Any]] = []
    lock = threading.Lock()

    def publish_through(node: Server, count: int) -> None:
        conn = node.connection(timeout=10)
        headers = {"Authorization": f"Bearer {node.api_key}", "Content-Type": "application/json"}
        try:
            for n in range(count):
                body = json.dumps({"topic": "news.race", "data": n})
                conn.request("POST", "/v1/publish", body=body, headers=headers)
                response = conn.getresponse()
                answer = json.loads(response.read())
                assert response.status == 202, answer
                with lock:
                    answers.append(answer)
        finally:
            conn.close()

    threads = [threading.Thread(target=publish_through, args=(node, 250)) for node in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(answer["offset"] for answer in answers) == list(range(1, 1001))
    assert {answer["epoch"] for answer in answers} == epochs
    for conn in watchers:
        got = [recv_json(conn, timeout=10) for _ in range(1000)]
        assert [m["offset"] for m in got] == list(range(1, 1001))
        conn.close()


def test_recovering_on_b_after_publishes_on_a(nodes: tuple[Server, Server]) -> None:
    """A subscriber leaves A, messages are published on A, it resumes on B: exactly those."""
    a, b = nodes
    conn = a.session(subscribe=["news.>"])
    ok = subscribe(conn, "news.moves")
    conn.close()
    missed = [a.publish("news.moves", {"n": n}) for n in range(5)]
    again = b.session(subscribe=["news.>"])
    answer = subscribe(again, "news.moves", 2, since={"offset": ok["offset"], "epoch": ok["epoch"]})
    assert answer["recovered"] is True and answer["offset"] == ok["offset"] + 5
    got = [recv_json(again) for _ in missed]
    assert [m["id"] for m in got] == missed
    assert [m["offset"] for m in got] == list(range(ok["offset"] + 1, ok["offset"] + 6))
    live = a.publish("news.moves", "live")
    message = recv_json(again)
    assert (message["id"], message["offset"]) == (live, ok["offset"] + 6)
    again.close()


def test_a_forged_history_entry_reaches_no_browser(
    nodes: tuple[Server, Server], redis: RedisServer
) -> None:
    """An entry written straight into a topic's stream (and its offset counted) is dropped:
    the recovery over it fails rather than replaying it, and the history API leaves it out."""
    a, b = nodes
    conn = a.session(subscribe=["news.>"])
    ok = subscribe(conn, "news.forge")
    conn.close()
    a.publish("news.forge", "real")
    meta = "securepub:history-meta:{news.forge}"
    stream = "securepub:history:{news.forge}"
    offset = redis.command("HINCRBY", meta, "s", "1")
    now = repr(time.time())
    forged = f'2\n{"0" * 64}\nnews.forge\nevil-1\n{now}\n"forged"'
    redis.command("XADD", stream, f"{offset}-1", "m", forged)
    again = b.session(subscribe=["news.>"])
    answer = subscribe(again, "news.forge", 2, since={"offset": ok["offset"], "epoch": ok["epoch"]})
    assert answer["recovered"] is False
    with pytest.raises(TimeoutError):
        again.recv(timeout=0.5)
    status, _, page = b.api("GET", "/v1/history?topic=news.forge", key=b.api_key)
    assert status == 200
    assert [m["data"] for m in page["messages"]] == ["real"]
    b.wait_for_log(lambda text: "history entry of news.forge" in text)
    again.close()


def test_redis_restarted_empty_gives_a_new_epoch(
    nodes: tuple[Server, Server], redis: RedisServer
) -> None:
    """Redis lost everything: a new epoch, recovered false, and numbering from 1 again."""
    a, b = nodes
    conn = b.session(subscribe=["news.>"])
    ok = subscribe(conn, "news.lost")
    a.publish("news.lost", 1)
    [seen] = [recv_json(conn)]
    conn.close()
    redis.stop()
    redis.start()
    wait_for(lambda: health(a) == 200 and health(b) == 200, what="nodes back")
    wait_for(lambda: _publishes(a), what="publishing again")
    again = b.session(subscribe=["news.>"])
    since = {"offset": seen["offset"], "epoch": ok["epoch"]}
    answer = subscribe(again, "news.lost", 2, since=since)
    assert answer["recovered"] is False
    assert answer["epoch"] != ok["epoch"]
    again.close()


def _publishes(node: Server) -> bool:
    status, _, _ = node.api("POST", "/v1/publish", {"topic": "news.probe", "data": 1})
    return status == 202
