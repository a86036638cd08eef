"""Reconnect storm: restart a node holding N clients and time until every client is back.

    .venv/bin/python bench/storm.py                            # N=20,000 (or what fits), once
    .venv/bin/python bench/storm.py --connections 2000 --generators 2
    .venv/bin/python bench/storm.py --repeat 2 --concurrency 500

What one repetition does, everything on 127.0.0.1, the server pinned to
core 0 and everything else (load generators, this script) to core 1:

1. Starts node 1 (``twistd -n securepub --dev`` from this venv in a fresh
   temporary folder, ``[limits] max_connections_per_ip`` = the clients per
   source address, ``--per-ip-cap``; every other limit at its default, so
   ``max_opening_connections`` = 2000) and connects N idle clients with
   ``--generators`` C load generators (``loadgen/wsload.c``, ``connect``
   scenario, ``--hold 1``), each bound to its own source address
   127.0.0.2, 127.0.0.3, ... and redeeming a ticket it asked for itself.
2. SIGTERMs node 1 and times its drain (until the process exits; the node's
   own ``drained`` log line is reported too). The held generators count the
   close codes they got (1001 expected) and are let go. Node 2 starts as
   soon as node 1 has exited and its port can be bound, on the same port,
   with the same configuration and ``--dev`` certificates (same folder);
   restart time = SIGTERM to node 2's first ``/healthz`` 200.
3. The storm: as soon as node 2 is healthy, C fresh generators each open
   their N/C connections at once (``--concurrency`` each in flight, so
   C x concurrency handshakes may be under way, above half of
   ``max_opening_connections``), each with a fresh ticket. A ticket request
   or handshake refused with 503/429 is retried after its Retry-After plus
   up to a quarter more at random, with a fresh ticket, and a connection
   dropped before any answer after 1 s (wsload ``--retry``), up to
   ``--retry`` times per client. Reported: time from node 2 healthy until
   all N are open, refusals by cause, node 2's peak RSS (VmHWM) and RSS once
   all are back, its CPU (utime + stime) over the storm per client, and the
   server's own counters from ``/metrics``.
4. While the storm runs, this script polls ``GET /healthz`` on node 2 every
   100 ms (a new TLS connection each time, verifying the dev CA, 2 s
   timeout): polls that answered 200, polls that failed, and their latency.

N is capped by the open-file limit (the server needs one descriptor per
connection; raising the hard limit needs CAP_SYS_RESOURCE): a larger N is
run at the largest that fits, and the report says so. Every repetition is
one JSON line in ``bench/results/storm-<stamp>.jsonl``. Every process
started is stopped, on failure too. The securepub measured is the one
installed in the venv (``.venv/bin/pip install -q --no-deps --force-reinstall .``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import select
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from connections import securepub_origin  # noqa: E402 - which securepub twistd runs
from run import (  # noqa: E402 - bench/run.py's helpers, shared
    HEALTH_REQUEST,
    build_wsload,
    cpu_seconds,
    free_port,
    git_rev,
    raise_fd_limit,
)

SERVER_CORE = "0"
GENERATOR_CORE = "1"
#: Descriptors the server needs besides its connections (listener, logs, epoll, ...).
FD_MARGIN = 400
#: In-flight connects per generator while the clients first connect (below half
#: of max_opening_connections together, so that phase is not a storm itself).
SETUP_CONCURRENCY = 100
#: wsload's refusal counters (its second JSON line with --hold 1).
REFUSALS = ("refused_503", "refused_429", "refused_other", "dropped",
            "ticket_503", "ticket_429", "ticket_other")  # fmt: skip


def log(message: str) -> None:
    sys.stderr.write(f"[storm {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def proc_status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} for {pid}")


def port_free(port: int) -> bool:
    """Whether a listener could bind the port now (as Twisted does: SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def https_get(
    port: int, ca: Path, path: str, timeout: float, api_key: str | None = None
) -> tuple[int, bytes]:
    """One GET on a new TLS connection: (status, body)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if api_key is None:
        request = HEALTH_REQUEST.replace(b"/healthz", path.encode())
    else:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {api_key}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.settimeout(timeout)
            s.sendall(request)
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    return status, body


# ---------------------------------------------------------------- the node


@dataclass
class Node:
    name: str
    workdir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> None:
        twistd = Path(sys.executable).parent / "twistd"
        cmd = ["taskset", "-c", SERVER_CORE, str(twistd), "-n", "--pidfile=", "securepub"]
        cmd += ["--dev", "--config", "storm.toml", "--port", str(self.port)]
        self.log_path = self.workdir / f"{self.name}.log"
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=self.workdir, stdout=out, stderr=subprocess.STDOUT
            )

    def wait_healthy(self, timeout: float = 60.0, interval: float = 0.02) -> float:
        """Poll /healthz until 200; the monotonic time it first answered."""
        ca = self.workdir / "certs" / "ca.pem"
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited; see {self.log_path}")
            if ca.exists():
                try:
                    status, _ = https_get(self.port, ca, "/healthz", 2.0)
                    if status == 200:
                        return time.monotonic()
                    last = status
                except (OSError, ssl.SSLError) as e:
                    last = e
            time.sleep(interval)
        raise RuntimeError(f"{self.name} not healthy in {timeout:.0f} s: {last}")

    def kill(self) -> None:
        """SIGTERM, then SIGKILL: for cleaning up."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def drained_line(self) -> dict[str, float] | None:
        """The node's own ``stopped: N sessions closed ... in X s`` line."""
        text = self.log_path.read_text(errors="replace")
        found = re.findall(r"stopped: (\d+) sessions closed .* in ([0-9.]+) s", text)
        if not found:
            return None
        sessions, seconds = found[-1]
        return {"sessions": int(sessions), "seconds": float(seconds)}


# ---------------------------------------------------------------- generators


@dataclass
class Generator:
    proc: subprocess.Popen[bytes]
    source: str
    count: int
    stderr_path: Path
    buffer: bytes = b""
    lines: list[dict[str, Any]] = field(default_factory=list)
    #: Monotonic time its connect result (first line) arrived.
    done_at: float = 0.0

    def read_lines(self, want: int, timeout: float) -> None:
        """Read JSON lines from stdout until ``want`` have arrived."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while len(self.lines) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"generator {self.source}: no line {want} in {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                tail = self.stderr_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"generator {self.source} exited: {' | '.join(tail)}")
            self.buffer += chunk
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                self.lines.append(json.loads(line))
                if len(self.lines) == 1:
                    self.done_at = time.monotonic()

    @property
    def result(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for line in self.lines:
            merged.update(line)
        return merged


def start_generator(
    wsload: Path,
    port: int,
    ca: Path,
    api_key: str,
    server_pid: int,
    count: int,
    source: str,
    concurrency: int,
    retry: int,
    ticket_connections: int,
    logdir: Path,
    tag: str,
) -> Generator:
    cmd = ["taskset", "-c", GENERATOR_CORE, str(wsload), "--scenario", "connect"]
    cmd += ["--target", "ours", "--port", str(port), "--ca", str(ca), "--api-key", api_key]
    cmd += ["--server-pid", str(server_pid), "--connections", str(count), "--source", source]
    cmd += ["--concurrency", str(concurrency), "--retry", str(retry), "--settle", "0"]
    cmd += ["--ticket-connections", str(ticket_connections)]
    cmd += ["--hold", "1", "--timeout", str(int(300 + count / 20))]
    stderr_path = logdir / f"wsload-{tag}-{source}.log"
    with stderr_path.open("w") as err:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, bufsize=0
        )
    return Generator(proc, source, count, stderr_path)


def let_go(gens: list[Generator]) -> None:
    """Tell held generators to close their connections and exit (close their stdin)."""
    for gen in gens:
        if gen.proc.stdin is not None and not gen.proc.stdin.closed:
            with contextlib.suppress(OSError):
                gen.proc.stdin.close()


def release(gens: list[Generator], read_final: bool = True) -> None:
    """Let held generators go; read their last line (close codes); reap them."""
    let_go(gens)
    for gen in gens:
        if read_final and len(gen.lines) == 2:  # the pipe holds it even if it exited
            with contextlib.suppress(RuntimeError, ValueError, OSError):
                gen.read_lines(3, 30)
        try:
            gen.proc.wait(30)
        except subprocess.TimeoutExpired:
            gen.proc.kill()
            gen.proc.wait(5)


def kill_all(gens: list[Generator]) -> None:
    for gen in gens:
        if gen.proc.poll() is None:
            gen.proc.kill()
            gen.proc.wait(5)


# ---------------------------------------------------------------- /healthz poller


class HealthPoller(threading.Thread):
    """GET /healthz every ``interval`` s on a new TLS connection, timing each poll."""

    def __init__(self, port: int, ca: Path, interval: float = 0.1, timeout: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.port, self.ca, self.interval, self.timeout = port, ca, interval, timeout
        self.stop_event = threading.Event()
        self.ok_latencies: list[float] = []
        self.failures: dict[str, int] = {}
        self.max_latency = 0.0
        self.niced = False

    def run(self) -> None:
        # Core 1 is the generators': ahead of them, a poll's latency is mostly the server's.
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -10)
            self.niced = True
        except OSError:
            self.niced = False
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            try:
                status, _ = https_get(self.port, self.ca, "/healthz", self.timeout)
                why = None if status == 200 else f"HTTP {status}"
            except (OSError, ssl.SSLError) as e:
                why = type(e).__name__
            latency = time.monotonic() - t0
            self.max_latency = max(self.max_latency, latency)
            if why is None:
                self.ok_latencies.append(latency)
            else:
                self.failures[why] = self.failures.get(why, 0) + 1
            next_at += self.interval
            now = time.monotonic()
            if next_at < now:  # a slow poll: the next one starts now, missed slots skipped
                next_at = now
            self.stop_event.wait(next_at - now)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.ok_latencies)
        return {
            "healthz_ok": len(lat),
            "healthz_poller_niced": self.niced,
            "healthz_failed": sum(self.failures.values()),
            "healthz_failures": self.failures,
            "healthz_max_ms": round(1000 * self.max_latency, 1),
            "healthz_p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
            "healthz_p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1)
            if lat
            else None,
        }


class OpeningSampler(threading.Thread):
    """Scrape /metrics every ``interval`` s for the node's opening connections."""

    def __init__(self, port: int, ca: Path, api_key: str, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.port, self.ca, self.api_key, self.interval = port, ca, api_key, interval
        self.stop_event = threading.Event()
        self.samples: list[float] = []

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            with contextlib.suppress(OSError, ssl.SSLError, ValueError):
                found = server_counters(self.port, self.ca, self.api_key, 2.0)
                if "opening_connections" in found:
                    self.samples.append(found["opening_connections"])

    def summary(self) -> dict[str, Any]:
        return {
            "opening_samples": len(self.samples),
            "opening_max": int(max(self.samples)) if self.samples else None,
            "opening_median": statistics.median(self.samples) if self.samples else None,
        }


def server_counters(port: int, ca: Path, api_key: str, timeout: float = 10.0) -> dict[str, Any]:
    """The node's handshake counters and shed gauge from /metrics."""
    status, body = https_get(port, ca, "/metrics", timeout, api_key)
    if status != 200:
        return {"metrics_status": status}
    handshakes: dict[str, float] = {}
    out: dict[str, Any] = {"handshakes": handshakes}
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("securepub_handshakes_total{"):
            labels, value = line.rsplit(" ", 1)
            outcome = re.search(r'outcome="([^"]*)"', labels)
            reason = re.search(r'reason="([^"]*)"', labels)
            key = f"{outcome.group(1) if outcome else '?'}:{reason.group(1) if reason else '?'}"
            handshakes[key] = float(value)
        elif line.startswith(("securepub_shed_connections", "securepub_open_connections",
                              "securepub_opening_connections")):  # fmt: skip
            name, value = line.rsplit(" ", 1)
            out[name.removeprefix("securepub_")] = float(value)
    return out


# ---------------------------------------------------------------- one repetition


def sum_field(gens: list[Generator], key: str) -> int:
    return sum(int(g.result.get(key, 0)) for g in gens)


def one_storm(
    wsload: Path,
    count: int,
    generators: int,
    concurrency: int,
    retry: int,
    ticket_connections: int,
    per_ip_cap: int,
    max_opening: int | None,
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="securepub-storm-"))
    per_gen = math.ceil(count / generators)
    shares = [min(per_gen, count - i * per_gen) for i in range(generators)]
    sources = [f"127.0.0.{2 + i}" for i in range(generators)]
    (workdir / "storm.toml").write_text(
        "# securepub's configuration for bench/storm.py (written into the run's folder).\n"
        "[limits]\n"
        f"max_connections_per_ip = {per_ip_cap}   # clients per 127.0.0.x source address\n"
        + (f"max_opening_connections = {max_opening}\n" if max_opening else "")
    )
    port = free_port()
    node1 = Node("node1", workdir, port)
    node2 = Node("node2", workdir, port)
    held: list[Generator] = []
    storm: list[Generator] = []
    poller: HealthPoller | None = None
    sampler: OpeningSampler | None = None
    result: dict[str, Any] = {
        "connections": count,
        "generators": generators,
        "per_generator": shares,
        "concurrency": concurrency,
        "retry": retry,
        "ticket_connections": ticket_connections,
        "max_connections_per_ip": per_ip_cap,
        "max_opening_connections": max_opening or "default (2000)",
        "max_opening_limit": max_opening or 2000,
    }
    try:
        # 1. node 1 with N idle clients
        node1.spawn()
        node1.wait_healthy()
        ca = workdir / "certs" / "ca.pem"
        api_key = (workdir / "certs" / "api-key").read_text().strip()
        log(f"node 1 (pid {node1.pid}) on port {port}; connecting {count:,} clients")
        t0 = time.monotonic()
        for share, source in zip(shares, sources, strict=True):
            args = (share, source, SETUP_CONCURRENCY, retry, 4, workdir, "setup")
            held.append(start_generator(wsload, port, ca, api_key, node1.pid, *args))
        for gen in held:
            gen.read_lines(2, 600)
        setup_open = sum_field(held, "still_open")
        result["setup_open"] = setup_open
        result["setup_s"] = round(time.monotonic() - t0, 2)
        result["setup_refused"] = {k: sum_field(held, k) for k in REFUSALS}
        if setup_open != count:
            raise RuntimeError(f"only {setup_open:,}/{count:,} clients connected to node 1")
        time.sleep(2.0)  # let the node settle: the held sessions are idle
        result["node1_rss_kib"] = proc_status_kib(node1.pid, "VmRSS")
        log(f"{setup_open:,} open in {result['setup_s']} s; node 1 RSS "
            f"{result['node1_rss_kib'] / 1024:.0f} MiB; SIGTERM")  # fmt: skip

        # 2. SIGTERM node 1, start node 2 on the same port once it has gone
        assert node1.proc is not None
        t_term = time.monotonic()
        node1.proc.send_signal(signal.SIGTERM)
        port_free_at: float | None = None
        while node1.proc.poll() is None:
            if port_free_at is None and port_free(port):
                port_free_at = time.monotonic()
            if time.monotonic() - t_term > 60:
                raise RuntimeError("node 1 did not exit within 60 s of SIGTERM")
            time.sleep(0.01)
        t_exit = time.monotonic()
        while not port_free(port):
            if time.monotonic() - t_exit > 30:
                raise RuntimeError(f"port {port} still taken 30 s after node 1 exited")
            time.sleep(0.01)
        node2.spawn()
        let_go(held)  # they hold dead connections only; their close codes are read later
        t_healthy = node2.wait_healthy(interval=0.02)
        result["node1_exit_code"] = node1.proc.returncode
        result["drain_s"] = round(t_exit - t_term, 3)
        result["port_free_s"] = round((port_free_at or t_exit) - t_term, 3)
        result["node1_drained"] = node1.drained_line()
        result["restart_s"] = round(t_healthy - t_term, 3)
        log(f"node 1 exited {result['drain_s']} s after SIGTERM; node 2 (pid {node2.pid}) "
            f"healthy at {result['restart_s']} s; the storm starts")  # fmt: skip

        # 3. the storm, 4. with /healthz polled all along
        rss0 = proc_status_kib(node2.pid, "VmRSS")
        cpu0 = cpu_seconds(node2.pid)
        poller = HealthPoller(port, ca)
        poller.start()
        sampler = OpeningSampler(port, ca, api_key)
        sampler.start()
        for share, source in zip(shares, sources, strict=True):
            args = (share, source, concurrency, retry, ticket_connections, workdir, "storm")
            storm.append(start_generator(wsload, port, ca, api_key, node2.pid, *args))
        for gen in storm:
            gen.read_lines(1, 600 + per_gen / 10)
        t_back = max(g.done_at for g in storm)
        cpu_storm = cpu_seconds(node2.pid) - cpu0
        for gen in storm:
            gen.read_lines(2, 30)
        for thread in (poller, sampler):
            thread.stop_event.set()
            thread.join(5)
        release(held)  # the first clients' close codes (their third line)
        result["closed_while_held"] = sum_field(held, "closed_while_held")
        result["close_1001"] = sum_field(held, "close_1001")
        result["close_other"] = sum_field(held, "close_other")
        time.sleep(1.0)
        opened = sum_field(storm, "opened")
        result.update(
            {
                "node2_rss_start_kib": rss0,
                "all_back_s": round(t_back - t_healthy, 3),
                "sigterm_to_all_back_s": round(t_back - t_term, 3),
                "per_generator_back_s": [round(g.done_at - t_healthy, 3) for g in storm],
                "opened": opened,
                "still_open": sum_field(storm, "still_open"),
                "failed": sum_field(storm, "failed"),
                "retried": sum_field(storm, "retried"),
                "refused": {k: sum_field(storm, k) for k in REFUSALS},
                "peak_rss_kib": proc_status_kib(node2.pid, "VmHWM"),
                "end_rss_kib": proc_status_kib(node2.pid, "VmRSS"),
                "server_cpu_s": round(cpu_storm, 3),
                "cpu_ms_per_reconnect": round(1000 * cpu_storm / max(1, opened), 3),
                "server_cpu_share": round(cpu_storm / max(1e-9, t_back - t_healthy), 3),
                **poller.summary(),
                **sampler.summary(),
            }
        )
        refused = result["refused"]
        others = ("refused_other", "dropped", "ticket_other")
        result["refused_else"] = sum(refused[k] for k in others) + result["failed"]
        result["kib_per_conn_end"] = round(
            (result["end_rss_kib"] - rss0) / max(1, result["still_open"]), 2
        )
        result["kib_per_conn_peak"] = round(
            (result["peak_rss_kib"] - rss0) / max(1, result["still_open"]), 2
        )
        with contextlib.suppress(OSError, ssl.SSLError, ValueError):
            result["server"] = server_counters(port, ca, api_key)
        if not node2.alive():
            raise RuntimeError(f"node 2 died; see {node2.log_path}")
    except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as e:
        result["error"] = str(e)[:400]
        log(f"failed: {result['error']}")
    finally:
        for thread in (poller, sampler):
            if thread is not None:
                thread.stop_event.set()
                thread.join(5)
        release(storm, read_final=False)
        release(held, read_final=False)
        kill_all(held + storm)
        node1.kill()
        node2.kill()
        if os.environ.get("STORM_KEEP"):
            log(f"run folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


# ---------------------------------------------------------------- report


def kib_mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f} MiB"


def report(result: dict[str, Any]) -> str:
    if "all_back_s" not in result:
        return f"run failed: {result.get('error')}"
    r, res = result["refused"], result
    drained = res.get("node1_drained") or {}
    server = res.get("server", {})
    by_reason = server.get("handshakes", {})
    refused_srv = {k.split(":", 1)[1]: int(v) for k, v in by_reason.items() if "refused:" in k}
    no_code = res["closed_while_held"] - res["close_1001"] - res["close_other"]
    shares = " + ".join(f"{n:,}" for n in res["per_generator"])
    sources = len(res["per_generator"])
    failures = f" {res['healthz_failures']}" if res["healthz_failed"] else ""
    rows = [
        ("clients (N)", f"{res['connections']:,} = {shares} over 127.0.0.2..{1 + sources}"),
        ("drain: SIGTERM to node 1 exit", f"{res['drain_s']:.3f} s (node's own drained line: "
         f"{drained.get('sessions', '?')} sessions in {drained.get('seconds', '?')} s)"),
        ("clients that got close 1001", f"{res['close_1001']:,} (another code "
         f"{res['close_other']:,}, closed without a code {no_code:,})"),
        ("restart: SIGTERM to node 2 healthy", f"{res['restart_s']:.3f} s"),
        ("all back: node 2 healthy to N open", f"{res['all_back_s']:.3f} s (SIGTERM to all back "
         f"{res['sigterm_to_all_back_s']:.3f} s)"),
        ("opened / still open / gave up", f"{res['opened']:,} / {res['still_open']:,} / "
         f"{res['failed']:,}"),
        ("handshakes refused 503 / 429 / other", f"{r['refused_503']:,} / {r['refused_429']:,} / "
         f"{r['refused_other']:,}"),
        ("connections dropped before an answer", f"{r['dropped']:,}"),
        ("tickets refused 503 / 429 / other", f"{r['ticket_503']:,} / {r['ticket_429']:,} / "
         f"{r['ticket_other']:,}"),
        ("retries", f"{res['retried']:,}"),
        ("refused for anything but 503 / 429", f"{res['refused_else']:,}"),
        ("server's refusals (/metrics)",
         ", ".join(f"{k} {v:,}" for k, v in refused_srv.items()) or "none"),
        ("server's shed connections (/metrics)", f"{int(server.get('shed_connections', 0)):,}"),
        ("opening connections, max / median", f"{res.get('opening_max')} / "
         f"{res.get('opening_median')} ({res.get('opening_samples')} /metrics scrapes; 503 above "
         f"{res['max_opening_limit'] // 2:,})"),
        ("/healthz polls ok / failed", f"{res['healthz_ok']} / {res['healthz_failed']}{failures}"),
        ("/healthz latency p50 / p99 / max", f"{res['healthz_p50_ms']} / "
         f"{res['healthz_p99_ms']} / {res['healthz_max_ms']} ms"),
        ("node 2 peak RSS (VmHWM)", f"{kib_mib(res['peak_rss_kib'])} "
         f"({res['kib_per_conn_peak']:.1f} KiB per client above its start)"),
        ("node 2 RSS with all back", f"{kib_mib(res['end_rss_kib'])} "
         f"({res['kib_per_conn_end']:.1f} KiB per client; {kib_mib(res['node2_rss_start_kib'])}"
         " at start)"),
        ("node 1 RSS with N, before SIGTERM", kib_mib(res["node1_rss_kib"])),
        ("server CPU during the storm", f"{res['server_cpu_s']:.2f} s "
         f"({100 * res['server_cpu_share']:.0f}% of a core)"),
        ("server CPU per reconnect", f"{res['cpu_ms_per_reconnect']:.3f} ms"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    out = [f"| {'figure'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    out += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    if "error" in res:
        out.append(f"error after the storm: {res['error']}")
    return "\n".join(out)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=20000, help="clients, N (20000)")
    parser.add_argument("--generators", type=int, default=4, help="generators = source addresses")
    parser.add_argument(
        "--concurrency", type=int, default=500, help="in-flight connects per generator (500)"
    )
    parser.add_argument(
        "--ticket-connections",
        type=int,
        default=16,
        help="kept-alive HTTPS connections asking for tickets, per storm generator (16)",
    )
    parser.add_argument("--retry", type=int, default=100, help="retries per client at most (100)")
    parser.add_argument(
        "--per-ip-cap",
        type=int,
        default=0,
        help="[limits] max_connections_per_ip (default: the clients per source address)",
    )
    parser.add_argument(
        "--max-opening-connections",
        type=int,
        help="[limits] max_opening_connections (default: the node's, 2000)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="repetitions (1)")
    parser.add_argument("--output", help="JSON lines file (results/storm-<stamp>.jsonl)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-ups
    if not (Path(sys.executable).parent / "twistd").exists():
        raise SystemExit("storm: run with the venv's Python (.venv/bin/python)")
    if shutil.which("taskset") is None:
        raise SystemExit("storm: taskset (util-linux) is needed to pin the processes")
    if not 1 <= opts.generators <= 250:
        raise SystemExit("storm: --generators must be 1 to 250")
    wsload = build_wsload()
    if wsload is None:
        raise SystemExit("storm: cannot build bench/loadgen/wsload (cc, libssl-dev)")
    if b"ticket-connections" not in wsload.read_bytes():
        raise SystemExit(f"storm: {wsload} has no --retry/--ticket-connections: an older wsload.c?")
    with contextlib.suppress(OSError, AttributeError):  # this script and its poller: core 1
        os.sched_setaffinity(0, {int(GENERATOR_CORE)})
    fds = raise_fd_limit()
    count = min(opts.connections, fds - FD_MARGIN)
    notes = []
    if count < opts.connections:
        notes.append(
            f"N={opts.connections:,} asked, {count:,} run: RLIMIT_NOFILE is {fds:,} (raising "
            "the hard limit needs CAP_SYS_RESOURCE) and the server needs one descriptor per client"
        )
    per_ip_cap = opts.per_ip_cap or math.ceil(count / opts.generators)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    results_dir = BENCH / "results"
    results_dir.mkdir(exist_ok=True)
    output = Path(opts.output) if opts.output else results_dir / f"storm-{stamp}.jsonl"
    meta = {
        "run": stamp,
        "rev": git_rev(),
        "securepub": securepub_origin(None),
        "cpus": os.cpu_count(),
        "loadavg_1m": os.getloadavg()[0],
        "fd_limit": fds,
        "asked": opts.connections,
    }
    results = []
    with output.open("a") as sink:
        for rep in range(opts.repeat):
            log(f"repetition {rep + 1}/{opts.repeat}: N={count:,}, {opts.generators} generators, "
                f"concurrency {opts.concurrency} and {opts.ticket_connections} ticket connections "
                f"each, per-IP cap {per_ip_cap:,}")  # fmt: skip
            result = one_storm(wsload, count, opts.generators, opts.concurrency, opts.retry,
                               opts.ticket_connections, per_ip_cap,
                               opts.max_opening_connections)  # fmt: skip
            result.update(meta, rep=rep, loadavg_1m_after=os.getloadavg()[0])
            results.append(result)
            sink.write(json.dumps(result) + "\n")
            sink.flush()
    for rep, result in enumerate(results):
        print(f"\nrepetition {rep + 1} (load average before the run {result['loadavg_1m']:.2f}):")
        print(report(result))
    for note in notes:
        print(f"note: {note}")
    print(f"results: {output}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
