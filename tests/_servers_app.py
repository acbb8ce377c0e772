"""An app for the runtime tests, served by `flask run`, gunicorn (gthread or gevent) or run as a script.

Configured by environment variables: SERVERS_AMQP_URL, SERVERS_QUEUE (consumed by a
listener), SERVERS_RESULTS (where the listener reports each message it handled, as
JSON), SERVERS_HEARTBEAT (seconds). ``POST /publish/<body>`` publishes ``body`` to
SERVERS_QUEUE twice over: synchronously, and asynchronously with a callback that
counts; ``GET /state`` reports stats, health, callbacks fired and thread names.

As a script, ``python _servers_app.py listen N`` handles N messages while its main
thread sleeps in time.sleep, then exits; ``python _servers_app.py publish THREADS N``
publishes N messages from each of THREADS OS threads (ThreadPoolExecutor).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flask import Flask, current_app

from flask_nucleon_amqp import AMQP, Message, PukaConnection

callbacks: dict[str, Any] = {"fired": 0, "errors": []}


def create_app() -> Flask:
    logging.basicConfig(level=logging.INFO)
    app = Flask(__name__)
    app.config["AMQP_URL"] = os.environ["SERVERS_AMQP_URL"]
    app.config["AMQP_POOLS"] = {"publish": {"size": 2, "heartbeat": float(os.environ.get("SERVERS_HEARTBEAT", "60")),
                                            "operation_timeout": 10},
                                "listen": {"heartbeat": float(os.environ.get("SERVERS_HEARTBEAT", "60"))}}
    amqp = AMQP()
    queue, results = os.environ["SERVERS_QUEUE"], os.environ["SERVERS_RESULTS"]

    @amqp.listener(queue, prefetch_count=20)
    def handle(connection: PukaConnection, promise: int, message: Message) -> None:
        # current_app works in a listener callback, whatever the runtime.
        current_app.amqp.publish("", results, json={"body": message.text, "app": current_app.name,  # type: ignore[attr-defined]  # Nucleon's name for the state
                                                     "thread": threading.current_thread().name})

    def sent(promise: int, result: Any) -> None:
        if isinstance(result, BaseException):
            callbacks["errors"].append(repr(result))
        else:
            callbacks["fired"] += 1

    @app.post("/publish/<body>")
    def publish(body: str) -> dict[str, Any]:
        current_app.amqp.publish("", queue, f"sync-{body}")  # type: ignore[attr-defined]  # Nucleon's name for the state
        current_app.amqp.get_amqp_pool().connection().publish("", queue, f"async-{body}", callback=sent)  # type: ignore[attr-defined]  # Nucleon's name for the state
        return {"ok": True, "thread": threading.current_thread().name}

    @app.get("/state")
    def state() -> dict[str, Any]:
        amqp_state = current_app.amqp  # type: ignore[attr-defined]  # Nucleon's name for the state
        return {"stats": amqp_state.stats(), "health": amqp_state.health(), "callbacks": callbacks,
                "handled": sum(listener.stats["handled"] for listener in amqp_state.listeners),
                "threads": sorted(thread.name for thread in threading.enumerate())}

    amqp.init_app(app)
    return app


def _listen(count: int) -> None:
    app = create_app()
    state = app.extensions["amqp"]
    state.initialise()  # as a worker would: topology, handlers, listeners
    print("ready", json.dumps(state.health()["runtime"]), flush=True)
    while sum(listener.stats["handled"] for listener in state.listeners) < count:
        time.sleep(0.05)  # the main thread never yields to gevent
    print("handled", count, flush=True)


def _publish(threads: int, count: int) -> None:
    app = create_app()
    state = app.extensions["amqp"]
    queue = os.environ["SERVERS_QUEUE"]

    def publish_many(thread: int) -> None:
        for i in range(count):
            state.publish("", queue, f"{thread}-{i}")

    with ThreadPoolExecutor(threads) as executor:
        list(executor.map(publish_many, range(threads)))
    print(json.dumps({"stats": state.stats()["publish"], "runtime": state.health()["runtime"]}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "listen":
        _listen(int(sys.argv[2]))
    else:
        _publish(int(sys.argv[2]), int(sys.argv[3]))
