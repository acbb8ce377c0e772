"""The fidelity suite: every test runs against RabbitMQ and against the memory transport.

The ``api`` fixture is parametrised over both; tests only use the public
API. A test that passes on one transport and fails on the other is a bug in
flask_nucleon_amqp.memory (fix the transport, never the assertion). Effects
that RabbitMQ applies asynchronously (dead-lettering, requeueing after a
reject) are awaited with ``consume(..., timeout=)`` or ``wait_until``, which
return at once on the memory transport.
"""

from __future__ import annotations

import datetime
import decimal
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import pytest
from flask import Flask
from gevent.event import Event
from gevent.queue import Queue

from flask_nucleon_amqp import (
    AMQP,
    AccessRefused,
    AMQPState,
    ConnectionLost,
    Message,
    MessageStateError,
    NotFound,
    Pool,
    PreconditionFailed,
    PublishNacked,
    ResourceLocked,
    Timeout,
    Unroutable,
    memory,
    signals,
)
from flask_nucleon_amqp.memory import MemoryConnection
from flask_nucleon_amqp.testing import AMQPNames

from conftest import BROKER_URL, close_broker_connection, make_app, outcome, wait_until

TRANSPORTS = ["rabbitmq", "memory"]


@pytest.fixture(params=TRANSPORTS)
def api(request: pytest.FixtureRequest) -> Iterator[AMQPState]:
    """The AMQP state of an app on the real broker or on a memory broker of this test's own."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    url = BROKER_URL if request.param == "rabbitmq" else f"memory://{name}"
    app: Flask = make_app(AMQP_URL=url, AMQP_POOLS={"publish": {"size": 1}, "listen": {"size": 1}})
    AMQP(app)
    state: AMQPState = app.extensions["amqp"]
    yield state
    state.close(timeout=5)
    memory.reset(name)


@pytest.fixture
def c(api: AMQPState) -> Any:
    """The connection most tests use (publish pool)."""
    return api.connection("publish")


@pytest.fixture
def other(api: AMQPState) -> Any:
    """A second connection to the same broker (listen pool)."""
    return api.connection("listen")


@pytest.fixture
def spare(api: AMQPState) -> Iterator[Any]:
    """Make extra connections (a test may close them); all closed afterwards."""
    pools: list[Pool] = []

    def make() -> Any:
        pools.append(Pool(api.settings["publish"]))
        return pools[-1].connection()

    yield make
    for pool in pools:
        pool.close(timeout=5)


@pytest.fixture
def n(api: AMQPState) -> Iterator[AMQPNames]:
    names = AMQPNames()
    yield names
    assert names.cleanup(api.connection("listen")) == []


def _cut(conn: Any, reason: str) -> None:
    """Have the broker close this one connection (320 CONNECTION_FORCED), as an operator would."""
    if isinstance(conn, MemoryConnection):
        conn.broker.disconnect(reason, connection=conn)
    else:
        close_broker_connection(conn, reason)


def _bodies(conn: Any, queue: str) -> list[bytes]:
    """Take every ready message (no_ack) and return the bodies."""
    bodies = []
    while (message := conn.get(queue, no_ack=True)) is not None:
        bodies.append(message.body)
    return bodies


def _count(conn: Any, queue: str) -> int:
    return int(conn.queue_declare(queue, passive=True)["message_count"])


# -- declaring -------------------------------------------------------------------------------------

def test_declare_purge_delete_counts(c: Any, n: AMQPNames) -> None:
    queue = n.queue()
    assert c.queue_declare(queue) == {"queue": queue, "message_count": 0, "consumer_count": 0}
    c.publish("", queue, b"one")
    c.publish("", queue, b"two")
    assert c.queue_declare(queue) == {"queue": queue, "message_count": 2, "consumer_count": 0}
    assert c.queue_declare(queue, passive=True)["message_count"] == 2
    assert c.queue_purge(queue) == {"message_count": 2}
    c.publish("", queue, b"three")
    assert c.queue_delete(queue) == {"message_count": 1}
    assert c.queue_delete(queue) == {"message_count": 0}  # deleting what is gone is fine
    with pytest.raises(NotFound, match=f"no queue '{queue}'"):
        c.queue_purge(queue)
    with pytest.raises(NotFound):
        c.queue_declare(queue, passive=True)


def test_exchange_operations_return_empty_dicts(c: Any, n: AMQPNames) -> None:
    exchange, queue = n.exchange(), n.queue()
    c.queue_declare(queue)
    assert c.exchange_declare(exchange, "topic") == {}
    assert c.exchange_declare(exchange, "topic") == {}
    assert c.queue_bind(queue, exchange, "a.*") == {}
    assert c.queue_bind(queue, exchange, "a.*") == {}  # binding twice is one binding
    assert c.exchange_bind(exchange, "amq.fanout") == {}
    assert c.exchange_unbind(exchange, "amq.fanout") == {}
    assert c.queue_unbind(queue, exchange, "no.such.binding") == {}
    assert c.queue_unbind(n.queue("absent"), n.exchange("absent"), "k") == {}
    assert c.exchange_delete(n.exchange("absent")) == {}
    assert c.queue_unbind(queue, exchange, "a.*") == {}
    c.publish(exchange, "a.b", b"unbound")
    assert c.get(queue) is None
    assert c.exchange_delete(exchange) == {}
    with pytest.raises(NotFound, match=f"no exchange '{exchange}'"):
        c.publish(exchange, "a.b", b"x")


def test_server_named_queue_lives_with_its_connection(spare: Any, other: Any) -> None:
    owner = spare()
    name = owner.queue_declare("", exclusive=True)["queue"]
    assert re.fullmatch(r"amq\.gen-[A-Za-z0-9_-]{22}", name)
    other.publish("", name, b"from another connection")  # publishing to it is allowed
    message = owner.get(name)
    assert message is not None and message.body == b"from another connection"
    message.ack()
    owner.close()
    with pytest.raises(NotFound):
        other.queue_declare(name, passive=True)


def test_exclusive_queue_is_locked_to_other_connections(c: Any, other: Any) -> None:
    name = c.queue_declare("", exclusive=True)["queue"]
    operation: Callable[[], object]
    for operation in (lambda: other.queue_declare(name, passive=True), lambda: other.get(name),
                      lambda: other.queue_purge(name), lambda: other.queue_delete(name),
                      lambda: other.queue_bind(name, "amq.direct", "k"),
                      lambda: other.consume(name, callback=lambda p, m: None)):
        with pytest.raises(ResourceLocked, match="cannot obtain exclusive access"):
            operation()
    assert c.queue_delete(name) == {"message_count": 0}


def test_queue_declare_conflicts(c: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue, arguments={"x-message-ttl": 60000})
    with pytest.raises(PreconditionFailed, match="inequivalent arg 'durable'"):
        c.queue_declare(queue, durable=True, arguments={"x-message-ttl": 60000})
    with pytest.raises(PreconditionFailed, match="inequivalent arg 'auto_delete'"):
        c.queue_declare(queue, auto_delete=True, arguments={"x-message-ttl": 60000})
    with pytest.raises(PreconditionFailed, match="inequivalent arg 'x-message-ttl'"):
        c.queue_declare(queue, arguments={"x-message-ttl": 1000})
    with pytest.raises(PreconditionFailed, match="inequivalent arg 'x-message-ttl'"):
        c.queue_declare(queue)
    with pytest.raises(ResourceLocked):
        c.queue_declare(queue, exclusive=True, arguments={"x-message-ttl": 60000})
    # Arguments RabbitMQ does not know are not compared.
    assert c.queue_declare(queue, arguments={"x-message-ttl": 60000, "x-custom": 1})["queue"] == queue
    with pytest.raises(AccessRefused, match="reserved prefix 'amq.\\*'"):
        c.queue_declare("amq.mine-" + n.run)
    with pytest.raises(NotFound):
        c.queue_declare(n.queue("absent"), passive=True)
    with pytest.raises(PreconditionFailed, match="invalid arg 'x-message-ttl'"):
        c.queue_declare(n.queue("bad"), arguments={"x-message-ttl": -1})
    with pytest.raises(PreconditionFailed, match="invalid arg 'x-max-length'"):
        c.queue_declare(n.queue("bad"), arguments={"x-max-length": "ten"})
    with pytest.raises(PreconditionFailed, match="invalid arg 'x-dead-letter-routing-key'"):
        c.queue_declare(n.queue("bad"), arguments={"x-dead-letter-routing-key": "rk"})
    assert c.is_open


def test_exchange_declare_conflicts(c: Any, n: AMQPNames) -> None:
    exchange, queue = n.exchange(), n.queue()
    c.exchange_declare(exchange, "topic")
    c.queue_declare(queue)
    with pytest.raises(PreconditionFailed, match="inequivalent arg 'type'.*received 'direct' but current is 'topic'"):
        c.exchange_declare(exchange, "direct")
    with pytest.raises(PreconditionFailed, match="inequivalent arg 'durable'"):
        c.exchange_declare(exchange, "topic", durable=True)
    with pytest.raises(PreconditionFailed, match="inequivalent arg 'auto_delete'"):
        c.exchange_declare(exchange, "topic", auto_delete=True)
    assert c.exchange_declare("amq.direct", "direct", durable=True) == {}
    with pytest.raises(PreconditionFailed, match="inequivalent arg 'durable'"):
        c.exchange_declare("amq.direct", "direct")
    with pytest.raises(AccessRefused, match="reserved prefix"):
        c.exchange_declare("amq.mine-" + n.run, "direct")
    operation: Callable[[], object]
    for operation in (lambda: c.exchange_declare("", "direct"), lambda: c.exchange_delete(""),
                      lambda: c.queue_bind(queue, "", "k"), lambda: c.exchange_bind(exchange, "", "k")):
        with pytest.raises(AccessRefused, match="default exchange"):
            operation()
    for operation in (lambda: c.queue_bind(n.queue("absent"), exchange, "k"),
                      lambda: c.queue_bind(queue, n.exchange("absent"), "k"),
                      lambda: c.exchange_bind(exchange, n.exchange("absent"), "k")):
        with pytest.raises(NotFound):
            operation()
    assert c.is_open


def test_unknown_exchange_type_closes_the_connection(c: Any, n: AMQPNames) -> None:
    with pytest.raises(ConnectionLost, match="503 COMMAND_INVALID - unknown exchange type 'x-no-such-plugin'"):
        c.exchange_declare(n.exchange(), "x-no-such-plugin")
    queue = n.queue()
    assert c.queue_declare(queue)["queue"] == queue  # the next operation opens a new connection
    assert wait_until(lambda: c.stats["recovered"] + c.stats["opened"] >= 2)


def test_delete_if_unused_and_if_empty(c: Any, n: AMQPNames) -> None:
    queue, exchange = n.queue(), n.exchange()
    c.queue_declare(queue)
    c.exchange_declare(exchange, "fanout")
    c.queue_bind(queue, exchange)
    promise = c.consume(queue, callback=lambda p, m: None)
    with pytest.raises(PreconditionFailed, match="in use"):
        c.queue_delete(queue, if_unused=True)
    c.cancel(promise)
    c.publish("", queue, b"x")
    with pytest.raises(PreconditionFailed, match="not empty"):
        c.queue_delete(queue, if_empty=True)
    with pytest.raises(PreconditionFailed, match="in use"):
        c.exchange_delete(exchange, if_unused=True)
    assert c.queue_delete(queue, if_unused=True) == {"message_count": 1}
    assert c.exchange_delete(exchange, if_unused=True) == {}  # its only binding went with the queue


def test_auto_delete_queue_and_exchange(c: Any, n: AMQPNames) -> None:
    queue, exchange, target = n.queue(), n.exchange(), n.queue("target")
    c.queue_declare(queue, auto_delete=True)
    c.publish("", queue, b"kept until a consumer came and went")
    assert _count(c, queue) == 1  # no consumer yet: it stays
    promise = c.consume(queue, callback=lambda p, m: m.ack())
    c.cancel(promise)
    assert wait_until(lambda: _gone(c, queue))
    c.queue_declare(target)
    c.exchange_declare(exchange, "direct", auto_delete=True)
    c.queue_bind(target, exchange, "k")
    c.queue_unbind(target, exchange, "k")  # its last binding
    with pytest.raises(NotFound):
        c.publish(exchange, "k", b"x")


def _gone(conn: Any, queue: str) -> bool:
    try:
        conn.queue_declare(queue, passive=True)
    except NotFound:
        return True
    return False


def test_x_expires_deletes_an_unused_queue(c: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue, arguments={"x-expires": 200})
    assert c.queue_declare(queue, passive=True)["queue"] == queue
    gevent.sleep(0.6)
    assert _gone(c, queue)


# -- publishing and getting ------------------------------------------------------------------------

def test_properties_round_trip(c: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue)
    stamp = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.timezone.utc)
    c.publish("", queue, b"{}", headers={"h": 1}, persistent=True, content_type="application/json",
              content_encoding="utf-8", correlation_id="corr-é", reply_to="replies", expiration=60000,
              message_id="m-1", priority=3, timestamp=stamp, type="kind", app_id="tests", user_id="guest")
    message = c.get(queue)
    assert message is not None
    fields = dict(message)
    assert fields.pop("delivery_tag") >= 1
    assert fields == {
        "body": b"{}", "headers": {"h": 1}, "exchange": "", "routing_key": queue, "redelivered": False,
        "consumer_tag": None, "message_count": 0, "content_type": "application/json",
        "content_encoding": "utf-8", "delivery_mode": 2, "priority": 3, "correlation_id": "corr-é",
        "reply_to": "replies", "expiration": "60000", "message_id": "m-1",
        "timestamp": int(stamp.timestamp()), "type": "kind", "user_id": "guest", "app_id": "tests",
    }
    message.ack()
    c.publish("", queue, b"bare")
    consumed = c.consume(queue, timeout=5)
    assert consumed is not None
    fields = dict(consumed)
    assert isinstance(fields.pop("delivery_tag"), int) and isinstance(fields.pop("consumer_tag"), str)
    assert fields == {"body": b"bare", "headers": {}, "exchange": "", "routing_key": queue, "redelivered": False}
    assert consumed.content_type is None and consumed.priority is None
    consumed.ack()


def test_headers_and_bodies_round_trip(c: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue)
    headers = {"é": "é", "n": {"ü": ["ß", 1, 2.5, True, None]}, "big": 2**40, "neg": -7,
               "dec": decimal.Decimal("1.25"), "when": datetime.datetime(2020, 1, 2, 3, 4, 5),
               "raw": b"\xff\xfe", "text": b"bytes that are text", "tuple": (1, 2), "empty": {}}
    c.publish("", queue, b"x", headers=headers)
    bodies = [bytes(range(256)), b"", "é".encode("latin-1"), b"\x00" * (1 << 20)]
    for body in bodies:
        c.publish("", queue, body)
    c.publish("", queue, json={"a": [1, "é"]})
    c.publish("", queue, "héllo")
    first = c.get(queue, no_ack=True)
    assert first is not None
    assert first.headers == {**headers, "text": "bytes that are text", "tuple": [1, 2]}
    assert type(first.headers["raw"]) is bytes
    for body in bodies:
        message = c.get(queue, no_ack=True)
        assert message is not None and type(message.body) is bytes and message.body == body
    as_json, as_text = c.get(queue, no_ack=True), c.get(queue, no_ack=True)
    assert as_json is not None and as_json.json() == {"a": [1, "é"]} and as_json.content_type == "application/json"
    assert as_text is not None and as_text.text == "héllo"


def test_bad_arguments_fail_before_anything_is_sent(c: Any) -> None:
    with pytest.raises(TypeError, match="body must be bytes or str"):
        c.publish("", "q", 123)
    with pytest.raises(ValueError, match="priority"):
        c.publish("", "q", b"x", priority=300)
    with pytest.raises(ValueError, match="delivery_mode"):
        c.publish("", "q", b"x", delivery_mode=0)  # a falsy value is still checked
    with pytest.raises(TypeError, match=r"headers\['k'\]"):
        c.publish("", "q", b"x", headers={"k": object()})
    with pytest.raises(ValueError, match="queue is 300 bytes"):
        c.queue_declare("q" * 300)
    with pytest.raises(ValueError, match="prefetch_count"):
        c.consume("q", callback=lambda p, m: None, prefetch_count=-1)
    with pytest.raises(ValueError, match="type must be one of"):
        c.exchange_declare("x", "nonsense")
    assert not c.is_open


def test_timeout_and_retry_are_honoured_or_refused_by_name(c: Any, n: AMQPNames) -> None:
    """Both transports check ``timeout`` and ``retry`` the same way; none is silently ignored."""
    queue = n.queue()
    with pytest.raises(ValueError, match="retry must be a non-negative integer"):
        c.publish("", queue, b"x", retry=-1)
    with pytest.raises(ValueError, match="retry= works only for synchronous publishes"):
        c.publish("", queue, b"x", retry=2, callback=lambda p, r: None)
    with pytest.raises(ValueError, match="timeout must be a non-negative number"):
        c.queue_declare(queue, timeout=-1)
    assert not c.is_open  # refused before anything was sent
    c.queue_declare(queue, timeout=5)
    promise = c.consume(queue, callback=lambda p, m: None, timeout=5)
    with pytest.raises(ValueError, match="timeout must be a non-negative number"):
        c.qos(promise, 5, timeout="soon")
    with pytest.raises(ValueError, match="timeout must be a non-negative number"):
        c.cancel(promise, timeout=-0.5)
    assert c.has_consumer(promise)  # a refused cancel leaves the consumer running
    c.qos(promise, 5, timeout=5)
    c.cancel(promise, timeout=5)
    assert not c.has_consumer(promise)
    assert c.publish("", queue, b"x", retry=1, timeout=5) is None
    assert _count(c, queue) == 1


def test_an_operation_that_cannot_be_sent_leaves_nothing_pending(c: Any, n: AMQPNames) -> None:
    c.close(timeout=5)
    with pytest.raises(ConnectionError, match="was closed"):
        c.queue_declare(n.queue(), callback=lambda p, r: None)
    with pytest.raises(ConnectionError, match="was closed"):
        c.queue_declare(n.queue())
    assert c.pending == 0


def test_mandatory_returns(c: Any, n: AMQPNames) -> None:
    exchange, queue = n.exchange(), n.queue()
    c.exchange_declare(exchange, "direct")
    c.queue_declare(queue)
    with pytest.raises(Unroutable) as info:
        c.publish(exchange, "nobody", b"lost", mandatory=True)
    assert (info.value.exchange, info.value.routing_key, info.value.reply_code) == (exchange, "nobody", 312)
    assert "NO_ROUTE" in str(info.value)
    assert c.publish(exchange, "nobody", b"dropped silently") is None
    results: Queue = Queue()
    c.publish("", n.queue("absent"), b"x", mandatory=True, callback=lambda p, r: results.put(r))
    assert isinstance(results.get(timeout=10), Unroutable)
    c.publish("", queue, b"routed", mandatory=True, headers={"mine": "yes"})
    message = c.get(queue, no_ack=True)
    assert message is not None and message.headers == {"mine": "yes"}


def test_publish_errors(c: Any, other: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue)
    missing = n.exchange("absent")
    with pytest.raises(NotFound, match=f"no exchange '{missing}'"):
        c.publish(missing, "rk", b"x")
    results: Queue = Queue()
    c.publish(missing, "rk", b"x", callback=lambda p, r: results.put(r))
    assert isinstance(results.get(timeout=10), NotFound)
    with pytest.raises(PreconditionFailed, match="user_id property set to 'somebody-else'"):
        c.publish("", queue, b"x", user_id="somebody-else")
    # Direct reply-to is for call(): a plain publish cannot ask for it, even after a call.
    with pytest.raises(PreconditionFailed, match="fast reply consumer does not exist"):
        c.publish("", queue, b"x", reply_to="amq.rabbitmq.reply-to")
    server = _echo_server(other, queue)
    c.call("", queue, b"ping", timeout=5)
    with pytest.raises(PreconditionFailed, match="fast reply consumer does not exist"):
        c.publish("", queue, b"x", reply_to="amq.rabbitmq.reply-to")
    other.cancel(server)
    c.publish("", queue, b"still fine")
    assert _bodies(c, queue) == [b"still fine"]


def test_a_publish_to_a_missing_exchange_fails_alone(c: Any, n: AMQPNames) -> None:
    """400 concurrent good publishes and one to a missing exchange on one connection: only that one fails."""
    queue, missing = n.queue(), n.exchange("absent")
    c.queue_declare(queue)
    outcomes: dict[int, Any] = {}

    def publish(i: int) -> None:
        try:
            c.publish(missing if i == 200 else "", queue, str(i))
            outcomes[i] = "confirmed"
        except Exception as exc:  # noqa: BLE001 - the test looks at every outcome
            outcomes[i] = exc

    gevent.joinall([gevent.spawn(publish, i) for i in range(401)], timeout=60)
    assert isinstance(outcomes.pop(200), NotFound)
    assert outcomes == {i: "confirmed" for i in range(401) if i != 200}
    assert sorted(_bodies(c, queue)) == sorted(str(i).encode() for i in range(401) if i != 200)


def test_one_bad_publish_in_a_batch_fails_alone(c: Any, n: AMQPNames) -> None:
    queue, missing = n.queue(), n.exchange("absent")
    c.queue_declare(queue)
    results: Queue = Queue()
    for exchange, body in [("", b"g1"), (missing, b"bad"), ("", b"g2"), ("", b"g3")]:
        c.publish(exchange, queue, body, callback=lambda _p, result, body=body: results.put((body, result)))
    outcomes = dict(results.get(timeout=10) for _ in range(4))
    assert isinstance(outcomes.pop(b"bad"), NotFound)
    assert outcomes == {b"g1": {}, b"g2": {}, b"g3": {}}
    assert _bodies(c, queue) == [b"g1", b"g2", b"g3"]


def test_a_mismatched_redeclare_fails_alone(c: Any, n: AMQPNames) -> None:
    """A 406 one caller provokes (a topology operation has a channel of its own) fails no one else."""
    queue, durable = n.queue(), n.queue("durable")
    c.queue_declare(queue)
    c.queue_declare(durable, durable=True)
    results: Queue = Queue()
    steps: list[tuple[str, Any]] = [("p1", lambda cb: c.publish("", queue, b"p1", callback=cb)),
                                    ("bad", lambda cb: c.queue_declare(durable, callback=cb)),
                                    ("q", lambda cb: c.queue_declare(queue, callback=cb)),
                                    ("p2", lambda cb: c.publish("", queue, b"p2", callback=cb))]
    for label, start in steps:
        start(lambda _p, result, label=label: results.put((label, result)))
    outcomes = dict(results.get(timeout=10) for _ in steps)
    assert isinstance(outcomes.pop("bad"), PreconditionFailed)
    assert outcomes["q"]["queue"] == queue
    assert (outcomes["p1"], outcomes["p2"]) == ({}, {})
    assert _bodies(c, queue) == [b"p1", b"p2"]


def test_async_results_arrive_in_order(c: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue)
    results: list[tuple[int, Any]] = []
    done = Event()

    def record(promise: int, result: Any) -> None:
        results.append((promise, result))
        if len(results) == 22:
            done.set()

    promises = [c.queue_declare(queue, callback=record)]
    promises += [c.publish("", queue, str(i), callback=record) for i in range(20)]
    promises.append(c.queue_declare(n.queue("absent"), passive=True, callback=record))
    assert done.wait(10)
    # Publishes are confirmed in order; other operations may overtake them (another channel on RabbitMQ).
    order = [promise for promise, _ in results]
    assert sorted(order) == sorted(promises)
    assert [p for p in order if p in promises[1:21]] == promises[1:21]
    by_promise = dict(results)
    assert by_promise[promises[0]]["queue"] == queue
    assert all(by_promise[p] == {} for p in promises[1:21])
    assert isinstance(by_promise[promises[21]], NotFound)
    assert _bodies(c, queue) == [str(i).encode() for i in range(20)]


# -- routing ---------------------------------------------------------------------------------------

def test_direct_fanout_and_default_exchange(c: Any, n: AMQPNames) -> None:
    direct, fanout = n.exchange("direct"), n.exchange("fanout")
    one, two = n.queue("one"), n.queue("two")
    c.exchange_declare(direct, "direct")
    c.exchange_declare(fanout, "fanout")
    for queue in (one, two):
        c.queue_declare(queue)
        c.queue_bind(queue, fanout, "ignored")
    c.queue_bind(one, direct, "k1")
    c.queue_bind(two, direct, "k1")
    c.queue_bind(two, direct, "k2")
    c.publish(direct, "k1", b"both")
    c.publish(direct, "k2", b"two only")
    c.publish(direct, "K1", b"nobody (case matters)")
    c.publish(fanout, "anything", b"fanned")
    c.publish("", one, b"default")
    c.publish("amq.direct", one, b"nobody (amq.direct has no bindings)")
    assert _bodies(c, one) == [b"both", b"fanned", b"default"]
    assert _bodies(c, two) == [b"both", b"two only", b"fanned"]


TOPIC_PATTERNS = ["#", "*", "", "a.#", "a.*", "#.b", "*.b", "a.#.b", "a..b", "#.#", "a.*.#"]
TOPIC_KEYS = ["", "a", "a.b", "a.x.b", "b", "a.", ".b", "a..b", "x.a.b"]
#: What RabbitMQ 3.10 routes (checked against it): pattern -> keys that match.
TOPIC_TABLE = {
    "#": TOPIC_KEYS,
    "*": ["a", "b"],
    "": [""],
    "a.#": ["a", "a.b", "a.x.b", "a.", "a..b"],
    "a.*": ["a.b", "a."],
    "#.b": ["a.b", "a.x.b", "b", ".b", "a..b", "x.a.b"],
    "*.b": ["a.b", ".b"],
    "a.#.b": ["a.b", "a.x.b", "a..b"],
    "a..b": ["a..b"],
    "#.#": TOPIC_KEYS,
    "a.*.#": ["a.b", "a.x.b", "a.", "a..b"],
}


def test_topic_routing_table(c: Any, n: AMQPNames) -> None:
    exchange = n.exchange()
    c.exchange_declare(exchange, "topic")
    queues = {}
    for pattern in TOPIC_PATTERNS:
        queues[pattern] = n.queue("topic")
        c.queue_declare(queues[pattern])
        c.queue_bind(queues[pattern], exchange, pattern)
    for key in TOPIC_KEYS:
        c.publish(exchange, key, key.encode())
    got = {pattern: [body.decode() for body in _bodies(c, queue)] for pattern, queue in queues.items()}
    assert got == TOPIC_TABLE


HEADERS_BINDINGS: list[dict[str, Any]] = [
    {"x-match": "all", "a": 1}, {"x-match": "any", "a": 1, "b": "x"}, {"a": None},
    {"x-match": "all-with-x", "x-k": "v"}, {"x-match": "any"}, {}, {"x-match": "all", "f": 1.0},
    {"x-match": "all", "s": b"bin"}, {"x-match": "all", "a": 1, "b": "x"}, {"x-match": "any", "x-k": "v"},
]
HEADERS_MESSAGES: list[dict[str, Any]] = [
    {"a": 1}, {"a": 2}, {"b": "x"}, {"a": None}, {"x-k": "v"}, {}, {"f": 1}, {"s": "bin"}, {"a": True},
    {"a": 1.0}, {"a": 1, "b": "x", "c": 3},
]
#: What RabbitMQ 3.10 routes (checked against it): binding index -> message indexes.
HEADERS_TABLE = {0: [0, 9, 10], 1: [0, 2, 9, 10], 2: [0, 1, 3, 8, 9, 10], 3: [4], 4: [],
                 5: list(range(11)), 6: [6], 7: [7], 8: [10], 9: []}


def test_headers_routing_table(c: Any, n: AMQPNames) -> None:
    exchange = n.exchange()
    c.exchange_declare(exchange, "headers")
    queues = []
    for binding in HEADERS_BINDINGS:
        queues.append(n.queue("headers"))
        c.queue_declare(queues[-1])
        c.queue_bind(queues[-1], exchange, "ignored", arguments=binding)
    for index, headers in enumerate(HEADERS_MESSAGES):
        c.publish(exchange, "any-key", str(index), headers=headers)
    got = {index: [int(body) for body in _bodies(c, queue)] for index, queue in enumerate(queues)}
    assert got == HEADERS_TABLE
    with pytest.raises(PreconditionFailed, match="Invalid x-match field value"):
        c.queue_bind(queues[0], exchange, "", arguments={"x-match": "most"})
    c.queue_unbind(queues[5], exchange, "ignored", arguments={})
    c.queue_unbind(queues[0], exchange, "ignored", arguments={"x-match": "all", "a": 2})  # not that binding
    c.publish(exchange, "", b"after unbind", headers={"a": 1})
    assert _bodies(c, queues[5]) == [] and _bodies(c, queues[0]) == [b"after unbind"]


def test_exchange_to_exchange_and_alternate_exchange(c: Any, n: AMQPNames) -> None:
    front, back, spill = n.exchange("front"), n.exchange("back"), n.exchange("spill")
    routed, spilled = n.queue("routed"), n.queue("spilled")
    c.exchange_declare(spill, "fanout")
    c.exchange_declare(front, "topic", arguments={"alternate-exchange": spill})
    c.exchange_declare(back, "direct")
    with pytest.raises(PreconditionFailed, match="inequivalent arg 'alternate-exchange'"):
        c.exchange_declare(front, "topic")
    c.queue_declare(routed)
    c.queue_declare(spilled)
    c.queue_bind(spilled, spill)
    c.exchange_bind(back, front, "orders.#")
    c.queue_bind(routed, back, "orders.eu")
    c.queue_bind(routed, front, "orders.*")  # two paths to one queue: it still gets one copy
    c.publish(front, "orders.eu", b"both paths")
    c.publish(front, "orders.us", b"front binding only")
    c.publish(front, "orders.eu.x", b"back routes it nowhere, but front matched")
    c.publish(front, "invoices", b"to the alternate exchange")
    c.publish(front, "invoices", b"alternates count as routed", mandatory=True)
    assert _bodies(c, routed) == [b"both paths", b"front binding only"]
    assert _bodies(c, spilled) == [b"to the alternate exchange", b"alternates count as routed"]
    c.exchange_delete(back)  # removes its bindings on both sides
    c.publish(front, "orders.eu", b"after delete")
    assert _bodies(c, routed) == [b"after delete"]
    c.exchange_unbind(back, front, "orders.#")


def test_cc_and_bcc_headers(c: Any, n: AMQPNames) -> None:
    exchange, a, b, d = n.exchange(), n.queue("a"), n.queue("b"), n.queue("d")
    c.exchange_declare(exchange, "direct")
    for queue, key in ((a, "ka"), (b, "kb"), (d, "kd")):
        c.queue_declare(queue)
        c.queue_bind(queue, exchange, key)
    c.publish(exchange, "ka", b"x", headers={"CC": ["kb"], "BCC": ["kd"], "other": 1})
    for queue in (a, b, d):
        message = c.get(queue, no_ack=True)
        assert message is not None and message.routing_key == "ka"
        assert message.headers == {"CC": ["kb"], "other": 1}


# -- consuming -------------------------------------------------------------------------------------

def test_get_and_consume_basics(c: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue)
    assert c.get(queue) is None
    with pytest.raises(NotFound):
        c.get(n.queue("absent"))
    with pytest.raises(NotFound):
        c.consume(n.queue("absent"), callback=lambda p, m: None)
    with pytest.raises(NotFound):
        c.consume(n.queue("absent"), timeout=1)
    started = time.monotonic()
    assert c.consume(queue, timeout=0.2) is None
    assert time.monotonic() - started >= 0.19
    gevent.spawn_later(0.1, c.publish, "", queue, b"later")
    message = c.consume(queue, timeout=5)
    assert message is not None and message.body == b"later"
    message.ack()
    c.publish("", queue, b"no ack")
    message = c.consume(queue, no_ack=True, timeout=5)
    assert message is not None and message.settled
    with pytest.raises(MessageStateError):
        message.ack()
    assert c.get(queue) is None
    c.publish("", queue, b"a")
    c.publish("", queue, b"b")
    first = c.get(queue)
    assert first is not None and first["message_count"] == 1
    first.ack()


def test_ack_reject_requeue_redelivered(c: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue)
    for body in (b"a", b"b", b"c"):
        c.publish("", queue, body)
    first = c.get(queue)
    assert first is not None and first.body == b"a" and not first.redelivered
    first.reject(requeue=True)
    assert wait_until(lambda: _count(c, queue) == 3)
    again = c.get(queue)  # back in its place: the head of the queue
    assert again is not None and again.body == b"a" and again.redelivered
    again.nack(requeue=True)
    assert wait_until(lambda: _count(c, queue) == 3)
    third = c.get(queue)
    assert third is not None and third.body == b"a" and third.redelivered
    third.nack(requeue=False)  # dropped: no dead-letter exchange
    second = c.get(queue)
    assert second is not None and second.body == b"b"
    second.ack()
    with pytest.raises(MessageStateError, match="already"):
        second.ack()
    with pytest.raises(MessageStateError, match="already"):
        c.reject(second)
    last = c.get(queue, no_ack=True)
    assert last is not None and last.body == b"c"
    with pytest.raises(MessageStateError, match="no_ack"):
        last.ack()
    assert c.get(queue) is None


def test_unacked_messages_return_when_their_connection_closes(spare: Any, c: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue)
    c.publish("", queue, b"held")
    holder = spare()
    held = holder.get(queue)
    assert held is not None
    assert c.get(queue) is None
    holder.close()
    with pytest.raises(MessageStateError, match="deliver it again"):
        held.ack()
    message = c.consume(queue, timeout=5)
    assert message is not None and message.body == b"held" and message.redelivered
    message.ack()


def test_prefetch_and_qos(c: Any, other: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue)
    for i in range(10):
        c.publish("", queue, str(i))
    got: Queue = Queue()
    promise = other.consume(queue, callback=lambda p, m: got.put(m), prefetch_count=2)
    held = [got.get(timeout=5), got.get(timeout=5)]
    assert [m.body for m in held] == [b"0", b"1"]
    gevent.sleep(0.2)
    assert got.empty()  # prefetch 2: nothing more until one is acked
    held[0].ack()
    held.append(got.get(timeout=5))
    assert held[-1].body == b"2"
    other.qos(promise, 3)  # a new window: three more, whatever is still held
    held += [got.get(timeout=5) for _ in range(3)]
    assert [m.body for m in held[3:]] == [b"3", b"4", b"5"]
    held[1].ack()  # from the old window: does not make room in the new one
    gevent.sleep(0.2)
    assert got.empty()
    held[3].ack()
    assert got.get(timeout=5).body == b"6"
    other.cancel(promise)
    for message in held[1:]:
        if not message.settled:
            message.ack()


def test_no_ack_consumer_takes_everything(c: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue)
    for i in range(5):
        c.publish("", queue, str(i))
    got: Queue = Queue()
    promise = c.consume(queue, callback=lambda p, m: got.put(m), prefetch_count=1, no_ack=True)
    messages = [got.get(timeout=5) for _ in range(5)]
    assert [m.body for m in messages] == [str(i).encode() for i in range(5)]
    with pytest.raises(MessageStateError, match="no_ack"):
        messages[0].ack()
    c.cancel(promise)
    assert _count(c, queue) == 0


def test_round_robin_priorities_and_exclusive_consumers(c: Any, other: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue)
    got: dict[str, list[bytes]] = {"a": [], "b": [], "high": []}

    def taker(name: str) -> Any:
        def take(promise: int, message: Message) -> None:
            got[name].append(message.body)
            message.ack()
        return take

    a = other.consume(queue, callback=taker("a"), prefetch_count=1)
    b = other.consume(queue, callback=taker("b"), prefetch_count=1)
    with pytest.raises(AccessRefused, match="in exclusive use"):
        c.consume(queue, callback=lambda p, m: None, exclusive=True)
    for i in range(10):
        c.publish("", queue, str(i))
    assert wait_until(lambda: len(got["a"]) + len(got["b"]) == 10)
    assert got["a"] and got["b"]  # shared, round-robin
    high = other.consume(queue, callback=taker("high"), arguments={"x-priority": 10})
    for i in range(5):
        c.publish("", queue, f"p{i}")
    assert wait_until(lambda: len(got["high"]) == 5)
    assert len(got["a"]) + len(got["b"]) == 10  # the higher-priority consumer had room for all
    for promise in (a, b, high):
        other.cancel(promise)
    only = other.consume(queue, callback=lambda p, m: None, exclusive=True)
    with pytest.raises(AccessRefused, match="in exclusive use"):
        c.consume(queue, callback=lambda p, m: None)
    other.cancel(only)


def test_single_active_consumer(c: Any, other: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue, arguments={"x-single-active-consumer": True})
    got: dict[str, list[bytes]] = {"first": [], "second": []}

    def taker(name: str) -> Any:
        def take(promise: int, message: Message) -> None:
            got[name].append(message.body)
            message.ack()
        return take

    first = other.consume(queue, callback=taker("first"), prefetch_count=1)
    second = other.consume(queue, callback=taker("second"), prefetch_count=1)
    for i in range(4):
        c.publish("", queue, str(i))
    assert wait_until(lambda: len(got["first"]) == 4)
    other.cancel(first)
    c.publish("", queue, b"after")
    assert wait_until(lambda: got["second"] == [b"after"])
    other.cancel(second)


def test_cancel_requeues_undelivered_and_keeps_held_ackable(c: Any, other: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue)
    for i in range(20):
        c.publish("", queue, str(i))
    held: list[Message] = []
    gate = Event()

    def slow(promise: int, message: Message) -> None:
        held.append(message)
        gate.wait()

    promise = other.consume(queue, callback=slow, prefetch_count=20)
    assert wait_until(lambda: len(held) == 1)
    other.cancel(promise)
    assert not other.has_consumer(promise)
    gate.set()
    gevent.sleep(0.1)
    assert len(held) == 1  # the rest were never handed to the callback after cancel
    held[0].ack()
    assert wait_until(lambda: _count(c, queue) == 19)
    rest = c.consume(queue, timeout=5)
    assert rest is not None and rest.body == b"1" and rest.redelivered
    rest.ack()
    with pytest.raises(ValueError, match="no consumer"):
        other.cancel(promise)


def test_deleting_a_queue_cancels_its_consumers(c: Any, other: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue)
    got: list[Message] = []
    cancelled: list[dict[str, Any]] = []

    def on_cancelled(sender: Any, **kwargs: Any) -> None:
        if sender is other:
            cancelled.append(kwargs)

    signals.consumer_cancelled.connect(on_cancelled)
    promise = other.consume(queue, callback=lambda p, m: got.append(m))
    c.publish("", queue, b"x")
    assert wait_until(lambda: got)
    try:
        assert c.queue_delete(queue) == {"message_count": 0}  # the unacked one is not counted
        assert wait_until(lambda: not other.has_consumer(promise))
    finally:
        signals.consumer_cancelled.disconnect(on_cancelled)
    assert cancelled == [{"promise": promise, "queue": queue}]
    got[0].ack()  # acking a message of a deleted queue is harmless
    c.queue_declare(queue)
    assert c.queue_declare(queue, passive=True)["consumer_count"] == 0


def test_a_blocked_consumer_callback_holds_up_only_its_own_consumer(c: Any, n: AMQPNames) -> None:
    slow_queue, fast_queue = n.queue("slow"), n.queue("fast")
    c.queue_declare(slow_queue)
    c.queue_declare(fast_queue)
    gate, slow_seen, fast_seen = Event(), [], []

    def slow(_promise: int, message: Message) -> None:
        slow_seen.append(message.body)
        gate.wait(5)  # blocks (as a sleep or a slow call would) until the test has seen the rest flow
        message.ack()

    def fast(_promise: int, message: Message) -> None:
        fast_seen.append(message.body)
        message.ack()

    slow_promise = c.consume(slow_queue, callback=slow)
    fast_promise = c.consume(fast_queue, callback=fast)
    for i in range(3):
        c.publish("", slow_queue, f"s{i}")
    assert wait_until(lambda: slow_seen == [b"s0"])
    confirms: Queue = Queue()
    for i in range(50):
        c.publish("", fast_queue, f"f{i}", callback=lambda _p, result: confirms.put(result))
    assert [confirms.get(timeout=5) for _ in range(50)] == [{}] * 50  # confirm callbacks keep flowing
    assert wait_until(lambda: len(fast_seen) == 50, timeout=5)
    assert not gate.is_set() and slow_seen == [b"s0"]  # all that while the slow callback was still blocked
    assert fast_seen == [f"f{i}".encode() for i in range(50)]
    gate.set()
    assert wait_until(lambda: slow_seen == [b"s0", b"s1", b"s2"])  # its own deliveries stay in order
    c.cancel(slow_promise)
    c.cancel(fast_promise)


def test_a_consumer_callback_can_wait_for_its_own_async_publish(c: Any, n: AMQPNames) -> None:
    source, target = n.queue("src"), n.queue("dst")
    c.queue_declare(source)
    c.queue_declare(target)
    outcomes: Queue = Queue()

    def forward(_promise: int, message: Message) -> None:
        confirmed: Queue = Queue()
        c.publish("", target, message.body, callback=lambda _p, result: confirmed.put(result))
        try:
            outcomes.put(confirmed.get(timeout=5))  # that callback must run while this one waits
        except Exception as exc:  # noqa: BLE001
            outcomes.put(exc)
        message.ack()

    promise = c.consume(source, callback=forward)
    c.publish("", source, b"ping")
    assert outcomes.get(timeout=10) == {}
    c.cancel(promise)
    assert _bodies(c, target) == [b"ping"]


def test_an_operation_callback_can_wait_for_another_ones(c: Any, n: AMQPNames) -> None:
    queue = n.queue()
    outcomes: Queue = Queue()

    def declared(_promise: int, result: Any) -> None:
        confirmed: Queue = Queue()
        c.publish("", result["queue"], b"x", callback=lambda _p, outcome: confirmed.put(outcome))
        try:
            outcomes.put(confirmed.get(timeout=5))  # queued behind this callback: another greenlet runs it
        except Exception as exc:  # noqa: BLE001
            outcomes.put(exc)

    c.queue_declare(queue, callback=declared)
    assert outcomes.get(timeout=10) == {}
    assert _bodies(c, queue) == [b"x"]


def test_callback_can_block_on_its_own_connection(c: Any, n: AMQPNames) -> None:
    source, target = n.queue("src"), n.queue("dst")
    c.queue_declare(source)
    c.queue_declare(target)
    done: Queue = Queue()

    def forward(promise: int, message: Message) -> None:
        c.publish("", target, message.body + b"!")
        done.put(c.queue_declare(target, passive=True)["message_count"])
        message.ack()

    promise = c.consume(source, callback=forward)
    c.publish("", source, b"ping")
    assert done.get(timeout=10) == 1
    assert _bodies(c, target) == [b"ping!"]
    c.cancel(promise)


def test_priority_queue(c: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue, arguments={"x-max-priority": 5})
    for body, priority in ((b"low", 1), (b"none", None), (b"high", 9), (b"mid", 3), (b"high2", 5)):
        c.publish("", queue, body, priority=priority)
    assert _bodies(c, queue) == [b"high", b"high2", b"mid", b"low", b"none"]


# -- dead-lettering, TTL, length limits -----------------------------------------------------------

def _dead_letter_setup(c: Any, n: AMQPNames, **arguments: Any) -> tuple[str, str, str]:
    dlx, dlq, queue = n.exchange("dlx"), n.queue("dlq"), n.queue("work")
    c.exchange_declare(dlx, "fanout")
    c.queue_declare(dlq)
    c.queue_bind(dlq, dlx)
    c.queue_declare(queue, arguments={"x-dead-letter-exchange": dlx, **arguments})
    return dlx, dlq, queue


def test_dead_letter_on_reject(c: Any, n: AMQPNames) -> None:
    dlx, dlq, queue = _dead_letter_setup(c, n)
    c.publish("", queue, b"bad", headers={"mine": 1}, expiration=60000, message_id="m1")
    message = c.get(queue)
    assert message is not None
    message.reject(requeue=False)
    dead = c.consume(dlq, timeout=5)
    assert dead is not None
    assert (dead.body, dead.exchange, dead.routing_key, dead.redelivered) == (b"bad", dlx, queue, False)
    assert dead.expiration is None and dead.message_id == "m1"
    death = dead.headers["x-death"]
    assert isinstance(death[0].pop("time"), datetime.datetime)
    assert death == [{"count": 1, "reason": "rejected", "queue": queue, "exchange": "", "routing-keys": [queue],
                      "original-expiration": "60000"}]
    assert {k: v for k, v in dead.headers.items() if k != "x-death"} == {
        "mine": 1, "x-first-death-exchange": "", "x-first-death-queue": queue,
        "x-first-death-reason": "rejected"}
    # Round two: the same queue and reason counts up, in place.
    c.publish("", queue, dead.body, headers=dead.headers)
    dead.ack()
    again = c.get(queue)
    assert again is not None
    again.nack(requeue=False)
    twice = c.consume(dlq, timeout=5)
    assert twice is not None
    assert [(d["count"], d["reason"], d["queue"]) for d in twice.headers["x-death"]] == [(2, "rejected", queue)]
    assert twice.headers["x-first-death-reason"] == "rejected"
    twice.ack()


def test_dead_letter_routing_key_and_missing_exchange(c: Any, n: AMQPNames) -> None:
    target, queue, nowhere = n.queue("target"), n.queue("work"), n.queue("nowhere")
    c.queue_declare(target)
    # The default exchange as dead-letter exchange, with a routing key naming the target queue.
    c.queue_declare(queue, arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": target})
    c.queue_declare(nowhere, arguments={"x-dead-letter-exchange": n.exchange("absent")})
    c.publish("", queue, b"to target")
    c.publish("", nowhere, b"dropped")
    for name in (queue, nowhere):
        message = c.get(name)
        assert message is not None
        message.reject(requeue=False)
    dead = c.consume(target, timeout=5)
    assert dead is not None and dead.body == b"to target" and dead.routing_key == target and dead.exchange == ""
    dead.ack()
    assert _count(c, nowhere) == 0


def test_dead_letter_on_expiry(c: Any, n: AMQPNames) -> None:
    dlx, dlq, queue = _dead_letter_setup(c, n)
    _, ttl_dlq, ttl_queue = _dead_letter_setup(c, n, **{"x-message-ttl": 50})
    c.publish("", queue, b"per message", expiration=50)
    c.publish("", ttl_queue, b"per queue")
    first = c.consume(dlq, timeout=5)
    second = c.consume(ttl_dlq, timeout=5)
    assert first is not None and second is not None
    assert first.body == b"per message" and second.body == b"per queue"
    assert first.headers["x-death"][0]["reason"] == "expired"
    assert first.headers["x-death"][0]["original-expiration"] == "50"
    assert second.headers["x-death"][0]["reason"] == "expired"
    assert "original-expiration" not in second.headers["x-death"][0]
    first.ack()
    second.ack()
    assert _count(c, queue) == 0 and _count(c, ttl_queue) == 0


def test_ttl_without_dead_letter_exchange_drops(c: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue, arguments={"x-message-ttl": 50})
    c.publish("", queue, b"gone soon")
    c.publish("", queue, b"kept", expiration=60000)  # the queue's TTL is shorter: both go
    gevent.sleep(0.3)
    assert c.get(queue) is None


def test_max_length(c: Any, n: AMQPNames) -> None:
    _, dlq, queue = _dead_letter_setup(c, n, **{"x-max-length": 2})
    for i in range(4):
        c.publish("", queue, str(i))
    assert _count(c, queue) == 2
    assert _bodies(c, queue) == [b"2", b"3"]
    dropped = [c.consume(dlq, timeout=5) for _ in range(2)]
    assert [(m.body, m.headers["x-death"][0]["reason"]) for m in dropped if m is not None] == [
        (b"0", "maxlen"), (b"1", "maxlen")]
    for message in dropped:
        assert message is not None
        message.ack()
    refusing = n.queue("refusing")
    c.queue_declare(refusing, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    c.publish("", refusing, b"fits")
    with pytest.raises(PublishNacked):
        c.publish("", refusing, b"refused")
    results: Queue = Queue()
    c.publish("", refusing, b"refused too", callback=lambda p, r: results.put(r))
    assert isinstance(results.get(timeout=10), PublishNacked)
    assert _bodies(c, refusing) == [b"fits"]
    bounded = n.queue("bytes")
    c.queue_declare(bounded, arguments={"x-max-length-bytes": 10})
    for body in (b"12345", b"67890", b"abc"):
        c.publish("", bounded, body)
    assert _bodies(c, bounded) == [b"67890", b"abc"]


# -- request / reply -------------------------------------------------------------------------------

def _echo_server(conn: Any, queue: str, delay: float = 0.0) -> int:
    def answer(promise: int, request: Message) -> None:
        if delay:
            gevent.sleep(delay)
        conn.publish("", request.reply_to, body=b"echo:" + request.body, correlation_id=request.correlation_id)
        request.ack()

    return conn.consume(queue, callback=answer)  # type: ignore[no-any-return]


def test_call_round_trip_timeout_and_unroutable(c: Any, other: Any, n: AMQPNames) -> None:
    queue, slow_queue = n.queue("rpc"), n.queue("slow")
    c.queue_declare(queue)
    c.queue_declare(slow_queue)
    server = _echo_server(other, queue)
    slow = _echo_server(other, slow_queue, delay=0.3)
    reply = c.call("", queue, b"ping", timeout=5, headers={"h": 1}, message_id="req-1")
    assert reply.body == b"echo:ping" and reply.correlation_id.startswith("rpc-")
    jobs = [gevent.spawn(c.call, "", queue, str(i), timeout=5) for i in range(20)]
    gevent.joinall(jobs, raise_error=True)
    assert sorted(job.value.body for job in jobs) == sorted(f"echo:{i}".encode() for i in range(20))
    with pytest.raises(Timeout):
        c.call("", slow_queue, b"late", timeout=0.1)
    gevent.sleep(0.4)  # the late reply arrives and is dropped
    assert c.call("", queue, b"again", timeout=5).body == b"echo:again"
    with pytest.raises(Unroutable):
        c.call("", n.queue("nobody"), b"?", timeout=5)
    other.cancel(server)
    other.cancel(slow)


# -- stats, signals, listeners ---------------------------------------------------------------------

def test_stats_and_signals_count_the_same(c: Any, n: AMQPNames) -> None:
    queue, exchange = n.queue(), n.exchange()
    c.queue_declare(queue)
    c.exchange_declare(exchange, "fanout")
    events: list[tuple[str, dict[str, Any]]] = []
    names = ["message_published", "message_confirmed", "message_returned", "message_received",
             "message_acked", "message_rejected"]
    handlers = []
    for name in names:
        def handler(sender: Any, _name: str = name, **kwargs: Any) -> None:
            if sender is c:
                events.append((_name, kwargs))
        getattr(signals, name).connect(handler)
        handlers.append((getattr(signals, name), handler))
    before = dict(c.stats)
    try:
        c.publish("", queue, b"12345")
        with pytest.raises(Unroutable):
            c.publish(exchange, "rk", b"x", mandatory=True)
        first = c.get(queue)
        assert first is not None
        first.reject(requeue=True)
        assert wait_until(lambda: _count(c, queue) == 1)
        second = c.get(queue)
        assert second is not None
        second.ack()
    finally:
        for signal, handler in handlers:
            signal.disconnect(handler)
    assert [name for name, _ in events] == [
        "message_published", "message_confirmed", "message_published", "message_returned", "message_received",
        "message_rejected", "message_received", "message_acked"]
    published = events[0][1]
    assert (published["exchange"], published["routing_key"], published["body_size"]) == ("", queue, 5)
    assert events[1][1]["seconds"] > 0 and isinstance(events[3][1]["error"], Unroutable)
    assert events[5][1]["requeue"] is True and events[5][1]["message"] is first
    delta = {key: c.stats[key] - before[key] for key in ("published", "confirmed", "failed", "delivered",
                                                         "acked", "rejected")}
    assert delta == {"published": 2, "confirmed": 1, "failed": 1, "delivered": 2, "acked": 1, "rejected": 1}


def test_listener_acks_and_requeues(api: AMQPState, c: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue)
    seen: Queue = Queue()
    failed_once: list[bytes] = []

    def handle(connection: Any, promise: int, message: Message) -> None:
        if message.body == b"flaky" and not failed_once:
            failed_once.append(message.body)
            raise RuntimeError("first attempt fails (expected in this test)")
        seen.put((message.body, message.redelivered))

    listener = api.register_and_spawn_amqp_listener(queue, handle, prefetch_count=5)
    c.publish("", queue, b"fine")
    c.publish("", queue, b"flaky")
    got = {seen.get(timeout=5), seen.get(timeout=5)}
    assert got == {(b"fine", False), (b"flaky", True)}
    assert wait_until(lambda: listener.stats == {"received": 3, "handled": 2, "failed": 1})
    assert listener.stop(timeout=5)
    assert _count(c, queue) == 0


def test_dead_letter_chains_and_cycles(c: Any, n: AMQPNames) -> None:
    # work --(reject)--> retry (TTL) --(expired)--> work: a retry loop, allowed because of the rejection.
    work, retry, final = n.queue("work"), n.queue("retry"), n.queue("final")
    c.queue_declare(retry, arguments={"x-message-ttl": 30, "x-dead-letter-exchange": "",
                                      "x-dead-letter-routing-key": work})
    c.queue_declare(work, arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": retry})
    c.publish("", work, b"job", headers={"attempt": 1})
    first = c.consume(work, timeout=5)
    assert first is not None
    first.reject(requeue=False)
    back = c.consume(work, timeout=5)
    assert back is not None and back.body == b"job"
    assert [(d["queue"], d["reason"], d["count"]) for d in back.headers["x-death"]] == [
        (retry, "expired", 1), (work, "rejected", 1)]
    assert back.headers["x-first-death-queue"] == work and back.headers["x-first-death-reason"] == "rejected"
    back.ack()
    # A loop without any rejection (expiry into itself) drops the message the second time round.
    loop = n.queue("loop")
    c.queue_declare(loop, arguments={"x-message-ttl": 20, "x-dead-letter-exchange": "",
                                     "x-dead-letter-routing-key": loop})
    c.queue_declare(final)
    c.publish("", loop, b"round and round")
    gevent.sleep(0.4)
    assert _count(c, loop) == 0


def test_reject_publish_dlx_and_zero_ttl(c: Any, other: Any, n: AMQPNames) -> None:
    _, dlq, queue = _dead_letter_setup(c, n, **{"x-max-length": 1, "x-overflow": "reject-publish-dlx"})
    c.publish("", queue, b"fits")
    with pytest.raises(PublishNacked):
        c.publish("", queue, b"overflow")
    dead = c.consume(dlq, timeout=5)
    assert dead is not None and dead.body == b"overflow" and dead.headers["x-death"][0]["reason"] == "maxlen"
    dead.ack()
    assert _bodies(c, queue) == [b"fits"]
    # expiration=0: delivered if a consumer can take it at once, else expired at once.
    _, zero_dlq, zero = _dead_letter_setup(c, n)
    c.publish("", zero, b"nobody waiting", expiration=0)
    expired = c.consume(zero_dlq, timeout=5)
    assert expired is not None and expired.body == b"nobody waiting"
    expired.ack()
    got: Queue = Queue()
    promise = other.consume(zero, callback=lambda p, m: (got.put(m.body), m.ack()))
    c.publish("", zero, b"taken at once", expiration=0)
    assert got.get(timeout=5) == b"taken at once"
    other.cancel(promise)


def test_purge_leaves_unacked_and_counts_consumers(c: Any, other: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue)
    for body in (b"a", b"b", b"c"):
        c.publish("", queue, body)
    held = c.get(queue)
    assert held is not None
    assert c.queue_purge(queue) == {"message_count": 2}
    held.reject(requeue=True)  # an unacked message survives a purge
    again = c.consume(queue, timeout=5)
    assert again is not None and again.body == b"a" and again.redelivered
    again.ack()
    promises = [other.consume(queue, callback=lambda p, m: None) for _ in range(2)]
    assert c.queue_declare(queue, passive=True) == {"queue": queue, "message_count": 0, "consumer_count": 2}
    for promise in promises:
        other.cancel(promise)
    assert c.queue_declare(queue)["consumer_count"] == 0


def test_requeue_keeps_publish_order(c: Any, other: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue)
    for i in range(5):
        c.publish("", queue, str(i))
    got: Queue = Queue()
    promise = other.consume(queue, callback=lambda p, m: got.put(m), prefetch_count=5)
    held = [got.get(timeout=5) for _ in range(5)]
    other.cancel(promise)
    for index in (3, 1, 4, 0, 2):  # requeued out of order...
        held[index].reject(requeue=True)
    assert wait_until(lambda: _count(c, queue) == 5)
    assert _bodies(c, queue) == [str(i).encode() for i in range(5)]  # ...they come back in publish order


def test_one_shot_no_ack_consume_takes_exactly_one(c: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue)
    for i in range(3):
        c.publish("", queue, str(i))
    before = dict(c.stats)
    taken = [c.consume(queue, no_ack=True, timeout=5) for _ in range(3)]
    assert [(m.body, m.redelivered) for m in taken if m is not None] == [(b"0", False), (b"1", False), (b"2", False)]
    assert (c.stats["delivered"] - before["delivered"], c.stats["acked"] - before["acked"],
            c.stats["rejected"] - before["rejected"]) == (3, 0, 0)


def test_qos_keeps_an_auto_delete_queue(c: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue, auto_delete=True)
    got: Queue = Queue()
    promise = c.consume(queue, callback=lambda p, m: got.put(m), prefetch_count=1)
    c.qos(promise, 2)
    assert c.queue_declare(queue, passive=True)["consumer_count"] == 1
    for body in (b"a", b"b", b"c"):
        c.publish("", queue, body)
    held = [got.get(timeout=5), got.get(timeout=5)]
    gevent.sleep(0.1)
    assert got.empty() and [m.body for m in held] == [b"a", b"b"]
    for message in held:
        message.ack()
    got.get(timeout=5).ack()
    c.cancel(promise)


def test_a_refused_request_fails_its_call_at_once(c: Any, other: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue)
    started = time.monotonic()
    with pytest.raises(NotFound):
        c.call(n.exchange("absent"), "rk", b"x", timeout=5)
    with pytest.raises(PreconditionFailed, match="user_id"):
        c.call("", queue, b"x", timeout=5, user_id="somebody-else")
    assert time.monotonic() - started < 2
    server = _echo_server(other, queue)
    assert c.call("", queue, b"after", timeout=5).body == b"echo:after"
    other.cancel(server)


def test_connection_loss_and_recovery(c: Any, other: Any, n: AMQPNames) -> None:
    queue, waiting = n.queue(), n.queue("waiting")
    c.queue_declare(queue)
    c.queue_declare(waiting)
    exclusive = other.queue_declare("", exclusive=True)["queue"]
    got: Queue = Queue()
    resumed = other.consume(queue, callback=lambda p, m: got.put(m))
    stranded = other.consume(exclusive, callback=lambda p, m: None)
    c.publish("", queue, b"held")
    held = got.get(timeout=5)
    waiter = gevent.spawn(outcome, other.consume, waiting, timeout=30)
    gevent.sleep(0.1)
    _cut(other, "fidelity cut")
    error = waiter.get(timeout=10)
    assert isinstance(error, ConnectionLost) and "fidelity cut" in str(error)
    with pytest.raises(MessageStateError, match="deliver it again"):
        held.ack()
    again = got.get(timeout=15)  # its consumer resumed by itself, and the unacked message came back
    assert again.body == b"held" and again.redelivered
    again.ack()
    assert wait_until(lambda: not other.has_consumer(stranded), timeout=15)  # its queue died with the connection
    assert other.has_consumer(resumed) and other.stats["lost"] == 1
    with pytest.raises(NotFound):
        c.queue_declare(exclusive, passive=True)
    other.cancel(resumed)


# -- every operation in both forms (issue 13) -------------------------------------------------------

def _async(operation: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``operation`` with ``callback=``: a promise comes back before any outcome; return that outcome."""
    delivered: Queue = Queue()
    promise = operation(*args, callback=lambda p, r: delivered.put((p, r)), **kwargs)
    assert isinstance(promise, int) and not isinstance(promise, bool)
    assert delivered.empty()  # returned at once: the outcome comes later, in the callback greenlet
    got, result = delivered.get(timeout=10)
    assert got == promise
    return result


def test_get_sync_async_and_async_error(c: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue)
    for body in (b"one", b"two"):
        c.publish("", queue, body)
    first = c.get(queue)
    assert isinstance(first, Message) and first.body == b"one"
    first.ack()
    second = _async(c.get, queue)
    assert isinstance(second, Message) and second.body == b"two"
    second.ack()
    assert c.get(queue) is None
    assert _async(c.get, queue) is None  # empty
    missing = _async(c.get, n.queue("absent"))
    assert isinstance(missing, NotFound)  # delivered, not raised
    assert c.get(queue) is None  # and the connection carries on
    with pytest.raises(ValueError, match="queue"):
        c.get("x" * 256, callback=lambda p, r: None)  # argument errors are raised at the call


def test_cancel_and_qos_sync_async_and_their_errors(c: Any, other: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue)
    held: list[Message] = []
    promise = other.consume(queue, callback=lambda p, m: held.append(m), prefetch_count=1)
    assert other.qos(promise, 2) is None  # today's spelling
    assert _async(other.qos, prefetch_count=3) is None  # Nucleon's: the connection's only consumer
    for i in range(10):
        c.publish("", queue, str(i))
    assert wait_until(lambda: len(held) == 3)
    gevent.sleep(0.2)
    assert len(held) == 3  # the window qos(prefetch_count=3) set
    assert other.qos(prefetch_count=4, promise=promise) is None  # naming the consumer
    assert wait_until(lambda: len(held) == 7)  # a new window of four
    second = other.consume(queue, callback=lambda p, m: None, prefetch_count=1)
    with pytest.raises(ValueError, match="promise="):
        other.qos(prefetch_count=5, callback=lambda p, r: None)  # two consumers: which one?
    with pytest.raises(ValueError, match="no consumer"):
        other.qos(12345678, 5, callback=lambda p, r: None)
    assert other.cancel(second) is None
    assert _async(other.cancel, promise) is None
    assert not other.has_consumer(promise)
    with pytest.raises(ValueError, match="no consumer"):
        other.cancel(promise, callback=lambda p, r: None)  # argument error: raised, not delivered
    for message in held:
        message.ack()
    assert len(_bodies(c, queue)) == 3


# Each topology method: (set-up, the call, the expected result, a failing call, the error it fails with).
_TOPOLOGY: list[tuple[str, Any, Any, Any, type[Exception]]] = [
    ("exchange_declare", lambda c, x, y, q: c.exchange_declare(x, "fanout"), {},
     lambda c, x, y, q: c.exchange_declare(x, "topic"), PreconditionFailed),
    ("exchange_declare passive", lambda c, x, y, q: c.exchange_declare(x, passive=True), {},
     lambda c, x, y, q: c.exchange_declare(x + "-absent", passive=True), NotFound),
    ("exchange_bind", lambda c, x, y, q: c.exchange_bind(y, x, "k"), {},
     lambda c, x, y, q: c.exchange_bind(y, x + "-absent", "k"), NotFound),
    ("exchange_unbind", lambda c, x, y, q: c.exchange_unbind(y, x, "k"), {},
     lambda c, x, y, q: c.exchange_unbind(y, "", "k"), AccessRefused),
    ("exchange_delete", lambda c, x, y, q: c.exchange_delete(y), {},
     lambda c, x, y, q: c.exchange_delete("amq.direct"), AccessRefused),
    ("queue_declare", lambda c, x, y, q: c.queue_declare(q), None,
     lambda c, x, y, q: c.queue_declare(q + "-absent", passive=True), NotFound),
    ("queue_bind", lambda c, x, y, q: c.queue_bind(q, x, "k"), {},
     lambda c, x, y, q: c.queue_bind(q, x + "-absent", "k"), NotFound),
    ("queue_unbind", lambda c, x, y, q: c.queue_unbind(q, x, "k"), {},
     lambda c, x, y, q: c.queue_unbind(q, "", "k"), AccessRefused),
    ("queue_purge", lambda c, x, y, q: c.queue_purge(q), {"message_count": 0},
     lambda c, x, y, q: c.queue_purge(q + "-absent"), NotFound),
    ("queue_delete", lambda c, x, y, q: c.queue_delete(q), {"message_count": 0},
     lambda c, x, y, q: c.queue_delete(q, if_empty=True), PreconditionFailed),
]


def _with_callback(call: Any, c: Any, *names: str) -> Any:
    """Run one of the table's calls on ``c`` with callback=, through :func:`_async`."""
    class Async:
        def __getattr__(self, method: str) -> Any:
            return lambda *args, **kwargs: _async(getattr(c, method), *args, **kwargs)
    return call(Async(), *names)


@pytest.mark.parametrize("operation", [row[0] for row in _TOPOLOGY])
def test_topology_sync_async_and_async_error(c: Any, n: AMQPNames, operation: str) -> None:
    _, call, expected, failing, error = next(row for row in _TOPOLOGY if row[0] == operation)
    names = (n.exchange("x"), n.exchange("y"), n.queue())

    def set_up() -> None:
        c.exchange_declare(names[0], "fanout")
        c.exchange_declare(names[1], "fanout")
        c.queue_declare(names[2])
        c.exchange_bind(names[1], names[0], "k")
        c.queue_bind(names[2], names[0], "k")

    for form in ("sync", "async"):
        set_up()
        result = call(c, *names) if form == "sync" else _with_callback(call, c, *names)
        if expected is None:  # queue_declare
            assert result == {"queue": names[2], "message_count": 0, "consumer_count": 0}
        else:
            assert result == expected
    set_up()
    c.publish("", names[2], b"makes the queue non-empty")
    failed = _with_callback(failing, c, *names)
    assert isinstance(failed, error), failed  # delivered to the callback, not raised
    with pytest.raises(error):
        failing(c, *names)
    assert c.queue_declare(names[2], passive=True)["queue"] == names[2]  # the connection carries on
    c.queue_purge(names[2])


def test_passive_exchange_declare_creates_nothing_and_fails_only_its_caller(c: Any, n: AMQPNames) -> None:
    absent, kept = n.exchange("absent"), n.queue("kept")
    c.queue_declare(kept)
    others = [gevent.spawn(c.publish, "", kept, str(i)) for i in range(20)]
    with pytest.raises(NotFound, match="absent"):
        c.exchange_declare(absent, passive=True)
    gevent.joinall(others, raise_error=True)  # the publishes around it are all confirmed
    with pytest.raises(NotFound):
        c.exchange_declare(absent, passive=True)  # still not created
    assert _count(c, kept) == 20


def test_call_sync_async_and_async_error(c: Any, other: Any, n: AMQPNames) -> None:
    queue = n.queue("rpc")
    c.queue_declare(queue)
    server = _echo_server(other, queue)
    assert c.call("", queue, b"sync", timeout=5).body == b"echo:sync"
    reply = _async(c.call, "", queue, b"async", timeout=5)
    assert isinstance(reply, Message) and reply.body == b"echo:async"
    refused = _async(c.call, "", n.queue("nobody"), b"?", timeout=5)
    assert isinstance(refused, Unroutable)
    with pytest.raises(ValueError, match="priority"):
        c.call("", queue, b"x", priority=999, callback=lambda p, r: None)
    other.cancel(server)


def test_publish_and_consume_sync_async_and_async_error(c: Any, n: AMQPNames) -> None:
    queue = n.queue()
    c.queue_declare(queue)
    assert c.publish("", queue, b"sync") is None
    assert _async(c.publish, "", queue, b"async") == {}
    assert isinstance(_async(c.publish, n.exchange("absent"), "k", b"x"), NotFound)
    message = c.consume(queue, timeout=5)
    assert message is not None and message.body == b"sync"
    message.ack()
    got: Queue = Queue()
    promise = c.consume(queue, callback=lambda p, m: got.put((p, m)))  # the handler: one call per message
    assert isinstance(promise, int)
    delivered_promise, delivered = got.get(timeout=10)
    assert delivered_promise == promise and delivered.body == b"async"
    delivered.ack()
    c.cancel(promise)


def test_close_sync_and_async(spare: Any) -> None:
    first, second = spare(), spare()
    first.ensure_open()
    second.ensure_open()
    assert first.close(timeout=5) is None and not first.is_open
    closed: Queue = Queue()
    promise = second.close(timeout=5, callback=lambda p, r: closed.put((p, r)))
    assert isinstance(promise, int)
    assert closed.get(timeout=10) == (promise, None)
    assert not second.is_open
