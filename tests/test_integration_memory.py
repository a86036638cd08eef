"""Idle connections stay cheap: 2,000 of them on a real server, and its RSS bound.

The bound is not a benchmark (``bench/connections.py`` measures, side by side
with a bare Autobahn server): it is the measured figure, about 28 KiB per idle
TLS 1.3 WebSocket, several times over, so only a regression of that order
(a per-connection buffer kept, a structure copied into every session) fails.
"""

from __future__ import annotations

import asyncio
import json
import resource
from typing import Any

from tests.server import SUBPROTOCOL, Server, server_fixture

COUNT = 2000
#: KiB per idle connection this test accepts: about 3.5x what bench/ measures.
BOUND_KIB = 100


def _raise_fd_limit(count: int) -> None:
    """The test and the server it starts (which inherits it) hold ``count`` sockets each."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 500), hard))


_raise_fd_limit(COUNT)
srv = server_fixture({"limits": {"max_connections_per_ip": COUNT + 100}})


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _tickets(srv: Server, count: int) -> list[str]:
    conn = srv.connection(timeout=10)
    tickets = []
    try:
        for i in range(count):
            body = json.dumps(
                {"user": f"idle{i}", "client_ip": "127.0.0.1", "subscribe": [f"idle.c{i}"]}
            )
            conn.request(
                "POST",
                "/v1/tickets",
                body=body,
                headers={
                    "Authorization": f"Bearer {srv.api_key}",
                    "Content-Type": "application/json",
                },
            )
            response = conn.getresponse()
            payload = json.loads(response.read())
            assert response.status == 201, payload
            tickets.append(payload["ticket"])
    finally:
        conn.close()
    return tickets


async def _open_all(srv: Server, tickets: list[str]) -> list[Any]:
    from websockets.asyncio.client import connect

    ctx = srv.ssl_context()  # one thread: TLS 1.3 is safe here (see ws_ssl_context)
    gate = asyncio.Semaphore(50)

    async def one(i: int, ticket: str) -> Any:
        async with gate:
            ws = await connect(
                f"wss://{srv.host}:{srv.port}/ws",
                ssl=ctx,
                subprotocols=[SUBPROTOCOL, "ticket." + ticket],  # type: ignore[list-item]
                compression=None,
                ping_interval=None,
                proxy=None,
                open_timeout=30,
            )
            assert json.loads(await ws.recv())["op"] == "welcome"
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "topic": f"idle.c{i}"}))
            assert json.loads(await ws.recv())["op"] == "ok"
            return ws

    return list(await asyncio.gather(*(one(i, t) for i, t in enumerate(tickets))))


def test_2000_idle_connections_stay_under_the_memory_bound(srv: Server) -> None:
    assert srv.proc is not None
    pid = srv.proc.pid
    # Warm up first: the first connections pay for imports, caches and pools.
    warm = _tickets(srv, 50)

    async def run() -> tuple[int, int]:
        opened = await _open_all(srv, warm)
        for ws in opened:
            await ws.close()
        tickets = _tickets(srv, COUNT)
        await asyncio.sleep(0.5)
        before = _rss_kib(pid)
        opened = await _open_all(srv, tickets)
        await asyncio.sleep(1.0)
        after = _rss_kib(pid)
        status, _, body = srv.api("GET", "/healthz")
        assert status == 200, body
        for ws in opened:
            await ws.close()
        return before, after

    before, after = asyncio.run(run())
    per_connection = (after - before) / COUNT
    assert per_connection < BOUND_KIB, (
        f"{per_connection:.1f} KiB per idle connection (RSS {before} -> {after} KiB)"
    )
