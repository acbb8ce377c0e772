"""Signals and stats: each event is signalled with the right arguments and counted exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from flask_nucleon_amqp import PukaConnection, Unroutable, signals

from conftest import Names, close_broker_connection, wait_until


@pytest.fixture
def received() -> Any:
    events: list[tuple[str, Any, dict[str, Any]]] = []
    handlers = []
    for name in signals.__all__:
        signal = getattr(signals, name)

        def handler(sender: Any, _name: str = name, **kwargs: Any) -> None:
            events.append((_name, sender, kwargs))

        signal.connect(handler)
        handlers.append((signal, handler))
    yield events
    for signal, handler in handlers:
        signal.disconnect(handler)


def test_publish_confirm_return_receive_ack_reject(conn: PukaConnection, names: Names, received: Any) -> None:
    queue, exchange = names.queue(), names.exchange()
    conn.queue_declare(queue)
    conn.exchange_declare(exchange, "fanout")
    received.clear()
    conn.publish("", queue, b"12345")
    with pytest.raises(Unroutable):
        conn.publish(exchange, "rk", b"x", mandatory=True)
    first = conn.get(queue)
    assert first is not None
    first.reject(requeue=True)
    second = conn.get(queue)
    assert second is not None
    second.ack()
    received[:] = [event for event in received if event[1] is conn]  # other tests' connections may linger
    kinds = [name for name, _, _ in received]
    assert kinds == ["message_published", "message_confirmed", "message_published", "message_returned",
                     "publish_failed", "message_received", "message_rejected", "message_received", "message_acked"]
    assert all(sender is conn for _, sender, _ in received)
    published = received[0][2]
    assert published == {"exchange": "", "routing_key": queue, "body_size": 5, "body": b"12345", "properties": {}}
    assert received[1][2]["seconds"] > 0
    assert isinstance(received[3][2]["error"], Unroutable)
    assert received[4][2] == {"exchange": exchange, "routing_key": "rk", "error": received[3][2]["error"]}
    assert received[6][2]["requeue"] is True and received[6][2]["message"] is first
    assert received[8][2]["message"] is second
    stats = conn.stats
    assert (stats["published"], stats["confirmed"], stats["failed"]) == (2, 1, 1)
    assert (stats["delivered"], stats["acked"], stats["rejected"]) == (2, 1, 1)


def test_connection_lost_and_recovered_are_signalled(conn: PukaConnection, names: Names, received: Any) -> None:
    conn.queue_declare(names.queue())
    mine: Callable[[], list[Any]] = lambda: [event for event in received if event[1] is conn]  # noqa: E731
    assert [name for name, _, _ in mine()] == ["connection_opened"]
    close_broker_connection(conn, "signal test")
    assert wait_until(lambda: "connection_recovered" in [name for name, _, _ in mine()], timeout=15)
    received[:] = mine()
    kinds = [name for name, _, _ in received]
    assert kinds[:2] == ["connection_opened", "connection_lost"]
    assert "signal test" in received[1][2]["reason"]
    assert conn.stats["lost"] == 1 and conn.stats["recovered"] == 1 and conn.stats["opened"] == 2


def test_a_failing_receiver_does_not_break_publishing(conn: PukaConnection, names: Names) -> None:
    def broken(sender: Any, **kwargs: Any) -> None:
        raise RuntimeError("receiver bug")

    signals.message_confirmed.connect(broken)
    try:
        queue = names.queue()
        conn.queue_declare(queue)
        conn.publish("", queue, b"x")
        assert conn.queue_declare(queue, passive=True)["message_count"] == 1
    finally:
        signals.message_confirmed.disconnect(broken)
