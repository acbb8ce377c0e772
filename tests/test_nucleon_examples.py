"""Every example of the original Nucleon "AMQP Access Layer" document, through current_app.amqp.

The last part keeps the document's own spelling next to today's (docs/porting.rst shows them side by side).
"""

from __future__ import annotations

import gevent
from flask import Flask, current_app
from gevent.queue import Queue

from conftest import Names


def _room(names: Names) -> tuple[str, str, str]:
    """The document's topology: exchange unit_test_room, queues listener1 and listener2."""
    room, listener1, listener2 = names.exchange("unit_test_room"), names.queue("listener1"), names.queue("listener2")
    connection = current_app.amqp.get_amqp_pool().connection()  # type: ignore[attr-defined]  # Nucleon's name for the state
    connection.exchange_declare(room)
    connection.queue_declare(queue=listener1)
    connection.queue_declare(queue=listener2)
    connection.queue_bind(queue=listener1, exchange=room, routing_key="user1")
    connection.queue_bind(queue=listener2, exchange=room, routing_key="user2")
    return room, listener1, listener2


def test_publish_synchronously(app: Flask, names: Names) -> None:
    with app.app_context():
        room, listener1, _ = _room(names)
        conn = current_app.amqp.get_amqp_pool().connection()  # type: ignore[attr-defined]  # Nucleon's name for the state
        conn.publish(exchange=room, routing_key="user1", body="WithHello1")
        message = current_app.amqp.get_amqp_pool(type="listen").connection().consume(queue=listener1, timeout=10)  # type: ignore[attr-defined]  # Nucleon's name for the state
        assert message["body"] == b"WithHello1"
        message.ack()


def test_publish_asynchronously(app: Flask, names: Names) -> None:
    with app.app_context():
        room, listener1, _ = _room(names)
        sent_results: Queue = Queue()

        def sent_callback(promise: int, result: object) -> None:
            sent_results.put((promise, result))

        conn = current_app.amqp.get_amqp_pool().connection()  # type: ignore[attr-defined]  # Nucleon's name for the state
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
        current_app.amqp.publish(room, "user1", "sync")  # type: ignore[attr-defined]  # Nucleon's name for the state
        conn = current_app.amqp.get_amqp_pool(type="listen").connection()  # type: ignore[attr-defined]  # Nucleon's name for the state
        result = conn.consume(queue=listener1, timeout=10)
        assert result["body"] == b"sync" and result["routing_key"] == "user1" and result["exchange"] == room
        conn.ack(result)
        assert conn.get(listener1) is None  # acked: not redelivered


def test_receive_asynchronously_ack_and_cancel(app: Flask, names: Names) -> None:
    with app.app_context():
        room, listener1, _ = _room(names)
        conn = current_app.amqp.get_amqp_pool(type="listen").connection()  # type: ignore[attr-defined]  # Nucleon's name for the state
        recv_results: Queue = Queue()

        def recv_callback(promise: int, result: object) -> None:
            recv_results.put(result)

        consume_promise = conn.consume(queue=listener1, callback=recv_callback)
        current_app.amqp.publish(room, "user1", "async")  # type: ignore[attr-defined]  # Nucleon's name for the state
        result = recv_results.get(timeout=10)
        assert result["body"] == b"async"
        conn.ack(result)
        conn.cancel(consume_promise)
        current_app.amqp.publish(room, "user1", "after cancel")  # type: ignore[attr-defined]  # Nucleon's name for the state
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
        conn = current_app.amqp.get_amqp_pool(type="listen").connection()  # type: ignore[attr-defined]  # Nucleon's name for the state

        def recv_callback(promise: int, result: object) -> None:
            received.put(result["body"])  # type: ignore[index]
            conn.ack(result)

        promise = conn.consume(listener1, callback=recv_callback)
        sent = {f"Message {i}".encode() for i in range(10)}
        for body in sent:
            current_app.amqp.publish(exchange=room, routing_key="user1", body=body)  # type: ignore[attr-defined]  # Nucleon's name for the state
        got = {received.get(timeout=10) for _ in range(10)}
        assert got == sent
        conn.cancel(promise)


def test_configure_and_shut_down_topology(app: Flask, names: Names) -> None:
    with app.app_context():
        room, listener1, listener2 = _room(names)
        connection = current_app.amqp.get_amqp_pool().connection()  # type: ignore[attr-defined]  # Nucleon's name for the state
        current_app.amqp.publish(room, "user2", "to two")  # type: ignore[attr-defined]  # Nucleon's name for the state
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


# -- Porting from Nucleon: each example as the document spelled it, and as it is spelled today ---------
# (docs/porting.rst includes the marked blocks; each test below runs both spellings.)

# [start seed pool]
def seed_get_pool(app):  # type: ignore[no-untyped-def]
    pool = app.get_amqp_pool()  # Nucleon: the app object carried the pools
    return pool.connection()
# [end seed pool]


# [start ported pool]
def ported_get_pool():  # type: ignore[no-untyped-def]
    pool = current_app.amqp.get_amqp_pool()  # type: ignore[attr-defined]  # the extension's state, in an app context
    return pool.connection()
# [end ported pool]


def test_porting_the_pool_lookup(app: Flask) -> None:
    with app.app_context():
        import pytest

        with pytest.raises(AttributeError, match="get_amqp_pool"):
            seed_get_pool(app)  # type: ignore[no-untyped-call]  # a Flask app has no pools of its own
        connection = ported_get_pool()  # type: ignore[no-untyped-call]  # the porting sample is untyped
        assert connection.queue_declare("", exclusive=True)["queue"].startswith("amq.gen-")


# [start seed listener]
def seed_recv_callback(connection, promise, result):  # type: ignore[no-untyped-def]
    print("Result received: " + result["body"])  # a str body, in Python 2
    connection.ack(result)
# [end seed listener]


# [start ported listener]
def recv_callback(connection, promise, message):  # type: ignore[no-untyped-def]
    print("Result received: " + message.text)  # body is bytes: .text (UTF-8) or message["body"].decode()
    connection.ack(message)
# [end ported listener]


def test_porting_the_listener_callback(app: Flask, names: Names, capsys: object) -> None:
    import pytest

    with app.app_context():
        _, listener1, _ = _room(names)
        conn = current_app.amqp.get_amqp_pool(type="listen").connection()  # type: ignore[attr-defined]  # Nucleon's name for the state
        current_app.amqp.publish("", listener1, "héllo")  # type: ignore[attr-defined]  # Nucleon's name for the state
        message = conn.consume(listener1, timeout=10)
        assert message is not None
        with pytest.raises(TypeError, match="str"):
            seed_recv_callback(conn, 0, message)  # type: ignore[no-untyped-call]  # "..." + bytes
        recv_callback(conn, 0, message)  # type: ignore[no-untyped-call]  # the porting sample is untyped
        assert capsys.readouterr().out == "Result received: héllo\n"  # type: ignore[attr-defined]
        assert conn.get(listener1) is None  # acked


# [start ported on_initialise]
from flask_nucleon_amqp import AMQP, on_initialise  # noqa: E402,F401 - Nucleon: from nucleon.signals import ...

amqp = AMQP()


# @on_initialise runs for every app, @amqp.on_initialise for this extension's apps only.
@amqp.on_initialise
def start_listener_thread() -> None:
    current_app.amqp.publish("", current_app.config["ANNOUNCE_QUEUE"], "started")  # type: ignore[attr-defined]  # Nucleon's name for the state
    current_app.amqp.register_and_spawn_amqp_listener(current_app.config["LISTEN_QUEUE"], recv_callback)  # type: ignore[attr-defined]  # Nucleon's name for the state
# [end ported on_initialise]


def test_porting_on_initialise(names: Names, capsys: object) -> None:
    from conftest import make_app

    announce, listen = names.queue("announce"), names.queue("listen")
    app = make_app(ANNOUNCE_QUEUE=announce, LISTEN_QUEUE=listen)
    amqp.init_app(app)
    state = app.extensions["amqp"]
    try:
        conn = state.connection("publish")
        conn.queue_declare(announce)
        conn.queue_declare(listen)
        with app.test_request_context():
            app.preprocess_request()  # the first request runs the handlers
        started = conn.get(announce, timeout=10)
        assert started is not None and started.text == "started"
        started.ack()
        conn.publish("", listen, "to the listener")
        assert _wait_for_output(capsys, "Result received: to the listener\n")
    finally:
        state.close(timeout=5)


def _wait_for_output(capsys: object, expected: str) -> bool:
    seen = ""
    with gevent.Timeout(10, False):
        while expected not in seen:
            gevent.sleep(0.05)
            seen += capsys.readouterr().out  # type: ignore[attr-defined]
    return expected in seen
