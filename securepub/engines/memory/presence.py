"""The embedded engine's presence: session counts per user and topic, in this process."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from securepub.core.engine import IPresence, IReceiver


@implementer(IPresence)
class MemoryPresence:
    """``topic -> user -> sessions``; a user appears with the first session and goes with the last.

    Topics and users with no session left are forgotten at once, so memory
    follows the subscriptions that are open.
    """

    def __init__(self) -> None:
        self._topics: dict[str, dict[str, int]] = {}
        self._receiver: IReceiver | None = None

    def start(self, receiver: IReceiver) -> None:
        self._receiver = receiver

    def add(self, topic: str, user: str, join_leave: bool) -> Deferred[None]:
        users = self._topics.setdefault(topic, {})
        users[user] = users.get(user, 0) + 1
        if users[user] == 1 and join_leave and self._receiver is not None:
            self._receiver.presence_changed(topic, user, True)
        return succeed(None)

    def remove(self, topic: str, user: str, join_leave: bool) -> Deferred[None]:
        users = self._topics.get(topic)
        if users is None or user not in users:
            return succeed(None)
        users[user] -= 1
        if users[user] <= 0:
            del users[user]
            if not users:
                del self._topics[topic]
            if join_leave and self._receiver is not None:
                self._receiver.presence_changed(topic, user, False)
        return succeed(None)

    def query(self, topic: str) -> Deferred[dict[str, int]]:
        return succeed(dict(self._topics.get(topic, {})))

    @property
    def topics(self) -> int:
        """Topics with at least one session present (for metrics)."""
        return len(self._topics)
