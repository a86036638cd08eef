"""Metrics: counted from security events and plain counters, exposed through prometheus_client."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from securepub.ops.metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, parsed by prometheus_client's own parser."""
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode("utf-8")):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class MetricsTests(SynchronousTestCase):
    def test_counts_security_events_and_counters(self) -> None:
        """Handshakes by outcome, other security events, errors and message counts."""
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
        metrics.cluster_messages_received += 4
        metrics.gauge("open_connections", "Open connections.", lambda: 7)
        metrics.gauge("redis_up", "Links up.", lambda: {("a",): 1, ("b",): 0}, labels=("server",))
        found = samples(metrics)
        expected = {
            (
                "securepub_handshakes_total",
                (("outcome", "refused"), ("reason", "ticket_expired")),
            ): 2,
            (
                "securepub_handshakes_total",
                (("outcome", "accepted"), ("reason", "ticket_redeemed")),
            ): 1,
            ("securepub_security_events_total", (("event", "slow_consumer"),)): 1,
            ("securepub_errors_total", (("code", "forbidden"),)): 3,
            ("securepub_messages_in_total", ()): 5,
            ("securepub_messages_out_total", ()): 50,
            ("securepub_cluster_messages_received_total", ()): 4,
            ("securepub_open_connections", ()): 7,
            ("securepub_redis_up", (("server", "a"),)): 1,
            ("securepub_redis_up", (("server", "b"),)): 0,
        }
        for key, value in expected.items():
            self.assertEqual(found.get(key), value, key)

    def test_latency_histograms_are_exposed(self) -> None:
        """The four latency histograms count their observations, with _bucket/_sum/_count."""
        metrics = Metrics()
        metrics.publish_to_write.observe(0.002)
        metrics.handshake_duration.labels("accepted").observe(0.01)
        metrics.ticket_redemption.observe(0.0003)
        metrics.redis_roundtrip.observe(0.0004)
        found = samples(metrics)
        self.assertEqual(found[("securepub_publish_to_write_seconds_count", ())], 1)
        self.assertEqual(
            found[("securepub_handshake_seconds_count", (("outcome", "accepted"),))], 1
        )
        self.assertEqual(found[("securepub_ticket_redemption_seconds_count", ())], 1)
        self.assertEqual(
            found[("securepub_redis_roundtrip_seconds_bucket", (("le", "0.0005"),))], 1
        )

    def test_label_escaping(self) -> None:
        """Label values are escaped, so no value can forge another line."""
        metrics = Metrics()
        metrics.errors['x"} 1\nfake'] += 1
        text = metrics.render().decode()
        self.assertNotIn("\nfake", text)
        found = samples(metrics)
        self.assertEqual(found[("securepub_errors_total", (("code", 'x"} 1\nfake'),))], 1)

    def test_nodes_have_registries_of_their_own(self) -> None:
        """Two Metrics in one process do not share counters (nor clash in a registry)."""
        a, b = Metrics(), Metrics()
        a.messages_in += 1
        self.assertEqual(samples(b)[("securepub_messages_in_total", ())], 0)
