"""The Redis servers of a cluster: each one's links, and which holds what."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from securepub.core.topics import Pattern
from securepub.engines.redis.channels import channel_for_pattern
from securepub.engines.redis.link import RedisLink, RedisTarget
from securepub.engines.redis.ring import Ring
from securepub.engines.redis.subscriber import RedisSubscriber
from securepub.ops.metrics import Metrics


@dataclass(eq=False)
class Shard:
    """One Redis server: a link for commands and one for the channels this node wants."""

    index: int
    target: RedisTarget
    commands: RedisLink
    subscriber: RedisSubscriber

    @property
    def name(self) -> str:
        return self.target.display()

    def is_up(self) -> bool:
        return self.commands.is_connected() and self.subscriber.is_connected()


class Shards:
    """Every Redis server, placed on a consistent-hash ring.

    Topics (their history, presence and exact channel), tickets (by the
    hash of the token) and users' ticket lists are each held by one server;
    channels of wildcard patterns exist on every server, since the topics
    a pattern matches are spread over all of them.
    """

    def __init__(
        self,
        reactor: Any,
        targets: Sequence[RedisTarget],
        metrics: Metrics,
        on_message: Callable[[Shard, str, str], None],
        on_connected: Callable[[Shard, str], None],
    ) -> None:
        self.all: list[Shard] = []
        self._on_message = on_message
        self._on_connected = on_connected
        for index, target in enumerate(targets):
            commands = RedisLink(
                reactor,
                target,
                f"commands {target.display()}",
                metrics=metrics,
                on_connected=self._connected(index, "commands"),
            )
            subscriber = RedisSubscriber(
                reactor,
                target,
                f"messages {target.display()}",
                on_message=self._received(index),
                on_connected=self._connected(index, "messages"),
                metrics=metrics,
            )
            self.all.append(Shard(index, target, commands, subscriber))
        self._ring = Ring([(shard.name, shard) for shard in self.all])

    def _connected(self, index: int, link: str) -> Callable[[], None]:
        def connected() -> None:
            self._on_connected(self.all[index], link)

        return connected

    def _received(self, index: int) -> Callable[[str, str], None]:
        def received(channel: str, message: str) -> None:
            self._on_message(self.all[index], channel, message)

        return received

    def for_topic(self, topic: str) -> Shard:
        return self._ring.for_topic(topic)

    def for_key(self, key: bytes) -> Shard:
        return self._ring.for_key(key)

    def for_pattern(self, pattern: Pattern) -> list[tuple[Shard, str]]:
        """The (server, channel) pairs a subscription to ``pattern`` needs."""
        channel = channel_for_pattern(pattern)
        if pattern.is_literal:
            return [(self.for_topic(pattern.text), channel)]
        return [(shard, channel) for shard in self.all]

    def services(self) -> list[Any]:
        out: list[Any] = []
        for shard in self.all:
            out += [shard.commands, shard.subscriber]
        return out
