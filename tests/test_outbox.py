"""The transactional outbox (flask_nucleon_amqp.outbox) against the real broker and real databases.

Every test counts the messages that arrive in a queue of its own. SQLite is a file; PostgreSQL and
MariaDB are the ones `make test` starts (scripts/ensure-databases.sh).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import prometheus_client
import pytest
import sqlalchemy as sa
from flask import Flask, current_app, request
from flask_sqlalchemy import SQLAlchemy

from flask_nucleon_amqp import AMQP, Message
from flask_nucleon_amqp.metrics import register_metrics
from flask_nucleon_amqp.outbox import Outbox, OutboxState, outbox_parked, outbox_published, outbox_written

from conftest import BROKER_URL, Names, make_app, wait_until

pytest_plugins = ["_brokers"]

POSTGRESQL = os.environ.get("OUTBOX_TEST_POSTGRESQL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MARIADB = os.environ.get("OUTBOX_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test")
HERE = Path(__file__).parent


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return {"sqlite": f"sqlite:///{tmp_path}/outbox.db", "postgresql": POSTGRESQL, "mariadb": MARIADB}[request.param]


class Setup:
    """An app with AMQP, Flask-SQLAlchemy and an outbox on a table of its own, and a queue to count in."""

    def __init__(self, url: str, names: Names, broker: str = BROKER_URL, **config: Any) -> None:
        self.table_name = f"outbox_{uuid.uuid4().hex[:10]}"
        self.db = SQLAlchemy()
        self.outbox = Outbox(self.db, table_name=self.table_name)
        defaults = {"AMQP_OUTBOX_RELAY_DELAY": 0.5, "AMQP_OUTBOX_RELAY_INTERVAL": 0.1, "AMQP_OUTBOX_BACKOFF": 0.1,
                    "AMQP_OUTBOX_BACKOFF_MAX": 0.5, "AMQP_START_LISTENERS": True}
        self.app: Flask = make_app(SQLALCHEMY_DATABASE_URI=url, AMQP_URL=broker, **{**defaults, **config})
        self.db.init_app(self.app)
        AMQP(self.app)
        self.outbox.init_app(self.app)
        with self.app.app_context():
            self.engine = self.db.engine
        self.outbox.table.create(self.engine)
        self.amqp = self.app.extensions["amqp"]
        self.state: OutboxState = self.app.extensions["amqp_outbox"][self.table_name]
        conn = self.amqp.connection()
        self.exchange = names.exchange("outbox")
        self.queue = names.queue("outbox")
        conn.exchange_declare(self.exchange, "fanout", durable=True)
        conn.queue_declare(self.queue, durable=True)
        conn.queue_bind(self.queue, self.exchange)
        self.received: list[Message] = []
        self.amqp.connection("listen").consume(self.queue, lambda _promise, message: self.received.append(message),
                                               no_ack=True)

    def rows(self) -> list[Any]:
        with self.engine.connect() as db:
            return list(db.execute(sa.select(self.outbox.table).order_by(self.outbox.table.c.id)).all())

    def ids(self) -> list[int]:
        return [int(message["message_id"]) for message in self.received]

    def close(self) -> None:
        self.amqp.close(timeout=5)
        self.outbox.table.drop(self.engine)
        self.engine.dispose()


@pytest.fixture
def setup(database: str, names: Names) -> Iterator[Setup]:
    made = Setup(database, names)
    yield made
    made.close()


def test_commit_publishes_once_promptly_and_rollback_never(setup: Setup) -> None:
    written: list[dict[str, Any]] = []
    published: list[dict[str, Any]] = []

    def on_written(_sender: Any, **kwargs: Any) -> None:
        written.append(kwargs)

    def on_published(_sender: Any, **kwargs: Any) -> None:
        published.append(kwargs)

    outbox_written.connect(on_written)
    outbox_published.connect(on_published)
    try:
        with setup.app.app_context():
            session = setup.db.session
            setup.outbox.publish(setup.exchange, "k", b"rolled back")
            session.rollback()
            first = setup.outbox.publish(setup.exchange, "k", b"one", headers={"n": 1}, persistent=True)
            with session.begin_nested():
                second = setup.outbox.publish(setup.exchange, "k", json={"two": 2})
            try:
                with session.begin_nested():
                    setup.outbox.publish(setup.exchange, "k", b"savepoint rolled back")
                    raise RuntimeError("roll the savepoint back")
            except RuntimeError:
                pass
            assert not setup.received
            committed = time.monotonic()
            session.commit()
        assert wait_until(lambda: len(setup.received) >= 2, timeout=5)
        assert time.monotonic() - committed < 1.0
        gevent.sleep(0.5)  # anything else would have arrived by now
    finally:
        outbox_written.disconnect(on_written)
        outbox_published.disconnect(on_published)
    assert [m.body for m in setup.received] == [b"one", b'{"two":2}']
    assert setup.ids() == [first, second]
    assert setup.received[0].headers["n"] == 1 and setup.received[0]["delivery_mode"] == 2
    assert setup.received[1]["content_type"] == "application/json"
    assert wait_until(lambda: not setup.rows(), timeout=5)
    assert len(written) == 4 and sum(entry["count"] for entry in published) == 2
    assert setup.state.stats["published"] == 2
    health = setup.amqp.health()["outbox"]
    assert health["ok"] and health["pending"] == 0 and health["oldest_age"] is None
    assert setup.amqp.stats()["outbox"]["written"] == 4
    with setup.app.app_context():  # the table is empty now: a new row must still get a new id (message_id)
        third = setup.outbox.publish(setup.exchange, "k", b"three")
        setup.db.session.commit()
    assert third > second
    assert wait_until(lambda: len(setup.received) == 3, timeout=5) and setup.ids()[-1] == third


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_bad_input_raises_before_anything_is_written(setup: Setup) -> None:
    bad: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"body": 42}, TypeError, "body must be bytes or str"),
        ({"body": b"x", "json": {}}, TypeError, "body or json="),
        ({"priority": 300}, ValueError, "priority"),
        ({"delivery_mode": 3}, ValueError, "delivery_mode"),
        ({"expiration": "soon"}, ValueError, "expiration"),
        ({"headers": ["not", "a", "dict"]}, TypeError, "headers must be a dict"),
        ({"headers": {"x": {1, 2}}}, Exception, "headers"),
        ({"content_type": "x" * 300}, Exception, "content_type"),
        ({"callback": print}, TypeError, "callback"),
    ]
    with setup.app.app_context():
        for arguments, error, text in bad:
            with pytest.raises(error, match=text):
                setup.outbox.publish(setup.exchange, "k", **arguments)
        with pytest.raises(Exception, match="routing_key"):
            setup.outbox.publish(setup.exchange, "k" * 256, b"x")
        setup.db.session.commit()
    assert setup.rows() == []
    gevent.sleep(0.3)
    assert setup.received == []


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_1000_messages_in_100_transactions_by_50_greenlets(database: str, names: Names) -> None:
    setup = Setup(database, names, SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 50, "max_overflow": 0})
    try:
        def worker(number: int) -> list[list[int]]:
            transactions = []
            for transaction in range(2):
                with setup.app.app_context():
                    ids = []
                    for index in range(10):
                        ids.append(setup.outbox.publish(setup.exchange, "k", f"{number}.{transaction}.{index}"))
                        gevent.sleep(0)  # interleave the 50 transactions
                    setup.db.session.commit()
                    transactions.append(ids)
            return transactions

        greenlets = [gevent.spawn(worker, number) for number in range(50)]
        gevent.joinall(greenlets, raise_error=True)
        assert wait_until(lambda: len(setup.received) >= 1000, timeout=30)
        gevent.sleep(0.3)
        assert len(setup.received) == 1000
        position = {message_id: index for index, message_id in enumerate(setup.ids())}
        assert len(position) == 1000
        for greenlet in greenlets:
            for ids in greenlet.value:
                assert [position[i] for i in ids] == sorted(position[i] for i in ids)  # written order
        assert wait_until(lambda: not setup.rows(), timeout=5)
    finally:
        setup.close()


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_broker_down_rows_stay_then_every_message_is_delivered(database: str, names: Names, node_up: Any) -> None:
    # AMQP_OUTBOX_TIMEOUT=30: a relay's SQLite claim lasts 70 s, so every row arriving within the waits below
    # also shows that a batch failed by the outage gives its claims back.
    setup = Setup(database, names, broker=node_up.url(), AMQP_OUTBOX_TIMEOUT=30.0,
                  AMQP_POOLS={"publish": {"size": 1, "connect_timeout": 1.0, "operation_timeout": 2.0},
                              "listen": {"size": 1}})
    try:
        setup.state.start()
        assert wait_until(lambda: setup.state.relay.running, timeout=5)
        node_up.stop_app()
        written = []
        try:
            with setup.app.app_context():
                for transaction in range(10):
                    for index in range(5):
                        written.append(setup.outbox.publish(setup.exchange, "k", f"{transaction}.{index}",
                                                            persistent=True))
                    setup.db.session.commit()
            gevent.sleep(2.0)  # the publisher and the relay fail meanwhile
            assert len(setup.rows()) == 50
            assert setup.state.health()["pending"] == 50
        finally:
            node_up.start_app()
        assert wait_until(lambda: len(set(setup.ids())) >= 50, timeout=40)
        assert wait_until(lambda: not setup.rows(), timeout=10)
        assert sorted(set(setup.ids())) == written  # every one, at least once (a confirm lost in the outage
        # may make one come twice)
    finally:
        setup.close()


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_close_finishes_publishing_what_was_committed(setup: Setup, names: Names) -> None:
    with setup.app.app_context():
        ids = [setup.outbox.publish(setup.exchange, "k", f"m{i}") for i in range(50)]
        setup.db.session.commit()
    setup.amqp.close(timeout=10)  # at once: the publisher's messages are confirmed, their rows deleted
    assert setup.rows() == []
    checker = make_app()
    AMQP(checker)
    try:
        assert checker.extensions["amqp"].queue_declare(setup.queue, passive=True)["message_count"] + \
            len(setup.received) == len(ids)
    finally:
        checker.extensions["amqp"].close(timeout=5)


def _subprocess_env(setup: Setup, database: str, broker: str = BROKER_URL, batch: int = 100) -> dict[str, str]:
    return {**os.environ, "OUTBOX_DATABASE": database, "OUTBOX_TABLE": setup.table_name, "OUTBOX_BROKER": broker,
            "OUTBOX_BATCH": str(batch), "PYTHONPATH": str(HERE)}


@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
def test_a_worker_killed_after_commit_is_covered_by_another_process_relay(database: str, setup: Setup) -> None:
    killed = subprocess.run([sys.executable, str(HERE / "_outbox_app.py"), "commit-and-die", setup.exchange, "20"],
                            env=_subprocess_env(setup, database), capture_output=True, text=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ids = json.loads(killed.stdout)
    assert len(ids) == 20 and [row.id for row in setup.rows()] == ids  # committed, not published
    gevent.sleep(0.3)
    assert setup.received == []
    setup.state.start()  # this process's relay
    assert wait_until(lambda: len(setup.received) >= 20, timeout=10)
    assert setup.ids() == ids
    assert wait_until(lambda: not setup.rows(), timeout=5)


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_two_relays_share_1000_rows_without_duplicates(database: str, setup: Setup) -> None:
    table = setup.outbox.table
    past = time.time() - 60
    with setup.engine.begin() as db:  # rows a dead worker left behind
        db.execute(table.insert(), [{"created": past, "exchange": setup.exchange, "routing_key": "k",
                                     "body": f"m{i}".encode(), "properties": "{}", "attempts": 0,
                                     "next_attempt": 0.0, "parked": False} for i in range(1000)])
    env = _subprocess_env(setup, database, batch=50)
    relays = [subprocess.Popen([sys.executable, "-m", "flask", "--app", "_outbox_app", "amqp", "outbox", "relay"],
                               env=env, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    try:
        assert wait_until(lambda: len(setup.received) >= 1000, timeout=40)
        assert wait_until(lambda: not setup.rows(), timeout=10)
        gevent.sleep(0.5)
    finally:
        for relay in relays:
            relay.send_signal(signal.SIGTERM)
        outputs = [relay.communicate(timeout=30) for relay in relays]
    ids = setup.ids()
    assert len(ids) == 1000 and len(set(ids)) == 1000, f"{len(ids) - len(set(ids))} duplicates"
    relayed = []
    for relay, (out, err) in zip(relays, outputs, strict=True):
        assert relay.returncode == 0, err
        relayed.append(int(out.split("stopped: ")[1].split()[0]))
    assert sum(relayed) == 1000, relayed
    print(f"rows relayed by each relay: {relayed}")


@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
def test_missing_exchange_is_parked_after_n_attempts_and_the_others_flow(database: str, names: Names) -> None:
    setup = Setup(database, names, AMQP_OUTBOX_MAX_ATTEMPTS=3, AMQP_OUTBOX_RELAY_DELAY=0.0,
                  AMQP_OUTBOX_BACKOFF=0.05, AMQP_OUTBOX_BACKOFF_MAX=0.1, AMQP_OUTBOX_RELAY_INTERVAL=0.05)
    parked: list[dict[str, Any]] = []

    def on_parked(_sender: Any, **kwargs: Any) -> None:
        parked.append(kwargs)

    outbox_parked.connect(on_parked)
    missing = names.exchange("missing")
    registry = prometheus_client.CollectorRegistry()
    register_metrics(setup.app, registry)
    try:
        setup.state.start()
        with setup.app.app_context():
            good = [setup.outbox.publish(setup.exchange, "k", b"before")]
            bad = setup.outbox.publish(missing, "k", b"lost?")
            good += [setup.outbox.publish(setup.exchange, "k", f"after{i}") for i in range(3)]
            setup.db.session.commit()
        assert wait_until(lambda: setup.state.health()["parked"] == 1, timeout=15)
        assert wait_until(lambda: set(setup.ids()) >= set(good), timeout=5)
        assert set(setup.ids()) == set(good)  # at least once each; a pipeline with a 404 may repeat one (D23)
        rows = setup.rows()
        assert [(row.id, row.parked, row.attempts) for row in rows] == [(bad, True, 3)]
        assert "NotFound" in rows[0].last_error and missing in rows[0].last_error
        assert [entry["id"] for entry in parked] == [bad]
        metric, labels = registry.get_sample_value, {"table": setup.table_name}
        assert metric("amqp_outbox_written_total", labels) == 5 and metric("amqp_outbox_parked_total", labels) == 1
        assert metric("amqp_outbox_pending", labels) == 0
        assert sum(metric("amqp_outbox_published_total", {**labels, "by": by}) or 0 for by in ("commit", "relay")) >= 4

        runner = setup.app.test_cli_runner()
        result = runner.invoke(args=["amqp", "outbox"])
        assert result.exit_code == 0, result.output
        assert "0 pending" in result.output and "1 parked" in result.output
        assert f"parked #{bad} to exchange {missing!r}" in result.output and "NotFound" in result.output

        setup.amqp.exchange_declare(missing, "fanout")  # the cause is fixed
        setup.amqp.queue_bind(setup.queue, missing)
        result = runner.invoke(args=["amqp", "outbox", "retry"])
        assert result.exit_code == 0 and "1 parked message(s) put back" in result.output, result.output
        assert wait_until(lambda: bad in setup.ids(), timeout=10)
        assert wait_until(lambda: not setup.rows(), timeout=5)
    finally:
        outbox_parked.disconnect(on_parked)
        setup.close()


def test_plain_sqlalchemy_with_a_session_of_its_own(tmp_path: Path, names: Names) -> None:
    from sqlalchemy.orm import Session

    # [start outbox plain setup]
    engine = sa.create_engine(f"sqlite:///{tmp_path}/plain.db")
    metadata = sa.MetaData()
    outbox = Outbox(metadata=metadata, engine=engine)  # the amqp_outbox table joins metadata
    metadata.create_all(engine)
    # [end outbox plain setup]
    app = make_app()
    AMQP(app)
    outbox.init_app(app)
    conn = app.extensions["amqp"].connection()
    queue = names.queue("plain")
    conn.queue_declare(queue)
    try:
        with app.app_context():
            with pytest.raises(TypeError, match="session="):
                outbox.publish("", queue, b"x")
            # [start outbox plain]
            with Session(engine) as session:
                row_id = outbox.publish("", queue, b"plain", session=session)
                session.commit()  # published after this commit
            # [end outbox plain]
        assert wait_until(lambda: conn.queue_declare(queue, passive=True)["message_count"] == 1, timeout=5)
        message = conn.get(queue)
        assert message is not None and message.body == b"plain" and message["message_id"] == str(row_id)
    finally:
        app.extensions["amqp"].close(timeout=5)
        engine.dispose()


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    from flask_nucleon_amqp import ConfigError

    for key, value in [("AMQP_OUTBOX_BATCH", 0), ("AMQP_OUTBOX_RELAY", "yes"), ("AMQP_OUTBOX_BACKOFF", -1),
                       ("AMQP_OUTBOX_POOL", "nope")]:
        db = SQLAlchemy()
        app = make_app(SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/c.db", **{key: value})
        db.init_app(app)
        AMQP(app)
        with pytest.raises(ConfigError, match=key):
            Outbox(db, table_name="outbox_config").init_app(app)
        app.extensions["amqp"].close(timeout=1)
    # An unknown AMQP_OUTBOX_* key is refused with every other unknown AMQP_* key, by AMQP's init_app.
    app = make_app(SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/c.db", AMQP_OUTBOX_BATCHES=5)
    with pytest.raises(ConfigError, match="AMQP_OUTBOX_BATCHES: unknown configuration key"):
        AMQP(app)


# == The documentation's sample (docs/outbox.rst) and the example app ==========================================

def create_shop_app(config: dict[str, Any]) -> tuple[Flask, SQLAlchemy]:
    """The docs' sample: POST /orders saves an order and publishes order.created in one transaction."""
    # [start outbox app]
    db = SQLAlchemy()
    amqp = AMQP()
    outbox = Outbox(db)  # its table, amqp_outbox, joins db.metadata: db.create_all() and Alembic see it

    orders = db.Table("orders", sa.Column("id", sa.Integer, primary_key=True), sa.Column("total", sa.Integer))

    app = Flask("shop")
    app.config.update(config)
    db.init_app(app)
    amqp.init_app(app)
    outbox.init_app(app)

    @app.post("/orders")
    def create_order() -> Any:
        order = request.get_json()
        outbox.publish(current_app.config["ORDERS_EXCHANGE"], "order.created", json=order)
        db.session.execute(orders.insert().values(id=order["id"], total=order["total"]))
        db.session.commit()  # the order and its event, or neither; published right after the commit
        return {"ok": True}, 201
    # [end outbox app]

    return app, db


def test_docs_sample_publishes_after_commit_and_never_on_a_failed_commit(tmp_path: Path, names: Names) -> None:
    exchange, queue = names.exchange("orders"), names.queue("orders")
    app, db = create_shop_app({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path}/shop.db", "AMQP_URL": BROKER_URL,
                               "ORDERS_EXCHANGE": exchange, "AMQP_START_LISTENERS": False, "TESTING": True})
    with app.app_context():
        db.create_all()
        engine = db.engine
    state = app.extensions["amqp"]
    try:
        state.exchange_declare(exchange, "topic")
        state.queue_declare(queue)
        state.queue_bind(queue, exchange, "order.*")
        client = app.test_client()
        assert client.post("/orders", json={"id": 7, "total": 30}).status_code == 201
        with pytest.raises(sa.exc.IntegrityError):  # the same id again: after the outbox row, the insert
            client.post("/orders", json={"id": 7, "total": 99})  # fails; the transaction rolls back
        assert wait_until(lambda: state.queue_declare(queue, passive=True)["message_count"] >= 1, timeout=5)
        gevent.sleep(0.3)
        assert state.queue_declare(queue, passive=True)["message_count"] == 1
        message = state.get(queue)
        assert message is not None and message.json() == {"id": 7, "total": 30}
        message.ack()
        with engine.connect() as connection:  # the rolled-back request left no outbox row behind
            assert connection.execute(sa.text("SELECT count(*) FROM amqp_outbox")).scalar() == 0
    finally:
        state.close(timeout=5)
        engine.dispose()


def test_example_app_logged_message_goes_through_the_outbox(tmp_path: Path, names: Names) -> None:
    sys.path.insert(0, str(HERE.parent / "example_app"))
    try:
        from app import chat_log, create_app  # type: ignore[import-not-found]  # example_app, on sys.path
    finally:
        sys.path.pop(0)
    room = names.exchange("room")
    app = create_app({"SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path}/chat.db", "AMQP_URL": BROKER_URL,
                      "CHAT_ROOM": room, "AMQP_DECLARE_ON_START": False, "AMQP_START_LISTENERS": False})
    state = app.extensions["amqp"]
    queue = names.queue("user2")
    try:
        state.exchange_declare(room, "direct")
        state.queue_declare(queue)
        state.queue_bind(queue, room, "user2")
        client = app.test_client()
        response = client.post("/messages/logged", json={"from": "user1", "to": "user2", "text": "logged"})
        assert response.status_code == 202, response.get_data(as_text=True)
        assert client.post("/messages/logged", json={"from": "nobody"}).status_code == 400
        assert wait_until(lambda: state.queue_declare(queue, passive=True)["message_count"] == 1, timeout=5)
        message = state.get(queue)
        assert message is not None and message.json()["text"] == "logged"
        assert message.json()["log_id"] == response.get_json()["log_id"]
        with app.app_context():
            from app import db
            assert db.session.execute(sa.select(sa.func.count()).select_from(chat_log)).scalar() == 1
    finally:
        state.close(timeout=5)


#: Each process imports the example app, waits for the same instant, then creates it (its tables).
_BOOT_AT_ONCE = """
import sys, time
sys.path.insert(0, sys.argv[1])
from app import create_app
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
create_app({"SQLALCHEMY_DATABASE_URI": sys.argv[3], "AMQP_DECLARE_ON_START": False, "AMQP_START_LISTENERS": False})
"""


def test_example_app_workers_booting_at_once_create_its_tables(tmp_path: Path) -> None:
    """gunicorn's workers all create the app at once; on a new database none may fail ("already exists")."""
    for attempt in range(2):
        database = tmp_path / f"chat-{attempt}.db"
        start = time.time() + 4  # after every process has imported the app
        workers = [subprocess.Popen([sys.executable, "-c", _BOOT_AT_ONCE, str(HERE.parent / "example_app"),
                                     str(start), f"sqlite:///{database}"], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT) for _ in range(6)]
        outputs = [worker.communicate(timeout=60)[0].decode() for worker in workers]
        failed = [output for worker, output in zip(workers, outputs, strict=True) if worker.returncode != 0]
        assert not failed, f"{len(failed)} of 6 workers failed to create the app:\n{failed[0][-2000:]}"
        engine = sa.create_engine(f"sqlite:///{database}")
        try:
            assert {"chat_log", "amqp_outbox"} <= set(sa.inspect(engine).get_table_names())
        finally:
            engine.dispose()


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_commits_in_os_threads_are_published_by_the_hub_thread(database: str, names: Names) -> None:
    """AMQP_RUNTIME="thread" (flask run, gunicorn gthread): commits in OS threads, connections in the hub thread."""
    import threading

    setup = Setup(database, names, AMQP_RUNTIME="thread", AMQP_OUTBOX_RELAY_DELAY=5.0)
    try:
        assert setup.amqp.runtime.mode == "thread"
        setup.state.start()  # the relay too runs in the hub thread

        def commit(number: int) -> None:
            with setup.app.app_context():
                for index in range(5):
                    setup.outbox.publish(setup.exchange, "k", f"{number}.{index}")
                setup.db.session.commit()

        threads = [threading.Thread(target=commit, args=(number,)) for number in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert wait_until(lambda: len(setup.received) >= 20, timeout=10)
        assert len(set(setup.ids())) == 20, " ".join(f"{m['message_id']}={m.body.decode()}" for m in setup.received)
        assert wait_until(lambda: not setup.rows(), timeout=5)
    finally:
        setup.close()
