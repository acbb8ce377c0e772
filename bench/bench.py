#!/usr/bin/env python3
"""Benchmark flask_nucleon_amqp ("ext") against raw puka 0.0.8, pika and kombu.

Run with ``make bench`` or ``python bench/bench.py`` (see bench/README.md).

Scenarios (100-byte bodies unless stated):

  A  sequential confirmed publish (publish, wait for confirm, next)  msgs/s
  B  confirmed publish from 100 greenlets sharing one pool             msgs/s
  C  consume + ack with prefetch 100 from a pre-filled queue           msgs/s
  D  publish -> consumer-callback latency, one message at a time       p50/p99 ms
  E  sequential confirmed publish of 1 MiB bodies                      MB/s

Every body starts with a 10-digit message id.  Each run checks that every
published message was confirmed exactly once (A, B, E; plus the broker's queue
depth must equal the number published) or received exactly once (C, D; plus
the queue must be empty afterwards, i.e. every delivery was acked).  A lost or
duplicated message, or a crash, makes the exit status non-zero.  Missed
performance targets are reported as FAIL text only.

The implementations run round-robin inside each scenario (the starting
implementation rotates every round); the reported figure is the median of the
rounds.  Every measurement runs in a fresh worker subprocess (this file with
``--worker``), so no contender sees another's imports: importing
flask_nucleon_amqp patches puka's module globals, which must not leak into the
raw-puka baseline; and pika/kombu need gevent monkey-patching for scenario B
only.  The parent process owns the queues: it declares each one (unique name),
pre-fills it for C, checks the broker's count afterwards and deletes it, and
deletes whatever is left when it exits, even after a failure.
"""
import sys

# Workers that run pika or kombu from 100 greenlets (scenario B) must be
# monkey-patched before anything else is imported.  Nothing else is patched.
_PATCHED_WORKER = (__name__ == "__main__" and "--worker" in sys.argv
                   and "--patched" in sys.argv)
if _PATCHED_WORKER:
    from gevent import monkey

    monkey.patch_all()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import uuid  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.queue  # noqa: E402
import puka  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")

IMPLS = ("ext", "puka", "pika", "kombu")
SCENARIOS = ("A", "B", "C", "D", "E")

FULL_SIZES = {"A": 10000, "B": 20000, "C": 30000, "D": 5000, "E": 200}
QUICK_SIZES = {"A": 500, "B": 1000, "C": 2000, "D": 300, "E": 20}
# Untimed messages sent first (connection/channel setup, first-use costs).
# They go to the same queue and are accounted for like the timed ones.
WARMUP = {"A": 50, "B": 200, "C": 0, "D": 50, "E": 2}
BODY_SIZE = {"A": 100, "B": 100, "C": 100, "D": 100, "E": 1 << 20}
GREENLETS_B = 100
PREFETCH = 100
EXT_POOLS = {"publish": {"size": 2}, "listen": {"size": 1}}
PIKA_POOL_B = 2  # pika B: pool of 2 BlockingConnections, same as ext's pool
ID_LEN = 10

TITLES = {
    "A": "sequential confirmed publish",
    "B": "confirmed publish from %d greenlets" % GREENLETS_B,
    "C": "consume + ack, prefetch %d" % PREFETCH,
    "D": "publish -> consumer callback latency, one at a time",
    "E": "sequential confirmed publish, 1 MiB bodies",
}


class BenchTimeout(Exception):
    """A measurement made no progress within its time limit."""


class IntegrityError(Exception):
    """Messages were lost or duplicated."""


# --------------------------------------------------------------------------
# helpers


def now():
    return time.perf_counter()


def make_bodies(first, count, size):
    filler = b"x" * (size - ID_LEN)
    return [b"%010d" % i + filler for i in range(first, first + count)]


def body_id(body):
    # bytes (ext, pika, kombu) or str (puka 0.0.8 decodes bodies to str)
    return int(body[:ID_LEN])


class Tally:
    """Counts how often each message id was seen."""

    def __init__(self, total):
        self.total = total
        self.counts = bytearray(total)
        self.n = 0
        self.dups = 0
        self.unknown = 0
        self.errors = []

    def hit(self, i):
        self.n += 1
        if 0 <= i < self.total:
            c = self.counts[i]
            if c:
                self.dups += 1
            if c < 255:
                self.counts[i] = c + 1
        else:
            self.unknown += 1

    def missing(self):
        return self.counts.count(0)

    def problems(self, what):
        out = []
        missing = self.missing()
        if missing:
            first = self.counts.index(0)
            out.append("%d of %d %s never seen (first missing id %d)"
                       % (missing, self.total, what, first))
        if self.dups:
            out.append("%d duplicate %s" % (self.dups, what))
        if self.unknown:
            out.append("%d %s with an unknown id" % (self.unknown, what))
        for e in self.errors[:5]:
            out.append("%s failed: %s" % (what, e))
        if len(self.errors) > 5:
            out.append("... and %d more failures" % (len(self.errors) - 5))
        return out


@contextlib.contextmanager
def watchdog(seconds, what):
    """Raise BenchTimeout in the main thread after `seconds` (SIGALRM).

    This is the guard for the blocking libraries; ext code is additionally
    guarded by gevent.Timeout (a signal raised inside the gevent hub would
    only be logged by gevent).  Nests: an enclosing watchdog keeps running."""
    def handler(signum, frame):
        raise BenchTimeout("%s: no result after %.0f s" % (what, seconds))

    started = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, handler)
    old_remaining = signal.setitimer(signal.ITIMER_REAL, seconds)[0]
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_remaining > 0:
            left = old_remaining - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 0.001))


def quiet(fn, *args, **kwargs):
    """Best-effort teardown: never let a close() error mask the result."""
    try:
        with watchdog(10, "teardown"):
            fn(*args, **kwargs)
    except BaseException as e:  # noqa: B036 - teardown must not raise
        if isinstance(e, KeyboardInterrupt):
            raise
        return e
    return None


# --------------------------------------------------------------------------
# raw puka plumbing (also used for the admin connection)


def puka_connect(url, timeout=10.0):
    client = puka.Client(url)
    res = client.wait(client.connect(), timeout=timeout)
    if res is None:
        raise BenchTimeout("puka connect to %s timed out" % url)
    client.sd.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client


def puka_close(client):
    try:
        if client.sd is not None:
            client.wait(client.close(), timeout=5)
    finally:
        if client.sd is not None:
            try:
                client.sd.close()
            except OSError:
                pass
            client.sd = None


class Admin:
    """Declares, pre-fills, inspects and deletes the benchmark queues."""

    def __init__(self, url):
        self.url = url
        self.client = None
        self.queues = []  # every queue we declared and have not yet deleted

    def _c(self):
        if self.client is None or self.client.sd is None:
            self.client = puka_connect(self.url)
        return self.client

    def _call(self, make_promise, timeout=30):
        for attempt in (1, 2):
            try:
                c = self._c()
                res = c.wait(make_promise(c), timeout=timeout)
                if res is None:
                    raise BenchTimeout("admin operation timed out")
                return res
            except (OSError, AttributeError, BenchTimeout, puka.ConnectionBroken):
                # reconnect once, then give up
                if self.client is not None:
                    quiet(puka_close, self.client)
                self.client = None
                if attempt == 2:
                    raise

    def new_queue(self, tag):
        name = "bench-nucleon-%s-%s" % (tag, uuid.uuid4().hex)
        self.queues.append(name)
        self._call(lambda c: c.queue_declare(queue=name, auto_delete=False))
        return name

    def depth(self, name):
        res = self._call(lambda c: c.queue_declare(queue=name, passive=True))
        return res["message_count"], res["consumer_count"]

    def expect_depth(self, name, expected, settle=5.0):
        """Poll until the queue holds `expected` ready messages; return the
        last depth seen (the broker may need a moment to requeue unacked
        messages of a closed channel)."""
        deadline = time.time() + settle
        while True:
            depth, _consumers = self.depth(name)
            if depth == expected or time.time() > deadline:
                return depth
            if depth > expected and expected != 0:
                return depth  # more than published: duplicates, final
            time.sleep(0.05)

    def prefill(self, name, bodies, batch=5000):
        c = self._c()
        for start in range(0, len(bodies), batch):
            ps = [c.basic_publish(exchange="", routing_key=name, body=b)
                  for b in bodies[start:start + batch]]
            for p in ps:
                if c.wait(p, timeout=30) is None:
                    raise BenchTimeout("prefill confirm timed out")

    def warm_broker(self, size, count):
        """Push `count` messages of `size` bytes through a scratch queue, so the
        first timed measurement of a scenario does not pay the broker's own
        warm-up (memory growth for 1 MiB bodies, for instance)."""
        name = self.new_queue("warmup")
        try:
            self.prefill(name, make_bodies(0, count, size), batch=min(count, 5000))
        finally:
            self.delete(name)

    def delete(self, name):
        self._call(lambda c: c.queue_delete(queue=name))
        if name in self.queues:
            self.queues.remove(name)

    def delete_all(self):
        failed = []
        for name in list(self.queues):
            try:
                self.delete(name)
            except Exception as e:  # keep going, report below
                failed.append((name, e))
        return failed

    def server_version(self):
        return self._c().x_server_props.get("version", "?")

    def close(self):
        if self.client is not None:
            quiet(puka_close, self.client)
            self.client = None


# --------------------------------------------------------------------------
# ext plumbing

_EXT = {"mod": None, "error": None}


def load_ext(path):
    if _EXT["mod"] is None and _EXT["error"] is None:
        if path not in sys.path:
            sys.path.insert(0, path)
        try:
            import flask_nucleon_amqp
            if not hasattr(flask_nucleon_amqp, "AMQP"):
                raise ImportError("the package has no AMQP class (not finished yet? "
                                  "__file__=%r)" % getattr(flask_nucleon_amqp, "__file__", None))
            _EXT["mod"] = flask_nucleon_amqp
            # The package must not monkey-patch the process behind our back:
            # ext is measured un-patched unless --patch-ext asks otherwise.
            from gevent import monkey
            if not _PATCHED_WORKER and monkey.is_module_patched("socket"):
                _EXT["error"] = "importing flask_nucleon_amqp monkey-patched the process"
        except Exception as e:
            _EXT["error"] = "cannot import flask_nucleon_amqp from %s: %s: %s" % (
                path, type(e).__name__, e)
    if _EXT["error"]:
        raise RuntimeError(_EXT["error"])
    return _EXT["mod"]


def _trace_with_sdk(mod):
    """--otel: trace every publish and delivery with the OpenTelemetry SDK (batched, spans dropped)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    mod.tracing.use_tracer_provider(provider)


@contextlib.contextmanager
def ext_session(ctx, what):
    """Flask app + AMQP extension, an app context, and a gevent.Timeout."""
    mod = load_ext(ctx.ext_path)
    from flask import Flask

    app = Flask("bench")
    app.config["AMQP_URL"] = ctx.url
    app.config["AMQP_POOLS"] = {k: dict(v) for k, v in EXT_POOLS.items()}
    amqp = mod.AMQP(app)
    if os.environ.get("BENCH_OTEL"):
        _trace_with_sdk(mod)
    try:
        with app.app_context():
            with gevent.Timeout(ctx.timeout, BenchTimeout("%s: no result after %.0f s"
                                                          % (what, ctx.timeout))):
                yield amqp
    finally:
        try:
            with gevent.Timeout(30, BenchTimeout("amqp.close() took more than 30 s")):
                amqp.state.close()
        except BaseException as err:  # noqa: B036 - report, never mask the result
            if isinstance(err, KeyboardInterrupt):
                raise
            ctx.note("ext: amqp.close() raised %s: %s" % (type(err).__name__, err))


def ext_wait_confirms(tally, expected, timeout=10.0):
    deadline = time.time() + timeout
    while tally.n + len(tally.errors) < expected and time.time() < deadline:
        gevent.sleep(0.005)


# --------------------------------------------------------------------------
# pika / kombu plumbing


def pika_connect(url):
    import pika

    return pika.BlockingConnection(pika.URLParameters(url))


def kombu_connection(url, confirm=True):
    from kombu import Connection

    opts = {"confirm_publish": True} if confirm else {}
    return Connection(url, transport_options=opts)


def kombu_publish(producer, body, queue):
    producer.publish(body, exchange="", routing_key=queue, retry=False,
                     content_type="application/data", content_encoding="binary")


def kombu_reset():
    import kombu.pools

    kombu.pools.reset()


# --------------------------------------------------------------------------
# A and E: sequential confirmed publish (shared by both scenarios)


def seq_ext(ctx, q, bodies, w):
    with ext_session(ctx, "ext sequential publish") as amqp:
        pool = amqp.get_amqp_pool("publish")
        for b in bodies[:w]:
            pool.connection().publish("", q, b)
        confirmed = w
        t0 = now()
        for b in bodies[w:]:
            pool.connection().publish("", q, b)  # returns after the confirm
            confirmed += 1
        elapsed = now() - t0
    return {"elapsed": elapsed, "confirmed": confirmed}


def seq_puka(ctx, q, bodies, w):
    c = puka_connect(ctx.url)
    try:
        confirmed = 0
        for b in bodies[:w]:
            c.wait(c.basic_publish(exchange="", routing_key=q, body=b))
            confirmed += 1
        t0 = now()
        for b in bodies[w:]:
            c.wait(c.basic_publish(exchange="", routing_key=q, body=b))  # raises on error
            confirmed += 1
        elapsed = now() - t0
    finally:
        quiet(puka_close, c)
    return {"elapsed": elapsed, "confirmed": confirmed}


def seq_pika(ctx, q, bodies, w):
    conn = pika_connect(ctx.url)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        confirmed = 0
        for b in bodies[:w]:
            ch.basic_publish(exchange="", routing_key=q, body=b)
            confirmed += 1
        t0 = now()
        for b in bodies[w:]:
            ch.basic_publish(exchange="", routing_key=q, body=b)  # raises on nack
            confirmed += 1
        elapsed = now() - t0
    finally:
        quiet(conn.close)
    return {"elapsed": elapsed, "confirmed": confirmed}


def seq_kombu(ctx, q, bodies, w):
    from kombu.pools import producers

    conn = kombu_connection(ctx.url)
    try:
        pool = producers[conn]
        confirmed = 0
        for b in bodies[:w]:
            with pool.acquire(block=True) as producer:
                kombu_publish(producer, b, q)
            confirmed += 1
        t0 = now()
        for b in bodies[w:]:
            with pool.acquire(block=True) as producer:
                kombu_publish(producer, b, q)  # waits for the confirm
            confirmed += 1
        elapsed = now() - t0
    finally:
        quiet(kombu_reset)
        quiet(conn.release)
    return {"elapsed": elapsed, "confirmed": confirmed}


# --------------------------------------------------------------------------
# B: confirmed publish from many greenlets


def split(ids, parts):
    return [ids[k::parts] for k in range(parts)]


def b_ext(ctx, q, bodies, w):
    with ext_session(ctx, "ext B") as amqp:
        pool = amqp.get_amqp_pool("publish")
        done = [0]

        def work(chunk):
            for b in chunk:
                pool.connection().publish("", q, b)
                done[0] += 1

        def run(chunk_list):
            gs = [gevent.spawn(work, ch) for ch in chunk_list]
            gevent.joinall(gs)
            bad = [g.exception for g in gs if g.exception is not None]
            if bad:
                raise RuntimeError("%d greenlets failed, first: %r" % (len(bad), bad[0]))

        run(split(bodies[:w], GREENLETS_B))
        t0 = now()
        run(split(bodies[w:], GREENLETS_B))
        elapsed = now() - t0
    return {"elapsed": elapsed, "confirmed": done[0]}


def b_puka(ctx, q, bodies, w):
    c = puka_connect(ctx.url)
    try:
        confirmed = 0
        ps = [c.basic_publish(exchange="", routing_key=q, body=b) for b in bodies[:w]]
        for p in ps:
            c.wait(p)
            confirmed += 1
        t0 = now()
        ps = [c.basic_publish(exchange="", routing_key=q, body=b) for b in bodies[w:]]
        for p in ps:
            c.wait(p)
            confirmed += 1
        elapsed = now() - t0
    finally:
        quiet(puka_close, c)
    return {"elapsed": elapsed, "confirmed": confirmed}


# The two B functions below run only in a monkey-patched worker (--patched).


def b_kombu(ctx, q, bodies, w):
    import kombu.pools
    from kombu.pools import producers

    conn = kombu_connection(ctx.url)
    pool = producers[conn]
    done = [0]

    def work(chunk):
        for b in chunk:
            with pool.acquire(block=True) as producer:
                kombu_publish(producer, b, q)
            done[0] += 1

    def run(chunks):
        gs = [gevent.spawn(work, ch) for ch in chunks]
        gevent.joinall(gs)
        bad = [g.exception for g in gs if g.exception is not None]
        if bad:
            raise RuntimeError("%d greenlets failed, first: %r" % (len(bad), bad[0]))

    try:
        run(split(bodies[:w], GREENLETS_B))
        t0 = now()
        run(split(bodies[w:], GREENLETS_B))
        elapsed = now() - t0
    finally:
        kombu.pools.reset()
        conn.release()
    return {"elapsed": elapsed, "confirmed": done[0],
            "note": "producer pool limit %d" % kombu.pools.get_limit()}


def b_pika(ctx, q, bodies, w):
    conns = [pika_connect(ctx.url) for _ in range(PIKA_POOL_B)]
    free = gevent.queue.Queue()
    for conn in conns:
        ch = conn.channel()
        ch.confirm_delivery()
        free.put(ch)
    done = [0]

    def work(chunk):
        for b in chunk:
            ch = free.get()
            try:
                ch.basic_publish(exchange="", routing_key=q, body=b)
            finally:
                free.put(ch)
            done[0] += 1

    def run(chunks):
        gs = [gevent.spawn(work, ch) for ch in chunks]
        gevent.joinall(gs)
        bad = [g.exception for g in gs if g.exception is not None]
        if bad:
            raise RuntimeError("%d greenlets failed, first: %r" % (len(bad), bad[0]))

    try:
        run(split(bodies[:w], GREENLETS_B))
        t0 = now()
        run(split(bodies[w:], GREENLETS_B))
        elapsed = now() - t0
    finally:
        for conn in conns:
            try:
                conn.close()
            except Exception:
                pass
    return {"elapsed": elapsed, "confirmed": done[0]}


# --------------------------------------------------------------------------
# C: consume + ack, prefetch 100 (queue pre-filled by the admin connection)


def c_ext(ctx, q, n, rec):
    tally = rec["tally"] = Tally(n)
    with ext_session(ctx, "ext C") as amqp:
        conn = amqp.get_amqp_pool("listen").connection()
        finished = gevent.event.Event()

        def on_msg(promise, message):
            tally.hit(body_id(message.body))
            message.ack()
            if tally.n >= n:
                finished.set()

        t0 = now()
        promise = conn.consume(q, callback=on_msg, prefetch_count=PREFETCH)
        finished.wait()
        conn.cancel(promise)
        elapsed = now() - t0
    return {"elapsed": elapsed, "tally": tally}


def c_puka(ctx, q, n, rec):
    tally = rec["tally"] = Tally(n)
    c = puka_connect(ctx.url)
    try:
        t0 = now()
        cp = c.basic_consume(queue=q, prefetch_count=PREFETCH)
        for _ in range(n):
            msg = c.wait(cp)
            tally.hit(body_id(msg["body"]))
            c.basic_ack(msg)
        c.wait(c.basic_cancel(cp))
        elapsed = now() - t0
    finally:
        quiet(puka_close, c)
    return {"elapsed": elapsed, "tally": tally}


def c_pika(ctx, q, n, rec):
    tally = rec["tally"] = Tally(n)
    conn = pika_connect(ctx.url)
    try:
        ch = conn.channel()

        def on_msg(channel, method, properties, body):
            tally.hit(body_id(body))
            channel.basic_ack(method.delivery_tag)

        t0 = now()
        ch.basic_qos(prefetch_count=PREFETCH)
        tag = ch.basic_consume(q, on_message_callback=on_msg)
        while tally.n < n:
            conn.process_data_events(time_limit=1)
        ch.basic_cancel(tag)
        elapsed = now() - t0
    finally:
        quiet(conn.close)
    return {"elapsed": elapsed, "tally": tally}


def c_kombu(ctx, q, n, rec):
    from kombu import Consumer, Queue

    tally = rec["tally"] = Tally(n)
    conn = kombu_connection(ctx.url, confirm=False)
    try:
        conn.connect()
        ch = conn.channel()

        def on_msg(message):
            tally.hit(body_id(message.body))
            message.ack()

        consumer = Consumer(ch, queues=[Queue(q, no_declare=True)], on_message=on_msg,
                            auto_declare=False)
        t0 = now()
        consumer.qos(prefetch_count=PREFETCH)
        consumer.consume()
        while tally.n < n:
            try:
                conn.drain_events(timeout=1)
            except TimeoutError:
                pass
        consumer.cancel()
        elapsed = now() - t0
    finally:
        quiet(conn.release)
    return {"elapsed": elapsed, "tally": tally}


# --------------------------------------------------------------------------
# D: publish -> consumer callback latency


def d_ext(ctx, q, bodies, w, rec):
    total = len(bodies)
    got = rec["tally"] = Tally(total)
    confirms = rec["confirms"] = Tally(total)
    lat = []
    with ext_session(ctx, "ext D") as amqp:
        pub = amqp.get_amqp_pool("publish").connection()
        lis = amqp.get_amqp_pool("listen").connection()
        state = {"want": -1, "t1": 0.0}
        arrived = gevent.event.Event()

        def on_msg(promise, message):
            t1 = now()
            i = body_id(message.body)
            got.hit(i)
            message.ack()
            if i == state["want"]:
                state["t1"] = t1
                arrived.set()

        def confirm_cb(i):
            def cb(promise, result):
                if isinstance(result, Exception):
                    confirms.errors.append("id %d: %r" % (i, result))
                else:
                    confirms.hit(i)
            return cb

        cp = lis.consume(q, callback=on_msg, prefetch_count=PREFETCH)
        for i, b in enumerate(bodies):
            arrived.clear()
            state["want"] = i
            t0 = now()
            pub.publish("", q, b, callback=confirm_cb(i))
            if not arrived.wait(timeout=10):
                raise IntegrityError("message %d not delivered within 10 s" % i)
            if i >= w:
                lat.append(state["t1"] - t0)
        ext_wait_confirms(confirms, total)
        lis.cancel(cp)
    return {"lat": lat, "tally": got, "confirms": confirms}


def d_puka(ctx, q, bodies, w, rec):
    total = len(bodies)
    got = rec["tally"] = Tally(total)
    confirms = rec["confirms"] = Tally(total)
    lat = []
    c = puka_connect(ctx.url)
    try:
        cp = c.basic_consume(queue=q, prefetch_count=PREFETCH)
        pubs = []
        for i, b in enumerate(bodies):
            t0 = now()
            pubs.append(c.basic_publish(exchange="", routing_key=q, body=b))
            msg = c.wait(cp)
            t1 = now()
            j = body_id(msg["body"])
            got.hit(j)
            c.basic_ack(msg)
            if j != i:
                raise IntegrityError("expected message %d, got %d" % (i, j))
            if i >= w:
                lat.append(t1 - t0)
        for i, p in enumerate(pubs):
            c.wait(p)  # raises on a failed publish
            confirms.hit(i)
        c.wait(c.basic_cancel(cp))
    finally:
        quiet(puka_close, c)
    return {"lat": lat, "tally": got, "confirms": confirms}


def d_pika(ctx, q, bodies, w, rec):
    total = len(bodies)
    got = rec["tally"] = Tally(total)
    confirms = rec["confirms"] = Tally(total)
    lat = []
    conn = pika_connect(ctx.url)
    try:
        pub = conn.channel()
        pub.confirm_delivery()
        sub = conn.channel()
        sub.basic_qos(prefetch_count=PREFETCH)
        state = {"t1": None}

        def on_msg(channel, method, properties, body):
            state["t1"] = now()
            got.hit(body_id(body))
            channel.basic_ack(method.delivery_tag)

        tag = sub.basic_consume(q, on_message_callback=on_msg)
        for i, b in enumerate(bodies):
            state["t1"] = None
            t0 = now()
            pub.basic_publish(exchange="", routing_key=q, body=b)  # waits for confirm
            confirms.hit(i)
            while state["t1"] is None:
                conn.process_data_events(time_limit=1)
            if i >= w:
                lat.append(state["t1"] - t0)
        sub.basic_cancel(tag)
    finally:
        quiet(conn.close)
    return {"lat": lat, "tally": got, "confirms": confirms}


def d_kombu(ctx, q, bodies, w, rec):
    from kombu import Consumer, Queue
    from kombu.pools import producers

    total = len(bodies)
    got = rec["tally"] = Tally(total)
    confirms = rec["confirms"] = Tally(total)
    lat = []
    conn = kombu_connection(ctx.url)
    try:
        conn.connect()
        pool = producers[conn]
        state = {"t1": None}

        def on_msg(message):
            state["t1"] = now()
            got.hit(body_id(message.body))
            message.ack()

        consumer = Consumer(conn.channel(), queues=[Queue(q, no_declare=True)],
                            on_message=on_msg, auto_declare=False)
        consumer.qos(prefetch_count=PREFETCH)
        consumer.consume()
        for i, b in enumerate(bodies):
            state["t1"] = None
            t0 = now()
            with pool.acquire(block=True) as producer:
                kombu_publish(producer, b, q)  # waits for the confirm
            confirms.hit(i)
            while state["t1"] is None:
                try:
                    conn.drain_events(timeout=1)
                except TimeoutError:
                    pass
            if i >= w:
                lat.append(state["t1"] - t0)
        consumer.cancel()
    finally:
        quiet(kombu_reset)
        quiet(conn.release)
    return {"lat": lat, "tally": got, "confirms": confirms}


# --------------------------------------------------------------------------
# the runner

PUBLISH_FUNCS = {
    "A": {"ext": seq_ext, "puka": seq_puka, "pika": seq_pika, "kombu": seq_kombu},
    "B": {"ext": b_ext, "puka": b_puka, "pika": b_pika, "kombu": b_kombu},
    "E": {"ext": seq_ext, "puka": seq_puka, "pika": seq_pika, "kombu": seq_kombu},
}
CONSUME_FUNCS = {"ext": c_ext, "puka": c_puka, "pika": c_pika, "kombu": c_kombu}
LATENCY_FUNCS = {"ext": d_ext, "puka": d_puka, "pika": d_pika, "kombu": d_kombu}

PATCHED = {("B", "pika"), ("B", "kombu")}  # (scenario, impl) run monkey-patched

HOW = {
    "ext": "gevent, NOT monkey-patched; AMQP_POOLS publish size 2 / listen size 1; "
           "pool.connection() per publish; synchronous publish() = confirmed",
    "puka": "raw puka 0.0.8 (flask_nucleon_amqp never imported in its process), one "
            "puka.Client driven by client.wait(), TCP_NODELAY set on client.sd after connect",
    "pika": "pika BlockingConnection, channel.confirm_delivery()",
    "kombu": "kombu Connection(transport_options={'confirm_publish': True}), "
             "kombu.pools.producers[conn].acquire(block=True) per publish (default pool limit)",
}
HOW_B = {
    "ext": "%d greenlets, each doing sequential synchronous (confirmed) publishes through "
           "the shared publish pool of 2 connections; not monkey-patched" % GREENLETS_B,
    "puka": "one client: publish everything, then wait for every confirm (pipelined)",
    "pika": "worker with gevent.monkey.patch_all(): %d greenlets share a pool of %d "
            "BlockingConnections (one confirm channel each, checked out per publish)"
            % (GREENLETS_B, PIKA_POOL_B),
    "kombu": "worker with gevent.monkey.patch_all(): %d greenlets acquire a producer per "
             "publish from kombu.pools.producers[conn] (default limit 10 -> up to 10 "
             "connections)" % GREENLETS_B,
}
HOW_C = {
    "ext": "'listen' pool: conn.consume(queue, callback, prefetch_count=100), message.ack() "
           "in the callback",
    "puka": "basic_consume(prefetch_count=100), client.wait(consume promise), basic_ack",
    "pika": "basic_qos(100) + basic_consume callback with basic_ack, process_data_events loop",
    "kombu": "Consumer(on_message=...), qos(prefetch_count=100), message.ack(), drain_events",
}
HOW_D = {
    "ext": "consume on the 'listen' pool; async publish(callback=...) on the 'publish' pool; "
           "time = publish call -> consumer callback entry; confirms counted at the end",
    "puka": "one client: basic_publish, then client.wait(consume promise); confirms "
            "collected at the end",
    "pika": "one connection, 2 channels; basic_publish waits for its confirm BEFORE the "
            "delivery can be dispatched (includes a confirm round trip)",
    "kombu": "producer pool (confirm_publish waits for the confirm first) + Consumer on "
             "another connection driven by drain_events",
}


# ---- worker side ---------------------------------------------------------


class WorkerCtx:
    def __init__(self, url, ext_path, timeout):
        self.url = url
        self.ext_path = ext_path
        self.timeout = timeout
        self.notes = []

    def note(self, msg):
        self.notes.append(msg)


def run_measurement(ctx, scen, impl, q, n, w, size):
    """Runs inside the worker; returns a JSON-able dict."""
    out = {}
    rec = {}
    where = "%s/%s" % (scen, impl)
    try:
        if scen in PUBLISH_FUNCS:
            bodies = make_bodies(0, w + n, size)
            gc.collect()
            with watchdog(ctx.timeout + 15, where):
                res = PUBLISH_FUNCS[scen][impl](ctx, q, bodies, w)
            out["elapsed"] = res["elapsed"]
            out["confirmed"] = res["confirmed"]
            if res.get("note"):
                ctx.note(res["note"])
        elif scen == "C":
            gc.collect()
            with watchdog(ctx.timeout + 15, where):
                res = CONSUME_FUNCS[impl](ctx, q, n, rec)
            out["elapsed"] = res["elapsed"]
            out["problems"] = res["tally"].problems("deliveries")
        elif scen == "D":
            bodies = make_bodies(0, w + n, size)
            gc.collect()
            with watchdog(ctx.timeout + 15, where):
                res = LATENCY_FUNCS[impl](ctx, q, bodies, w, rec)
            out["problems"] = (res["tally"].problems("deliveries")
                               + res["confirms"].problems("publish confirms"))
            lat = sorted(res["lat"])
            if not lat:
                raise RuntimeError("no latency samples")
            out.update(p50=1000 * percentile(lat, 50), p99=1000 * percentile(lat, 99),
                       max=1000 * lat[-1], samples=len(lat))
    except IntegrityError as e:
        out["problems"] = [str(e)]
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        out["error"] = "%s: %s" % (type(e).__name__, e)
        out["traceback"] = traceback.format_exc()
        # The run did not finish, so missing messages prove nothing; but a
        # duplicate seen before the crash is still a duplicate.
        probs = []
        for key, what in (("tally", "deliveries"), ("confirms", "publish confirms")):
            t = rec.get(key)
            if t is not None and (t.dups or t.unknown):
                probs.append("before the crash: %d duplicate and %d unknown %s"
                             % (t.dups, t.unknown, what))
        out["problems"] = probs
    out["notes"] = ctx.notes
    return out


RESULT_MARK = "BENCH-RESULT "


def worker_main(argv):
    p = argparse.ArgumentParser(prog="bench.py --worker")
    p.add_argument("--worker", nargs=2, metavar=("SCENARIO", "IMPL"), required=True)
    p.add_argument("--patched", action="store_true")
    p.add_argument("--url", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--timeout", type=float, required=True)
    p.add_argument("--ext-path", required=True)
    a = p.parse_args(argv)
    scen, impl = a.worker
    ctx = WorkerCtx(a.url, a.ext_path, a.timeout)
    out = run_measurement(ctx, scen, impl, a.queue, a.n, a.warmup, a.size)
    out["patched"] = bool(_PATCHED_WORKER)
    sys.stdout.write("\n" + RESULT_MARK + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


def check_ext_main(path):
    """`--check-ext PATH`: can the extension be imported? (in its own process)"""
    try:
        mod = load_ext(path)
        print(RESULT_MARK + json.dumps({"ok": True, "file": mod.__file__,
                                        "version": getattr(mod, "__version__", "?")}))
    except Exception as e:
        print(RESULT_MARK + json.dumps({"ok": False, "error": str(e)}))
    return 0


# ---- parent side ---------------------------------------------------------


class Ctx:
    def __init__(self, args):
        self.url = args.url
        self.ext_path = args.ext_path
        self.timeout = args.timeout
        self.patch_ext = args.patch_ext
        self.admin = Admin(args.url)
        self.integrity = []   # lost / duplicated messages
        self.crashes = []     # exceptions, timeouts
        self.notes = []

    def note(self, msg):
        self.notes.append(msg)
        print("    note: %s" % msg, flush=True)

    def integrity_error(self, where, msg):
        line = "%s: %s" % (where, msg)
        self.integrity.append(line)
        print("\n!!!!! MESSAGE INTEGRITY ERROR !!!!! %s\n" % line, flush=True)

    def crash(self, where, msg, detail=""):
        line = "%s: %s" % (where, msg)
        self.crashes.append(line)
        print("\n!!!!! CRASH !!!!! %s" % line, flush=True)
        if detail:
            print("      " + detail.rstrip().replace("\n", "\n      ") + "\n", flush=True)


def check_ext(path):
    cmd = [sys.executable, os.path.abspath(__file__), "--check-ext", path]
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "importing the extension took more than 60 s"}
    for line in reversed(proc.stdout.decode(errors="replace").splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    return {"ok": False, "error": "import check exited %d: %s"
            % (proc.returncode, proc.stderr.decode(errors="replace")[-2000:])}


def spawn_worker(ctx, scen, impl, q, n, w, size):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", scen, impl,
           "--url", ctx.url, "--queue", q, "--n", str(n), "--warmup", str(w),
           "--size", str(size), "--timeout", str(ctx.timeout), "--ext-path", ctx.ext_path]
    if (scen, impl) in PATCHED or (impl == "ext" and ctx.patch_ext):
        cmd.append("--patched")
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=ctx.timeout + 60)
    except subprocess.TimeoutExpired as e:
        err = (e.stderr or b"").decode(errors="replace")
        return {"error": "worker killed after %.0f s" % (ctx.timeout + 60),
                "traceback": err[-3000:]}, err
    out = proc.stdout.decode(errors="replace")
    err = proc.stderr.decode(errors="replace")
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):]), err
    return {"error": "worker exited with status %d and no result" % proc.returncode,
            "traceback": (out[-1500:] + "\n" + err[-3000:])}, err


def run_one(ctx, scen, impl, rnd, sizes):
    """One measurement: queue set-up, a worker process, checks, clean-up."""
    where = "%s/%s/round %d" % (scen, impl, rnd)
    n, w, size = sizes[scen], WARMUP[scen], BODY_SIZE[scen]
    if scen == "C":
        w = 0
    q = None
    try:
        q = ctx.admin.new_queue("%s-%s" % (scen, impl))
        if scen == "C":
            ctx.admin.prefill(q, make_bodies(0, n, size))
            depth = ctx.admin.expect_depth(q, n)
            if depth != n:
                raise RuntimeError("prefill: queue holds %d, expected %d" % (depth, n))
        res, err = spawn_worker(ctx, scen, impl, q, n, w, size)
        for note in res.get("notes", []):
            ctx.note("%s: %s" % (where, note))
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if lines and not res.get("error"):
            shown = lines[:6] + (["... (%d more stderr lines)" % (len(lines) - 6)]
                                 if len(lines) > 6 else [])
            ctx.note("%s: worker stderr:\n          %s" % (where, "\n          ".join(shown)))
        for prob in res.get("problems", []):
            ctx.integrity_error(where, prob)
        if res.get("error"):
            ctx.crash(where, res["error"], res.get("traceback", ""))
            return None
        if res.get("problems"):
            return None
        if scen in PUBLISH_FUNCS:
            if res["confirmed"] != w + n:
                ctx.integrity_error(where, "%d confirms for %d published messages"
                                    % (res["confirmed"], w + n))
            depth = ctx.admin.expect_depth(q, w + n)
            if depth != w + n:
                ctx.integrity_error(where, "queue holds %d messages, %d were published and "
                                    "confirmed (%s)" % (depth, w + n,
                                                        "lost" if depth < w + n else "duplicated"))
            if scen == "E":
                return {"value": n * size / res["elapsed"] / (1 << 20)}
            return {"value": n / res["elapsed"]}
        depth = ctx.admin.expect_depth(q, 0)
        if depth != 0:
            ctx.integrity_error(where, "%d messages left in the queue after the run "
                                "(lost acks, or never delivered)" % depth)
        if scen == "C":
            return {"value": n / res["elapsed"]}
        return {"p50": res["p50"], "p99": res["p99"], "max": res["max"]}
    except Exception as e:
        ctx.crash(where, "%s: %s" % (type(e).__name__, e), traceback.format_exc())
        return None
    finally:
        if q is not None:
            try:
                ctx.admin.delete(q)
            except Exception as e:
                ctx.note("could not delete %s now (%s); retrying at exit" % (q, e))


def percentile(sorted_vals, pct):
    k = max(0, int(math.ceil(pct / 100.0 * len(sorted_vals))) - 1)
    return sorted_vals[k]


def fmt_value(scen, v):
    if v is None:
        return "crashed"
    if scen == "D":
        return "%.3f / %.3f ms" % (v["p50"], v["p99"])
    if scen == "E":
        return "%.1f MB/s" % v["value"]
    return "%s msg/s" % format(int(round(v["value"])), ",")


def median_of(scen, vals):
    ok = [v for v in vals if v is not None]
    if not ok:
        return None
    if scen == "D":
        return {"p50": statistics.median(v["p50"] for v in ok),
                "p99": statistics.median(v["p99"] for v in ok)}
    return {"value": statistics.median(v["value"] for v in ok)}


def spread(scen, vals):
    """(max - min) / median of the rounds, in %: how much to trust the median."""
    key = "p50" if scen == "D" else "value"
    xs = [v[key] for v in vals if v is not None]
    if len(xs) < 2:
        return "-"
    med = statistics.median(xs)
    pct = 100.0 * (max(xs) - min(xs)) / med if med else 0.0
    return "%d%%%s" % (round(pct), "!" if pct > 25 else "")


def ratio(scen, a, b):
    """a relative to b; for latency a/b of p50 (lower is better)."""
    if a is None or b is None:
        return None
    if scen == "D":
        return a["p50"] / b["p50"] if b["p50"] else None
    return a["value"] / b["value"] if b["value"] else None


def print_table(scen, impls, results, sizes, rounds):
    n = sizes[scen]
    unit = {"A": "msgs/s", "B": "msgs/s", "C": "msgs/s", "D": "p50 / p99", "E": "MB/s"}[scen]
    detail = {"A": "%d msgs x 100 B" % n, "B": "%d msgs x 100 B" % n,
              "C": "%d msgs x 100 B pre-filled" % n, "D": "%d round trips x 100 B" % n,
              "E": "%d msgs x 1 MiB" % n}[scen]
    print()
    print("Scenario %s: %s (%s), median of %d round(s), %s"
          % (scen, TITLES[scen], detail, rounds, unit))
    rel = "p50 vs puka" if scen == "D" else "vs puka"
    print("  %-6s %-22s %-12s %-7s %s" % ("impl", "result", rel, "spread", "per round"))
    base = median_of(scen, results[scen].get("puka", []))
    for impl in impls:
        vals = results[scen].get(impl)
        if vals is None:
            print("  %-6s %-22s" % (impl, "n/a"))
            continue
        med = median_of(scen, vals)
        r = ratio(scen, med, base)
        per = " | ".join(fmt_value(scen, v).replace(" msg/s", "").replace(" MB/s", "")
                         .replace(" ms", "") for v in vals)
        print("  %-6s %-22s %-12s %-7s %s" % (impl, fmt_value(scen, med),
                                               "%.2fx" % r if r is not None else "-",
                                               spread(scen, vals), per))


def summary(results, impls):
    def med(scen, impl):
        return median_of(scen, results.get(scen, {}).get(impl, []))

    lines = []

    def target(label, ok, detail):
        if ok is None:
            lines.append("  SKIP  %-34s %s" % (label, detail))
        else:
            lines.append("  %s  %-34s %s" % ("PASS" if ok else "FAIL", label, detail))

    def rel_target(scen, other, need, label):
        if scen not in results:
            return
        e, o = med(scen, "ext"), med(scen, other)
        r = ratio(scen, e, o)
        if r is None:
            target(label, None, "(ext or %s missing)" % other)
        else:
            target(label, r >= need, "ext = %.2fx %s" % (r, other))

    rel_target("A", "puka", 0.95, "A  ext >= 0.95x puka")
    rel_target("B", "puka", 1.25, "B  ext >= 1.25x puka")
    rel_target("B", "kombu", 3.0, "B  ext >= 3x kombu")
    rel_target("C", "puka", 1.4, "C  ext >= 1.4x puka")
    if "D" in results:
        e, p = med("D", "ext"), med("D", "puka")
        if e is None:
            target("D  ext p50 <= 0.3 ms", None, "(ext missing)")
            target("D  ext p50 <= puka p50", None, "(ext missing)")
            target("D  ext p99 <= 0.5 ms", None, "(ext missing)")
        else:
            target("D  ext p50 <= 0.3 ms", e["p50"] <= 0.3, "p50 = %.3f ms" % e["p50"])
            if p is None:
                target("D  ext p50 <= puka p50", None, "(puka missing)")
            else:
                target("D  ext p50 <= puka p50", e["p50"] <= p["p50"],
                       "ext = %.2fx puka" % (e["p50"] / p["p50"]))
            target("D  ext p99 <= 0.5 ms", e["p99"] <= 0.5, "p99 = %.3f ms" % e["p99"])
    rel_target("E", "puka", 1.5, "E  ext >= 1.5x puka")
    return lines


def parse_only(value):
    scens, impls = [], []
    for tok in (value or "").split(","):
        tok = tok.strip()
        if not tok:
            continue
        if tok.upper() in SCENARIOS:
            scens.append(tok.upper())
        elif tok.lower() in IMPLS:
            impls.append(tok.lower())
        else:
            raise SystemExit("--only: unknown scenario/implementation %r (scenarios %s, "
                             "implementations %s)" % (tok, ",".join(SCENARIOS), ",".join(IMPLS)))
    return (scens or list(SCENARIOS)), (impls or list(IMPLS))


def lib_versions():
    out = {}
    for name in ("puka", "pika", "kombu", "amqp", "gevent", "flask"):
        try:
            from importlib.metadata import version
            out[name] = version(name)
        except Exception:
            out[name] = "?"
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 round, 10-20x fewer messages (numbers not meaningful)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per scenario (default 3; 1 with --quick)")
    p.add_argument("--only", default="", help="comma list of scenarios (A-E) and/or implementations "
                   "(ext,puka,pika,kombu), e.g. --only A,B or --only C,ext,puka")
    p.add_argument("--url", default=DEFAULT_URL, help="AMQP URL (default %(default)s or $BENCH_AMQP_URL)")
    p.add_argument("--ext-path", default=ROOT, help="directory to import flask_nucleon_amqp from "
                   "(default: the repository root)")
    p.add_argument("--timeout", type=float, default=120.0, help="per-measurement time limit, s")
    p.add_argument("--patch-ext", action="store_true", help="run the ext workers under "
                   "gevent.monkey.patch_all(), as under gunicorn -k gevent (default: unpatched)")
    p.add_argument("--json", metavar="FILE", help="also write raw results as JSON")
    p.add_argument("--otel", action="store_true", help="ext traces with the OpenTelemetry SDK "
                   "(spans batched and dropped): the cost of tracing")
    args = p.parse_args(argv)
    if args.otel:
        os.environ["BENCH_OTEL"] = "1"  # the workers inherit it
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1:
        p.error("--rounds must be >= 1")
    scens, impls = parse_only(args.only)
    sizes = dict(QUICK_SIZES if args.quick else FULL_SIZES)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, on_sigterm)
    ctx = Ctx(args)
    started = time.time()
    results = {}
    interrupted = False

    print("flask_nucleon_amqp benchmark  (%s)" % time.strftime("%Y-%m-%d %H:%M:%S"))
    vers = lib_versions()
    try:
        rabbit = ctx.admin.server_version()
    except Exception as e:
        print("cannot connect to RabbitMQ at %s: %s" % (args.url, e))
        return 2
    print("python %s, %s; RabbitMQ %s; %d CPUs; load avg %s"
          % (platform.python_version(), ", ".join("%s %s" % kv for kv in vers.items()),
             rabbit, os.cpu_count() or 0, " ".join("%.2f" % x for x in os.getloadavg())))
    print("rounds %d%s; implementations round-robin within each scenario, start rotating "
          "every round; value = median of rounds" % (rounds, " (--quick)" if args.quick else ""))
    if "ext" in impls:
        chk = check_ext(args.ext_path)
        if chk.get("ok"):
            print("ext: flask_nucleon_amqp %s from %s" % (chk.get("version"),
                                                        os.path.dirname(chk["file"])))
        else:
            print("\n!!!!! ext UNAVAILABLE: %s\n" % chk.get("error"))
            ctx.crashes.append("ext unavailable: %s" % chk.get("error"))
            impls = [i for i in impls if i != "ext"]
    print("How each contender runs (every measurement in a fresh worker process; only the "
          "pika/kombu workers of scenario B are gevent-monkey-patched):")
    for impl in impls:
        how = HOW[impl]
        if impl == "ext" and args.patch_ext:
            how = how.replace("NOT monkey-patched", "MONKEY-PATCHED (--patch-ext)")
        print("  %-6s %s" % (impl, how))
    for scen, how, title in (("B", HOW_B, "Scenario B (pika and kombu are blocking libraries: "
                              "100 greenlets only make sense monkey-patched)"),
                             ("C", HOW_C, "Scenario C"), ("D", HOW_D, "Scenario D")):
        if scen in scens:
            print("  %s:" % title)
            for impl in impls:
                print("    %-6s %s" % (impl, how[impl]))
    print("  Untimed warm-up messages per measurement: %s; before each scenario the parent "
          "pushes 2000 x 100 B (E: 50 x 1 MiB) through a scratch queue to warm the broker"
          % ", ".join("%s=%d" % (s, WARMUP[s]) for s in scens))
    sys.stdout.flush()

    try:
        for scen in scens:
            results[scen] = {impl: [] for impl in impls}
            print("\n== scenario %s: %s" % (scen, TITLES[scen]), flush=True)
            try:
                if BODY_SIZE[scen] > 100000:
                    ctx.admin.warm_broker(BODY_SIZE[scen], 50)
                else:
                    ctx.admin.warm_broker(BODY_SIZE[scen], 2000)
            except Exception as e:
                ctx.note("broker warm-up failed: %s" % e)
            for rnd in range(1, rounds + 1):
                k = (rnd - 1) % len(impls)
                order = impls[k:] + impls[:k]
                for impl in order:
                    t0 = time.time()
                    v = run_one(ctx, scen, impl, rnd, sizes)
                    results[scen][impl].append(v)
                    print("  round %d  %-6s %-24s (%.1f s)" % (rnd, impl, fmt_value(scen, v),
                                                               time.time() - t0), flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted; cleaning up", flush=True)
    finally:
        failed = ctx.admin.delete_all()
        ctx.admin.close()
        # A last independent check that nothing of ours is left behind.
        for name, e in failed:
            print("!!! could not delete queue %s: %s" % (name, e))

    print("\n" + "=" * 78)
    print("RESULTS (median of %d round(s); ratio = implementation / raw puka; spread = "
          "(max-min)/median of the rounds, '!' above 25%%: a noisy machine; load avg now %s)"
          % (rounds, " ".join("%.2f" % x for x in os.getloadavg())))
    for scen in scens:
        if scen in results:
            print_table(scen, impls, results, sizes, rounds)
    print("\nTARGETS (informational; they do not affect the exit status)")
    for line in summary(results, impls):
        print(line)

    print("\nINTEGRITY: ", end="")
    if ctx.integrity:
        print("%d ERROR(S) - messages lost or duplicated:" % len(ctx.integrity))
        for line in ctx.integrity:
            print("  !!! " + line)
    else:
        print("OK - every message confirmed/received exactly once")
    if ctx.crashes:
        print("CRASHES: %d" % len(ctx.crashes))
        for line in ctx.crashes:
            print("  !!! " + line)
    if failed:
        print("CLEANUP: %d queue(s) could not be deleted" % len(failed))
    print("total time %.0f s" % (time.time() - started))

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": rounds, "sizes": sizes, "results": results,
                       "integrity": ctx.integrity, "crashes": ctx.crashes}, f, indent=1)
    if interrupted:
        return 130
    return 1 if (ctx.integrity or ctx.crashes or failed) else 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.exit(worker_main(sys.argv[1:]))
    if len(sys.argv) == 3 and sys.argv[1] == "--check-ext":
        sys.exit(check_ext_main(sys.argv[2]))
    sys.exit(main())
