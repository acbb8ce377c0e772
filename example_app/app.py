"""The room chat of the original Nucleon AMQP document, as a small Flask app.

* ``POST /messages`` ``{"from": "user1", "to": "user2", "text": "hi"}`` publishes
  to the room exchange (``unit_test_room``) with the recipient as routing key
  (``"to": "all"`` reaches every user), confirmed.
* A listener per user consumes ``chat.listener.<user>`` (a quorum queue bound
  to the room) and delivers each message into that user's inbox queue,
  ``chat.inbox.<user>``. A message it cannot read is dead-lettered to ``chat.dead``.
* ``GET /users/<user>/messages`` returns the messages received since the last
  call (it drains the inbox).
* ``POST /messages/logged`` (same body) saves the message in the chat log
  (SQLite, ``SQLALCHEMY_DATABASE_URI``) and publishes it through the
  transactional outbox, in the same transaction: published after the commit,
  never if it rolls back (see flask_nucleon_amqp.outbox).
* ``GET /healthz``: the broker answers and this process's listeners consume.
* ``GET /``: the chat room as a page (page.py): pick a user, send, and see the
  inbox live (``GET /users/<user>/events``, Server-Sent Events) and the health.
  ``GET /api`` lists the JSON endpoints.

Run it with ``make run``: ``flask amqp declare``, then gunicorn with two gevent
workers (see gunicorn.conf.py). ``flask --app app run`` works too: under a
threaded server the extension runs its connections and listeners in a hub
thread of its own (see the Servers page of the docs).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import sqlalchemy as sa
from flask import Flask, abort, current_app, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.schema import CreateIndex, CreateTable

from flask_nucleon_amqp import AMQP, Binding, Exchange, Message, PukaConnection, Queue
from flask_nucleon_amqp.outbox import Outbox

if __package__:  # example_app.app (flask --app example_app ..., from the repository root)
    from .page import page
else:  # app, from inside example_app/ (gunicorn wsgi:app, flask --app app ...)
    from page import page  # type: ignore[no-redef]

amqp = AMQP()
db = SQLAlchemy()
outbox = Outbox(db)  # its table, amqp_outbox, joins db.metadata: db.create_all() creates it

#: Every message posted to /messages/logged, kept in the database.
chat_log = db.Table(
    "chat_log",
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("sender", sa.String(64), nullable=False),
    sa.Column("recipient", sa.String(64), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("sent_at", sa.Float, nullable=False),
)


def listener_queue(user: str) -> str:
    return f"{current_app.config['CHAT_PREFIX']}.listener.{user}"


def inbox_queue(user: str) -> str:
    return f"{current_app.config['CHAT_PREFIX']}.inbox.{user}"


def chat_topology(app: Flask) -> list[Any]:
    """The room exchange, and per user: a listener queue bound to it and an inbox."""
    config = app.config
    room, prefix = config["CHAT_ROOM"], config["CHAT_PREFIX"]
    declarations: list[Any] = [Exchange(room, "direct")]
    for user in config["CHAT_USERS"]:
        queue = f"{prefix}.listener.{user}"
        declarations += [
            Queue(queue, quorum=True, dead_letter_exchange=config["CHAT_DEAD_LETTER_EXCHANGE"]),
            Binding(room, queue=queue, routing_key=user),
            Binding(room, queue=queue, routing_key="all"),
            Queue(f"{prefix}.inbox.{user}", max_length=100),  # the oldest are dropped past 100
        ]
    return declarations


@amqp.on_initialise
def start_listeners() -> None:
    """Nucleon's recommended pattern: spawn the listeners when the process starts."""
    for user in current_app.config["CHAT_USERS"]:
        current_app.amqp.register_and_spawn_amqp_listener(
            listener_queue(user), functools.partial(deliver, user), prefetch_count=20, on_error="dead-letter")


def deliver(user: str, connection: PukaConnection, promise: int, message: Message) -> None:
    """Move one room message into the user's inbox: publish (confirmed), then ack."""
    entry = message.json()  # a body that is not JSON raises: the message is dead-lettered
    entry.update(to=user, via=message.routing_key, delivered_by=os.getpid(), delivered_at=time.time())
    connection.publish("", inbox_queue(user), json=entry, persistent=True)
    connection.ack(message)  # as in Nucleon; returning without it would ack too


def create_tables() -> None:
    """``db.create_all()`` that gunicorn's workers can all run at once on a new database.

    ``create_all`` checks, then creates: two workers booting together both find a table missing,
    and the second CREATE fails ("table already exists"), so that worker fails to boot and
    gunicorn stops. ``CREATE ... IF NOT EXISTS`` cannot race. (A real app runs its migrations
    once, before the workers start.)
    """
    with db.engine.begin() as connection:
        for table in db.metadata.sorted_tables:
            connection.execute(CreateTable(table, if_not_exists=True))
            for index in table.indexes:
                connection.execute(CreateIndex(index, if_not_exists=True))


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Application factory: app.cfg, then $CHAT_SETTINGS if set, then ``config``."""
    app = Flask(__name__)
    app.config.from_pyfile("app.cfg")
    app.config.from_envvar("CHAT_SETTINGS", silent=True)
    app.config.update(config or {})
    db.init_app(app)
    amqp.init_app(app)
    outbox.init_app(app)
    app.amqp.topology.add(*chat_topology(app))  # type: ignore[attr-defined]
    with app.app_context():
        create_tables()  # the chat log and the outbox table (an Alembic migration in a real app)

    app.register_blueprint(page)  # GET / (the chat page) and GET /users/<user>/events (its live stream)

    @app.get("/api")
    def index() -> Any:
        return jsonify(room=app.config["CHAT_ROOM"], users=app.config["CHAT_USERS"], page="/",
                       post="/messages", inbox="/users/<user>/messages", events="/users/<user>/events",
                       health="/healthz")

    @app.post("/messages")
    def post_message() -> Any:
        data = request.get_json(silent=True) or {}
        users = current_app.config["CHAT_USERS"]
        sender, to, text = data.get("from"), data.get("to"), data.get("text")
        if sender not in users or (to not in users and to != "all") or not isinstance(text, str):
            return jsonify(error=f"need from (one of {users}), to (a user or 'all') and text"), 400
        current_app.amqp.publish(current_app.config["CHAT_ROOM"], to, json={
            "from": sender, "text": text, "sent_at": time.time()}, persistent=True)
        return jsonify(published=True, to=to), 202

    @app.post("/messages/logged")
    def post_logged_message() -> Any:
        data = request.get_json(silent=True) or {}
        users = current_app.config["CHAT_USERS"]
        sender, to, text = data.get("from"), data.get("to"), data.get("text")
        if sender not in users or (to not in users and to != "all") or not isinstance(text, str):
            return jsonify(error=f"need from (one of {users}), to (a user or 'all') and text"), 400
        sent_at = time.time()
        log_id = db.session.execute(chat_log.insert().values(
            sender=sender, recipient=to, text=text, sent_at=sent_at)).inserted_primary_key[0]
        outbox.publish(current_app.config["CHAT_ROOM"], to, json={
            "from": sender, "text": text, "sent_at": sent_at, "log_id": log_id}, persistent=True)
        db.session.commit()  # the row and the message, or neither; published right after this
        return jsonify(published=True, to=to, log_id=log_id), 202

    @app.get("/users/<user>/messages")
    def received(user: str) -> Any:
        if user not in current_app.config["CHAT_USERS"]:
            abort(404)
        messages = []
        while len(messages) < 100:
            message = current_app.amqp.get(inbox_queue(user))
            if message is None:
                break
            messages.append(message.json())
            message.ack()
        return jsonify(user=user, messages=messages)

    @app.get("/healthz")
    def healthz() -> Any:
        report = current_app.amqp.health()  # cheap: never waits on the broker
        report["pid"] = os.getpid()
        report["listener_stats"] = {listener.queue: listener.stats for listener in current_app.amqp.listeners}
        return jsonify(report), 200 if report["ok"] else 503

    return app
