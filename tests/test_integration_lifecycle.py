"""Stopping a real node: SIGTERM closes sessions with 1001 and exits cleanly."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import time

import pytest
from cryptography import x509
from websockets.exceptions import ConnectionClosed

from tests.server import Server, recv_json, request_json, session_ca


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


def served_serial(server: Server) -> int:
    context = ssl.create_default_context(cafile=server.ca_path)
    with socket.create_connection((server.host, server.port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_sighup_reloads_certificate_and_keys_keeping_connections() -> None:
    """SIGHUP: new certificate and API keys for new requests; live sessions stay."""
    server = Server().start()
    try:
        assert server.proc is not None
        live = server.session(subscribe=["news.*"])
        assert request_json(live, {"op": "subscribe", "id": 1, "topic": "news.*"})["op"] == "ok"
        old_serial = served_serial(server)
        old_key = server.api_key
        leaf = session_ca().issue_cert("localhost", "127.0.0.1")
        with open(os.path.join(server.directory, "server.pem"), "wb") as f:
            for blob in leaf.cert_chain_pems:
                f.write(blob.bytes())
        leaf.private_key_pem.write_to_path(os.path.join(server.directory, "server.key"))
        new_key = "rotated-" + "k" * 40
        with open(os.path.join(server.directory, "api-keys"), "w") as f:
            f.write(new_key + "\n")
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log(lambda text: "reloaded API keys" in text)
        new_serial = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number
        assert served_serial(server) == new_serial != old_serial
        server.api_key = new_key
        message_id = server.publish("news.rotated", 1)
        assert recv_json(live)["id"] == message_id
        status, _, _ = server.api("POST", "/v1/publish", {"topic": "a", "data": 1}, key=old_key)
        assert status == 401

        with open(os.path.join(server.directory, "server.pem"), "w") as f:
            f.write("not a certificate")
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log(lambda text: "keeping the current certificate" in text)
        assert served_serial(server) == new_serial
        assert new_key not in server.log_text() and old_key not in server.log_text()
        live.close()
    finally:
        server.cleanup()
