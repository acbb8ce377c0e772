"""The code samples of the documentation, run against the real broker.

``docs/*.rst`` include the functions below with ``literalinclude :pyobject:``
and the regions between ``# [start NAME]`` and ``# [end NAME]`` markers, so a
sample that stops working fails this file. Change a sample here, not in the docs.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, current_app, request
from flask.testing import FlaskClient

from flask_nucleon_amqp import (
    AMQP,
    Binding,
    Exchange,
    Message,
    NotFound,
    PukaConnection,
    Queue,
    Timeout,
    Unroutable,
)
from flask_nucleon_amqp import testing as amqp_testing
from flask_nucleon_amqp.testing import AMQPNames

from conftest import BROKER_URL, make_app, wait_until

# The plugin's fixtures, as a user's suite gets them once the package is installed (its pytest11
# entry point). Bound here rather than with `pytest_plugins`, which fails in a source checkout
# where another test module has already imported flask_nucleon_amqp.testing (assertion rewriting).
amqp_names = amqp_testing.amqp_names
amqp_recorder = amqp_testing.amqp_recorder
amqp_memory_url = amqp_testing.amqp_memory_url
wait_for_messages = amqp_testing._wait_for_messages_fixture

log = logging.getLogger("docs_samples")


# == The app most samples run in ===============================================================

def create_orders_app(config: dict[str, Any]) -> Flask:
    """A small app: POST /orders publishes the order to the ORDERS_EXCHANGE topic exchange."""
    app = Flask("orders")
    app.config.update(config)
    AMQP(app)

    @app.post("/orders")
    def create_order() -> Any:
        current_app.amqp.publish(current_app.config["ORDERS_EXCHANGE"], "order.created", json=request.get_json())  # type: ignore[attr-defined]  # Nucleon's name for the state
        return {"ok": True}, 201

    return app


@pytest.fixture
def app(amqp_names: AMQPNames) -> Iterator[Flask]:
    app = create_orders_app({"TESTING": True, "AMQP_URL": BROKER_URL,
                             "ORDERS_EXCHANGE": amqp_names.exchange("orders")})
    app.amqp.exchange_declare(app.config["ORDERS_EXCHANGE"], "topic")  # type: ignore[attr-defined]  # Nucleon's name for the state
    yield app
    app.extensions["amqp"].close()  # amqp_names then deletes the exchange


@pytest.fixture
def room(app: Flask, amqp_names: AMQPNames) -> Iterator[tuple[str, dict[str, str]]]:
    """Nucleon's room: an exchange, and a queue per user bound by the user's name."""
    exchange, queues = amqp_names.exchange("unit_test_room"), {u: amqp_names.queue(u) for u in ("user1", "user2")}
    with app.app_context():
        declare_room(exchange, queues)
        yield exchange, queues


# == Publishing ===============================================================================

def say_hello(room: str) -> None:
    """Publish synchronously: this returns once the broker has confirmed the message."""
    conn = current_app.amqp.get_amqp_pool().connection()  # type: ignore[attr-defined]  # the "publish" pool
    conn.publish(exchange=room, routing_key="user1", body="WithHello1")


def say_hello_in_background(room: str) -> int:
    """Publish asynchronously: this returns a promise at once; ``sent`` runs when the broker answers."""

    def sent(promise: int, result: Any) -> None:
        if isinstance(result, Exception):
            log.error("message %d was not published: %s", promise, result)
        else:
            log.info("message %d confirmed", promise)

    conn = current_app.amqp.get_amqp_pool().connection()  # type: ignore[attr-defined]  # Nucleon's name for the state
    promise: int = conn.publish(exchange=room, routing_key="user1", body="WithHello1", callback=sent)
    return promise


def place_order(exchange: str, order: dict[str, Any]) -> bool:
    """JSON, a header, a persistent message, and mandatory routing."""
    try:
        current_app.amqp.publish(exchange, "order.created", json=order, headers={"source": "web"},  # type: ignore[attr-defined]  # Nucleon's name for the state
                                 persistent=True, mandatory=True)
    except Unroutable:
        return False  # no queue is bound for order.created: the broker returned it
    return True


def test_publish_synchronously(room: tuple[str, dict[str, str]]) -> None:
    exchange, queues = room
    say_hello(exchange)
    message = current_app.amqp.get(queues["user1"])  # type: ignore[attr-defined]  # Nucleon's name for the state
    assert message is not None and message.body == b"WithHello1"
    message.ack()


def test_publish_asynchronously(room: tuple[str, dict[str, str]], caplog: pytest.LogCaptureFixture) -> None:
    exchange, queues = room
    with caplog.at_level(logging.INFO, logger="docs_samples"):
        promise = say_hello_in_background(exchange)
        assert wait_until(lambda: f"message {promise} confirmed" in caplog.text)
        failed = say_hello_in_background(f"{exchange}-missing")
        assert wait_until(lambda: f"message {failed} was not published: 404" in caplog.text)
    assert [m.body for m in drain(queues["user1"])] == [b"WithHello1"]


def test_publish_with_options(app: Flask, amqp_names: AMQPNames) -> None:
    with app.app_context():
        exchange = app.config["ORDERS_EXCHANGE"]
        assert place_order(exchange, {"id": 1}) is False
        queue = amqp_names.queue("orders")
        declare_orders_queue(queue, exchange)
        assert place_order(exchange, {"id": 2}) is True
        [message] = drain(queue)
        assert message.json() == {"id": 2} and message.headers == {"source": "web"}
        assert message.delivery_mode == 2 and message.content_type == "application/json"


# == Receiving ================================================================================

def receive_one(queue: str) -> str | None:
    """Receive synchronously: the first message of the queue, waiting up to a second for one."""
    conn = current_app.amqp.get_amqp_pool(type="listen").connection()  # type: ignore[attr-defined]  # Nucleon's name for the state
    message: Message | None = conn.consume(queue=queue, timeout=1)
    if message is None:
        return None
    log.info("received %r with headers %r", message["body"], message["headers"])
    conn.ack(message)  # or message.ack()
    return message.text


def drain(queue: str, limit: int = 100) -> list[Message]:
    """Take what is in the queue now, without waiting (basic.get)."""
    messages: list[Message] = []
    while len(messages) < limit:
        message = current_app.amqp.get(queue)  # type: ignore[attr-defined]  # None when the queue is empty
        if message is None:
            break
        messages.append(message)
        message.ack()
    return messages


def start_consumer(queue: str, inbox: list[bytes]) -> int:
    """Receive asynchronously: ``on_message`` runs for every delivery until the consumer is cancelled."""

    def on_message(promise: int, message: Message) -> None:
        inbox.append(message.body)
        message.ack()

    conn = current_app.amqp.get_amqp_pool(type="listen").connection()  # type: ignore[attr-defined]  # Nucleon's name for the state
    promise: int = conn.consume(queue, callback=on_message, prefetch_count=100)
    return promise


def stop_consumer(promise: int) -> None:
    current_app.amqp.cancel(promise)  # type: ignore[attr-defined]  # every consumer needs a cancel


def test_receive_synchronously(room: tuple[str, dict[str, str]]) -> None:
    exchange, queues = room
    assert receive_one(queues["user1"]) is None
    current_app.amqp.publish(exchange, "user1", "sync")  # type: ignore[attr-defined]  # Nucleon's name for the state
    assert receive_one(queues["user1"]) == "sync"
    assert drain(queues["user1"]) == []  # acked: not delivered again


def test_receive_asynchronously(room: tuple[str, dict[str, str]]) -> None:
    exchange, queues = room
    inbox: list[bytes] = []
    promise = start_consumer(queues["user2"], inbox)
    for i in range(10):
        current_app.amqp.publish(exchange, "user2", f"Message {i}")  # type: ignore[attr-defined]  # Nucleon's name for the state
    assert wait_until(lambda: len(inbox) == 10)
    stop_consumer(promise)
    current_app.amqp.publish(exchange, "user2", "after cancel")  # type: ignore[attr-defined]  # Nucleon's name for the state
    assert [m.body for m in drain(queues["user2"])] == [b"after cancel"]
    assert inbox == [f"Message {i}".encode() for i in range(10)]


# == Configuring ==============================================================================

# [start pools-config]
AMQP_POOLS = {
    "publish": {"size": 2},  # current_app.amqp.publish, declarations
    "listen": {"size": 1},  # consume, get, listeners
    "reports": {"size": 1, "heartbeat": 30, "operation_timeout": 5},
}
# [end pools-config]


def declare_room(room: str, queues: dict[str, str]) -> None:
    """As in Nucleon: declare an exchange, and a queue per user bound by the user's name."""
    connection = current_app.amqp.get_amqp_pool().connection()  # type: ignore[attr-defined]  # Nucleon's name for the state
    connection.exchange_declare(room, "direct")
    for user, queue in queues.items():
        connection.queue_declare(queue=queue)
        connection.queue_bind(queue=queue, exchange=room, routing_key=user)


def declare_orders_queue(queue: str, exchange: str) -> None:
    """Register declarations in the app's topology and declare them now."""
    current_app.amqp.declare(  # type: ignore[attr-defined]  # Nucleon's name for the state
        Queue(queue, expires=3_600_000),  # deleted by the broker after an hour unused
        Binding(exchange, queue=queue, routing_key="order.*"),
    )


def delete_room(room: str, queues: dict[str, str]) -> None:
    connection = current_app.amqp.get_amqp_pool().connection()  # type: ignore[attr-defined]  # Nucleon's name for the state
    for queue in queues.values():
        connection.queue_delete(queue=queue)
    connection.exchange_delete(room)


def test_named_pools() -> None:
    app = make_app(AMQP_POOLS=AMQP_POOLS)
    AMQP(app)
    try:
        with app.app_context():
            reports = current_app.amqp.get_amqp_pool(type="reports")  # type: ignore[attr-defined]  # Nucleon's name for the state
            assert reports.settings.heartbeat == 30 and reports.settings.operation_timeout == 5
            assert reports.connection().queue_declare("", exclusive=True)["queue"].startswith("amq.gen-")
            assert sorted(current_app.amqp.stats()) == ["listen", "publish", "reports"]  # type: ignore[attr-defined]  # Nucleon's name for the state
    finally:
        app.extensions["amqp"].close(timeout=5)


def test_delete_room(room: tuple[str, dict[str, str]]) -> None:
    exchange, queues = room
    delete_room(exchange, queues)
    with pytest.raises(NotFound):
        current_app.amqp.queue_declare(queues["user1"], passive=True)  # type: ignore[attr-defined]  # Nucleon's name for the state
    with pytest.raises(NotFound):
        current_app.amqp.publish(exchange, "user1", "gone")  # type: ignore[attr-defined]  # Nucleon's name for the state


# == Listeners and topology, declared with the extension ======================================

#: Unique per test run, so that runs sharing one broker never meet.
_RUN = uuid.uuid4().hex[:8]
ROOM, INBOX, ORDERS = f"docs-room-{_RUN}", f"docs-inbox-{_RUN}", f"docs-orders-{_RUN}"
DEAD, DEAD_LETTERS = f"docs-dead-{_RUN}", f"docs-dead-letters-{_RUN}"

# [start extension]
amqp = AMQP()
# [end extension]

# [start topology]
amqp.topology.add(
    Exchange(ROOM, "direct"),
    Exchange(DEAD, "fanout"),
    Queue(INBOX),
    Queue(ORDERS, dead_letter_exchange=DEAD),
    Queue(DEAD_LETTERS, message_ttl=24 * 3600 * 1000),  # kept a day for someone to look at
    Binding(ROOM, queue=INBOX, routing_key="user1"),
    Binding(ROOM, queue=ORDERS, routing_key="order.created"),
    Binding(DEAD, queue=DEAD_LETTERS),
)
# [end topology]


@amqp.on_initialise
def start_listener_thread() -> None:
    def recv_callback(connection: PukaConnection, promise: int, message: Message) -> None:
        log.info("Result received: %s", message["body"])
        connection.ack(message)

    current_app.amqp.register_and_spawn_amqp_listener(INBOX, recv_callback)  # type: ignore[attr-defined]  # Nucleon's name for the state


@amqp.listener(ORDERS, prefetch_count=20, on_error="dead-letter")
def handle_order(connection: PukaConnection, promise: int, message: Message) -> None:
    order = message.json()  # a body that is not JSON raises: the message goes to DEAD
    log.info("order %s for %s", order["id"], order["user"])
    # returning without settling the message acks it


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.update(config or {})
    amqp.init_app(app)
    return app


@pytest.fixture
def chat_app() -> Iterator[Flask]:
    config = {"TESTING": True, "AMQP_URL": BROKER_URL, "AMQP_SHUTDOWN_TIMEOUT": 5.0}
    app = create_app(config)
    try:
        yield app
    finally:
        # [start shut-down]
        app.extensions["amqp"].close()  # listeners stop; running callbacks finish and are acked
        # [end shut-down]
        # `flask amqp teardown --yes`, from an app of its own (this one is closed).
        cleaner = create_app(config)
        result = cleaner.test_cli_runner().invoke(args=["amqp", "teardown", "--yes"])
        cleaner.extensions["amqp"].close(timeout=5)
        assert result.exit_code == 0, result.output


def test_listeners(chat_app: Flask, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="docs_samples"), chat_app.app_context():
        chat_app.extensions["amqp"].initialise()  # what the first request or gunicorn's post_worker_init does
        assert [listener.queue for listener in current_app.amqp.listeners] == [INBOX, ORDERS]  # type: ignore[attr-defined]  # Nucleon's name for the state
        current_app.amqp.publish(ROOM, "user1", "WithHello1")  # type: ignore[attr-defined]  # Nucleon's name for the state
        current_app.amqp.publish(ROOM, "order.created", json={"id": 7, "user": "user2"})  # type: ignore[attr-defined]  # Nucleon's name for the state
        current_app.amqp.publish(ROOM, "order.created", b"not JSON")  # type: ignore[attr-defined]  # Nucleon's name for the state
        assert wait_until(lambda: "Result received: b'WithHello1'" in caplog.text)
        assert wait_until(lambda: "order 7 for user2" in caplog.text)
        assert wait_until(lambda: current_app.amqp.queue_declare(DEAD_LETTERS, passive=True)["message_count"] == 1)  # type: ignore[attr-defined]  # Nucleon's name for the state
        [dead] = drain(DEAD_LETTERS)
        assert dead.body == b"not JSON"


# == Request / reply ==========================================================================

def serve_squares(queue: str) -> int:
    """The server side: answer each request on its ``reply_to``, with its ``correlation_id``."""
    conn = current_app.amqp.get_amqp_pool(type="listen").connection()  # type: ignore[attr-defined]  # Nucleon's name for the state

    def answer(promise: int, message: Message) -> None:
        n = message.json()["n"]
        conn.publish("", message.reply_to, json={"square": n * n}, correlation_id=message.correlation_id)
        message.ack()

    promise: int = conn.consume(queue, callback=answer)
    return promise


def square(queue: str, n: int) -> int:
    """The client side: publish a request and wait for its reply (RabbitMQ's direct reply-to)."""
    conn = current_app.amqp.get_amqp_pool().connection()  # type: ignore[attr-defined]  # Nucleon's name for the state
    reply = conn.call("", queue, json={"n": n}, timeout=5)  # Timeout when no reply comes in time
    square: int = reply.json()["square"]
    return square


def test_request_reply(app: Flask, amqp_names: AMQPNames) -> None:
    with app.app_context():
        queue = amqp_names.queue("squares")
        current_app.amqp.queue_declare(queue)  # type: ignore[attr-defined]  # Nucleon's name for the state
        with pytest.raises(Timeout):
            current_app.amqp.connection().call("", queue, json={"n": 1}, timeout=0.2)  # type: ignore[attr-defined]  # nobody serves yet
        server = serve_squares(queue)
        assert [square(queue, n) for n in (2, 3)] == [4, 9]
        current_app.amqp.cancel(server)  # type: ignore[attr-defined]  # Nucleon's name for the state


# == Reliability ==============================================================================

def record_audit_event(exchange: str, event: dict[str, Any]) -> None:
    """At least once: confirmed, persistent, and published again if the connection died first."""
    current_app.amqp.publish(exchange, "audit", json=event, persistent=True, mandatory=True, retry=2)  # type: ignore[attr-defined]  # Nucleon's name for the state


def test_record_audit_event(app: Flask, amqp_names: AMQPNames) -> None:
    with app.app_context():
        exchange = app.config["ORDERS_EXCHANGE"]
        queue = amqp_names.queue("audit")
        current_app.amqp.queue_declare(queue)  # type: ignore[attr-defined]  # Nucleon's name for the state
        current_app.amqp.queue_bind(queue, exchange, "audit")  # type: ignore[attr-defined]  # Nucleon's name for the state
        record_audit_event(exchange, {"event": "login"})
        [message] = drain(queue)
        assert message.json() == {"event": "login"} and message.delivery_mode == 2


# == Testing an app ===========================================================================

def test_posting_an_order_publishes_it(client: FlaskClient, amqp_recorder: Any) -> None:
    with amqp_recorder() as published:
        response = client.post("/orders", json={"id": 1})
    assert response.status_code == 201
    assert [(message.routing_key, message.json()) for message in published] == [("order.created", {"id": 1})]


def test_the_order_reaches_its_queue(app: Flask, client: FlaskClient, amqp_names: AMQPNames,
                                     wait_for_messages: Any) -> None:
    queue = amqp_names.queue("orders")  # unique to this test; deleted after it
    app.amqp.queue_declare(queue)  # type: ignore[attr-defined]  # Nucleon's name for the state
    app.amqp.queue_bind(queue, app.config["ORDERS_EXCHANGE"], "order.*")  # type: ignore[attr-defined]  # Nucleon's name for the state
    client.post("/orders", json={"id": 2})
    [message] = wait_for_messages(queue, count=1, timeout=5)
    assert message.json() == {"id": 2}


def test_without_a_broker(amqp_memory_url: str) -> None:
    app = create_orders_app({"AMQP_URL": amqp_memory_url, "ORDERS_EXCHANGE": "orders"})
    with app.app_context():
        current_app.amqp.exchange_declare("orders", "topic")  # type: ignore[attr-defined]  # Nucleon's name for the state
        current_app.amqp.queue_declare("all-orders")  # type: ignore[attr-defined]  # Nucleon's name for the state
        current_app.amqp.queue_bind("all-orders", "orders", "order.#")  # type: ignore[attr-defined]
        app.test_client().post("/orders", json={"id": 3})
        message = current_app.amqp.get("all-orders")  # type: ignore[attr-defined]  # Nucleon's name for the state
        assert message is not None and message.json() == {"id": 3}
        message.ack()
    app.extensions["amqp"].close()
