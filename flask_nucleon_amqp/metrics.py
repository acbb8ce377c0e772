"""Optional Prometheus metrics (``pip install flask-nucleon-amqp[prometheus]``).

:func:`register_metrics` listens to the extension's signals and counts what
happens on one app's pools, labelled by pool name, on a registry of your
choice (the default one unless given)::

    from flask_nucleon_amqp.metrics import register_metrics
    register_metrics(app)           # after AMQP(app)
"""

from __future__ import annotations

from typing import Any

from flask import Flask

from . import signals

__all__ = ["register_metrics", "AMQPMetrics"]

_COUNTERS = {
    # signal name: (metric name, help)
    "message_published": ("amqp_messages_published", "Messages published"),
    "message_confirmed": ("amqp_messages_confirmed", "Publishes confirmed by the broker"),
    "message_returned": ("amqp_messages_returned", "Mandatory messages returned as unroutable"),
    "message_received": ("amqp_messages_received", "Messages delivered to the app"),
    "message_acked": ("amqp_messages_acked", "Messages acknowledged"),
    "message_rejected": ("amqp_messages_rejected", "Messages rejected or nacked"),
    "connection_opened": ("amqp_connections_opened", "Connections opened"),
    "connection_lost": ("amqp_connections_lost", "Connections lost"),
    "connection_recovered": ("amqp_connections_recovered", "Connections recovered in the background"),
}


class AMQPMetrics:
    """The metrics of one app; keeps its signal receivers alive (blinker holds them weakly)."""

    def __init__(self, app: Flask, registry: Any = None) -> None:
        try:
            from prometheus_client import REGISTRY, Counter, Gauge, Histogram
        except ImportError as exc:  # pragma: no cover - depends on the extra being installed
            raise RuntimeError("Prometheus metrics need prometheus_client: "
                               "pip install flask-nucleon-amqp[prometheus]") from exc
        self.state = app.extensions["amqp"]
        registry = REGISTRY if registry is None else registry
        self.counters = {name: Counter(metric, text, ["pool"], registry=registry)
                         for name, (metric, text) in _COUNTERS.items()}
        self.blocked = Gauge("amqp_connections_blocked", "Connections the broker currently blocks", ["pool"],
                             registry=registry)
        self.confirm_seconds = Histogram(
            "amqp_publish_confirm_seconds", "Time from publish to the broker's confirm", ["pool"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry)
        self.publish_failures = Counter(
            "amqp_publish_failures", "Publishes not confirmed, by reason (the exception's class)", ["pool", "reason"],
            registry=registry)
        self.handling_seconds = Histogram(
            "amqp_listener_handling_seconds", "Time a listener's callback took (with its ack or reply)",
            ["queue"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry)
        self._receivers: list[Any] = []
        for name, counter in self.counters.items():
            self._listen(name, counter)
        self._listen("connection_blocked", None)
        self._listen("connection_unblocked", None)
        self._listen("publish_failed", None)
        self._listen_handled()
        registry.register(_PoolCollector(self.state))
        #: The outbox's metrics when the app has one (call register_metrics after outbox.init_app).
        self.outbox: Any = None
        if app.extensions.get("amqp_outbox"):
            from .outbox import OutboxMetrics

            self.outbox = OutboxMetrics(app, registry)

    def _pool_of(self, sender: Any) -> str | None:
        pool = getattr(getattr(sender, "settings", None), "name", None)
        if pool in self.state.pools and sender in self.state.pools[pool].connections():
            return str(pool)
        return None  # another app's connection

    def _listen(self, name: str, counter: Any) -> None:
        def receiver(sender: Any, **kwargs: Any) -> None:
            pool = self._pool_of(sender)
            if pool is None:
                return
            if counter is not None:
                counter.labels(pool=pool).inc()
            if name == "message_confirmed":
                self.confirm_seconds.labels(pool=pool).observe(kwargs["seconds"])
            elif name == "connection_blocked":
                self.blocked.labels(pool=pool).inc()
            elif name == "connection_unblocked":
                self.blocked.labels(pool=pool).dec()
            elif name == "publish_failed":
                self.publish_failures.labels(pool=pool, reason=type(kwargs["error"]).__name__).inc()

        getattr(signals, name).connect(receiver)
        self._receivers.append(receiver)

    def _listen_handled(self) -> None:
        def receiver(sender: Any, **kwargs: Any) -> None:
            if sender in self.state.listeners:  # not another app's listener
                self.handling_seconds.labels(queue=kwargs["queue"]).observe(kwargs["seconds"])

        signals.message_handled.connect(receiver)
        self._receivers.append(receiver)


class _PoolCollector:
    """Gauges read from the pools at scrape time: bytes waiting to be written, greenlets waiting."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def describe(self) -> list[Any]:
        return []  # read at scrape time only: nothing to check at registration

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        buffered = GaugeMetricFamily("amqp_send_buffer_bytes", "Bytes queued for the broker, not yet written",
                                     labels=["pool"])
        waiting = GaugeMetricFamily("amqp_waiting_greenlets", "Greenlets waiting now, by what they wait for",
                                    labels=["pool", "for"])
        for name, pool in self.state.pools.items():
            size = 0
            counts = {"confirm": 0, "room": 0, "connection": 0}
            for conn in pool.connections():
                session = getattr(conn, "_session", None)
                send_buf = getattr(getattr(session, "client", None), "send_buf", None)
                size += len(send_buf) if send_buf is not None else 0
                for what in counts:
                    counts[what] += conn.stats.get(f"waiting_{what}", 0)
            buffered.add_metric([name], size)
            for what, count in counts.items():
                waiting.add_metric([name, what], count)
        yield buffered
        yield waiting


def register_metrics(app: Flask, registry: Any = None) -> AMQPMetrics:
    """Count one app's AMQP activity on ``registry`` (Prometheus' default registry when None)."""
    metrics = AMQPMetrics(app, registry)
    app.extensions["amqp_metrics"] = metrics
    return metrics
