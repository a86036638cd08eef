"""Run the securepub benchmark set against securepub and the bare Autobahn ceiling.

    python bench/run.py                  # the full set, 3 repetitions (~12 min)
    python bench/run.py --quick          # small and short, to try it out
    python bench/run.py --only connect   # one scenario
    python bench/run.py --profile        # py-spy profiles (perturbs the figures)

Starts securepub (the working tree, ``twistd securepub --dev`` with
``bench.toml``) and ``ceiling_server.py`` (same certificate) pinned to core 0,
runs every scenario against each with the C load generator (``loadgen/wsload.c``,
built here with cc and OpenSSL; ``--generator node`` uses ``loadgen/loadgen.mjs``)
pinned to core 1, prints medians over the repetitions with the ratio to the
ceiling, and writes every measurement as a JSON line to
``bench/results/<stamp>.jsonl``. Securepub and the ceiling run back to back in
each repetition and the ratio is the median of the repetitions' own ratios,
which background load on a shared machine disturbs far less than the raw
figures. Traffic goes to 127.0.0.1 only; everything started is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LOADGEN = BENCH / "loadgen"
SERVER_CORE = "0"
GENERATOR_CORE = "1"

BENCH_TOML = """\
# securepub's configuration for bench/run.py (written into the run's folder).
[limits]
max_connections_per_ip = 20000   # every bench connection comes from 127.0.0.1

[[topics]]
pattern = "bench.schema"
schema = "bench-schema.json"
"""

#: What the fanout payload ({"t": <ns>, "pad": "xxx..."}) must look like.
BENCH_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "t": {"type": "integer", "minimum": 0},
        "pad": {"type": "string", "maxLength": 1024, "pattern": "^x*$"},
    },
    "required": ["t", "pad"],
    "additionalProperties": False,
}


HEALTH_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def log(message: str) -> None:
    sys.stderr.write(f"[bench] {message}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------- processes


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def restart(self, ca: Path) -> None:
        """A fresh process on the same port (memory per connection is read from a new one)."""
        self.stop()
        self.proc = self.extra["start"]()
        wait_healthy(self, ca)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def wait_healthy(server: Server, ca: Path, timeout: float = 30.0) -> None:
    """Poll GET /healthz over TLS until it answers 200."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"{server.name} exited; see {server.log_path}")
        try:
            ctx = ssl.create_default_context(cafile=str(ca))
            with socket.create_connection(("127.0.0.1", server.port), timeout=2) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    s.sendall(HEALTH_REQUEST)
                    answer = s.recv(1024)
            if answer.startswith(b"HTTP/1.1 200"):
                return
            last = RuntimeError(answer[:80].decode("latin1"))
        except (OSError, ssl.SSLError) as e:
            last = e
        time.sleep(0.2)
    raise RuntimeError(f"{server.name} did not become healthy: {last}")


def wait_idle(servers: list[Server], limit: float = 0.05, timeout: float = 20.0) -> None:
    """Wait until every server uses under ``limit`` of a core (e.g. after closing 10k sockets)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = {s.name: cpu_seconds(s.pid) for s in servers}
        time.sleep(0.5)
        busy = [s.name for s in servers if (cpu_seconds(s.pid) - before[s.name]) / 0.5 > limit]
        if not busy:
            return
    log(f"servers still busy after {timeout:.0f} s; measuring anyway")


def _launcher(
    cmd: list[str], workdir: Path, log_path: Path, env: dict[str, str] | None = None
) -> Callable[[], subprocess.Popen[bytes]]:
    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=log_path.open("ab"), stderr=subprocess.STDOUT
        )

    return start


def start_ours(workdir: Path, port: int) -> Server:
    twistd = Path(sys.executable).parent / "twistd"
    (workdir / "bench.toml").write_text(BENCH_TOML)
    (workdir / "bench-schema.json").write_text(json.dumps(BENCH_SCHEMA, indent=1))
    log_path = workdir / "ours.log"
    cmd = ["taskset", "-c", SERVER_CORE, str(twistd), "-n", "--pidfile="]
    cmd += ["securepub", "--dev", "--config", "bench.toml", "--port", str(port)]
    # The working tree's securepub, not whatever was last pip-installed.
    path = [str(REPO), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    start = _launcher(cmd, workdir, log_path, env)
    return Server("ours", port, start(), log_path, {"start": start})


def start_ceiling(workdir: Path, port: int) -> Server:
    log_path = workdir / "ceiling.log"
    cmd = ["taskset", "-c", SERVER_CORE, sys.executable, str(BENCH / "ceiling_server.py")]
    cmd += ["--port", str(port), "--cert", "certs/server.pem", "--key", "certs/server.key"]
    start = _launcher(cmd, workdir, log_path)
    return Server("ceiling", port, start(), log_path, {"start": start})


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def build_wsload() -> Path | None:
    """Compile the C load generator (cc + OpenSSL headers) if it is missing or stale."""
    source = LOADGEN / "wsload.c"
    binary = LOADGEN / "wsload"
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log("no C compiler (apt-get install gcc libssl-dev); falling back to the Node generator")
        return None
    cmd = [cc, "-O2", "-Wall", "-o", str(binary), str(source), "-lssl", "-lcrypto", "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        log(f"cannot build wsload (apt-get install gcc libssl-dev?): {done.stderr.strip()[:300]}")
        return None
    return binary


def generator_command(kind: str) -> tuple[str, list[str]]:
    """The load generator to run: the C one (default) or the Node.js one."""
    if kind == "c":
        binary = build_wsload()
        if binary is not None:
            return "c", [str(binary)]
    node = shutil.which("node")
    if node is None:
        raise SystemExit("bench: need cc + libssl-dev (C generator) or Node.js >= 20")
    package = json.loads((LOADGEN / "package.json").read_text())
    if package.get("dependencies") and not (LOADGEN / "node_modules").exists():
        log("installing the load generator's npm packages")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=LOADGEN, check=True)
    return "node", [node, str(LOADGEN / "loadgen.mjs")]


# ---------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Case:
    """One load generator run: a scenario against one server."""

    key: str  # the row it belongs to, e.g. "fanout-flood"
    target: str  # "ours" or "ceiling"
    args: tuple[str, ...]


def plan(opts: argparse.Namespace) -> list[Case]:
    s = str(opts.subscribers)
    d = str(opts.duration)
    fanout = ("--scenario", "fanout", "--subscribers", s, "--duration", d)
    flood = (*fanout, "--mode", "flood", "--publishers", str(opts.publishers))
    rate = (*fanout, "--mode", "rate", "--rate", str(opts.rate), "--warmup", "1")
    connect = ("--scenario", "connect", "--connections", str(opts.connections))
    cases = {
        "fanout-flood": [
            Case("fanout-flood", "ceiling", flood),
            Case("fanout-flood", "ours", flood),
        ],
        # The ceiling has no schemas: it runs the plain flood again, next to ours.
        "fanout-flood-schema": [
            Case("fanout-flood-schema", "ceiling", flood),
            Case("fanout-flood-schema", "ours", (*flood, "--topic", "bench.schema")),
        ],
        "fanout-rate": [
            Case("fanout-rate", "ceiling", rate),
            Case("fanout-rate", "ours", rate),
        ],
        "connect": [
            Case("connect", "ceiling", connect),
            Case("connect", "ours", connect),
        ],
        # Diagnostic, securepub only: POST /v1/tickets alone, no handshake.
        "tickets": [
            Case(
                "tickets", "ours", ("--scenario", "tickets", "--connections", str(opts.connections))
            ),
        ],
    }
    wanted = opts.only.split(",") if opts.only else list(cases)
    out: list[Case] = []
    for name in wanted:
        if name not in cases:
            raise SystemExit(f"bench: unknown scenario {name!r}; choose from {', '.join(cases)}")
        out += cases[name]
    return out


def run_case(
    case: Case,
    server: Server,
    generator: list[str],
    api_key: str,
    ca: Path,
    opts: argparse.Namespace,
) -> dict[str, Any]:
    cmd = ["taskset", "-c", GENERATOR_CORE, *generator]
    cmd += ["--target", case.target, "--port", str(server.port), "--ca", str(ca)]
    cmd += ["--api-key", api_key, "--server-pid", str(server.pid), *case.args]
    timeout = 60 + 3 * opts.duration + opts.connections / 100
    cmd += ["--timeout", str(int(timeout))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    profiling = opts.profile

    def watch_stderr() -> None:
        # The generator marks its measuring window on stderr; profile just that.
        profiler = None
        assert proc.stderr is not None
        for line in proc.stderr:
            stderr.append(line)
            if profiling and line.startswith("@@window-start") and profiler is None:
                profiler = start_profiler(case, server, opts)
            elif line.startswith("@@window-end") and profiler is not None:
                stop_profiler(profiler)
                profiler = None
        if profiler is not None:
            stop_profiler(profiler)

    watcher = threading.Thread(target=watch_stderr, daemon=True)
    watcher.start()
    try:
        proc.wait(timeout + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    watcher.join(60)
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    if proc.returncode != 0 or not stdout.strip():
        tail = "".join(line for line in stderr if not line.startswith("@@"))
        tail = "\n".join(tail.strip().splitlines()[-5:])
        return {"scenario": case.key, "target": case.target, "error": tail or "no output"}
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    result["scenario"] = case.key
    return result


#: A saturating run (flood, connect) whose server got less of its core than
#: this shared the core with someone else: it is kept but marked, and retried.
CONTENDED_BELOW = 0.85


def derive(result: dict[str, Any]) -> None:
    """Add CPU-normalized figures, which other load on the machine disturbs less."""
    cpu = result.get("server_cpu")
    if not isinstance(cpu, int | float) or cpu <= 0:
        return
    saturating = result.get("scenario") in ("connect", "tickets") or result.get("mode") == "flood"
    if "delivered_per_s" in result:
        result["delivered_per_server_cpu_s"] = result["delivered_per_s"] / cpu
    if "handshakes_per_s" in result:
        result["handshakes_per_server_cpu_s"] = result["handshakes_per_s"] / cpu
    result["contended"] = bool(saturating and cpu < CONTENDED_BELOW)


# ---------------------------------------------------------------- profiling

_profile_dir: Path | None = None


def start_profiler(
    case: Case, server: Server, opts: argparse.Namespace
) -> subprocess.Popen[bytes] | None:
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists() or _profile_dir is None:
        log("py-spy not found in this venv (pip install py-spy); not profiling")
        return None
    out = _profile_dir / f"{case.key}-{case.target}-{time.strftime('%H%M%S')}.txt"
    # py-spy shares the generator's core: it samples at a modest rate and
    # costs the generator a little, not the server.
    cmd = ["taskset", "-c", GENERATOR_CORE, str(spy), "record", "--pid", str(server.pid)]
    cmd += ["--rate", "250", "--format", "raw", "--output", str(out), "--nonblocking", "--idle"]
    if opts.native:
        cmd.append("--native")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Row:
    label: str
    scenario: str
    metric: str
    higher_is_better: bool
    target: str = ""  # text for the table
    limit: float | None = None  # bound on the ratio, or on our value when absolute
    absolute: bool = False


ROWS = [
    Row("fanout flood: delivered msg/s", "fanout-flood", "delivered_per_s", True, ">= 0.8x", 0.8),
    Row("fanout flood: msg per server CPU-s", "fanout-flood", "delivered_per_server_cpu_s", True),
    Row("fanout flood: p50 latency ms", "fanout-flood", "latency_p50_ms", False),
    Row("fanout flood: p99 latency ms", "fanout-flood", "latency_p99_ms", False),
    Row("fanout flood: lost", "fanout-flood", "lost", False, "0", 0, True),
    Row("fanout flood: server CPU", "fanout-flood", "server_cpu", False),
    Row("fanout flood: generator CPU", "fanout-flood", "generator_cpu", False),
    Row("schema flood: delivered msg/s", "fanout-flood-schema", "delivered_per_s", True,
        ">= 0.75x", 0.75),
    Row("schema flood: msg per server CPU-s", "fanout-flood-schema",
        "delivered_per_server_cpu_s", True),
    Row("schema flood: lost", "fanout-flood-schema", "lost", False, "0", 0, True),
    Row("schema flood: generator CPU", "fanout-flood-schema", "generator_cpu", False),
    Row("fanout 10/s: p50 latency ms", "fanout-rate", "latency_p50_ms", False),
    Row("fanout 10/s: p99 latency ms", "fanout-rate", "latency_p99_ms", False, "<= 1.25x", 1.25),
    Row("fanout 10/s: lost", "fanout-rate", "lost", False, "0", 0, True),
    Row("connect: handshakes/s", "connect", "handshakes_per_s", True, ">= 0.7x", 0.7),
    Row("connect: handshakes per server CPU-s", "connect", "handshakes_per_server_cpu_s", True),
    Row("connect: KiB per idle connection", "connect", "rss_per_conn_kib", False,
        "<= 40 KiB", 40, True),
    Row("connect: server CPU", "connect", "server_cpu", False),
    Row("connect: generator CPU", "connect", "generator_cpu", False),
    Row("tickets alone: issued/s", "tickets", "handshakes_per_s", True),
    Row("tickets alone: per server CPU-s", "tickets", "handshakes_per_server_cpu_s", True),
]  # fmt: skip


def by_rep(
    results: list[dict[str, Any]], scenario: str, target: str, metric: str
) -> dict[int, float]:
    """One value per repetition: its last uncontended attempt, else its last attempt."""
    out: dict[int, float] = {}
    clean: set[int] = set()
    for r in results:
        value = r.get(metric)
        if r.get("scenario") != scenario or r.get("target") != target:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        rep = int(r.get("rep", 0))
        if r.get("contended") and rep in clean:
            continue
        if not r.get("contended"):
            clean.add(rep)
        out[rep] = float(value)
    return out


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def cell(vs: list[float], suffix: str = "") -> str:
    if not vs:
        return "-"
    text = fmt(statistics.median(vs)) + suffix
    if len(vs) > 1:
        text += f" [{fmt(min(vs))}-{fmt(max(vs))}]"
    return text


def table(results: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Medians over repetitions; the ratio is the median of each repetition's own ratio.

    Each repetition runs securepub and the ceiling back to back, so a
    repetition's ratio compares two runs under the same background load.
    """
    header = ("figure", "securepub", "ceiling", "ratio", "target", "")
    lines: list[tuple[str, ...]] = [header]
    summary = []
    for row in ROWS:
        ours = by_rep(results, row.scenario, "ours", row.metric)
        ceiling = by_rep(results, row.scenario, "ceiling", row.metric)
        if not ours and not ceiling:
            continue
        ratios = [ours[r] / ceiling[r] for r in sorted(ours) if ceiling.get(r)]
        ours_m = statistics.median(ours.values()) if ours else None
        ceil_m = statistics.median(ceiling.values()) if ceiling else None
        ratio = statistics.median(ratios) if ratios else None
        verdict = ""
        measured = ours_m if row.absolute else ratio
        if row.limit is not None and measured is not None:
            ok = measured >= row.limit if row.higher_is_better else measured <= row.limit
            verdict = "ok" if ok else "MISS"
        lines.append(
            (row.label, cell(list(ours.values())), cell(list(ceiling.values())),
             cell(ratios, "x") if ratios else "-", row.target, verdict)
        )  # fmt: skip
        summary.append(
            {"figure": row.label, "scenario": row.scenario, "metric": row.metric,
             "ours": ours_m, "ceiling": ceil_m, "ratio": ratio, "target": row.target,
             "verdict": verdict, "ours_runs": list(ours.values()),
             "ceiling_runs": list(ceiling.values()), "ratios": ratios}
        )  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for index, line in enumerate(lines):
        out.append("| " + " | ".join(text.ljust(widths[i]) for i, text in enumerate(line)) + " |")
        if index == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out), summary


# ---------------------------------------------------------------- main


def git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "securepub"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextlib.contextmanager
def servers(workdir: Path) -> Iterator[tuple[Server, Server]]:
    ours = start_ours(workdir, free_port())
    ceiling: Server | None = None
    try:
        ca = workdir / "certs" / "ca.pem"
        wait_healthy(ours, ca)
        ceiling = start_ceiling(workdir, free_port())
        wait_healthy(ceiling, ca)
        yield ours, ceiling
    finally:
        if ceiling is not None:
            ceiling.stop()
        ours.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each scenario (3)")
    parser.add_argument("--subscribers", type=int, default=1000, help="fanout S (1000)")
    parser.add_argument("--connections", type=int, default=10000, help="connect C (10000)")
    parser.add_argument("--duration", type=float, default=10, help="seconds measured (10)")
    parser.add_argument("--rate", type=float, default=10, help="fixed publish rate (10/s)")
    parser.add_argument(
        "--publishers",
        type=int,
        default=16,
        help="flood: HTTPS connections publishing in parallel (16)",
    )
    parser.add_argument("--only", help="comma-separated scenarios: fanout-flood, "
                        "fanout-flood-schema, fanout-rate, connect, tickets")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="S=200, C=1000, 3 s, once")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="record py-spy profiles of securepub (results/profile-<stamp>/)",
    )
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    parser.add_argument(
        "--generator",
        choices=("c", "node"),
        default="c",
        help="load generator: c (wsload.c, default) or node (loadgen.mjs)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="extra tries of a saturating run whose server was starved (2)",
    )
    parser.add_argument("--output", help="JSON lines file (bench/results/<stamp>.jsonl)")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder and logs")
    opts = parser.parse_args(argv)  # fmt: skip
    if opts.quick:
        opts.subscribers, opts.connections, opts.duration, opts.repeat = 200, 1000, 3, 1
    return opts


def main(argv: list[str] | None = None) -> int:
    global _profile_dir
    opts = parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        log("fewer than 2 cores: server and generator will share one")
    if not (Path(sys.executable).parent / "twistd").exists():
        raise SystemExit("bench: run this with the Python that has securepub's dependencies "
                         "(e.g. .venv/bin/python bench/run.py): no twistd next to it")  # fmt: skip
    if shutil.which("taskset") is None:
        raise SystemExit("bench: taskset (util-linux) is needed to pin the processes")
    fds = raise_fd_limit()
    if fds < opts.connections + 200:
        raise SystemExit(f"bench: open-file limit {fds} is too low for {opts.connections} conns")
    generator_kind, generator = generator_command(opts.generator)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    results_dir = BENCH / "results"
    results_dir.mkdir(exist_ok=True)
    output = Path(opts.output) if opts.output else results_dir / f"{stamp}.jsonl"
    if opts.profile:
        _profile_dir = results_dir / f"profile-{stamp}"
        _profile_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="securepub-bench-"))
    meta = {
        "run": stamp,
        "rev": git_rev(),
        "python": platform.python_version(),
        "generator": generator_kind,
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg()[0],
    }
    results: list[dict[str, Any]] = []
    cases = plan(opts)
    try:
        with servers(workdir) as (ours, ceiling), output.open("a") as sink:
            api_key = (workdir / "certs" / "api-key").read_text().strip()
            ca = workdir / "certs" / "ca.pem"
            log(f"securepub pid {ours.pid} port {ours.port}; ceiling pid {ceiling.pid} "
                f"port {ceiling.port}; results to {output}")  # fmt: skip
            for rep in range(opts.repeat):
                # Alternate who goes first, so drift in background load is shared.
                order = cases if rep % 2 == 0 else _swap_pairs(cases)
                for case in order:
                    server = ours if case.target == "ours" else ceiling
                    for attempt in range(1 + opts.retries):
                        if case.key == "connect":
                            server.restart(ca)  # memory per connection from a fresh process
                        wait_idle([ours, ceiling])
                        log(f"run {rep + 1}/{opts.repeat}: {case.key} against {case.target}"
                            + (f" (retry {attempt})" if attempt else ""))  # fmt: skip
                        result = run_case(case, server, generator, api_key, ca, opts)
                        derive(result)
                        result.update(meta, rep=rep, attempt=attempt, profiled=opts.profile)
                        result["loadavg_after"] = os.getloadavg()[0]
                        results.append(result)
                        sink.write(json.dumps(result) + "\n")
                        sink.flush()
                        if "error" in result:
                            log(f"  failed: {result['error']}")
                        else:
                            log("  " + _brief(result))
                        for server_ in (ours, ceiling):
                            if not server_.alive():
                                raise RuntimeError(f"{server_.name} died; see {server_.log_path}")
                        if not result.get("contended"):
                            break
                        log(f"  contended: the server got {result['server_cpu']:.2f} of a core")
    finally:
        if opts.keep:
            log(f"run folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    text, summary = table(results)
    with output.open("a") as sink:
        sink.write(json.dumps({"summary": summary, **meta}) + "\n")
    print(f"securepub {meta['rev']} vs bare Autobahn ceiling; S={opts.subscribers}, "
          f"C={opts.connections}, {opts.duration:g} s, {opts.repeat} run(s): "
          "median [min-max]")  # fmt: skip
    print(text)
    print(f"results: {output}")
    if _profile_dir is not None:
        print(f"profiles: {_profile_dir} (summarize with bench/profile_summary.py)")
        print("note: py-spy shares the generator's core, so the figures above are perturbed")
    return 0


def _swap_pairs(cases: list[Case]) -> list[Case]:
    out: list[Case] = []
    index = 0
    while index < len(cases):
        if index + 1 < len(cases) and cases[index].key == cases[index + 1].key:
            out += [cases[index + 1], cases[index]]
            index += 2
        else:
            out.append(cases[index])
            index += 1
    return out


def _brief(result: dict[str, Any]) -> str:
    keys = ("delivered_per_s", "latency_p50_ms", "latency_p99_ms", "lost", "handshakes_per_s",
            "rss_per_conn_kib", "server_cpu", "generator_cpu")  # fmt: skip
    shown = [k for k in keys if isinstance(result.get(k), int | float)]
    return ", ".join(f"{k}={fmt(result[k])}" for k in shown)


if __name__ == "__main__":
    sys.exit(main())
