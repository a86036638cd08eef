"""The audit log: every security decision as one JSON line, rotated by size."""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.logger import ILogObserver, LogEvent
from twisted.python.logfile import LogFile
from zope.interface import implementer

#: Rotate the audit file when it reaches this size; keep this many old files.
DEFAULT_ROTATE_BYTES = 10 * 1024 * 1024
DEFAULT_KEEP_FILES = 10

#: The ``securepub_event`` names that are security decisions; other events
#: (listening, per-request access lines, Redis state) stay out of the audit log.
SECURITY_EVENTS = frozenset(
    {
        "handshake",
        "authorization_refused",
        "ticket_issued",
        "api_auth_refused",
        "too_many_errors",
        "body_too_large",
        "headers_timeout",
        "slow_consumer",
        "cluster_message_dropped",
        "user_disconnected",
        "sessions_revoked",
        "proxy_headers_ignored",
        "reload_refused",
        "session_refresh",
        "session_expired",
    }
)

#: Fields every line has (null when the event does not know them).
CORE_FIELDS = ("peer", "user", "origin", "outcome", "reason")


def audit_record(event: LogEvent) -> dict[str, Any] | None:
    """The JSON object for a securepub security event, or None for other events.

    Only the event's own fields are kept (``log_*`` bookkeeping is dropped),
    and only JSON scalars and lists of them: nothing is turned into text
    that the event did not already hold. Events never carry secrets.
    """
    name = event.get("securepub_event")
    if name not in SECURITY_EVENTS:
        return None
    record: dict[str, Any] = {"time": event.get("log_time"), "event": name}
    for key in CORE_FIELDS:
        record[key] = None
    for key, value in event.items():
        if key.startswith("log_") or key in ("securepub_event", "format", "time", "event"):
            continue
        if isinstance(value, (str, int, float, bool)) or value is None:
            record[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            record[key] = list(value)
    return record


@implementer(ILogObserver)
class AuditLogObserver:
    """Writes `audit_record` lines to a size-rotated file (mode 0600)."""

    def __init__(
        self,
        path: str,
        rotate_bytes: int = DEFAULT_ROTATE_BYTES,
        keep_files: int = DEFAULT_KEEP_FILES,
    ) -> None:
        directory, name = os.path.split(os.path.abspath(path))
        self._file = LogFile(
            name,
            directory,
            rotateLength=rotate_bytes,
            defaultMode=0o600,
            maxRotatedFiles=keep_files,
        )

    def __call__(self, event: LogEvent) -> None:
        record = audit_record(event)
        if record is None:
            return
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str)
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
