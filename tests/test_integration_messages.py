"""Frames over a real connection: subscribe, deliver, publish, errors, close codes
(SPEC sections 4 and 5)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from tests.server import Server, recv_json, request_json, server_fixture

MAX_MESSAGE_BYTES = 1024
MAX_FRAME_BYTES = MAX_MESSAGE_BYTES + 4096
MAX_JSON_DEPTH = 8
MAX_SUBSCRIPTIONS = 5
MAX_PUBLISH_RATE = 1  # burst 2
MAX_ERRORS = 5

CHAT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["text"],
    "properties": {"text": {"type": "string", "maxLength": 200}},
    "additionalProperties": False,
}
ORDER_SCHEMA = {
    "type": "object",
    "required": ["sku", "qty"],
    "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
}

srv = server_fixture(
    {
        "limits": {
            "max_message_bytes": MAX_MESSAGE_BYTES,
            "max_json_depth": MAX_JSON_DEPTH,
            "max_subscriptions": MAX_SUBSCRIPTIONS,
            "max_publish_rate": MAX_PUBLISH_RATE,
            "max_errors": MAX_ERRORS,
            "max_connections_per_ip": 50,
        },
        "topics": [
            {"pattern": "chat.*", "schema": "schemas/chat.json", "client_publish": True},
            {"pattern": "orders.>", "schema": "schemas/order.json"},
        ],
    },
    files={"schemas/chat.json": CHAT_SCHEMA, "schemas/order.json": ORDER_SCHEMA},
)


class Sessions:
    """Opens welcomed sessions on the module's server and closes them after the test."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.opened: list[Any] = []

    def __call__(self, user: str = "alice", **grants: Any) -> Any:
        conn = self.server.session(user=user, **grants)
        self.opened.append(conn)
        return conn

    def close(self) -> None:
        for conn in self.opened:
            conn.close()


@pytest.fixture
def sessions(srv: Server) -> Iterator[Sessions]:
    opened = Sessions(srv)
    yield opened
    opened.close()


def subscribe(conn: Any, topic: str, id: int | str = 1) -> None:
    reply = request_json(conn, {"op": "subscribe", "id": id, "topic": topic})
    assert reply == {"op": "ok", "id": id}, reply


def client_publish(conn: Any, topic: str, data: Any, id: int | str = 1) -> Any:
    return request_json(conn, {"op": "publish", "id": id, "topic": topic, "data": data})


def expect_close(conn: Any, code: int, timeout: float = 5) -> list[Any]:
    """Read until the server closes; assert it sent a close frame with ``code``.

    Returns the frames received before the close.
    """
    frames = []
    deadline = time.monotonic() + timeout
    with pytest.raises(ConnectionClosed) as info:
        while True:
            frames.append(json.loads(conn.recv(timeout=max(0.01, deadline - time.monotonic()))))
    assert info.value.rcvd is not None, "the TCP connection was dropped without a close frame"
    assert info.value.rcvd.code == code, info.value.rcvd
    return frames


def send_then_expect_close(conn: Any, message: Any, code: int) -> None:
    """Send ``message`` and assert the server closes with ``code``; the close
    may already arrive while the client is still sending."""
    try:
        conn.send(message)
    except ConnectionClosed as e:
        assert e.rcvd is not None, "the TCP connection was dropped without a close frame"
        assert e.rcvd.code == code, e.rcvd
        return
    expect_close(conn, code)


class TestBasics:
    def test_welcome_is_first_frame(self, srv: Server) -> None:
        """The first frame after the upgrade is exactly op/session/user/expires_at (SPEC 9)."""
        conn = srv.ws(srv.ticket(user="welcome-user"))
        try:
            welcome = recv_json(conn)
        finally:
            conn.close()
        assert set(welcome) == {"op", "session", "user", "expires_at"}
        assert welcome["expires_at"] > time.time() + 3500
        assert welcome["op"] == "welcome"
        assert welcome["user"] == "welcome-user"
        assert isinstance(welcome["session"], str) and welcome["session"]

    def test_subscribe_ok_echoes_id(self, sessions: Sessions) -> None:
        """subscribe answers ``ok`` echoing an integer or string id; subscribing
        again to the same topic is ``ok`` too; unsubscribe is ``ok``."""
        conn = sessions(subscribe=["news.>"])
        subscribe(conn, "news.sports", id=1)
        subscribe(conn, "news.sports", id="again")
        reply = request_json(conn, {"op": "unsubscribe", "id": 7, "topic": "news.sports"})
        assert reply == {"op": "ok", "id": 7}

    def test_sessions_are_distinct(self, srv: Server) -> None:
        """Two connections get two different session ids."""
        a = srv.ws(srv.ticket())
        b = srv.ws(srv.ticket())
        try:
            assert recv_json(a)["session"] != recv_json(b)["session"]
        finally:
            a.close()
            b.close()


class TestDelivery:
    def test_api_publish_reaches_each_subscriber_exactly_once(
        self, srv: Server, sessions: Sessions
    ) -> None:
        """A /v1/publish reaches three subscribers once each, with the id the API
        returned, the topic, a current ``ts`` and the data; the next frame each
        gets is the next message (no duplicate in between)."""
        subscribers = [sessions(user=f"sub{i}", subscribe=["news.>"]) for i in range(3)]
        for conn in subscribers:
            subscribe(conn, "news.sports")
        before = time.time()
        message_id = srv.publish("news.sports", {"headline": "hello", "n": [1, 2.5, None]})
        marker_id = srv.publish("news.sports", {"headline": "marker"})
        assert message_id != marker_id
        for conn in subscribers:
            message = recv_json(conn)
            assert set(message) == {"op", "topic", "id", "ts", "data"}
            assert message["op"] == "message"
            assert message["topic"] == "news.sports"
            assert message["id"] == message_id
            assert message["data"] == {"headline": "hello", "n": [1, 2.5, None]}
            assert isinstance(message["ts"], (int, float))
            assert before - 5 <= message["ts"] <= time.time() + 5
            assert recv_json(conn)["id"] == marker_id

    def test_overlapping_patterns_deliver_once(self, srv: Server, sessions: Sessions) -> None:
        """Subscribed to ``news.*`` and ``news.>`` (both matching), a connection
        gets each message once."""
        conn = sessions(subscribe=["news.>"])
        subscribe(conn, "news.*", id=1)
        subscribe(conn, "news.>", id=2)
        subscribe(conn, "news.sports", id=3)
        first = srv.publish("news.sports", {"n": 1})
        second = srv.publish("news.weather", {"n": 2})
        assert recv_json(conn)["id"] == first
        assert recv_json(conn)["id"] == second

    def test_unmatched_topics_not_delivered(self, srv: Server, sessions: Sessions) -> None:
        """``news.*`` does not match ``news.a.b`` nor ``sport.x``; ``news.>`` would."""
        conn = sessions(subscribe=["news.>"])
        subscribe(conn, "news.*")
        srv.publish("news.a.b", {"n": 1})
        srv.publish("sport.x", {"n": 2})
        marker = srv.publish("news.a", {"n": 3})
        assert recv_json(conn)["id"] == marker

    def test_unsubscribe_stops_delivery(self, srv: Server, sessions: Sessions) -> None:
        """After unsubscribe, messages on that topic no longer arrive."""
        conn = sessions(subscribe=["news.>"])
        subscribe(conn, "news.sports", id=1)
        subscribe(conn, "news.marker", id=2)
        reply = request_json(conn, {"op": "unsubscribe", "id": 3, "topic": "news.sports"})
        assert reply == {"op": "ok", "id": 3}
        srv.publish("news.sports", {"n": 1})
        marker = srv.publish("news.marker", {"n": 2})
        assert recv_json(conn)["id"] == marker


class TestBrowserPublish:
    def test_allowed_by_rule_and_grant_reaches_subscriber(
        self, srv: Server, sessions: Sessions
    ) -> None:
        """A browser publish to ``chat.room1`` with a ``chat.*`` publish grant and a
        ``client_publish = true`` rule is ``ok`` and reaches a subscriber."""
        listener = sessions(user="listener", subscribe=["chat.*"])
        subscribe(listener, "chat.room1")
        talker = sessions(user="talker", publish=["chat.*"])
        assert client_publish(talker, "chat.room1", {"text": "hi"}, id="p1") == {
            "op": "ok",
            "id": "p1",
        }
        message = recv_json(listener)
        assert message["op"] == "message"
        assert message["topic"] == "chat.room1"
        assert message["data"] == {"text": "hi"}
        assert isinstance(message["id"], str)

    @pytest.mark.parametrize(
        ("grant", "topic", "data"),
        [
            (["news.>"], "news.sports", {"headline": "x"}),  # granted, but no topic rule
            (["orders.>"], "orders.eu", {"sku": "a", "qty": 1}),  # rule says client_publish false
            (["chat.room2"], "chat.room1", {"text": "hi"}),  # rule allows, grant doesn't match
            ([], "chat.room1", {"text": "hi"}),  # no publish grant at all
        ],
    )
    def test_forbidden_without_grant_and_rule(
        self, srv: Server, sessions: Sessions, grant: list[str], topic: str, data: Any
    ) -> None:
        """A browser publish needs both a matching grant and a ``client_publish``
        rule; otherwise it is ``forbidden`` and nothing is delivered."""
        listener = sessions(user="listener", subscribe=[topic])
        subscribe(listener, topic)
        conn = sessions(publish=grant)
        reply = client_publish(conn, topic, data, id=9)
        assert reply["op"] == "error" and reply["code"] == "forbidden", reply
        assert reply["id"] == 9
        marker = srv.publish(topic, data)
        assert recv_json(listener)["id"] == marker

    def test_publisher_gets_own_message_only_when_subscribed(self, sessions: Sessions) -> None:
        """A publisher not subscribed to the topic gets only ``ok``; once
        subscribed, it gets its own message too."""
        conn = sessions(subscribe=["chat.*"], publish=["chat.*"])
        conn.send(
            json.dumps({"op": "publish", "id": 1, "topic": "chat.room1", "data": {"text": "a"}})
        )
        conn.send(json.dumps({"op": "subscribe", "id": 2, "topic": "chat.room1"}))
        conn.send(
            json.dumps({"op": "publish", "id": 3, "topic": "chat.room1", "data": {"text": "b"}})
        )
        frames = [recv_json(conn) for _ in range(4)]
        assert frames[0] == {"op": "ok", "id": 1}
        assert frames[1] == {"op": "ok", "id": 2}
        messages = [f for f in frames if f["op"] == "message"]
        assert [m["data"] for m in messages] == [{"text": "b"}]
        assert {"op": "ok", "id": 3} in frames[2:]


class TestValidation:
    def test_schema_failure_is_invalid_payload_from_browser(
        self, srv: Server, sessions: Sessions
    ) -> None:
        """A browser payload failing the topic's JSON Schema is ``invalid_payload``
        and is not delivered."""
        listener = sessions(subscribe=["chat.*"])
        subscribe(listener, "chat.room1")
        conn = sessions(publish=["chat.*"])
        for bad in ({"text": 5}, {"text": "x", "extra": True}, {}, "text"):
            reply = client_publish(conn, "chat.room1", bad, id="s")
            assert reply["op"] == "error" and reply["code"] == "invalid_payload", (bad, reply)
            conn.close()
            conn = sessions(publish=["chat.*"])  # stay under max_errors and the rate
        marker = srv.publish("chat.room1", {"text": "ok"})
        assert recv_json(listener)["id"] == marker

    @pytest.mark.parametrize(
        ("topic", "data"),
        [
            ("chat.room1", {"text": 5}),
            ("orders.eu", {"sku": "a", "qty": 0}),
            ("orders.eu.west", {"qty": 1}),
        ],
    )
    def test_schema_failure_is_invalid_payload_from_api(
        self, srv: Server, topic: str, data: Any
    ) -> None:
        """Backends are not exempt: a /v1/publish payload failing the first
        matching rule's schema is 400 ``invalid_payload``."""
        status, _, body = srv.api("POST", "/v1/publish", {"topic": topic, "data": data})
        assert status == 400
        assert body["error"] == "invalid_payload"

    def test_size_and_depth_limits_are_invalid_payload(
        self, srv: Server, sessions: Sessions
    ) -> None:
        """A payload over max_message_bytes (in a frame under the frame cap) or
        nested deeper than max_json_depth is ``invalid_payload``, from a
        browser and from the API alike."""
        big = {"text": "x" * 150, "pad": "y" * MAX_MESSAGE_BYTES}
        deep: Any = "leaf"
        for _ in range(MAX_JSON_DEPTH + 2):
            deep = [deep]
        conn = sessions(publish=["chat.*"])
        for data in (big, {"text": "x", "nested": deep}):
            reply = client_publish(conn, "chat.room1", data)
            assert reply["code"] == "invalid_payload", reply
        for data in (big, deep):
            status, _, body = srv.api("POST", "/v1/publish", {"topic": "news.x", "data": data})
            assert (status, body["error"]) == (400, "invalid_payload")
        status, _, _ = srv.api(
            "POST", "/v1/publish", {"topic": "news.x", "data": "z" * (MAX_MESSAGE_BYTES - 10)}
        )
        assert status == 202


class TestErrors:
    @pytest.mark.parametrize(
        ("frame", "code"),
        [
            ("not json", "bad_request"),
            ("[1, 2]", "bad_request"),
            ('{"op": "subscribe", "id": 1, "topic": NaN}', "bad_request"),
            ('{"op": "subscribe", "id": 1, "id": 2, "topic": "news.a"}', "bad_request"),
            ('{"op": "subscribe", "id": 1}', "bad_request"),
            ('{"op": "subscribe", "id": 1, "topic": "news.a", "extra": 1}', "bad_request"),
            ('{"op": "frobnicate", "id": 1, "topic": "news.a"}', "bad_request"),
            ('{"op": "subscribe", "topic": "news.a"}', "bad_request"),
            ('{"op": "subscribe", "id": 1, "topic": 5}', "bad_request"),
            ('{"op": "subscribe", "id": 1, "topic": "news..a"}', "invalid_topic"),
            ('{"op": "subscribe", "id": 1, "topic": "news.>.a"}', "invalid_topic"),
            ('{"op": "subscribe", "id": 1, "topic": "secret.stuff"}', "forbidden"),
            ('{"op": "subscribe", "id": 1, "topic": ">"}', "forbidden"),
        ],
    )
    def test_bad_frames_get_error_replies(self, sessions: Sessions, frame: str, code: str) -> None:
        """Malformed, unknown, ungranted and invalid frames get an ``error`` reply
        with the SPEC's code, and the connection stays usable."""
        conn = sessions(subscribe=["news.>"])
        conn.send(frame)
        reply = recv_json(conn)
        assert reply["op"] == "error", reply
        assert reply["code"] == code, reply
        assert isinstance(reply["message"], str)
        subscribe(conn, "news.a", id="after")

    def test_error_does_not_close_and_later_frames_work(
        self, srv: Server, sessions: Sessions
    ) -> None:
        """An error reply (echoing the id) never closes the connection by itself:
        later subscribes work and messages keep arriving."""
        conn = sessions(subscribe=["news.>"])
        for n in range(MAX_ERRORS - 1):
            reply = request_json(conn, {"op": "subscribe", "id": n, "topic": "nope.x"})
            assert reply == {
                "op": "error",
                "id": n,
                "code": "forbidden",
                "message": reply["message"],
            }
        subscribe(conn, "news.sports", id="later")
        message_id = srv.publish("news.sports", {"still": "open"})
        assert recv_json(conn)["id"] == message_id

    def test_limit_exceeded_past_max_subscriptions(self, sessions: Sessions) -> None:
        """Past max_subscriptions distinct subscriptions the next is
        ``limit_exceeded``; re-subscribing a held one counts once; an
        unsubscribe frees a slot."""
        conn = sessions(subscribe=["news.>"])
        for n in range(MAX_SUBSCRIPTIONS):
            subscribe(conn, f"news.t{n}", id=n)
        subscribe(conn, "news.t0", id="dup")
        reply = request_json(conn, {"op": "subscribe", "id": "over", "topic": "news.more"})
        assert reply["code"] == "limit_exceeded", reply
        assert reply["id"] == "over"
        request_json(conn, {"op": "unsubscribe", "id": "u", "topic": "news.t1"})
        subscribe(conn, "news.more", id="fits")

    def test_rate_limited_past_burst(self, sessions: Sessions) -> None:
        """A browser may publish ``2 x max_publish_rate`` times at once; the next
        publish right after is ``rate_limited``."""
        conn = sessions(publish=["chat.*"])
        burst = 2 * MAX_PUBLISH_RATE
        for n in range(burst):
            assert client_publish(conn, "chat.room1", {"text": str(n)}, id=n) == {
                "op": "ok",
                "id": n,
            }
        reply = client_publish(conn, "chat.room1", {"text": "over"}, id="over")
        assert reply["code"] == "rate_limited", reply


class TestCloseCodes:
    def test_binary_frame_closes_1003(self, sessions: Sessions) -> None:
        """A binary frame gets a close frame with 1003."""
        conn = sessions()
        send_then_expect_close(conn, b'{"op": "subscribe", "id": 1, "topic": "news.a"}', 1003)

    @pytest.mark.parametrize("fragmented", [False, True], ids=["one-frame", "fragments"])
    def test_message_over_cap_closes_1009(self, sessions: Sessions, fragmented: bool) -> None:
        """A message over max_message_bytes + 4 KiB, in one frame or reassembled
        from smaller fragments, gets a close frame with 1009."""
        conn = sessions()
        text = json.dumps({"op": "subscribe", "id": 1, "topic": "x" * (MAX_FRAME_BYTES + 100)})
        if fragmented:
            half = len(text) // 2
            assert half < MAX_FRAME_BYTES
            send_then_expect_close(conn, iter([text[:half], text[half:]]), 1009)
        else:
            send_then_expect_close(conn, text, 1009)

    def test_message_at_cap_is_not_closed(self, sessions: Sessions) -> None:
        """A frame just under the cap is handled normally (an error reply, since
        its payload is too big), not closed."""
        conn = sessions(publish=["chat.*"])
        frame = json.dumps(
            {
                "op": "publish",
                "id": 1,
                "topic": "chat.a",
                "data": {"text": "x" * (MAX_FRAME_BYTES - 200)},
            }
        )
        assert len(frame.encode()) <= MAX_FRAME_BYTES
        conn.send(frame)
        assert recv_json(conn)["code"] == "invalid_payload"

    def test_max_errors_closes_1008(self, sessions: Sessions) -> None:
        """After max_errors error replies the connection is closed with 1008;
        exactly max_errors error frames arrive before the close."""
        conn = sessions()
        for n in range(MAX_ERRORS + 2):
            try:
                conn.send(json.dumps({"op": "bogus", "id": n}))
            except ConnectionClosed:
                break
        frames = expect_close(conn, 1008)
        assert [f["op"] for f in frames] == ["error"] * MAX_ERRORS
        assert [f["id"] for f in frames] == list(range(MAX_ERRORS))
