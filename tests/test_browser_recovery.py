"""History and recovery (SPEC 8) in securepub.js and the demo page, in headless Chromium.

Two kinds of tests. Against the module's real ``--dev`` server (whose demo
topics keep 100 messages of history): the page resumes after its connection
is cut and shows every message once, in order; after a node restart it is
told to refetch. Against a fake WebSocket installed in the page (the real
server still serves securepub.js): the frames a ``--dev`` server does not
send on demand (``unsubscribed``, ``unavailable``, an epoch change), each
answered exactly as SPEC sections 4, 8 and 9 write them.

Uses test_browser.py's fixtures (one server and one Chromium for this
module) and skips or fails as it does when Chromium is missing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tests import test_browser
from tests.test_browser import Env, message_item, open_demo

# test_browser's fixtures, instantiated anew for this module (its own server).
env = test_browser.env
browser = test_browser.browser
page = test_browser.page

#: After a restart the page may have backed off for a while (0.5 s doubling).
RESTART_TIMEOUT_MS = 30_000


# -- helpers ---------------------------------------------------------------------


class Frames:
    """Every WebSocket frame the page sends and receives, parsed, over all its connections."""

    def __init__(self, page: Any) -> None:
        self.sent: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []
        page.on("websocket", self._opened)

    def _opened(self, socket: Any) -> None:
        socket.on("framesent", lambda payload: self.sent.append(json.loads(payload)))
        socket.on("framereceived", lambda payload: self.received.append(json.loads(payload)))

    def messages(self, topic: str) -> list[dict[str, Any]]:
        return [f for f in self.received if f.get("op") == "message" and f["topic"] == topic]

    def subscribes(self, topic: str) -> list[dict[str, Any]]:
        return [f for f in self.sent if f.get("op") == "subscribe" and f["topic"] == topic]

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        [answer] = [
            f for f in self.received if f.get("op") in ("ok", "error") and f["id"] == request["id"]
        ]
        return answer


def shown(page: Any, topic: str) -> list[dict[str, Any]]:
    """The demo page's message items for ``topic``, oldest first."""
    items = page.locator(f"#messages li[data-topic='{topic}']")
    rows = items.evaluate_all(
        """items => items.map(item => ({
          id: item.dataset.id, offset: item.dataset.offset, epoch: item.dataset.epoch,
          data: item.querySelector(".data").textContent}))"""
    )
    rows.reverse()  # the page lists the newest first
    return rows


def subscribe_on_demo(page: Any, topic: str) -> Any:
    """Subscribe the demo page to ``topic`` with its form; return its status item."""
    page.fill("#subscribe-topic", topic)
    page.click("#subscribe-button")
    page.wait_for_selector(f"#events li:has-text('subscribed to {topic} at offset')")
    status = page.locator(f"#recovery li[data-topic='{topic}']")
    status.wait_for()
    return status


def disconnect_demo_user(env: Env) -> None:
    """Close the demo user's sessions from the backend (4001), leaving its tickets valid."""
    status, _, answer = env.server.api(
        "POST", "/v1/disconnect", {"user": "demo", "revoke_tickets": False}
    )
    assert status == 202, (status, answer)


def hold_reconnect_until(page: Any, action: Callable[[], object]) -> None:
    """Run ``action`` when the page next asks /dev/ticket, before the request goes on.

    So whatever ``action`` publishes is published while the page has no connection.
    """
    done: list[bool] = []

    def hold(route: Any) -> None:
        if not done:
            done.append(True)
            action()
        route.continue_()

    page.route("**/dev/ticket", hold)


BLANK_PAGE = "/recovery-test-page"


def blank_page(page: Any, env: Env) -> None:
    """An empty page on the server's origin (served by Playwright, not by the server).

    Chromium's Local Network Access checks block a real WebSocket to localhost
    from such a page: it is for the fake WebSocket only.
    """
    page.route(
        env.origin + BLANK_PAGE,
        lambda route: route.fulfill(
            status=200, content_type="text/html", body="<!doctype html><title>test</title>"
        ),
    )
    page.goto(env.origin + BLANK_PAGE)


#: The start of an async function for page.evaluate: within(promise, what) fails after 5 s.
JS_WITHIN = """async () => {
  const within = (promise, what, ms = 5000) => Promise.race([promise, new Promise((_, reject) =>
    setTimeout(() => reject(new Error("timed out waiting for " + what)), ms))]);
"""


# -- against the real server ---------------------------------------------------------


def test_the_page_resumes_after_a_cut_and_shows_every_message_once_in_order(
    page: Any, env: Env
) -> None:
    """Cut by /v1/disconnect while messages are published: the page resumes ``since``
    its last offset, is told ``recovered: true``, and shows each message once, in order.

    The page also holds the overlapping pattern demo.>, as the demo page always does.
    """
    topic = "demo.recovery"
    frames = Frames(page)
    open_demo(page, env)
    status = subscribe_on_demo(page, topic)
    assert status.get_attribute("data-status") == "live"
    assert status.text_content() == f"{topic}: live (at offset 0)"
    published: list[str] = []

    def publish(count: int) -> None:
        for _ in range(count):
            published.append(env.publish(topic, {"n": len(published)}))

    publish(3)
    message_item(page, published[-1])
    hold_reconnect_until(page, lambda: publish(2))
    disconnect_demo_user(env)
    publish(3)
    page.wait_for_selector(f"#recovery li[data-topic='{topic}'][data-status=recovered]")
    publish(3)
    message_item(page, published[-1])

    # The server: asked to resume after offset 3 with 5 messages published meanwhile,
    # it said recovered and sent each offset exactly once over the two connections.
    first, resume = frames.subscribes(topic)
    assert "since" not in first
    epoch = frames.answer(first)["epoch"]
    assert resume["since"] == {"offset": 3, "epoch": epoch}
    assert frames.answer(resume) == {
        "op": "ok",
        "id": resume["id"],
        "recovered": True,
        "offset": 8,
        "epoch": epoch,
    }
    received = frames.messages(topic)
    assert [f["offset"] for f in received] == list(range(1, 12))
    assert [f["id"] for f in received] == published
    # The page: every message once, in order, with its offset.
    rows = shown(page, topic)
    assert [row["id"] for row in rows] == published
    assert [row["offset"] for row in rows] == [str(n) for n in range(1, 12)]
    assert [json.loads(row["data"]) for row in rows] == [{"n": n} for n in range(11)]
    assert {row["epoch"] for row in rows} == {epoch}
    assert status.text_content() == f"{topic}: recovered (at offset 8)"
    assert page.locator("#events li:has-text('every missed message is sent again')").count() == 1
    assert page.errors == []


def test_subscribe_resolves_with_the_position_and_messages_carry_offsets(
    page: Any, env: Env
) -> None:
    """securepub.js on a real server: subscribe() resolves with {offset, epoch, recovered}
    (all undefined on a pattern), messages carry offset and epoch, and a resume after a
    cut calls onRecover(topic, {recovered: true, offset, epoch}) once.

    On /demo, not a blank page: Chromium's Local Network Access checks block a
    WebSocket to localhost from a page Playwright serves itself.
    """
    page.goto(env.origin + "/demo")
    page.wait_for_selector("#state[data-state=open]")
    result = page.evaluate(
        JS_WITHIN
        + """
        const { connect } = await import("/static/securepub.js");
        const state = { messages: [], recoveries: [], errors: [], waiters: [] };
        state.count = (n) => within(new Promise((resolve) => {
          state.waiters.push([n, resolve]);
          if (state.messages.length >= n) resolve();
        }), n + " messages");
        state.within = within;
        let recovered;
        state.recovered = new Promise((resolve) => { recovered = resolve; });
        state.client = connect({
          getTicket: async () => (await fetch("/dev/ticket", {
            method: "POST", headers: {"Content-Type": "application/json"}, body: "{}"})).json(),
          onMessage: (m) => {
            state.messages.push(m);
            for (const [n, wake] of state.waiters) if (state.messages.length >= n) wake();
          },
          onRecover: (topic, outcome) => { state.recoveries.push([topic, outcome]); recovered(); },
          onError: (e) => state.errors.push(e.code),
        });
        window.recoveryTest = state;
        const exact = await within(state.client.subscribe("demo.position"), "subscribe");
        const pattern = await within(state.client.subscribe("demo.position-pattern.*"), "pattern");
        await within(state.client.publish("demo.position", {n: 1}), "publish 1");
        await within(state.client.publish("demo.position", {n: 2}), "publish 2");
        await state.count(2);
        return {exact, patternKeys: Object.keys(pattern),
                patternDefined: Object.values(pattern).filter((v) => v !== undefined)};
    }"""
    )
    assert result["exact"]["offset"] == 0
    assert isinstance(result["exact"]["epoch"], str) and result["exact"]["epoch"]
    assert result["exact"]["recovered"] is None
    assert sorted(result["patternKeys"]) == ["epoch", "offset", "recovered"]
    assert result["patternDefined"] == []
    epoch = result["exact"]["epoch"]
    hold_reconnect_until(page, lambda: env.publish("demo.position", {"n": 3}))
    disconnect_demo_user(env)
    outcome = page.evaluate(
        """async () => {
        const state = window.recoveryTest;
        await state.within(state.recovered, "onRecover");
        await state.count(3);
        const again = await state.within(state.client.subscribe("demo.position"), "again");
        await state.within(state.client.publish("demo.position", {n: 4}), "publish 4");
        await state.count(4);
        state.client.close();
        return {recoveries: state.recoveries, messages: state.messages, again,
                errors: state.errors};
    }"""
    )
    assert outcome["recoveries"] == [
        ["demo.position", {"recovered": True, "offset": 3, "epoch": epoch}]
    ]
    messages = outcome["messages"]
    assert [m["offset"] for m in messages] == [1, 2, 3, 4]
    assert [m["data"] for m in messages] == [{"n": n} for n in (1, 2, 3, 4)]
    assert {m["epoch"] for m in messages} == {epoch}
    assert set(messages[0]) == {"topic", "id", "ts", "data", "offset", "epoch"}
    # Already subscribed: resolved at once with the last offset handed over.
    assert outcome["again"] == {"offset": 3, "epoch": epoch, "recovered": None}
    assert outcome["errors"] == []


# -- against a fake WebSocket ----------------------------------------------------------

#: Replaces window.WebSocket with a fake whose "server" side the test drives.
HARNESS = (
    JS_WITHIN
    + """
  const sockets = [];
  let socketWaiters = [];
  class FakeSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.protocol = "securepub.v1";
      this.frames = [];
      this.frameWaiters = [];
      this.onmessage = null;
      this.onclose = null;
      sockets.push(this);
      const waiters = socketWaiters;
      socketWaiters = [];
      for (const wake of waiters) wake();
    }
    send(text) {
      const frame = JSON.parse(text);
      const waiter = this.frameWaiters.shift();
      if (waiter) waiter(frame);
      else this.frames.push(frame);
    }
    close() {}
    // The fake server's side.
    next(what = "a frame from the client") {
      if (this.frames.length) return Promise.resolve(this.frames.shift());
      return within(new Promise((resolve) => this.frameWaiters.push(resolve)), what);
    }
    unread() { return this.frames.length; }
    deliver(frame) { this.onmessage({ data: JSON.stringify(frame) }); }
    welcome() { this.deliver({ op: "welcome", session: "s" + sockets.indexOf(this), user: "u" }); }
    drop(code = 1006) { this.onclose({ code, reason: "" }); }
  }
  window.WebSocket = FakeSocket;
  const securepub = await import("/static/securepub.js");
  let serial = 0;
  window.fake = {
    within,
    async socket(index) {
      while (sockets.length <= index) {
        await within(new Promise((resolve) => socketWaiters.push(resolve)), "connection " + index);
      }
      return sockets[index];
    },
    message(topic, offset, epoch, data = null) {
      return { op: "message", topic, id: "m" + (++serial), ts: 1.5, data, offset, epoch };
    },
    client(options = {}) {
      const log = [];
      const client = securepub.connect({
        url: "wss://fake.invalid/ws",
        getTicket: async () => "fake-ticket",
        initialDelay: 20,
        maxDelay: 40,
        onMessage: (m) => log.push(["message", m.topic, m.offset ?? null, m.epoch ?? null]),
        onRecover: (topic, outcome) => log.push(["recover", topic, outcome]),
        onUnsubscribed: (topic, reason) => log.push(["unsubscribed", topic, reason]),
        onError: (e) => log.push(["error", e.code]),
        ...options,
      });
      return { client, log };
    },
    async outcome(promise) {
      try { return { resolved: await promise }; }
      catch (e) { return { rejected: e.code }; }
    },
  };
}"""
)


def fake_server(page: Any, env: Env) -> None:
    """Open a blank page on the server's origin and install the fake WebSocket there."""
    blank_page(page, env)
    page.evaluate(HARNESS)


def test_a_reconnect_resumes_exact_topics_since_their_last_offset(page: Any, env: Env) -> None:
    """After a reconnect, exact topics with a position are subscribed again with ``since``
    (before patterns, which get a plain subscribe); onRecover reports what the ok said,
    repeats are dropped, and subscribe() resolves with the position."""
    fake_server(page, env)
    result = page.evaluate(
        """async () => {
        const { client, log } = fake.client();
        const pattern = client.subscribe("demo.>");
        const exact = client.subscribe("demo.a");
        const s0 = await fake.socket(0);
        s0.welcome();
        const [first0, first1] = [await s0.next(), await s0.next()];
        s0.deliver({ op: "ok", id: first0.id });
        s0.deliver({ op: "ok", id: first1.id, offset: 5, epoch: "E1" });
        const subscribed = {
          pattern: await fake.within(pattern, "pattern"),
          exact: await fake.within(exact, "exact"),
        };
        s0.deliver(fake.message("demo.a", 6, "E1"));
        s0.deliver(fake.message("demo.a", 7, "E1"));
        s0.deliver(fake.message("demo.a", 7, "E1"));  // a repeat
        s0.deliver(fake.message("demo.b", 1, "E1"));  // through the pattern
        s0.drop(4001);
        const s1 = await fake.socket(1);
        s1.welcome();
        const [resume0, resume1] = [await s1.next(), await s1.next()];
        s1.deliver({ op: "ok", id: resume0.id, recovered: true, offset: 9, epoch: "E1" });
        s1.deliver({ op: "ok", id: resume1.id });
        s1.deliver(fake.message("demo.a", 8, "E1"));
        s1.deliver(fake.message("demo.a", 9, "E1"));
        const again = await fake.within(client.subscribe("demo.a"), "again");
        s1.drop(1006);
        const s2 = await fake.socket(2);
        s2.welcome();
        const [lost0] = [await s2.next(), await s2.next()];
        s2.deliver({ op: "ok", id: lost0.id, recovered: false, offset: 2, epoch: "E2" });
        s2.deliver(fake.message("demo.a", 2, "E2"));  // already covered by the ok's position
        s2.deliver(fake.message("demo.a", 3, "E2"));
        client.close();
        return { first: [first0, first1], resume: [resume0, resume1], lost0, subscribed,
                 again, log };
    }"""
    )
    assert [f["topic"] for f in result["first"]] == ["demo.>", "demo.a"]
    assert all("since" not in f for f in result["first"])
    exact = result["subscribed"]["exact"]
    assert exact == {"offset": 5, "epoch": "E1", "recovered": None}
    assert result["subscribed"]["pattern"] == {"offset": None, "epoch": None, "recovered": None}
    # The resume goes first, then the pattern, plainly.
    resume, plain = result["resume"]
    assert resume["topic"] == "demo.a" and resume["since"] == {"offset": 7, "epoch": "E1"}
    assert plain["topic"] == "demo.>" and "since" not in plain
    assert result["lost0"]["since"] == {"offset": 9, "epoch": "E1"}
    assert result["again"] == {"offset": 9, "epoch": "E1", "recovered": None}
    assert result["log"] == [
        ["message", "demo.a", 6, "E1"],
        ["message", "demo.a", 7, "E1"],
        ["message", "demo.b", 1, "E1"],
        ["recover", "demo.a", {"recovered": True, "offset": 9, "epoch": "E1"}],
        ["message", "demo.a", 8, "E1"],
        ["message", "demo.a", 9, "E1"],
        ["recover", "demo.a", {"recovered": False, "offset": 2, "epoch": "E2"}],
        ["message", "demo.a", 3, "E2"],
    ]


def test_insufficient_state_resubscribes_since_the_last_offset(page: Any, env: Env) -> None:
    """``unsubscribed`` with ``insufficient_state``: subscribed again ``since`` the last
    offset, outcome through onRecover; one arriving before the ok makes that ok stale (asked
    again); what an overlapping pattern delivered meanwhile is not handed over twice."""
    fake_server(page, env)
    result = page.evaluate(
        """async () => {
        const { client, log } = fake.client();
        const subscribed = client.subscribe("demo.a");
        const s0 = await fake.socket(0);
        s0.welcome();
        const first = await s0.next();
        s0.deliver({ op: "ok", id: first.id, offset: 2, epoch: "E" });
        await fake.within(subscribed, "subscribe");
        s0.deliver(fake.message("demo.a", 3, "E"));
        s0.deliver({ op: "unsubscribed", topic: "demo.a", reason: "insufficient_state" });
        const resume = await s0.next();
        s0.deliver(fake.message("demo.a", 4, "E"));  // through a pattern, before the ok
        s0.deliver({ op: "ok", id: resume.id, recovered: true, offset: 5, epoch: "E" });
        s0.deliver(fake.message("demo.a", 4, "E"));  // the resume sends it again
        s0.deliver(fake.message("demo.a", 5, "E"));
        s0.deliver({ op: "unsubscribed", topic: "demo.a", reason: "insufficient_state" });
        const stale = await s0.next();
        s0.deliver({ op: "unsubscribed", topic: "demo.a", reason: "insufficient_state" });
        s0.deliver({ op: "ok", id: stale.id, recovered: true, offset: 5, epoch: "E" });
        const asked = await s0.next();
        s0.deliver({ op: "ok", id: asked.id, recovered: false, offset: 9, epoch: "E" });
        s0.deliver(fake.message("demo.a", 10, "E"));
        client.close();
        return { resume, stale, asked, log };
    }"""
    )
    assert result["resume"]["since"] == {"offset": 3, "epoch": "E"}
    assert result["stale"]["since"] == {"offset": 5, "epoch": "E"}
    assert result["asked"]["since"] == {"offset": 5, "epoch": "E"}
    assert result["log"] == [
        ["message", "demo.a", 3, "E"],
        ["message", "demo.a", 4, "E"],
        ["recover", "demo.a", {"recovered": True, "offset": 5, "epoch": "E"}],
        ["message", "demo.a", 5, "E"],
        ["recover", "demo.a", {"recovered": False, "offset": 9, "epoch": "E"}],
        ["message", "demo.a", 10, "E"],
    ]


def test_a_forbidden_unsubscribed_forgets_the_topic_and_tells_the_application(
    page: Any, env: Env
) -> None:
    """``unsubscribed`` with ``forbidden`` (or any other reason): the topic is dropped (not
    subscribed again after a reconnect), a waiting subscribe() rejects with that code, and
    onError and onUnsubscribed hear of it."""
    fake_server(page, env)
    result = page.evaluate(
        """async () => {
        const { client, log } = fake.client();
        const active = client.subscribe("demo.a");
        const waiting = fake.outcome(client.subscribe("demo.b"));
        client.subscribe("demo.c");
        const s0 = await fake.socket(0);
        s0.welcome();
        const [a, b, c] = [await s0.next(), await s0.next(), await s0.next()];
        s0.deliver({ op: "ok", id: a.id, offset: 0, epoch: "E" });
        s0.deliver({ op: "ok", id: c.id });
        await fake.within(active, "demo.a");
        s0.deliver({ op: "unsubscribed", topic: "demo.a", reason: "forbidden" });
        s0.deliver({ op: "unsubscribed", topic: "demo.b", reason: "revoked" });
        s0.deliver({ op: "ok", id: b.id });  // too late: ignored
        s0.deliver({ op: "unsubscribed", topic: "demo.zz", reason: "forbidden" });  // not ours
        const b_outcome = await fake.within(waiting, "demo.b");
        s0.drop(1006);
        const s1 = await fake.socket(1);
        s1.welcome();
        const resubscribed = [await s1.next()];
        const extra = s1.unread();
        client.close();
        return { b_outcome, resubscribed, extra, log };
    }"""
    )
    assert result["b_outcome"] == {"rejected": "revoked"}
    assert [f["topic"] for f in result["resubscribed"]] == ["demo.c"]
    assert result["extra"] == 0
    assert result["log"] == [
        ["error", "forbidden"],
        ["unsubscribed", "demo.a", "forbidden"],
        ["error", "revoked"],
        ["unsubscribed", "demo.b", "revoked"],
    ]


def test_a_subscribe_refused_as_unavailable_is_retried_with_backoff(page: Any, env: Env) -> None:
    """``unavailable`` (the cluster engine is down): the subscribe is sent again after a
    jittered, growing delay, keeping its ``since``; the promise waits for the final ok."""
    fake_server(page, env)
    result = page.evaluate(
        """async () => {
        const { client, log } = fake.client({ initialDelay: 100, maxDelay: 1000 });
        const unavailable = (frame) =>
          ({ op: "error", id: frame.id, code: "unavailable", message: "engine down" });
        const subscribed = fake.outcome(client.subscribe("demo.a"));
        const s0 = await fake.socket(0);
        s0.welcome();
        const f1 = await s0.next();
        const t0 = performance.now();
        s0.deliver(unavailable(f1));
        const sentAtOnce = s0.unread();
        const f2 = await s0.next();
        const t1 = performance.now();
        s0.deliver(unavailable(f2));
        const f3 = await s0.next();
        const t2 = performance.now();
        s0.deliver({ op: "ok", id: f3.id, offset: 4, epoch: "E" });
        const first = await fake.within(subscribed, "subscribe");
        s0.drop(1006);
        const s1 = await fake.socket(1);
        s1.welcome();
        const r1 = await s1.next();
        s1.deliver(unavailable(r1));
        const r2 = await s1.next();
        s1.deliver({ op: "ok", id: r2.id, recovered: true, offset: 4, epoch: "E" });
        client.close();
        return { frames: [f1, f2, f3].map((f) => f.topic), sentAtOnce, gaps: [t1 - t0, t2 - t1],
                 first, since: [r1.since, r2.since], log };
    }"""
    )
    assert result["frames"] == ["demo.a"] * 3
    assert result["sentAtOnce"] == 0
    first_gap, second_gap = result["gaps"]
    # Half to all of 100 ms, then of 200 ms (timers fire late, never early).
    assert 45 <= first_gap and 95 <= second_gap, result["gaps"]
    assert result["first"] == {"resolved": {"offset": 4, "epoch": "E", "recovered": None}}
    assert result["since"] == [{"offset": 4, "epoch": "E"}] * 2
    assert result["log"] == [
        ["error", "unavailable"],
        ["error", "unavailable"],
        ["error", "unavailable"],
        ["recover", "demo.a", {"recovered": True, "offset": 4, "epoch": "E"}],
    ]


def test_an_epoch_change_or_a_refused_since_means_refetch(page: Any, env: Env) -> None:
    """A live message in another epoch than the last one seen calls onRecover with
    recovered false (before the message); a ``since`` refused as bad_request (the topic
    keeps no history any more) falls back to a plain subscribe, recovered false."""
    fake_server(page, env)
    result = page.evaluate(
        """async () => {
        const { client, log } = fake.client();
        client.subscribe("demo.a");
        const s0 = await fake.socket(0);
        s0.welcome();
        const f = await s0.next();
        s0.deliver({ op: "ok", id: f.id, offset: 4, epoch: "E1" });
        s0.deliver(fake.message("demo.a", 5, "E1"));
        s0.deliver(fake.message("demo.a", 1, "E2"));
        s0.deliver(fake.message("demo.a", 2, "E2"));
        s0.drop(1006);
        const s1 = await fake.socket(1);
        s1.welcome();
        const resume = await s1.next();
        s1.deliver({ op: "error", id: resume.id, code: "bad_request", message: "no history" });
        const plain = await s1.next();
        s1.deliver({ op: "ok", id: plain.id });
        s1.deliver(fake.message("demo.a", null, null));
        client.close();
        return { resume, plain, log };
    }"""
    )
    assert result["resume"]["since"] == {"offset": 2, "epoch": "E2"}
    assert "since" not in result["plain"]
    assert result["log"] == [
        ["message", "demo.a", 5, "E1"],
        ["recover", "demo.a", {"recovered": False, "offset": 1, "epoch": "E2"}],
        ["message", "demo.a", 1, "E2"],
        ["message", "demo.a", 2, "E2"],
        ["recover", "demo.a", {"recovered": False, "offset": None, "epoch": None}],
        ["message", "demo.a", None, None],
    ]


# -- last: replaces the module's server ---------------------------------------------


def test_after_a_node_restart_the_page_is_told_to_refetch(page: Any, env: Env) -> None:
    """The embedded engine's epoch changes on restart: the resume ``since`` the old epoch
    is answered ``recovered: false`` and the page shows "must refetch".

    Runs last in this module: it replaces the module's server.
    """
    topic = "demo.restart"
    frames = Frames(page)
    open_demo(page, env)
    subscribe_on_demo(page, topic)
    message_item(page, env.publish(topic, {"n": 1}))
    message_item(page, env.publish(topic, {"n": 2}))
    env.restart()
    status = page.locator(f"#recovery li[data-topic='{topic}'][data-status='must refetch']")
    status.wait_for(timeout=RESTART_TIMEOUT_MS)
    first, *resumes = frames.subscribes(topic)
    old_epoch = frames.answer(first)["epoch"]
    # Tries while the node was down were lost with their connections; one was answered.
    answered = [r for r in resumes if any(f.get("id") == r["id"] for f in frames.received)]
    assert answered and all(r["since"] == {"offset": 2, "epoch": old_epoch} for r in resumes)
    answer = frames.answer(answered[-1])
    assert answer["recovered"] is False and answer["epoch"] != old_epoch
    assert answer["offset"] == 0
    assert status.text_content() == f"{topic}: must refetch (at offset 0)"
    # Live again, in the new epoch, from offset 1.
    item = message_item(page, env.publish(topic, {"n": 3}))
    assert item.get_attribute("data-offset") == "1"
    assert item.get_attribute("data-epoch") == answer["epoch"]
    assert page.errors == []
