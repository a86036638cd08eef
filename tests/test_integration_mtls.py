"""mTLS for backends: a client certificate from --client-ca replaces the API key."""

from __future__ import annotations

import http.client
import json
import os
import ssl
from collections.abc import Iterator

import pytest
import trustme

from tests.server import Server, recv_json, request_json


@pytest.fixture(scope="module")
def backend_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def srv(backend_ca: trustme.CA) -> Iterator[Server]:
    pem = backend_ca.cert_pem.bytes().decode()
    server = Server(files={"backend-ca.pem": pem}, extra_args=["--client-ca", "backend-ca.pem"])
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def publish_with_cert(server: Server, cert: trustme.LeafCert | None) -> tuple[int, object]:
    context = ssl.create_default_context(cafile=server.ca_path)
    if cert is not None:
        path = os.path.join(server.directory, "client.pem")
        cert.private_key_and_cert_chain_pem.write_to_path(path)
        context.load_cert_chain(path)
    conn = http.client.HTTPSConnection(server.host, server.port, context=context, timeout=5)
    try:
        conn.request(
            "POST",
            "/v1/publish",
            json.dumps({"topic": "orders.new", "data": {"n": 1}}),
            {"Content-Type": "application/json"},
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_client_certificate_replaces_the_api_key(srv: Server, backend_ca: trustme.CA) -> None:
    """A certificate signed by --client-ca may publish without an API key."""
    status, body = publish_with_cert(srv, backend_ca.issue_cert("orders-service@example.com"))
    assert status == 202 and "id" in body  # type: ignore[operator]


def test_no_certificate_still_needs_a_key(srv: Server) -> None:
    """Without a certificate the API key is required as before."""
    status, body = publish_with_cert(srv, None)
    assert (status, body["error"]) == (401, "unauthorized")  # type: ignore[index]


def test_foreign_certificate_refused(srv: Server) -> None:
    """A certificate from another CA fails the TLS handshake."""
    with pytest.raises((ssl.SSLError, ConnectionError)):
        publish_with_cert(srv, trustme.CA().issue_cert("intruder@example.com"))


def test_browsers_need_no_certificate(srv: Server) -> None:
    """WebSocket clients without a certificate connect and subscribe as usual."""
    conn = srv.session(subscribe=["orders.*"])
    assert request_json(conn, {"op": "subscribe", "id": 1, "topic": "orders.*"})["op"] == "ok"
    message_id = srv.publish("orders.x", 1)
    assert recv_json(conn)["id"] == message_id
    conn.close()
