#!/usr/bin/env python3
"""HTTP benchmark: a Flask endpoint under gunicorn's gevent worker that publishes one confirmed message
per request, against the same endpoint without AMQP and one that opens a pika connection per request.

Run with ``make bench`` (after bench/bench.py) or ``python bench/http_bench.py``.

Three gunicorn servers (one gevent worker each, same app, same 100-byte body)
serve ``/plain`` (no AMQP), ``/publish`` (``current_app.amqp.publish``, which
returns once the broker confirmed) and ``/pika`` (``pika.BlockingConnection``
opened, confirm mode, publish, closed: per request). A load generator in
another process (gevent, raw sockets, keep-alive HTTP/1.1) keeps N requests in
flight against one server at a time; the endpoints take turns, round after
round, and the median is reported. Targets: /publish >= 0.7x /plain and
>= 10x /pika.

Every message must arrive exactly once: the broker's queue depth must equal
the number of successful publishing requests, and no request may fail. A lost
message, an HTTP error or a crash makes the exit status non-zero; a missed
target is reported as FAIL text only.
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
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BODY = b"x" * 100
ENDPOINTS = {"plain": "no AMQP", "publish": "flask_nucleon_amqp confirmed publish",
             "pika": "pika connection per request"}


# -- the app the servers run ----------------------------------------------------------------------------
def create_bench_app() -> Any:
    """gunicorn 'http_bench:create_bench_app()': the three endpoints, configured by environment."""
    import pika
    from flask import Flask, current_app

    from flask_nucleon_amqp import AMQP

    app = Flask("http_bench")
    app.config["AMQP_URL"] = os.environ["BENCH_AMQP_URL"]
    queue = os.environ["BENCH_QUEUE"]
    AMQP(app)
    pika_parameters = pika.URLParameters(os.environ["BENCH_AMQP_URL"])

    @app.get("/plain")
    def plain() -> str:
        return "ok"

    @app.get("/publish")
    def publish() -> str:
        current_app.amqp.publish("", queue, BODY)
        return "ok"

    @app.get("/pika")
    def pika_publish() -> str:
        connection = pika.BlockingConnection(pika_parameters)
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish("", queue, BODY)
        finally:
            connection.close()
        return "ok"

    return app


# -- the load generator (another process) -------------------------------------------------------------------
def load(port: int, path: str, connections: int, warmup: float, duration: float) -> dict[str, Any]:
    """Keep ``connections`` keep-alive requests in flight; count those completed in the measured window."""
    import gevent

    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    start = time.monotonic()
    window = (start + warmup, start + warmup + duration)
    counts = {"ok": 0, "errors": 0, "measured": 0}
    failures: list[str] = []

    def client() -> None:
        sock: socket.socket | None = None
        buffer = b""
        while time.monotonic() < window[1]:
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", port))
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    buffer = b""
                sock.sendall(request)
                while b"\r\n\r\n" not in buffer:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("server closed the connection")
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                status = int(lines[0].split()[1])
                headers = dict(line.lower().split(b":", 1) for line in lines[1:])
                length = int(headers.get(b"content-length", b"0"))
                while len(buffer) < length:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise ConnectionError("server closed the connection mid-body")
                    buffer += chunk
                body, buffer = buffer[:length], buffer[length:]
                if status == 200:
                    counts["ok"] += 1
                    if window[0] <= time.monotonic() <= window[1]:
                        counts["measured"] += 1
                else:
                    counts["errors"] += 1
                    failures.append(f"HTTP {status}: {body[:200]!r}")
                if headers.get(b"connection", b"").strip() == b"close":
                    sock.close()
                    sock = None
            except OSError as exc:
                counts["errors"] += 1
                failures.append(repr(exc))
                if sock is not None:
                    sock.close()
                sock = None
                gevent.sleep(0.01)
        if sock is not None:
            sock.close()

    gevent.joinall([gevent.spawn(client) for _ in range(connections)])
    return {**counts, "rps": counts["measured"] / duration, "failures": failures[:5]}


# -- the driver ---------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _control_socket(name: str) -> list[str]:
    """A control socket of its own per server (gunicorn >= 25 has one per user by default)."""
    from gunicorn.config import KNOWN_SETTINGS

    if not any(setting.name == "control_socket" for setting in KNOWN_SETTINGS):
        return []
    return ["--control-socket", os.path.join(tempfile.gettempdir(), f"http-bench-{os.getpid()}-{name}.ctl")]


def _wait_for(port: int, server: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"a gunicorn server exited at start (status {server.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"gunicorn did not listen on port {port} within {timeout:g}s")


def _queue_depth(url: str, queue: str, expected: int) -> int:
    """The broker's count, given a moment to settle."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        depth = -1
        for _ in range(50):
            depth = channel.queue_declare(queue, passive=True).method.message_count
            if depth == expected:
                break
            time.sleep(0.1)
        return depth
    finally:
        connection.close()


def _queue(url: str, queue: str, action: str) -> None:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        if action == "declare":
            channel.queue_declare(queue, arguments={"x-expires": 600_000})
        else:
            channel.queue_delete(queue)
    finally:
        connection.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"))
    parser.add_argument("--connections", type=int, default=50, help="requests in flight (keep-alive connections)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds per endpoint and round")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--load", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        print(json.dumps(load(args.port, args.path, args.connections, args.warmup, args.duration)))
        return 0

    queue = f"http-bench-{uuid.uuid4().hex[:10]}"
    env = {**os.environ, "BENCH_AMQP_URL": args.url, "BENCH_QUEUE": queue,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    _queue(args.url, queue, "declare")
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    results: dict[str, list[float]] = {name: [] for name in ENDPOINTS}
    published = 0
    status = 0
    try:
        for name in ENDPOINTS:
            port = _free_port()
            servers[name] = (subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1", "--worker-connections", "1000",
                 "--keep-alive", "60", "--log-level", "warning", "-b", f"127.0.0.1:{port}", "--chdir", str(HERE),
                 *_control_socket(name),
                 "http_bench:create_bench_app()"], env=env), port)
        for server, port in servers.values():
            _wait_for(port, server)
        names = list(ENDPOINTS)
        for round_number in range(args.rounds):
            for name in names[round_number % 3:] + names[:round_number % 3]:  # rotate who goes first
                _server, port = servers[name]
                out = subprocess.run([sys.executable, __file__, "--load", "--port", str(port), "--path", f"/{name}",
                                      "--connections", str(args.connections), "--warmup", str(args.warmup),
                                      "--duration", str(args.duration)], env=env, capture_output=True, text=True,
                                     timeout=args.warmup + args.duration + 60)
                if out.returncode != 0:
                    print(out.stderr, file=sys.stderr)
                    return 1
                report = json.loads(out.stdout)
                if report["errors"]:
                    print(f"FAIL: /{name}: {report['errors']} failed requests, e.g. {report['failures']}",
                          file=sys.stderr)
                    status = 1
                if name != "plain":
                    published += report["ok"]
                results[name].append(report["rps"])
                print(f"  round {round_number + 1}: /{name:<8} {report['rps']:8.0f} req/s", file=sys.stderr)
    finally:
        for server, _port in servers.values():
            server.send_signal(signal.SIGTERM)
        for server, _port in servers.values():
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    depth = _queue_depth(args.url, queue, published)
    _queue(args.url, queue, "delete")

    median = {name: statistics.median(values) for name, values in results.items()}
    print(f"HTTP benchmark: gunicorn with one gevent worker per endpoint, {args.connections} keep-alive requests "
          f"in flight from a gevent load generator in another process (loopback), {len(BODY)}-byte bodies; "
          f"median of {args.rounds} rounds of {args.duration:g} s")
    print(f"  {'endpoint':<50}{'req/s':>9}")
    for name, label in ENDPOINTS.items():
        print(f"  {'/' + name + ': ' + label:<50}{median[name]:>9.0f}")
    vs_plain = median["publish"] / median["plain"]
    vs_pika = median["publish"] / median["pika"] if median["pika"] else float("inf")
    print(f"  publish / no AMQP = {vs_plain:.2f}  (target >= 0.70)  {'PASS' if vs_plain >= 0.7 else 'FAIL'}")
    print(f"  publish / pika per request = {vs_pika:.1f}x  (target >= 10x)  {'PASS' if vs_pika >= 10 else 'FAIL'}")
    if depth != published:
        print(f"FAIL: {published} publishing requests succeeded but the queue holds {depth} messages", file=sys.stderr)
        status = 1
    else:
        print(f"  all {published} published messages are in the queue, each once")
    return status


if __name__ == "__main__":
    sys.exit(main())
