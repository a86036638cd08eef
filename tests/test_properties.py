"""Property tests: no frame or API body, however malformed, escapes the server's
error handling or touches another client's connection."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from securepub.core.limits import Limits
from tests import test_api, test_protocol

SPEC_CODES = {
    "bad_request",
    "invalid_topic",
    "forbidden",
    "invalid_payload",
    "limit_exceeded",
    "rate_limited",
    "unavailable",
}
#: Close codes a client may legitimately cause on its own connection.
OWN_CLOSE_CODES = {1002, 1003, 1007, 1008, 1009}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
frames = st.one_of(
    st.text(max_size=200),
    json_values.map(json.dumps),
    st.fixed_dictionaries(
        {},
        optional={
            "op": st.sampled_from(["subscribe", "unsubscribe", "publish", "nope", ""])
            | json_values,
            "id": st.integers() | st.text(max_size=80) | json_values,
            "topic": st.sampled_from(["chat.a", "chat.*", "chat.>", ">", "a..b", ""]) | json_values,
            "data": json_values,
            "extra": json_values,
        },
    ).map(json.dumps),
)


class FrameProperties(SynchronousTestCase):
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(frames, min_size=1, max_size=8), st.booleans())
    def test_frames_never_escape_or_touch_others(self, payloads: list[str], binary: bool) -> None:
        """Any frames: replies are SPEC errors or ok, own closes use documented codes,
        and a bystander connection keeps working."""
        h = test_protocol.Harness(self, limits=Limits(max_errors=5, max_connections_per_ip=10))
        attacker = h.open()
        bystander = h.open()
        bystander.send({"op": "subscribe", "id": 1, "topic": "chat.a"})
        attacker.messages()
        for payload in payloads:
            attacker.send(payload.encode("utf-8"), opcode=2 if binary else 1)
        for reply in attacker.messages():
            if reply["op"] == "error":
                self.assertIn(reply["code"], SPEC_CODES)
            else:
                self.assertIn(reply["op"], ("ok", "message"))
        code = attacker.close_code()
        self.assertTrue(code is None or code in OWN_CLOSE_CODES, code)
        self.assertIsNone(bystander.close_code())
        bystander.messages()
        self.successResultOf(h.factory.broker.publish("chat.a", {"still": "here"}))
        self.assertEqual(bystander.messages()[-1]["data"], {"still": "here"})
        self.assertEqual(self.flushLoggedErrors(), [])


class BodyProperties(SynchronousTestCase):
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.sampled_from(["/v1/tickets", "/v1/publish"]),
        st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode())),
    )
    def test_bodies_get_json_answers(self, path: str, body: bytes) -> None:
        """Any body gets a JSON answer with a SPEC status and code, never a 500."""
        api = test_api.ApiTests("test_healthz")
        api.setUp()
        try:
            response: test_api.Response = api.request("POST", path, body)
        finally:
            api.doCleanups()
        self.assertIn(response.status, (201, 202, 400, 413), response.body)
        answer: Any = response.json()
        if response.status >= 400:
            self.assertIn(answer["error"], SPEC_CODES)
        self.assertNotIn(test_api.KEY.encode(), response.body)
