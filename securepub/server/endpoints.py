"""The TLS listening endpoints: one process's port, or one that several processes share.

Both wrap the site's factory in Twisted's TLS layer the way
``reactor.listenSSL`` does, as ``securepub.server.tls_bios``'s protocol
(memory BIOs that give their buffers back) on ``securepub.server.transport``
(one write flush per reactor turn for all connections, bytes sent when
they are written).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from zope.interface import implementer

from securepub.server.tls_bios import lean_tls_factory
from securepub.server.transport import TurnClock, use_immediate_writes

__all__ = ["BACKLOG", "ReusePortTLSEndpoint", "TLSEndpoint"]

#: Pending connections the kernel may hold for each process.
BACKLOG = 1024


@implementer(IStreamServerEndpoint)
class TLSEndpoint:
    """Like ``SSL4ServerEndpoint`` with ``backlog=BACKLOG``, on the lean transport."""

    def __init__(self, reactor: Any, port: int, tls: Any, interface: str) -> None:
        self._reactor = reactor
        self._port = port
        self._tls = tls
        self._interface = interface

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        wrapped = lean_tls_factory(self._tls, factory, TurnClock(self._reactor))
        try:
            port = self._open(wrapped)
        except CannotListenError as e:
            return fail(e)
        port._type = "TLS"  # as listenSSL names it in its log lines
        return succeed(use_immediate_writes(port))

    def _open(self, wrapped: IProtocolFactory) -> Any:
        return self._reactor.listenTCP(
            self._port, wrapped, backlog=BACKLOG, interface=self._interface
        )


class ReusePortTLSEndpoint(TLSEndpoint):
    """Like ``TLSEndpoint``, but the socket has SO_REUSEPORT set.

    Each twistd process binds its own socket to the same address; the
    kernel spreads new connections over them, so a host's cores can all
    serve, with Redis carrying messages between the processes.
    """

    def _open(self, wrapped: IProtocolFactory) -> Any:
        family = (
            socket.AF_INET6
            if isinstance(ipaddress.ip_address(self._interface), ipaddress.IPv6Address)
            else socket.AF_INET
        )
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self._interface, self._port))
            sock.listen(BACKLOG)
            sock.setblocking(False)
            return self._reactor.adoptStreamPort(sock.fileno(), family, wrapped)
        except OSError as e:
            raise CannotListenError(self._interface, self._port, e) from e
        finally:
            sock.close()  # the reactor holds its own duplicate of the descriptor
