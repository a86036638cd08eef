"""Server memory with one stalled subscriber under a steady stream, with and without
the slow-consumer bound (max_queued_bytes 1 MiB, versus 1 GiB: effectively none).

Usage: python bench/stalled.py [--rate 1000] [--seconds 10] [--size 1000]
Starts its own nodes on free ports on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])

from tests.server import Server, recv_json, request_json


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def run(bound: int, rate: float, seconds: float, size: int) -> dict[str, object]:
    server = Server({"limits": {"max_queued_bytes": bound}}).start()
    try:
        assert server.proc is not None
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((server.host, server.port))
        stalled = server.ws(server.ticket(subscribe=["s.*"]), sock=sock, max_queue=1)
        recv_json(stalled)
        assert request_json(stalled, {"op": "subscribe", "id": 1, "topic": "s.*"})["op"] == "ok"
        before = rss_kib(server.proc.pid)
        http = server.connection()
        headers = {"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"}
        body = json.dumps({"topic": "s.x", "data": {"pad": "x" * size}})
        start = time.monotonic()
        sent = 0
        peak = before
        while time.monotonic() - start < seconds:
            delay = start + sent / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            http.request("POST", "/v1/publish", body, headers)
            response = http.getresponse()
            response.read()
            sent += 1
            if sent % 100 == 0:
                peak = max(peak, rss_kib(server.proc.pid))
        after = rss_kib(server.proc.pid)
        closed = "closing slow consumer" in server.log_text()
        return {
            "max_queued_bytes": bound,
            "messages": sent,
            "payload_bytes": size,
            "rss_before_kib": before,
            "rss_peak_kib": max(peak, after),
            "growth_kib": max(peak, after) - before,
            "stalled_client_closed": closed,
        }
    finally:
        server.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--size", type=int, default=1000)
    args = parser.parse_args()
    for bound in (1024**3, 1024**2):
        print(json.dumps(run(bound, args.rate, args.seconds, args.size)))


if __name__ == "__main__":
    main()
