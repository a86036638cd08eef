"""Subscriptions, authorization, publishing and delivery; knows sessions, not sockets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from securepub.broker.feeds import Catchup, Feed, Verdict
from securepub.broker.frames import message_frame, unsubscribed_frame
from securepub.broker.sessions import Grants, ISubscriber, RecordingSubscriber, Session
from securepub.core import jsonstrict
from securepub.core.engine import IFanout, IHistory, IPresence, IReceiver
from securepub.core.errors import RequestError
from securepub.core.history import (
    HistoryPage,
    HistoryPolicy,
    Position,
    Publication,
    Subscribed,
    merge,
)
from securepub.core.ids import MessageIds
from securepub.core.lifetimes import Lifetimes
from securepub.core.limits import Limits
from securepub.core.ratelimit import TokenBucket
from securepub.core.topics import Pattern, SubscriptionIndex, covered_by_any, validate_topic
from securepub.core.validation import PayloadValidator, TopicRule
from securepub.ops.metrics import Metrics

__all__ = ["Broker", "Grants", "ISubscriber", "Published", "RecordingSubscriber", "Session"]

#: Why a subscription ended without the client asking (SPEC sections 8 and 9).
LOST_HISTORY = "insufficient_state"
FORBIDDEN = "forbidden"


@dataclass(frozen=True, slots=True)
class Published:
    """What a publish answers: the message id, and its position on a history topic."""

    id: str
    position: Position | None = None


def _identity(frame: bytes) -> Any:
    return frame


@implementer(IReceiver)
class Broker:
    """Authorizes and routes messages between sessions on this node.

    Inputs reaching the broker are already parsed strict JSON; topics and
    payloads are checked here, once per subscription or publish, never per
    subscriber. ``prepare`` turns a frame's bytes into what subscribers send
    (Autobahn's ``prepareMessage``), so a message is framed once for all.

    On topics with history, every exact subscription goes through the
    topic's `Feed`: it is answered with the topic's position, resumes from a
    client's ``since`` when the history still holds everything after it, and
    gets each offset once and in order however publishes race it.
    """

    _log = Logger()

    def __init__(
        self,
        validator: PayloadValidator,
        limits: Limits,
        clock: IReactorTime,
        *,
        fanout: IFanout,
        history: IHistory | None = None,
        presence: IPresence | None = None,
        prepare: Callable[[bytes], Any] = _identity,
        ids: MessageIds | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._validator = validator
        self._limits = limits
        self._clock = clock
        self._prepare = prepare
        self._ids = ids if ids is not None else MessageIds()
        self._fanout = fanout
        self._history = history
        self._presence = presence
        self.metrics = metrics if metrics is not None else Metrics()
        #: Publishes handed to the engine and not yet answered.
        self._in_flight = 0
        self._idle_waiters: list[Deferred[None]] = []
        self._session_numbers = count(1)
        self._index: SubscriptionIndex[Session] = SubscriptionIndex()
        #: history topic -> its feed, while it has exact subscribers here
        self._feeds: dict[str, Feed] = {}
        self.sessions: dict[str, Session] = {}
        self._lifetimes: Lifetimes[Session] = Lifetimes(clock, self._expiring, self._expired)
        self._fanout.start(self)
        if presence is not None:
            presence.start(self)

    # -- sessions ---------------------------------------------------------

    def open_session(
        self,
        user: str,
        grants: Grants,
        peer: str,
        subscriber: ISubscriber,
        expires_at: float | None = None,
    ) -> Session:
        """Register a connection that has redeemed a ticket, to live until ``expires_at``."""
        rate = self._limits.max_publish_rate
        session = Session(
            id=f"{self._ids.node}-{next(self._session_numbers)}",
            user=user,
            grants=grants,
            peer=peer,
            subscriber=subscriber,
            bucket=TokenBucket(self._clock, rate=rate, burst=2 * rate),
        )
        self.sessions[session.id] = session
        if expires_at is not None:
            self._lifetimes.set(session, expires_at)
        return session

    def close_session(self, session: Session) -> None:
        """Forget a connection and every subscription it held."""
        if self.sessions.pop(session.id, None) is None:
            return
        self._lifetimes.discard(session)
        for pattern in list(session.subscriptions.values()):
            self._drop_subscription(session, pattern)

    # -- lifetimes (SPEC section 9) -----------------------------------------

    def expires_at(self, session: Session) -> float | None:
        """When the session ends unless it is refreshed (None: never)."""
        return self._lifetimes.expires_at(session)

    def _expiring(self, session: Session, expires_at: float) -> None:
        frame = jsonstrict.dumps({"op": "expiring", "expires_at": expires_at}).encode()
        self._send_one(session, self._prepare(frame))

    def _expired(self, session: Session) -> None:
        self._log.info(
            "session expired session={session} user={user} peer={peer}",
            securepub_event="session_expired",
            session=session.id,
            user=session.user,
            peer=session.peer,
        )
        self.close_session(session)
        session.subscriber.expire()

    def refresh(self, session: Session, grants: Grants, expires_at: float) -> list[str]:
        """The session redeemed a fresh ticket: new grants, a later expiry.

        Every subscription the new grants do not cover ends with an
        ``unsubscribed`` frame (reason ``forbidden``); returns their topics.
        """
        session.grants = grants
        self._lifetimes.set(session, expires_at)
        ended = []
        for pattern in list(session.subscriptions.values()):
            if not covered_by_any(grants.subscribe, pattern):
                self._drop_subscription(session, pattern)
                self._send_one(session, self._prepare(unsubscribed_frame(pattern.text, FORBIDDEN)))
                ended.append(pattern.text)
        return ended

    # -- subscriptions ----------------------------------------------------

    def history_policy(self, topic: str) -> HistoryPolicy | None:
        """The history an exact topic keeps (its first matching rule's), or None."""
        rule = self._validator.rule_for(topic)
        return rule.history if rule is not None else None

    def subscribe(
        self,
        session: Session,
        topic: object,
        since: Position | None = None,
        confirm: Callable[[Subscribed], None] | None = None,
    ) -> Deferred[Subscribed]:
        """Subscribe to a topic or pattern covered by one of the session's grants.

        Refusals raise `RequestError` at once. ``confirm`` is called when the
        subscription is in place: once the engine brings this node what it
        matches (a publish after that is never missed), and before any
        message of it is sent (the ``ok`` goes out there); on a history topic
        the missed messages then follow, then live ones. The Deferred fires
        with the same `Subscribed`, or fails with ``unavailable`` when the
        engine could not do its part (the subscription is then dropped again).
        """
        pattern = Pattern.parse(topic)
        policy = self.history_policy(pattern.text) if pattern.is_literal else None
        if since is not None and policy is None:
            what = "a pattern" if not pattern.is_literal else "a topic without history"
            raise RequestError("bad_request", f"'since' cannot be used on {what}")
        if pattern.text in session.subscriptions:
            # Already subscribed: it has been receiving, so nothing is replayed;
            # a since is honoured only when it is where the topic stands.
            feed = self._feeds.get(pattern.text) if policy is not None else None
            position = feed.cursor if feed is not None else None
            recovered = None if since is None else since == position
            return self._confirmed(Subscribed(position, recovered), confirm)
        if not covered_by_any(session.grants.subscribe, pattern):
            self._refuse(session, "subscribe", pattern.text, "no subscribe grant covers it")
        if len(session.subscriptions) >= self._limits.max_subscriptions:
            raise RequestError(
                "limit_exceeded",
                f"at most {self._limits.max_subscriptions} subscriptions per connection",
            )
        # Held from here (it counts toward the limit); delivered to once watched.
        session.subscriptions[pattern.text] = pattern
        done: Deferred[Subscribed] = Deferred()
        self._fanout.watch(pattern).addCallbacks(
            self._watching,
            self._not_started,
            callbackArgs=(session, pattern, policy, since, confirm, done),
            errbackArgs=(session, pattern, done),
        )
        return done

    def _watching(
        self,
        _: object,
        session: Session,
        pattern: Pattern,
        policy: HistoryPolicy | None,
        since: Position | None,
        confirm: Callable[[Subscribed], None] | None,
        done: Deferred[Subscribed],
    ) -> None:
        """The engine now brings this node the pattern's messages: start delivering."""
        if session.subscriptions.get(pattern.text) is not pattern:
            # Unsubscribed (or closed) meanwhile: answer, deliver nothing.
            subscribed = Subscribed(recovered=False if since is not None else None)
            if session.id in self.sessions and confirm is not None:
                confirm(subscribed)
            done.callback(subscribed)
            return
        self._index.add(pattern, session)
        if policy is None:
            subscribed = Subscribed()
            if confirm is not None:
                confirm(subscribed)
            if pattern.is_literal:
                self._arrive(session, pattern.text)
            done.callback(subscribed)
            return
        self._start_feed(session, pattern, policy, since, confirm, done)

    @staticmethod
    def _confirmed(
        subscribed: Subscribed, confirm: Callable[[Subscribed], None] | None
    ) -> Deferred[Subscribed]:
        if confirm is not None:
            confirm(subscribed)
        return succeed(subscribed)

    def _start_feed(
        self,
        session: Session,
        pattern: Pattern,
        policy: HistoryPolicy,
        since: Position | None,
        confirm: Callable[[Subscribed], None] | None,
        done: Deferred[Subscribed],
    ) -> None:
        topic = pattern.text
        feed = self._feeds.get(topic)
        if feed is None:
            feed = self._feeds[topic] = Feed(topic, policy)
        feed.subscribers += 1
        catchup = Catchup()
        feed.starting[session] = catchup
        history = self._history
        assert history is not None, "a topic keeps history but the broker has no history engine"
        if since is None:
            read: Deferred[HistoryPage] = history.position(topic, policy).addCallback(HistoryPage)
        else:
            read = history.read(topic, policy, since.offset, policy.size)
        read.addCallbacks(
            self._caught_up,
            self._not_started,
            callbackArgs=(session, feed, catchup, since, confirm, done),
            errbackArgs=(session, pattern, done),
        )

    def _caught_up(
        self,
        page: HistoryPage,
        session: Session,
        feed: Feed,
        catchup: Catchup,
        since: Position | None,
        confirm: Callable[[Subscribed], None] | None,
        done: Deferred[Subscribed],
    ) -> None:
        buffered = catchup.buffered or []
        subscribed, sending = merge(since, page, (p for p, _ in buffered))
        if since is not None:
            outcome = "recovered" if subscribed.recovered else "not_recovered"
            self.metrics.recoveries[outcome] += 1
        current = feed.starting.get(session) is catchup and self._feeds.get(feed.topic) is feed
        if not current:
            # Unsubscribed (or ended by the server) while the read was in flight:
            # answer, send nothing, and claim no recovery.
            if since is not None:
                subscribed = Subscribed(subscribed.position, recovered=False)
            if session.id in self.sessions and confirm is not None:
                confirm(subscribed)
            done.callback(subscribed)
            return
        feed.read(page.position)
        catchup.buffered = None
        catchup.last = page.position
        prepared_of = {id(p): prepared for p, prepared in buffered}
        if confirm is not None:
            confirm(subscribed)
        self._arrive(session, feed.topic)
        for publication in sending:
            prepared = prepared_of.get(id(publication))
            if prepared is None:
                prepared = self._prepare(message_frame(publication))
            catchup.last = Position(
                publication.offset or 0, publication.epoch or page.position.epoch
            )
            self._send_one(session, prepared)
        if feed.caught_up(catchup):
            del feed.starting[session]
        done.callback(subscribed)

    def _not_started(
        self, failure: Failure, session: Session, pattern: Pattern, done: Deferred[Subscribed]
    ) -> None:
        if session.subscriptions.get(pattern.text) is pattern:
            self._drop_subscription(session, pattern)
        if not failure.check(RequestError):
            self._log.failure("subscription failed topic={topic}", failure, topic=pattern.text)
            failure = Failure(RequestError("unavailable", "the cluster engine is unavailable"))
        done.errback(failure)

    def unsubscribe(self, session: Session, topic: object) -> None:
        """Drop a subscription; dropping one not held is not an error."""
        pattern = Pattern.parse(topic)
        held = session.subscriptions.get(pattern.text)
        if held is not None:
            self._drop_subscription(session, held)

    def _drop_subscription(self, session: Session, pattern: Pattern) -> None:
        session.subscriptions.pop(pattern.text, None)
        self._index.remove(pattern, session)
        self._fanout.unwatch(pattern)
        present = session.present
        if present is not None and pattern.text in present:
            present.discard(pattern.text)
            self._depart(session, pattern.text)
        feed = self._feeds.get(pattern.text) if pattern.is_literal else None
        if feed is not None:
            feed.starting.pop(session, None)
            feed.subscribers -= 1
            if feed.subscribers <= 0:
                del self._feeds[pattern.text]

    # -- presence (SPEC section 10) ------------------------------------------

    def _presence_rule(self, topic: str) -> TopicRule | None:
        rule = self._validator.rule_for(topic)
        return rule if rule is not None and rule.presence else None

    def _arrive(self, session: Session, topic: str) -> None:
        """Count the session present on an exact topic whose rule tracks presence."""
        rule = self._presence_rule(topic)
        if rule is None or self._presence is None:
            return
        if session.present is None:
            session.present = set()
        session.present.add(topic)
        d = self._presence.add(topic, session.user, rule.join_leave)
        d.addErrback(self._presence_failed, topic)

    def _depart(self, session: Session, topic: str) -> None:
        rule = self._presence_rule(topic)
        if self._presence is None:
            return
        d = self._presence.remove(topic, session.user, rule is not None and rule.join_leave)
        d.addErrback(self._presence_failed, topic)

    def _presence_failed(self, failure: Failure, topic: str) -> None:
        if failure.check(RequestError):
            self._log.warn(
                "presence of {topic} not recorded: the cluster engine is unavailable",
                topic=topic,
                securepub_event="presence_unavailable",
            )
        else:
            self._log.failure("presence update failed topic={topic}", failure, topic=topic)

    def presence(self, session: Session, topic: object) -> Deferred[dict[str, int]]:
        """Who is on ``topic``, for a session that may subscribe to it."""
        name = validate_topic(topic)
        if not covered_by_any(session.grants.subscribe, Pattern.parse(name)):
            self._refuse(session, "see presence of", name, "no subscribe grant covers it")
        return self.read_presence(name)

    def read_presence(self, topic: object) -> Deferred[dict[str, int]]:
        """``user -> sessions`` on an exact topic with presence (``GET /v1/presence``)."""
        name = validate_topic(topic)
        if self._presence_rule(name) is None or self._presence is None:
            raise RequestError("bad_request", f"topic {name} keeps no presence")
        return self._presence.query(name).addErrback(self._unavailable)

    def presence_changed(self, topic: str, user: str, joined: bool) -> None:
        """IReceiver: a user's first session arrived on a topic, or its last one left."""
        targets = self._index.match(topic)
        if not targets:
            return
        op = "join" if joined else "leave"
        frame = jsonstrict.dumps({"op": op, "topic": topic, "user": user}).encode()
        prepared = self._prepare(frame)
        for session in targets:
            self._send_one(session, prepared)

    # -- publishing -------------------------------------------------------

    def client_publish(self, session: Session, topic: object, data: Any) -> Deferred[Published]:
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

    def publish(self, topic: object, data: Any) -> Deferred[Published]:
        """Publish for an authenticated backend: any valid topic, same payload checks."""
        return self._publish(validate_topic(topic), data)

    def _publish(self, topic: str, data: Any) -> Deferred[Published]:
        """Validate once, number, and hand to the fan-out engine.

        Checks raise `RequestError` synchronously; the Deferred fires once the
        engine has taken the message (with its position on a history topic),
        or fails with ``unavailable`` when it could not (nothing was published).
        """
        body = self._validator.validate(topic, data)
        self.metrics.messages_in += 1
        message_id = self._ids.next()
        self._in_flight += 1
        publication = Publication(topic, message_id, self._clock.seconds(), body)
        d = self._fanout.publish(publication, self.history_policy(topic))
        d.addBoth(self._landed)
        return d.addCallback(lambda position: Published(message_id, position))

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

    # -- history for backends ---------------------------------------------

    def read_history(self, topic: object, since: int, limit: int) -> Deferred[HistoryPage]:
        """A page of a topic's history (``GET /v1/history``); ``bad_request`` without one."""
        name = validate_topic(topic)
        policy = self.history_policy(name)
        if policy is None or self._history is None:
            raise RequestError("bad_request", f"topic {name} keeps no history")
        d = self._history.read(name, policy, since, limit)
        return d.addErrback(self._unavailable)

    def _unavailable(self, failure: Failure) -> Failure:
        if failure.check(RequestError):
            return failure
        self._log.failure("history read failed", failure)
        return Failure(RequestError("unavailable", "the cluster engine is unavailable"))

    # -- delivery (IReceiver) ---------------------------------------------

    def deliver(self, publication: Publication) -> int:
        """Hand a validated publication to every local subscriber, framed once.

        ``topic`` and ``id`` come from our own grammar (no characters that
        need escaping), ``body`` is compact JSON from the validator. On a
        history topic with exact subscribers the feed orders it first.
        Returns the number of sessions it was handed to.
        """
        if publication.offset is not None:
            feed = self._feeds.get(publication.topic)
            if feed is not None:
                return self._through(feed, publication)
        return self._send(publication, None)

    def _through(self, feed: Feed, publication: Publication) -> int:
        verdict = feed.accept(publication)
        if verdict is Verdict.SEND:
            sent = self._send(publication, feed)
            if feed.starting:
                feed.promote()
            return sent
        if verdict is Verdict.GAP:
            self._fill(feed)
        return 0

    def _send(self, publication: Publication, feed: Feed | None) -> int:
        targets = self._index.match(publication.topic)
        if not targets:
            return 0
        prepared = self._prepare(message_frame(publication))
        self.metrics.messages_out += len(targets)
        self.metrics.publish_to_write.observe(max(0.0, self._clock.seconds() - publication.ts))
        starting = feed.starting if feed is not None else None
        if starting:
            for session in targets:
                catchup = starting.get(session)
                if catchup is None or catchup.offer(publication, prepared):
                    self._send_one(session, prepared)
        else:
            for session in targets:
                self._send_one(session, prepared)
        return len(targets)

    def _send_one(self, session: Session, prepared: Any) -> None:
        try:
            session.subscriber.send_prepared(prepared)
        except Exception:  # noqa: BLE001 - logged; isolation is the point
            # One broken subscriber must not cost the others their copy.
            self._log.failure("delivery failed session={session}", session=session.id)

    def resync(self) -> None:
        """The engine's link came back: fill what each feed may have missed meanwhile."""
        for feed in list(self._feeds.values()):
            if feed.queue is not None:
                feed.refill = True
            elif feed.cursor is not None:
                feed.queue = []
                self._fill(feed)

    def _fill(self, feed: Feed) -> None:
        """Read what the feed missed after its cursor; meanwhile live messages wait."""
        assert feed.cursor is not None and self._history is not None
        d = self._history.read(feed.topic, feed.policy, feed.cursor.offset, feed.policy.size)
        d.addCallbacks(self._filled, self._fill_failed, callbackArgs=(feed,), errbackArgs=(feed,))

    def _filled(self, page: HistoryPage, feed: Feed) -> None:
        if self._feeds.get(feed.topic) is not feed:
            return
        queue, feed.queue = feed.queue or [], None
        if not self._apply_fill(feed, page, queue):
            self._lose(feed, "the history no longer holds what this node missed")
            for publication in queue:
                self._send(publication, None)
            return
        for publication in queue:
            self._through(feed, publication)
        if feed.refill and feed.queue is None:
            feed.refill = False
            feed.queue = []
            self._fill(feed)
        if feed.starting:
            feed.promote()

    def _apply_fill(self, feed: Feed, page: HistoryPage, queue: list[Publication]) -> bool:
        """Hand on what ``page`` holds after the cursor; whether the order is whole again."""
        cursor = feed.cursor
        assert cursor is not None
        if page.position.epoch != cursor.epoch:
            return False
        for publication in page.publications:
            if publication.offset == cursor.offset + 1:
                feed.advance(publication)
                self._send(publication, feed)
                cursor = Position(cursor.offset + 1, cursor.epoch)
        if page.position.offset > cursor.offset:
            return False
        if queue:
            first = queue[0]
            if first.epoch == cursor.epoch and (first.offset or 0) > cursor.offset + 1:
                return False
        return True

    def _fill_failed(self, failure: Failure, feed: Feed) -> None:
        if self._feeds.get(feed.topic) is not feed:
            return
        queue, feed.queue = feed.queue or [], None
        self._lose(feed, f"history could not be read ({type(failure.value).__name__})")
        for publication in queue:
            self._send(publication, None)

    def _lose(self, feed: Feed, why: str) -> None:
        """End every exact subscription to a topic whose order this node lost.

        Each gets ``unsubscribed`` with reason ``insufficient_state``; clients
        subscribe again ``since`` their last offset and learn whether the
        history could still recover them.
        """
        topic = feed.topic
        sessions = self._index.exact(topic)
        self._log.warn(
            "lost track of topic {topic} ({why}); ending {count} subscription(s)",
            topic=topic,
            why=why,
            count=len(sessions),
            securepub_event="history_gap",
        )
        frame = self._prepare(unsubscribed_frame(topic, LOST_HISTORY))
        for session in sessions:
            pattern = session.subscriptions.get(topic)
            if pattern is not None:
                self._drop_subscription(session, pattern)
            self._send_one(session, frame)
        self._feeds.pop(topic, None)

    # -- revocation -------------------------------------------------------

    def disconnect_user(self, user: str) -> Deferred[None]:
        """Close every session of ``user`` on every node (revocation)."""
        message_id = self._ids.next()
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
