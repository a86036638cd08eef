"""What the broker needs from a cluster engine, and what an engine hands back to it.

An engine (embedded or Redis, see ``securepub.engines``) carries publications
between the nodes of a cluster and keeps the history of the topics that have
some. The broker validates and numbers a message once, hands it to the
engine, and the engine brings it back to `IReceiver.deliver` on every node
(this one included), where the broker picks the sessions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zope.interface import Interface

from securepub.core.history import HistoryPage, HistoryPolicy, Position, Publication
from securepub.core.topics import Pattern

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred


class IReceiver(Interface):
    """The node's side of an engine: where arriving publications and controls go."""

    def deliver(publication: Publication) -> object:
        """Hand a publication to this node's sessions."""

    def disconnect_local(user: str) -> int:
        """Close this node's sessions of ``user``; returns how many."""

    def resync() -> None:
        """The engine's link came back: live messages may have been missed meanwhile."""

    def presence_changed(topic: str, user: str, joined: bool) -> None:
        """``user``'s first session anywhere subscribed to ``topic`` (or its last one left)."""


class IFanout(Interface):
    """Carries publications to every node's `IReceiver`."""

    def start(receiver: IReceiver) -> None:
        """Remember where arriving publications go (once, by the broker)."""

    def publish(
        publication: Publication, history: HistoryPolicy | None
    ) -> Deferred[Position | None]:
        """Send a publication; with ``history``, also append it to the topic's history.

        Fires with the position the message took (None without history), or
        errbacks with ``RequestError("unavailable", ...)`` when the engine
        cannot take it (nothing was published then). On a topic with
        history, assigning the offset, storing the message and fanning it out
        happen as one step, so no node sees a gap or a duplicate offset.
        """

    def disconnect(user: str, message_id: str, ts: float) -> Deferred[None]:
        """Close ``user``'s sessions on every node; errbacks like `publish`."""

    def watch(pattern: Pattern) -> Deferred[None]:
        """This node wants what ``pattern`` matches; fires once that reaches the node.

        A message published after it fired is delivered here. Each call, even a
        failed one, is matched by one `unwatch`. Errbacks with
        ``RequestError("unavailable", ...)`` when the engine cannot say so now.
        """

    def unwatch(pattern: Pattern) -> None:
        """One want of ``pattern`` fewer on this node."""


class IHistory(Interface):
    """Reads the history of topics that keep one."""

    def position(topic: str, history: HistoryPolicy) -> Deferred[Position]:
        """The topic's current position (offset 0 and a fresh epoch if it has none)."""

    def read(topic: str, history: HistoryPolicy, since: int, limit: int) -> Deferred[HistoryPage]:
        """The position and up to ``limit`` publications after offset ``since``, in order.

        Messages older than the policy's age limit are left out. Errbacks
        with ``RequestError("unavailable", ...)`` when the engine cannot answer.
        """


class IPresence(Interface):
    """Who is subscribed to which exact topic, across every node (SPEC section 10).

    The broker reports each session's exact subscription to a topic with
    presence (`add`) and its end (`remove`); with ``join_leave`` the engine
    tells every node's `IReceiver.presence_changed` when a user's first
    session anywhere arrives or its last one leaves.
    """

    def start(receiver: IReceiver) -> None:
        """Remember where join and leave go (once, by the broker)."""

    def add(topic: str, user: str, join_leave: bool) -> Deferred[None]:
        """One more session of ``user`` on ``topic`` (on this node)."""

    def remove(topic: str, user: str, join_leave: bool) -> Deferred[None]:
        """One session of ``user`` fewer on ``topic`` (on this node)."""

    def query(topic: str) -> Deferred[dict[str, int]]:
        """``user -> open sessions`` subscribed to ``topic``, on every live node."""
