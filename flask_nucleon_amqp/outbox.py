"""A transactional outbox: publish with the database transaction (``pip install flask-nucleon-amqp[sqlalchemy]``).

A view that saves a row and publishes an event has two writes that can
disagree: the commit may fail after the publish, or the process may die (or
the broker be down) between the commit and the publish. The outbox makes them
one write: :meth:`Outbox.publish` inserts the message as a row **in the
caller's database transaction**; only when that transaction commits is the
message published, by a greenlet of the worker, confirmed, in the order
written, and its row deleted. A rollback leaves nothing to publish.

Rows left behind (the process died after the commit, the broker was down, a
publish failed) are published by a relay: one greenlet per worker, started
with the listeners and stopped with them (or ``flask amqp outbox relay``).
Several relays share the table without sending a row twice in the normal
case: ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL and MySQL/MariaDB,
an atomic claim (a short lease written by one ``UPDATE``) elsewhere, as on
SQLite, whose writers are serialised. A row whose publish keeps failing for a
reason of its own (the exchange does not exist, the message is unroutable) is
parked with its error after ``AMQP_OUTBOX_MAX_ATTEMPTS`` attempts.

Delivery is **at least once**: every message carries ``message_id`` = its row
id (unless given), so that consumers can drop duplicates.

Configuration (read at ``init_app``, errors name the key):

=============================== ======= =============================================================
key                             default meaning
=============================== ======= =============================================================
AMQP_OUTBOX_POOL                publish pool the outbox publishes through
AMQP_OUTBOX_RELAY               True    run a relay greenlet in each process that starts its listeners
AMQP_OUTBOX_RELAY_INTERVAL      1.0     seconds between two looks at the table when it had nothing to do
AMQP_OUTBOX_RELAY_DELAY         5.0     age (seconds) of a row before the relay takes it over from the
                                        after-commit publisher of the process that wrote it
AMQP_OUTBOX_BATCH               500     rows per relay batch
AMQP_OUTBOX_MAX_ATTEMPTS        5       failed attempts of one row before it is parked
AMQP_OUTBOX_BACKOFF             1.0     first retry delay (seconds) of a failed row or an unreachable
                                        broker; doubled at each failure
AMQP_OUTBOX_BACKOFF_MAX         60.0    the longest retry delay
AMQP_OUTBOX_TIMEOUT             30.0    seconds a batch waits for the broker's confirms
=============================== ======= =============================================================
"""

from __future__ import annotations

import json as _json
import logging
import os
import signal
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click
import gevent
import gevent.event
import gevent.lock
from blinker import Namespace
from flask import Flask, current_app, has_app_context
from flask.cli import AppGroup, with_appcontext

from . import _puka
from ._base import _properties
from ._memory_routing import _decode_table
from .config import OUTBOX_SETTINGS
from .exceptions import AMQPError, ChannelError, ConfigError, PublishNacked, Timeout
from .message import _NOTHING, encode_body
from .runtime import Runtime, in_hub

try:
    import sqlalchemy as sa
    from sqlalchemy import event
    from sqlalchemy.orm import Session
except ImportError as exc:  # pragma: no cover - depends on the extra being installed
    raise ImportError("flask_nucleon_amqp.outbox needs SQLAlchemy 2: "
                      "pip install flask-nucleon-amqp[sqlalchemy]") from exc

if TYPE_CHECKING:
    from .extension import AMQPState
    from .protocol import Connection

__all__ = ["Outbox", "OutboxState", "Relay", "outbox_written", "outbox_published", "outbox_parked", "CONFIG_KEYS"]

log = logging.getLogger(__name__)

_signals = Namespace()
#: Sent with the :class:`Outbox` as sender when a message row is written (id, exchange, routing_key).
outbox_written = _signals.signal("amqp-outbox-written")
#: Sent when rows were published and confirmed (count, ids, by: "commit" or "relay").
outbox_published = _signals.signal("amqp-outbox-published")
#: Sent when a row is parked after its last failed attempt (id, exchange, routing_key, error).
outbox_parked = _signals.signal("amqp-outbox-parked")

#: The ``AMQP_OUTBOX_*`` keys (defined with every other key in :mod:`flask_nucleon_amqp.config`).
CONFIG_KEYS = OUTBOX_SETTINGS

#: Errors of the message itself (it is counted against the row); any other error is the broker's
#: or the connection's (nothing is counted: the relay backs off and tries again).
_MESSAGE_ERRORS = (ChannelError, PublishNacked)

#: The property arguments of ``publish`` (besides body, json, headers, persistent, mandatory).
_PROPERTY_NAMES = frozenset({
    "content_type", "content_encoding", "delivery_mode", "priority", "correlation_id", "reply_to", "expiration",
    "message_id", "timestamp", "type", "app_id", "user_id",
})

#: Seconds the after-commit publisher gathers confirmed rows before deleting them in one statement.
_DELETE_DELAY = 0.02

#: The session.info key of the messages a transaction wrote.
_PENDING = "flask_nucleon_amqp.outbox"


@dataclass(frozen=True)
class OutboxSettings:
    """The ``AMQP_OUTBOX_*`` configuration, checked."""

    pool: str = "publish"
    relay: bool = True
    relay_interval: float = 1.0
    relay_delay: float = 5.0
    batch: int = 500
    max_attempts: int = 5
    backoff: float = 1.0
    backoff_max: float = 60.0
    timeout: float = 30.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> OutboxSettings:
        values = {key: setting.parse(key, config.get(key, setting.default)) for key, setting in CONFIG_KEYS.items()}
        return cls(*values.values())

    def retry_delay(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failures in a row (exponential, capped)."""
        return float(min(self.backoff * 2 ** max(0, failures - 1), self.backoff_max))


@dataclass
class _Record:
    """One message: as written, and as read back by the relay."""

    id: int
    exchange: str
    routing_key: str
    body: bytes
    properties: dict[str, Any]
    headers: bytes | None
    attempts: int = 0
    transaction: Any = field(default=None, repr=False, compare=False)

    def publish_options(self) -> dict[str, Any]:
        options = dict(self.properties)
        options.setdefault("message_id", str(self.id))
        if self.headers:
            options["headers"] = _decode_table(self.headers)
        return options


def _prepare(exchange: str, routing_key: str, body: Any, *, json: Any = _NOTHING,
             headers: dict[str, Any] | None = None, mandatory: bool = False, persistent: bool = False,
             **given: Any) -> tuple[bytes, dict[str, Any], bytes | None]:
    """Check publish arguments with the package's own checks (as ``publish`` does); raise before any write."""
    for name in given:
        if name not in _PROPERTY_NAMES:
            raise TypeError(f"outbox.publish() got an unexpected keyword argument {name!r}")
    properties: dict[str, Any] = {}
    data = encode_body(body, json, properties)
    if persistent:
        given["delivery_mode"] = 2
    properties.update(_properties(**given))
    _puka.shortstr(exchange, "exchange")
    _puka.shortstr(routing_key, "routing_key")
    encoded_headers = None
    if headers:
        if not isinstance(headers, dict):
            raise TypeError(f"headers must be a dict, got {headers.__class__.__name__}")
        encoded_headers = _puka.encode_table(headers, "headers")
    if not isinstance(mandatory, bool):
        raise TypeError(f"mandatory must be True or False, got {mandatory!r}")
    if mandatory:
        properties["mandatory"] = True
    return data, properties, encoded_headers


def _make_table(metadata: sa.MetaData, name: str) -> sa.Table:
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite's rowid alias must be INTEGER
    return sa.Table(
        name, metadata,
        sa.Column("id", big_id, primary_key=True, autoincrement=True),
        sa.Column("created", sa.Double, nullable=False, doc="time.time() when written"),
        sa.Column("exchange", sa.String(255), nullable=False),
        sa.Column("routing_key", sa.String(255), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("properties", sa.Text, nullable=False, doc="JSON: AMQP properties (and mandatory)"),
        sa.Column("headers", sa.LargeBinary, nullable=True, doc="the AMQP-encoded headers table"),
        sa.Column("attempts", sa.Integer, nullable=False, default=0),
        sa.Column("next_attempt", sa.Double, nullable=False, default=0.0),
        sa.Column("parked", sa.Boolean, nullable=False, default=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("claimed_until", sa.Double, nullable=True, doc="lease of a relay (databases without SKIP LOCKED)"),
        sa.Column("claimed_by", sa.String(36), nullable=True),
        sa.Index(f"ix_{name}_parked_id", "parked", "id"),
        # Row ids are message ids: never reuse one after its row was deleted (SQLite's rowid would).
        sqlite_autoincrement=True,
    )


class Outbox:
    """The outbox of one database: ``Outbox(db)`` (Flask-SQLAlchemy) or ``Outbox(metadata=..., engine=...)``.

    With Flask-SQLAlchemy the table joins ``db.metadata`` (so ``db.create_all()``
    and Alembic autogenerate see it) and messages go into ``db.session``. With
    plain SQLAlchemy 2 give the ``MetaData`` the table joins, the ``Engine`` the
    relay reads it through, and optionally ``session``: a ``scoped_session`` (or
    any callable returning the current ``Session``) for :meth:`publish` calls
    that pass none. ``table_name`` defaults to ``amqp_outbox``.
    """

    def __init__(self, db: Any = None, *, metadata: sa.MetaData | None = None, engine: sa.Engine | None = None,
                 session: Callable[[], Session] | None = None, table_name: str = "amqp_outbox",
                 app: Flask | None = None) -> None:
        if db is not None:
            if metadata is not None or engine is not None:
                raise TypeError("Outbox(db) takes its metadata and engine from db; give db or metadata=, not both")
            metadata = db.metadata
            session = session or db.session
        elif metadata is None or engine is None:
            raise TypeError("Outbox needs a Flask-SQLAlchemy db, or metadata= and engine= (plain SQLAlchemy)")
        assert metadata is not None
        self.db = db
        self._engine = engine
        self._session = session
        existing = metadata.tables.get(table_name)
        self.table: sa.Table = existing if existing is not None else _make_table(metadata, table_name)
        self._insert = self.table.insert()  # one statement object: its compiled form is cached
        self._apps: weakref.WeakKeyDictionary[Flask, OutboxState] = weakref.WeakKeyDictionary()
        _listen_to_sessions()
        if app is not None:
            self.init_app(app)

    def __repr__(self) -> str:
        return f"<Outbox table={self.table.name!r}>"

    def init_app(self, app: Flask) -> None:
        """Read ``AMQP_OUTBOX_*`` and attach the outbox to an app that uses the AMQP extension.

        :raises ConfigError: naming the offending key.
        """
        state = app.extensions.get("amqp")
        if state is None:
            raise RuntimeError("call AMQP(app) / amqp.init_app(app) before outbox.init_app(app)")
        settings = OutboxSettings.from_config(app.config)
        if settings.pool not in state.pools:
            raise ConfigError("AMQP_OUTBOX_POOL", f"no pool named {settings.pool!r}; pools: {sorted(state.pools)}")
        outboxes = app.extensions.setdefault("amqp_outbox", {})
        if self.table.name in outboxes:
            raise RuntimeError(f"an outbox on table {self.table.name!r} is already set up on this app")
        outbox_state = OutboxState(self, app, settings)
        self._apps[app] = outbox_state
        outboxes[self.table.name] = outbox_state
        if state.lifecycle is not None:
            state.lifecycle.services.append(outbox_state)  # started and stopped with the listeners
        state.reports["outbox" if len(outboxes) == 1 else f"outbox_{self.table.name}"] = outbox_state.health

    def state(self, app: Flask | None = None) -> OutboxState:
        """This outbox's state in ``app`` (default: the current app, or the only app it was set up on)."""
        if app is None:
            if has_app_context():
                app = current_app._get_current_object()  # type: ignore[attr-defined]
            elif len(self._apps) == 1:
                app = next(iter(self._apps))
        found = self._apps.get(app) if app is not None else None
        if found is None:
            raise RuntimeError("this outbox is not set up on the current app: call outbox.init_app(app)")
        return found

    def engine(self) -> sa.Engine:
        """The engine the relay and the after-commit publisher use (needs an app context for Flask-SQLAlchemy)."""
        if self._engine is not None:
            return self._engine
        return self.db.engine  # type: ignore[no-any-return]

    def publish(self, exchange: str, routing_key: str, body: bytes | str | None = None, *,
                session: Session | None = None, **properties: Any) -> int:
        """Write a message into ``session``'s transaction; it is published after that transaction commits.

        Takes the body and property arguments of :meth:`PukaConnection.publish`
        (``json=``, ``headers=``, ``persistent=``, ``mandatory=``, ``content_type=``...)
        and checks them at once: bad input raises before anything is written.
        ``message_id`` defaults to the row id. Returns the row id.

        :raises TypeError, ValueError: a bad body or property, naming it.
        """
        data, props, headers = _prepare(exchange, routing_key, body, **properties)
        state = self.state()
        if session is None:
            if self._session is None:
                raise TypeError("outbox.publish needs session=: this Outbox was made without a default session")
            session = self._session()
        now = time.time()
        result = session.execute(self._insert, {
            "created": now, "exchange": exchange, "routing_key": routing_key, "body": data,
            "properties": _json.dumps(props, separators=(",", ":")), "headers": headers, "attempts": 0,
            "next_attempt": 0.0, "parked": False})
        row_id = int(result.inserted_primary_key[0])  # type: ignore[attr-defined]
        record = _Record(row_id, exchange, routing_key, data, props, headers,
                         transaction=session.get_nested_transaction() or session.get_transaction())
        session.info.setdefault(_PENDING, []).append((state, record))
        state.stats["written"] += 1
        if outbox_written.receivers:
            outbox_written.send(self, id=row_id, exchange=exchange, routing_key=routing_key)
        return row_id


# -- session events: publish after the commit, forget on rollback ------------------------------------------
_listening = False


def _listen_to_sessions() -> None:
    global _listening
    if _listening:
        return
    event.listen(Session, "after_commit", _after_commit)
    event.listen(Session, "after_soft_rollback", _after_soft_rollback)
    event.listen(Session, "after_transaction_end", _after_transaction_end)
    _listening = True


def _after_commit(session: Session) -> None:
    if session.in_nested_transaction():
        return  # a savepoint released: its messages wait for the outermost commit
    pending = session.info.pop(_PENDING, None)
    if not pending:
        return
    by_state: dict[OutboxState, list[_Record]] = {}
    for state, record in pending:
        record.transaction = None
        by_state.setdefault(state, []).append(record)
    for state, records in by_state.items():
        runtime = state.amqp.runtime  # the publisher lives where the connections do (see runtime.py)
        if runtime.is_home():
            state.publisher.submit(records)
        else:
            runtime.submit(state.publisher.submit, records)


def _after_soft_rollback(session: Session, previous_transaction: Any) -> None:
    pending = session.info.get(_PENDING)
    if not pending:
        return
    if not previous_transaction.nested:
        session.info.pop(_PENDING, None)
        return
    # A savepoint rolled back: forget what it (or a savepoint inside it) wrote.
    session.info[_PENDING] = [(state, record) for state, record in pending
                              if previous_transaction not in _ancestry(record.transaction)]


def _ancestry(transaction: Any) -> Iterator[Any]:
    while transaction is not None:
        yield transaction
        transaction = transaction.parent


def _after_transaction_end(session: Session, transaction: Any) -> None:
    if transaction.parent is None:
        session.info.pop(_PENDING, None)  # ended without a commit (close, failed commit): nothing to publish


# -- publishing rows -------------------------------------------------------------------------------------
def _publish_records(conn: Connection, records: list[_Record], timeout: float) -> dict[int, BaseException | None]:
    """Publish records pipelined on one connection, in order; each id's outcome (None: confirmed)."""
    outcomes: dict[int, BaseException | None] = {}
    done = gevent.event.Event()
    expected = len(records)

    def settle(record_id: int, value: Any) -> None:
        outcomes[record_id] = value if isinstance(value, BaseException) else None
        if len(outcomes) >= expected:
            done.set()

    def settler(record_id: int) -> Callable[[int, Any], None]:
        return lambda _promise, value: settle(record_id, value)

    for record in records:
        try:
            conn.publish(record.exchange, record.routing_key, record.body, timeout=timeout,
                         callback=settler(record.id), **record.publish_options())
        except AMQPError as exc:
            settle(record.id, exc)
    if not done.wait(timeout + 1.0):
        for record in records:
            outcomes.setdefault(record.id, Timeout(f"no confirm within {timeout:g}s"))
    return outcomes


def _isolate(conn: Connection, records: list[_Record], outcomes: dict[int, BaseException | None],
             timeout: float) -> None:
    """Publish again, one at a time, records a neighbour's channel error may have failed (puka D23)."""
    failed = [r for r in records if isinstance(outcomes[r.id], _MESSAGE_ERRORS)]
    if len(failed) < 2 and len(records) < 2:
        return
    for record in failed:
        try:
            conn.publish(record.exchange, record.routing_key, record.body, timeout=timeout,
                         **record.publish_options())
        except AMQPError as exc:
            outcomes[record.id] = exc
        else:
            outcomes[record.id] = None


class _Publisher:
    """The after-commit publisher of one app in one process.

    One greenlet publishes what commits hand it, at once and pipelined (it
    never waits for confirms, so a commit's messages leave without waiting for
    the previous ones); another deletes the confirmed rows, many per statement.
    Rows whose publish failed stay for the relay.
    """

    def __init__(self, state: OutboxState) -> None:
        self.state = state
        self._pid = os.getpid()
        # A deque and an Event (which binds to a hub at its first wait, in the home hub): gevent's queues
        # bind to the hub of the thread that makes them, and this object may be made in another thread.
        self._queue: deque[list[_Record]] = deque()
        self._wake = gevent.event.Event()
        self._publisher: gevent.Greenlet[Any] | None = None
        self._cleaner: gevent.Greenlet[Any] | None = None
        self._confirmed: list[int] = []
        self._confirmed_wake = gevent.event.Event()
        self._in_flight = 0
        self.idle = gevent.event.Event()
        self.idle.set()

    def submit(self, records: list[_Record]) -> None:
        if self._pid != os.getpid():  # forked: the parent's greenlets and queue are not ours
            self.__init__(self.state)  # type: ignore[misc]
        self.idle.clear()
        self._in_flight += len(records)
        self._queue.append(records)
        self._wake.set()
        if self._publisher is None or self._publisher.dead:
            self._publisher = gevent.spawn(self._publish_loop)

    def _publish_loop(self) -> None:
        limit = self.state.settings.batch
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._queue:
                records = self._queue.popleft()
                while len(records) < limit and self._queue:
                    records.extend(self._queue.popleft())
                self._publish(records)

    def _publish(self, records: list[_Record]) -> None:
        try:
            conn = self.state.amqp.connection(self.state.settings.pool)
        except Exception as exc:  # noqa: BLE001 - the rows stay; the relay publishes them
            for record in records:
                self._settled(record.id, exc)
            return
        for record in records:
            try:
                conn.publish(record.exchange, record.routing_key, record.body, timeout=self.state.settings.timeout,
                             callback=self._callback(record.id), **record.publish_options())
            except Exception as exc:  # noqa: BLE001 - as above
                self._settled(record.id, exc)

    def _callback(self, record_id: int) -> Callable[[int, Any], None]:
        return lambda _promise, value: self._settled(record_id, value)

    def _settled(self, record_id: int, value: Any) -> None:
        if isinstance(value, BaseException):
            self.state.stats["failed"] += 1
            log.warning("outbox message %d was not published after its commit (%s); the relay will retry it",
                        record_id, value)
        else:
            self._confirmed.append(record_id)
            if self._cleaner is None or self._cleaner.dead:
                self._cleaner = gevent.spawn(self._clean_loop)
            self._confirmed_wake.set()
        self._in_flight -= 1
        self._maybe_idle()

    def _clean_loop(self) -> None:
        while True:
            self._confirmed_wake.wait()
            # Gather the confirms of a short while into one DELETE: fewer commits, and the database call
            # (blocking with SQLite) stays out of the way of the publishes of the commits that follow.
            gevent.sleep(_DELETE_DELAY)
            self._confirmed_wake.clear()
            ids, self._confirmed = self._confirmed, []
            if ids:
                try:
                    self.state.delete_published(ids, by="commit")
                except Exception:  # noqa: BLE001 - the rows stay: the relay publishes them again (at least once)
                    log.exception("deleting %d published outbox rows failed; the relay will publish them again",
                                  len(ids))
            self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not self._in_flight and not self._confirmed and not self._confirmed_wake.is_set():
            self.idle.set()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every committed message was confirmed (or failed) and its row deleted."""
        if self._pid != os.getpid():
            return True
        return bool(self.idle.wait(timeout))


class Relay:
    """Publishes rows left unsent, oldest first, until stopped; one per app and process."""

    def __init__(self, state: OutboxState) -> None:
        self.state = state
        self._greenlet: gevent.Greenlet[Any] | None = None
        self._stopping = gevent.event.Event()
        self._pid = os.getpid()
        self.started = False
        self.stats = {"relayed": 0, "batches": 0, "failures": 0}

    def __repr__(self) -> str:
        return f"<outbox Relay table={self.state.outbox.table.name!r} running={self.running}>"

    @property
    def running(self) -> bool:
        return self._greenlet is not None and not self._greenlet.dead and self._pid == os.getpid()

    @property
    def runtime(self) -> Runtime:
        return self.state.amqp.runtime

    @in_hub
    def start(self) -> None:
        """Start the relay greenlet (idempotent), in the hub of the app's connections."""
        if self._pid != os.getpid():
            self.__init__(self.state)  # type: ignore[misc]
        if self.running:
            return
        self._stopping.clear()
        self.started = True
        self._greenlet = gevent.spawn(self._run)

    @in_hub
    def stop(self, timeout: float | None = None) -> bool:
        """Let the batch in flight finish (up to ``timeout``), then stop; True when it stopped in time."""
        if not self.running:
            return True
        self._stopping.set()
        assert self._greenlet is not None
        self._greenlet.join(timeout)
        if not self._greenlet.dead:
            self._greenlet.kill(block=True, timeout=1.0)  # the rows it held go back: the transaction rolls back
            return False
        return True

    def _run(self) -> None:
        settings = self.state.settings
        failures = 0
        while not self._stopping.is_set():
            try:
                count = self.state.relay_once()
            except Exception as exc:  # noqa: BLE001 - a broker or database outage: back off, keep going
                failures += 1
                self.stats["failures"] += 1
                delay = settings.retry_delay(failures)
                log.warning("outbox relay: %s; trying again in %.1fs", _first_line(exc), delay)
            else:
                failures = 0
                delay = 0.0 if count >= settings.batch else settings.relay_interval
            if delay:
                self._stopping.wait(delay)
            else:
                gevent.sleep(0)


class OutboxState:
    """One outbox in one app: settings, the after-commit publisher, the relay, counters."""

    def __init__(self, outbox: Outbox, app: Flask, settings: OutboxSettings) -> None:
        self.outbox = outbox
        self._app = weakref.ref(app)  # the app holds this state (app.extensions): no cycle through the outbox
        self.settings = settings
        self.stats = {"written": 0, "published": 0, "failed": 0, "parked": 0}
        self.publisher = _Publisher(self)
        self.relay = Relay(self)
        self._engine: sa.Engine | None = None
        self._lock = gevent.lock.Semaphore()  # one relay batch at a time in this process (SQLite: single writer)

    def __repr__(self) -> str:
        return f"<OutboxState app={self.app.name!r} table={self.outbox.table.name!r}>"

    @property
    def app(self) -> Flask:
        app = self._app()
        if app is None:
            raise RuntimeError("the app of this outbox state is gone")
        return app

    @property
    def amqp(self) -> AMQPState:
        return self.app.extensions["amqp"]  # type: ignore[no-any-return]

    @property
    def engine(self) -> sa.Engine:
        if self._engine is None:
            with self.app.app_context():
                self._engine = self.outbox.engine()
        return self._engine

    @property
    def skip_locked(self) -> bool:
        """Whether the database has ``FOR UPDATE SKIP LOCKED`` (else relays claim rows with a lease)."""
        return self.engine.dialect.name in ("postgresql", "mysql", "mariadb")

    # -- a service of the lifecycle: started with the listeners, stopped with them -------------------------
    def start(self) -> None:
        if self.settings.relay:
            self.relay.start()

    @property
    def runtime(self) -> Runtime:
        return self.amqp.runtime

    @in_hub
    def stop(self, timeout: float | None = None) -> bool:
        """Finish publishing what was committed, then stop the relay."""
        deadline = time.monotonic() + (self.settings.timeout if timeout is None else timeout)
        idle = self.publisher.wait_idle(max(0.0, deadline - time.monotonic()))
        return self.relay.stop(max(0.0, deadline - time.monotonic())) and idle

    # -- publishing --------------------------------------------------------------------------------------
    def delete_published(self, ids: list[int], by: str) -> None:
        """Delete the rows of confirmed messages (never waiting for a row a relay holds: the relay owns it)."""
        table = self.outbox.table
        with self.engine.begin() as db:
            if self.skip_locked:
                ids = list(db.scalars(sa.select(table.c.id).where(table.c.id.in_(ids))
                                      .with_for_update(skip_locked=True)))
            if ids:
                db.execute(table.delete().where(table.c.id.in_(ids)))
        self._count_published(ids, by)

    def _count_published(self, ids: list[int], by: str) -> None:
        if not ids:
            return
        self.stats["published"] += len(ids)
        if outbox_published.receivers:
            outbox_published.send(self.outbox, count=len(ids), ids=ids, by=by)

    # -- relaying ----------------------------------------------------------------------------------------
    @in_hub
    def relay_once(self) -> int:
        """Publish one batch of rows left unsent, oldest first; the number of rows taken."""
        with self._lock:
            if self.skip_locked:
                return self._relay_locked()
            return self._relay_claimed()

    def _due(self, now: float) -> Any:
        table = self.outbox.table
        # A row nobody tried yet (next_attempt 0) is left RELAY_DELAY to the publisher of the commit.
        return sa.and_(table.c.parked == sa.false(), table.c.next_attempt <= now,
                       sa.or_(table.c.next_attempt > 0, table.c.created <= now - self.settings.relay_delay))

    def _relay_locked(self) -> int:
        table = self.outbox.table
        with self.engine.begin() as db:
            rows = db.execute(sa.select(table).where(self._due(time.time())).order_by(table.c.id)
                              .limit(self.settings.batch).with_for_update(skip_locked=True)).all()
            broker_error = self._relay_rows(db, rows) if rows else None
        if broker_error is not None:  # raised after the commit: the rows charged in this batch stay charged
            raise broker_error
        return len(rows)

    def _relay_claimed(self) -> int:
        table = self.outbox.table
        now = time.time()
        token = uuid.uuid4().hex
        free = sa.or_(table.c.claimed_until.is_(None), table.c.claimed_until < now)
        with self.engine.begin() as db:
            ids = list(db.scalars(sa.select(table.c.id).where(self._due(now), free).order_by(table.c.id)
                                  .limit(self.settings.batch)))
            if not ids:
                return 0
            # One UPDATE claims them: writers are serialised, so a concurrent relay's UPDATE finds them taken.
            db.execute(table.update().where(table.c.id.in_(ids), free)
                       .values(claimed_until=now + 2 * self.settings.timeout + 10, claimed_by=token))
        with self.engine.begin() as db:
            rows = db.execute(sa.select(table).where(table.c.claimed_by == token).order_by(table.c.id)).all()
            broker_error = self._relay_rows(db, rows) if rows else None
        if broker_error is not None:  # raised after the commit, which also gave back the claims
            raise broker_error
        return len(ids)

    def _relay_rows(self, db: sa.Connection, rows: Iterable[Any]) -> BaseException | None:
        """Publish claimed rows, delete the confirmed, charge the failed; the broker's error, if any."""
        table = self.outbox.table
        records = [_Record(row.id, row.exchange, row.routing_key, row.body, _json.loads(row.properties),
                           row.headers, row.attempts) for row in rows]
        outcomes: dict[int, BaseException | None]
        try:
            conn = self.amqp.connection(self.settings.pool)
        except AMQPError as exc:  # the broker is unreachable: nothing is charged, the claims are given back
            outcomes = dict.fromkeys([record.id for record in records], exc)
        else:
            outcomes = _publish_records(conn, records, self.settings.timeout)
            _isolate(conn, records, outcomes, self.settings.timeout)
        done = [record.id for record in records if outcomes[record.id] is None]
        if done:
            db.execute(table.delete().where(table.c.id.in_(done)))
        now = time.time()
        updates = []
        parked = []
        broker_error: BaseException | None = None
        for record in records:
            error = outcomes[record.id]
            if error is None:
                continue
            if not isinstance(error, _MESSAGE_ERRORS):
                broker_error = broker_error or error  # the broker's fault, not the row's: count nothing
                continue
            attempts = record.attempts + 1
            park = attempts >= self.settings.max_attempts
            updates.append({"_id": record.id, "_attempts": attempts, "_error": f"{type(error).__name__}: {error}",
                            "_next": now + self.settings.retry_delay(attempts), "_parked": park})
            if park:
                parked.append((record, error))
        if updates:
            db.execute(table.update().where(table.c.id == sa.bindparam("_id")).values(
                attempts=sa.bindparam("_attempts"), last_error=sa.bindparam("_error"),
                next_attempt=sa.bindparam("_next"), parked=sa.bindparam("_parked"),
                claimed_until=None, claimed_by=None), updates)
        if not self.skip_locked and broker_error is not None:
            db.execute(table.update().where(table.c.id.in_([r.id for r in records if outcomes[r.id] is not None]),
                                            table.c.parked == sa.false())
                       .values(claimed_until=None, claimed_by=None))
        self.relay.stats["relayed"] += len(done)
        self.relay.stats["batches"] += 1
        self._count_published(done, "relay")
        for record, error in parked:
            self.stats["parked"] += 1
            log.error("outbox message %d to exchange %r, routing key %r parked after %d attempts: %s",
                      record.id, record.exchange, record.routing_key, self.settings.max_attempts, error)
            if outbox_parked.receivers:
                outbox_parked.send(self.outbox, id=record.id, exchange=record.exchange,
                                   routing_key=record.routing_key, error=error)
        return broker_error

    # -- inspecting ----------------------------------------------------------------------------------------
    def pending(self) -> dict[str, Any]:
        """Pending (unsent, not parked) count, age in seconds of the oldest, parked count."""
        table = self.outbox.table
        with self.engine.connect() as db:
            count, oldest = db.execute(sa.select(sa.func.count(), sa.func.min(table.c.created))
                                       .where(table.c.parked == sa.false())).one()
            parked = db.execute(sa.select(sa.func.count()).where(table.c.parked == sa.true())).scalar()
        age = max(0.0, time.time() - oldest) if oldest is not None else None
        return {"pending": int(count), "oldest_age": age, "parked": int(parked or 0)}

    def parked_rows(self, limit: int = 100) -> list[dict[str, Any]]:
        """The parked rows, oldest first: id, exchange, routing_key, attempts, error, age."""
        table = self.outbox.table
        with self.engine.connect() as db:
            rows = db.execute(sa.select(table.c.id, table.c.exchange, table.c.routing_key, table.c.attempts,
                                        table.c.last_error, table.c.created)
                              .where(table.c.parked == sa.true()).order_by(table.c.id).limit(limit)).all()
        now = time.time()
        return [{"id": r.id, "exchange": r.exchange, "routing_key": r.routing_key, "attempts": r.attempts,
                 "error": r.last_error, "age": now - r.created} for r in rows]

    def retry_parked(self, ids: Iterable[int] | None = None) -> int:
        """Put parked rows (all, or ``ids``) back to pending with their attempts reset; how many."""
        table = self.outbox.table
        where = table.c.parked == sa.true()
        if ids is not None:
            where = sa.and_(where, table.c.id.in_(list(ids)))
        with self.engine.begin() as db:
            result = db.execute(table.update().where(where).values(
                parked=False, attempts=0, next_attempt=time.time(), claimed_until=None, claimed_by=None))
        return int(result.rowcount)

    def health(self) -> dict[str, Any]:
        """For ``health()``/``stats()``: pending count and oldest age (None when the database fails)."""
        try:
            report = self.pending()
        except Exception as exc:  # noqa: BLE001 - a health check reports, never raises
            return {"table": self.outbox.table.name, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return {"table": self.outbox.table.name, "ok": True, **report, "relay": self.relay.running, **self.stats}


def _first_line(exc: BaseException) -> str:
    """An error in one line (SQLAlchemy's carry the statement and a link below)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


@contextmanager
def _database_errors() -> Iterator[None]:
    """A database error in a command: one line, exit status 1."""
    try:
        yield
    except (sa.exc.SQLAlchemyError, AMQPError) as exc:
        raise click.ClickException(_first_line(exc)) from exc


# -- Prometheus ------------------------------------------------------------------------------------------
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


# -- `flask amqp outbox` -----------------------------------------------------------------------------------
@click.group("outbox", cls=AppGroup, invoke_without_command=True)
@click.pass_context
@with_appcontext
def outbox_cli(ctx: click.Context) -> None:
    """Show the transactional outbox: pending messages, the oldest one's age, parked rows with their errors."""
    if ctx.invoked_subcommand is not None:
        return
    for state in _outboxes():
        with _database_errors():
            report = state.pending()
            parked = state.parked_rows()
        age = "-" if report["oldest_age"] is None else f"{report['oldest_age']:.1f}s"
        click.echo(f"outbox {state.outbox.table.name!r}: {report['pending']} pending, oldest {age}, "
                   f"{report['parked']} parked")
        for row in parked:
            click.echo(f"  parked #{row['id']} to exchange {row['exchange']!r} routing key {row['routing_key']!r} "
                       f"after {row['attempts']} attempts: {row['error']}")
        if report["parked"]:
            click.echo("  `flask amqp outbox retry` puts parked rows back once their cause is fixed")


def _outboxes() -> list[OutboxState]:
    found = list(current_app.extensions.get("amqp_outbox", {}).values())
    if not found:
        raise click.ClickException("this app has no outbox: call Outbox(db).init_app(app) "
                                   "(flask_nucleon_amqp.outbox)")
    return found


@outbox_cli.command("relay")
@click.option("--timeout", type=float, default=None, help="Seconds the batch in flight gets at shutdown.")
def relay_command(timeout: float | None) -> None:
    """Run the outbox relay in the foreground until SIGTERM or Ctrl-C."""
    from ._cli_group import _wait_for_signal

    states = _outboxes()
    for state in states:
        state.relay.start()
        click.echo(f"relaying outbox {state.outbox.table.name!r} to "
                   f"{state.amqp.get_amqp_pool(state.settings.pool).settings.safe_url()}; Ctrl-C or SIGTERM stops")
    signal_number = _wait_for_signal()
    click.echo(f"{signal.Signals(signal_number).name}: stopping the relay")
    for state in states:
        state.relay.stop(timeout if timeout is not None else state.settings.timeout)
        click.echo(f"stopped: {state.relay.stats['relayed']} messages relayed")
    current_app.extensions["amqp"].close(timeout)


@outbox_cli.command("retry")
@click.argument("ids", nargs=-1, type=int)
def retry_command(ids: tuple[int, ...]) -> None:
    """Put parked rows (all, or the given IDS) back: the relay publishes them again."""
    with _database_errors():
        total = sum(state.retry_parked(ids or None) for state in _outboxes())
    click.echo(f"{total} parked message(s) put back for the relay")
