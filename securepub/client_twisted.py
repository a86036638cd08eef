"""The public import path of the Twisted clients (`securepub.clients.twisted_client`)."""

from securepub.clients.twisted_client import Subscriber, SubscribeRefused, TwistedPublisher

__all__ = ["SubscribeRefused", "Subscriber", "TwistedPublisher"]
