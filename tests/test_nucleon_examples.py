"""Every example of the original Nucleon "AMQP Access Layer" document, through current_app.amqp."""

from __future__ import annotations

import gevent
from flask import Flask, current_app
from gevent.queue import Queue

from conftest import Names


def _room(names: Names) -> tuple[str, str, str]:
    """The document's topology: exchange unit_test_room, queues listener1 and listener2."""
    room, listener1, listener2 = names.exchange("unit_test_room"), names.queue("listener1"), names.queue("listener2")
    connection = current_app.amqp.get_amqp_pool().connection()
    connection.exchange_declare(room)
    connection.queue_declare(queue=listener1)
    connection.queue_declare(queue=listener2)
    connection.queue_bind(queue=listener1, exchange=room, routing_key="user1")
    connection.queue_bind(queue=listener2, exchange=room, routing_key="user2")
    return room, listener1, listener2


def test_publish_synchronously(app: Flask, names: Names) -> None:
    with app.app_context():
        room, listener1, _ = _room(names)
        conn = current_app.amqp.get_amqp_pool().connection()
        conn.publish(exchange=room, routing_key="user1", body="WithHello1")
        message = current_app.amqp.get_amqp_pool(type="listen").connection().consume(queue=listener1, timeout=10)
        assert message["body"] == b"WithHello1"
        message.ack()


def test_publish_asynchronously(app: Flask, names: Names) -> None:
    with app.app_context():
        room, listener1, _ = _room(names)
        sent_results: Queue = Queue()

        def sent_callback(promise: int, result: object) -> None:
            sent_results.put((promise, result))

        conn = current_app.amqp.get_amqp_pool().connection()
        promise = conn.publish(exchange=room, routing_key="user1", body="WithHello1", callback=sent_callback)
        sent_promise, sent = sent_results.get(timeout=10)
        assert sent_promise == promise
        assert sent == {}
        message = conn.get(listener1)
        assert message is not None and message.body == b"WithHello1"
        message.ack()


def test_receive_synchronously_and_ack(app: Flask, names: Names) -> None:
    with app.app_context():
        room, listener1, _ = _room(names)
        current_app.amqp.publish(room, "user1", "sync")
        conn = current_app.amqp.get_amqp_pool(type="listen").connection()
        result = conn.consume(queue=listener1, timeout=10)
        assert result["body"] == b"sync" and result["routing_key"] == "user1" and result["exchange"] == room
        conn.ack(result)
        assert conn.get(listener1) is None  # acked: not redelivered


def test_receive_asynchronously_ack_and_cancel(app: Flask, names: Names) -> None:
    with app.app_context():
        room, listener1, _ = _room(names)
        conn = current_app.amqp.get_amqp_pool(type="listen").connection()
        recv_results: Queue = Queue()

        def recv_callback(promise: int, result: object) -> None:
            recv_results.put(result)

        consume_promise = conn.consume(queue=listener1, callback=recv_callback)
        current_app.amqp.publish(room, "user1", "async")
        result = recv_results.get(timeout=10)
        assert result["body"] == b"async"
        conn.ack(result)
        conn.cancel(consume_promise)
        current_app.amqp.publish(room, "user1", "after cancel")
        gevent.sleep(0.2)
        assert recv_results.empty()  # cancelled: no more deliveries
        left = conn.get(listener1)
        assert left is not None and left.body == b"after cancel"
        left.ack()


def test_listener_daemon_pattern(app: Flask, names: Names) -> None:
    """The document's recommended daemon: a consumer whose callback acks through its connection."""
    with app.app_context():
        room, listener1, _ = _room(names)
        received: Queue = Queue()
        conn = current_app.amqp.get_amqp_pool(type="listen").connection()

        def recv_callback(promise: int, result: object) -> None:
            received.put(result["body"])  # type: ignore[index]
            conn.ack(result)  # type: ignore[arg-type]

        promise = conn.consume(listener1, callback=recv_callback)
        sent = {f"Message {i}".encode() for i in range(10)}
        for body in sent:
            current_app.amqp.publish(exchange=room, routing_key="user1", body=body)
        got = {received.get(timeout=10) for _ in range(10)}
        assert got == sent
        conn.cancel(promise)


def test_configure_and_shut_down_topology(app: Flask, names: Names) -> None:
    with app.app_context():
        room, listener1, listener2 = _room(names)
        connection = current_app.amqp.get_amqp_pool().connection()
        current_app.amqp.publish(room, "user2", "to two")
        assert connection.get(listener1) is None
        message = connection.get(listener2)
        assert message is not None and message.body == b"to two"
        message.ack()
        # Shutting down: remove what we created.
        connection.exchange_delete(room)
        connection.queue_delete(queue=listener1)
        connection.queue_delete(queue=listener2)
        import pytest

        from flask_nucleon_amqp import NotFound

        with pytest.raises(NotFound):
            connection.queue_declare(listener1, passive=True)
        with pytest.raises(NotFound):
            connection.publish(room, "user1", "gone")
