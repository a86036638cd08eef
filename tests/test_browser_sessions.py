"""Session refresh (SPEC 9) and presence (SPEC 10) in securepub.js and the demo page.

Against a real ``--dev`` server whose sessions last 10 seconds (so the
``expiring`` notice comes 2.5 s before the end) and whose ``demo.room.*``
topics track presence with join/leave: the demo page stays on one connection
through two automatic refreshes; a refresh the server refuses ends in a 4003
close and a reconnect that resumes; ``presence()`` and ``onJoin``/``onLeave``
follow a Python client coming and going. Against the fake WebSocket of
test_browser_recovery.py: failed refreshes (an ``error`` frame, a failing
``getTicket``) are reported and tried once more, and a ``retryAfter`` from
``getTicket`` delays the next connection.

Uses test_browser.py's browser and page fixtures with a server of its own, and
skips or fails as test_browser.py does when Chromium is missing. No ticket is
printed: frames the page sends are kept with their ticket replaced.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests import test_browser
from tests.server import Server, recv_json, request_json
from tests.test_browser import REQUIRE_BROWSER, Env, _missing, message_item, open_demo
from tests.test_browser_recovery import JS_WITHIN, fake_server, subscribe_on_demo

browser = test_browser.browser
page = test_browser.page

#: Sessions of 10 s: the expiring notice comes at 7.5 s, each refresh buys 10 s more.
SESSION_SECONDS = 10
CONFIG = {
    "limits": {"min_session_seconds": 2, "max_session_seconds": SESSION_SECONDS},
    "topics": [
        {
            # Before --dev's own demo.> rule, so it governs these topics.
            "pattern": "demo.room.*",
            "presence": True,
            "join_leave": True,
            "client_publish": True,
            "history_size": 100,
        }
    ],
}
#: Two refreshes take 15 s from the welcome (notices at 7.5 s and 15 s).
TWO_REFRESHES_MS = 25_000
#: A refused refresh: the session ends 10 s after the welcome, then the client reconnects.
EXPIRY_MS = 20_000
REDACTED = "<ticket>"


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    """A --dev server with short sessions and presence on demo.room.*, for this module."""
    missing = _missing()
    if missing is not None:
        if REQUIRE_BROWSER:
            pytest.fail(f"{missing}, and SECUREPUB_REQUIRE_BROWSER=1")
        pytest.skip(missing)
    server = Server(config=CONFIG, dev=True).start()
    try:
        yield Env(server)
    finally:
        server.cleanup()


class Frames:
    """The page's WebSocket connections and frames; tickets kept apart, never in a frame."""

    def __init__(self, page: Any) -> None:
        self.urls: list[str] = []
        self.sent: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        #: The tickets of the refresh frames sent, in order (not to be printed).
        self.refresh_tickets: list[str] = []
        #: id() of each frame -> the index of its connection (request ids repeat across them).
        self._connection: dict[int, int] = {}
        page.on("websocket", self._opened)

    def _opened(self, socket: Any) -> None:
        index = len(self.urls)
        self.urls.append(socket.url)
        socket.on("framesent", lambda payload: self._sent(index, payload))
        socket.on("framereceived", lambda payload: self._received(index, payload))

    def _sent(self, index: int, payload: str) -> None:
        frame = json.loads(payload)
        if "ticket" in frame:
            self.refresh_tickets.append(frame["ticket"])
            frame["ticket"] = REDACTED
        self._connection[id(frame)] = index
        self.sent.append(frame)

    def _received(self, index: int, payload: str) -> None:
        frame = json.loads(payload)
        self._connection[id(frame)] = index
        self.received.append(frame)

    def ops(self, op: str, frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [f for f in frames if f.get("op") == op]

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """The ok or error answering ``request``, on the connection it was sent on."""
        index = self._connection[id(request)]
        [answer] = [
            f
            for f in self.received
            if f.get("op") in ("ok", "error")
            and f["id"] == request["id"]
            and self._connection[id(f)] == index
        ]
        return answer


def issued_tickets(page: Any) -> list[str]:
    """Every ticket /dev/ticket gives the page from now on (a list that fills up)."""
    tickets: list[str] = []

    def on_response(response: Any) -> None:
        if response.url.endswith("/dev/ticket") and response.status == 201:
            tickets.append(response.json()["ticket"])

    page.on("response", on_response)
    return tickets


def no_ticket_leaked(env: Env, texts: list[str], tickets: list[str]) -> bool:
    """None of ``tickets`` is in the server's log or in any of ``texts``."""
    haystack = env.server.log_text() + "\n".join(texts)
    return bool(tickets) and not any(ticket in haystack for ticket in tickets)


class Publishing:
    """Publish ``{"n": i}`` to a topic from a thread, every 200 ms, until stopped."""

    def __init__(self, env: Env, topic: str) -> None:
        self.env = env
        self.topic = topic
        self.ids: list[str] = []
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with self.env.publisher() as publisher:
                while not self._stop.is_set():
                    self.ids.append(publisher.publish(self.topic, {"n": len(self.ids)}))
                    self._stop.wait(0.2)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            self._error = e

    def __enter__(self) -> Publishing:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        if self._error is not None:
            raise self._error


# -- against the real server ---------------------------------------------------------


def test_the_page_stays_connected_through_two_automatic_refreshes(page: Any, env: Env) -> None:
    """On each ``expiring`` notice the page gets a new ticket and refreshes in-band: one
    connection and one session throughout, every message published meanwhile arrives,
    ``expiresAt`` and "session until" follow each ``ok``, and the refresh tickets travel
    only in the refresh frames (not in a URL, not in the server's log or the console)."""
    topic = "demo.sessions"
    frames = Frames(page)
    tickets = issued_tickets(page)
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    open_demo(page, env)
    session = page.text_content("#session")
    expiry = page.locator("#expiry")
    first_expiry = float(expiry.get_attribute("data-expires-at"))
    assert re.fullmatch(r"session until \d\d:\d\d:\d\d", expiry.text_content())
    refreshed = page.locator("#events li", has_text="session refreshed until")
    with Publishing(env, topic) as publishing:
        refreshed.nth(1).wait_for(timeout=TWO_REFRESHES_MS)
    last = env.publish(topic, {"n": "last"})
    message_item(page, last)

    # One connection, one session: refreshed in place, never reconnected.
    assert len(frames.urls) == 1 and "ticket" not in frames.urls[0]
    assert page.text_content("#session") == session
    assert page.locator("#events li", has_text="reconnecting").count() == 0
    assert frames.ops("welcome", frames.received)[0]["expires_at"] == first_expiry
    # Two notices, each answered by a refresh with a fresh ticket, each ok'd with a later expiry.
    notices = frames.ops("expiring", frames.received)
    refreshes = frames.ops("refresh", frames.sent)
    assert len(notices) >= 2 and len(refreshes) == len(notices)
    assert all(set(f) == {"op", "id", "ticket"} for f in refreshes)
    answers = [frames.answer(f) for f in refreshes]
    assert [a["op"] for a in answers] == ["ok"] * len(answers)
    expiries = [first_expiry] + [a["expires_at"] for a in answers]
    assert expiries == sorted(expiries) and len(set(expiries)) == len(expiries)
    assert [n["expires_at"] for n in notices] == expiries[:-1]
    fresh = set(frames.refresh_tickets) <= set(tickets[1:])
    distinct = len(set(frames.refresh_tickets)) == len(frames.refresh_tickets)
    assert fresh and distinct, "each refresh frame carries a new ticket from /dev/ticket"
    assert page.evaluate("window.securepubDemo.expiresAt") == expiries[-1]
    assert float(expiry.get_attribute("data-expires-at")) == expiries[-1]
    # Every message published meanwhile, once.
    shown = page.locator(f"#messages li[data-topic='{topic}']").evaluate_all(
        "items => items.map(item => item.dataset.id)"
    )
    assert sorted(shown) == sorted([*publishing.ids, last])
    assert len(publishing.ids) >= 30
    assert no_ticket_leaked(env, console, tickets), "a ticket reached the log or the console"
    assert page.errors == []


def test_a_refused_refresh_is_retried_once_then_the_session_ends_and_resumes(
    page: Any, env: Env
) -> None:
    """A refresh with a spent ticket is answered ``forbidden`` by the server: reported
    through onError, tried once more, refused again; at expires_at the server closes with
    4003 and the client reconnects with a fresh ticket (4003 is not fatal), resuming its
    topic with every message published meanwhile."""
    topic = "demo.expiry"
    frames = Frames(page)
    page.goto(env.origin + "/demo")
    page.wait_for_selector("#state[data-state=open]")
    page.evaluate(
        JS_WITHIN
        + """
        const { connect } = await import("/static/securepub.js");
        const state = { errors: [], states: [], recoveries: [], messages: [], calls: 0 };
        let spent = null;
        state.reopened = new Promise((resolve) => { state.onReopen = resolve; });
        state.client = connect({
          getTicket: async () => {
            state.calls += 1;
            // The first connection's ticket, offered again on both refresh tries.
            if (spent !== null && state.calls <= 3) return spent;
            const answer = await (await fetch("/dev/ticket", {
              method: "POST", headers: {"Content-Type": "application/json"}, body: "{}"})).json();
            if (spent === null) spent = answer.ticket;
            return answer;
          },
          initialDelay: 100,
          onError: (e) => state.errors.push(e.code),
          onMessage: (m) => state.messages.push(m.data.n),
          onRecover: (t, outcome) => state.recoveries.push([t, outcome.recovered]),
          onStateChange: (s, detail) => {
            state.states.push([s, detail.code ?? null]);
            if (s === "open" && state.states.filter(([x]) => x === "open").length === 2) {
              state.onReopen();
            }
          },
        });
        window.expiryTest = state;
        await within(state.client.subscribe("demo.expiry"), "subscribe");
        state.first = state.client.session.session;
    }"""
    )
    with Publishing(env, topic) as publishing:
        outcome = page.evaluate(
            """async (ms) => {
            const state = window.expiryTest;
            await Promise.race([state.reopened, new Promise((_, reject) =>
              setTimeout(() => reject(new Error("no reconnect")), ms))]);
            return { first: state.first, second: state.client.session.session,
                     errors: state.errors, states: state.states, calls: state.calls };
        }""",
            EXPIRY_MS,
        )
    env.publish(topic, {"n": "last"})
    result = page.evaluate(
        """async (last) => {
        const state = window.expiryTest;
        const deadline = Date.now() + 5000;
        while (!state.messages.includes(last) && Date.now() < deadline) {
          await new Promise((resolve) => setTimeout(resolve, 50));
        }
        state.client.close();
        return { messages: state.messages, recoveries: state.recoveries };
    }""",
        "last",
    )
    assert outcome["errors"] == ["forbidden", "forbidden"]
    assert outcome["states"][:3] == [["connecting", None], ["open", None], ["reconnecting", 4003]]
    assert outcome["states"][3:] == [["connecting", None], ["open", None]]
    assert outcome["first"] != outcome["second"]
    assert outcome["calls"] == 4
    # The two refresh frames of the library's connection were refused (the demo page's
    # own client, on its own connection, refreshed successfully meanwhile).
    refused = [f for f in frames.ops("refresh", frames.sent) if frames.answer(f)["op"] == "error"]
    assert [frames.answer(f)["code"] for f in refused] == ["forbidden", "forbidden"]
    # Resumed since the last offset: every message once, in order.
    assert result["recoveries"] == [[topic, True]]
    assert result["messages"] == [*range(len(publishing.ids)), "last"]
    assert page.errors == []


def test_presence_and_join_leave_follow_a_user_coming_and_going(page: Any, env: Env) -> None:
    """presence() answers user -> sessions on a presence topic (forbidden or bad_request
    elsewhere); onJoin and onLeave fire when another user's session subscribes and leaves;
    the demo page shows who is there, as text, and follows joins and leaves."""
    topic = "demo.room.lobby"
    open_demo(page, env)
    subscribe_on_demo(page, topic)
    page.evaluate(
        JS_WITHIN
        + """
        const { connect } = await import("/static/securepub.js");
        const state = { joins: [], leaves: [], waiters: [], within };
        const wake = () => { for (const check of state.waiters) check(); };
        state.until = (what, test) => within(new Promise((resolve) => {
          const check = () => { if (test()) resolve(); };
          state.waiters.push(check);
          check();
        }), what);
        state.client = connect({
          getTicket: async () => (await fetch("/dev/ticket", {
            method: "POST", headers: {"Content-Type": "application/json"}, body: "{}"})).json(),
          onJoin: (t, user) => { state.joins.push([t, user]); wake(); },
          onLeave: (t, user) => { state.leaves.push([t, user]); wake(); },
        });
        state.outcome = async (promise) => {
          try { return { resolved: await promise }; }
          catch (e) { return { rejected: e.code, name: e.name }; }
        };
        window.presenceTest = state;
        await within(state.client.subscribe("demo.room.lobby"), "subscribe");
    }"""
    )
    bob = env.server.session(user="bob", subscribe=["demo.room.*"])
    try:
        answer = request_json(bob, {"op": "subscribe", "id": 1, "topic": topic})
        assert answer["op"] == "ok", answer
        present = page.evaluate(
            """async () => {
            const state = window.presenceTest;
            await state.until("bob's join", () => state.joins.some(([, u]) => u === "bob"));
            const c = state.client;
            return { users: await state.outcome(c.presence("demo.room.lobby")),
                     noPresence: await state.outcome(c.presence("demo.hello")),
                     notGranted: await state.outcome(c.presence("other.topic")),
                     invalid: await state.outcome(c.presence("demo..x")),
                     joins: state.joins };
        }"""
        )
        # The demo page heard the join too, and shows both users.
        page.wait_for_selector("#events li:has-text('bob joined demo.room.lobby')")
        both = page.locator(f"#presence li[data-topic='{topic}'][data-users='bob demo']")
        both.wait_for()
        assert both.locator("li[data-user='demo']").get_attribute("data-sessions") == "2"
        assert both.locator("li[data-user='bob']").text_content() == "bob"
        bob_sees = request_json(bob, {"op": "presence", "id": 2, "topic": topic})
        while bob_sees.get("op") != "presence":  # join frames first
            bob_sees = recv_json(bob)
        assert bob_sees["users"] == {"demo": 2, "bob": 1}
    finally:
        bob.close()
    gone = page.evaluate(
        """async () => {
        const state = window.presenceTest;
        await state.until("bob's leave", () => state.leaves.length > 0);
        const users = await state.outcome(state.client.presence("demo.room.lobby"));
        state.client.close();
        const closed = await state.outcome(state.client.presence("demo.room.lobby"));
        return { users, closed, leaves: state.leaves, joins: state.joins };
    }"""
    )
    assert present["users"] == {"resolved": {"demo": 2, "bob": 1}}
    assert present["noPresence"] == {"rejected": "bad_request", "name": "SecurePubError"}
    assert present["notGranted"] == {"rejected": "forbidden", "name": "SecurePubError"}
    assert present["invalid"] == {"rejected": "invalid_topic", "name": "SecurePubError"}
    assert [topic, "bob"] in present["joins"]
    assert all(t == topic for t, _ in present["joins"])
    assert gone["leaves"] == [[topic, "bob"]]
    assert gone["joins"] == present["joins"]
    assert gone["users"] == {"resolved": {"demo": 2}}
    assert gone["closed"] == {"rejected": "closed", "name": "SecurePubError"}
    page.wait_for_selector("#events li:has-text('bob left demo.room.lobby')")
    page.wait_for_selector(f"#presence li[data-topic='{topic}'][data-users='demo']")
    # Asked from the form, on a topic without presence: the error is shown, nothing else.
    page.fill("#presence-topic", "demo.hello")
    page.click("#presence-button")
    page.wait_for_selector("#presence-result:has-text('bad_request')")
    assert page.locator("#presence li[data-topic='demo.hello']").count() == 0
    assert page.errors == []


# -- against a fake WebSocket ----------------------------------------------------------


def test_a_failed_refresh_is_reported_and_tried_once_more(page: Any, env: Env) -> None:
    """On ``expiring``: a fresh ticket in a refresh frame on the same connection; an error
    answer is reported and tried once more after a short jittered delay, a getTicket
    failure then too (no_ticket), and no third try; 4003 reconnects; an ok sets expiresAt
    and calls onRefresh; with too little time left a failure is not tried again."""
    fake_server(page, env)
    result = page.evaluate(
        """async () => {
        const now = () => Date.now() / 1000;
        const calls = [];
        const log = [];
        const { client } = fake.client({
          getTicket: async () => {
            calls.push(performance.now());
            if (calls.length === 3) throw new Error("the ticket endpoint is down");
            return "fake-ticket-" + calls.length;
          },
          onError: (e) => log.push(["error", e.code]),
          onRefresh: (refresh) => log.push(["refresh", refresh]),
          onStateChange: (s, detail) => log.push(["state", s, detail.code ?? null]),
        });
        const quiet = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
        const s0 = await fake.socket(0);
        const e0 = now() + 30;
        s0.deliver({ op: "welcome", session: "s0", user: "u", expires_at: e0 });
        const atWelcome = client.expiresAt;
        const subscribed = client.subscribe("demo.a");
        const sub = await s0.next();
        s0.deliver({ op: "ok", id: sub.id });
        await fake.within(subscribed, "subscribe");
        s0.deliver({ op: "expiring", expires_at: e0 });
        const r1 = await s0.next("the refresh");
        const refused = performance.now();
        s0.deliver({ op: "error", id: r1.id, code: "forbidden", message: "not valid" });
        await fake.within(new Promise((resolve) => {
          const check = () => (calls.length >= 3 ? resolve() : setTimeout(check, 5));
          check();
        }), "the second try");
        const retryGap = calls[2] - refused;
        await quiet(300);
        const afterTwo = { unread: s0.unread(), calls: calls.length };
        s0.drop(4003);
        const s1 = await fake.socket(1);
        const e1 = now() + 30;
        s1.deliver({ op: "welcome", session: "s1", user: "u", expires_at: e1 });
        const resub = await s1.next();
        s1.deliver({ op: "ok", id: resub.id });
        s1.deliver({ op: "expiring", expires_at: e1 });
        const r2 = await s1.next("the second refresh");
        const e2 = now() + 60;
        s1.deliver({ op: "ok", id: r2.id, expires_at: e2 });
        const afterOk = client.expiresAt;
        // Too little time left for a second try: reported, not tried again.
        const e3 = now() + 0.2;
        s1.deliver({ op: "expiring", expires_at: e3 });
        const r3 = await s1.next("the third refresh");
        s1.deliver({ op: "error", id: r3.id, code: "unavailable", message: "store down" });
        await quiet(400);
        const late = { unread: s1.unread(), calls: calls.length };
        const urls = [s0.url, s1.url];
        const protocols = [s0.protocols, s1.protocols];
        client.close();
        return { e0, e1, e2, e3, atWelcome, afterOk, r1, r2, r3, retryGap, afterTwo, late,
                 urls, protocols, log, sub, resub };
    }"""
    )
    r1, r2, r3 = result["r1"], result["r2"], result["r3"]
    assert r1 == {"op": "refresh", "id": r1["id"], "ticket": "fake-ticket-2"}
    assert r2 == {"op": "refresh", "id": r2["id"], "ticket": "fake-ticket-5"}
    assert r3["ticket"] == "fake-ticket-6"
    assert result["atWelcome"] == result["e0"]
    assert result["afterOk"] == result["e2"]
    # Half to all of 2 x initialDelay (20 ms) after the refusal; timers fire late, never early.
    assert result["retryGap"] >= 15, result["retryGap"]
    assert result["afterTwo"] == {"unread": 0, "calls": 3}
    assert result["late"] == {"unread": 0, "calls": 6}
    # Same connection for each refresh; tickets in the subprotocol, never in a URL.
    assert result["urls"] == ["wss://fake.invalid/ws"] * 2
    assert result["protocols"] == [
        ["securepub.v1", "ticket.fake-ticket-1"],
        ["securepub.v1", "ticket.fake-ticket-4"],
    ]
    assert result["resub"]["topic"] == "demo.a"
    assert result["log"] == [
        ["state", "connecting", None],
        ["state", "open", None],
        ["error", "forbidden"],
        ["error", "no_ticket"],
        ["state", "reconnecting", 4003],
        ["state", "connecting", None],
        ["state", "open", None],
        ["refresh", {"expiresAt": result["e2"]}],
        ["error", "unavailable"],
        ["state", "closed", None],
    ]


def test_retry_after_from_get_ticket_delays_the_next_connection(page: Any, env: Env) -> None:
    """A getTicket failure carrying ``retryAfter`` (seconds) delays the next attempt by at
    least that, with jitter, and is reported with it; without one the jittered backoff
    applies; a huge retryAfter is capped at MAX_RETRY_AFTER (60 s)."""
    fake_server(page, env)
    result = page.evaluate(
        """async () => {
        const { SecurePubError, MAX_RETRY_AFTER } = await import("/static/securepub.js");
        const calls = [];
        const states = [];
        const errors = [];
        let capped;
        const cappedSeen = new Promise((resolve) => { capped = resolve; });
        const { client } = fake.client({
          getTicket: async () => {
            calls.push(performance.now());
            if (calls.length === 1) throw { retryAfter: 1, message: "busy" };
            if (calls.length === 2) throw new SecurePubError("busy", "again, no hint");
            if (calls.length === 3) throw Object.assign(new Error("busy"), { retryAfter: "2" });
            throw Object.assign(new Error("very busy"), { retryAfter: 1e9 });
          },
          onError: (e) => errors.push([e.code, e.retryAfter ?? null]),
          onStateChange: (s, detail) => {
            states.push([s, detail.delay ?? null, detail.retryAfter ?? null]);
            if (s === "reconnecting" && detail.retryAfter === MAX_RETRY_AFTER) capped();
          },
        });
        await fake.within(cappedSeen, "the capped retryAfter", 8000);
        client.close();
        return { gaps: calls.slice(1).map((t, i) => t - calls[i]), states, errors };
    }"""
    )
    first, second, third = result["gaps"]
    assert first >= 1000 and second < 500 and third >= 2000, result["gaps"]
    reconnecting = [s for s in result["states"] if s[0] == "reconnecting"]
    [(_, d1, a1), (_, d2, a2), (_, d3, a3), (_, d4, a4)] = reconnecting
    # At least the hint, plus up to a quarter of it and one initialDelay (20 ms) of jitter.
    assert a1 == 1 and 1000 <= d1 <= 1270
    assert a2 is None and 10 <= d2 <= 40
    assert a3 == 2 and 2000 <= d3 <= 2520
    assert a4 == 60 and 60_000 <= d4 <= 75_020
    assert result["errors"] == [
        ["no_ticket", 1],
        ["busy", None],
        ["no_ticket", 2],
        ["no_ticket", 60],
    ]
    assert result["states"][-1][0] == "closed"
