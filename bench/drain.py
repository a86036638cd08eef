"""Time a SIGTERM drain: N open WebSocket sessions, then SIGTERM, until the node exits.

Usage: python bench/drain.py [--connections 1000]
Starts its own node on a free port on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import signal
import ssl
import sys
import time

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])

from tests.server import Server


async def open_sessions(server: Server, count: int) -> list[object]:
    import websockets

    context = ssl.create_default_context(cafile=server.ca_path)
    loop = asyncio.get_running_loop()
    tickets = await loop.run_in_executor(None, lambda: [server.ticket() for _ in range(count)])
    connections = []
    for start in range(0, count, 100):
        batch = tickets[start : start + 100]
        opened = await asyncio.gather(
            *(
                websockets.connect(
                    server.ws_url,
                    ssl=context,
                    subprotocols=["securepub.v1", "ticket." + t],  # type: ignore[list-item]
                    ping_interval=None,
                    max_queue=None,
                )
                for t in batch
            )
        )
        for conn in opened:
            await conn.recv()  # welcome
        connections.extend(opened)
    return connections


async def main(count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * count + 256)), hard))
    server = Server({"limits": {"max_connections_per_ip": count + 10}}).start()
    try:
        connections = await open_sessions(server, count)
        assert server.proc is not None
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(*(c.wait_closed() for c in connections))  # type: ignore[attr-defined]
        closed = time.monotonic() - started
        await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, 30)
        exited = time.monotonic() - started
        del codes
        close_codes = {c.close_code for c in connections}  # type: ignore[attr-defined]
        match = re.search(r"(\d+) sessions closed .* in ([0-9.]+) s", server.log_text())
        print(
            json.dumps(
                {
                    "connections": count,
                    "close_codes": sorted(close_codes),
                    "all_clients_closed_s": round(closed, 3),
                    "process_exited_s": round(exited, 3),
                    "server_drain_s": float(match.group(2)) if match else None,
                }
            )
        )
    finally:
        server.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=1000)
    asyncio.run(main(parser.parse_args().connections))
