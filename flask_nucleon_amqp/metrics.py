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
        self._receivers: list[Any] = []
        for name, counter in self.counters.items():
            self._listen(name, counter)
        self._listen("connection_blocked", None)
        self._listen("connection_unblocked", None)
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

        getattr(signals, name).connect(receiver)
        self._receivers.append(receiver)


def register_metrics(app: Flask, registry: Any = None) -> AMQPMetrics:
    """Count one app's AMQP activity on ``registry`` (Prometheus' default registry when None)."""
    metrics = AMQPMetrics(app, registry)
    app.extensions["amqp_metrics"] = metrics
    return metrics
