"""Stopping a real node: SIGTERM closes sessions with 1001 and exits cleanly."""

from __future__ import annotations

import signal
import time

import pytest
from websockets.exceptions import ConnectionClosed

from tests.server import Server, recv_json, request_json


def test_sigterm_closes_sessions_with_1001() -> None:
    """On SIGTERM the node stops listening, sends 1001 to every client and exits."""
    server = Server().start()
    try:
        clients = [server.session(subscribe=["news.*"]) for _ in range(3)]
        for conn in clients:
            assert request_json(conn, {"op": "subscribe", "id": 1, "topic": "news.*"})["op"] == "ok"
        assert server.proc is not None
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        for conn in clients:
            with pytest.raises(ConnectionClosed) as closed:
                recv_json(conn, timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        # twistd stops cleanly, then ends by the signal it got (as systemd expects).
        assert server.proc.wait(15) in (0, -signal.SIGTERM)
        assert time.monotonic() - started < 10
        assert "3 sessions closed" in server.log_text()
    finally:
        server.cleanup()
