"""An app for the lifecycle tests that run in another process (gunicorn, ``python -m flask``).

Configured by environment variables, so each test uses its own queues:
LIFECYCLE_AMQP_URL, LIFECYCLE_QUEUE (consumed by a listener), LIFECYCLE_RESULTS
(where the app reports what happened, as JSON events with its pid), and
optionally LIFECYCLE_TOPOLOGY (JSON of AMQP_TOPOLOGY), LIFECYCLE_PREFETCH,
LIFECYCLE_SHUTDOWN_TIMEOUT, LIFECYCLE_FAIL (on_initialise raises with that text). A message with
header ``sleep`` makes its callback take that many seconds.
"""

from __future__ import annotations

import json
import os
from typing import Any

import gevent
from flask import Flask, current_app

from flask_nucleon_amqp import AMQP, Message, PukaConnection


def create_app() -> Flask:
    app = Flask(__name__)
    app.config["AMQP_URL"] = os.environ["LIFECYCLE_AMQP_URL"]
    app.config["AMQP_SHUTDOWN_TIMEOUT"] = float(os.environ.get("LIFECYCLE_SHUTDOWN_TIMEOUT", "10"))
    app.config["AMQP_TOPOLOGY"] = json.loads(os.environ.get("LIFECYCLE_TOPOLOGY", "{}"))
    results = os.environ["LIFECYCLE_RESULTS"]
    amqp = AMQP()

    def report(event: str, **fields: Any) -> None:
        current_app.amqp.publish("", results, json={"event": event, "pid": os.getpid(), **fields})  # type: ignore[attr-defined]  # Nucleon's name for the state

    @amqp.on_initialise
    def announce() -> None:
        report("initialised")
        if os.environ.get("LIFECYCLE_FAIL"):
            raise RuntimeError(os.environ["LIFECYCLE_FAIL"])

    @amqp.listener(os.environ["LIFECYCLE_QUEUE"], prefetch_count=int(os.environ.get("LIFECYCLE_PREFETCH", "2")))
    def handle(connection: PukaConnection, promise: int, message: Message) -> None:
        report("started", body=message.text)
        gevent.sleep(float(message.headers.get("sleep", 0)))
        report("done", body=message.text)

    amqp.init_app(app)

    @app.get("/pid")
    def pid() -> Any:
        return {"pid": os.getpid(), "consuming": [listener.consuming for listener in current_app.amqp.listeners]}  # type: ignore[attr-defined]  # Nucleon's name for the state

    return app
