"""The upgrade's short way: a first request that is a plain /ws upgrade skips twisted.web."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SynchronousTestCase

from securepub.server.api import NotFound
from securepub.server.site import MAX_SNIFFED_HEAD, Opening, Root, SecurePubSite
from securepub.server.upgrade import is_websocket_upgrade
from tests.wsframes import handshake

PEER = IPv4Address("TCP", "192.0.2.7", 40000)


class Recorder(Protocol):
    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class RecordingFactory(Factory):
    def __init__(self) -> None:
        self.built: list[Recorder] = []

    def buildProtocol(self, addr: Any) -> Recorder:
        protocol = Recorder()
        protocol.factory = self
        self.built.append(protocol)
        return protocol


def head(lines: list[str]) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class IsWebsocketUpgradeTests(SynchronousTestCase):
    def test_plain_upgrades(self) -> None:
        for path in ("/ws", "/ws?ticket=abc"):
            request = head([f"GET {path} HTTP/1.1", "Host: x", "UPGRADE:  WebSocket"])
            self.assertTrue(is_websocket_upgrade(request[:-4]), path)

    def test_anything_else_takes_the_ordinary_way(self) -> None:
        for request in (
            head(["GET /ws HTTP/1.1", "Host: x"]),  # no Upgrade
            head(["POST /ws HTTP/1.1", "Upgrade: websocket"]),
            head(["GET /ws/x HTTP/1.1", "Upgrade: websocket"]),
            head(["GET /wss HTTP/1.1", "Upgrade: websocket"]),
            head(["GET /ws HTTP/1.0", "Upgrade: websocket"]),
            head(["GET https://x/ws HTTP/1.1", "Upgrade: websocket"]),
            head(["GET /ws HTTP/1.1", "Upgrade: websocket, h2c"]),
            head(["GET /ws HTTP/1.1", "X-Upgrade: websocket"]),
        ):
            self.assertFalse(is_websocket_upgrade(request[:-4]), request)


class SiteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.websocket = RecordingFactory()
        self.opening = Opening(100)
        site = SecurePubSite(
            Root({b"healthz": NotFound()}),
            max_body_bytes=1000,
            reactor=self.clock,
            opening=self.opening,
            websocket=self.websocket,
        )
        # A wrapping protocol stands for TLS: the channel is its wrapped protocol.
        self.wrapper = WrappingFactory(site).buildProtocol(PEER)
        self.transport = StringTransport(peerAddress=PEER)
        self.wrapper.makeConnection(self.transport)

    def test_an_upgrade_goes_to_the_websocket_factory_as_it_arrived(self) -> None:
        request = handshake(path="/ws?ticket=t", protocols=["securepub.v1"]) + b"\x81\x80frame"
        self.assertEqual(self.opening.count, 1)
        for i in range(0, len(request), 7):  # in pieces, as TLS records may cut it
            self.wrapper.dataReceived(request[i : i + 7])
        [protocol] = self.websocket.built
        self.assertEqual(protocol.received, request)
        self.assertIs(self.wrapper.wrappedProtocol, protocol)
        self.assertIs(protocol.transport, self.wrapper)
        self.assertEqual(self.opening.count, 0)
        self.assertIsNone(self.transport.producer)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # deadline and idle timeout gone

    def test_other_requests_are_served_by_the_site(self) -> None:
        self.wrapper.dataReceived(head(["GET /nothing HTTP/1.1", "Host: x"]))
        self.assertEqual(self.websocket.built, [])
        self.assertIn(b"404", self.transport.value().split(b"\r\n")[0])
        self.assertEqual(self.opening.count, 0)

    def test_a_head_over_the_limit_goes_to_twisted_web(self) -> None:
        padding = "X-Pad: " + "a" * MAX_SNIFFED_HEAD
        self.wrapper.dataReceived(head(["GET /ws HTTP/1.1", "Upgrade: websocket", padding]))
        self.assertEqual(self.websocket.built, [])
        self.assertTrue(self.transport.disconnecting)  # twisted.web refused the line

    def test_only_the_first_request_is_looked_at(self) -> None:
        self.wrapper.dataReceived(head(["GET /nothing HTTP/1.1", "Host: x"]))
        self.wrapper.dataReceived(head(["GET /ws HTTP/1.1", "Host: x", "Upgrade: websocket"]))
        self.assertEqual(self.websocket.built, [])
