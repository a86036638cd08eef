"""Redis costs behind the choice of a topic-to-channel mapping for scale-out.

Usage: python bench/redis_routing.py [--reps 3] [--seconds 1.0] [--parts 1234] [--quick]
About 4-5 minutes with the defaults (part 1: ~70 s, 2: ~40 s, 3: ~100 s, 4: ~45 s).

Starts its own redis-server processes on free ports of 127.0.0.1 (no persistence)
and measures, on this machine:

1. Redis CPU per PUBLISH and PUBLISH/s (redis-benchmark, pipelined) as a function
   of subscribed channels (one subscriber each), PSUBSCRIBE patterns held, and
   subscriber connections; plus one channel heard by every connection (today's
   design).
2. SUBSCRIBE/UNSUBSCRIBE churn of 20,000 channels on one connection in batches
   of 1, 100 and 1,000 channels per command (pipelined, and waiting for each
   reply), and Redis memory per subscribed channel and per pattern.
3. Python CPU per message received through txredisapi's SubscriberProtocol
   (one core), bare and through the committed (HEAD) RedisFanout.received with a
   subscription-index miss, i.e. the cost of a message no session wants.
4. EVAL / EVALSHA of a small Lua script (HINCRBY, XADD MAXLEN 100, EXPIRE x2,
   PUBLISH) vs a plain PUBLISH.

Redis CPU is read from /proc/<pid>/stat (utime+stime) around each fixed run; the
client's CPU from time.process_time() in the subscriber process. The machine is
shared: each figure is the median of --reps runs with its range.
Results go to bench/results/redis_routing-<stamp>.jsonl (git-ignored).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import itertools
import json
import os
import platform
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"

#: A channel name as mapping (a) would make it, with the 12-digit number
#: redis-benchmark writes in place of __rand_int__.
TOPIC_CHANNEL = "sp:t:user.{:012d}.notifications"
BENCH_CHANNEL = "sp:t:user.__rand_int__.notifications"
MISS_CHANNEL = "sp:t:miss.__rand_int__.notifications"
SHARED_CHANNEL = "securepub:messages"
#: About the size of one encoded securepub message (version, topic, id, ts, body).
PAYLOAD = (
    "1\nuser.000000000042.notifications\nnode7-1234567\n1700000000.123456\n"
    '{"kind":"notification","from":"bob","text":"' + "x" * 100 + '","n":42}'
)

#: Every process this script starts, so that all of them are stopped on exit.
_PROCS: list[subprocess.Popen[Any]] = []


# ---------------------------------------------------------------- processes


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _stop_all() -> None:
    while _PROCS:
        _stop(_PROCS.pop())


def _on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def proc_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# ---------------------------------------------------------------- RESP


def resp(*args: object) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def read_reply(f: Any) -> Any:
    line = f.readline()
    if not line:
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [read_reply(f) for _ in range(n)]
    raise RuntimeError(f"unexpected reply {line!r}")


def connect(port: int) -> socket.socket:
    s = socket.create_connection((HOST, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


class Client:
    """A blocking connection for ordinary commands."""

    def __init__(self, port: int) -> None:
        self.sock = connect(port)
        self.file = self.sock.makefile("rb")

    def call(self, *args: object) -> Any:
        self.sock.sendall(resp(*args))
        return read_reply(self.file)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def exchange(sock: socket.socket, payload: bytes, suffix: bytes, timeout: float = 120.0) -> None:
    """Send `payload` while reading replies, until what came back ends with `suffix`.

    Subscribe replies end with the connection's subscription count, which only
    grows (or only shrinks) along a batch, so the last reply alone ends so.
    """
    view = memoryview(payload)
    sent, tail = 0, b""
    deadline = time.monotonic() + timeout
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE if payload else 1)
    try:
        while True:
            for _, events in sel.select(1.0):
                if events & selectors.EVENT_WRITE and sent < len(view):
                    with contextlib.suppress(BlockingIOError):
                        sent += sock.send(view[sent : sent + 262144])
                    if sent == len(view):
                        sel.modify(sock, selectors.EVENT_READ)
                if events & selectors.EVENT_READ:
                    with contextlib.suppress(BlockingIOError):
                        data = sock.recv(1 << 20)
                        if not data:
                            raise ConnectionError("redis closed the connection")
                        tail = (tail + data)[-64:]
                        if sent == len(view) and tail.endswith(suffix):
                            return
            if time.monotonic() > deadline:
                raise TimeoutError("no complete answer from redis")
    finally:
        sel.close()
        sock.setblocking(True)


def batched(cmd: str, names: list[str], batch: int) -> bytes:
    return b"".join(resp(cmd, *names[i : i + batch]) for i in range(0, len(names), batch))


class Redis:
    """A private redis-server on a free port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--logfile",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _PROCS.append(self.proc)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.ctl = Client(self.port)
                self.ctl.call("PING")
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        # Subscribers far behind a flood are kept, not disconnected.
        self.ctl.call("CONFIG", "SET", "client-output-buffer-limit", "pubsub 0 0 0")
        self.ctl.call("CONFIG", "SET", "maxclients", "1000")

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid)

    def used_memory(self) -> int:
        info = self.ctl.call("INFO", "memory").decode()
        for line in info.splitlines():
            if line.startswith("used_memory:"):
                return int(line.split(":")[1])
        raise RuntimeError("no used_memory in INFO")

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.ctl.close()
        _stop(self.proc)
        if self.proc in _PROCS:
            _PROCS.remove(self.proc)


@contextlib.contextmanager
def redis_server() -> Iterator[Redis]:
    r = Redis()
    try:
        yield r
    finally:
        r.stop()


class Drain(threading.Thread):
    """Reads and discards everything sent to subscriber connections, counting bytes."""

    def __init__(self, socks: list[socket.socket]) -> None:
        super().__init__(daemon=True)
        self.socks = socks
        self.bytes = 0
        self._stop_event = threading.Event()
        self._sel = selectors.DefaultSelector()
        for s in socks:
            self._sel.register(s, selectors.EVENT_READ)

    def run(self) -> None:
        while not self._stop_event.is_set():
            for key, _ in self._sel.select(0.1):
                data = key.fileobj.recv(1 << 20)  # type: ignore[union-attr]
                if not data:
                    self._sel.unregister(key.fileobj)
                self.bytes += len(data)

    def settle(self, expected: int, timeout: float = 5.0) -> None:
        """Wait until the stream has stopped (and reached `expected` bytes)."""
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            now = self.bytes
            if now == last and now >= expected:
                return
            last = now
            time.sleep(0.03)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(2)
        self._sel.close()
        for s in self.socks:
            s.close()


def message_frame_len(channel: str, payload: str) -> int:
    c, p = channel.encode(), payload.encode()
    return len(b"*3\r\n$7\r\nmessage\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(c), c, len(p), p))


def benchmark(
    redis: Redis, command: list[str], n: int, rand: int = 0, clients: int = 4, pipeline: int = 16
) -> dict[str, Any]:
    """One redis-benchmark run of `command`, with Redis CPU around it."""
    argv = ["redis-benchmark", "-h", HOST, "-p", str(redis.port), "-n", str(n)]
    argv += ["-c", str(clients), "-P", str(pipeline), "--csv"]
    if rand:
        argv += ["-r", str(rand)]
    cpu0, t0 = redis.cpu(), time.perf_counter()
    proc = subprocess.Popen(argv + command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _PROCS.append(proc)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        _stop(proc)
        _PROCS.remove(proc)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed: {err.decode()[-500:]}")
    # The last CSV row ends with 7 numbers; the test name before them holds the payload.
    rps = float(out.decode().strip().rsplit('","', 7)[1])
    return {"n": n, "wall_s": wall, "rps": rps, "cpu0": cpu0}


def finish(redis: Redis, run: dict[str, Any]) -> dict[str, Any]:
    cpu = redis.cpu() - run.pop("cpu0")
    run.update(
        redis_cpu_s=round(cpu, 3),
        redis_us_per_op=round(cpu / run["n"] * 1e6, 3),
        redis_util=round(cpu / run["wall_s"], 2),
        wall_s=round(run["wall_s"], 3),
        rps=round(run["rps"]),
    )
    return run


def med(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def spread(runs: list[dict[str, Any]], key: str, fmt: str = "{:.2f}") -> str:
    values = [r[key] for r in runs]
    m = statistics.median(values)
    return f"{fmt.format(m)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


class Results:
    def __init__(self, path: str) -> None:
        self.path = path
        self.file = open(path, "a")

    def write(self, **row: Any) -> None:
        self.file.write(json.dumps(row, sort_keys=True) + "\n")
        self.file.flush()


def table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for j, r in enumerate(cells):
        print(
            "  "
            + "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))


# ---------------------------------------------------------------- part 1


def pattern_names(count: int, shape: str) -> list[str]:
    if shape == "prefix":  # user.p000123.> -> sp:t:user.p000123.*
        return [f"sp:t:user.p{i:06d}.*" for i in range(count)]
    # *.p000123.alerts -> sp:t:*.p000123.alerts: a wildcard right after the prefix
    return [f"sp:t:*.p{i:06d}.alerts" for i in range(count)]


def setup_subscribers(
    redis: Redis, channels: list[str], patterns: list[str], conns: int, shared: bool = False
) -> Drain:
    socks = [connect(redis.port) for _ in range(conns)]
    for i, s in enumerate(socks):
        mine = channels if shared else channels[i::conns]
        pats = patterns[i::conns]
        payload = batched("SUBSCRIBE", mine, 1000) + batched("PSUBSCRIBE", pats, 1000)
        if payload:
            exchange(s, payload, b":%d\r\n" % (len(mine) + len(pats)))
    drain = Drain(socks)
    drain.start()
    return drain


def part1(args: argparse.Namespace, out: Results) -> dict[str, Any]:
    configs: list[dict[str, Any]] = []
    for c in (0, 1000, 20000, 100000):
        if c:
            configs.append({"sweep": "channels", "channels": c, "target": "hit"})
        configs.append({"sweep": "channels", "channels": c, "target": "miss"})
    for shape in ("prefix", "wild"):
        for p in (10, 100, 1000, 10000):
            configs.append({"sweep": "patterns", "patterns": p, "shape": shape})
    for s in (1, 16):
        configs.append({"sweep": "conns", "conns": s})
    for s in (1, 4, 16):
        configs.append({"sweep": "shared", "conns": s, "channels": 1})
    configs.append({"sweep": "combined", "channels": 100000, "patterns": 1000, "conns": 16})

    summary: dict[str, Any] = {}
    rows = []
    for cfg in configs:
        cfg = {
            "channels": 20000,
            "patterns": 0,
            "shape": "prefix",
            "conns": 4,
            "target": "hit",
        } | cfg
        shared = cfg["sweep"] == "shared"
        names = (
            [SHARED_CHANNEL]
            if shared
            else [TOPIC_CHANNEL.format(i) for i in range(cfg["channels"])]
        )
        pats = pattern_names(cfg["patterns"], cfg["shape"])
        with redis_server() as redis:
            t0 = time.perf_counter()
            drain = setup_subscribers(redis, names, pats, cfg["conns"], shared)
            setup_s = time.perf_counter() - t0
            try:
                if shared:
                    command, rand, per = ["PUBLISH", SHARED_CHANNEL, PAYLOAD], 0, cfg["conns"]
                    frame = message_frame_len(SHARED_CHANNEL, PAYLOAD)
                elif cfg["target"] == "hit":
                    command, rand, per = ["PUBLISH", BENCH_CHANNEL, PAYLOAD], cfg["channels"], 1
                    frame = message_frame_len(TOPIC_CHANNEL.format(0), PAYLOAD)
                else:
                    command, rand, per = ["PUBLISH", MISS_CHANNEL, PAYLOAD], 100000, 0
                    frame = message_frame_len(TOPIC_CHANNEL.format(0), PAYLOAD)

                probe = finish(redis, benchmark(redis, command, 1000, rand))
                drain.settle(0)
                n = int(min(3_000_000, max(1000, probe["rps"] * args.seconds)))
                runs = []
                for _ in range(args.reps):
                    d0 = drain.bytes
                    run = benchmark(redis, command, n, rand)
                    # Wait for the subscribers to have read everything, so that
                    # Redis's writes to them fall inside the CPU window.
                    drain.settle(d0 + n * per * frame)
                    run["deliveries_per_publish"] = round((drain.bytes - d0) / frame / n, 3)
                    runs.append(finish(redis, run))
                mem = redis.used_memory()
            finally:
                drain.stop()
        key = (
            f"{cfg['sweep']}:C={cfg['channels']}:P={cfg['patterns']}:{cfg['shape']}"
            f":S={cfg['conns']}:{cfg['target']}"
        )
        for i, r in enumerate(runs):
            out.write(part=1, config=cfg, key=key, rep=i, **r)
        us = med(runs, "redis_us_per_op")
        summary[key] = us
        out.write(
            part=1,
            summary=True,
            config=cfg,
            key=key,
            redis_us_per_publish_median=us,
            rps_median=med(runs, "rps"),
            setup_s=round(setup_s, 3),
            used_memory=mem,
        )
        rows.append((cfg, runs))
        print(
            f"  [1] {key}: {us:.3f} us/PUBLISH, {med(runs, 'rps') / 1000:.0f}k/s",
            file=sys.stderr,
        )

    base = summary["channels:C=20000:P=0:prefix:S=4:hit"]
    printed = []
    for cfg, runs in rows:
        label = {
            "channels": f"{cfg['channels']:>6} channels, {cfg['target']}",
            "patterns": f"{cfg['patterns']:>6} patterns ({cfg['shape']}), 20k ch",
            "conns": f"{cfg['conns']:>6} sub conns, 20k ch",
            "shared": f"1 channel x {cfg['conns']} subscribers",
            "combined": "100k ch, 1000 patterns, 16 conns",
        }[cfg["sweep"]]
        if cfg["sweep"] == "channels" and cfg["channels"] == 20000 and cfg["target"] == "hit":
            label += " (= 0 patterns, 4 conns: BASE)"
        printed.append(
            [
                label,
                spread(runs, "redis_us_per_op", "{:.3f}"),
                f"{med(runs, 'redis_us_per_op') / base:.2f}",
                spread([{"k": r["rps"] / 1000} for r in runs], "k", "{:.0f}"),
                f"{med(runs, 'redis_util'):.2f}",
                f"{med(runs, 'deliveries_per_publish'):.2f}",
            ]
        )
    table(
        f"Part 1: Redis CPU per PUBLISH ({len(PAYLOAD)}-byte message; redis-benchmark -c 4 -P 16; "
        "subscribers drained)",
        ["configuration", "Redis us/PUBLISH", "x BASE", "kPUBLISH/s", "Redis CPU", "deliv/pub"],
        printed,
    )
    # Pattern cost: linear fit through 0 and the largest pattern count.
    # Pattern cost: where PUBLISH cost reaches twice BASE (linear between measured
    # counts), and the marginal cost of one pattern between neighbouring counts.
    per_pattern: dict[str, Any] = {}
    for shape in ("prefix", "wild"):
        points = [(0, base)] + [
            (p, summary[f"patterns:C=20000:P={p}:{shape}:S=4:hit"]) for p in (10, 100, 1000, 10000)
        ]
        double = None
        for (p0, c0), (p1, c1) in itertools.pairwise(points):
            if double is None and c1 >= 2 * base:
                double = p0 + (2 * base - c0) / (c1 - c0) * (p1 - p0) if c1 > c0 else p1
        marginal = {
            f"{p0}-{p1}": round((c1 - c0) / (p1 - p0) * 1000, 1)
            for (p0, c0), (p1, c1) in itertools.pairwise(points)
        }
        per_pattern[shape] = {
            "patterns_to_double": round(double) if double is not None else None,
            "ns_per_pattern": marginal,
        }
    print(
        "  pattern scan per PUBLISH (ns per added pattern between counts): "
        + "; ".join(
            f"{s}: {v['ns_per_pattern']}, cost doubles at ~{v['patterns_to_double']} patterns"
            for s, v in per_pattern.items()
        )
    )
    out.write(part=1, summary=True, key="per_pattern", base_us=base, **per_pattern)
    return {"base_us": base, "per_pattern": per_pattern}


# ---------------------------------------------------------------- part 2


def churn_phase(sock: socket.socket, cmd: str, names: list[str], batch: int, waited: bool) -> None:
    total = len(names)
    sign = 1 if cmd == "SUBSCRIBE" else -1
    start = 0 if sign > 0 else total
    if not waited:
        exchange(sock, batched(cmd, names, batch), b":%d\r\n" % (start + sign * total))
        return
    count = start
    for i in range(0, total, batch):
        chunk = names[i : i + batch]
        count += sign * len(chunk)
        suffix = b":%d\r\n" % count
        sock.sendall(resp(cmd, *chunk))
        tail = b""
        while not tail.endswith(suffix):
            data = sock.recv(1 << 20)
            if not data:
                raise ConnectionError("redis closed the connection")
            tail = (tail + data)[-64:]


def part2(args: argparse.Namespace, out: Results) -> dict[str, Any]:
    names = [TOPIC_CHANNEL.format(i) for i in range(20000)]
    rows = []
    summary: dict[str, Any] = {}
    with redis_server() as redis:
        sock = connect(redis.port)
        try:
            for batch in (1, 100, 1000):
                for waited in (False, True):
                    style = "one reply at a time" if waited else "pipelined"
                    per_rep: list[dict[str, Any]] = []
                    for _ in range(args.reps):
                        # Repeat the cycle until Redis CPU is well above the 10 ms tick.
                        acc = {"sub_wall": 0.0, "sub_cpu": 0.0, "unsub_wall": 0.0, "unsub_cpu": 0.0}
                        cycles, t_start = 0, time.perf_counter()
                        while cycles == 0 or (
                            acc["sub_cpu"] < 0.25 * args.seconds
                            and time.perf_counter() - t_start < 2.0 * args.seconds
                        ):
                            for phase, cmd in (("sub", "SUBSCRIBE"), ("unsub", "UNSUBSCRIBE")):
                                c0, t0 = redis.cpu(), time.perf_counter()
                                churn_phase(sock, cmd, names, batch, waited)
                                acc[f"{phase}_wall"] += time.perf_counter() - t0
                                acc[f"{phase}_cpu"] += redis.cpu() - c0
                            cycles += 1
                        r = {k: v / cycles * 1000 for k, v in acc.items()}  # ms per 20k channels
                        r["cycles"] = cycles
                        per_rep.append(r)
                        out.write(part=2, batch=batch, style=style, unit="ms per 20000", **r)
                    key = f"{batch}:{style}"
                    summary[key] = {k: med(per_rep, k) for k in acc}
                    out.write(part=2, summary=True, batch=batch, style=style, **summary[key])
                    rows.append(
                        [
                            batch,
                            style,
                            -(-20000 // batch),
                            spread(per_rep, "sub_wall", "{:.0f}"),
                            spread(per_rep, "sub_cpu", "{:.0f}"),
                            f"{med(per_rep, 'sub_cpu') / 20:.2f}",
                            spread(per_rep, "unsub_wall", "{:.0f}"),
                            spread(per_rep, "unsub_cpu", "{:.0f}"),
                        ]
                    )
                    print(f"  [2] batch {batch} {style}: {summary[key]}", file=sys.stderr)
        finally:
            sock.close()
    table(
        "Part 2: SUBSCRIBE then UNSUBSCRIBE 20,000 channels on one connection "
        "(ms per 20k; Redis CPU from /proc, cycles repeated to >=250 ms CPU)",
        [
            "ch/cmd",
            "style",
            "cmds",
            "SUB wall ms",
            "SUB Redis CPU ms",
            "Redis us/ch",
            "UNSUB wall ms",
            "UNSUB CPU ms",
        ],
        rows,
    )

    # Memory per subscription, each case on a fresh server.
    mem_rows = []
    mem: dict[str, Any] = {}
    cases = [
        ("20k channels, 1 subscriber", 20000, 1, "ch"),
        ("100k channels, 1 subscriber", 100000, 1, "ch"),
        ("20k channels, 2nd subscriber on same channels", 20000, 2, "ch"),
        ("10k patterns, 1 subscriber", 10000, 1, "pat"),
    ]
    for label, count, subs, kind in cases:
        values = []
        for _ in range(args.reps):
            with redis_server() as redis:
                socks = [connect(redis.port) for _ in range(subs)]
                try:
                    if kind == "ch":
                        items, cmd = [TOPIC_CHANNEL.format(i) for i in range(count)], "SUBSCRIBE"
                    else:
                        items, cmd = pattern_names(count, "prefix"), "PSUBSCRIBE"
                    for s in socks[:-1]:
                        exchange(s, batched(cmd, items, 1000), b":%d\r\n" % count)
                    time.sleep(0.3)
                    m0 = redis.used_memory()
                    exchange(socks[-1], batched(cmd, items, 1000), b":%d\r\n" % count)
                    time.sleep(0.3)
                    m1 = redis.used_memory()
                finally:
                    for s in socks:
                        s.close()
            values.append((m1 - m0) / count)
        bpc = statistics.median(values)
        mem[label] = bpc
        out.write(part=2, memory=label, bytes_per_item=values, summary=True, median=bpc)
        mem_rows.append([label, f"{bpc:.0f} ({min(values):.0f}-{max(values):.0f})", len(items[0])])
    table(
        "Part 2b: Redis used_memory per subscription (INFO memory before/after)",
        ["case", "bytes per channel/pattern", "name length"],
        mem_rows,
    )
    return {"churn": summary, "memory": mem}


# ---------------------------------------------------------------- part 3


def subscriber_main(argv: list[str]) -> None:
    """Child process: one txredisapi SubscriberProtocol counting `--count` messages."""
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--code", required=True)
    p.add_argument("--secret", default="")
    a = p.parse_args(argv)
    sys.path.insert(0, a.code)

    import txredisapi
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol

    state = {"n": 0, "t0": 0.0, "c0": 0.0, "deliver": 0, "matched": 0}
    handle: Callable[[Any, Any, Any], None]

    if a.mode in ("count", "pcount", "rawcount"):

        def handle(pattern: Any, channel: Any, message: Any) -> None:
            pass

    else:
        from securepub.core.topics import Pattern, SubscriptionIndex
        from securepub.engines.redis import fanout as fan
        from securepub.engines.redis.signing import ClusterSigner

        index: SubscriptionIndex[int] = SubscriptionIndex()
        for i in range(1000):  # sessions on this node, none of them for user.u*
            index.add(Pattern.parse(f"user.s{i:06d}.notifications"), i)
            index.add(Pattern.parse(f"user.s{i:06d}.>"), 10000 + i)
        for i in range(10):
            index.add(Pattern.parse(f"news{i}.*"), 20000 + i)

        def deliver(topic: str, message_id: str, ts: float, body: str) -> int:
            # Broker.deliver (HEAD): the index decides; frame once if anyone wants it.
            state["deliver"] += 1
            targets = index.match(topic)
            if not targets:
                return 0
            state["matched"] += 1
            frame = (
                '{"op":"message","topic":'
                + json.dumps(topic)
                + ',"id":'
                + json.dumps(message_id)
                + ',"ts":'
                + repr(ts)
                + ',"data":'
                + body
                + "}"
            ).encode("utf-8")
            return len(frame) and len(targets)

        signer = ClusterSigner(a.secret.encode()) if a.secret else None
        codec = _codec_class()
        if codec is None:  # until d2155df: RedisFanout(commands, max_body, clock, signer)
            fanout = fan.RedisFanout(None, 65536, reactor, signer)
            fanout.start(deliver, lambda user: None)
        else:  # from d2155df: a Codec, and a receiver taking Publications

            class Receiver:
                def deliver(self, p: Any) -> int:
                    return deliver(p.topic, p.id, p.ts, p.body)

                def disconnect_local(self, user: str) -> int:
                    return 0

                def resync(self) -> None:
                    pass

            fanout = fan.RedisFanout(None, codec(65536, signer), reactor)
            fanout.start(Receiver())
        received = fanout.received

        def handle(pattern: Any, channel: Any, message: Any) -> None:
            received(channel, message)

    def on_message(pattern: Any, channel: Any, message: Any) -> None:
        n = state["n"] = state["n"] + 1
        if n == 1:
            state["t0"], state["c0"] = time.perf_counter(), time.process_time()
        handle(pattern, channel, message)
        if n == a.count:
            cpu = time.process_time() - state["c0"]
            wall = time.perf_counter() - state["t0"]
            result = {
                "mode": a.mode,
                "messages": n,
                "cpu_s": round(cpu, 4),
                "wall_s": round(wall, 4),
                "us_per_msg": round(cpu / (n - 1) * 1e6, 3),
                "msgs_per_s": round((n - 1) / wall),
                "delivered_to_index": state["deliver"],
                "index_matched": state["matched"],
            }
            print(json.dumps(result), flush=True)
            reactor.stop()

    class Counting(txredisapi.SubscriberProtocol):  # type: ignore[misc]
        def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
            on_message(pattern, channel, message)

    class RawSubscriber(Protocol):
        """A minimal RESP reader for pub/sub pushes, for comparison with txredisapi."""

        buf = b""

        def dataReceived(self, data: bytes) -> None:
            buf = self.buf + data if self.buf else data
            pos, end = 0, len(buf)
            find = buf.find
            while pos < end:
                nl = find(b"\r\n", pos)
                if nl < 0:
                    break
                p, items = nl + 2, []
                for _ in range(int(buf[pos + 1 : nl])):
                    nl = find(b"\r\n", p)
                    if nl < 0:
                        break
                    if buf[p] == 58:  # ":" integer
                        items.append(buf[p + 1 : nl])
                        p = nl + 2
                        continue
                    stop = nl + 2 + int(buf[p + 1 : nl])
                    if stop + 2 > end:
                        break
                    items.append(buf[nl + 2 : stop])
                    p = stop + 2
                else:
                    pos = p
                    if items[0] == b"message":
                        on_message(None, items[1].decode(), items[2].decode())
                    elif items[0] == b"subscribe":
                        print("ready", flush=True)
                    continue
                break
            self.buf = buf[pos:]

    def connected(p: Any) -> Any:
        if isinstance(p, RawSubscriber):
            p.transport.write(resp("SUBSCRIBE", SHARED_CHANNEL))
            return None
        d = p.psubscribe("securepub:*") if a.mode == "pcount" else p.subscribe(SHARED_CHANNEL)
        return d.addCallback(lambda _: print("ready", flush=True))

    if a.mode.startswith("raw"):
        proto: Any = RawSubscriber()
    else:
        proto = Counting(charset="utf-8", replyTimeout=3.0, convertNumbers=False)

    def failed(f: Any) -> None:
        print(json.dumps({"error": str(f.value)}), flush=True)
        reactor.stop()

    d = connectProtocol(TCP4ClientEndpoint(reactor, HOST, a.port), proto)
    d.addCallback(connected).addErrback(failed)
    reactor.callLater(120, reactor.stop)
    reactor.run()


def _codec_class() -> Any:
    """The snapshot's Codec class, or None for the layout before it had one."""
    try:
        from securepub.engines.redis.codec import Codec
    except ImportError:
        return None
    return Codec


def fanout_messages(code: str, count: int, topic: str, secret: str) -> list[bytes]:
    """`count` PUBLISH commands of valid securepub messages, as the snapshot encodes them."""
    sys.path.insert(0, code)
    try:
        from securepub.engines.redis import fanout as fan
        from securepub.engines.redis.signing import ClusterSigner

        signer = ClusterSigner(secret.encode()) if secret else None
        codec = _codec_class()
        if codec is None:

            def encode(topic: str, mid: str, ts: float, body: str) -> str:
                return str(fan.encode(topic, mid, ts, body, signer))

        else:
            encode = codec(65536, signer).encode
    finally:
        sys.path.remove(code)
    ts = time.time()
    body = '{"kind":"notification","from":"bob","text":"' + "x" * 100 + '","n":42}'
    return [
        resp("PUBLISH", SHARED_CHANNEL, encode(topic.format(i % 1000), f"nodeB-{i + 1}", ts, body))
        for i in range(count)
    ]


def publish_all(port: int, commands: list[bytes], rate: float) -> None:
    """Send the PUBLISHes, all at once (rate 0) or paced at `rate`/s, and read the replies."""
    count = len(commands)
    sock = connect(port)
    try:
        done = threading.Event()

        def reader() -> None:
            # Each reply is ":0\r\n" or ":1\r\n": 4 bytes.
            got = 0
            while got < 4 * count:
                data = sock.recv(1 << 20)
                if not data:
                    break
                got += len(data)
            done.set()

        threading.Thread(target=reader, daemon=True).start()
        if not rate:
            sock.sendall(b"".join(commands))
        else:
            sent, t0 = 0, time.perf_counter()
            while sent < count:
                due = min(count, int((time.perf_counter() - t0) * rate) + 1)
                if due > sent:
                    sock.sendall(b"".join(commands[sent:due]))
                    sent = due
                time.sleep(0.0005)
        if not done.wait(300):
            raise TimeoutError("PUBLISH replies did not arrive")
    finally:
        sock.close()


def part3(args: argparse.Namespace, out: Results) -> dict[str, Any]:
    unwanted, wanted = "user.u{:06d}.notifications", "user.s{:06d}.notifications"
    secret = "s" * 32
    # (child mode, label, message topics, cluster secret, publish rate: 0 = flood)
    rate = args.paced_rate
    modes = [
        ("count", "SUBSCRIBE, counted only", unwanted, "", 0),
        ("pcount", "PSUBSCRIBE (pmessage), counted only", unwanted, "", 0),
        ("drop", "+ RedisFanout.received + index miss (unwanted)", unwanted, "", 0),
        ("drop", "+ same, signed (HMAC verify)", unwanted, secret, 0),
        ("drop", "+ index hit, frame built (wanted)", wanted, "", 0),
        ("rawcount", "minimal RESP reader (not txredisapi), counted only", unwanted, "", 0),
        ("rawdrop", "minimal RESP reader + RedisFanout + index miss", unwanted, "", 0),
        ("count", "SUBSCRIBE, counted only", unwanted, "", rate),
        ("drop", "+ RedisFanout.received + index miss (unwanted)", unwanted, "", rate),
        ("drop", "+ same, signed (HMAC verify)", unwanted, secret, rate),
        ("rawdrop", "minimal RESP reader + RedisFanout + index miss", unwanted, "", rate),
    ]
    rows = []
    summary: dict[str, Any] = {}
    code, commit = args.code, args.commit
    with redis_server() as redis:
        for mode, label, topic, key, pace in modes:
            n = int(pace * args.seconds * 2) if pace else args.messages
            label = f"{'flood' if not pace else f'{pace:.0f}/s'}: {label}"
            runs = []
            for _ in range(args.reps):
                commands = fanout_messages(code, n, topic, key)
                child = subprocess.Popen(
                    [
                        sys.executable,
                        os.path.abspath(__file__),
                        "_subscriber",
                        "--port",
                        str(redis.port),
                        "--mode",
                        mode,
                        "--count",
                        str(n),
                        "--code",
                        code,
                        "--secret",
                        key,
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                _PROCS.append(child)
                try:
                    assert child.stdout is not None
                    line = child.stdout.readline().strip()
                    if line != "ready":
                        raise RuntimeError(f"subscriber did not start: {line}")
                    c0 = redis.cpu()
                    publish_all(redis.port, commands, pace)
                    line = child.stdout.readline()
                    child.wait(60)
                    r = json.loads(line)
                    if "error" in r or r.get("messages") != n:
                        raise RuntimeError(f"subscriber failed: {line}")
                    r["redis_us_per_publish"] = round((redis.cpu() - c0) / n * 1e6, 3)
                finally:
                    _stop(child)
                    _PROCS.remove(child)
                r.update(label=label, signed=bool(key), rate=pace, commit=commit)
                out.write(part=3, **r)
                runs.append(r)
            summary[label] = med(runs, "us_per_msg")
            out.write(part=3, summary=True, label=label, us_per_msg_median=summary[label])
            rows.append(
                [
                    label,
                    spread(runs, "us_per_msg", "{:.2f}"),
                    spread([{"k": r["msgs_per_s"] / 1000} for r in runs], "k", "{:.0f}"),
                    f"{runs[0]['delivered_to_index']}/{runs[0]['index_matched']}",
                ]
            )
            print(f"  [3] {label}: {summary[label]:.2f} us/msg", file=sys.stderr)
    table(
        f"Part 3: Python CPU per message received on one core (txredisapi, securepub "
        f"{commit}; flood = {args.messages} messages sent at once, else paced; "
        "process CPU first->last message)",
        ["receive path", "us/msg CPU", "k msg/s", "to index/matched"],
        rows,
    )
    return summary


# ---------------------------------------------------------------- part 4

LUA = """
local n = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', {trim}ARGV[1], '*', 'm', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[3])
return n
"""


def raw_run(redis: Redis, commands: list[bytes]) -> dict[str, Any]:
    """Send `commands` pipelined on one connection, then PING; Redis CPU around it all."""
    payload = b"".join(commands) + resp("PING")
    sock = connect(redis.port)
    try:
        cpu0, t0 = redis.cpu(), time.perf_counter()
        exchange(sock, payload, b"+PONG\r\n", timeout=300)
        wall = time.perf_counter() - t0
    finally:
        sock.close()
    n = len(commands)
    return finish(redis, {"n": n, "wall_s": wall, "rps": n / wall, "cpu0": cpu0})


def part4(args: argparse.Namespace, out: Results) -> dict[str, Any]:
    exact = LUA.replace("{trim}", "")
    approx = LUA.replace("{trim}", "'~', ")
    topics = 1000

    def mine(t: int) -> list[object]:
        # KEYS counter hash, stream; ARGV maxlen, ttl, message, channel.
        return [2, f"sp:seq:{t}", f"sp:h:{t}", 100, 3600, PAYLOAD, TOPIC_CHANNEL.format(t)]

    variants: list[tuple[str, str, str | None, Callable[[int], list[object]]]] = [
        ("PUBLISH (1 subscriber)", "PUBLISH", None, lambda t: [TOPIC_CHANNEL.format(t), PAYLOAD]),
        ("EVAL script (MAXLEN 100)", "EVAL", exact, mine),
        ("EVALSHA script (MAXLEN 100)", "EVALSHA", exact, mine),
        ("EVALSHA script (MAXLEN ~ 100)", "EVALSHA", approx, mine),
    ]
    committed = _publish_script(args.code)
    if committed is not None:
        # The committed history script: KEYS stream, meta; ARGV channel, message,
        # size, ttl, fresh epoch, meta ttl.
        def head_args(t: int) -> list[object]:
            keys = [2, f"sp:hs:{t}", f"sp:hm:{t}"]
            return [*keys, TOPIC_CHANNEL.format(t), PAYLOAD, 100, 3600, "0123456789abcdef", 7200]

        variants += [
            (f"EVAL {args.commit} PUBLISH_SCRIPT", "EVAL", committed, head_args),
            (f"EVALSHA {args.commit} PUBLISH_SCRIPT", "EVALSHA", committed, head_args),
        ]

    def commands(i: int, n: int) -> list[bytes]:
        _, verb, script, args_for = variants[i]
        head: list[object] = []
        if script is not None:
            head = [script if verb == "EVAL" else shas[script]]
        # A fixed spread over the topics, the same for every variant.
        return [resp(verb, *head, *args_for(k * 7919 % topics)) for k in range(n)]

    rows = []
    summary: dict[str, Any] = {}
    with redis_server() as redis:
        drain = setup_subscribers(redis, [TOPIC_CHANNEL.format(i) for i in range(topics)], [], 1)
        try:
            shas = {}
            for _, _verb, script, args_for in variants:
                if script is not None:
                    shas[script] = redis.ctl.call("SCRIPT", "LOAD", script).decode()
                    # One checked call, so that a script error cannot pass unnoticed.
                    redis.ctl.call("EVALSHA", shas[script], *args_for(0))
            # Fill every stream to MAXLEN, so that each XADD also trims, as in steady state.
            filled: set[object] = set()
            for i, (_, _, script, args_for) in enumerate(variants):
                if script is not None and args_for(0)[1] not in filled:
                    filled.add(args_for(0)[1])
                    raw_run(redis, commands(i, 110 * topics))
            sizes = []
            for i in range(len(variants)):
                probe = raw_run(redis, commands(i, 5000))
                sizes.append(int(max(5000, min(1_000_000, probe["rps"] * args.seconds))))
            results: list[list[dict[str, Any]]] = [[] for _ in variants]
            # Round-robin over the variants, so that drifts in machine load hit all alike.
            for rep in range(args.reps):
                for i, (label, *_) in enumerate(variants):
                    r = raw_run(redis, commands(i, sizes[i]))
                    out.write(part=4, label=label, rep=rep, **r)
                    results[i].append(r)
            for (label, *_), runs in zip(variants, results, strict=True):
                summary[label] = {"us": med(runs, "redis_us_per_op"), "rps": med(runs, "rps")}
                out.write(part=4, summary=True, label=label, **summary[label])
                rows.append((label, runs))
                print(f"  [4] {label}: {summary[label]}", file=sys.stderr)
            xlen = redis.ctl.call("XLEN", "sp:h:1")
        finally:
            drain.stop()
    base = summary["PUBLISH (1 subscriber)"]
    table(
        f"Part 4: Lua script vs PUBLISH ({topics} topics, one connection fully pipelined; "
        f"streams at MAXLEN, XLEN={xlen})",
        ["call", "Redis us/call", "x PUBLISH", "kcalls/s", "x PUBLISH rate", "Redis CPU"],
        [
            [
                label,
                spread(runs, "redis_us_per_op", "{:.2f}"),
                f"{med(runs, 'redis_us_per_op') / base['us']:.2f}",
                spread([{"k": r["rps"] / 1000} for r in runs], "k", "{:.0f}"),
                f"{med(runs, 'rps') / base['rps']:.2f}",
                f"{med(runs, 'redis_util'):.2f}",
            ]
            for label, runs in rows
        ],
    )
    return summary


def _publish_script(code: str) -> str | None:
    """The snapshot's history publish script, if it has one."""
    sys.path.insert(0, code)
    try:
        from securepub.engines.redis import fanout as fan
    finally:
        sys.path.remove(code)
    script = getattr(fan, "PUBLISH_SCRIPT", None)
    return None if script is None else str(script.source)


def snapshot(rev: str, into: str) -> str:
    """Extract securepub/ at `rev` into `into` (git archive: the work tree is not touched)."""
    archive = subprocess.run(
        ["git", "-C", ROOT, "archive", rev, "securepub"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return subprocess.run(
        ["git", "-C", ROOT, "rev-parse", "--short", rev], capture_output=True, text=True, check=True
    ).stdout.strip()


# ---------------------------------------------------------------- main


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_subscriber":
        subscriber_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="repetitions of each measurement")
    p.add_argument("--seconds", type=float, default=1.0, help="target length of one run")
    p.add_argument("--messages", type=int, default=20000, help="messages per part-3 run")
    p.add_argument("--paced-rate", type=float, default=5000, help="part-3 paced msgs/s")
    p.add_argument("--parts", default="1234", help="which parts to run, e.g. 13")
    p.add_argument(
        "--rev", default="HEAD", help="commit whose securepub/ parts 3-4 use (not the work tree)"
    )
    p.add_argument("--quick", action="store_true", help="2 reps, 0.5 s runs, 15k messages")
    args = p.parse_args()
    if args.quick:
        args.reps, args.seconds, args.messages = 2, 0.5, 15000
    signal.signal(signal.SIGTERM, _on_signal)
    atexit.register(_stop_all)
    os.makedirs(RESULTS, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Results(os.path.join(RESULTS, f"redis_routing-{stamp}.jsonl"))
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    with open("/proc/loadavg") as f:
        loadavg = f.read().split()[:3]
    out.write(
        part=0,
        redis=version.stdout.strip(),
        python=platform.python_version(),
        cpus=os.cpu_count(),
        loadavg_start=loadavg,
        reps=args.reps,
        seconds=args.seconds,
        messages=args.messages,
        payload_bytes=len(PAYLOAD),
    )
    print(f"redis_routing: {version.stdout.split()[2]}, {os.cpu_count()} CPUs, load {loadavg}")
    started = time.perf_counter()
    code = tempfile.TemporaryDirectory(prefix="redis_routing-")
    try:
        # The committed receive path and scripts, independent of edits in the work tree.
        args.code, args.commit = code.name, snapshot(args.rev, code.name)
        out.write(part=0, securepub_commit=args.commit)
        for part, run in (("1", part1), ("2", part2), ("3", part3), ("4", part4)):
            if part in args.parts:
                t0 = time.perf_counter()
                run(args, out)
                print(f"  (part {part}: {time.perf_counter() - t0:.0f} s)")
    finally:
        _stop_all()
        code.cleanup()
        with open("/proc/loadavg") as f:
            out.write(
                part=0,
                loadavg_end=f.read().split()[:3],
                elapsed_s=round(time.perf_counter() - started),
            )
        out.file.close()
    print(f"\n{time.perf_counter() - started:.0f} s; results in {out.path}")


if __name__ == "__main__":
    main()
