"""Counters for /metrics, in Prometheus's text format."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping

from twisted.logger import ILogObserver, LogEvent
from zope.interface import implementer


def _escape(value: str) -> str:
    """A label value as Prometheus's text format wants it: \\, \" and \\n escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


@implementer(ILogObserver)
class Metrics:
    """What a node counts. Security decisions are counted from their log
    events (so nothing is counted twice or forgotten); the hot path bumps
    plain integers; gauges are read when /metrics is scraped."""

    def __init__(self) -> None:
        self.handshakes: Counter[tuple[str, str]] = Counter()  # (outcome, reason)
        self.errors: Counter[str] = Counter()  # error replies by code
        self.events: Counter[str] = Counter()  # other security events by name
        self.messages_in = 0  # messages accepted for publishing on this node
        self.messages_out = 0  # copies handed to this node's sessions

    def __call__(self, event: LogEvent) -> None:
        name = event.get("securepub_event")
        if name == "handshake":
            self.handshakes[(str(event.get("outcome")), str(event.get("reason")))] += 1
        elif isinstance(name, str):
            self.events[name] += 1

    def render(self, gauges: Mapping[str, Callable[[], float]]) -> str:
        """The Prometheus text exposition of every counter and gauge."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")

        family("securepub_handshakes_total", "counter", "WebSocket handshakes by outcome.")
        for (outcome, reason), n in sorted(self.handshakes.items()):
            lines.append(
                f"securepub_handshakes_total{_labels((('outcome', outcome), ('reason', reason)))}"
                f" {n}"
            )
        family("securepub_errors_total", "counter", "Error replies sent, by code.")
        for code, n in sorted(self.errors.items()):
            lines.append(f"securepub_errors_total{_labels((('code', code),))} {n}")
        family("securepub_security_events_total", "counter", "Other security events.")
        for name, n in sorted(self.events.items()):
            lines.append(f"securepub_security_events_total{_labels((('event', name),))} {n}")
        family("securepub_messages_in_total", "counter", "Messages accepted for publishing.")
        lines.append(f"securepub_messages_in_total {self.messages_in}")
        family("securepub_messages_out_total", "counter", "Message copies sent to sessions.")
        lines.append(f"securepub_messages_out_total {self.messages_out}")
        for name, read in sorted(gauges.items()):
            family(f"securepub_{name}", "gauge", name.replace("_", " ") + ".")
            lines.append(f"securepub_{name} {read():g}")
        return "\n".join(lines) + "\n"
