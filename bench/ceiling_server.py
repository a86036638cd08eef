"""The ceiling: a bare Twisted + Autobahn TLS broadcast server to measure securepub against.

Same shape as securepub on the wire, none of its checks: one TLS port (same
certificate, TLS 1.3 here) serving ``POST /v1/publish`` and ``wss://.../ws``.
Any text frame from a client subscribes it (answered with ``ok``); a publish
body ``{"topic": ..., "data": ...}`` is parsed with ``json.loads``, framed
like securepub's ``message`` frame, prepared once with ``prepareMessage``
and sent to every subscriber with ``sendPreparedMessage``. No auth, no
tickets, no validation, no logging.

    taskset -c 0 python bench/ceiling_server.py --port 9444 \
        --cert certs/server.pem --key certs/server.key
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from itertools import count
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.web.resource import Resource
from twisted.web.server import Site


class BroadcastProtocol(WebSocketServerProtocol):
    """A client: its first text frame subscribes it."""

    subscribed = False

    def onConnect(self, request: Any) -> str | None:
        # Accept the subprotocol securepub clients offer, so clients are the same.
        return "securepub.v1" if "securepub.v1" in request.protocols else None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not self.subscribed:
            self.subscribed = True
            self.factory.subscribers.add(self)
        self.sendMessage(b'{"op":"ok"}')

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.factory.subscribers.discard(self)


class BroadcastFactory(WebSocketServerFactory):
    protocol = BroadcastProtocol

    def __init__(self) -> None:
        super().__init__()
        self.subscribers: set[BroadcastProtocol] = set()
        self.numbers = count(1)

    def broadcast(self, topic: str, data: Any, ts: float) -> str:
        message_id = f"ceiling-{next(self.numbers)}"
        frame = (
            '{"op":"message","topic":'
            + json.dumps(topic)
            + ',"id":"'
            + message_id
            + '","ts":'
            + repr(ts)
            + ',"data":'
            + json.dumps(data, separators=(",", ":"))
            + "}"
        ).encode("utf-8")
        prepared = self.prepareMessage(frame)
        for client in tuple(self.subscribers):
            client.sendPreparedMessage(prepared)
        return message_id


class Publish(Resource):
    isLeaf = True

    def __init__(self, factory: BroadcastFactory, reactor: Any) -> None:
        super().__init__()
        self.factory = factory
        self.reactor = reactor

    def render_POST(self, request: Any) -> bytes:
        body = json.loads(request.content.read())
        message_id = self.factory.broadcast(body["topic"], body["data"], self.reactor.seconds())
        request.setResponseCode(202)
        request.setHeader(b"content-type", b"application/json")
        return b'{"id":"' + message_id.encode() + b'"}'


class Health(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return b'{"status":"ok"}'


class _ChainFiles(ssl.CertificateOptions):
    """CertificateOptions that load the whole PEM chain and the key from files."""

    def __init__(self, cert_path: str, key_path: str) -> None:
        super().__init__(raiseMinimumTo=ssl.TLSVersion.TLSv1_3)
        self._cert_path = cert_path
        self._key_path = key_path

    def _makeContext(self, skipCiphers: bool = False) -> SSL.Context:
        ctx = super()._makeContext(skipCiphers=skipCiphers)
        ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
        ctx.use_certificate_chain_file(self._cert_path)
        ctx.use_privatekey_file(self._key_path)
        ctx.check_privatekey()
        return ctx


def tls_options(cert_path: str, key_path: str) -> ssl.CertificateOptions:
    """The same certificate chain and key as securepub serves, TLS 1.3 only."""
    options = _ChainFiles(cert_path, key_path)
    options.getContext()  # fail now on a bad file, not at the first handshake
    return options


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--cert", required=True, help="PEM certificate (chain)")
    parser.add_argument("--key", required=True, help="PEM private key")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    options = tls_options(args.cert, args.key)
    factory = BroadcastFactory()
    factory.setProtocolOptions(allowedOrigins=["*"], allowNullOrigin=True)
    root = Resource()
    root.putChild(b"ws", WebSocketResource(factory))
    root.putChild(b"healthz", Health())
    publish = Resource()
    publish.putChild(b"publish", Publish(factory, reactor))
    root.putChild(b"v1", publish)
    site = Site(root)
    site.noisy = False
    reactor.listenSSL(args.port, site, options, interface=args.interface)  # type: ignore[attr-defined]
    sys.stdout.write(
        f"ceiling listening on https://{args.interface}:{args.port} pid={os.getpid()}\n"
    )
    sys.stdout.flush()
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
