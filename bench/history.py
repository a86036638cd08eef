"""History figures (SPEC section 8): recovery time, fan-out with history, memory per message.

    python bench/history.py                 # everything, embedded and Redis (~6 minutes)
    python bench/history.py --quick         # fewer repetitions, shorter floods
    python bench/history.py --only memory   # one of: recovery, flood, memory

- recovery: a subscriber leaves, 1,000 messages are published, it reconnects
  with a new ticket and ``since``: time from the new TCP connection to the
  last recovered message (p50/p99 over the repetitions), embedded and Redis;
- flood: the C load generator's fan-out flood (bench/run.py) on a topic with
  ``history_size = 100`` as a ratio to the same run on a topic without,
  against the same server, embedded and Redis;
- memory: bytes per 1,000 retained 200-byte messages in the embedded engine
  (RSS and tracemalloc), and the per-entry overhead it accounts.

Servers are pinned to core 0, the load generator (and Redis) to core 1, as
in bench/run.py; results go to bench/results/history-<stamp>.jsonl.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from websockets.sync.client import connect as ws_connect

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import run as harness  # noqa: E402 - bench/run.py, beside this file

TOML = """\
[limits]
max_connections_per_ip = 20000

[[topics]]
pattern = "hist.>"
history_size = 2000
history_ttl = 600

[[topics]]
pattern = "bench.flood.history"
history_size = 100
"""

RECOVER = 1000

#: websockets >= 17 wants direct (non-context-manager) use said out loud.
LEGACY: dict[str, Any] = (
    {"legacy": True} if "legacy" in inspect.signature(ws_connect).parameters else {}
)


def log(message: str) -> None:
    sys.stderr.write(f"[history] {message}\n")
    sys.stderr.flush()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


# ------------------------------------------------------------------ servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("history bench: redis-server is not installed")
    port = free_port()
    folder = tempfile.mkdtemp(prefix="bench-redis-")
    cmd = ["taskset", "-c", harness.GENERATOR_CORE, binary, "--port", str(port)]
    cmd += ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", folder]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def securepub(workdir: Path, redis: str | None) -> Iterator[harness.Server]:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "bench.toml").write_text(TOML)
    twistd = Path(sys.executable).parent / "twistd"
    port = free_port()
    cmd = ["taskset", "-c", harness.SERVER_CORE, str(twistd), "-n", "--pidfile="]
    cmd += ["securepub", "--dev", "--config", "bench.toml", "--port", str(port)]
    if redis is not None:
        cmd += ["--redis", redis]
    path = [str(REPO), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    log_path = workdir / "ours.log"
    proc = subprocess.Popen(
        cmd, cwd=workdir, env=env, stdout=log_path.open("ab"), stderr=subprocess.STDOUT
    )
    server = harness.Server("ours", port, proc, log_path, {})
    try:
        harness.wait_healthy(server, workdir / "certs" / "ca.pem")
        yield server
    finally:
        server.stop()


class Api:
    """A kept-alive HTTPS connection to the backend API."""

    def __init__(self, port: int, ca: Path, key: str) -> None:
        import http.client

        self._conn = http.client.HTTPSConnection(
            "localhost", port, context=ssl.create_default_context(cafile=str(ca)), timeout=30
        )
        self._headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self._conn.request("POST", path, body=json.dumps(body), headers=self._headers)
        response = self._conn.getresponse()
        answer: dict[str, Any] = json.loads(response.read())
        if response.status >= 300:
            raise RuntimeError(f"{path}: {response.status} {answer}")
        return answer

    def close(self) -> None:
        self._conn.close()


# ------------------------------------------------------------------ recovery


def recovery_times(server: harness.Server, workdir: Path, reps: int) -> list[float]:
    """Seconds from a new connection to the last of RECOVER recovered messages."""
    from websockets.sync.client import connect

    ca = workdir / "certs" / "ca.pem"
    key = (workdir / "certs" / "api-key").read_text().strip()
    api = Api(server.port, ca, key)
    ctx = ssl.create_default_context(cafile=str(ca))
    # websockets.sync reads in a thread while the caller writes: over TLS 1.3
    # that loses an upgrade request now and then (see tests/server.py).
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    url = f"wss://localhost:{server.port}/ws"
    times = []
    try:
        for rep in range(reps):
            topic = f"hist.r{rep}"

            def session() -> Any:
                ticket = api.post("/v1/tickets", {"user": "bench", "subscribe": ["hist.>"]})
                return connect(
                    url,
                    ssl=ctx,
                    subprotocols=["securepub.v1", "ticket." + ticket["ticket"]],  # type: ignore[list-item]
                    max_size=None,
                    compression=None,
                    **LEGACY,
                )

            first = session()
            json.loads(first.recv())
            first.send(json.dumps({"op": "subscribe", "id": 1, "topic": topic}))
            ok = json.loads(first.recv())
            first.close()
            for n in range(RECOVER):
                api.post("/v1/publish", {"topic": topic, "data": {"n": n, "pad": "x" * 180}})
            since = {"offset": ok["offset"], "epoch": ok["epoch"]}
            started = time.perf_counter()
            again = session()
            json.loads(again.recv())
            again.send(json.dumps({"op": "subscribe", "id": 2, "topic": topic, "since": since}))
            answer = json.loads(again.recv())
            if not answer.get("recovered"):
                raise RuntimeError(f"not recovered: {answer}")
            last = None
            for _ in range(RECOVER):
                last = json.loads(again.recv())
            times.append(time.perf_counter() - started)
            assert last is not None and last["offset"] == ok["offset"] + RECOVER
            again.close()
    finally:
        api.close()
    return times


# ------------------------------------------------------------------ flood


def flood(server: harness.Server, workdir: Path, topic: str, opts: argparse.Namespace) -> Any:
    kind, generator = harness.generator_command("c")
    if kind != "c":
        raise SystemExit("history bench: needs the C load generator (cc and libssl-dev)")
    key = (workdir / "certs" / "api-key").read_text().strip()
    args = ("--scenario", "fanout", "--subscribers", str(opts.subscribers))
    args += ("--duration", str(opts.duration), "--mode", "flood", "--publishers", "16")
    case = harness.Case("fanout-flood", "ours", (*args, "--topic", topic))
    flags = argparse.Namespace(duration=opts.duration, connections=0, profile=False)
    result = harness.run_case(case, server, generator, key, workdir / "certs" / "ca.pem", flags)
    harness.derive(result)
    return result


# ------------------------------------------------------------------ memory


def memory_per_thousand(messages: int = 100_000) -> dict[str, float]:
    """Bytes per 1,000 retained 200-byte messages: 1,000 topics x 100 messages each."""
    from twisted.internet.task import Clock

    from securepub.core.history import HISTORY_ENTRY_OVERHEAD, HistoryPolicy, Publication
    from securepub.engines.memory.history import MemoryHistory

    body = json.dumps({"pad": "x" * 190})[:200]
    body = body if len(body) == 200 else json.dumps({"p": "x" * (200 - 9)})
    clock = Clock()
    history = MemoryHistory(clock, max_bytes=10**10)
    policy = HistoryPolicy(size=100, ttl=600)
    topics = [f"bench.topic{n}" for n in range(messages // 100)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    rss_before = rss_kib()
    for i in range(messages):
        # Fresh strings per message, as from a parser: nothing is shared by accident.
        text = "".join([body[:-1], "}"])
        history.append(Publication(topics[i % len(topics)], f"node-{i}", float(i), text), policy)
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - before
    rss = (rss_kib() - rss_before) * 1024
    tracemalloc.stop()
    return {
        "messages": messages,
        "payload_bytes": len(body),
        "traced_bytes_per_1000": traced / messages * 1000,
        "rss_bytes_per_1000": rss / messages * 1000,
        "accounted_bytes_per_1000": history.bytes / messages * 1000,
        "entry_overhead_constant": HISTORY_ENTRY_OVERHEAD,
    }


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# ------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", help="recovery, flood or memory (comma-separated)")
    parser.add_argument("--reps", type=int, default=None)
    opts = parser.parse_args()
    opts.reps = opts.reps or (5 if opts.quick else 20)
    opts.duration = 4 if opts.quick else 10
    opts.subscribers = 200 if opts.quick else 1000
    wanted = set((opts.only or "recovery,flood,memory").split(","))
    harness.raise_fd_limit()
    results: list[dict[str, Any]] = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = BENCH / "results"
    out_dir.mkdir(exist_ok=True)

    if "memory" in wanted:
        figures = memory_per_thousand()
        results.append({"measure": "memory", **figures})
        log(f"memory: {json.dumps(figures)}")

    for engine in ("embedded", "redis"):
        if not wanted & {"recovery", "flood"}:
            break
        with tempfile.TemporaryDirectory(prefix=f"bench-history-{engine}-") as folder:
            workdir = Path(folder)
            redis_cm = redis_server() if engine == "redis" else None
            redis_url = redis_cm.__enter__() if redis_cm is not None else None
            try:
                with securepub(workdir, redis_url) as server:
                    if "recovery" in wanted:
                        times = recovery_times(server, workdir, opts.reps)
                        row = {
                            "measure": "recovery",
                            "engine": engine,
                            "messages": RECOVER,
                            "reps": len(times),
                            "p50_ms": statistics.median(times) * 1000,
                            "p99_ms": percentile(times, 0.99) * 1000,
                            "max_ms": max(times) * 1000,
                        }
                        results.append(row)
                        log(f"recovery {engine}: {json.dumps(row)}")
                    if "flood" in wanted:
                        for rep in range(1 if opts.quick else 3):
                            plain = flood(server, workdir, "bench.flood.plain", opts)
                            kept = flood(server, workdir, "bench.flood.history", opts)
                            ratio = kept.get("delivered_per_s", 0) / max(
                                1.0, plain.get("delivered_per_s", 0)
                            )
                            row = {
                                "measure": "flood",
                                "engine": engine,
                                "rep": rep,
                                "plain": plain,
                                "history": kept,
                                "ratio": ratio,
                            }
                            results.append(row)
                            log(
                                f"flood {engine} rep {rep}: "
                                f"{kept.get('delivered_per_s', 0):,.0f} vs "
                                f"{plain.get('delivered_per_s', 0):,.0f} msg/s = {ratio:.2f}x "
                                f"(lost {kept.get('lost')} / {plain.get('lost')})"
                            )
            finally:
                if redis_cm is not None:
                    redis_cm.__exit__(None, None, None)

    path = out_dir / f"history-{stamp}.jsonl"
    with path.open("w") as f:
        for row in results:
            f.write(json.dumps(row) + "\n")
    print(f"\n{'figure':<44} {'value':>20}")
    for row in results:
        if row["measure"] == "recovery":
            print(
                f"{'recovery of 1,000 (' + row['engine'] + ') p50 / p99 ms':<44} "
                f"{row['p50_ms']:>9.1f} / {row['p99_ms']:.1f}"
            )
        elif row["measure"] == "flood":
            print(f"{'flood history/plain (' + row['engine'] + ')':<44} {row['ratio']:>19.2f}x")
        else:
            print(
                f"{'bytes per 1,000 retained 200-B messages':<44} "
                f"{row['rss_bytes_per_1000']:>12,.0f} RSS / {row['traced_bytes_per_1000']:,.0f} "
                "traced"
            )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
