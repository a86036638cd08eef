"""The public import path of the Twisted clients (`securepub.clients.twisted_client`)."""

from securepub.clients.twisted_client import (
    NotConnected,
    Position,
    RecoverCallback,
    RequestFailed,
    Subscriber,
    SubscribeRefused,
    TwistedPublisher,
)

__all__ = [
    "NotConnected",
    "Position",
    "RecoverCallback",
    "RequestFailed",
    "SubscribeRefused",
    "Subscriber",
    "TwistedPublisher",
]
