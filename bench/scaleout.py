"""Interest-based routing: what each node of a Redis cluster receives, before and after.

    .venv/bin/python bench/scaleout.py                         # 20,000 connections, 1,000 msg/s
    .venv/bin/python bench/scaleout.py --connections 8000 --rate 500 --window 15
    .venv/bin/python bench/scaleout.py --before-tree /tmp/before-tree --order after,before
    .venv/bin/python bench/scaleout.py --after-tree /tmp/after-tree --after-venv /tmp/venv-after

Starts one ``redis-server`` (free port, no persistence) and ``--nodes`` (4)
securepub nodes, each its own ``twistd -n securepub`` process on its own port,
all with ``--redis`` pointing at that server, one cluster secret, one
certificate and one API key, ``[limits]`` raised for many connections from
127.0.0.x. Then, for each scenario and each version ("before" and "after",
back to back so that both see the same machine):

* connections: the C load generator (``loadgen/wsload.c``, ``connect``
  scenario, ``--hold 1``), one process per node bound to its own source
  address 127.0.0.(10+node), opens N/nodes WebSockets on its node (ticket
  issue + redeem each) and holds them;
* ``per-user``: connection i of node g subscribes to its own exact topic
  ``bench.u<g>.c<i>`` (``--subscribe-mode distinct``); publishers send to
  random ones of those topics at ``--rate`` msg/s in total;
* ``broadcast``: every connection subscribes to ``bench.all``; publishers
  send to it at ``--broadcast-rate`` msg/s;
* publishers: ``--publishers`` Python processes (this file with
  ``--publisher``), asyncio over kept-alive HTTPS to ``/v1/publish``,
  ``--publish-conns`` connections per node, round-robin over the nodes,
  paced to the rate, payloads of about 100 bytes;
* measurement: after ``--warmup`` s of publishing, a ``--window`` s window.
  Per node, from ``/metrics`` (API key as Bearer) at both ends of the window:
  ``securepub_cluster_messages_received_total`` (messages its Redis links
  delivered to it), ``securepub_messages_in_total`` (publishes it accepted;
  their sum is the total published), ``securepub_messages_out_total``
  (copies handed to its sessions: deliveries), and the node's CPU
  (utime + stime from /proc/PID/stat); Redis's own CPU and its ``INFO
  stats`` too. The node's share is what it received from Redis over the
  total published in the same window; the node's idle CPU with its
  connections held is read over 5 s before publishing starts.

"after" is the securepub installed in this venv (twistd next to
``sys.executable``), or in ``--after-venv``; with ``--after-tree`` a
worktree of HEAD installed into its own venv (when the shared venv is being
reinstalled from a working tree that is being edited). Whether the installed
files are the tree's HEAD is checked at every cluster start and printed with
the results. "before" is commit 52537d2, where every node subscribed
to one channel (``securepub:messages``) and received every message: a git
worktree at ``--before-tree`` (made if missing) installed non-editable into
``--before-venv`` (made if missing). That tree already counts
``securepub_cluster_messages_received_total`` (in its Redis link), so both
are read the same way; Redis's ``PUBSUB NUMSUB securepub:messages`` confirms
every node holds the one channel. It has no ``max_opening_connections``
limit, so that key is written only for a tree that knows it.

A fresh Redis and fresh nodes are started for every (scenario, version).
Every process started is stopped, also on failure or Ctrl-C. Results: one
JSON line per measurement in ``bench/results/scaleout-<stamp>.jsonl`` and
Markdown tables on stdout. On a shared 2-core machine compare the ratios
(share of total, before/after), not the absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import random
import re
import resource
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

from run import build_wsload, cpu_seconds, raise_fd_limit  # noqa: E402 - bench/run.py's helpers

BEFORE_COMMIT = "52537d2"
PAYLOAD_PAD = 80  # {"n":<int>,"pad":"x..."}: about 100 bytes of data
IDLE_SECONDS = 5.0
SOURCE_BASE = 10  # generator g binds 127.0.0.(10+g)

#: Every process this script started that may still run; stopped on the way out.
_children: list[subprocess.Popen[Any]] = []


def log(message: str) -> None:
    sys.stderr.write(f"[scaleout {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, wait: float = 15) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc in _children:
        _children.remove(proc)


# ---------------------------------------------------------------- publisher process


def _body(topic: str, n: int) -> bytes:
    data = {"n": n, "pad": "x" * PAYLOAD_PAD}
    return json.dumps({"topic": topic, "data": data}, separators=(",", ":")).encode()


async def _publisher(opts: argparse.Namespace) -> dict[str, Any]:
    spec = json.loads(opts.spec)
    ports = [int(p) for p in opts.ports.split(",")]
    key = Path(opts.api_key_file).read_text().split()[0]
    ctx = ssl.create_default_context(cafile=opts.ca)
    rng = random.Random(opts.seed)
    if spec["kind"] == "distinct":
        counts = spec["counts"]

        def topic() -> str:
            g = rng.randrange(len(counts))
            return f"{spec['prefix']}{g}.c{rng.randrange(counts[g])}"
    else:

        def topic() -> str:
            return str(spec["topic"])

    queues: list[asyncio.Queue[bytes | None]] = [asyncio.Queue() for _ in ports]
    stats: Counter[str] = Counter()

    async def worker(port: int, queue: asyncio.Queue[bytes | None]) -> None:
        head = (
            f"POST /v1/publish HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            "Content-Length: "
        ).encode()
        # Connected on first use and again after a drop: a node closes a
        # connection that sends no request headers within 10 s (slowloris
        # guard), which a slow rate spread over many connections can hit.
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            while (body := await queue.get()) is not None:
                request = head + str(len(body)).encode() + b"\r\n\r\n" + body
                for attempt in range(2):
                    try:
                        if writer is None or reader is None:
                            reader, writer = await asyncio.open_connection(
                                "127.0.0.1", port, ssl=ctx
                            )
                            stats["connects"] += 1
                        writer.write(request)
                        header = await reader.readuntil(b"\r\n\r\n")
                        match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", header)
                        await reader.readexactly(int(match.group(1)) if match else 0)
                    except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
                        if writer is not None:
                            writer.close()
                        reader = writer = None
                        stats["retried" if attempt == 0 else "lost"] += 1
                        continue
                    status = header[9:12].decode()
                    stats["ok" if status == "202" else f"status_{status}"] += 1
                    if re.search(rb"(?i)\r\nconnection:\s*close", header):
                        writer.close()
                        reader = writer = None
                    break
        finally:
            if writer is not None:
                writer.close()

    workers = [
        asyncio.create_task(worker(port, queue))
        for port, queue in zip(ports, queues, strict=True)
        for _ in range(opts.publish_conns)
    ]
    loop = asyncio.get_running_loop()
    start = loop.time()
    issued = skipped = max_backlog = 0
    limit = max(100, int(opts.rate))  # more than ~1 s behind: drop rather than queue forever
    while (now := loop.time()) < start + opts.duration:
        due = int((now - start) * opts.rate)
        while issued + skipped < due:
            queue = queues[(issued + skipped) % len(queues)]
            if queue.qsize() > limit / len(queues):
                skipped += 1
                continue
            queue.put_nowait(_body(topic(), issued))
            issued += 1
        max_backlog = max(max_backlog, sum(q.qsize() for q in queues))
        await asyncio.sleep(0.005)
    for queue in queues:
        for _ in range(opts.publish_conns):
            queue.put_nowait(None)
    done, pending = await asyncio.wait(workers, timeout=30)
    for task in pending:
        task.cancel()
    errors = [repr(t.exception())[:200] for t in done if not t.cancelled() and t.exception()]
    wall = loop.time() - start
    return {
        "issued": issued,
        "skipped": skipped,
        "max_backlog": max_backlog,
        "wall_s": round(wall, 3),
        "rate_asked": opts.rate,
        "rate_sent": round(stats["ok"] / opts.duration, 1),
        "worker_errors": errors,
        **stats,
    }


def publisher_main(opts: argparse.Namespace) -> int:
    result = asyncio.run(_publisher(opts))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = round(usage.ru_utime + usage.ru_stime, 3)
    print(json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------- the cluster


@dataclass
class Version:
    name: str  # "before" or "after"
    bindir: Path
    tree: Path  # the checkout its securepub should match
    knows_opening_limit: bool

    def label(self) -> str:
        """Read at every cluster start: someone may reinstall the venv meanwhile."""
        return installed_label(self.bindir, self.tree, "HEAD")

    @property
    def twistd(self) -> Path:
        return self.bindir / "twistd"


def site_file(bindir: Path, relative: str) -> Path | None:
    found = sorted(bindir.parent.glob(f"lib/python*/site-packages/{relative}"))
    return found[0] if found else None


def installed_label(bindir: Path, tree: Path, rev: str) -> str:
    """``rev``, and whether the venv's securepub/*.py are that commit's (twistd runs those)."""
    git = ["git", "-C", str(tree)]
    try:
        short = subprocess.run(
            [*git, "rev-parse", "--short", rev], capture_output=True, text=True, check=True
        ).stdout.strip()
        names = subprocess.run(
            [*git, "ls-tree", "-r", "--name-only", rev, "securepub"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return f"{rev} (not checked)"
    differ = 0
    for name in names:
        if not name.endswith(".py"):
            continue
        installed = site_file(bindir, name)
        blob = subprocess.run([*git, "show", f"{rev}:{name}"], capture_output=True).stdout
        if installed is None or installed.read_bytes() != blob:
            differ += 1
    where = bindir.parent
    if differ:
        return f"{short}, but {differ} installed files in {where} differ from it"
    return f"{short}, installed in {where} (matches)"


def make_version(name: str, bindir: Path, tree: Path) -> Version:
    settings = site_file(bindir, "securepub/server/settings.py")
    if settings is None or not (bindir / "twistd").exists():
        raise SystemExit(f"scaleout: no securepub/twistd installed under {bindir.parent}")
    knows = "max_opening_connections" in settings.read_text()
    return Version(name, bindir, tree, knows)


def prepare(name: str, tree: Path, venv: Path, commit: str) -> Version:
    """A worktree of ``commit`` (made if missing) installed, not editable, into ``venv``."""
    if not tree.exists():
        log(f"making a worktree of {commit} at {tree}")
        cmd = ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit]
        subprocess.run(cmd, check=True, capture_output=True)
    if not (venv / "bin" / "twistd").exists():
        log(f"making {venv} with {tree} installed")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "-q", str(tree)]
        subprocess.run(pip, check=True, capture_output=True)
    return make_version(name, venv / "bin", tree)


@dataclass
class Node:
    index: int
    port: int
    directory: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.directory / "server.log"

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            text = ""
        out = (self.directory / "stdout.txt").read_text(errors="replace") if self.proc else ""
        return "\n".join((out + text).strip().splitlines()[-lines:])


@dataclass
class Cluster:
    version: Version
    workdir: Path
    creds: dict[str, str]
    nodes: list[Node] = field(default_factory=list)
    redis: Any = None

    def start(self, count: int) -> None:
        from tests.redis_server import RedisServer
        from tests.server import free_port, server_env

        self.redis = RedisServer().start()
        assert self.redis.proc is not None
        _children.append(self.redis.proc)
        config = self.workdir / f"{self.version.name}.toml"
        lines = [
            f'cluster_secret_file = "{self.creds["secret"]}"',
            "",
            "[limits]",
            "max_connections_per_ip = 60000",
            "max_errors = 1000",
        ]
        if self.version.knows_opening_limit:
            lines.append("max_opening_connections = 4000")
        config.write_text("\n".join(lines) + "\n")
        for index in range(count):
            directory = self.workdir / f"{self.version.name}-node{index}"
            directory.mkdir(exist_ok=True)
            node = Node(index, free_port(), directory)
            cmd = [str(self.version.twistd), "-n", "--pidfile=", "--logfile"]
            cmd += [str(node.log_path), "securepub", "--port", str(node.port)]
            cmd += ["--cert", self.creds["cert"], "--key", self.creds["key"]]
            cmd += ["--api-key-file", self.creds["api_key_file"], "--config", str(config)]
            cmd += ["--redis", self.redis.url(db=0)]
            with (directory / "stdout.txt").open("ab") as out:
                node.proc = subprocess.Popen(
                    cmd,
                    cwd=directory,
                    env=server_env(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            _children.append(node.proc)
            self.nodes.append(node)
        for node in self.nodes:
            self.wait_healthy(node)

    def connection(self, node: Node, timeout: float = 10) -> http.client.HTTPSConnection:
        ctx = ssl.create_default_context(cafile=self.creds["ca"])
        return http.client.HTTPSConnection("127.0.0.1", node.port, context=ctx, timeout=timeout)

    def wait_healthy(self, node: Node, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert node.proc is not None
            if node.proc.poll() is not None:
                raise RuntimeError(f"node {node.index} exited:\n{node.tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException, ssl.SSLError):
                conn = self.connection(node, timeout=2)
                try:
                    conn.request("GET", "/healthz")
                    response = conn.getresponse()
                    response.read()
                    if response.status == 200:
                        return
                finally:
                    conn.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {node.index} not healthy in {timeout}s:\n{node.tail()}")
            time.sleep(0.1)

    def metrics(self, node: Node) -> dict[str, float]:
        conn = self.connection(node)
        try:
            conn.request(
                "GET", "/metrics", headers={"Authorization": f"Bearer {self.creds['api_key']}"}
            )
            response = conn.getresponse()
            text = response.read().decode()
        finally:
            conn.close()
        if response.status != 200:
            raise RuntimeError(f"node {node.index}: /metrics answered {response.status}")
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    values[name] = float(value)
        return values

    def redis_info(self) -> dict[str, str]:
        info = self.redis.command("INFO", "stats")
        out = {}
        for line in info.splitlines():
            key, _, value = line.partition(":")
            if key in ("pubsub_channels", "pubsub_patterns", "total_commands_processed"):
                out[key] = value.strip()
        numsub = self.redis.command("PUBSUB", "NUMSUB", "securepub:messages").split()
        out["numsub_securepub_messages"] = numsub[-1] if numsub else "?"
        return out

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            if node.proc is not None:
                stop_process(node.proc)
        if self.redis is not None:
            if self.redis.proc is not None and self.redis.proc in _children:
                _children.remove(self.redis.proc)
            self.redis.cleanup()
            self.redis = None


def write_shared_credentials(directory: Path) -> dict[str, str]:
    from tests.server import write_credentials

    creds = write_credentials(str(directory))
    secret = directory / "cluster-secret"
    secret.write_text(secrets.token_hex(32) + "\n")
    secret.chmod(0o600)
    creds["secret"] = str(secret)
    return creds


# ---------------------------------------------------------------- one measurement


#: The counters read from every node, by short name.
SERIES = {
    "received": "securepub_cluster_messages_received_total",
    "in": "securepub_messages_in_total",
    "out": "securepub_messages_out_total",
    "slow": 'securepub_security_events_total{event="slow_consumer"}',
}


def snapshot(cluster: Cluster, extra_pids: list[int]) -> dict[str, Any]:
    nodes = []
    for node in cluster.nodes:
        values = cluster.metrics(node)
        row = {short: values.get(name, 0.0) for short, name in SERIES.items()}
        row["open"] = values.get("securepub_open_connections", 0.0)
        row["channels"] = sum(
            v for k, v in values.items() if k.startswith("securepub_redis_channels")
        )
        row["cpu"] = cpu_seconds(node.pid)
        nodes.append(row)
    others = 0.0
    for pid in extra_pids:
        with contextlib.suppress(OSError):
            others += cpu_seconds(pid)
    return {
        "t": time.monotonic(),
        "nodes": nodes,
        "redis_cpu": cpu_seconds(cluster.redis.proc.pid),
        "others_cpu": others,
    }


def wait_idle(pids: list[int], limit: float = 0.05, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = [cpu_seconds(p) for p in pids]
        time.sleep(0.5)
        busy = [(cpu_seconds(p) - b) / 0.5 for p, b in zip(pids, before, strict=True)]
        if max(busy) <= limit:
            return
    log(f"nodes still busy after {timeout:.0f} s; measuring anyway")


def start_generators(
    cluster: Cluster, wsload: Path, scenario: str, counts: list[int], logdir: Path
) -> list[Any]:
    from connections import start_generator

    gens = []
    for node, count in zip(cluster.nodes, counts, strict=True):
        source = f"127.0.0.{SOURCE_BASE + node.index}"
        cmd = [str(wsload), "--scenario", "connect", "--target", "ours"]
        cmd += ["--port", str(node.port), "--ca", cluster.creds["ca"]]
        cmd += ["--api-key", cluster.creds["api_key"], "--server-pid", str(node.pid)]
        cmd += ["--connections", str(count), "--source", source, "--settle", "1"]
        if scenario == "per-user":
            cmd += ["--subscribe-mode", "distinct", "--topic", f"bench.u{node.index}"]
        else:
            cmd += ["--subscribe-mode", "same", "--topic", "bench.all"]
        cmd += ["--timeout", str(int(120 + count / 20))]
        gen = start_generator(cmd, source, count, logdir)
        _children.append(gen.proc)
        gens.append(gen)
    return gens


def release_generators(gens: list[Any]) -> None:
    from connections import release

    release(gens)
    for gen in gens:
        if gen.proc in _children:
            _children.remove(gen.proc)


def start_publishers(
    cluster: Cluster, opts: argparse.Namespace, spec: dict[str, Any], rate: float, duration: float
) -> list[subprocess.Popen[str]]:
    procs = []
    ports = ",".join(str(n.port) for n in cluster.nodes)
    for index in range(opts.publishers):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--publisher"]
        cmd += ["--ports", ports, "--ca", cluster.creds["ca"]]
        cmd += ["--api-key-file", cluster.creds["api_key_file"], "--spec", json.dumps(spec)]
        cmd += ["--rate", str(rate / opts.publishers), "--duration", str(duration)]
        cmd += ["--publish-conns", str(opts.publish_conns), "--seed", str(index)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _children.append(proc)
        procs.append(proc)
    return procs


def collect_publishers(procs: list[subprocess.Popen[str]], timeout: float) -> list[dict[str, Any]]:
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        if proc in _children:
            _children.remove(proc)
        lines = out.strip().splitlines()
        if proc.returncode != 0 or not lines:
            results.append({"error": (err.strip().splitlines() or ["no output"])[-1][:300]})
        else:
            results.append(json.loads(lines[-1]))
    return results


def measure(
    version: Version,
    scenario: str,
    opts: argparse.Namespace,
    wsload: Path,
    creds: dict[str, str],
    workdir: Path,
) -> dict[str, Any]:
    """One fresh cluster, N held connections, publishers at the scenario's rate, one window."""
    n = opts.connections
    counts = [n // opts.nodes + (1 if g < n % opts.nodes else 0) for g in range(opts.nodes)]
    rate = opts.rate if scenario == "per-user" else opts.broadcast_rate
    result: dict[str, Any] = {
        "scenario": scenario,
        "version": version.name,
        "securepub": version.label(),
        "connections": n,
        "nodes": opts.nodes,
        "rate_asked": rate,
        "window_s": opts.window,
        "loadavg_start": os.getloadavg()[0],
    }
    cluster = Cluster(version, workdir, creds)
    gens: list[Any] = []
    publishers: list[subprocess.Popen[str]] = []
    try:
        cluster.start(opts.nodes)
        log(f"{version.name} {scenario}: {opts.nodes} nodes up; opening {n:,} connections")
        t0 = time.monotonic()
        gens = start_generators(cluster, wsload, scenario, counts, workdir)
        from connections import wait_connected

        for gen in gens:
            wait_connected(gen, 180 + gen.count / 20)
        result["connect_s"] = round(time.monotonic() - t0, 1)
        result["opened"] = sum(g.result["opened"] for g in gens)
        result["still_open"] = sum(g.result["still_open"] for g in gens)
        result["subscribed"] = sum(g.result.get("subscribed", 0) for g in gens)
        result["connect_failed"] = sum(g.result["failed"] for g in gens)
        result["subscribe_refused"] = sum(g.result.get("subscribe_refused", 0) for g in gens)
        log(
            f"  {result['still_open']:,} open, {result['subscribed']:,} subscribed in "
            f"{result['connect_s']} s ({result['connect_failed']} failed)"
        )
        pids = [node.pid for node in cluster.nodes]
        wait_idle(pids)
        gen_pids = [g.proc.pid for g in gens]
        idle0 = snapshot(cluster, gen_pids)
        time.sleep(IDLE_SECONDS)
        idle1 = snapshot(cluster, gen_pids)
        wall = idle1["t"] - idle0["t"]
        result["idle_cpu_pct"] = [
            round(100 * (b["cpu"] - a["cpu"]) / wall, 1)
            for a, b in zip(idle0["nodes"], idle1["nodes"], strict=True)
        ]
        if scenario == "per-user":
            spec: dict[str, Any] = {"kind": "distinct", "prefix": "bench.u", "counts": counts}
        else:
            spec = {"kind": "same", "topic": "bench.all"}
        duration = opts.warmup + opts.window + 2
        publishers = start_publishers(cluster, opts, spec, rate, duration)
        time.sleep(opts.warmup)
        first = snapshot(cluster, gen_pids + [p.pid for p in publishers])
        time.sleep(opts.window)
        last = snapshot(cluster, gen_pids + [p.pid for p in publishers])
        result["redis_info"] = cluster.redis_info()
        result["publishers"] = collect_publishers(publishers, duration + 60)
        publishers = []
        result.update(summarize(first, last, scenario, n))
        # Every message published, counted once all of them are through.
        wait_idle(pids)
        result.update(totals(idle1, snapshot(cluster, gen_pids), scenario, n))
        dead = [node.index for node in cluster.nodes if node.proc and node.proc.poll() is not None]
        if dead:
            raise RuntimeError(f"nodes {dead} died")
    except (RuntimeError, OSError, subprocess.SubprocessError, KeyError, ValueError) as e:
        result["error"] = str(e)[:800]
        log(f"  failed: {result['error']}")
    finally:
        for proc in publishers:
            stop_process(proc, signal.SIGKILL)
        release_generators(gens)
        cluster.stop()
    result["loadavg_end"] = os.getloadavg()[0]
    return result


def totals(before: dict[str, Any], after: dict[str, Any], scenario: str, n: int) -> dict[str, Any]:
    """From before the first publish to after the last one was handled: exact counts."""
    deltas = [
        {k: b[k] - a[k] for k in ("received", "in", "out", "slow")}
        for a, b in zip(before["nodes"], after["nodes"], strict=True)
    ]
    published = sum(d["in"] for d in deltas)
    fanout = 1 if scenario == "per-user" else n
    return {
        "all_published": published,
        "all_received": [d["received"] for d in deltas],
        "all_share": [round(d["received"] / published, 4) if published else None for d in deltas],
        "all_deliveries": sum(d["out"] for d in deltas),
        "all_delivery_ratio": (
            round(sum(d["out"] for d in deltas) / (published * fanout), 5) if published else None
        ),
        "all_slow_consumers": sum(d["slow"] for d in deltas),
    }


def summarize(first: dict[str, Any], last: dict[str, Any], scenario: str, n: int) -> dict[str, Any]:
    wall = last["t"] - first["t"]
    deltas = [
        {k: b[k] - a[k] for k in ("received", "in", "out", "slow", "cpu")}
        for a, b in zip(first["nodes"], last["nodes"], strict=True)
    ]
    published = sum(d["in"] for d in deltas)
    delivered = sum(d["out"] for d in deltas)
    fanout = 1 if scenario == "per-user" else n
    per_node = [
        {
            "received_per_s": round(d["received"] / wall, 1),
            "share": round(d["received"] / published, 4) if published else None,
            "published_per_s": round(d["in"] / wall, 1),
            "deliveries_per_s": round(d["out"] / wall, 1),
            "cpu_pct": round(100 * d["cpu"] / wall, 1),
            "slow_consumers": d["slow"],
            "open": last["nodes"][i]["open"],
            "redis_channels": last["nodes"][i]["channels"],
        }
        for i, d in enumerate(deltas)
    ]
    node_cpu = sum(d["cpu"] for d in deltas)
    return {
        "window_wall_s": round(wall, 2),
        "per_node": per_node,
        "published_per_s": round(published / wall, 1),
        "received_per_s_total": round(sum(d["received"] for d in deltas) / wall, 1),
        "deliveries_per_s": round(delivered / wall, 1),
        "delivery_ratio": round(delivered / (published * fanout), 4) if published else None,
        "nodes_cpu_pct": round(100 * node_cpu / wall, 1),
        "node_cpu_us_per_published": round(1e6 * node_cpu / published, 1) if published else None,
        "node_cpu_ns_per_delivery": round(1e9 * node_cpu / delivered, 1) if delivered else None,
        "redis_cpu_pct": round(100 * (last["redis_cpu"] - first["redis_cpu"]) / wall, 1),
        "load_cpu_pct": round(100 * (last["others_cpu"] - first["others_cpu"]) / wall, 1),
    }


# ---------------------------------------------------------------- tables


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}"
    if abs(value) < 100:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def tables(results: list[dict[str, Any]]) -> str:
    out: list[str] = []
    for scenario in ("per-user", "broadcast"):
        rows = [r for r in results if r["scenario"] == scenario]
        if not rows:
            continue
        first = rows[0]
        out.append(
            f"\n### {scenario}: {first['connections']:,} connections over {first['nodes']} nodes, "
            f"{first['rate_asked']:g} msg/s asked, {first['window_s']:g} s window\n"
        )
        out.append(
            "| version | node | received from Redis/s | share of published (whole run) | "
            "deliveries/s | CPU % (idle CPU %) |"
        )
        out.append("|---|---|---|---|---|---|")
        for r in rows:
            if "error" in r:
                out.append(f"| {r['version']} | - | error: {r['error'][:120]} | | | |")
                continue
            for i, node in enumerate(r["per_node"]):
                share = "-" if node["share"] is None else f"{100 * node['share']:.1f}%"
                exact = r.get("all_share", [None] * len(r["per_node"]))[i]
                if exact is not None:
                    share += f" ({100 * exact:.1f}%)"
                out.append(
                    f"| {r['version']} | {i} | {_num(node['received_per_s'])} | {share} | "
                    f"{_num(node['deliveries_per_s'])} | {node['cpu_pct']:.1f} "
                    f"({r['idle_cpu_pct'][i]:.1f}) |"
                )
            out.append(
                f"| {r['version']} | all | {_num(r['received_per_s_total'])} | "
                f"published {_num(r['published_per_s'])}/s | {_num(r['deliveries_per_s'])} "
                f"(ratio {r['delivery_ratio']}) | {r['nodes_cpu_pct']:.1f} |"
            )
            if "all_published" in r:
                out.append(
                    f"| {r['version']} | whole run | {_num(sum(r['all_received']))} received "
                    f"| published {_num(r['all_published'])} | {_num(r['all_deliveries'])} "
                    f"(ratio {r['all_delivery_ratio']}, slow consumers "
                    f"{r['all_slow_consumers']:.0f}) | |"
                )
        out.append("")
        out.append(
            "| version | open / subscribed | node CPU us per published | node CPU ns per delivery "
            "| Redis CPU % | generators + publishers CPU % | Redis pubsub_channels |"
        )
        out.append("|---|---|---|---|---|---|---|")
        for r in rows:
            if "error" in r:
                continue
            info = r.get("redis_info", {})
            out.append(
                f"| {r['version']} | {r['still_open']:,} / {r['subscribed']:,} | "
                f"{r['node_cpu_us_per_published']} | {r['node_cpu_ns_per_delivery']} | "
                f"{r['redis_cpu_pct']} | {r['load_cpu_pct']} | "
                f"{info.get('pubsub_channels', '?')} (NUMSUB securepub:messages "
                f"{info.get('numsub_securepub_messages', '?')}) |"
            )
        by = {r["version"]: r for r in rows if "error" not in r}
        if "before" in by and "after" in by:
            b, a = by["before"], by["after"]
            ratios = []
            for key, label in (
                ("received_per_s_total", "received from Redis/s, all nodes"),
                ("deliveries_per_s", "deliveries/s"),
                ("nodes_cpu_pct", "node CPU, all nodes"),
                ("node_cpu_us_per_published", "node CPU per published message"),
                ("redis_cpu_pct", "Redis CPU"),
            ):
                if b.get(key) and a.get(key) is not None:
                    ratios.append(f"{label} {a[key] / b[key]:.3f}x")
            out.append("\nafter / before: " + "; ".join(ratios))
    return "\n".join(out)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=20000, help="WebSockets in all (20000)")
    parser.add_argument("--nodes", type=int, default=4, help="securepub nodes (4)")
    parser.add_argument("--rate", type=float, default=1000, help="per-user msg/s in all (1000)")
    parser.add_argument("--broadcast-rate", type=float, default=2, help="broadcast msg/s (2)")
    parser.add_argument("--window", type=float, default=25, help="measurement window, s (25)")
    parser.add_argument("--warmup", type=float, default=5, help="publishing before it, s (5)")
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes (2)")
    parser.add_argument("--publish-conns", type=int, default=3, help="HTTPS conns per node (3)")
    parser.add_argument("--scenarios", default="per-user,broadcast")
    parser.add_argument("--order", default="before,after", help="versions, in order")
    parser.add_argument("--before-tree", default="/tmp/before-tree", help="worktree of 52537d2")
    parser.add_argument("--before-venv", default="/tmp/venv-before", help="its venv")
    parser.add_argument(
        "--after-venv", help="venv whose securepub is 'after' (default: this Python's)"
    )
    parser.add_argument(
        "--after-tree",
        help="checkout matching 'after' (a worktree of HEAD is made if missing and installed "
        "into --after-venv, default /tmp/venv-after, if that has none)",
    )
    parser.add_argument("--output", help="JSON lines file (results/scaleout-<stamp>.jsonl)")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder and logs")
    # The publisher subprocess.
    parser.add_argument("--publisher", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    parser.add_argument("--ca", help=argparse.SUPPRESS)
    parser.add_argument("--api-key-file", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--duration", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.publisher:
        return publisher_main(opts)

    if shutil.which("redis-server") is None:
        raise SystemExit("scaleout: redis-server is needed")
    wsload = build_wsload()
    if wsload is None:
        raise SystemExit("scaleout: cannot build bench/loadgen/wsload (cc, libssl-dev)")
    fds = raise_fd_limit()
    per_node = -(-opts.connections // opts.nodes)
    if per_node + 400 > fds:
        raise SystemExit(f"scaleout: {per_node:,} connections per node need more than {fds:,} fds")
    if opts.after_tree:
        venv = Path(opts.after_venv or "/tmp/venv-after")
        after = prepare("after", Path(opts.after_tree), venv, "HEAD")
    else:
        bindir = Path(opts.after_venv) / "bin" if opts.after_venv else Path(sys.executable).parent
        after = make_version("after", bindir, REPO)
    versions = {"after": after}
    order = [v.strip() for v in opts.order.split(",") if v.strip()]
    if "before" in order:
        tree, venv = Path(opts.before_tree), Path(opts.before_venv)
        versions["before"] = prepare("before", tree, venv, BEFORE_COMMIT)
    scenarios = [s.strip() for s in opts.scenarios.split(",") if s.strip()]
    for s in scenarios:
        if s not in ("per-user", "broadcast"):
            raise SystemExit(f"scaleout: unknown scenario {s!r}")
    stamp = time.strftime("%Y%m%dT%H%M%S")
    results_dir = BENCH / "results"
    results_dir.mkdir(exist_ok=True)
    output = Path(opts.output) if opts.output else results_dir / f"scaleout-{stamp}.jsonl"
    workdir = Path(tempfile.mkdtemp(prefix="securepub-scaleout-"))
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        creds = write_shared_credentials(workdir)
        with output.open("a") as sink:
            for scenario in scenarios:
                for name in order:
                    result = measure(versions[name], scenario, opts, wsload, creds, workdir)
                    result.update(run=stamp, cpus=os.cpu_count(), fd_limit=fds)
                    results.append(result)
                    sink.write(json.dumps(result) + "\n")
                    sink.flush()
                    if "error" not in result:
                        shares = ", ".join(
                            f"{100 * (p['share'] or 0):.1f}%" for p in result["per_node"]
                        )
                        log(
                            f"  published {result['published_per_s']:,.1f}/s, received shares "
                            f"{shares}, deliveries {result['deliveries_per_s']:,.0f}/s, "
                            f"nodes CPU {result['nodes_cpu_pct']}%"
                        )
    finally:
        for proc in list(_children):
            stop_process(proc, signal.SIGKILL, wait=5)
        if opts.keep:
            log(f"run folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"securepub scale-out routing; {os.cpu_count()} cores; run {stamp}, "
          f"{time.monotonic() - started:.0f} s")  # fmt: skip
    for name in order:
        labels = sorted({r["securepub"] for r in results if r["version"] == name})
        print(f"{name}: {' / '.join(labels)}")
    print(tables(results))
    print(f"\nresults: {output}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
