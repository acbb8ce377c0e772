"""One outbox in one app: its state, the after-commit publisher and the relay (see :mod:`flask_nucleon_amqp.outbox`).

:class:`OutboxState` is what ``outbox.init_app`` attaches to an app: the
settings, the counters, the after-commit ``_Publisher`` (publishes what a
commit wrote, pipelined, and deletes the confirmed rows) and the
:class:`Relay` (publishes the rows left behind, in batches claimed with
``SKIP LOCKED`` or a lease, and parks the rows whose publish keeps failing).
The outbox's signals are sent from here and from ``Outbox.publish``.
"""

from __future__ import annotations

import json as _json
import logging
import os
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
import gevent.lock
import sqlalchemy as sa
from blinker import Namespace
from flask import Flask

from ._memory_routing import _decode_table
from .config import OUTBOX_SETTINGS
from .exceptions import AMQPError, ChannelError, PublishNacked, Timeout
from .runtime import Runtime, in_hub

if TYPE_CHECKING:
    from .extension import AMQPState
    from .outbox import Outbox
    from .protocol import Connection

log = logging.getLogger("flask_nucleon_amqp.outbox")  # the name users configure (this module is private)

# The outbox's signals, documented where users import them: flask_nucleon_amqp.outbox.
_signals = Namespace()
outbox_written = _signals.signal("amqp-outbox-written")
outbox_published = _signals.signal("amqp-outbox-published")
outbox_parked = _signals.signal("amqp-outbox-parked")

#: Errors of the message itself (it is counted against the row); any other error is the broker's
#: or the connection's (nothing is counted: the relay backs off and tries again).
_MESSAGE_ERRORS = (ChannelError, PublishNacked)

#: Seconds the after-commit publisher gathers confirmed rows before deleting them in one statement.
_DELETE_DELAY = 0.02


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
        values = {key: setting.parse(key, config.get(key, setting.default)) for key, setting in OUTBOX_SETTINGS.items()}
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

