"""The chat room as a page: ``GET /`` in a browser, messages streamed live with Server-Sent Events.

``GET /users/<user>/events`` is the stream: the request's greenlet consumes the
user's inbox queue (``chat.inbox.<user>``) for as long as the page stays open,
and each message becomes one SSE event, acked once it has been written to the
browser. A page that closes cancels its consumer; what it had not shown yet
goes back to the queue, for the next page (or ``GET /users/<user>/messages``).
Under gunicorn's gevent workers every open page is one greenlet waiting on the
broker, no thread and no polling: the strength this extension is built for.
(Under a threaded server, ``flask run``, each page is one thread waiting.)
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from typing import Any

import gevent.queue
from flask import Blueprint, Response, abort, current_app, render_template, stream_with_context

from flask_nucleon_amqp import AMQPError, Message

page = Blueprint("page", __name__)


@page.get("/")
def chat() -> str:
    config = current_app.config
    return render_template("chat.html", room=config["CHAT_ROOM"], users=config["CHAT_USERS"])


@page.get("/users/<user>/events")
def events(user: str) -> Response:
    """The user's inbox as a text/event-stream: ``data: {"from", "to", "text", "sent_at", ...}`` per message."""
    if user not in current_app.config["CHAT_USERS"]:
        abort(404)
    inbox = f"{current_app.config['CHAT_PREFIX']}.inbox.{user}"
    keepalive = float(current_app.config.get("CHAT_STREAM_KEEPALIVE", 15.0))
    pool = current_app.amqp.get_amqp_pool(type="listen")
    connection = pool.connection()
    # Deliveries come from the connections' hub: this greenlet's own (gevent workers), or the extension's
    # hub thread under a threaded server, where a thread-safe queue hands them over.
    arrived: Any = gevent.queue.Queue() if pool.runtime.is_home() else queue.SimpleQueue()
    consumer = connection.consume(inbox, callback=lambda _promise, message: arrived.put(message), prefetch_count=20)

    def stream() -> Iterator[str]:
        shown: Message | None = None
        try:
            yield f"retry: 2000\nevent: ready\ndata: {json.dumps({'user': user})}\n\n"
            while True:
                try:
                    shown = arrived.get(timeout=keepalive)
                except queue.Empty:
                    yield ": keep-alive\n\n"  # also how a closed page is noticed: this write fails
                    continue
                yield f"data: {json.dumps(_entry(shown))}\n\n"
                shown.ack()  # written to the browser: the message has been shown
                shown = None
        finally:
            _give_back(connection, consumer, shown, arrived)

    return Response(stream_with_context(stream()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _entry(message: Message) -> Any:
    try:
        return message.json()
    except ValueError:
        return {"from": "?", "text": message.text}


def _give_back(connection: Any, consumer: int, shown: Message | None, arrived: Any) -> None:
    """The page went away: stop consuming; what it did not show goes back to the inbox."""
    try:
        connection.cancel(consumer)  # no more deliveries reach `arrived` after this
        unshown = [shown] if shown is not None else []
        while not arrived.empty():
            unshown.append(arrived.get_nowait())
        for message in unshown:
            message.reject(requeue=True)
    except AMQPError:
        pass  # the connection died meanwhile: the broker has requeued them already
