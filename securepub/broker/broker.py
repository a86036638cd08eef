"""Subscriptions, authorization, publishing and fan-out; knows sessions, not sockets."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Interface, implementer

from securepub.core import jsonstrict
from securepub.core.engine import IFanout
from securepub.core.errors import RequestError
from securepub.core.limits import Limits
from securepub.core.ratelimit import TokenBucket
from securepub.core.topics import Pattern, SubscriptionIndex, covered_by_any, validate_topic
from securepub.core.validation import PayloadValidator
from securepub.ops.metrics import Metrics


class ISubscriber(Interface):
    """Where the broker hands a session's deliveries (a WebSocket, or a test fake)."""

    def send_prepared(prepared: Any) -> None:
        """Send one frame made by the broker's ``prepare`` callable."""

    def revoke() -> None:
        """The session was revoked: close the connection (it left the broker already)."""


@implementer(ISubscriber)
class RecordingSubscriber:
    """An `ISubscriber` that keeps what it is sent; for tests and tools."""

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.revoked = False

    def send_prepared(self, prepared: Any) -> None:
        self.sent.append(prepared)

    def revoke(self) -> None:
        self.revoked = True


@dataclass(frozen=True, slots=True)
class Grants:
    """What a ticket allows: patterns to subscribe to and to publish on."""

    subscribe: tuple[Pattern, ...] = ()
    publish: tuple[Pattern, ...] = ()


class Session:
    """One authenticated connection as the broker sees it."""

    __slots__ = (
        "__weakref__",
        "bucket",
        "grants",
        "id",
        "peer",
        "subscriber",
        "subscriptions",
        "user",
    )

    def __init__(
        self,
        id: str,
        user: str,
        grants: Grants,
        peer: str,
        subscriber: ISubscriber,
        bucket: TokenBucket,
    ) -> None:
        self.id = id
        self.user = user
        self.grants = grants
        self.peer = peer
        self.subscriber = subscriber
        self.bucket = bucket
        #: pattern text -> Pattern, in subscription order
        self.subscriptions: dict[str, Pattern] = {}

    def __repr__(self) -> str:
        return f"<Session {self.id} user={self.user!r}>"


def _identity(frame: bytes) -> Any:
    return frame


class Broker:
    """Authorizes and routes messages between sessions on this node.

    Inputs reaching the broker are already parsed strict JSON; topics and
    payloads are checked here, once per subscription or publish, never per
    subscriber. ``prepare`` turns a frame's bytes into what subscribers send
    (Autobahn's ``prepareMessage``), so a message is framed once for all.
    """

    _log = Logger()

    def __init__(
        self,
        validator: PayloadValidator,
        limits: Limits,
        clock: IReactorTime,
        *,
        fanout: IFanout,
        prepare: Callable[[bytes], Any] = _identity,
        node_id: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._validator = validator
        self._limits = limits
        self._clock = clock
        self._prepare = prepare
        # Message ids must be unique across nodes: 48 random bits per node.
        self._node = node_id or secrets.token_hex(6)
        self._fanout = fanout
        self.metrics = metrics if metrics is not None else Metrics()
        self._fanout.start(self.deliver, self.disconnect_local)
        #: Publishes handed to the engine and not yet answered.
        self._in_flight = 0
        self._idle_waiters: list[Deferred[None]] = []
        self._message_numbers = count(1)
        self._session_numbers = count(1)
        self._index: SubscriptionIndex[Session] = SubscriptionIndex()
        self.sessions: dict[str, Session] = {}

    # -- sessions ---------------------------------------------------------

    def open_session(
        self, user: str, grants: Grants, peer: str, subscriber: ISubscriber
    ) -> Session:
        """Register a connection that has redeemed a ticket."""
        rate = self._limits.max_publish_rate
        session = Session(
            id=f"{self._node}-{next(self._session_numbers)}",
            user=user,
            grants=grants,
            peer=peer,
            subscriber=subscriber,
            bucket=TokenBucket(self._clock, rate=rate, burst=2 * rate),
        )
        self.sessions[session.id] = session
        return session

    def close_session(self, session: Session) -> None:
        """Forget a connection and every subscription it held."""
        if self.sessions.pop(session.id, None) is None:
            return
        for pattern in session.subscriptions.values():
            self._index.remove(pattern, session)
        session.subscriptions.clear()

    # -- subscriptions ----------------------------------------------------

    def subscribe(self, session: Session, topic: object) -> None:
        """Subscribe to a topic or pattern covered by one of the session's grants."""
        pattern = Pattern.parse(topic)
        if pattern.text in session.subscriptions:
            return
        if not covered_by_any(session.grants.subscribe, pattern):
            self._refuse(session, "subscribe", pattern.text, "no subscribe grant covers it")
        if len(session.subscriptions) >= self._limits.max_subscriptions:
            raise RequestError(
                "limit_exceeded",
                f"at most {self._limits.max_subscriptions} subscriptions per connection",
            )
        session.subscriptions[pattern.text] = pattern
        self._index.add(pattern, session)

    def unsubscribe(self, session: Session, topic: object) -> None:
        """Drop a subscription; dropping one not held is not an error."""
        pattern = Pattern.parse(topic)
        if session.subscriptions.pop(pattern.text, None) is not None:
            self._index.remove(pattern, session)

    # -- publishing -------------------------------------------------------

    def client_publish(self, session: Session, topic: object, data: Any) -> Deferred[str]:
        """Publish for a browser: rate, grant and ``client_publish`` rule apply."""
        if not session.bucket.take():
            raise RequestError(
                "rate_limited",
                f"over {self._limits.max_publish_rate:g} publishes per second",
            )
        name = validate_topic(topic)
        rule = self._validator.rule_for(name)
        if not any(p.matches(name) for p in session.grants.publish):
            self._refuse(session, "publish", name, "no publish grant matches it")
        if rule is None or not rule.client_publish:
            self._refuse(session, "publish", name, "no topic rule allows browsers to publish")
        return self._publish(name, data)

    def publish(self, topic: object, data: Any) -> Deferred[str]:
        """Publish for an authenticated backend: any valid topic, same payload checks."""
        return self._publish(validate_topic(topic), data)

    def _publish(self, topic: str, data: Any) -> Deferred[str]:
        """Validate once, number, and hand to the fan-out engine.

        Checks raise `RequestError` synchronously; the Deferred fires with
        the message id once the engine has taken the message, or fails with
        ``unavailable`` when it could not (nothing was published).
        """
        body = self._validator.validate(topic, data)
        self.metrics.messages_in += 1
        message_id = f"{self._node}-{next(self._message_numbers)}"
        self._in_flight += 1
        d = self._fanout.publish(topic, message_id, self._clock.seconds(), body)
        return d.addBoth(self._landed).addCallback(lambda _: message_id)

    def _landed(self, result: Any) -> Any:
        self._in_flight -= 1
        if not self._in_flight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        return result

    def idle(self) -> Deferred[None]:
        """Fires once no publish is waiting for the fan-out engine (for a clean stop)."""
        if not self._in_flight:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def deliver(self, topic: str, message_id: str, ts: float, body: str) -> int:
        """Frame a validated message once and hand it to every local subscriber.

        ``topic`` and ``message_id`` come from our own grammar (no characters
        that need escaping), ``body`` is compact JSON from the validator.
        Returns the number of sessions it was handed to.
        """
        targets = self._index.match(topic)
        if not targets:
            return 0
        frame = (
            '{"op":"message","topic":'
            + jsonstrict.dumps(topic)
            + ',"id":'
            + jsonstrict.dumps(message_id)
            + ',"ts":'
            + repr(ts)
            + ',"data":'
            + body
            + "}"
        ).encode("utf-8")
        prepared = self._prepare(frame)
        self.metrics.messages_out += len(targets)
        self.metrics.publish_to_write.observe(max(0.0, self._clock.seconds() - ts))
        for session in targets:
            try:
                session.subscriber.send_prepared(prepared)
            except Exception:  # noqa: BLE001 - logged; isolation is the point
                # One broken subscriber must not cost the others their copy.
                self._log.failure("delivery failed session={session}", session=session.id)
        return len(targets)

    def disconnect_user(self, user: str) -> Deferred[None]:
        """Close every session of ``user`` on every node (revocation)."""
        message_id = f"{self._node}-{next(self._message_numbers)}"
        return self._fanout.disconnect(user, message_id, self._clock.seconds())

    def disconnect_local(self, user: str) -> int:
        """Close this node's sessions of ``user``; returns how many."""
        doomed = [s for s in self.sessions.values() if s.user == user]
        for session in doomed:
            self.close_session(session)
            session.subscriber.revoke()
        if doomed:
            self._log.info(
                "revoked {count} session(s) of user={user}",
                securepub_event="sessions_revoked",
                count=len(doomed),
                user=user,
            )
        return len(doomed)

    def _refuse(self, session: Session, action: str, topic: str, why: str) -> None:
        self._log.info(
            "authorization refused: {action} {topic} user={user} session={session} "
            "peer={peer} ({why})",
            securepub_event="authorization_refused",
            action=action,
            topic=topic,
            user=session.user,
            session=session.id,
            peer=session.peer,
            why=why,
        )
        raise RequestError("forbidden", f"not allowed to {action} {topic}")
