"""The public import path of the Twisted clients (`securepub.clients.twisted_client`)."""

from securepub.clients.twisted_client import (
    Position,
    RecoverCallback,
    Subscriber,
    SubscribeRefused,
    TwistedPublisher,
)

__all__ = ["Position", "RecoverCallback", "SubscribeRefused", "Subscriber", "TwistedPublisher"]
