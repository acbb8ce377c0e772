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
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, current_app, has_app_context

from . import _puka
from ._argument_checks import _properties
from .config import OUTBOX_SETTINGS
from .exceptions import ConfigError
from .message import _NOTHING, encode_body

try:
    import sqlalchemy as sa
    from sqlalchemy import event
    from sqlalchemy.orm import Session
except ImportError as exc:  # pragma: no cover - depends on the extra being installed
    raise ImportError("flask_nucleon_amqp.outbox needs SQLAlchemy 2: "
                      "pip install flask-nucleon-amqp[sqlalchemy]") from exc

# What lives in the private modules, importable from here as before (after the check above).
from . import _outbox_relay
from ._outbox_cli import outbox_cli as outbox_cli
from ._outbox_metrics import OutboxMetrics as OutboxMetrics
from ._outbox_relay import OutboxSettings as OutboxSettings
from ._outbox_relay import OutboxState as OutboxState
from ._outbox_relay import Relay as Relay
from ._outbox_relay import _Record

__all__ = ["Outbox", "OutboxState", "Relay", "outbox_written", "outbox_published", "outbox_parked", "CONFIG_KEYS"]

#: Sent with the :class:`Outbox` as sender when a message row is written (id, exchange, routing_key).
outbox_written = _outbox_relay.outbox_written
#: Sent when rows were published and confirmed (count, ids, by: "commit" or "relay").
outbox_published = _outbox_relay.outbox_published
#: Sent when a row is parked after its last failed attempt (id, exchange, routing_key, error).
outbox_parked = _outbox_relay.outbox_parked

#: The ``AMQP_OUTBOX_*`` keys (defined with every other key in :mod:`flask_nucleon_amqp.config`).
CONFIG_KEYS = OUTBOX_SETTINGS

#: The property arguments of ``publish`` (besides body, json, headers, persistent, mandatory).
_PROPERTY_NAMES = frozenset({
    "content_type", "content_encoding", "delivery_mode", "priority", "correlation_id", "reply_to", "expiration",
    "message_id", "timestamp", "type", "app_id", "user_id",
})

#: The session.info key of the messages a transaction wrote.
_PENDING = "flask_nucleon_amqp.outbox"


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
