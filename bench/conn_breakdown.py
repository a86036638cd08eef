"""Where the bytes of one idle connection go: securepub or the ceiling, run in this process.

    .venv/bin/python bench/conn_breakdown.py --server securepub --count 5000
    .venv/bin/python bench/conn_breakdown.py --server securepub --count 5000 --tracemalloc 30
    .venv/bin/python bench/conn_breakdown.py --server ceiling --count 5000 --census
    .venv/bin/python bench/conn_breakdown.py --server securepub --levers class-config,drop-http
    .venv/bin/python bench/conn_breakdown.py --openssl-micro 5000      # OpenSSL alone, no server
    .venv/bin/python bench/conn_breakdown.py --list-levers

Runs the server (securepub's twistd service, built by ``securepub.tap`` from a
``--dev`` configuration, or ``ceiling_server.py``'s site) in this process,
pinned to core 0, its reactor in the main thread; a second thread warms it up
and then opens ``--count`` idle WebSocket connections with the C load
generator (``loadgen/wsload.c`` ``connect --hold 1``, pinned to core 1:
securepub's connections get a ticket each first). With the connections held
it reads, in the reactor thread, before and after:

* RSS (VmRSS) and glibc's malloc in-use bytes (``mallinfo2``, main arena:
  what OpenSSL and Python objects over 512 bytes take);
* with ``--tracemalloc FRAMES``: a snapshot, each allocation put in the
  component of the innermost frame that is not generic (stdlib, zope,
  twisted.python, twisted.logger, Deferreds, timers), and the top sites;
  RSS is then inflated by tracemalloc's own tables: take RSS from a run
  without it;
* with ``--census``: live objects by type (gc), per connection;
* everything again after a full ``gc.collect()`` (cyclic garbage that the
  server's gc thresholds have not collected yet).

``--levers`` applies monkeypatches *in this process only* (nothing under
securepub/ is changed); ``--list-levers`` describes them. ``--openssl-micro
N`` measures pyOpenSSL/OpenSSL alone: N server ``SSL.Connection`` objects
with the server's own context, handshaken over memory BIOs (TLS 1.3) and
left idle, with and without ``MODE_RELEASE_BUFFERS``.

Prints per-connection figures and writes one JSON line to
``bench/results/conn-breakdown-<stamp>.jsonl``. Traffic stays on 127.0.0.1;
the generators and the server are stopped at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from connections import (  # noqa: E402 - bench/connections.py's generator handling
    CONFIG_TOML,
    PER_GENERATOR,
    Generator,
    release,
    rss_kib,
    start_generator,
    wait_connected,
)
from run import build_wsload, free_port, raise_fd_limit, wait_healthy  # noqa: E402

SERVER_CORE = 0
GENERATOR_CORE = "1"
WARMUP = 300


def log(message: str) -> None:
    sys.stderr.write(f"[breakdown] {message}\n")
    sys.stderr.flush()


# ---------------------------------------------------------------- native memory


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2
_libc.malloc_trim.argtypes = [ctypes.c_size_t]


def malloc_in_use() -> int:
    """Bytes in use in glibc malloc's main arena (small chunks and mmapped ones)."""
    info = _libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


# ---------------------------------------------------------------- levers

LEVERS: dict[str, str] = {
    "keep-ssl-buffers": "mask SSL.MODE_RELEASE_BUFFERS out of every Context.set_mode "
    "(Twisted's CertificateOptions sets it by default): what idle buffers would cost",
    "drop-http": "after autobahn's WebSocketResource.render hands the transport over, "
    "unregister the HTTPChannel as the TLS transport's producer and break the "
    "channel <-> request cycle, so both are freed at once",
    "class-config": "put the factory's CONFIG_ATTRS on the protocol class, so Autobahn's "
    "_connectionMade copies none of them into each instance's __dict__",
    "no-pformat": "make Autobahn's per-connection pformat(configAttrLog) free (CPU only)",
    "shared-stats": "one TrafficStats for all connections instead of one each",
    "lazy-session": "securepub: the Session's rate bucket and subscription dict are made "
    "on first use",
    "drop-handshake": "after onOpen, drop Autobahn's kept copies of the opening handshake "
    "(http_request_data, http_headers, http_status_line, ...) and securepub's _hs/_ticket",
    "lazy-send-queue": "Autobahn's send_queue deque (760 B) shared and empty until used",
}


def apply_levers(names: list[str]) -> None:
    for name in names:
        if name not in LEVERS:
            raise SystemExit(f"breakdown: unknown lever {name!r}; see --list-levers")
    if "keep-ssl-buffers" in names:
        from OpenSSL import SSL

        original_set_mode = SSL.Context.set_mode

        def set_mode(self: Any, mode: int) -> int:
            return int(original_set_mode(self, mode & ~SSL.MODE_RELEASE_BUFFERS))

        SSL.Context.set_mode = set_mode  # type: ignore[method-assign]
    if "drop-http" in names:
        from autobahn.twisted import resource as ab_resource

        original_render = ab_resource.WebSocketResource.render

        def render(self: Any, request: Any) -> Any:
            channel = request.channel
            tls = channel.transport  # taken over (set to None) by the original render
            result = original_render(self, request)
            if tls is not None and getattr(tls, "_producer", None) is not None:
                producer = tls._producer
                if getattr(producer, "_producer", None) is channel or producer is channel:
                    tls.unregisterProducer()
            channel.requests = []
            channel._networkProducer = None
            request.channel = None
            request.content = None
            return result

        ab_resource.WebSocketResource.render = render  # type: ignore[method-assign]
    if "class-config" in names:
        from autobahn.twisted.websocket import WebSocketServerFactory

        original_set = WebSocketServerFactory.setProtocolOptions

        def set_protocol_options(self: Any, *args: Any, **kwargs: Any) -> None:
            original_set(self, *args, **kwargs)
            # A subclass per factory, holding the factory's options as class attributes.
            base = self.protocol
            attrs = {a: getattr(self, a) for a in base.CONFIG_ATTRS if hasattr(self, a)}
            self.protocol = type(base.__name__, (base,), attrs)

        WebSocketServerFactory.setProtocolOptions = set_protocol_options  # type: ignore[method-assign]
    if "no-pformat" in names:
        import autobahn.websocket.protocol as ab_protocol

        ab_protocol.pformat = lambda _value: ""  # type: ignore[assignment]
    if "shared-stats" in names:
        import autobahn.websocket.protocol as ab_protocol

        shared = ab_protocol.TrafficStats()
        ab_protocol.TrafficStats = lambda: shared  # type: ignore[assignment,misc]
    if "lazy-session" in names:
        _lazy_session()
    if "drop-handshake" in names:
        _drop_handshake()
    if "lazy-send-queue" in names:
        _lazy_send_queue()


def _lazy_session() -> None:
    """Sessions whose TokenBucket and subscription dict are made on first use.

    The broker's own open_session runs unchanged: its module's ``Session`` and
    ``TokenBucket`` names are swapped for a lazy subclass and for a factory of
    the bucket's arguments.
    """
    from securepub.broker import broker as broker_module
    from securepub.core.ratelimit import TokenBucket

    base = broker_module.Session

    class LazySession(base):  # type: ignore[misc,valid-type]
        __slots__ = ("_bucket_args", "_lazy_bucket", "_lazy_subs")

        def _get_bucket(self) -> Any:
            if self._lazy_bucket is None:
                self._lazy_bucket = TokenBucket(*self._bucket_args)
            return self._lazy_bucket

        def _set_bucket(self, value: Any) -> None:
            self._lazy_bucket = None if isinstance(value, tuple) else value
            self._bucket_args = value if isinstance(value, tuple) else None

        def _get_subs(self) -> Any:
            if self._lazy_subs is None:
                self._lazy_subs = {}
            return self._lazy_subs

        def _set_subs(self, value: Any) -> None:
            self._lazy_subs = value or None  # an empty dict is made on first use

        bucket = property(_get_bucket, _set_bucket)
        subscriptions = property(_get_subs, _set_subs)

    def bucket_args(clock: Any, rate: float, burst: float) -> tuple[Any, float, float]:
        return (clock, rate, burst)

    broker_module.Session = LazySession  # type: ignore[misc]
    broker_module.TokenBucket = bucket_args  # type: ignore[assignment,misc]


def _drop_handshake() -> None:
    from securepub.server import protocol as sp

    proto = sp.SecurePubServerProtocol
    original_on_open = proto.onOpen

    def on_open(self: Any) -> None:
        original_on_open(self)
        for name in ("http_request_data", "http_headers", "http_status_line",
                     "http_request_uri", "http_request_path", "http_request_params",
                     "http_request_host", "http_response_data", "websocket_protocols",
                     "websocket_extensions", "_hs", "_ticket"):  # fmt: skip
            self.__dict__.pop(name, None)

    proto.onOpen = on_open  # type: ignore[method-assign]


def _lazy_send_queue() -> None:
    import autobahn.websocket.protocol as ab_protocol

    class EmptyQueue:
        """Stands for an empty deque until something is appended."""

        __slots__ = ()

        def __len__(self) -> int:
            return 0

        def __bool__(self) -> bool:
            return False

    empty = EmptyQueue()
    base = ab_protocol.WebSocketProtocol
    original_made = base._connectionMade

    def connection_made(self: Any) -> None:
        original_made(self)
        self.send_queue = empty

    original_send = base.sendData

    def send_data(self: Any, data: bytes, sync: bool = False, chopsize: int | None = None) -> Any:
        if self.send_queue is empty and (sync or (chopsize and chopsize > 0)):
            from collections import deque

            self.send_queue = deque()  # only when something is to wait in it
        return original_send(self, data, sync, chopsize)

    base._connectionMade = connection_made  # type: ignore[method-assign]
    base.sendData = send_data  # type: ignore[method-assign]


# ---------------------------------------------------------------- servers in-process


class InProcess:
    """What wait_healthy needs of a server."""

    def __init__(self, name: str, port: int, log_path: Path) -> None:
        self.name, self.port, self.log_path = name, port, log_path
        self.pid = os.getpid()

    def alive(self) -> bool:
        return True


def start_securepub(workdir: Path, port: int) -> Any:
    from securepub import tap

    (workdir / "connections.toml").write_text(CONFIG_TOML)
    options = tap.Options()
    options.parseOptions(["--dev", "--config", "connections.toml", "--port", str(port)])
    with contextlib.redirect_stdout(io.StringIO()):  # --dev's certificate notice
        service = tap.makeService(options)
    service.privilegedStartService()
    service.startService()
    return service


def start_ceiling(workdir: Path, port: int) -> Any:
    import ceiling_server as cs
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from securepub.dev.certs import ensure_dev_certs

    certs = ensure_dev_certs(str(workdir / "certs"))
    options = cs.tls_options(certs.cert, certs.key)
    factory = cs.BroadcastFactory()
    factory.setProtocolOptions(allowedOrigins=["*"], allowNullOrigin=True)
    root = Resource()
    root.putChild(b"ws", cs.WebSocketResource(factory))
    root.putChild(b"healthz", cs.Health())
    publish = Resource()
    publish.putChild(b"publish", cs.Publish(factory, reactor))
    root.putChild(b"v1", publish)
    site = Site(root)
    site.noisy = False
    listener = reactor.listenSSL(port, site, options, interface="127.0.0.1")  # type: ignore[attr-defined]
    return listener, options


# ---------------------------------------------------------------- measuring

#: Files whose allocations belong to their caller (walk further out).
GENERIC = (
    "zope/",
    "twisted/python/",
    "twisted/logger/",
    "twisted/internet/defer.py",
    "twisted/internet/base.py",  # callLater: the caller's timer
    "twisted/internet/task.py",
    "txaio/",
    "cffi/",
    "conn_breakdown.py",
)

COMPONENTS = (
    ("securepub/broker/", "securepub: session, broker, subscription index"),
    ("securepub/core/topics.py", "securepub: session, broker, subscription index"),
    ("securepub/engines/memory/tickets.py", "securepub: ticket store (tombstones)"),
    ("securepub/core/tickets.py", "securepub: ticket store (tombstones)"),
    ("securepub/server/protocol.py", "securepub: protocol extras (_hs, _ticket, ...)"),
    ("securepub/", "securepub: other"),
    ("ceiling_server.py", "ceiling: broadcast set"),
    ("autobahn/", "Autobahn protocol state"),
    ("twisted/web/", "twisted.web HTTPChannel/Request"),
    ("twisted/protocols/tls.py", "Twisted TLS protocol + transport"),
    ("twisted/internet/", "Twisted TLS protocol + transport"),
    ("OpenSSL/", "pyOpenSSL Connection (Python side)"),
)


def classify(traceback: tracemalloc.Traceback) -> tuple[str, str]:
    """(component, site) of one allocation: the innermost non-generic frame decides."""
    frames = list(traceback)  # oldest first (Python >= 3.7)
    for frame in reversed(frames):
        name = frame.filename
        stdlib = "/lib/python3." in name and "site-packages/" not in name
        if stdlib or any(g in name for g in GENERIC):
            continue
        for marker, component in COMPONENTS:
            if marker in name:
                short = name.split("site-packages/", 1)[-1].split("/work/main/", 1)[-1]
                return component, f"{short}:{frame.lineno}"
        short = name.split("site-packages/", 1)[-1]
        return "other", f"{short}:{frame.lineno}"
    frame = frames[-1]
    return "other (generic only)", f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"


def census() -> Counter[str]:
    counts: Counter[str] = Counter()
    for obj in gc.get_objects():
        t = type(obj)
        counts[f"{t.__module__}.{t.__qualname__}"] += 1
    return counts


class State:
    def __init__(self, with_census: bool, with_tracemalloc: bool) -> None:
        self.rss_kib = rss_kib(os.getpid())
        self.malloc = malloc_in_use()
        self.blocks = sys.getallocatedblocks()
        self.traced = tracemalloc.get_traced_memory()[0] if with_tracemalloc else 0
        self.snapshot = None
        if with_tracemalloc:
            self.snapshot = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)]
            )
        self.census = census() if with_census else None


def per_conn(after: State, before: State, n: int) -> dict[str, float]:
    return {
        "rss_kib": (after.rss_kib - before.rss_kib) / n,
        "malloc_kib": (after.malloc - before.malloc) / 1024 / n,
        "pymalloc_blocks": (after.blocks - before.blocks) / n,
        "traced_kib": (after.traced - before.traced) / 1024 / n,
    }


def breakdown(after: State, before: State, n: int, top: int) -> dict[str, Any]:
    assert after.snapshot is not None and before.snapshot is not None
    diffs = after.snapshot.compare_to(before.snapshot, "traceback")
    components: defaultdict[str, float] = defaultdict(float)
    large: defaultdict[str, float] = defaultdict(float)
    sites: Counter[tuple[str, str]] = Counter()
    site_counts: Counter[tuple[str, str]] = Counter()
    for diff in diffs:
        if not diff.size_diff:
            continue
        component, site = classify(diff.traceback)
        components[component] += diff.size_diff
        sites[(component, site)] += diff.size_diff
        site_counts[(component, site)] += diff.count_diff
        if diff.count_diff and diff.size_diff / diff.count_diff > 512:
            large[component] += diff.size_diff  # served by malloc, not pymalloc
    return {
        "components_kib": {k: v / 1024 / n for k, v in sorted(components.items(),
                                                              key=lambda kv: -kv[1])},
        "over_512B_kib": {k: v / 1024 / n for k, v in large.items()},
        "sites": [
            {"component": c, "site": s, "bytes_per_conn": b / n,
             "blocks_per_conn": site_counts[(c, s)] / n}
            for (c, s), b in sites.most_common(top)
        ],
    }  # fmt: skip


def census_delta(after: State, before: State, n: int, top: int) -> dict[str, float]:
    assert after.census is not None and before.census is not None
    delta = after.census.copy()
    delta.subtract(before.census)
    rows = [(k, v / n) for k, v in delta.items() if abs(v) / n >= 0.2]
    rows.sort(key=lambda kv: -abs(kv[1]))
    return dict(rows[:top])


# ---------------------------------------------------------------- the run


def drive(opts: argparse.Namespace, workdir: Path, port: int, out: dict[str, Any]) -> None:
    """The driver thread: warm up, measure, connect, measure, release, stop the reactor."""
    from twisted.internet import reactor
    from twisted.internet.threads import blockingCallFromThread

    gens: list[Generator] = []
    try:
        ca = workdir / "certs" / "ca.pem"
        wait_healthy(InProcess(opts.server, port, workdir / "log"), ca)  # type: ignore[arg-type]
        api_key_path = workdir / "certs" / "api-key"
        api_key = api_key_path.read_text().strip() if api_key_path.exists() else "none"
        wsload = build_wsload()
        assert wsload is not None
        target = "ours" if opts.server == "securepub" else "ceiling"

        def args(count: int, source: str, mode: str) -> list[str]:
            cmd = ["taskset", "-c", GENERATOR_CORE, str(wsload), "--scenario", "connect"]
            cmd += ["--target", target, "--port", str(port), "--ca", str(ca)]
            cmd += ["--api-key", api_key, "--server-pid", str(os.getpid())]
            cmd += ["--connections", str(count), "--source", source, "--settle", "1"]
            cmd += ["--subscribe-mode", mode, "--topic", "bench.idle"]
            return [*cmd, "--timeout", str(int(120 + count / 50))]

        warm = subprocess.run(args(WARMUP, "127.0.0.1", "none"), capture_output=True, text=True)
        if warm.returncode != 0:
            raise RuntimeError(f"warm-up failed: {warm.stderr[-300:]}")
        time.sleep(1.0)

        def measure() -> State:
            return State(opts.census, opts.tracemalloc > 0)

        def collect_then_measure() -> State:
            gc.collect()  # the warm-up's connections, garbage now: not in the baseline
            if opts.tracemalloc:
                # From here on only: tracing start-up and the warm-up as well is slow.
                tracemalloc.start(opts.tracemalloc)
            return measure()

        before = blockingCallFromThread(reactor, collect_then_measure)
        left, index = opts.count, 0
        t0 = time.monotonic()
        while left > 0:
            n = min(PER_GENERATOR, left)
            source = f"127.0.0.{10 + index}"
            cmd = [*args(n, source, opts.subscribe)[:-2], "--timeout", "600"]
            gen = start_generator(cmd, source, n, workdir)
            gens.append(gen)
            wait_connected(gen, (120 + n / 50) * (8 if opts.tracemalloc else 1))
            left -= n
            index += 1
        out["connect_s"] = time.monotonic() - t0
        opened = sum(g.result["still_open"] for g in gens)
        out["opened"] = opened
        time.sleep(opts.settle)
        after = blockingCallFromThread(reactor, measure)

        def collect_and_measure() -> State:
            out["gc_collected"] = gc.collect()
            return measure()

        collected = blockingCallFromThread(reactor, collect_and_measure)

        def trim_and_measure() -> State:
            _libc.malloc_trim(0)
            return measure()

        trimmed = blockingCallFromThread(reactor, trim_and_measure)
        n = max(1, opened)
        out["per_conn"] = per_conn(after, before, n)
        out["per_conn_after_gc_collect"] = per_conn(collected, before, n)
        out["per_conn_after_malloc_trim"] = per_conn(trimmed, before, n)
        if opts.tracemalloc:
            out["tracemalloc"] = breakdown(after, before, n, opts.top)
            out["tracemalloc_after_gc_collect"] = breakdown(collected, before, n, opts.top)
        if opts.census:
            out["census"] = census_delta(after, before, n, opts.top)
            out["census_after_gc_collect"] = census_delta(collected, before, n, opts.top)
        if opts.referrers:
            out["referrers"] = blockingCallFromThread(reactor, referrers_of, opts.referrers)
        if opts.dump:
            out["dump"] = blockingCallFromThread(reactor, dump_instance, opts.dump)
    except Exception as e:  # noqa: BLE001 - reported, and the reactor still stops
        out["error"] = f"{type(e).__name__}: {e}"[:500]
    finally:
        release(gens)
        reactor.callFromThread(reactor.stop)  # type: ignore[attr-defined]


def referrers_of(type_name: str) -> list[str]:
    """Who holds one live object of this type (and who holds that)."""
    found = [o for o in gc.get_objects() if type(o).__qualname__ == type_name]
    if not found:
        return [f"no live {type_name}"]
    target = found[len(found) // 2]
    lines = [f"{len(found)} live {type_name}; referrers of one:"]
    for ref in gc.get_referrers(target):
        if ref is found:
            continue
        desc = type(ref).__qualname__
        if isinstance(ref, dict):
            owners = [type(o).__qualname__ for o in gc.get_referrers(ref)
                      if getattr(o, "__dict__", None) is ref]  # fmt: skip
            keys = [k for k, v in ref.items() if v is target][:3]
            desc = f"dict of {owners or '?'} keys={keys}"
        elif isinstance(ref, list | tuple):
            owners = [type(o).__qualname__ for o in gc.get_referrers(ref)][:4]
            desc = f"{desc} held by {owners}"
        lines.append("  " + desc)
    return lines


def dump_instance(type_name: str) -> list[str]:
    """One live instance's attributes with their shallow sizes, biggest first."""
    found = [o for o in gc.get_objects() if type(o).__qualname__ == type_name]
    if not found:
        return [f"no live {type_name}"]
    target = found[len(found) // 2]
    attrs = getattr(target, "__dict__", {})
    lines = [f"{len(found)} live {type_name}; one has {len(attrs)} attributes, __dict__ "
             f"{sys.getsizeof(attrs)} B, object {sys.getsizeof(target)} B"]  # fmt: skip
    sized = sorted(attrs.items(), key=lambda kv: -sys.getsizeof(kv[1]))
    for name, value in sized:
        lines.append(f"  {sys.getsizeof(value):6d} B  {name} = {type(value).__qualname__}")
    return lines


def start_logging(workdir: Path) -> None:
    """Log to a file, as twistd does: unstarted, twisted.logger would keep every event."""
    from twisted.logger import globalLogBeginner, textFileLogObserver

    sink = (workdir / "server.log").open("a")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sink)], redirectStandardIO=False)


def run_server(opts: argparse.Namespace) -> dict[str, Any]:
    raise_fd_limit()
    os.sched_setaffinity(0, {SERVER_CORE})
    apply_levers(opts.levers)
    workdir = Path(tempfile.mkdtemp(prefix="securepub-breakdown-"))
    cwd = os.getcwd()
    os.chdir(workdir)
    out: dict[str, Any] = {
        "server": opts.server,
        "count": opts.count,
        "levers": opts.levers,
        "subscribe": opts.subscribe,
        "tracemalloc_frames": opts.tracemalloc,
    }
    try:
        from twisted.internet import reactor

        start_logging(workdir)
        port = free_port()
        if opts.server == "securepub":
            service = start_securepub(workdir, port)
            stop: Callable[[], Any] = service.stopService
            tls_options = service.node.tls.current
        else:
            listener, tls_options = start_ceiling(workdir, port)
            stop = listener.stopListening  # gc left as ceiling_server.py leaves it
        out["ssl_mode"] = ssl_mode_of(tls_options)
        driver = threading.Thread(target=drive, args=(opts, workdir, port, out), daemon=True)
        reactor.callWhenRunning(driver.start)  # type: ignore[attr-defined]
        reactor.run(installSignalHandlers=False)  # type: ignore[attr-defined]
        del stop
        out["log_problems"] = log_problems(workdir / "server.log")
    finally:
        os.chdir(cwd)
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def log_problems(path: Path) -> dict[str, Any]:
    """How many tracebacks the server logged, and the first one (a lever may break things)."""
    if not path.exists():
        return {"tracebacks": 0}
    lines = path.read_text(errors="replace").splitlines()
    starts = [i for i, line in enumerate(lines) if "Traceback" in line]
    first = lines[starts[0] - 1 : starts[0] + 14] if starts else []
    return {"tracebacks": len(starts), "first": first}


def ssl_mode_of(tls_options: Any) -> int:
    """The listener context's SSL mode bits (MODE_RELEASE_BUFFERS is 0x10)."""
    return int(tls_options.getContext().set_mode(0))


# ---------------------------------------------------------------- OpenSSL alone


def openssl_micro(n: int) -> dict[str, Any]:
    """N idle server-side SSL.Connections after a TLS 1.3 handshake and one exchange each.

    The client offers X25519 only (as wsload, built on the system's OpenSSL 3.0,
    does) or X25519MLKEM768 first (as OpenSSL 3.5+ and current browsers do).
    Reports the server side only: native memory per idle connection, with and
    without MODE_RELEASE_BUFFERS, the CPU of its handshake and first records,
    and how many bytes it sends after the handshake (TLS 1.3 session tickets).
    """
    from OpenSSL import SSL
    from OpenSSL._util import lib

    from securepub.dev.certs import ensure_dev_certs
    from securepub.server.tls import server_context_factory

    workdir = Path(tempfile.mkdtemp(prefix="securepub-openssl-"))
    results: dict[str, Any] = {
        "count": n,
        "openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
    }
    try:
        certs = ensure_dev_certs(str(workdir / "certs"))
        for groups in (b"X25519", b"X25519MLKEM768:X25519"):
            for release_buffers in (True, False):
                options = server_context_factory(certs.cert, certs.key)
                if release_buffers:
                    server_ctx = options.getContext()  # as the server's listener has it
                else:  # set_mode only adds bits: build one without Twisted's default
                    server_ctx = _context_without_release(options)
                mode = int(server_ctx.set_mode(0))  # before any Connection: then it is frozen
                client_ctx = SSL.Context(SSL.TLS_METHOD)
                client_ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
                client_ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)
                if lib.SSL_CTX_set1_curves_list(client_ctx._context, groups) != 1:
                    raise RuntimeError(f"cannot offer {groups!r}")
                keep: list[Any] = []
                cpu = {"new": 0.0, "handshake": 0.0, "records": 0.0}
                tail_bytes = 0
                gc.collect()
                _libc.malloc_trim(0)
                before = (malloc_in_use(), rss_kib(os.getpid()))
                for _ in range(n):
                    t = time.process_time()
                    server = SSL.Connection(server_ctx, None)
                    server.set_accept_state()
                    cpu["new"] += time.process_time() - t
                    client = SSL.Connection(client_ctx, None)
                    client.set_connect_state()
                    spent, tail = _pump(client, server)
                    cpu["handshake"] += spent
                    tail_bytes += tail
                    client.send(b"GET /ws HTTP/1.1\r\n" + b"x" * 250 + b"\r\n\r\n")
                    _move(client, server)
                    t = time.process_time()
                    server.recv(65536)
                    server.send(b"HTTP/1.1 101 Switching Protocols\r\n" + b"y" * 150 + b"\r\n\r\n")
                    data = server.bio_read(65536)
                    cpu["records"] += time.process_time() - t
                    client.bio_write(data)
                    client.recv(65536)
                    keep.append(server)
                    del client
                gc.collect()
                after = (malloc_in_use(), rss_kib(os.getpid()))
                key = f"{groups.decode().split(':')[0]}, " + (
                    "MODE_RELEASE_BUFFERS" if release_buffers else "buffers kept"
                )
                results[key] = {
                    "group": keep[0].get_group_name(),
                    "mode": mode,
                    "malloc_kib_per_conn": (after[0] - before[0]) / 1024 / n,
                    "rss_kib_per_conn": (after[1] - before[1]) / n,
                    "server_cpu_us": {k: 1e6 * v / n for k, v in cpu.items()},
                    "bytes_after_handshake": tail_bytes / n,
                }
                if release_buffers:
                    results[key].update(_big_message_then_fresh_bio(keep, before[0], n))
                del keep
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def _big_message_then_fresh_bio(keep: list[Any], base: int, n: int) -> dict[str, float]:
    """Native memory after each connection is sent 64 KiB (as Twisted writes it:
    16 KiB records, the outgoing BIO read after each), then after the listener's
    fresh-BIO renewals (securepub.server.tls_bios.renew_write_bio and, for
    the ClientHello's buffer, renew_read_bio)."""
    from securepub.server.tls_bios import renew_read_bio, renew_write_bio

    for server in keep:
        for _ in range(4):
            server.send(b"z" * 16384)
            server.bio_read(1 << 15)
    gc.collect()
    sent = malloc_in_use()
    for server in keep:
        renew_write_bio(server)
    gc.collect()
    renewed = malloc_in_use()
    for server in keep:
        renew_read_bio(server)
    gc.collect()
    both = malloc_in_use()
    return {
        "malloc_kib_per_conn_after_64k_sent": (sent - base) / 1024 / n,
        "malloc_kib_per_conn_after_fresh_bio": (renewed - base) / 1024 / n,
        "malloc_kib_per_conn_after_both_fresh": (both - base) / 1024 / n,
    }


def _context_without_release(options: Any) -> Any:
    from OpenSSL import SSL

    original = SSL.Context.set_mode

    def set_mode(self: Any, mode: int) -> int:
        return int(original(self, mode & ~SSL.MODE_RELEASE_BUFFERS))

    SSL.Context.set_mode = set_mode  # type: ignore[method-assign]
    try:
        return options._makeContext()
    finally:
        SSL.Context.set_mode = original  # type: ignore[method-assign]


def _move(src: Any, dst: Any) -> int:
    from OpenSSL import SSL

    moved = 0
    while True:
        try:
            data = src.bio_read(65536)
        except SSL.WantReadError:
            return moved
        if not data:
            return moved
        dst.bio_write(data)
        moved += len(data)


def _pump(client: Any, server: Any) -> tuple[float, int]:
    """Handshake over memory BIOs; the server's CPU seconds, and what it sent after its Finished."""
    from OpenSSL import SSL

    spent = 0.0
    server_done = False
    tail = 0
    for _ in range(20):
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
        client_out = _move(client, server)
        t = time.process_time()
        if not server_done:
            try:
                server.do_handshake()
                server_done = True
            except SSL.WantReadError:
                pass
        try:
            data = server.bio_read(65536)
        except SSL.WantReadError:
            data = b""
        spent += time.process_time() - t
        if data:
            if server_done:
                tail += len(data)  # after the server's handshake: session tickets
            client.bio_write(data)
        if server_done and not data and not client_out:
            try:
                client.recv(65536)  # takes the tickets
            except SSL.WantReadError:
                pass
            return spent, tail
    raise RuntimeError("TLS handshake did not finish")


# ---------------------------------------------------------------- main


def print_report(out: dict[str, Any]) -> None:
    if "openssl_micro" in out:
        print(json.dumps(out["openssl_micro"], indent=1))
        return
    print(f"{out['server']}: {out.get('opened')} idle connections, levers={out['levers'] or '-'}, "
          f"subscribe={out['subscribe']}, SSL mode bits={out.get('ssl_mode')}")  # fmt: skip
    if "error" in out:
        print(f"  error: {out['error']}")
        return
    for key in ("per_conn", "per_conn_after_gc_collect", "per_conn_after_malloc_trim"):
        p = out[key]
        print(
            f"  {key}: RSS {p['rss_kib']:.2f} KiB, malloc in use {p['malloc_kib']:.2f} KiB, "
            f"pymalloc blocks {p['pymalloc_blocks']:.1f}, traced {p['traced_kib']:.2f} KiB"
        )
    for key in ("tracemalloc", "tracemalloc_after_gc_collect"):
        if key not in out:
            continue
        print(f"  {key}: KiB per connection by component (of which >512 B blocks, malloc)")
        for name, kib in out[key]["components_kib"].items():
            big = out[key]["over_512B_kib"].get(name, 0.0)
            print(f"    {kib:7.2f}  ({big:5.2f})  {name}")
        if key == "tracemalloc":
            print("  top sites (bytes, blocks per connection):")
            for site in out[key]["sites"]:
                print(f"    {site['bytes_per_conn']:7.0f} B {site['blocks_per_conn']:5.2f}  "
                      f"{site['site']}  [{site['component']}]")  # fmt: skip
    for key in ("census", "census_after_gc_collect"):
        if key in out:
            print(f"  {key}: live objects per connection")
            for name, count in out[key].items():
                print(f"    {count:6.2f}  {name}")
    problems = out.get("log_problems", {})
    if problems.get("tracebacks"):
        print(f"  WARNING: the server logged {problems['tracebacks']} tracebacks; the first:")
        for line in problems["first"]:
            print(f"    {line[:160]}")
    for line in out.get("referrers", []) + out.get("dump", []):
        print(f"  {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", choices=("securepub", "ceiling"), default="securepub")
    parser.add_argument("--count", type=int, default=5000, help="idle connections (5000)")
    parser.add_argument("--subscribe", choices=("none", "same", "distinct"), default="none")
    parser.add_argument(
        "--tracemalloc",
        type=int,
        default=0,
        metavar="FRAMES",
        help="trace Python allocations with this many frames (0: off)",
    )
    parser.add_argument("--census", action="store_true", help="live objects by type")
    parser.add_argument("--referrers", metavar="TYPE", help="who holds a live TYPE (e.g. "
                        "HTTPChannel)")  # fmt: skip
    parser.add_argument("--dump", metavar="TYPE", help="attributes of one live TYPE")
    parser.add_argument("--levers", default="", help="comma-separated monkeypatches")
    parser.add_argument("--list-levers", action="store_true")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--openssl-micro", type=int, default=0, metavar="N")
    parser.add_argument(
        "--pythonpath",
        metavar="DIR",
        help="import securepub from DIR (e.g. a `git archive` export)",
    )
    parser.add_argument("--output", help="JSON lines file (results/conn-breakdown-<stamp>.jsonl)")
    opts = parser.parse_args(argv)  # fmt: skip
    if opts.list_levers:
        for name, text in LEVERS.items():
            print(f"{name}: {text}")
        return 0
    opts.levers = [name for name in opts.levers.split(",") if name]
    if opts.pythonpath:
        sys.path.insert(0, opts.pythonpath)
    import securepub

    opts.securepub_from = os.path.dirname(os.path.dirname(securepub.__file__))
    stamp = time.strftime("%Y%m%dT%H%M%S")
    if opts.openssl_micro:
        os.sched_setaffinity(0, {SERVER_CORE})
        if opts.tracemalloc:
            tracemalloc.start(opts.tracemalloc)
        out: dict[str, Any] = {"openssl_micro": openssl_micro(opts.openssl_micro)}
    else:
        out = run_server(opts)
    out["run"] = stamp
    out["securepub_from"] = opts.securepub_from
    results = BENCH / "results"
    results.mkdir(exist_ok=True)
    path = Path(opts.output) if opts.output else results / f"conn-breakdown-{stamp}.jsonl"
    with path.open("a") as sink:
        sink.write(json.dumps(out) + "\n")
    print_report(out)
    print(f"results: {path}")
    return 1 if "error" in out else 0


if __name__ == "__main__":
    sys.exit(main())
