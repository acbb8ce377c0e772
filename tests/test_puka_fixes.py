"""Each fix of flask_nucleon_amqp._puka and _puka_client, proven against the real broker (defect numbers as there)."""

from __future__ import annotations

import datetime
import decimal
import socket
import subprocess
import time
import types
import uuid
from typing import Any

import gevent
import pytest
from gevent.queue import Queue
from puka import spec as puka_spec
from puka import table as puka_table

from flask_nucleon_amqp import (
    AMQP,
    ConnectionError,
    Message,
    NotFound,
    PublishNacked,
    PublishOutcomeUnknown,
    PukaConnection,
    Unroutable,
    _codec,
    _puka,
    _puka_client,
)

from conftest import BROKER_HOST, BROKER_PORT, Names, make_app, wait_until


def test_binary_bodies_round_trip_byte_exact(conn: PukaConnection, names: Names) -> None:  # D1
    queue = names.queue()
    conn.queue_declare(queue)
    bodies = [bytes(range(256)), b"\xff\xfe\x00\x80", b"", "é".encode("latin-1"), b"plain"]
    for body in bodies:
        conn.publish("", queue, body)
    for body in bodies:
        message = conn.get(queue)
        assert message is not None
        assert type(message.body) is bytes and message.body == body
        message.ack()


def test_unicode_header_keys_and_values_round_trip(conn: PukaConnection, names: Names) -> None:  # D3
    queue = names.queue()
    conn.queue_declare(queue)
    headers = {"é": "é", "n": {"ü": ["ß", 1, 2.5, True, None]}, "emoji": "\N{SNAKE}", "big": 2**40,
               "neg": -7, "dec": decimal.Decimal("1.25"), "when": datetime.datetime(2020, 1, 2, 3, 4, 5)}
    conn.publish("", queue, b"x", headers=headers)
    message = conn.get(queue)
    assert message is not None
    assert message.headers == headers
    message.ack()
    assert conn.is_open  # the broker did not kill the connection (it used to: 541)


def test_non_utf8_header_bytes_come_back_as_bytes(conn: PukaConnection, names: Names) -> None:  # D5
    queue = names.queue()
    conn.queue_declare(queue)
    conn.publish("", queue, b"x", headers={"raw": b"\xff\xfe", "ok": b"text"})
    message = conn.get(queue)
    assert message is not None
    assert message.headers == {"raw": b"\xff\xfe", "ok": "text"}
    message.ack()


def test_non_ascii_names_and_short_strings(conn: PukaConnection, names: Names) -> None:  # D4
    queue = names.queue("qé-ü")
    conn.queue_declare(queue)
    conn.publish("", queue, "ünïcode body", correlation_id="é-1", message_id="ß", app_id="ñ")
    message = conn.get(queue)
    assert message is not None
    assert message.routing_key == queue
    assert (message.text, message.correlation_id, message.message_id, message.app_id) == (
        "ünïcode body", "é-1", "ß", "ñ")
    message.ack()


def test_broker_nack_fails_the_publish_and_keeps_the_connection(conn: PukaConnection, names: Names) -> None:  # D6
    queue = names.queue()
    conn.queue_declare(queue, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    conn.publish("", queue, b"fits")
    with pytest.raises(PublishNacked):
        conn.publish("", queue, b"refused")
    results: Queue = Queue()
    conn.publish("", queue, b"refused too", callback=lambda p, r: results.put(r))
    assert isinstance(results.get(timeout=10), PublishNacked)
    assert conn.queue_purge(queue) == {"message_count": 1}
    conn.publish("", queue, b"accepted again")  # same connection still confirms


def test_failed_encoding_does_not_shift_confirms(conn: PukaConnection, names: Names) -> None:  # D7, D8
    queue, exchange = names.queue(), names.exchange()
    conn.queue_declare(queue)
    conn.exchange_declare(exchange, "fanout")
    session = conn._session
    with pytest.raises(TypeError):
        conn.publish("", queue, b"x", headers={"bad": {1, 2}})
    with pytest.raises(ValueError):
        conn.queue_declare("x" * 300)
    with pytest.raises(TypeError):
        conn.queue_declare(names.queue(), arguments={"x-bad": object()})
    conn.publish("", queue, b"after")  # confirmed: its own confirm, not a neighbour's
    with pytest.raises(Unroutable):  # the return lands on the right message
        conn.publish(exchange, "", b"nobody", mandatory=True)
    assert conn._session is session
    assert conn.queue_purge(queue) == {"message_count": 1}


def test_unexpected_frames_are_dropped_not_fatal(conn: PukaConnection, names: Names) -> None:  # D9, D19
    queue = names.queue()
    conn.queue_declare(queue)
    got: list[Message] = []
    promise = conn.consume(queue, callback=lambda p, m: got.append(m))
    conn.publish("", queue, b"x")
    assert wait_until(lambda: got)
    session = conn._session
    conn.queue_delete(queue)  # the broker cancels the consumer (basic.cancel)
    assert wait_until(lambda: not conn.has_consumer(promise))
    assert conn._session is session and conn.is_open
    names.queues.remove(queue)
    assert conn.queue_declare(names.queue())["consumer_count"] == 0


def test_methods_nobody_asked_for_are_dropped(conn: PukaConnection, names: Names) -> None:  # D9
    # Two frames RabbitMQ may send unasked (after its own channel.close, or a second qos-ok):
    # a method the promise has no handler for, and one for a channel no promise owns.
    queue = names.queue()
    conn.queue_declare(queue)
    # The default exchange's publish channel opens now, not later from the free list (taking the channel below).
    conn.publish("", queue, b"first")
    got: Queue = Queue()
    promise = conn.consume(queue, callback=lambda p, m: got.put(m))
    first = got.get(timeout=10)
    assert first.body == b"first"
    first.ack()
    conn.queue_declare(queue, passive=True)  # its channel goes back to puka's free list, owned by no promise
    session = conn._session
    assert session is not None
    client = session.client
    busy = client.channel_number(conn._consumers[promise].puka_number)
    free = [channel.number for channel in client.channels.free_channels if channel.number not in (0, busy)]
    assert busy is not None and free
    qos = puka_spec.encode_basic_qos(0, 0, False)  # answered with a basic.qos-ok on the same channel
    client.send_frames(busy, qos)  # the consumer's promise does not expect a qos-ok now
    client.send_frames(free[0], qos)  # nobody owns this channel
    session.schedule_flush()
    conn.publish("", queue, b"still here")
    message = got.get(timeout=10)
    assert message.body == b"still here"
    assert conn._session is session and conn.is_open  # neither frame killed the connection
    message.ack()
    conn.cancel(promise)


def test_dead_client_raises_connection_broken_not_attribute_error() -> None:  # D12
    client = _puka_client.FixedClient("127.0.0.1", 1, "guest", "guest", "/")
    client.sd = None
    client.send_buf = None
    with pytest.raises(_puka.ConnectionBroken):
        client.fileno()
    with pytest.raises(_puka.ConnectionBroken):
        client._send(b"x")


def test_tcp_nodelay_is_set(conn: PukaConnection) -> None:  # D15
    conn.queue_declare("", exclusive=True)
    sd = conn._session.client.sd  # type: ignore[union-attr]
    assert sd.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_body_framing_uses_views_of_the_body() -> None:  # D16
    body = bytes(64 << 20)
    frames = _puka._body_frames(body, 131072)
    assert len(frames) == -(-len(body) // (131072 - 8))
    assert all(isinstance(payload, memoryview) and len(payload) <= 131072 - 8 for _, payload in frames)
    assert sum(len(payload) for _, payload in frames) == len(body)


def test_a_shared_publish_channel_fails_the_others_as_outcome_unknown(
        conn: PukaConnection, names: Names, monkeypatch: pytest.MonkeyPatch) -> None:  # D23
    """Beyond the per-exchange channels, exchanges share one: a 404 there is not the others' NotFound."""
    monkeypatch.setattr(_puka_client.FixedClient, "x_exchange_channel_limit", 0)
    queue, missing = names.queue(), names.exchange("absent")
    conn.queue_declare(queue)
    results: Queue = Queue()
    batch = [("", b"g1"), (missing, b"bad"), ("", b"g2"), ("", b"g3")]
    for exchange, body in batch:
        conn.publish(exchange, queue, body, callback=lambda _p, result, body=body: results.put((body, result)))  # type: ignore[misc]
    outcomes = dict(results.get(timeout=10) for _ in batch)
    assert isinstance(outcomes.pop(b"bad"), NotFound)
    assert all(result == {} or isinstance(result, PublishOutcomeUnknown) for result in outcomes.values()), outcomes
    assert any(isinstance(result, PublishOutcomeUnknown) for result in outcomes.values())  # g2, g3 were in flight
    confirmed = {body for body, result in outcomes.items() if result == {}}
    held = []
    while (message := conn.get(queue, no_ack=True)) is not None:
        held.append(message.body)
    assert confirmed <= set(held) and len(held) == len(set(held))
    conn.publish("", queue, b"after")  # the shared channel was reopened


def test_cancel_right_after_consume_and_qos(conn: PukaConnection, names: Names) -> None:  # D17
    queue = names.queue()
    conn.queue_declare(queue)
    for _ in range(20):
        promise = conn.consume(queue, callback=lambda p, m: None)
        conn.qos(promise, 3)
        conn.cancel(promise)
    assert conn.queue_declare(queue, passive=True)["consumer_count"] == 0
    assert conn.is_open


def test_fire_and_forget_promises_are_freed(conn: PukaConnection, names: Names) -> None:  # D22
    queue = names.queue()
    conn.queue_declare(queue)
    done: list[Any] = []
    for i in range(500):
        conn.publish("", queue, str(i), callback=lambda p, r: done.append(r))
    assert wait_until(lambda: len(done) == 500)
    assert len(conn._session.client.promises.all()) < 10  # type: ignore[union-attr]


def test_property_names_in_headers_stay_headers(conn: PukaConnection, names: Names) -> None:  # D24
    queue = names.queue()
    conn.queue_declare(queue)
    conn.publish("", queue, b"x", headers={"priority": "high", "type_": "t", "timestamp": "now"})
    message = conn.get(queue)
    assert message is not None
    assert message.headers == {"priority": "high", "type_": "t", "timestamp": "now"}
    assert message.priority is None and message.timestamp is None
    message.ack()


class _NoUtcFromTimestamp(datetime.datetime):
    """datetime, minus utcfromtimestamp: deprecated from Python 3.12 (a warning there), failing here on any Python."""

    @classmethod
    def utcfromtimestamp(cls, _seconds: float) -> datetime.datetime:  # type: ignore[override]
        raise AssertionError("the deprecated datetime.utcfromtimestamp was called")


def test_timestamp_header_decodes_without_deprecated_calls(conn: PukaConnection, names: Names,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # D27
    # puka decodes timestamps with datetime.utcfromtimestamp, which warns only from Python 3.12:
    # on every Python, its module sees a datetime without it, so calling it fails the test.
    monkeypatch.setattr(puka_table, "datetime", types.SimpleNamespace(datetime=_NoUtcFromTimestamp))
    queue = names.queue()
    conn.queue_declare(queue)
    when = datetime.datetime(2030, 6, 7, 8, 9, 10)
    conn.publish("", queue, b"x", headers={"when": when})
    # Our codec decodes the headers now (puka's decoder is not on the delivery path): it must not call it either.
    monkeypatch.setattr(_codec, "datetime", types.SimpleNamespace(
        datetime=_NoUtcFromTimestamp, timedelta=datetime.timedelta, timezone=datetime.timezone, date=datetime.date))
    message = conn.get(queue)
    assert message is not None and message.headers["when"] == when
    message.ack()


def test_non_ascii_queue_arguments_and_client_properties(conn: PukaConnection, names: Names) -> None:  # D3
    # puka packs a table string's len() in characters: a non-ASCII value makes a frame RabbitMQ
    # refuses with 501 FRAME_ERROR, closing the whole connection.
    dead_letters, queue, parked = names.exchange("échange-mort"), names.queue("file-d'attente"), names.queue("parké")
    conn.exchange_declare(dead_letters, "fanout")
    conn.queue_declare(parked)
    conn.queue_bind(parked, dead_letters)
    conn.queue_declare(queue, arguments={"x-dead-letter-exchange": dead_letters, "x-note": "ünïcode ✓"})
    conn.publish("", queue, b"rejected")
    message = conn.get(queue)
    assert message is not None
    message.reject(requeue=False)
    dead = conn.consume(parked, timeout=10)
    assert dead is not None and dead.body == b"rejected"
    assert dead.headers["x-death"][0]["queue"] == queue  # RabbitMQ read the exchange name right
    dead.ack()
    assert conn.is_open


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


def test_non_ascii_credentials_and_vhost(names: Names) -> None:  # D4
    # puka packs len() of str credentials and vhost: characters, not bytes. A user, password and
    # vhost with non-ASCII characters, made for this test and removed after it.
    tag = uuid.uuid4().hex[:8]
    user, password, vhost = f"usér-{tag}", f"mot-de-passe-é-{tag}", f"hôte-{tag}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("add_user", user, password)
        _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        app = make_app(AMQP_POOLS={"publish": {"host": BROKER_HOST, "port": BROKER_PORT, "user": user,
                                               "password": password, "vhost": vhost}})
        AMQP(app)
        state = app.extensions["amqp"]
        try:
            conn = state.connection("publish")
            queue = conn.queue_declare("", exclusive=True)["queue"]
            conn.publish("", queue, b"in the vhost")
            message = conn.get(queue)
            assert message is not None and message.body == b"in the vhost"
        finally:
            state.close(timeout=5)
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True, timeout=120)
        _rabbitmqctl("delete_vhost", vhost)


def test_garbage_from_the_peer_fails_fast_instead_of_poisoning(names: Names) -> None:  # D2, D13
    server = gevent.socket.socket()
    server.bind((BROKER_HOST, 0))
    server.listen(1)

    def answer_garbage() -> None:
        peer, _ = server.accept()
        try:
            peer.recv(8)
            peer.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" * 4)
            gevent.sleep(5)
        finally:
            peer.close()

    answering = gevent.spawn(answer_garbage)
    try:
        app = make_app(AMQP_POOLS={"publish": {"port": server.getsockname()[1], "connect_timeout": 5}})
        AMQP(app)
        started = time.monotonic()
        with pytest.raises(ConnectionError):
            app.extensions["amqp"].publish("", "q", b"x")
        assert time.monotonic() - started < 2  # failed on the bad frame, not on the timeout
    finally:
        answering.kill()
        server.close()


def test_table_encoding_errors_name_the_key() -> None:  # D3, D24
    with pytest.raises(TypeError, match=r"headers\['a'\]\['b'\]\[1\]"):
        _puka.encode_table({"a": {"b": [1, object()]}}, "headers")
    with pytest.raises(ValueError, match="64 bits"):
        _puka.encode_table({"a": 2**64}, "headers")
    with pytest.raises(ValueError, match="255"):
        _puka.encode_table({"k" * 300: 1}, "headers")
    assert _puka.encode_table({"é": "é"}) == b"\x00\x00\x00\x0a\x02\xc3\xa9S\x00\x00\x00\x02\xc3\xa9"


def test_a_channel_nacking_everything_is_replaced_at_most_every_30s(conn: PukaConnection, names: Names) -> None:
    """RabbitMQ can leave a channel that nacks every publish (stale state after a quorum leader change):
    after 2 s of nothing but nacks the connection starts a new session, and not again within 30 s."""
    full = names.queue("full")
    conn.queue_declare(full, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    first = conn._session
    started = time.monotonic()
    while conn._session is first and time.monotonic() - started < 10:
        try:
            conn.publish("", full, b"refused", timeout=5)
        except PublishNacked:
            gevent.sleep(0.05)
        except ConnectionError:
            pass  # the publish in flight when the session was replaced
    assert conn._session is not first
    assert 2.0 < time.monotonic() - started < 5
    assert wait_until(lambda: conn.is_open)
    second = conn._session
    assert second is not None
    for _ in range(60):  # another 3 s of nothing but nacks: rate-limited, same session
        with pytest.raises(PublishNacked):
            conn.publish("", full, b"refused", timeout=5)
        gevent.sleep(0.05)
    assert conn._session is second and second.usable
