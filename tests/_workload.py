"""A Jepsen-style queue workload for the fault tests: publish, consume, count every message.

Publishers (many greenlets, confirmed publishes through a pool; every tenth
one with ``callback=`` rather than waiting) and one
consumer (``consume(queue, callback=...)``) run while a test injects a fault.
Each publish has a unique body and ends either confirmed or with an exception
the caller saw; the checker then says:

* lost: confirmed but never consumed (must be 0);
* unreported: a publish call still hanging when the workload stops (must be 0);
* duplicated: consumed more than once (allowed: at-least-once; reported);
* unknown outcome: reported as failed, yet delivered (allowed: ConnectionLost
  means the broker may or may not have routed it).

It also times detection (first failure a caller saw after the fault) and
recovery (first confirmed publish, and first delivery the consumer could ack,
after the broker was back).
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import gevent
from gevent.event import AsyncResult, Event

from flask_nucleon_amqp import AMQP, AMQPError, AMQPState, MessageStateError, signals

from conftest import make_app

#: Where the figures of every fault go (the issue's closing note quotes them).
FIGURES_FILE = os.environ.get("NUCLEON_FIGURES_FILE", "/tmp/reliability-figures.md")
_figures_started = False


@dataclass
class Attempt:
    started: float
    ended: float | None = None
    error: BaseException | None = None
    connection: str = ""


@dataclass
class Figures:
    fault: str
    published: int = 0
    confirmed: int = 0
    failed: int = 0
    consumed: int = 0
    lost: int = 0
    duplicated: int = 0
    unreported: int = 0
    unknown_outcome: int = 0
    stale_acks: int = 0
    detection: float | None = None
    publish_recovery: float | None = None
    consumer_recovery: float | None = None
    errors: dict[str, int] = field(default_factory=dict)
    notes: str = ""

    def row(self) -> str:
        def seconds(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f} s"

        errors = ", ".join(f"{name} {count}" for name, count in sorted(self.errors.items())) or "-"
        return (f"| {self.fault} | {self.published} | {self.confirmed} | {self.failed} | {self.consumed} | "
                f"{self.lost} | {self.duplicated} | {self.unreported} | {seconds(self.detection)} | "
                f"{seconds(self.publish_recovery)} | {seconds(self.consumer_recovery)} | {errors} | {self.notes} |")


HEADER = ("| fault | published | confirmed | failed (reported) | consumed (distinct) | lost | duplicated | "
          "unreported | detection | publish recovery | consumer recovery | errors callers saw | notes |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def record_figures(figures: Figures) -> None:
    """Print the figures (visible with ``-s``) and append them to FIGURES_FILE."""
    line = figures.row()
    print(f"\n{HEADER}\n{line}")
    global _figures_started
    try:
        fresh = not _figures_started  # each test session starts the file again
        _figures_started = True
        with open(FIGURES_FILE, "w" if fresh else "a") as out:
            if fresh:
                out.write("# Reliability tier: figures per fault\n\n"
                          "Times are seconds; detection counts from the fault's injection, recovery from the moment "
                          "the broker (or link) was back.\n\n" + HEADER + "\n")
            out.write(line + "\n")
    except OSError:
        pass


class Workload:
    """``publishers`` greenlets publish through ``pool``; one consumer reads ``queue`` through ``consumer``."""

    def __init__(self, pool: Any, consumer: Any, queue: str, *, publishers: int = 100, pause: float = 0.02,
                 publish_timeout: float | None = None, prefetch: int = 200) -> None:
        self.pool = pool
        self.consumer_conn = consumer
        self.queue = queue
        self.publisher_count = publishers
        self.pause = pause
        self.publish_timeout = publish_timeout
        self.prefetch = prefetch
        self.attempts: dict[bytes, Attempt] = {}
        self.consumed: Counter[bytes] = Counter()
        self.acked_at: list[float] = []
        self.stale_acks = 0
        self.consumer_promise: int | None = None
        self.stopping = Event()
        self.greenlets: list[gevent.Greenlet] = []
        #: (monotonic time, connection) of each connection_lost / connection_recovered signal.
        self.lost: list[tuple[float, Any]] = []
        self.recovered: list[tuple[float, Any]] = []
        self._receivers: list[tuple[Any, Any]] = []

    # -- running --------------------------------------------------------------------------------
    def start(self) -> None:
        for signal, record in ((signals.connection_lost, self.lost), (signals.connection_recovered, self.recovered)):
            def receiver(sender: Any, _record: list[tuple[float, Any]] = record, **_: Any) -> None:
                _record.append((time.monotonic(), sender))
            signal.connect(receiver)
            self._receivers.append((signal, receiver))
        self.consumer_promise = self.consumer_conn.consume(self.queue, callback=self._on_message,
                                                           prefetch_count=self.prefetch)
        self.greenlets = [gevent.spawn(self._publish_loop, n) for n in range(self.publisher_count)]

    def _publish_loop(self, number: int) -> None:
        sequence = 0
        while not self.stopping.is_set():
            body = f"{number}-{sequence}".encode()
            sequence += 1
            attempt = self.attempts[body] = Attempt(time.monotonic())
            try:
                conn = self.pool.connection()
                session = conn._session  # for the figures only: which node the publish went to
                attempt.connection = f"#{conn.index}@{session.node.port if session is not None else '?'}"
                if number % 10 == 9:
                    # Every tenth publisher uses callback=: its outcome must reach the callback, always.
                    box: AsyncResult = AsyncResult()
                    conn.publish("", self.queue, body, persistent=True,
                                 callback=lambda _promise, result, box=box: box.set(result))
                    result = box.get()
                    if isinstance(result, BaseException):
                        raise result
                else:
                    conn.publish("", self.queue, body, persistent=True, timeout=self.publish_timeout)
            except Exception as exc:  # noqa: BLE001 - every failure is recorded and counted
                attempt.error = exc
                attempt.ended = time.monotonic()
                gevent.sleep(0.05 + random.random() * 0.1)  # a caller's retry pause
                continue
            attempt.ended = time.monotonic()
            gevent.sleep(random.random() * 2 * self.pause)

    def _on_message(self, _promise: int, message: Any) -> None:
        self.consumed[message.body] += 1
        try:
            message.ack()
        except MessageStateError:
            self.stale_acks += 1  # arrived on a connection that died since: the broker redelivers it
        else:
            self.acked_at.append(time.monotonic())

    def run_for(self, seconds: float) -> None:
        gevent.sleep(seconds)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop publishing; wait for every publish call to end (a hang is counted, not waited out)."""
        self.stopping.set()
        gevent.joinall(self.greenlets, timeout=timeout)

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until every confirmed message was consumed (or ``timeout``), then a little more for duplicates."""
        deadline = time.monotonic() + timeout
        confirmed = [body for body, a in self.attempts.items() if a.ended is not None and a.error is None]
        while time.monotonic() < deadline and any(body not in self.consumed for body in confirmed):
            gevent.sleep(0.05)
        settled = time.monotonic()
        while time.monotonic() - settled < 0.5 and time.monotonic() < deadline:
            before = sum(self.consumed.values())
            gevent.sleep(0.25)
            if sum(self.consumed.values()) != before:
                settled = time.monotonic()

    def close(self) -> None:
        self.stopping.set()
        gevent.killall([g for g in self.greenlets if not g.dead], timeout=5)
        for signal, receiver in self._receivers:
            signal.disconnect(receiver)
        self._receivers.clear()
        if self.consumer_promise is not None:
            try:
                self.consumer_conn.cancel(self.consumer_promise, timeout=5)
            except (AMQPError, ValueError):
                pass
            self.consumer_promise = None

    # -- checking -------------------------------------------------------------------------------
    def confirmed_after(self, moment: float) -> float | None:
        """When the first publish that started after ``moment`` was confirmed."""
        times = [a.ended for a in self.attempts.values()
                 if a.error is None and a.ended is not None and a.started >= moment]
        return min(times) if times else None

    def first_failure_after(self, moment: float) -> float | None:
        times = [a.ended for a in self.attempts.values() if a.error is not None and a.ended is not None
                 and a.ended >= moment]
        return min(times) if times else None

    def acked_after(self, moment: float) -> float | None:
        times = [t for t in self.acked_at if t >= moment]
        return min(times) if times else None

    def detected_at(self, fault_at: float, connection: Any = None) -> float | None:
        """The first sign of the fault: a caller's failure or a connection_lost signal (of ``connection``)."""
        times = [t for t, sender in self.lost if t >= fault_at and (connection is None or sender is connection)]
        if connection is None:
            failure = self.first_failure_after(fault_at)
            if failure is not None:
                times.append(failure)
        return min(times) if times else None

    def figures(self, fault: str, *, fault_at: float, back_at: float, notes: str = "") -> Figures:
        confirmed = {b for b, a in self.attempts.items() if a.ended is not None and a.error is None}
        failed = {b: a.error for b, a in self.attempts.items() if a.error is not None}
        unreported = [b for b, a in self.attempts.items() if a.ended is None]
        errors = Counter(type(e).__name__ for e in failed.values())
        detected = self.detected_at(fault_at)
        # Recovery: the first publish issued after the fault was seen that got confirmed, and the first
        # delivery the consumer could ack after its own connection was lost, each counted from the moment
        # the broker (or the link) was back.
        publish_back = self.confirmed_after(detected) if detected is not None else None
        consumer_lost = self.detected_at(fault_at, self.consumer_conn)
        consumer_back = self.acked_after(consumer_lost) if consumer_lost is not None else None
        failures = sorted(a.ended for a in self.attempts.values()
                          if a.error is not None and a.ended is not None and a.ended >= fault_at)
        extra = []
        if failures:
            extra.append(f"callers saw failures for {failures[-1] - failures[0]:.2f} s")
        nacked = Counter(a.connection for a in self.attempts.values() if type(a.error).__name__ == "PublishNacked")
        if nacked:
            times = sorted(a.ended - fault_at for a in self.attempts.values()
                           if type(a.error).__name__ == "PublishNacked" and a.ended is not None)
            extra.append(f"nacks from {times[0]:.2f} s to {times[-1]:.2f} s after the fault, by connection#index@port: "
                         + ", ".join(f"{k} {v}" for k, v in sorted(nacked.items())))
        if self.stale_acks:
            extra.append(f"{self.stale_acks} acks of deliveries from the dead connection refused")
        notes = "; ".join([n for n in (notes, *extra) if n])
        return Figures(
            fault=fault,
            published=len(self.attempts),
            confirmed=len(confirmed),
            failed=len(failed),
            consumed=len(self.consumed),
            lost=len(confirmed - set(self.consumed)),
            duplicated=sum(count - 1 for count in self.consumed.values() if count > 1),
            unreported=len(unreported),
            unknown_outcome=len(set(failed) & set(self.consumed)),
            stale_acks=self.stale_acks,
            detection=None if detected is None else detected - fault_at,
            publish_recovery=None if publish_back is None else max(0.0, publish_back - back_at),
            consumer_recovery=None if consumer_back is None else max(0.0, consumer_back - back_at),
            errors=dict(errors),
            notes=notes,
        )

    def check(self, figures: Figures, *, consumer_within: float | None = 5.0) -> None:
        """The assertions every fault test makes, with the figures in the message."""
        confirmed = {b for b, a in self.attempts.items() if a.ended is not None and a.error is None}
        lost = sorted(confirmed - set(self.consumed))
        unexpected = sorted(set(self.consumed) - set(self.attempts))
        unreported = sorted(b for b, a in self.attempts.items() if a.ended is None)
        strange = {type(a.error).__name__ for a in self.attempts.values()
                   if a.error is not None and not isinstance(a.error, AMQPError)}
        summary = figures.row()
        assert figures.confirmed > 0, f"nothing was confirmed at all: {summary}"
        assert not unreported, (f"{len(unreported)} publish calls never returned nor raised "
                                f"(e.g. {unreported[:5]}): {summary}")
        assert not lost, f"{len(lost)} confirmed messages were never consumed (e.g. {lost[:10]}): {summary}"
        assert not unexpected, f"consumed messages nobody published: {unexpected[:10]}"
        assert not strange, f"publish failures that are not AMQPError: {strange}: {summary}"
        assert figures.publish_recovery is not None, f"no publish was confirmed after recovery: {summary}"
        assert figures.consumer_recovery is not None, f"the consumer never acked a message after recovery: {summary}"
        if consumer_within is not None:
            assert figures.consumer_recovery <= consumer_within, (
                f"the consumer came back {figures.consumer_recovery:.2f}s after the broker "
                f"(limit {consumer_within:g}s): {summary}")


# -- running one fault ---------------------------------------------------------------------------


def make_state(url: str | list[str], *, publish_size: int = 4, **options: Any) -> AMQPState:
    """An app whose two pools go to ``url`` (a private node, or a proxy in front of it)."""
    pool = {"url": url, "connect_timeout": 2, "operation_timeout": 15, **options}
    app = make_app(AMQP_POOLS={"publish": {**pool, "size": publish_size}, "listen": {**pool, "size": 1}})
    AMQP(app)
    return app.extensions["amqp"]  # type: ignore[no-any-return]


def queue_name(label: str) -> str:
    return f"reliability-{label}-{uuid.uuid4().hex[:8]}"


def run_fault(state: AMQPState, queue: str, fault: str, inject: Any, *, settle: float = 2.0, after: float = 4.0,
              secret_watch: Any = None, consumer_within: float | None = 5.0,
              queue_arguments: dict[str, Any] | None = None, broker: Any = None, notes: str = "",
              **workload_options: Any) -> tuple[Workload, Figures]:
    """Run the workload, call ``inject()`` (which returns when the broker/link is back), check the counts."""
    state.queue_declare(queue, durable=True, arguments=queue_arguments)
    workload = Workload(state.get_amqp_pool("publish"), state.connection("listen"), queue, **workload_options)
    try:
        workload.start()
        workload.run_for(settle)
        fault_at = time.monotonic()
        back_at = inject()  # None: the broker never went away; count recovery from the detection
        workload.run_for(after)
        workload.stop(timeout=30)
        workload.drain(timeout=30)
        if back_at is None:
            back_at = workload.detected_at(fault_at) or fault_at
        figures = workload.figures(fault, fault_at=fault_at, back_at=back_at, notes=notes)
        record_figures(figures)
        if secret_watch is not None:
            secret_watch.watch(*[a.error for a in workload.attempts.values() if a.error is not None][:200])
            secret_watch.watch(state, *state.get_amqp_pool("publish").connections(), state.get_amqp_pool("publish"))
        workload.check(figures, consumer_within=consumer_within)
        # Exactly one consumer after recovery, with the QoS it was registered with (the broker's view).
        if broker is not None:
            rows = broker().live_consumers(queue)
            assert [row.get("prefetch_count") for row in rows] == [workload.prefetch], (
                f"after recovery the broker lists these consumers of {queue}: {rows} "
                f"(expected one with prefetch_count={workload.prefetch})")
        return workload, figures
    finally:
        workload.close()


def cleanup(state: AMQPState, *queues: str) -> None:
    try:
        for queue in queues:
            state.queue_delete(queue, timeout=10)
    except Exception:  # noqa: BLE001 - best effort; the node is thrown away at the end anyway
        pass
    state.close(timeout=5)
