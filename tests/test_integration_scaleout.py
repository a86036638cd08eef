"""Scale-out against real redis-servers: interest-based routing, several Redis servers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from securepub.engines.redis.ring import Ring
from tests.redis_server import RedisServer
from tests.server import Server, recv_json, request_json
from tests.test_integration_redis import SECRET, wait_for

CONFIG = {
    "limits": {"max_errors": 1000, "max_subscriptions": 2000},
    "topics": [{"pattern": "hist.>", "history_size": 100}],
}


def start_nodes(urls: list[str], count: int) -> list[Server]:
    args = ["--cluster-secret-file", "cluster-secret"]
    for url in urls:
        args += ["--redis", url]
    nodes = [Server(CONFIG, files=SECRET, extra_args=args) for _ in range(count)]
    try:
        for node in nodes:
            node.start()
    except BaseException:
        for node in nodes:
            node.cleanup()
        raise
    return nodes


def received(node: Server) -> float:
    """What the node's Redis links have delivered to it (securepub_cluster_messages_...)."""
    status, _, body = node.api("GET", "/metrics", key=node.api_key)
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith("securepub_cluster_messages_received_total "):
            return float(line.split()[1])
    raise AssertionError("no securepub_cluster_messages_received_total")


def subscribe(conn: Any, topic: str, message_id: int = 1) -> Any:
    answer = request_json(conn, {"op": "subscribe", "id": message_id, "topic": topic})
    assert answer["op"] == "ok", answer
    return answer


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def trio(redis: RedisServer) -> Iterator[list[Server]]:
    nodes = start_nodes([redis.url(db=0)], 3)
    try:
        yield nodes
    finally:
        for node in nodes:
            node.cleanup()


def test_only_the_interested_node_hears_a_message(trio: list[Server]) -> None:
    """A publish to a topic with subscribers on A only reaches A's Redis link, not B's or C's."""
    a = trio[0]
    sessions = [
        node.session(user=f"user{n}", subscribe=[f"user.u{n}.>"]) for n, node in enumerate(trio)
    ]
    for n, conn in enumerate(sessions):
        subscribe(conn, f"user.u{n}.inbox")
    before = [received(node) for node in trio]
    for k in range(20):
        a.publish("user.u0.inbox", {"k": k})
    got = [recv_json(sessions[0])["data"]["k"] for _ in range(20)]
    assert got == list(range(20))
    after = [received(node) for node in trio]
    assert after[0] - before[0] == 20
    assert after[1] - before[1] == 0 and after[2] - before[2] == 0
    for conn in sessions:
        conn.close()


def test_patterns_get_every_match_exactly_once(trio: list[Server]) -> None:
    """Overlapping exact and wildcard subscriptions deliver each message once per connection."""
    a, b, c = trio
    overlapping = b.session(user="o", subscribe=[">"])
    for n, topic in enumerate(("news.a", "news.*", "news.>", "*.a", ">")):
        subscribe(overlapping, topic, n)
    star = c.session(user="s", subscribe=["news.*"])
    subscribe(star, "news.*")
    deep = a.session(user="d", subscribe=["news.>"])
    subscribe(deep, "news.>")
    ids = [a.publish("news.a", n) for n in range(5)] + [a.publish("news.a.b", 9)]
    assert [recv_json(overlapping)["id"] for _ in ids] == ids
    assert [recv_json(deep)["id"] for _ in ids] == ids
    assert [recv_json(star)["id"] for _ in ids[:5]] == ids[:5]
    for conn in (overlapping, star, deep):
        with pytest.raises(TimeoutError):
            conn.recv(timeout=0.3)
        conn.close()


def test_subscribe_then_publish_never_misses(trio: list[Server]) -> None:
    """1,000 times: subscribe on B to a fresh topic, publish on A right after the ok: received."""
    a, b, _ = trio
    conn = b.session(user="racer", subscribe=["race.>"])
    api = a.connection(timeout=10)
    headers = {"Authorization": f"Bearer {a.api_key}", "Content-Type": "application/json"}
    try:
        for n in range(1000):
            topic = f"race.t{n}"
            subscribe(conn, topic, n)
            api.request(
                "POST", "/v1/publish", body=f'{{"topic": "{topic}", "data": {n}}}', headers=headers
            )
            response = api.getresponse()
            response.read()
            assert response.status == 202
            message = recv_json(conn, timeout=5)
            assert (message["topic"], message["data"]) == (topic, n)
            conn.send(f'{{"op": "unsubscribe", "id": "u{n}", "topic": "{topic}"}}')
            assert recv_json(conn)["op"] == "ok"
    finally:
        api.close()
        conn.close()


# -- two Redis servers ---------------------------------------------------------


@pytest.fixture(scope="module")
def two_redis() -> Iterator[list[RedisServer]]:
    servers = [RedisServer().start(), RedisServer().start()]
    try:
        yield servers
    finally:
        for server in servers:
            server.cleanup()


@pytest.fixture(scope="module")
def pair(two_redis: list[RedisServer]) -> Iterator[list[Server]]:
    nodes = start_nodes([r.url(db=0) for r in two_redis], 2)
    try:
        yield nodes
    finally:
        for node in nodes:
            node.cleanup()


def home_of(topic: str, servers: list[RedisServer]) -> int:
    """Which of the servers holds ``topic`` (the nodes' own ring, by the servers' names)."""
    ring = Ring([(f"redis://127.0.0.1:{r.port}/0", n) for n, r in enumerate(servers)])
    index: int = ring.for_topic(topic)
    return index


def refused(node: Server, ticket: str) -> int:
    try:
        node.ws(ticket).close()
    except InvalidStatus as e:
        return int(e.response.status_code)
    return 101


def test_tickets_over_two_servers_are_redeemed_once(pair: list[Server]) -> None:
    """A ticket issued through A is redeemed on B once; twenty racing redemptions, one winner."""
    a, b = pair
    ticket = a.ticket()
    conn = b.ws(ticket)
    assert recv_json(conn)["op"] == "welcome"
    conn.close()
    assert refused(a, ticket) == 403
    for _ in range(3):
        outcomes = race(pair, a.ticket())
        assert sorted(outcomes) == [101] + [403] * 19, outcomes


def race(nodes: list[Server], ticket: str, count: int = 20) -> list[int]:
    """``count`` handshakes started together on alternating nodes with one ticket."""
    outcomes: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(count)

    def attempt(node: Server) -> None:
        start.wait()
        status = refused(node, ticket)
        with lock:
            outcomes.append(status)

    threads = [
        threading.Thread(target=attempt, args=(nodes[i % len(nodes)],)) for i in range(count)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return outcomes


def test_messages_cross_nodes_whichever_server_holds_the_topic(
    pair: list[Server], two_redis: list[RedisServer]
) -> None:
    """Topics on either server reach the other node's subscribers; history too."""
    a, b = pair
    topics = {home_of(f"spread.t{n}", two_redis): f"spread.t{n}" for n in range(40)}
    assert set(topics) == {0, 1}
    conn = b.session(user="spread", subscribe=["spread.*", "hist.>"])
    subscribe(conn, "spread.*")
    for topic in topics.values():
        a.publish(topic, topic)
    assert sorted(recv_json(conn)["data"] for _ in topics) == sorted(topics.values())
    ok = subscribe(conn, "hist.x", 2)
    a.publish("hist.x", 1)
    message = recv_json(conn)
    assert (message["offset"], message["epoch"]) == (ok["offset"] + 1, ok["epoch"])
    conn.close()


def test_one_redis_down_fails_only_what_hashes_to_it(
    pair: list[Server], two_redis: list[RedisServer]
) -> None:
    """With one server stopped: its topics answer 503, the others flow; back up, all flow."""
    a, b = pair
    down = 1
    lost = next(f"part.t{n}" for n in range(100) if home_of(f"part.t{n}", two_redis) == down)
    kept = next(f"part.t{n}" for n in range(100) if home_of(f"part.t{n}", two_redis) != down)
    conn = b.session(user="part", subscribe=["part.*"])
    subscribe(conn, kept)
    two_redis[down].stop()
    try:
        wait_for(
            lambda: a.api("POST", "/v1/publish", {"topic": lost, "data": 0})[0] == 503,
            what="503 for the stopped server's topic",
        )
        status, _, body = a.api("POST", "/v1/publish", {"topic": lost, "data": 1})
        assert (status, body["error"]) == (503, "unavailable")
        assert a.api("GET", "/healthz")[0] == 200
        message_id = a.publish(kept, "still here")
        assert recv_json(conn)["id"] == message_id
        # Tickets are drawn on the server that is up.
        for _ in range(5):
            a.ticket(user="part")
        answer = request_json(conn, {"op": "subscribe", "id": 3, "topic": lost})
        assert (answer["op"], answer["code"]) == ("error", "unavailable")
    finally:
        two_redis[down].start()
    wait_for(
        lambda: a.api("POST", "/v1/publish", {"topic": lost, "data": 2})[0] == 202,
        what="the stopped server's topic back",
    )
    deadline = time.monotonic() + 15
    while True:
        answer = request_json(conn, {"op": "subscribe", "id": 4, "topic": lost})
        if answer["op"] == "ok" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert answer["op"] == "ok", answer
    message_id = a.publish(lost, "back")
    assert recv_json(conn)["id"] == message_id
    conn.close()
