"""What a node counts, exposed through prometheus_client for /metrics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.logger import ILogObserver, LogEvent
from zope.interface import implementer

#: Content type of the text exposition format generate_latest writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Latency buckets in seconds: 100 µs to 10 s.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


@dataclass(frozen=True, slots=True)
class _Gauge:
    name: str
    help: str
    read: Callable[[], float | dict[tuple[str, ...], float]]
    labels: tuple[str, ...] = ()


@implementer(ILogObserver)
class Metrics:
    """A node's counters, gauges and latency histograms.

    The hot path bumps plain integers and ``Counter`` entries here; nothing
    is formatted until /metrics is scraped, when `_Collector` turns them
    into Prometheus metric families. Security decisions are counted from
    their log events (so nothing is counted twice or forgotten). Gauges are
    callables read at scrape time. Each node has its own registry, so
    several nodes (tests) can live in one process.
    """

    def __init__(self) -> None:
        self.handshakes: Counter[tuple[str, str]] = Counter()  # (outcome, reason)
        self.errors: Counter[str] = Counter()  # error replies by code
        self.events: Counter[str] = Counter()  # other security events by name
        self.messages_in = 0  # messages accepted for publishing on this node
        self.messages_out = 0  # copies handed to this node's sessions
        #: messages the node's Redis links delivered to it (routing efficiency)
        self.cluster_messages_received = 0
        #: subscriptions asking for ``since``, by outcome (recovered, not_recovered)
        self.recoveries: Counter[str] = Counter()
        self._gauges: list[_Gauge] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        self.publish_to_write = Histogram(
            "securepub_publish_to_write_seconds",
            "From a publish being accepted (on any node) to its frames being written here.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.handshake_duration = Histogram(
            "securepub_handshake_seconds",
            "From a WebSocket upgrade request to its answer, ticket redemption included.",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ticket_redemption = Histogram(
            "securepub_ticket_redemption_seconds",
            "Time the ticket store took to redeem a ticket (handshake or refresh).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.redis_roundtrip = Histogram(
            "securepub_redis_roundtrip_seconds",
            "Time from sending a command to Redis to its reply.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def __call__(self, event: LogEvent) -> None:
        name = event.get("securepub_event")
        if name == "handshake":
            self.handshakes[(str(event.get("outcome")), str(event.get("reason")))] += 1
        elif isinstance(name, str):
            self.events[name] += 1

    def gauge(
        self,
        name: str,
        help: str,
        read: Callable[[], float | dict[tuple[str, ...], float]],
        labels: tuple[str, ...] = (),
    ) -> None:
        """Expose ``securepub_<name>``, read by ``read()`` at scrape time.

        With ``labels``, ``read`` returns a mapping of label values to numbers.
        """
        self._gauges.append(_Gauge(name, help, read, labels))

    def render(self) -> bytes:
        """The Prometheus text exposition of everything this node counts."""
        text: bytes = generate_latest(self.registry)
        return text


class _Collector(Collector):
    """Reads the plain counters of a `Metrics` into metric families at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        handshakes = CounterMetricFamily(
            "securepub_handshakes", "WebSocket handshakes by outcome.", labels=["outcome", "reason"]
        )
        for (outcome, reason), n in sorted(m.handshakes.items()):
            handshakes.add_metric([outcome, reason], n)
        yield handshakes
        errors = CounterMetricFamily(
            "securepub_errors", "Error replies sent to clients, by code.", labels=["code"]
        )
        for code, n in sorted(m.errors.items()):
            errors.add_metric([code], n)
        yield errors
        events = CounterMetricFamily(
            "securepub_security_events", "Other security events, by name.", labels=["event"]
        )
        for name, n in sorted(m.events.items()):
            events.add_metric([name], n)
        yield events
        yield CounterMetricFamily(
            "securepub_messages_in", "Messages accepted for publishing.", value=m.messages_in
        )
        yield CounterMetricFamily(
            "securepub_messages_out", "Message copies sent to sessions.", value=m.messages_out
        )
        recoveries = CounterMetricFamily(
            "securepub_recoveries",
            "Subscriptions that asked to resume since an offset, by outcome.",
            labels=["outcome"],
        )
        for outcome in ("recovered", "not_recovered"):
            recoveries.add_metric([outcome], m.recoveries[outcome])
        yield recoveries
        yield CounterMetricFamily(
            "securepub_cluster_messages_received",
            "Messages this node's Redis links delivered to it.",
            value=m.cluster_messages_received,
        )
        for gauge in m._gauges:
            value = gauge.read()
            if isinstance(value, dict):
                family = GaugeMetricFamily(
                    "securepub_" + gauge.name, gauge.help, labels=list(gauge.labels)
                )
                for labels, number in sorted(value.items()):
                    family.add_metric(list(labels), number)
                yield family
            else:
                yield GaugeMetricFamily("securepub_" + gauge.name, gauge.help, value=value)
