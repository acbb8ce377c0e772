"""Run in a subprocess by test_connection: a publishing burst, then its peak memory as JSON on stdout.

``greenlets``: 10,000 greenlets each publish 4 KiB synchronously on a pool of 4;
``async``: one greenlet publishes 10,000 distinct bodies of 16 KiB with callback=. Messages go
to the default exchange with a routing key no queue has (confirmed, dropped),
so the broker keeps nothing.
"""

from __future__ import annotations

import gevent.monkey

gevent.monkey.patch_all()

import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402

import gevent  # noqa: E402
from flask import Flask  # noqa: E402
from gevent.event import Event  # noqa: E402

from flask_nucleon_amqp import AMQP  # noqa: E402

MAX_BUFFER = 1024 * 1024


def _rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(mode: str, url: str) -> None:
    app = Flask(__name__)
    app.config.update(AMQP_URL=url, AMQP_POOLS={"publish": {"size": 4, "max_buffer": MAX_BUFFER}})
    AMQP(app)
    state_obj = app.extensions["amqp"]
    pool = state_obj.pools["publish"]
    routing_key = f"nobody-{uuid.uuid4().hex}"
    for _ in range(4):
        pool.connection().publish("", routing_key, b"warm-up")  # every connection open
    rss_before = _rss_kib()
    if mode == "greenlets":
        body = b"g" * 4096
        failures: list[BaseException] = []

        def one() -> None:
            try:
                pool.connection().publish("", routing_key, body)
            except Exception as exc:  # noqa: BLE001
                failures.append(exc)

        gevent.joinall([gevent.spawn(one) for _ in range(10_000)], timeout=300)
        count, failed = 10_000, len(failures)
    else:
        conn = pool.connection()
        done = Event()
        outcomes: list[object] = []

        def settled(_promise: int, result: object) -> None:
            outcomes.append(result)
            if len(outcomes) == 10_000:
                done.set()

        for i in range(10_000):  # a body of its own each time, as an application's would be
            conn.publish("", routing_key, b"%016d" % i * 1024, callback=settled)
        done.wait(300)
        count, failed = len(outcomes), sum(1 for result in outcomes if result != {})
    stats = pool.stats()
    print(json.dumps({"rss_before_kib": rss_before, "rss_peak_kib": _rss_kib(), "buffer_peak": stats["buffer_peak"],
                      "connections": len(pool.connections()), "settled": count, "failed": failed,
                      "max_buffer": MAX_BUFFER}))
    state_obj.close(timeout=10)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
