"""Several nodes sharing one real redis-server: tickets once across nodes, fan-out, outages."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.redis_server import RedisServer
from tests.server import Server, free_port, recv_json, request_json

CONFIG = {"topics": [{"pattern": "chat.*", "client_publish": True}]}
SECRET = {"cluster-secret": "correct horse battery staple, shared by all nodes"}


def wait_for(predicate: Any, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def health(node: Server) -> int:
    try:
        status, _, _ = node.api("GET", "/healthz", timeout=2)
        return status
    except OSError:
        return 0


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
    for node in (a, b):
        for ticket in node.tickets:
            assert ticket not in node.log_text()


def refused_status(node: Server, ticket: str) -> int:
    try:
        node.ws(ticket).close()
    except InvalidStatus as e:
        return int(e.response.status_code)
    return 101


def test_ticket_from_a_redeemed_once_on_b(nodes: tuple[Server, Server]) -> None:
    """A ticket issued on A is redeemed on B, and refused on A afterwards."""
    a, b = nodes
    ticket = a.ticket(subscribe=["news.*"])
    conn = b.ws(ticket)
    assert recv_json(conn)["op"] == "welcome"
    conn.close()
    assert refused_status(a, ticket) == 403
    line = a.wait_for_log(lambda text: "ticket_already_redeemed" in text)
    assert ticket not in line


def test_redemption_race_has_one_winner(nodes: tuple[Server, Server]) -> None:
    """Twenty handshakes racing on one ticket over two nodes: exactly one succeeds."""
    a, b = nodes
    ticket = a.ticket()
    outcomes: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(20)

    def attempt(node: Server) -> None:
        start.wait()
        status = refused_status(node, ticket)
        with lock:
            outcomes.append(status)

    threads = [threading.Thread(target=attempt, args=((a, b)[i % 2],)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == [101] + [403] * 19, outcomes


def test_publish_on_a_reaches_every_subscriber_once(nodes: tuple[Server, Server]) -> None:
    """A message published on A reaches each subscriber on both nodes once, same id."""
    a, b = nodes
    subscribers = [b.session(subscribe=["news.>"]) for _ in range(3)]
    subscribers.append(a.session(subscribe=["news.>"]))
    for i, conn in enumerate(subscribers):
        # Overlapping patterns on one connection still deliver once.
        for j, topic in enumerate(("news.sports", "news.*", "news.>")):
            assert request_json(conn, {"op": "subscribe", "id": j, "topic": topic})["op"] == "ok"
        del i
    ids = [a.publish("news.sports", {"n": n}) for n in range(5)]
    for conn in subscribers:
        got = [recv_json(conn) for _ in ids]
        assert [m["id"] for m in got] == ids
        assert [m["data"] for m in got] == [{"n": n} for n in range(5)]
        with pytest.raises(TimeoutError):
            conn.recv(timeout=0.3)
        conn.close()


def test_browser_publish_crosses_nodes(nodes: tuple[Server, Server]) -> None:
    """A browser's publish on B reaches a subscriber on A."""
    a, b = nodes
    listener = a.session(subscribe=["chat.*"])
    assert request_json(listener, {"op": "subscribe", "id": 1, "topic": "chat.room1"})["op"] == "ok"
    talker = b.session(publish=["chat.*"])
    talker.send(json.dumps({"op": "publish", "id": 7, "topic": "chat.room1", "data": "hi"}))
    assert recv_json(talker) == {"op": "ok", "id": 7}
    message = recv_json(listener)
    assert (message["topic"], message["data"]) == ("chat.room1", "hi")
    listener.close()
    talker.close()


def test_forged_message_reaches_no_browser(
    nodes: tuple[Server, Server], redis: RedisServer
) -> None:
    """A message written straight into Redis, unsigned or badly signed, is dropped."""
    a, b = nodes
    subscriber = b.session(subscribe=["news.*"])
    assert request_json(subscriber, {"op": "subscribe", "id": 1, "topic": "news.*"})["op"] == "ok"
    now = repr(time.time())
    for forged in (
        f'1\nnews.forged\nabc-1\n{now}\n"unsigned"',
        f'2\n{"0" * 64}\nnews.forged\nabc-2\n{now}\n"bad signature"',
    ):
        # b holds the channel of its subscriber's pattern, so the forgery reaches b
        # (and a, while a pattern of an earlier test lingers there).
        assert int(redis.command("PUBLISH", "securepub:p:news", forged)) >= 1
    real = a.publish("news.real", "signed")
    message = recv_json(subscriber)
    assert (message["id"], message["data"]) == (real, "signed")
    b.wait_for_log(lambda text: "redis: unsigned" in text and "redis: bad signature" in text)
    subscriber.close()


def test_disconnect_revokes_on_every_node(nodes: tuple[Server, Server]) -> None:
    """POST /v1/disconnect on A closes the user's sessions on A and B with 4001 and
    revokes the user's unredeemed tickets; other users stay connected."""
    a, b = nodes
    on_a = a.session(user="mallory", subscribe=["news.*"])
    on_b = b.session(user="mallory", subscribe=["news.*"])
    bystander = b.session(user="alice", subscribe=["news.*"])
    spare = a.ticket(user="mallory")
    status, _, body = a.api("POST", "/v1/disconnect", {"user": "mallory"})
    assert (status, body) == (202, {"user": "mallory", "revoked_tickets": 1})
    for conn in (on_a, on_b):
        with pytest.raises(ConnectionClosed) as closed:
            recv_json(conn, timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
    assert refused_status(b, spare) == 403
    assert request_json(bystander, {"op": "subscribe", "id": 1, "topic": "news.*"})["op"] == "ok"
    bystander.close()


def test_redis_outage_and_recovery(nodes: tuple[Server, Server], redis: RedisServer) -> None:
    """Redis down: 503s everywhere and error frames, no crash; back up: recovery, no restart."""
    a, b = nodes
    subscriber = b.session(subscribe=["news.>", "chat.*"])
    for i, topic in enumerate(("news.>", "chat.*")):
        assert request_json(subscriber, {"op": "subscribe", "id": i, "topic": topic})["op"] == "ok"
    talker = a.session(publish=["chat.*"])
    accepted = [a.publish("news.before", {"n": n}) for n in range(3)]
    assert [recv_json(subscriber)["id"] for _ in accepted] == accepted
    ticket = a.ticket()

    redis.stop()
    wait_for(lambda: health(a) == 503 and health(b) == 503, what="healthz 503")
    status, _, body = a.api("GET", "/healthz")
    assert body["status"] == "unavailable" and "redis" in body["reason"]
    status, _, body = a.api("POST", "/v1/publish", {"topic": "news.x", "data": 1})
    assert (status, body["error"]) == (503, "unavailable")
    status, _, body = a.api("POST", "/v1/tickets", {"user": "bob"})
    assert (status, body["error"]) == (503, "unavailable")
    assert refused_status(b, ticket) == 503
    talker.send(json.dumps({"op": "publish", "id": 9, "topic": "chat.room1", "data": 1}))
    reply = recv_json(talker)
    assert (reply["op"], reply["code"], reply["id"]) == ("error", "unavailable", 9)

    redis.start()
    wait_for(lambda: health(a) == 200 and health(b) == 200, what="healthz 200 again")
    message_id = a.publish("news.after", {"back": True})
    message = recv_json(subscriber)
    assert (message["id"], message["data"]) == (message_id, {"back": True})
    talker.send(json.dumps({"op": "publish", "id": 10, "topic": "chat.room1", "data": 2}))
    assert recv_json(talker) == {"op": "ok", "id": 10}
    assert recv_json(subscriber)["data"] == 2
    subscriber.close()
    talker.close()
    for node in (a, b):
        assert node.proc is not None and node.proc.poll() is None


def test_password_and_database(redis: RedisServer) -> None:
    """redis://:password@host/db authenticates and keeps tickets in that database."""
    secured = RedisServer(password="correct-horse-battery").start()
    node = Server(extra_args=["--redis", secured.url(db=3, password="correct-horse-battery")])
    wrong = Server(extra_args=["--redis", secured.url(password="wrong-password")])
    try:
        node.start()
        node.ticket()
        # The ticket, and its user's index for revocation, live in database 3.
        assert secured.command("-n", "3", "--scan", "--pattern", "securepub:ticket:*") != ""
        assert secured.command("-n", "3", "DBSIZE") == "2"
        assert secured.command("-n", "0", "DBSIZE") == "0"
        with pytest.raises(Exception, match="not healthy"):
            wrong.start()
        assert "correct-horse" not in node.log_text() + wrong.log_text()
        assert "wrong-password" not in wrong.log_text()
    finally:
        node.cleanup()
        wrong.cleanup()
        secured.cleanup()


def test_rediss_verifies_the_server() -> None:
    """rediss:// works against a TLS redis-server whose CA we trust, and only then."""
    tls = RedisServer(tls=True).start()
    node = Server(extra_args=["--redis", tls.url(), "--redis-ca", tls.ca_path])
    untrusting = Server(extra_args=["--redis", tls.url()])
    try:
        node.start()
        subscriber = node.session(subscribe=["news.*"])
        assert (
            request_json(subscriber, {"op": "subscribe", "id": 1, "topic": "news.*"})["op"] == "ok"
        )
        message_id = node.publish("news.tls", 1)
        assert recv_json(subscriber)["id"] == message_id
        subscriber.close()
        with pytest.raises(Exception, match="not healthy"):
            untrusting.start()
    finally:
        node.cleanup()
        untrusting.cleanup()
        tls.cleanup()


def test_reuse_port_processes_share_one_port(redis: RedisServer, tmp_path: Any) -> None:
    """With --reuse-port two processes serve one port; a publish reaches all."""
    port = free_port()
    key = "shared-key-" + "k" * 32
    keys = tmp_path / "shared-api-keys"
    keys.write_text(key + "\n")
    # The later --api-key-file wins: both processes accept the same key.
    args = ["--redis", redis.url(db=2), "--reuse-port", "--api-key-file", str(keys)]
    first = Server(port=port, extra_args=args)
    second = Server(port=port, extra_args=args)
    try:
        first.start()
        first.api_key = key
        second.start()
        second.api_key = key
        # /healthz may have been answered by the other process: wait for each one's log.
        for node in (first, second):
            node.wait_for_log(lambda text: "securepub listening" in text)
        subscribers = []
        for _ in range(16):
            conn = first.session(subscribe=["spread.*"])
            assert (
                request_json(conn, {"op": "subscribe", "id": 1, "topic": "spread.*"})["op"] == "ok"
            )
            subscribers.append(conn)
        # The kernel spread the connections over both processes.
        assert "handshake accepted" in first.log_text()
        assert "handshake accepted" in second.log_text()
        message_id = first.publish("spread.x", 1)
        for conn in subscribers:
            assert recv_json(conn)["id"] == message_id
            conn.close()
    finally:
        first.cleanup()
        second.cleanup()
