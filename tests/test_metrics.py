"""Prometheus metrics: counters and the confirm-latency histogram of one app, on its own registry."""

from __future__ import annotations

import prometheus_client
from flask import Flask

from flask_nucleon_amqp.metrics import register_metrics

from conftest import Names


def test_metrics_count_one_apps_activity(app: Flask, names: Names) -> None:
    registry = prometheus_client.CollectorRegistry()
    register_metrics(app, registry)
    state = app.extensions["amqp"]
    queue = names.queue()
    state.queue_declare(queue)
    for i in range(3):
        state.publish("", queue, str(i))
    message = state.get(queue)
    message.ack()
    value = registry.get_sample_value
    assert value("amqp_messages_published_total", {"pool": "publish"}) == 3
    assert value("amqp_messages_confirmed_total", {"pool": "publish"}) == 3
    assert value("amqp_messages_received_total", {"pool": "listen"}) == 1
    assert value("amqp_messages_acked_total", {"pool": "listen"}) == 1
    assert value("amqp_publish_confirm_seconds_count", {"pool": "publish"}) == 3
    confirm_seconds = value("amqp_publish_confirm_seconds_sum", {"pool": "publish"})
    assert confirm_seconds is not None
    assert confirm_seconds > 0
    assert value("amqp_connections_opened_total", {"pool": "publish"}) == 2  # the pool's size
    exposition = prometheus_client.generate_latest(registry).decode()
    assert "amqp_publish_confirm_seconds_bucket" in exposition
