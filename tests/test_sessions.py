"""Session lifetimes and in-band refresh over the protocol, on a Clock (SPEC section 9)."""

from __future__ import annotations

from typing import Any

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from securepub.core.limits import Limits
from tests.test_protocol import Connection, Harness


def harness(test: SynchronousTestCase, limits: Limits) -> Harness:
    """A protocol harness whose connections are not pinged (the test client never pongs)."""
    h = Harness(test, limits)
    h.factory.setProtocolOptions(autoPingInterval=0)
    return h


class SessionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = harness(self, Limits(max_errors=50, max_connections_per_ip=5))
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def open(self, **ticket: Any) -> tuple[Connection, dict[str, Any]]:
        conn = self.h.open(**ticket)
        [welcome] = conn.messages()
        return conn, welcome

    def refresh(self, conn: Connection, token: str, message_id: int = 7) -> list[dict[str, Any]]:
        conn.send({"op": "refresh", "id": message_id, "ticket": token})
        return conn.messages()

    def test_welcome_carries_expires_at(self) -> None:
        """expires_at is now + the ticket's session_ttl, or max_session_seconds by default."""
        now = self.h.clock.seconds()
        _, welcome = self.open(session_ttl=300)
        self.assertEqual(welcome["expires_at"], now + 300)
        _, default = self.open()
        self.assertEqual(default["expires_at"], now + Limits().max_session_seconds)

    def test_expiring_notice_then_close_4003_at_the_exact_instants(self) -> None:
        """The notice 60 s before expires_at, the 4003 close at it; nothing earlier."""
        conn, welcome = self.open(session_ttl=300)
        self.h.clock.advance(239.999)
        self.assertEqual(conn.messages(), [])
        self.h.clock.advance(0.001)
        self.assertEqual(conn.messages(), [{"op": "expiring", "expires_at": welcome["expires_at"]}])
        self.h.clock.advance(59.999)
        self.assertIsNone(conn.close_code())
        self.h.clock.advance(0.001)
        self.assertEqual(conn.close_code(), 4003)
        self.assertEqual(self.h.factory.broker.sessions, {})
        expired = [e for e in self.events if e.get("securepub_event") == "session_expired"]
        self.assertEqual(len(expired), 1)

    def test_short_sessions_get_the_notice_a_quarter_before(self) -> None:
        """With a lifetime under 240 s the notice comes a quarter of it before the end."""
        limits = Limits(min_session_seconds=10, max_errors=50)
        h = harness(self, limits)
        conn = h.open(session_ttl=100)
        conn.messages()
        h.clock.advance(74.999)
        self.assertEqual(conn.messages(), [])
        h.clock.advance(0.001)
        self.assertEqual(conn.messages()[0]["op"], "expiring")

    def test_refresh_before_expiry_extends_it(self) -> None:
        """A fresh ticket for the same user: ok with the new expiry, and no 4003 at the old one."""
        conn, welcome = self.open(session_ttl=300)
        self.h.clock.advance(250)
        self.assertEqual(conn.messages()[0]["op"], "expiring")
        answer = self.refresh(conn, self.h.ticket(session_ttl=600))
        self.assertEqual(
            answer, [{"op": "ok", "id": 7, "expires_at": self.h.clock.seconds() + 600}]
        )
        self.h.clock.advance(100)
        self.assertIsNone(conn.close_code())
        self.h.clock.advance(500)
        self.assertEqual(conn.close_code(), 4003)
        accepted = [
            e
            for e in self.events
            if e.get("securepub_event") == "session_refresh" and e.get("outcome") == "accepted"
        ]
        self.assertEqual(len(accepted), 1)
        del welcome

    def test_refused_refreshes_keep_the_old_expiry(self) -> None:
        """Reused, expired, other-user and wrong-IP tickets are forbidden; expiry unchanged."""
        conn, welcome = self.open(session_ttl=300)
        used = self.h.ticket()
        self.assertEqual(self.refresh(conn, used, 1)[0]["op"], "ok")
        cases = {
            2: self.h.ticket(ttl=5),
            3: used,
            4: self.h.ticket(user="bob", ttl=60),
            5: self.h.ticket(client_ip="198.51.100.9", ttl=60),
            6: "not-a-ticket",
        }
        self.h.clock.advance(10)  # case 2's ticket expires (and is purged once looked at)
        for message_id, token in cases.items():
            [error] = self.refresh(conn, token, message_id)
            self.assertEqual(
                (error["op"], error["code"], error["id"]), ("error", "forbidden", message_id)
            )
        expires_at = self.h.factory.broker.expires_at(self.h.factory.broker.sessions.popitem()[1])
        self.assertIsNotNone(expires_at)
        reasons = [
            e["reason"]
            for e in self.events
            if e.get("securepub_event") == "session_refresh" and e.get("outcome") == "refused"
        ]
        self.assertEqual(
            reasons,
            [
                "ticket_expired",
                "ticket_already_redeemed",
                "other_user",
                "ticket_wrong_ip",
                "ticket_unknown",
            ],
        )
        for event in self.events:
            for token in cases.values():
                self.assertNotIn(token, repr(event))
        del welcome

    def test_refused_refresh_expiry_unchanged_on_the_wire(self) -> None:
        """After a refused refresh the session still ends at its first expires_at."""
        conn, welcome = self.open(session_ttl=300)
        self.refresh(conn, self.h.ticket(user="bob"))
        self.h.clock.advance(300)
        self.assertEqual(conn.close_code(), 4003)
        del welcome

    def test_narrowed_grants_end_the_right_subscriptions(self) -> None:
        """Subscriptions the new grants cover stay; the others end with unsubscribed/forbidden."""
        conn, _ = self.open(subscribe=("chat.*", "news.>"))
        for n, topic in enumerate(("chat.a", "chat.*", "news.sports", "news.>")):
            conn.send({"op": "subscribe", "id": n, "topic": topic})
        conn.messages()
        frames = self.refresh(conn, self.h.ticket(subscribe=("chat.a", "news.sports")))
        self.assertEqual(frames[0]["op"], "ok")
        self.assertEqual(
            sorted(f["topic"] for f in frames[1:]),
            ["chat.*", "news.>"],
        )
        self.assertEqual({f["reason"] for f in frames[1:]}, {"forbidden"})
        self.h.factory.broker.publish("chat.a", 1)
        self.h.factory.broker.publish("chat.b", 2)
        self.assertEqual([m["data"] for m in conn.messages()], [1])
        conn.send({"op": "subscribe", "id": 9, "topic": "chat.*"})
        self.assertEqual(conn.messages()[0]["code"], "forbidden")

    def test_refresh_replaces_publish_grants_too(self) -> None:
        """The connection's publish rights become the new ticket's."""
        conn, _ = self.open(publish=("chat.*",))
        self.refresh(conn, self.h.ticket(publish=()))
        conn.send({"op": "publish", "id": 3, "topic": "chat.a", "data": 1})
        self.assertEqual(conn.messages()[0]["code"], "forbidden")

    def test_refresh_needs_a_string_ticket(self) -> None:
        """A refresh without a string ticket (or with extra fields) is bad_request."""
        conn, _ = self.open()
        for frame in (
            {"op": "refresh", "id": 0},
            {"op": "refresh", "id": 1, "ticket": 5},
            {"op": "refresh", "id": 2, "ticket": "x", "extra": 1},
        ):
            conn.send(frame)
            self.assertEqual(conn.messages()[0]["code"], "bad_request")

    def test_ticket_session_ttl_is_capped_by_the_limit(self) -> None:
        """A ticket may not outlive max_session_seconds, whatever it asks for."""
        limits = Limits(max_session_seconds=120, min_session_seconds=60, max_errors=50)
        h = harness(self, limits)
        conn = h.open(session_ttl=10_000)
        [welcome] = conn.messages()
        self.assertEqual(welcome["expires_at"], h.clock.seconds() + 120)
