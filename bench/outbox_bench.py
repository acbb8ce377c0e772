#!/usr/bin/env python3
"""Outbox benchmark: the transactional outbox against a direct publish after the commit.

Run with ``make bench`` (after the other benchmarks) or ``python bench/outbox_bench.py``.

1. **HTTP**, per database (SQLite file, PostgreSQL): one gunicorn gevent
   worker serves ``/outbox`` (insert an order row, ``outbox.publish``, commit:
   published by the worker after the commit) and ``/direct`` (insert, commit,
   then ``current_app.amqp.publish``, confirmed, in the request). A load
   generator in another process (bench/http_bench.py's) keeps N keep-alive
   requests in flight; the endpoints take turns, the median of the rounds is
   reported. Target: /outbox >= 0.8x /direct. Every message must arrive: the
   queue must hold one message per successful request.
2. **Commit-to-delivery latency**, in one process: commit one message, time
   until a consumer of the same process has it; p50 and p99. Target: p50 < 2 ms.
3. **Relay throughput** on PostgreSQL: 10,000 rows left behind (as by a dead
   worker), then one relay publishes them all. Target: >= 5,000 messages/s.

A lost message, an HTTP error or a crash makes the exit status non-zero; a
missed target is reported as FAIL text only.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and "--load" in sys.argv:  # the load generator: patched before anything else
    from gevent import monkey

    monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

import http_bench  # noqa: E402

BODY = b"x" * 100
POSTGRESQL = os.environ.get("BENCH_POSTGRESQL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
ENDPOINTS = {"outbox": "insert, outbox.publish, commit", "direct": "insert, commit, amqp.publish (confirmed)"}


# -- the app the servers run ----------------------------------------------------------------------------
def create_outbox_bench_app() -> Any:
    """gunicorn 'outbox_bench:create_outbox_bench_app()': both endpoints, configured by environment."""
    import sqlalchemy as sa
    from flask import Flask, current_app
    from flask_sqlalchemy import SQLAlchemy

    from flask_nucleon_amqp import AMQP
    from flask_nucleon_amqp.outbox import Outbox

    db = SQLAlchemy()
    outbox = Outbox(db, table_name=os.environ["BENCH_TABLE"])
    orders = db.Table(os.environ["BENCH_TABLE"] + "_orders", sa.Column("id", sa.Integer, primary_key=True),
                      sa.Column("body", sa.LargeBinary))
    app = Flask("outbox_bench")
    app.config.update(SQLALCHEMY_DATABASE_URI=os.environ["BENCH_DATABASE"], AMQP_URL=os.environ["BENCH_AMQP_URL"],
                      SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 20, "max_overflow": 80})
    db.init_app(app)
    AMQP(app)
    outbox.init_app(app)
    queue = os.environ["BENCH_QUEUE"]

    @app.get("/outbox")
    def through_the_outbox() -> str:
        db.session.execute(orders.insert().values(body=BODY))
        outbox.publish("", queue, BODY)
        db.session.commit()
        return "ok"

    @app.get("/direct")
    def direct() -> str:
        db.session.execute(orders.insert().values(body=BODY))
        db.session.commit()
        current_app.amqp.publish("", queue, BODY)
        return "ok"

    return app


def _tables(url: str, table: str, action: str) -> None:
    """Create or drop the outbox and orders tables of one run."""
    import sqlalchemy as sa

    from flask_nucleon_amqp.outbox import _make_table

    metadata = sa.MetaData()
    _make_table(metadata, table)
    sa.Table(table + "_orders", metadata, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("body", sa.LargeBinary))
    engine = sa.create_engine(url)
    try:
        (metadata.create_all if action == "create" else metadata.drop_all)(engine)
    finally:
        engine.dispose()


# -- 1. HTTP -------------------------------------------------------------------------------------------------
def http(args: argparse.Namespace, label: str, database: str) -> tuple[dict[str, float], int]:
    table = f"bench_outbox_{uuid.uuid4().hex[:8]}"
    queue = f"outbox-bench-{uuid.uuid4().hex[:10]}"
    env = {**os.environ, "BENCH_AMQP_URL": args.url, "BENCH_QUEUE": queue, "BENCH_DATABASE": database,
           "BENCH_TABLE": table, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    _tables(database, table, "create")
    http_bench._queue(args.url, queue, "declare")
    results: dict[str, list[float]] = {name: [] for name in ENDPOINTS}
    published = 0
    status = 0
    port = http_bench._free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1", "--worker-connections", "1000",
         "--keep-alive", "60", "--log-level", "warning", "-b", f"127.0.0.1:{port}", "--chdir", str(HERE),
         *http_bench._control_socket(f"outbox-{label}"), "outbox_bench:create_outbox_bench_app()"], env=env)
    try:
        http_bench._wait_for(port, server)
        for name in ENDPOINTS:  # warm-up, not measured: the worker's first requests open its connections
            out = subprocess.run([sys.executable, __file__, "--load", "--port", str(port), "--path", f"/{name}",
                                  "--connections", str(args.connections), "--warmup", "0", "--duration",
                                  str(args.warmup)], env=env, capture_output=True, text=True, timeout=120)
            if out.returncode == 0:
                published += json.loads(out.stdout)["ok"]
        names = list(ENDPOINTS)
        for round_number in range(args.rounds):
            for name in names[round_number % 2:] + names[:round_number % 2]:
                out = subprocess.run([sys.executable, __file__, "--load", "--port", str(port), "--path", f"/{name}",
                                      "--connections", str(args.connections), "--warmup", str(args.warmup),
                                      "--duration", str(args.duration)], env=env, capture_output=True, text=True,
                                     timeout=args.warmup + args.duration + 60)
                if out.returncode != 0:
                    print(out.stderr, file=sys.stderr)
                    return {}, 1
                report = json.loads(out.stdout)
                if report["errors"]:
                    print(f"FAIL: /{name} on {label}: {report['errors']} failed requests, e.g. {report['failures']}",
                          file=sys.stderr)
                    status = 1
                published += report["ok"]
                results[name].append(report["rps"])
                print(f"  {label} round {round_number + 1}: /{name:<7} {report['rps']:8.0f} req/s", file=sys.stderr)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    depth = http_bench._queue_depth(args.url, queue, published)
    http_bench._queue(args.url, queue, "delete")
    _tables(database, table, "drop")
    if depth != published:
        print(f"FAIL: {label}: {published} requests succeeded but the queue holds {depth} messages", file=sys.stderr)
        status = 1
    return {name: statistics.median(values) for name, values in results.items()}, status


# -- 2. latency and 3. relay, in this process ------------------------------------------------------------------
def _in_process_app(args: argparse.Namespace, database: str, table: str, **config: Any) -> Any:
    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy

    from flask_nucleon_amqp import AMQP
    from flask_nucleon_amqp.outbox import Outbox

    db = SQLAlchemy()
    outbox = Outbox(db, table_name=table)
    app = Flask("outbox_bench_inproc")
    app.config.update(SQLALCHEMY_DATABASE_URI=database, AMQP_URL=args.url, **config)
    db.init_app(app)
    AMQP(app)
    outbox.init_app(app)
    with app.app_context():
        outbox.table.create(db.engine)
    return app, db, outbox


def latency(args: argparse.Namespace, database: str, direct: bool = False) -> list[float]:
    """Commit one message at a time; seconds from the end of commit() to the consumer's callback.

    ``direct``: the baseline, a publish (asynchronous, confirmed) right after the commit instead of the outbox.
    """
    import gevent.event

    table = f"bench_outbox_{uuid.uuid4().hex[:8]}"
    app, db, outbox = _in_process_app(args, database, table)
    amqp = app.extensions["amqp"]
    listen = amqp.connection("listen")
    queue = listen.queue_declare("", exclusive=True)["queue"]
    arrived = gevent.event.Event()
    listen.consume(queue, lambda _promise, _message: arrived.set(), no_ack=True)
    samples = []
    try:
        with app.app_context():
            for index in range(args.latency_messages + 100):
                arrived.clear()
                if direct:
                    db.session.commit()
                    committed = time.perf_counter()
                    amqp.publish("", queue, BODY, callback=lambda _promise, _result: None)
                else:
                    outbox.publish("", queue, BODY)
                    db.session.commit()
                    committed = time.perf_counter()
                if not arrived.wait(5):
                    raise SystemExit("a committed outbox message did not arrive within 5 s")
                if index >= 100:  # warm-up
                    samples.append(time.perf_counter() - committed)
    finally:
        amqp.close(timeout=5)
        with app.app_context():
            outbox.table.drop(db.engine)
    return samples


def relay_throughput(args: argparse.Namespace) -> float:
    """Messages/s of one relay over args.backlog rows left behind on PostgreSQL."""
    table = f"bench_outbox_{uuid.uuid4().hex[:8]}"
    app, db, outbox = _in_process_app(args, POSTGRESQL, table, AMQP_OUTBOX_RELAY_DELAY=0.0)
    amqp = app.extensions["amqp"]
    queue = f"outbox-relay-bench-{uuid.uuid4().hex[:8]}"
    amqp.queue_declare(queue, arguments={"x-expires": 600_000})
    state = app.extensions["amqp_outbox"][table]
    with app.app_context():
        engine = db.engine
    try:
        with engine.begin() as connection:
            connection.execute(outbox.table.insert(), [
                {"created": time.time() - 60, "exchange": "", "routing_key": queue, "body": BODY,
                 "properties": "{}", "attempts": 0, "next_attempt": 0.0, "parked": False}
                for _ in range(args.backlog)])
        started = time.perf_counter()
        relayed = 0
        while True:
            taken = state.relay_once()
            if not taken:
                break
            relayed += taken
        seconds = time.perf_counter() - started
        depth = amqp.queue_declare(queue, passive=True)["message_count"]
        if depth != args.backlog or relayed != args.backlog:
            raise SystemExit(f"FAIL: relayed {relayed} of {args.backlog} rows; the queue holds {depth}")
        return args.backlog / seconds
    finally:
        amqp.queue_delete(queue)
        amqp.close(timeout=5)
        outbox.table.drop(engine)
        engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"))
    parser.add_argument("--connections", type=int, default=50, help="requests in flight (keep-alive connections)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds per endpoint and round")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--latency-messages", type=int, default=2000)
    parser.add_argument("--backlog", type=int, default=10_000)
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        print(json.dumps(http_bench.load(args.port, args.path, args.connections, args.warmup, args.duration)))
        return 0

    status = 0
    databases = {"SQLite": f"sqlite:///{tempfile.mkdtemp(prefix='outbox-bench-')}/bench.db",
                 "PostgreSQL": POSTGRESQL}
    http_results = {}
    for label, database in databases.items():
        http_results[label], failed = http(args, label, database)
        status = status or failed
    latencies = {label: latency(args, database) for label, database in databases.items()}
    baseline = latency(args, POSTGRESQL, direct=True)
    throughput = relay_throughput(args)

    print(f"Outbox benchmark: gunicorn with one gevent worker, {args.connections} keep-alive requests in flight, "
          f"{len(BODY)}-byte bodies; median of {args.rounds} rounds of {args.duration:g} s")
    for label, median in http_results.items():
        if not median:
            continue
        ratio = median["outbox"] / median["direct"]
        print(f"  {label:<11} /outbox {median['outbox']:7.0f} req/s   /direct {median['direct']:7.0f} req/s   "
              f"outbox / direct = {ratio:.2f}  (target >= 0.80)  {'PASS' if ratio >= 0.8 else 'FAIL'}")
    for label, samples in latencies.items():
        samples.sort()
        p50, p99 = samples[len(samples) // 2] * 1000, samples[int(len(samples) * 0.99)] * 1000
        print(f"  {label:<11} commit-to-delivery p50 {p50:.2f} ms, p99 {p99:.2f} ms over {len(samples)} messages "
              f"(target p50 < 2 ms)  {'PASS' if p50 < 2 else 'FAIL'}")
    baseline.sort()
    print(f"  baseline    publish after the commit (no outbox): p50 {baseline[len(baseline) // 2] * 1000:.2f} ms, "
          f"p99 {baseline[int(len(baseline) * 0.99)] * 1000:.2f} ms")
    print(f"  PostgreSQL  relay: {throughput:,.0f} messages/s from a backlog of {args.backlog:,} "
          f"(target >= 5,000)  {'PASS' if throughput >= 5000 else 'FAIL'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
