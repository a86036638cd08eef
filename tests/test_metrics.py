"""Metrics: counted from security events and counters, rendered for Prometheus."""

from __future__ import annotations

from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from securepub.metrics import Metrics


class MetricsTests(SynchronousTestCase):
    def test_counts_security_events(self) -> None:
        """Handshakes by outcome and other security events are counted from the log."""
        metrics = Metrics()
        publisher = LogPublisher(metrics)
        log = Logger(observer=publisher)
        for _ in range(2):
            log.info("x", securepub_event="handshake", outcome="refused", reason="ticket_expired")
        log.info("x", securepub_event="handshake", outcome="accepted", reason="ticket_redeemed")
        log.info("x", securepub_event="slow_consumer")
        log.info("not counted")
        metrics.errors["forbidden"] += 3
        metrics.messages_in += 5
        metrics.messages_out += 50
        text = metrics.render({"open_connections": lambda: 7, "redis_up": lambda: 1})
        for line in (
            'securepub_handshakes_total{outcome="refused",reason="ticket_expired"} 2',
            'securepub_handshakes_total{outcome="accepted",reason="ticket_redeemed"} 1',
            'securepub_security_events_total{event="slow_consumer"} 1',
            'securepub_errors_total{code="forbidden"} 3',
            "securepub_messages_in_total 5",
            "securepub_messages_out_total 50",
            "securepub_open_connections 7",
            "# TYPE securepub_redis_up gauge",
        ):
            self.assertIn(line + "\n", text)
        self.assertTrue(text.endswith("\n"))

    def test_label_escaping(self) -> None:
        """Label values are escaped, so no value can forge another line."""
        metrics = Metrics()
        metrics.errors['x"} 1\nfake'] += 1
        text = metrics.render({})
        self.assertNotIn("\nfake", text.replace('\\"', ""))
        self.assertIn('code="x\\"} 1', text)
