"""Cheap connections: memory per idle WebSocket and server CPU per new one, against the ceiling.

    .venv/bin/python bench/connections.py                      # 10k and 50k, 3 repetitions
    .venv/bin/python bench/connections.py --quick              # 2,000 connections, once
    .venv/bin/python bench/connections.py --counts 10000 --subscribe none --repeat 2
    .venv/bin/python bench/connections.py --profile            # py-spy of a connect storm too

For every repetition, count and subscription mode, starts a fresh securepub
(``twistd -n securepub --dev`` from this venv, in a temporary folder, with
``[limits] max_connections_per_ip`` raised) and a fresh ceiling
(``ceiling_server.py``, same certificate), each pinned to core 0, warms each
up with a few hundred connections, then opens N WebSocket connections with
the C load generator (``loadgen/wsload.c``, ``connect`` scenario, pinned to
core 1) and holds them open, idle:

* securepub: every connection is one ``POST /v1/tickets`` on one of four
  kept-alive HTTPS connections, then a WebSocket handshake redeeming it;
  the ceiling: the WebSocket handshake alone (it has no tickets);
* memory: (VmRSS with N open - VmRSS before) / N, read once the server is idle;
* CPU: the server's utime + stime (/proc/PID/stat) over the connect window
  of each generator, per connection opened; handshakes/s over the same window;
* ``--subscribe distinct`` subscribes every connection to a topic of its own
  (``bench.idle.c<i>``; the ceiling adds it to its broadcast set) before
  memory is read; ``none`` subscribes to nothing.

Connections above ``--per-generator`` are spread over several generator
processes, each bound to its own source address 127.0.0.x (one address has
~28k ephemeral ports towards one server port) and holding its connections
until this script lets go. N is capped by the open-file limit (the server
needs one descriptor per connection): a count above it is measured at the
largest count that fits, and the table says so. Ratios are securepub over
the ceiling within the same repetition; the table shows their median and
range. Every measurement goes to ``bench/results/connections-<stamp>.jsonl``.
Everything runs on 127.0.0.1 and everything started is stopped.

The securepub measured is the one installed in this venv (reinstall after
changing securepub/: ``.venv/bin/pip install -q --no-deps --force-reinstall .``),
or the working tree with ``--tree``, or an export with ``--pythonpath DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import shutil
import signal
import statistics
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

from run import (  # noqa: E402 - bench/run.py's helpers, shared
    build_wsload,
    cpu_seconds,
    free_port,
    git_rev,
    raise_fd_limit,
    wait_healthy,
)

SERVER_CORE = "0"
GENERATOR_CORE = "1"

CONFIG_TOML = """\
# securepub's configuration for bench/connections.py (written into the run's folder).
[limits]
max_connections_per_ip = 60000   # every bench connection comes from 127.0.0.x
"""

#: Descriptors the server needs besides its connections (listener, logs, epoll, ...).
FD_MARGIN = 400
#: Connections per generator process: under its open-file limit and the
#: ~28k ephemeral ports one source address has towards one server port.
PER_GENERATOR = 15000
WARMUP_CONNECTIONS = 300


def installed_rev() -> str:
    """HEAD, and whether the venv's securepub is HEAD's (it is what twistd runs)."""
    try:
        cmd = ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]
        head = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "installed"
    return f"installed, HEAD {head}"


def securepub_origin(pythonpath: str | None) -> str:
    """Which securepub twistd will run, and when the venv's was installed."""
    if pythonpath:
        return f"from {pythonpath}"
    found = sorted(Path(sys.executable).parent.parent.glob("lib/python*/site-packages/securepub-*"))
    stamp = time.strftime("%H:%M:%S", time.localtime(found[0].stat().st_mtime)) if found else "?"
    return f"installed in venv (at {stamp})"


def log(message: str) -> None:
    sys.stderr.write(f"[connections] {message}\n")
    sys.stderr.flush()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


# ---------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    cmd: list[str]
    workdir: Path
    env: dict[str, str] | None = None
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, ca: Path | None) -> None:
        self.port = free_port()
        self.log_path = self.workdir / f"{self.name}.log"
        cmd = [part.replace("{port}", str(self.port)) for part in self.cmd]
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=self.workdir, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        if ca is None:  # securepub's first start writes the certificates
            ca = self.workdir / "certs" / "ca.pem"
            deadline = time.monotonic() + 30
            while not ca.exists() and time.monotonic() < deadline and self.alive():
                time.sleep(0.1)
        wait_healthy(self, ca)  # type: ignore[arg-type]

    def stop(self) -> None:
        """SIGTERM (twistd ignores SIGINT when started from a background shell), then kill."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def make_servers(workdir: Path, pythonpath: str | None) -> tuple[Server, Server]:
    bindir = Path(sys.executable).parent
    (workdir / "connections.toml").write_text(CONFIG_TOML)
    ours_cmd = ["taskset", "-c", SERVER_CORE, str(bindir / "twistd"), "-n", "--pidfile="]
    ours_cmd += ["securepub", "--dev", "--config", "connections.toml", "--port", "{port}"]
    env = None
    if pythonpath:
        path = [pythonpath, os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    ceiling_cmd = ["taskset", "-c", SERVER_CORE, sys.executable, str(BENCH / "ceiling_server.py")]
    ceiling_cmd += ["--port", "{port}", "--cert", "certs/server.pem", "--key", "certs/server.key"]
    return Server("ours", ours_cmd, workdir, env), Server("ceiling", ceiling_cmd, workdir)


def wait_idle(pid: int, limit: float = 0.03, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        time.sleep(0.5)
        if (cpu_seconds(pid) - before) / 0.5 <= limit:
            return
    log(f"pid {pid} still busy after {timeout:.0f} s; measuring anyway")


# ---------------------------------------------------------------- generators


@dataclass
class Generator:
    proc: subprocess.Popen[bytes]
    source: str
    count: int
    result: dict[str, Any] = field(default_factory=dict)
    stderr_path: Path = field(default_factory=Path)


def generator_args(
    wsload: Path, server: Server, api_key: str, ca: Path, count: int, source: str, mode: str
) -> list[str]:
    cmd = ["taskset", "-c", GENERATOR_CORE, str(wsload), "--scenario", "connect"]
    cmd += ["--target", server.name, "--port", str(server.port), "--ca", str(ca)]
    cmd += ["--api-key", api_key, "--server-pid", str(server.pid)]
    cmd += ["--connections", str(count), "--source", source, "--settle", "1"]
    cmd += ["--subscribe-mode", mode, "--topic", "bench.idle"]
    cmd += ["--timeout", str(int(120 + count / 50))]
    return cmd


def start_generator(cmd: list[str], source: str, count: int, logdir: Path) -> Generator:
    stderr_path = logdir / f"wsload-{source}-{time.monotonic_ns()}.log"
    with stderr_path.open("w") as err:
        proc = subprocess.Popen(
            [*cmd, "--hold", "1"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            bufsize=0,
        )
    return Generator(proc, source, count, stderr_path=stderr_path)


def wait_connected(gen: Generator, timeout: float) -> None:
    """Read the generator's two JSON lines: its connect result, then its hold line."""
    assert gen.proc.stdout is not None
    fd = gen.proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    while data.count(b"\n") < 2:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"generator {gen.source}: no result in {timeout:.0f} s")
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                tail = gen.stderr_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"generator {gen.source} exited: {' | '.join(tail)}")
            data += chunk
    first, second = data.decode().splitlines()[:2]
    gen.result = {**json.loads(first), **json.loads(second)}


def release(gens: list[Generator]) -> None:
    for gen in gens:
        if gen.proc.stdin is not None and not gen.proc.stdin.closed:
            try:
                gen.proc.stdin.close()
            except OSError:
                pass
    for gen in gens:
        try:
            gen.proc.wait(30)
        except subprocess.TimeoutExpired:
            gen.proc.kill()
            gen.proc.wait(5)


def warm_up(wsload: Path, server: Server, api_key: str, ca: Path) -> None:
    """A few hundred connections opened and closed: lazy imports and caches, not measured."""
    cmd = generator_args(wsload, server, api_key, ca, WARMUP_CONNECTIONS, "127.0.0.1", "none")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"warm-up against {server.name} failed: {done.stderr[-300:]}")


# ---------------------------------------------------------------- one measurement


def measure(
    server: Server,
    count: int,
    mode: str,
    wsload: Path,
    api_key: str,
    ca: Path,
    per_generator: int,
    logdir: Path,
    profile_to: Path | None = None,
) -> dict[str, Any]:
    """Open ``count`` connections on a fresh ``server`` and hold them; what they cost."""
    server.start(ca)
    gens: list[Generator] = []
    profiler: subprocess.Popen[bytes] | None = None
    try:
        warm_up(wsload, server, api_key, ca)
        wait_idle(server.pid)
        rss0 = rss_kib(server.pid)
        cpu0 = cpu_seconds(server.pid)
        t0 = time.monotonic()
        if profile_to is not None:
            profiler = start_profiler(server.pid, profile_to)
        left, index = count, 0
        while left > 0:
            n = min(per_generator, left)
            source = f"127.0.0.{10 + index}"
            cmd = generator_args(wsload, server, api_key, ca, n, source, mode)
            gen = start_generator(cmd, source, n, logdir)
            gens.append(gen)
            wait_connected(gen, 120 + n / 50)
            left -= n
            index += 1
        if profiler is not None:
            stop_profiler(profiler)
            profiler = None
        cpu_total = cpu_seconds(server.pid) - cpu0
        wall_total = time.monotonic() - t0
        wait_idle(server.pid)
        time.sleep(1.0)
        rss1 = rss_kib(server.pid)
        if not server.alive():
            raise RuntimeError(f"{server.name} died; see {server.log_path}")
    finally:
        if profiler is not None:
            stop_profiler(profiler)
        release(gens)
        server.stop()
    opened = sum(g.result["opened"] for g in gens)
    still_open = sum(g.result["still_open"] for g in gens)
    window_cpu = sum(g.result["server_cpu"] * g.result["wall_s"] for g in gens)
    window_wall = sum(g.result["wall_s"] for g in gens)
    failed = sum(g.result["failed"] for g in gens)
    subscribed = sum(g.result.get("subscribed", 0) for g in gens)
    return {
        "target": server.name,
        "count": count,
        "subscribe": mode,
        "generators": len(gens),
        "opened": opened,
        "still_open": still_open,
        "failed": failed,
        "subscribed": subscribed,
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "kib_per_conn": (rss1 - rss0) / max(1, still_open),
        # Connect windows only (from the first ticket request to the last 101).
        "cpu_ms_per_conn": 1000 * window_cpu / max(1, opened),
        "handshakes_per_s": opened / window_wall if window_wall else 0.0,
        "server_cpu_share": window_cpu / window_wall if window_wall else 0.0,
        "generator_cpu_share": statistics.mean(g.result["generator_cpu"] for g in gens),
        # The whole phase, subscribing and settling included.
        "phase_cpu_ms_per_conn": 1000 * cpu_total / max(1, opened),
        "phase_wall_s": wall_total,
    }


# ---------------------------------------------------------------- profiling


def start_profiler(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        log("no py-spy in this venv; not profiling")
        return None
    cmd = ["taskset", "-c", GENERATOR_CORE, str(spy), "record", "--pid", str(pid)]
    cmd += ["--rate", "200", "--format", "raw", "--output", str(out), "--nonblocking"]
    cmd += ["--idle", "--native"] if os.environ.get("CONN_PROFILE_NATIVE") else ["--idle"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attach before the storm starts
    return proc


def stop_profiler(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


#: Buckets of a connect storm's busy server time: a sample goes to the first
#: bucket (in this order) with a frame in its stack matching one of the markers.
PROFILE_BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("TLS handshake (OpenSSL do_handshake: key exchange, signature, tickets)",
     ("do_handshake (OpenSSL/SSL.py",)),
    ("new TLS connection (SSL.Connection)", ("serverConnectionForTLS", "__init__ (OpenSSL/SSL.py")),
    ("logging (twisted.logger events, observers, log file)",
     ("emit (twisted/logger/_logger.py", "failure (twisted/logger/_logger.py",
      "msg (twisted/python/log.py")),
    ("Autobahn _connectionMade (per-connection config copy + pformat)",
     ("_connectionMade (autobahn/",)),
    ("ticket issue: TicketsResource.render_POST", ("render_POST (securepub/server/api.py",)),
    ("WebSocket handshake: Autobahn processHandshake (incl. onConnect, onOpen)",
     ("processHandshake (autobahn/",)),
    ("WebSocketResource.render (re-serializes the request for Autobahn)",
     ("render (autobahn/twisted/resource.py",)),
    ("TLS record I/O (SSL recv/send, BIO)", ("recv (OpenSSL/SSL.py", "send (OpenSSL/SSL.py",
                                            "bio_read (OpenSSL/SSL.py",
                                            "bio_write (OpenSSL/SSL.py")),
    ("twisted.web request parsing, routing, response", ("twisted/web/",)),
    ("connection teardown", ("connectionLost",)),
    ("accept, TCP and TLS glue, reactor", ("twisted/internet/", "twisted/protocols/")),
]  # fmt: skip

#: Functions whose inclusive share (callees included) is reported.
KEY_FUNCTIONS = (
    "do_handshake (OpenSSL/SSL.py",
    "render_POST (securepub/server/api.py",
    "issue (securepub/engines/memory/tickets.py",
    "log_ticket_issued (securepub/server/api.py",
    "render (autobahn/twisted/resource.py",
    "processHandshake (autobahn/websocket/protocol.py",
    "onConnect (securepub/server/protocol.py",
    "redeem (securepub/engines/memory/tickets.py",
    "_log_handshake (securepub/server/protocol.py",
    "succeedHandshake (autobahn/websocket/protocol.py",
    "onOpen (securepub/server/protocol.py",
    "_onOpen (autobahn/twisted/websocket.py",
    "_connectionMade (autobahn/websocket/protocol.py",
    "pformat (stdlib/pprint.py",
    "connectionMade (autobahn/twisted/websocket.py",
    "emit (twisted/logger/_logger.py",
    "headerReceived (twisted/web/http.py",
    "allHeadersReceived (twisted/web/http.py",
    "finish (twisted/web/server.py",
    "makeConnection (twisted/protocols/tls.py",
    "__init__ (OpenSSL/SSL.py",
    "send (OpenSSL/SSL.py",
    "recv (OpenSSL/SSL.py",
    "doRead (twisted/internet/tcp.py",
    "connectionLost",
)


def _is_idle(frames: tuple[str, ...]) -> bool:
    """The reactor waiting in epoll: the innermost frame is doPoll itself (or epoll)."""
    return bool(frames) and ("doPoll (" in frames[-1] or "epoll" in frames[-1])


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Shares of the busy samples: buckets, self time, and inclusive time per function."""
    from profile_summary import frame_name  # bench/profile_summary.py

    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.strip().rpartition(" ")
        if not n.isdigit():
            continue
        frames = tuple(
            frame_name(f)
            for f in stack.split(";")
            if f and not f.startswith(("process ", "thread "))
        )
        stacks[frames] += int(n)
    total = sum(stacks.values())
    idle = 0
    buckets: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    keys: Counter[str] = Counter()
    for frames, n in stacks.items():
        if _is_idle(frames):
            idle += n
            continue
        joined = ";".join(frames)
        for label, markers in PROFILE_BUCKETS:
            if any(m in joined for m in markers):
                buckets[label] += n
                break
        else:
            buckets["other"] += n
        if frames:
            own[frames[-1]] += n
        for name in set(frames):
            inclusive[name] += n
        for marker in KEY_FUNCTIONS:
            if marker in joined:
                keys[marker] += n
    busy = max(1, total - idle)
    return {
        "samples": total,
        "idle_share": idle / max(1, total),
        "buckets": {k: v / busy for k, v in buckets.most_common()},
        "key_functions": {k: keys[k] / busy for k in KEY_FUNCTIONS},
        "self": {k: v / busy for k, v in own.most_common(top)},
        "inclusive": {k: v / busy for k, v in inclusive.most_common(top * 3)},
    }


# ---------------------------------------------------------------- table


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def cell(values: list[float], suffix: str = "", digits: int = 2) -> str:
    if not values:
        return "-"
    text = fmt(statistics.median(values), digits) + suffix
    if len(values) > 1:
        text += f" [{fmt(min(values), digits)}-{fmt(max(values), digits)}]"
    return text


def table(results: list[dict[str, Any]], notes: list[str]) -> str:
    rows: list[tuple[str, ...]] = [("figure", "securepub", "ceiling", "ratio (per-rep median)")]
    keys = sorted({(r["requested"], r["count"], r["subscribe"]) for r in results})
    for requested, count, mode in keys:

        def pick(target: str, metric: str, n: int = count, mode: str = mode) -> dict[int, float]:
            return {
                r["rep"]: r[metric]
                for r in results
                if r["target"] == target
                and r["count"] == n
                and r["subscribe"] == mode
                and "error" not in r
            }

        label_n = f"N={count:,}" + (f" (asked {requested:,})" if requested != count else "")
        metrics = [("KiB per idle connection", "kib_per_conn", 2)]
        if mode == "none":
            metrics += [
                ("server CPU ms per connection", "cpu_ms_per_conn", 3),
                ("handshakes/s", "handshakes_per_s", 0),
                ("server CPU share in window", "server_cpu_share", 2),
            ]
        for title, metric, digits in metrics:
            ours, ceiling = pick("ours", metric), pick("ceiling", metric)
            ratios = [ours[r] / ceiling[r] for r in sorted(ours) if ceiling.get(r)]
            rows.append(
                (
                    f"{title}, {label_n}, subscribe={mode}",
                    cell(list(ours.values()), digits=digits),
                    cell(list(ceiling.values()), digits=digits),
                    cell(ratios, "x"),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for index, row in enumerate(rows):
        out.append("| " + " | ".join(t.ljust(widths[i]) for i, t in enumerate(row)) + " |")
        if index == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out + [f"note: {n}" for n in notes])


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="10000,50000", help="idle connections (10000,50000)")
    parser.add_argument(
        "--subscribe",
        default="none,distinct",
        help="subscription modes: none, distinct, same (none,distinct)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (3)")
    parser.add_argument(
        "--per-generator",
        type=int,
        default=PER_GENERATOR,
        help=f"connections per generator process ({PER_GENERATOR})",
    )
    parser.add_argument("--quick", action="store_true", help="N=2000, subscribe none, once")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also py-spy a connect storm of --profile-count on each server",
    )
    parser.add_argument("--profile-count", type=int, default=6000)
    parser.add_argument(
        "--tree",
        action="store_true",
        help="run the working tree's securepub (PYTHONPATH) instead of the venv's",
    )
    parser.add_argument(
        "--pythonpath",
        metavar="DIR",
        help="run the securepub found in DIR (e.g. a `git archive HEAD securepub` export)",
    )
    parser.add_argument("--output", help="JSON lines file (results/connections-<stamp>.jsonl)")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder and logs")
    opts = parser.parse_args(argv)  # fmt: skip
    if opts.quick:
        opts.counts, opts.subscribe, opts.repeat = "2000", "none", 1
    if opts.tree:
        opts.pythonpath = str(REPO)
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if not (Path(sys.executable).parent / "twistd").exists():
        raise SystemExit("connections: run with the venv's Python (.venv/bin/python)")
    if shutil.which("taskset") is None:
        raise SystemExit("connections: taskset (util-linux) is needed to pin the processes")
    wsload = build_wsload()
    if wsload is None:
        raise SystemExit("connections: cannot build bench/loadgen/wsload (cc, libssl-dev)")
    fds = raise_fd_limit()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    most = fds - FD_MARGIN
    per_generator = min(opts.per_generator, most)
    notes: list[str] = []
    counts: list[tuple[int, int]] = []
    for text in opts.counts.split(","):
        asked = int(text)
        if asked > most:
            notes.append(
                f"N={asked:,} asked, {most:,} measured: RLIMIT_NOFILE is {fds:,} (hard limit "
                f"{hard:,}; raising it needs CAP_SYS_RESOURCE) and the server needs one "
                "descriptor per connection"
            )
        counts.append((asked, min(asked, most)))
    modes = [m.strip() for m in opts.subscribe.split(",") if m.strip()]
    for mode in modes:
        if mode not in ("none", "same", "distinct"):
            raise SystemExit(f"connections: unknown subscribe mode {mode!r}")
    stamp = time.strftime("%Y%m%dT%H%M%S")
    results_dir = BENCH / "results"
    results_dir.mkdir(exist_ok=True)
    output = Path(opts.output) if opts.output else results_dir / f"connections-{stamp}.jsonl"
    workdir = Path(tempfile.mkdtemp(prefix="securepub-connections-"))
    ours, ceiling = make_servers(workdir, opts.pythonpath)
    meta = {
        "run": stamp,
        "rev": git_rev() if opts.tree else installed_rev(),
        "securepub": securepub_origin(opts.pythonpath),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg()[0],
        "fd_limit": fds,
    }
    results: list[dict[str, Any]] = []
    profiles: dict[str, dict[str, Any]] = {}
    try:
        ours.start(None)  # writes certs/ (CA, certificate, API key) once
        ours.stop()
        ca = workdir / "certs" / "ca.pem"
        api_key = (workdir / "certs" / "api-key").read_text().strip()
        with output.open("a") as sink:
            for rep in range(opts.repeat):
                for mode in modes:
                    for asked, count in counts:
                        pair = [ceiling, ours] if rep % 2 == 0 else [ours, ceiling]
                        for server in pair:
                            log(f"rep {rep + 1}/{opts.repeat}: {server.name}, N={count:,}, "
                                f"subscribe={mode}")  # fmt: skip
                            try:
                                result = measure(server, count, mode, wsload, api_key, ca,
                                                 per_generator, workdir)  # fmt: skip
                            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                                result = {"target": server.name, "count": count,
                                          "subscribe": mode, "error": str(e)[:300]}  # fmt: skip
                                log(f"  failed: {result['error']}")
                            result.update(meta, rep=rep, requested=asked)
                            results.append(result)
                            sink.write(json.dumps(result) + "\n")
                            sink.flush()
                            if "error" not in result:
                                log(f"  {result['kib_per_conn']:.2f} KiB/conn, "
                                    f"{result['cpu_ms_per_conn']:.3f} ms CPU/conn, "
                                    f"{result['handshakes_per_s']:.0f}/s, "
                                    f"failed={result['failed']}")  # fmt: skip
            if opts.profile:
                profile_dir = results_dir / f"connections-profile-{stamp}"
                profile_dir.mkdir(exist_ok=True)
                for server in (ceiling, ours):
                    out = profile_dir / f"connect-{server.name}.txt"
                    log(f"profiling {server.name}: N={opts.profile_count:,} -> {out}")
                    measure(server, opts.profile_count, "none", wsload, api_key, ca,
                            per_generator, workdir, profile_to=out)  # fmt: skip
                    if out.exists():
                        profiles[server.name] = summarize_profile(out)
                        sink.write(json.dumps({"profile": server.name, **profiles[server.name],
                                               "file": str(out), **meta}) + "\n")  # fmt: skip
    finally:
        ours.stop()
        ceiling.stop()
        if opts.keep:
            log(f"run folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"securepub ({meta['securepub']}, {meta['rev']}) vs bare Autobahn ceiling; "
          f"{opts.repeat} repetition(s): median [min-max]")  # fmt: skip
    print(table(results, notes))
    for name, summary in profiles.items():
        print(f"\nprofile of a connect storm, {name} ({summary['samples']} samples, "
              f"{100 * summary['idle_share']:.0f}% idle); shares of busy time:")  # fmt: skip
        for label, share in summary["buckets"].items():
            print(f"  {100 * share:5.1f}%  {label}")
        print("  inclusive (callees included) of key functions:")
        for label, share in summary["key_functions"].items():
            if share:
                print(f"  {100 * share:5.1f}%  {label})")
        print("  self time, top 15:")
        for label, share in list(summary["self"].items())[:15]:
            print(f"  {100 * share:5.1f}%  {label}")
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
