"""An app with an outbox, for tests/test_outbox.py's subprocesses (``flask --app _outbox_app ...``).

Configured by the environment: OUTBOX_DATABASE (SQLAlchemy URL), OUTBOX_TABLE, OUTBOX_BROKER (AMQP URL),
OUTBOX_BATCH. ``python _outbox_app.py commit-and-die EXCHANGE N`` commits N messages in one transaction,
prints their row ids and kills itself with SIGKILL before the after-commit publisher can run.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from flask import Flask
from flask_sqlalchemy import SQLAlchemy

from flask_nucleon_amqp import AMQP
from flask_nucleon_amqp.outbox import Outbox

db = SQLAlchemy()
amqp = AMQP()
outbox = Outbox(db, table_name=os.environ["OUTBOX_TABLE"])


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=os.environ["OUTBOX_DATABASE"],
        AMQP_URL=os.environ["OUTBOX_BROKER"],
        AMQP_OUTBOX_RELAY_DELAY=0.0,
        AMQP_OUTBOX_RELAY_INTERVAL=0.1,
        AMQP_OUTBOX_BATCH=int(os.environ.get("OUTBOX_BATCH", "100")),
    )
    db.init_app(app)
    amqp.init_app(app)
    outbox.init_app(app)
    return app


app = create_app()


def commit_and_die(exchange: str, count: int) -> None:
    with app.app_context():
        ids = [outbox.publish(exchange, "k", f"m{i}".encode()) for i in range(count)]
        db.session.commit()  # the publisher greenlet is spawned, but this greenlet never yields to it
        print(json.dumps(ids), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    if sys.argv[1] == "commit-and-die":
        commit_and_die(sys.argv[2], int(sys.argv[3]))
