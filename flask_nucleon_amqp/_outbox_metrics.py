"""Prometheus metrics of the outbox (``register_metrics`` makes them when the app has an outbox)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from flask import Flask

from ._outbox_relay import OutboxState, outbox_parked, outbox_published, outbox_written

if TYPE_CHECKING:
    from .outbox import Outbox

__all__ = ["OutboxMetrics"]


class OutboxMetrics:
    """Prometheus metrics of an app's outboxes (made by ``register_metrics`` once ``outbox.init_app`` ran).

    Counters ``amqp_outbox_written_total``, ``amqp_outbox_published_total``
    (label ``by``: commit or relay) and ``amqp_outbox_parked_total``; gauges
    ``amqp_outbox_pending`` and ``amqp_outbox_oldest_age_seconds``, read from
    the database at each scrape. Every metric is labelled with the ``table``.
    """

    def __init__(self, app: Flask, registry: Any) -> None:
        from prometheus_client import Counter
        from prometheus_client.core import GaugeMetricFamily

        self.states: dict[Outbox, OutboxState] = {
            state.outbox: state for state in app.extensions.get("amqp_outbox", {}).values()}
        self.written = Counter("amqp_outbox_written", "Outbox messages written", ["table"], registry=registry)
        self.published = Counter("amqp_outbox_published", "Outbox messages published and confirmed",
                                 ["table", "by"], registry=registry)
        self.parked = Counter("amqp_outbox_parked", "Outbox messages parked after their last attempt", ["table"],
                              registry=registry)
        states = self.states

        class _Gauges:
            def collect(self) -> Iterator[Any]:
                pending = GaugeMetricFamily("amqp_outbox_pending", "Outbox messages not sent yet (not parked)",
                                            labels=["table"])
                oldest = GaugeMetricFamily("amqp_outbox_oldest_age_seconds", "Age of the oldest pending message",
                                           labels=["table"])
                for state in states.values():
                    try:
                        report = state.pending()
                    except Exception:  # noqa: BLE001 - a scrape reports what it can
                        continue
                    pending.add_metric([state.outbox.table.name], report["pending"])
                    oldest.add_metric([state.outbox.table.name], report["oldest_age"] or 0.0)
                yield pending
                yield oldest

        self._gauges = _Gauges()
        registry.register(self._gauges)
        outbox_written.connect(self._on_written)
        outbox_published.connect(self._on_published)
        outbox_parked.connect(self._on_parked)

    def _table(self, sender: Any) -> str | None:
        return str(sender.table.name) if sender in self.states else None

    def _on_written(self, sender: Any, **_kwargs: Any) -> None:
        table = self._table(sender)
        if table is not None:
            self.written.labels(table=table).inc()

    def _on_published(self, sender: Any, count: int, by: str, **_kwargs: Any) -> None:
        table = self._table(sender)
        if table is not None:
            self.published.labels(table=table, by=by).inc(count)

    def _on_parked(self, sender: Any, **_kwargs: Any) -> None:
        table = self._table(sender)
        if table is not None:
            self.parked.labels(table=table).inc()

