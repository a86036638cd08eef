"""Session figures (SPEC sections 9 and 10): idle lifetimes, refreshes, presence.

    python bench/sessions.py                  # everything (~6 minutes)
    python bench/sessions.py --only idle      # one of: idle, refresh, presence
    python bench/sessions.py --quick

- idle: server CPU % over 60 s while 10,000 sessions sit idle, this tree
  (every session has a lifetime on the one timer heap) against the commit
  before session lifetimes (``--baseline``, default f5e9869), same run;
- refresh: ticket issue + in-band refresh per second, and server CPU per
  refresh, embedded and with Redis;
- presence: a presence query's p50/p99 with 1,000 subscribers on one topic
  across two nodes sharing Redis, and the server CPU a join/leave costs
  when 1,000 subscribers are told.

Servers are pinned to core 0 and the clients (one asyncio process) and Redis
to core 1; results go to bench/results/sessions-<stamp>.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import history as hbench  # noqa: E402 - bench/history.py: servers, Redis, the API client
import run as harness  # noqa: E402 - bench/run.py, beside this file

TOML = """\
[limits]
max_connections_per_ip = 60000
max_subscriptions = 1000
max_errors = 1000000

[[topics]]
pattern = "room.*"
presence = true
join_leave = true
"""


def log(message: str) -> None:
    sys.stderr.write(f"[sessions] {message}\n")
    sys.stderr.flush()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@contextmanager
def node(
    workdir: Path, redis: str | None, source: Path = REPO, toml: str = TOML
) -> Iterator[harness.Server]:
    """One securepub node (from ``source``'s tree) with TOML; certificates shared by workdir."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "bench.toml").write_text(toml)
    twistd = Path(sys.executable).parent / "twistd"
    port = hbench.free_port()
    cmd = ["taskset", "-c", harness.SERVER_CORE, str(twistd), "-n", "--pidfile="]
    cmd += ["securepub", "--dev", "--config", "bench.toml", "--port", str(port)]
    if redis is not None:
        cmd += ["--redis", redis]
    env = {**os.environ, "PYTHONPATH": str(source)}
    log_path = workdir / f"node-{port}.log"
    proc = subprocess.Popen(
        cmd, cwd=workdir, env=env, stdout=log_path.open("ab"), stderr=subprocess.STDOUT
    )
    server = harness.Server("ours", port, proc, log_path, {})
    try:
        harness.wait_healthy(server, workdir / "certs" / "ca.pem")
        yield server
    finally:
        server.stop()


class Client:
    """asyncio WebSocket sessions against one node."""

    def __init__(self, server: harness.Server, workdir: Path) -> None:
        self.server = server
        self.ca = workdir / "certs" / "ca.pem"
        self.key = (workdir / "certs" / "api-key").read_text().strip()
        self.ctx = ssl.create_default_context(cafile=str(self.ca))
        self.url = f"wss://localhost:{server.port}/ws"
        self.api = hbench.Api(server.port, self.ca, self.key)

    def ticket(self, user: str, **extra: Any) -> str:
        answer = self.api.post("/v1/tickets", {"user": user, "subscribe": ["room.*"], **extra})
        token: str = answer["ticket"]
        return token

    async def open(self, ticket: str) -> Any:
        from websockets.asyncio.client import connect

        conn = await connect(
            self.url,
            ssl=self.ctx,
            subprotocols=["securepub.v1", "ticket." + ticket],  # type: ignore[list-item]
            compression=None,
            max_size=None,
            ping_interval=None,
            open_timeout=60,
        )
        json.loads(await conn.recv())
        return conn


async def open_many(client: Client, count: int, prefix: str, concurrency: int = 64) -> list[Any]:
    tickets = [client.ticket(f"{prefix}{n}") for n in range(count)]
    gate = asyncio.Semaphore(concurrency)

    async def one(ticket: str) -> Any:
        async with gate:
            return await client.open(ticket)

    return list(await asyncio.gather(*(one(t) for t in tickets)))


async def request(conn: Any, frame: dict[str, Any]) -> dict[str, Any]:
    await conn.send(json.dumps(frame))
    while True:
        answer: dict[str, Any] = json.loads(await conn.recv())
        if answer.get("id") == frame["id"]:
            return answer


# ------------------------------------------------------------------ idle


def idle_cpu(source: Path, sessions: int, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as folder:
        workdir = Path(folder)
        # Limits only: the baseline tree knows no presence keys.
        with node(workdir, None, source, TOML.split("[[topics]]")[0]) as server:
            client = Client(server, workdir)

            async def hold() -> float:
                conns = await open_many(client, sessions, "idle")
                await asyncio.sleep(3)
                before = harness.cpu_seconds(server.pid)
                started = time.monotonic()
                await asyncio.sleep(seconds)
                used = harness.cpu_seconds(server.pid) - before
                elapsed = time.monotonic() - started
                await asyncio.gather(*(c.close() for c in conns))
                return used / elapsed * 100

            percent = asyncio.run(hold())
            client.api.close()
    return {"sessions": sessions, "seconds": seconds, "server_cpu_percent": percent}


@contextmanager
def baseline_tree(revision: str) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
    try:
        subprocess.run(
            f"git -C {REPO} archive {revision} | tar -x -C {folder}", shell=True, check=True
        )
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------ refresh


def refreshes(redis: str | None, count: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-refresh-") as folder:
        workdir = Path(folder)
        with node(workdir, redis) as server:
            client = Client(server, workdir)

            async def run() -> tuple[float, float]:
                conn = await client.open(client.ticket("refresher"))
                before = harness.cpu_seconds(server.pid)
                started = time.monotonic()
                for n in range(count):
                    ticket = client.ticket("refresher")
                    answer = await request(conn, {"op": "refresh", "id": n, "ticket": ticket})
                    assert answer["op"] == "ok", answer
                elapsed = time.monotonic() - started
                used = harness.cpu_seconds(server.pid) - before
                await conn.close()
                return elapsed, used

            elapsed, used = asyncio.run(run())
            client.api.close()
    return {
        "engine": "redis" if redis else "embedded",
        "refreshes": count,
        "per_s": count / elapsed,
        "server_cpu_ms_per_refresh": used / count * 1000,
    }


# ------------------------------------------------------------------ presence


def presence(subscribers: int, queries: int, joins: int) -> dict[str, Any]:
    with (
        hbench.redis_server() as redis,
        tempfile.TemporaryDirectory(prefix="bench-presence-") as folder,
    ):
        workdir = Path(folder)
        with node(workdir, redis) as a, node(workdir, redis) as b:
            clients = [Client(a, workdir), Client(b, workdir)]

            async def run() -> dict[str, Any]:
                halves = await asyncio.gather(
                    open_many(clients[0], subscribers // 2, "pa"),
                    open_many(clients[1], subscribers // 2, "pb"),
                )
                conns = halves[0] + halves[1]
                for n, conn in enumerate(conns):
                    await conn.send(json.dumps({"op": "subscribe", "id": n, "topic": "room.big"}))
                drain = asyncio.gather(*(_drain(c) for c in conns))
                await asyncio.sleep(5)  # every subscribe, join and its fan-out done
                # Asks without being subscribed (its ticket grants room.*).
                asker = await clients[1].open(clients[1].ticket("asker"))
                times = []
                for n in range(queries):
                    started = time.perf_counter()
                    answer = await request(
                        asker, {"op": "presence", "id": f"q{n}", "topic": "room.big"}
                    )
                    times.append(time.perf_counter() - started)
                    assert len(answer["users"]) == subscribers, len(answer["users"])
                # Join/leave fan-out: users joining and leaving, each told to all.
                extra = await open_many(clients[0], joins, "joiner")
                await asyncio.sleep(2)
                base = sum(harness.cpu_seconds(s.pid) for s in (a, b))
                for n, conn in enumerate(extra):
                    await request(conn, {"op": "subscribe", "id": n, "topic": "room.big"})
                await asyncio.gather(*(c.close() for c in extra))
                await asyncio.sleep(3)
                spent = sum(harness.cpu_seconds(s.pid) for s in (a, b)) - base
                drain.cancel()
                await asyncio.gather(
                    asker.close(), *(c.close() for c in conns), return_exceptions=True
                )
                return {
                    "subscribers": subscribers,
                    "queries": queries,
                    "p50_ms": statistics.median(times) * 1000,
                    "p99_ms": percentile(times, 0.99) * 1000,
                    "joins": joins,
                    # each joiner: one join and one leave, each to `subscribers` sessions
                    "server_cpu_ms_per_join_or_leave": spent / (2 * joins) * 1000,
                    "server_cpu_us_per_frame_told": spent / (2 * joins * subscribers) * 1e6,
                }

            result = asyncio.run(run())
            for client in clients:
                client.api.close()
    return result


async def _drain(conn: Any) -> None:
    try:
        async for _ in conn:
            pass
    except Exception:  # noqa: BLE001 - closed at the end
        return


# ------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", help="idle, refresh or presence (comma-separated)")
    parser.add_argument("--baseline", default="f5e9869", help="commit before session lifetimes")
    opts = parser.parse_args()
    harness.raise_fd_limit()
    os.sched_setaffinity(0, {int(harness.GENERATOR_CORE)})
    wanted = set((opts.only or "idle,refresh,presence").split(","))
    sessions, seconds = (2000, 15.0) if opts.quick else (10_000, 60.0)
    results: list[dict[str, Any]] = []
    if "idle" in wanted:
        with baseline_tree(opts.baseline) as old:
            for label, source in (("without lifetimes", old), ("with lifetimes", REPO)):
                row = {"measure": "idle", "tree": label, **idle_cpu(source, sessions, seconds)}
                log(json.dumps(row))
                results.append(row)
    if "refresh" in wanted:
        count = 300 if opts.quick else 2000
        row = {"measure": "refresh", **refreshes(None, count)}
        log(json.dumps(row))
        results.append(row)
        with hbench.redis_server() as redis:
            row = {"measure": "refresh", **refreshes(redis, count)}
        log(json.dumps(row))
        results.append(row)
    if "presence" in wanted:
        row = {"measure": "presence", **presence(1000, 200, 50 if opts.quick else 200)}
        log(json.dumps(row))
        results.append(row)
    out = BENCH / "results" / f"sessions-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    out.parent.mkdir(exist_ok=True)
    with out.open("w") as f:
        for row in results:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
