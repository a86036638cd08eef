"""The demo page and securepub.js in real headless Chromium, against a real ``--dev`` server.

Chromium trusts exactly the server's certificate (by its SPKI hash), nothing
else: certificate errors are not ignored wholesale. The tests skip when
Playwright or Chromium is missing, unless ``SECUREPUB_REQUIRE_BROWSER=1``
(CI), in which case they fail.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from securepub.clients.blocking import Publisher
from tests.server import Server, recv_json, request_json

REQUIRE_BROWSER = os.environ.get("SECUREPUB_REQUIRE_BROWSER") == "1"
CHROMIUM = (
    os.environ.get("SECUREPUB_CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("chromium-browser")
    or "/usr/bin/chromium"
)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Per action; a healthy run needs well under a second for each.
TIMEOUT_MS = 10_000


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    if not os.path.exists(CHROMIUM):
        return f"chromium is not installed ({CHROMIUM})"
    return None


def spki_hash(cert_path: str) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of the first certificate in a PEM file."""
    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


class Env:
    """The module's server (replaced when a test restarts it) and a Python publisher."""

    def __init__(self, server: Server) -> None:
        self.server = server

    @property
    def origin(self) -> str:
        return f"https://localhost:{self.server.port}"

    def publisher(self) -> Publisher:
        return Publisher(self.server.url, self.server.api_key, ca=self.server.ca_path)

    def publish(self, topic: str, data: Any) -> str:
        with self.publisher() as publisher:
            return publisher.publish(topic, data)

    def restart(self) -> None:
        """Stop the server and start it again on the same port, with the same certificate."""
        old = self.server
        old.stop()
        self.server = Server(dev=True, directory=old.directory, port=old.port).start()


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    missing = _missing()
    if missing is not None:
        if REQUIRE_BROWSER:
            pytest.fail(f"{missing}, and SECUREPUB_REQUIRE_BROWSER=1")
        pytest.skip(missing)
    server = Server(dev=True).start()
    environment = Env(server)
    try:
        yield environment
    finally:
        environment.server.stop()
        server.cleanup()


@pytest.fixture(scope="module")
def browser(env: Env) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    cert = os.path.join(env.server.directory, "certs", "server.pem")
    args = [*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={spki_hash(cert)}"]
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh context (no shared storage) and page; fails the test on any dialog."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    dialogs: list[str] = []

    def on_dialog(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.errors = []  # type: ignore[attr-defined]
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    yield page
    context.close()
    assert dialogs == [], dialogs


def open_demo(page: Any, env: Env) -> None:
    page.goto(env.origin + "/demo")
    page.wait_for_selector("#state[data-state=open]")
    page.wait_for_selector("#events li:has-text('subscribed to demo.>')")


def message_item(page: Any, message_id: str) -> Any:
    locator = page.locator(f"#messages li[data-id='{message_id}']")
    locator.wait_for()
    return locator


def test_the_page_connects_with_a_ticket_and_receives_from_python(page: Any, env: Env) -> None:
    """The page gets a ticket from /dev/ticket, subscribes to demo.> and shows a backend message."""
    tickets = []
    page.on(
        "request",
        lambda r: tickets.append(r.method) if r.url.endswith("/dev/ticket") else None,
    )
    open_demo(page, env)
    assert tickets == ["POST"]
    assert "as demo" in page.text_content("#session")
    message_id = env.publish("demo.hello", {"text": "hi from python", "n": [1, 2]})
    item = message_item(page, message_id)
    assert item.get_attribute("data-topic") == "demo.hello"
    assert json.loads(item.locator(".data").text_content()) == {
        "text": "hi from python",
        "n": [1, 2],
    }
    handshake = env.server.log_lines("handshake accepted", "user='demo'")
    assert handshake and f"origin='{env.origin}'" in handshake[-1]
    assert page.errors == []


def test_the_page_publishes_a_message_itself(page: Any, env: Env) -> None:
    """The publish form sends over the page's WebSocket; a Python subscriber receives it."""
    conn = env.server.session(subscribe=["demo.>"])
    try:
        assert request_json(conn, {"op": "subscribe", "id": 1, "topic": "demo.>"})["op"] == "ok"
        open_demo(page, env)
        page.fill("#publish-topic", "demo.from-page")
        page.fill("#publish-data", '{"text": "hello from the browser", "ok": true}')
        page.click("#publish-button")
        # A selector wait, not wait_for_function: the page's CSP forbids eval.
        page.wait_for_selector("#publish-result:not(:empty)")
        assert page.text_content("#publish-result") == "published to demo.from-page"
        frame = recv_json(conn)
        assert frame["topic"] == "demo.from-page"
        assert frame["data"] == {"text": "hello from the browser", "ok": True}
        # The page is subscribed to demo.> too, so it shows its own message.
        mine = message_item(page, frame["id"])
        assert mine.get_attribute("data-topic") == "demo.from-page"
    finally:
        conn.close()


def test_markup_in_a_message_is_shown_as_text_and_runs_nothing(page: Any, env: Env) -> None:
    """Data holding <img onerror> or <script> is shown literally: no element made, no code run."""
    open_demo(page, env)
    payloads = [
        {"text": '<img src=x onerror="window.__pwned=1;alert(1)">'},
        "<script>window.__pwned=2</script><b>bold</b>",
        {"<svg onload=window.__pwned=3>": "javascript:window.__pwned=4"},
    ]
    for data in payloads:
        item = message_item(page, env.publish("demo.xss", data))
        assert item.locator(".data").text_content() == json.dumps(data, separators=(",", ":"))
    page.wait_for_timeout(300)  # give an image error handler every chance to fire
    for tag in ("img", "script", "svg", "b"):
        assert page.locator(f"#messages {tag}").count() == 0, tag
    assert page.evaluate("window.__pwned") is None
    assert page.errors == []


def test_the_library_resolves_on_ok_and_rejects_on_error(page: Any, env: Env) -> None:
    """securepub.js used directly: promises follow ok/error; onMessage gets parsed data."""
    page.goto(env.origin + "/demo")
    result = page.evaluate(
        """async () => {
        const { connect, SecurePubError } = await import("/static/securepub.js");
        const received = [];
        const states = [];
        let gotMessage;
        const message = new Promise((resolve) => { gotMessage = resolve; });
        const client = connect({
          getTicket: async () => (await fetch("/dev/ticket", {
            method: "POST", headers: {"Content-Type": "application/json"}, body: "{}"})).json(),
          onMessage: (m) => { received.push(m); gotMessage(); },
          onStateChange: (s) => states.push(s),
        });
        const outcome = async (promise) => {
          try { await promise; return "ok"; }
          catch (e) { return (e instanceof SecurePubError ? "" : "?") + e.code; }
        };
        const subscribed = await outcome(client.subscribe("demo.lib"));
        const published = await outcome(client.publish("demo.lib", {"x": [1, "<b>"]}));
        const timeout = new Promise((resolve) => setTimeout(resolve, 5000));
        await Promise.race([message, timeout]);
        const forbidden = await outcome(client.publish("elsewhere.x", 1));
        const invalid = await outcome(client.subscribe("demo..x"));
        const outside = await outcome(client.subscribe("other.>"));
        const unsubscribed = await outcome(client.unsubscribe("demo.lib"));
        client.close();
        const afterClose = await outcome(client.publish("demo.lib", 1));
        return {subscribed, published, forbidden, invalid, outside, unsubscribed, afterClose,
                states, received, state: client.state};
    }"""
    )
    assert result["subscribed"] == "ok"
    assert result["published"] == "ok"
    assert result["forbidden"] == "forbidden"
    assert result["invalid"] == "invalid_topic"
    assert result["outside"] == "forbidden"
    assert result["unsubscribed"] == "ok"
    assert result["afterClose"] == "closed"
    assert result["states"][:2] == ["connecting", "open"]
    [message] = result["received"]
    assert message["topic"] == "demo.lib"
    assert message["data"] == {"x": [1, "<b>"]}
    # demo.> keeps history under --dev: the message has its place in the topic's order.
    assert set(message) == {"topic", "id", "ts", "data", "offset", "epoch"}
    assert message["offset"] == 1 and isinstance(message["epoch"], str)


def test_another_site_cannot_get_a_demo_ticket(page: Any, env: Env) -> None:
    """A page from another origin can neither read a demo ticket nor make one be issued."""
    evil = "https://evil.example"
    page.route(
        evil + "/",
        lambda route: route.fulfill(
            status=200, content_type="text/html", body="<!doctype html><title>evil</title>"
        ),
    )
    issued_before = len(env.server.log_lines("demo ticket issued"))
    page.goto(evil + "/")
    outcome = page.evaluate(
        """async (target) => {
        const results = {};
        try {
          const r = await fetch(target, {method: "POST",
            headers: {"Content-Type": "application/json"}, body: "{}"});
          results.cors = "read " + r.status;
        } catch (e) { results.cors = "blocked"; }
        try {
          await fetch(target, {method: "POST", mode: "no-cors", body: "{}"});
          results.simple = "sent";
        } catch (e) { results.simple = "blocked"; }
        return results;
    }""",
        env.origin + "/dev/ticket",
    )
    assert outcome["cors"] == "blocked"
    # Whether or not the simple (no-cors) POST reached the server (Chromium's
    # Private Network Access may stop it first), the server issued nothing.
    page.wait_for_timeout(300)
    assert len(env.server.log_lines("demo ticket issued")) == issued_before
    refused = env.server.log_lines("demo ticket refused")
    assert all("evil.example" in line for line in refused)


def test_after_the_server_drops_the_connection_the_page_reconnects(page: Any, env: Env) -> None:
    """Server restart: the page backs off, fetches a new ticket, resubscribes and receives again.

    Runs last in this module: it replaces the module's server.
    """
    tickets: list[str] = []

    def on_response(response: Any) -> None:
        if response.url.endswith("/dev/ticket") and response.status == 201:
            tickets.append(response.json()["ticket"])

    page.on("response", on_response)
    open_demo(page, env)
    first = env.publish("demo.before", 1)
    message_item(page, first)
    env.restart()
    page.wait_for_selector("#events li:has-text('reconnecting in')")
    page.wait_for_selector("#state[data-state=open]", timeout=30_000)
    # Resubscribed without anyone clicking: a message published now arrives.
    second = env.publish("demo.after", 2)
    item = message_item(page, second)
    assert item.get_attribute("data-topic") == "demo.after"
    assert len(tickets) >= 2 and len(set(tickets)) == len(tickets)
    assert page.errors == []
