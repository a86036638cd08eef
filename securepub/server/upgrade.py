"""The WebSocket upgrade's short way: a connection that opens with ``GET /ws`` goes to Autobahn.

Through twisted.web, an upgrade is parsed twice: the site parses the request
and routes it, then Autobahn's resource writes it back out as bytes and its
protocol parses them again (20% of a new connection's server CPU, with the
routing, in ``bench/connections.py``'s profile). A connection's first request
that is plainly a WebSocket upgrade of ``/ws`` is handed to Autobahn's
protocol as the bytes that arrived, before twisted.web sees it. Anything else,
or anything in doubt, takes the ordinary way through the site (where
``WebSocketOnly`` still accepts an upgrade), so both ways answer alike.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.protocol import Factory
from twisted.protocols.policies import ProtocolWrapper

#: ``GET /ws`` or ``GET /ws?query`` over HTTP/1.1, exactly.
_REQUEST_LINE = re.compile(rb"GET /ws(?:\?[^ ]*)? HTTP/1\.1")
#: An ``Upgrade`` header naming websocket (matched on the lower-cased head).
_UPGRADE = re.compile(rb"\r\nupgrade:[ \t]*websocket[ \t]*\r\n")


def is_websocket_upgrade(head: bytes) -> bool:
    """Whether a request's head (up to its blank line) is a plain ``/ws`` upgrade."""
    line, _, headers = head.partition(b"\r\n")
    if not _REQUEST_LINE.fullmatch(line):
        return False
    return _UPGRADE.search(b"\r\n" + headers.lower() + b"\r\n") is not None


def tls_wrapper(transport: Any) -> ProtocolWrapper | None:
    """The TLS wrapper whose wrapped protocol ``transport``'s protocol is, if any.

    The same two shapes Autobahn's resource knows: the transport is the
    wrapper, or (Twisted's buffering TLS transport) its ``protocol`` is.
    """
    if isinstance(transport, ProtocolWrapper):
        return transport
    inner = getattr(transport, "protocol", None)
    return inner if isinstance(inner, ProtocolWrapper) else None


def hand_over(channel: Any, wrapper: ProtocolWrapper, factory: Factory, data: bytes) -> None:
    """Give ``channel``'s connection to a new protocol of ``factory``, and ``data`` to it.

    The HTTP channel lets go of the transport first: it stops being its
    producer and its idle timeout is cancelled, as twisted.web does for a
    request being served.
    """
    transport = channel.transport
    protocol = factory.buildProtocol(transport.getPeer())
    assert protocol is not None  # a WebSocket factory always builds one
    channel.setTimeout(None)
    transport.unregisterProducer()
    channel.transport = None
    wrapper.wrappedProtocol = protocol
    protocol.makeConnection(transport)
    protocol.dataReceived(data)
