"""Cluster figures for the README: ticket redemptions/s against one and two Redis
servers, and cross-node publish-to-deliver latency (node A's API to a subscriber
on node B).

Usage: python bench/cluster.py [--tickets 20000] [--messages 2000] [--rate 200]
Starts its own redis-servers and two nodes on free ports, all on 127.0.0.1.
Redemptions are driven by one process (like one node); the Redis CPU each
redemption costs says what the servers could take from many nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from typing import Any

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])

from tests.redis_server import RedisServer
from tests.server import Server, recv_json, request_json


def redemptions(setups: list[list[RedisServer]], count: int) -> list[dict[str, Any]]:
    """For each set of servers: issue then redeem `count` tickets, all in flight at once."""
    from twisted.internet import defer, reactor, task

    from securepub.core.tickets import Ticket
    from securepub.engines.redis.link import RedisLink, RedisTarget
    from securepub.engines.redis.tickets import RedisTicketStore

    results: list[dict[str, Any]] = []

    @defer.inlineCallbacks
    def run(servers: list[RedisServer]) -> Any:
        result: dict[str, Any] = {}
        results.append(result)
        targets = [RedisTarget.parse(server.url(db=1)) for server in servers]
        links = [RedisLink(reactor, target, "commands") for target in targets]
        for link in links:
            link.startService()
        while not all(link.is_connected() for link in links):
            yield task.deferLater(reactor, 0.05, lambda: None)
        store = RedisTicketStore(
            [(target.display(), link) for target, link in zip(targets, links, strict=True)],
            reactor,
        )
        now = reactor.seconds()
        cpu0 = sum(_cpu(server) for server in servers)
        t0 = time.perf_counter()
        tokens = yield defer.gatherResults(
            [store.issue(Ticket("u", "127.0.0.1", (), (), now + 60)) for _ in range(count)]
        )
        t1 = time.perf_counter()
        cpu1 = sum(_cpu(server) for server in servers)
        tickets = yield defer.gatherResults([store.redeem(t, "127.0.0.1") for t in tokens])
        t2 = time.perf_counter()
        cpu2 = sum(_cpu(server) for server in servers)
        replays = yield defer.DeferredList(
            [store.redeem(t, "127.0.0.1") for t in tokens[:1000]], consumeErrors=True
        )
        assert len(tickets) == count and not any(ok for ok, _ in replays)
        result.update(
            redis_servers=len(servers),
            tickets=count,
            issues_per_s=round(count / (t1 - t0)),
            redemptions_per_s=round(count / (t2 - t1)),
            redis_cpu_us_per_issue=round((cpu1 - cpu0) / count * 1e6, 1),
            redis_cpu_us_per_redemption=round((cpu2 - cpu1) / count * 1e6, 1),
        )
        for link in links:
            yield link.stopService()

    @defer.inlineCallbacks
    def main() -> Any:
        try:
            for servers in setups:
                yield run(servers)
        except Exception as e:  # noqa: BLE001 - reported, and the reactor stops
            results.append({"error": str(e)})
        reactor.stop()

    reactor.callWhenRunning(main)
    reactor.run()
    return results


def _cpu(server: RedisServer) -> float:
    assert server.proc is not None
    with open(f"/proc/{server.proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def latency(a: Server, b: Server, messages: int, rate: float) -> dict[str, Any]:
    """Publish on A at `rate`/s; a subscriber on B timestamps each arrival."""
    conn = b.session(subscribe=["bench.*"])
    assert request_json(conn, {"op": "subscribe", "id": 1, "topic": "bench.latency"})["op"] == "ok"
    received: list[float] = []

    def listen() -> None:
        for _ in range(messages):
            message = recv_json(conn, timeout=10)
            received.append(time.time() - message["data"]["sent"])

    listener = threading.Thread(target=listen)
    listener.start()
    http = a.connection()
    headers = {"Authorization": f"Bearer {a.api_key}", "Content-Type": "application/json"}
    start = time.monotonic()
    for n in range(messages):
        delay = start + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        body = json.dumps({"topic": "bench.latency", "data": {"sent": time.time(), "n": n}})
        http.request("POST", "/v1/publish", body, headers)
        response = http.getresponse()
        response.read()
        assert response.status == 202
    listener.join(30)
    conn.close()
    ms = sorted(x * 1000 for x in received)
    return {
        "messages": messages,
        "rate_per_s": rate,
        "delivered": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(ms[int(len(ms) * 0.99) - 1], 2),
        "max_ms": round(ms[-1], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tickets", type=int, default=20000)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=200)
    args = parser.parse_args()
    redis = RedisServer().start()
    second = RedisServer().start()
    try:
        for result in redemptions([[redis], [redis, second]], args.tickets):
            print(json.dumps({"redemptions": result}))
        a = Server(extra_args=["--redis", redis.url()]).start()
        b = Server(extra_args=["--redis", redis.url()]).start()
        try:
            print(json.dumps({"cross_node_latency": latency(a, b, args.messages, args.rate)}))
        finally:
            a.cleanup()
            b.cleanup()
    finally:
        redis.cleanup()
        second.cleanup()


if __name__ == "__main__":
    main()
