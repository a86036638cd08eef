"""A real client that stops reading is closed as a slow consumer; the others are not held up."""

from __future__ import annotations

import json
import socket
import threading

from tests.server import Server, recv_json, request_json

MESSAGES = 400
PAD = "x" * 16_000


def stalled_socket(server: Server) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((server.host, server.port))
    return sock


def test_stalled_client_closed_others_served() -> None:
    """Past max_queued_bytes the stalled client is dropped (4008, logged), and a
    healthy subscriber still receives every message."""
    server = Server({"limits": {"max_queued_bytes": 65536}}).start()
    try:
        stalled = server.ws(
            server.ticket(subscribe=["bulk.*"]), sock=stalled_socket(server), max_queue=1
        )
        assert recv_json(stalled)["op"] == "welcome"
        assert request_json(stalled, {"op": "subscribe", "id": 1, "topic": "bulk.*"})["op"] == "ok"
        healthy = server.session(subscribe=["bulk.*"])
        assert request_json(healthy, {"op": "subscribe", "id": 1, "topic": "bulk.*"})["op"] == "ok"
        received: list[int] = []

        def read() -> None:
            for _ in range(MESSAGES):
                received.append(recv_json(healthy, timeout=20)["data"]["n"])

        reader = threading.Thread(target=read)
        reader.start()
        http = server.connection()
        headers = {"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"}
        for n in range(MESSAGES):
            body = json.dumps({"topic": "bulk.data", "data": {"n": n, "pad": PAD}})
            http.request("POST", "/v1/publish", body, headers)
            response = http.getresponse()
            response.read()
            assert response.status == 202
        reader.join(30)
        assert received == list(range(MESSAGES))
        line = server.wait_for_log(lambda text: "closing slow consumer" in text, timeout=10)
        assert "over 65536 bytes queued" in line
        healthy.close()
    finally:
        server.cleanup()
