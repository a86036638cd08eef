"""The audit log: one JSON line per security event, rotated, secrets never added."""

from __future__ import annotations

import json
import os
import stat
import tempfile

from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from securepub.ops.audit import AuditLogObserver, audit_record


class AuditTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "audit.jsonl")
        self.publisher = LogPublisher()
        self.log = Logger(observer=self.publisher)

    def observe(self, **kwargs: int) -> AuditLogObserver:
        observer = AuditLogObserver(self.path, **kwargs)
        self.publisher.addObserver(observer)
        self.addCleanup(observer.close)
        return observer

    def lines(self, path: str | None = None) -> list[dict[str, object]]:
        with open(path or self.path) as f:
            return [json.loads(line) for line in f]

    def test_security_events_only(self) -> None:
        """Security events become lines with the core fields; other events are left out."""
        self.observe()
        self.log.info("noise {x}", x=1)
        self.log.info("listening", securepub_event="listening", port=1)
        self.log.info(
            "handshake {outcome}",
            securepub_event="handshake",
            outcome="refused",
            reason="ticket_expired",
            peer="203.0.113.7",
            origin="https://a.example",
            user=None,
            status=403,
            user_agent="UA",
        )
        self.log.info(
            "refused",
            securepub_event="api_auth_refused",
            peer="192.0.2.1",
            reason="invalid",
            path="/v1/publish",
        )
        [first, second] = self.lines()
        self.assertEqual(
            {
                k: first[k]
                for k in ("event", "outcome", "reason", "peer", "origin", "user", "status")
            },
            {
                "event": "handshake",
                "outcome": "refused",
                "reason": "ticket_expired",
                "peer": "203.0.113.7",
                "origin": "https://a.example",
                "user": None,
                "status": 403,
            },
        )
        self.assertIsInstance(first["time"], float)
        self.assertEqual(
            (second["event"], second["outcome"], second["user"]), ("api_auth_refused", None, None)
        )
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_rotation_by_size(self) -> None:
        """Past the size limit the file rotates, keeping a bounded number of old files."""
        self.observe(rotate_bytes=2000, keep_files=2)
        for i in range(100):
            self.log.info("x", securepub_event="handshake", outcome="accepted", user=f"u{i}")
        files = sorted(os.listdir(self.dir))
        self.assertEqual(files, ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"])
        self.assertLessEqual(os.path.getsize(self.path), 2200)
        self.assertEqual(self.lines()[-1]["user"], "u99")

    def test_only_plain_values(self) -> None:
        """Objects are not stringified into the log: only JSON scalars and string lists."""
        record = audit_record(
            {
                "securepub_event": "ticket_issued",
                "obj": object(),
                "grants": ["a.*"],
                "log_format": "f",
                "n": 1,
            }
        )
        assert record is not None
        self.assertNotIn("obj", record)
        self.assertNotIn("log_format", record)
        self.assertEqual((record["grants"], record["n"]), (["a.*"], 1))
        self.assertIsNone(audit_record({"log_format": "plain"}))
