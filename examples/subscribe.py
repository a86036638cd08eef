"""Subscribe with a ticket and print each message: the README's quick tour.

Usage: SECUREPUB_CA=certs/ca.pem python examples/subscribe.py TICKET [PATTERN] [URL]
"""

import json
import os
import sys

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet import reactor, ssl

ticket = sys.argv[1]
pattern = sys.argv[2] if len(sys.argv) > 2 else "news.*"
url = sys.argv[3] if len(sys.argv) > 3 else "wss://localhost:8443/ws"


class Subscriber(WebSocketClientProtocol):
    def onOpen(self):
        self.sendMessage(json.dumps({"op": "subscribe", "id": 1, "topic": pattern}).encode())

    def onMessage(self, payload, isBinary):
        print(payload.decode(), flush=True)

    def onClose(self, wasClean, code, reason):
        print(json.dumps({"closed": code, "reason": reason}), flush=True)
        if reactor.running:
            reactor.stop()


factory = WebSocketClientFactory(url, protocols=["securepub.v1", "ticket." + ticket])
factory.protocol = Subscriber
with open(os.environ["SECUREPUB_CA"]) as f:
    trust = ssl.Certificate.loadPEM(f.read())
connectWS(factory, ssl.optionsForClientTLS(factory.host, trustRoot=trust))
reactor.run()
