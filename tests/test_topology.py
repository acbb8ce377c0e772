"""Declarative topology: values, AMQP_TOPOLOGY, idempotent declaring, conflicts, re-declaring after reconnects."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from flask_nucleon_amqp import AMQP, AMQPState, Binding, ConfigError, Exchange, NotFound, PreconditionFailed, Queue
from flask_nucleon_amqp.topology import Topology, topology_from_config

from conftest import Names, close_broker_connection, make_app, wait_until


@pytest.fixture
def state(names: Names) -> Iterator[AMQPState]:
    """An app's AMQP state, closed before ``names`` deletes the queues (requested first, torn down last)."""
    app = make_app()
    AMQP(app)
    yield app.extensions["amqp"]
    app.extensions["amqp"].close(timeout=5)


def _exists(state: AMQPState, queue: str) -> bool:
    try:
        state.queue_declare(queue, passive=True)
    except NotFound:
        return False
    return True


# -- values -----------------------------------------------------------------------------------
def test_values_are_durable_by_default_and_shortcuts_become_arguments() -> None:
    queue = Queue("orders", quorum=True, dead_letter_exchange="dead", dead_letter_routing_key="orders.dead",
                  message_ttl=60_000, max_length=10, expires=3_600_000, arguments={"x-overflow": "reject-publish"})
    assert queue.durable and not queue.auto_delete and queue.quorum
    assert queue.arguments == {"x-queue-type": "quorum", "x-dead-letter-exchange": "dead",
                               "x-dead-letter-routing-key": "orders.dead", "x-message-ttl": 60_000,
                               "x-max-length": 10, "x-expires": 3_600_000, "x-overflow": "reject-publish"}
    assert Exchange("room").durable and Exchange("room").type == "direct"
    assert Queue("a", message_ttl=5) == Queue("a", arguments={"x-message-ttl": 5})
    assert "quorum" in queue.describe() and "x-dead-letter-exchange='dead'" in queue.describe()


@pytest.mark.parametrize("make, match", [
    (lambda: Exchange("amq.topic", "topic"), "belong to the broker"),
    (lambda: Exchange("x", "fan-out"), "type must be one of"),
    (lambda: Exchange(""), "non-empty"),
    (lambda: Queue("q", quorum=True, durable=False), "quorum queue must be durable"),
    (lambda: Queue("q", quorum=True, auto_delete=True), "quorum queue must be durable"),
    (lambda: Queue("q", quorum=True, arguments={"x-queue-type": "classic"}), "contradicts"),
    (lambda: Queue("q", message_ttl=-1), "message_ttl must be a whole number"),
    (lambda: Queue("q", message_ttl=5, arguments={"x-message-ttl": 6}), "contradicts"),
    (lambda: Queue("q", dead_letter_routing_key="k"), "needs dead_letter_exchange"),
    (lambda: Queue("q" * 256), "longer than 255 bytes"),
    (lambda: Binding("x"), "exactly one of queue= or to_exchange="),
    (lambda: Binding("x", queue="q", to_exchange="y"), "exactly one of"),
])
def test_bad_values_say_what_is_wrong(make: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_registry_orders_dedupes_and_refuses_conflicting_duplicates() -> None:
    shared = Topology(Exchange("room"))
    topology = Topology(Binding("room", queue="q", routing_key="k"), Queue("q")).include(shared)
    topology.add(Queue("q"))  # the same again: harmless
    assert [type(d).__name__ for d in topology] == ["Exchange", "Queue", "Binding"]
    assert topology.queue("q") == Queue("q") and topology.queue("other") is None
    with pytest.raises(ValueError, match="registered twice with different settings"):
        topology.add(Queue("q", durable=False))
    with pytest.raises(ValueError, match="registered twice"):
        topology.add(Exchange("room", "topic"))  # conflicts with the included one
    with pytest.raises(TypeError, match="expected Exchange, Queue or Binding"):
        topology.add("q")  # type: ignore[arg-type]


# -- AMQP_TOPOLOGY -------------------------------------------------------------------------------
def test_config_form() -> None:
    topology = topology_from_config({
        "exchanges": {"room": {"type": "topic"}, "dead": {"type": "fanout", "durable": False}},
        "queues": {"q1": {"quorum": True, "dead_letter_exchange": "dead"}, "q2": None},
        "bindings": [{"exchange": "room", "queue": "q1", "routing_key": "a.#"},
                     {"exchange": "amq.fanout", "to_exchange": "room"}],
    })
    assert list(topology) == [Exchange("room", "topic"), Exchange("dead", "fanout", durable=False),
                              Queue("q1", quorum=True, dead_letter_exchange="dead"), Queue("q2"),
                              Binding("room", queue="q1", routing_key="a.#"), Binding("amq.fanout", to_exchange="room")]


@pytest.mark.parametrize("value, key", [
    ([], "AMQP_TOPOLOGY"),
    ({"exchange": {}}, "AMQP_TOPOLOGY['exchange']"),
    ({"queues": ["q"]}, "AMQP_TOPOLOGY['queues']"),
    ({"queues": {"q": {"durabel": True}}}, "AMQP_TOPOLOGY['queues']['q']['durabel']"),
    ({"queues": {"q": {"quorum": True, "durable": False}}}, "AMQP_TOPOLOGY['queues']['q']"),
    ({"exchanges": {"x": {"type": "nope"}}}, "AMQP_TOPOLOGY['exchanges']['x']"),
    ({"exchanges": {"x": "topic"}}, "AMQP_TOPOLOGY['exchanges']['x']"),
    ({"bindings": {"exchange": "x"}}, "AMQP_TOPOLOGY['bindings']"),
    ({"bindings": [{"queue": "q"}]}, "AMQP_TOPOLOGY['bindings'][0]"),
    ({"bindings": [{"exchange": "x", "queue": "q", "key": "k"}]}, "AMQP_TOPOLOGY['bindings'][0]['key']"),
])
def test_bad_config_names_the_key(value: Any, key: str) -> None:
    app = make_app(AMQP_TOPOLOGY=value)
    with pytest.raises(ConfigError) as caught:
        AMQP(app)
    assert caught.value.key == key
    assert "amqp" not in app.extensions  # not half set up


@pytest.mark.parametrize("key", ["AMQP_DECLARE_ON_START", "AMQP_START_LISTENERS"])
def test_lifecycle_flags_must_be_booleans(key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        AMQP(make_app(**{key: "yes"}))


# -- against the broker ----------------------------------------------------------------------------
def test_declare_is_idempotent_and_routes(names: Names, state: AMQPState) -> None:
    room, queue = names.exchange("room"), names.queue()
    topology = Topology(Exchange(room, "topic"), Queue(queue, expires=60_000),
                        Binding(room, queue=queue, routing_key="user.*"))
    conn = state.connection()
    assert topology.declare(conn) == list(topology)
    assert topology.declare(conn) == list(topology)  # again: no error, nothing changes
    state.publish(room, "user.1", b"routed")
    message = state.get(queue)
    assert message is not None and message.body == b"routed"
    message.ack()


def test_conflicting_declaration_raises_precondition_failed_naming_it(names: Names, state: AMQPState) -> None:
    room, queue = names.exchange("room"), names.queue()
    state.exchange_declare(room, "direct", durable=True)
    state.queue_declare(queue, durable=True)  # a classic queue
    with pytest.raises(PreconditionFailed) as caught:
        Topology(Exchange(room, "topic")).declare(state.connection())
    assert f"cannot declare exchange {room!r} (topic, durable)" in str(caught.value)
    assert "inequivalent arg 'type'" in str(caught.value)
    with pytest.raises(PreconditionFailed, match=rf"cannot declare queue '{queue}' \(quorum\).*x-queue-type"):
        Topology(Queue(queue, quorum=True)).declare(state.connection())
    assert Topology(Queue(queue)).declare(state.connection())  # the connection is still usable


def test_quorum_queue_is_declared_as_one(names: Names, state: AMQPState) -> None:
    queue = names.queue("quorum")
    Topology(Queue(queue, quorum=True)).declare(state.connection())
    # A classic re-declaration of the same name is refused: the broker holds a quorum queue.
    with pytest.raises(PreconditionFailed, match="x-queue-type"):
        state.queue_declare(queue, durable=True)
    state.publish("", queue, b"safe", persistent=True)
    message = state.get(queue)
    assert message is not None and message.body == b"safe"
    message.ack()


def test_ttl_and_dead_letter_arguments_take_effect(names: Names, state: AMQPState) -> None:
    dead, dead_queue, queue = names.exchange("dead"), names.queue("dead"), names.queue("ttl")
    Topology(Exchange(dead, "fanout"), Queue(dead_queue), Binding(dead, queue=dead_queue),
             Queue(queue, message_ttl=50, dead_letter_exchange=dead)).declare(state.connection())
    state.publish("", queue, b"expires")
    assert wait_until(lambda: state.queue_declare(dead_queue, passive=True)["message_count"] == 1, timeout=5)
    message = state.get(dead_queue)
    assert message is not None and message.body == b"expires"
    assert message.headers["x-death"][0]["reason"] == "expired"
    message.ack()
    assert state.get(queue) is None


def test_exchange_to_exchange_binding(names: Names, state: AMQPState) -> None:
    source, destination, queue = names.exchange("src"), names.exchange("dst"), names.queue()
    Topology(Exchange(source, "fanout"), Exchange(destination, "fanout"), Queue(queue),
             Binding(source, to_exchange=destination), Binding(destination, queue=queue)).declare(state.connection())
    state.publish(source, "", b"through two exchanges")
    assert wait_until(lambda: state.queue_declare(queue, passive=True)["message_count"] == 1, timeout=5)


def test_binding_to_a_missing_exchange_names_the_binding(names: Names, state: AMQPState) -> None:
    queue, missing = names.queue(), names.exchange("missing")
    with pytest.raises(NotFound, match=rf"cannot declare binding '{missing}' -> queue '{queue}'"):
        Topology(Queue(queue), Binding(missing, queue=queue)).declare(state.connection())


def test_delete_removes_everything_and_is_idempotent(names: Names, state: AMQPState) -> None:
    room, queue = names.exchange("room"), names.queue()
    topology = Topology(Exchange(room), Queue(queue), Binding(room, queue=queue, routing_key="k"))
    topology.declare(state.connection())
    assert topology.delete(state.connection()) == list(reversed(list(topology)))
    assert not _exists(state, queue)
    with pytest.raises(NotFound):
        state.publish(room, "k", b"gone")
    topology.delete(state.connection())  # already gone: fine


def test_app_topology_merges_config_and_extension_registry(names: Names) -> None:
    room, configured, registered, later = names.exchange("room"), names.queue("cfg"), names.queue("reg"), names.queue()
    amqp = AMQP()
    amqp.topology.add(Queue(registered), Binding(room, queue=registered, routing_key="r"))  # before init_app
    app = make_app(AMQP_TOPOLOGY={"exchanges": {room: {}}, "queues": {configured: {}}})
    amqp.init_app(app)
    state: AMQPState = app.extensions["amqp"]
    try:
        assert [d.name for d in state.topology.queues()] == [configured, registered]
        with app.test_request_context():
            app.preprocess_request()  # the first request of the process declares everything
        assert _exists(state, configured) and _exists(state, registered)
        state.publish(room, "r", b"to registered")
        assert wait_until(lambda: state.queue_declare(registered, passive=True)["message_count"] == 1, timeout=5)
        assert state.declare(Queue(later)) == [Queue(later)]  # registered and declared at once
        assert _exists(state, later) and state.topology.queue(later) == Queue(later)
    finally:
        state.close(timeout=5)


def test_topology_is_declared_again_after_a_reconnect(names: Names) -> None:
    queue = names.queue("transient")
    app = make_app(AMQP_TOPOLOGY={"queues": {queue: {"durable": False}}}, AMQP_POOLS={"publish": {"size": 1}})
    AMQP(app)
    state: AMQPState = app.extensions["amqp"]
    try:
        state.initialise()
        assert _exists(state, queue)
        conn = state.connection()
        other = make_app(AMQP_POOLS={"publish": {"size": 1}})
        AMQP(other)
        other.extensions["amqp"].queue_delete(queue)  # as a broker restart loses a transient queue
        other.extensions["amqp"].close(timeout=5)
        assert not _exists(state, queue)
        close_broker_connection(conn, "topology test")
        # The connection recovers in the background and re-declares the topology on open.
        assert wait_until(lambda: conn.is_open and conn.stats["recovered"] >= 1, timeout=15)
        assert _exists(state, queue)
    finally:
        state.close(timeout=5)


def test_other_connections_opening_at_boot_do_not_declare_it_again(names: Names) -> None:
    queue = names.queue("transient")
    app = make_app(AMQP_TOPOLOGY={"queues": {queue: {"durable": False}}},
                   AMQP_POOLS={"publish": {"size": 2}, "listen": {"size": 1}})
    AMQP(app)
    state: AMQPState = app.extensions["amqp"]
    try:
        state.initialise()  # declares it once, on the first publish connection
        other = make_app(AMQP_POOLS={"publish": {"size": 1}})
        AMQP(other)
        other.extensions["amqp"].queue_delete(queue)
        other.extensions["amqp"].close(timeout=5)
        first_open = [state.connection("publish"), state.connection("listen")]  # the other two
        assert [conn.stats["opened"] for conn in first_open] == [0, 0]
        for conn in first_open:
            conn.queue_declare("", exclusive=True)  # opens it: the topology is not declared once more
        assert not _exists(state, queue)
        listen = state.connection("listen")
        close_broker_connection(listen, "topology test")
        assert wait_until(lambda: listen.is_open and listen.stats["recovered"] >= 1, timeout=15)
        assert _exists(state, queue)  # after a reconnect it is
    finally:
        state.close(timeout=5)


def test_declare_on_start_false_declares_nothing(names: Names) -> None:
    queue = names.queue()
    app: Flask = make_app(AMQP_TOPOLOGY={"queues": {queue: {}}}, AMQP_DECLARE_ON_START=False)
    AMQP(app)
    state: AMQPState = app.extensions["amqp"]
    try:
        state.initialise()
        assert not _exists(state, queue)
        assert all(not conn.on_open for pool in state.pools.values() for conn in pool.connections())
    finally:
        state.close(timeout=5)
