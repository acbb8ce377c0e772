"""OpenTelemetry tracing of publishes and deliveries (``pip install flask-nucleon-amqp[otel]``).

Nothing to call: once the application configures a tracer provider
(``opentelemetry.trace.set_tracer_provider``, or ``opentelemetry-instrument``),

* every publish (sync, ``callback=``, :meth:`call`, ``flask amqp publish``) runs in a
  PRODUCER span ``publish {exchange}:{routing key}``, a child of the current span
  (the Flask request's, with ``opentelemetry-instrumentation-flask``). Its context
  goes into the message headers through the global propagator (W3C ``traceparent``
  by default) and the span ends when the broker confirms the message, with an
  error status and the exception when the publish failed;
* every delivery to a listener or a ``consume`` callback runs in a CONSUMER span
  ``process {exchange}:{routing key}:{queue}``, a child of the producer's span (a
  new trace when the message carries no trace context), that records the outcome
  (``nucleon.amqp.outcome``: acked, requeued, rejected, dead-lettered, retried or
  unsettled) and the exception of a callback that raised.

The attributes follow the OpenTelemetry messaging semantic conventions for
RabbitMQ. Without OpenTelemetry installed :data:`ON` is False and the hooks in
the connections are one false test; with it installed but no provider
configured, a publish costs one clock read more (the provider is looked for
again at most once a second, so one configured later is picked up).
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Callable
from typing import Any, TypeVar

try:
    from opentelemetry import context as _context
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
except ImportError:  # the extra is not installed: the hooks stay off
    ON = False
else:
    ON = True

__all__ = ["ON", "use_tracer_provider"]

#: The attribute that tells what became of a processed message.
OUTCOME = "nucleon.amqp.outcome"
#: The attribute a callback marks itself with when it makes its own process span (listeners).
SELF_TRACED = "x_nucleon_traced"

_T = TypeVar("_T")
_tracer: Any = None
_next_lookup = 0.0
_explicit = False
#: Messages being processed in a process span, by id(): settling one records its outcome.
processing: dict[int, _Processing] = {}


class _Processing:
    __slots__ = ("span", "outcome")

    def __init__(self, span: Any) -> None:
        self.span = span
        self.outcome: str | None = None


def use_tracer_provider(provider: Any) -> None:
    """Trace with ``provider`` instead of the global one (None: back to the global provider).

    For applications that keep a provider of their own, and for tests.
    """
    global _tracer, _explicit, _next_lookup
    if not ON:
        raise RuntimeError("tracing needs OpenTelemetry: pip install flask-nucleon-amqp[otel]")
    _explicit = provider is not None
    _tracer = _make_tracer(provider) if provider is not None else None
    _next_lookup = 0.0


def _make_tracer(provider: Any) -> Any:
    try:  # the installed distribution's version (the package's __init__ sits above this module)
        version: str | None = importlib.metadata.version("flask-nucleon-amqp")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return provider.get_tracer("flask_nucleon_amqp", version)


def tracer() -> Any:
    """The tracer to use, or None while no tracer provider is configured (checked at most once a second)."""
    global _tracer, _next_lookup
    if _tracer is not None:
        return _tracer
    now = time.monotonic()
    if now < _next_lookup:
        return None
    _next_lookup = now + 1.0
    provider = _trace.get_tracer_provider()
    if isinstance(provider, (_trace.ProxyTracerProvider, _trace.NoOpTracerProvider)):
        return None
    _tracer = _make_tracer(provider)  # a global provider, once set, is never replaced
    return _tracer


# -- publishing ------------------------------------------------------------------------------------
def _destination(exchange: str, routing_key: str) -> str:
    if exchange and routing_key:
        return f"{exchange}:{routing_key}"
    return exchange or routing_key or "amq.default"


def start_publish(conn: Any, exchange: str, routing_key: str, properties: dict[str, Any], body: bytes,
                  operation: str = "publish") -> Any:
    """Start the PRODUCER span of a publish and put its context in ``properties['headers']``; None when off.

    The headers dict is copied, never changed in place: it may be the caller's.
    """
    tracer_ = tracer()
    if tracer_ is None:
        return None
    destination = _destination(exchange, routing_key)
    attributes: dict[str, Any] = {
        "messaging.system": "rabbitmq",
        "messaging.operation.name": operation,
        "messaging.operation.type": "send",
        "messaging.destination.name": destination,
        "messaging.message.body.size": len(body),
    }
    if routing_key:
        attributes["messaging.rabbitmq.destination.routing_key"] = routing_key
    if properties.get("message_id") is not None:
        attributes["messaging.message.id"] = str(properties["message_id"])
    if properties.get("correlation_id") is not None:
        attributes["messaging.message.conversation_id"] = str(properties["correlation_id"])
    node = conn.settings.nodes[0]
    attributes["server.address"], attributes["server.port"] = node.host, node.port
    span = tracer_.start_span(f"{operation} {destination}", kind=_trace.SpanKind.PRODUCER, attributes=attributes)
    headers = dict(properties.get("headers") or {})
    _propagate.inject(headers, context=_trace.set_span_in_context(span))
    properties["headers"] = headers
    return span


def end_publish(span: Any, outcome: Any) -> None:
    """End a PRODUCER span with the publish's outcome: an exception, or anything else for success."""
    if isinstance(outcome, BaseException):
        _record_error(span, outcome)
    span.end()


def traced_publish(span: Any, publish: Callable[..., _T], *args: Any) -> _T:
    """Run a synchronous publish and end its span with how it went."""
    try:
        result = publish(*args)
    except BaseException as exc:
        end_publish(span, exc)
        raise
    span.end()
    return result


def publish_in_span(span: Any, publish: Callable[..., Any], message: Any, callback: Any, timeout: Any,
                    retry: int) -> Any:
    """Run a publish; its span ends with the outcome: when it returns, or when ``callback`` gets the result."""
    if callback is not None:
        user_callback = callback

        def callback(promise: int, result: Any) -> Any:
            end_publish(span, result)
            return user_callback(promise, result)

    try:
        result = publish(message, callback, timeout, retry)
    except BaseException as exc:
        end_publish(span, exc)
        raise
    if callback is None:
        span.end()
    return result


def _record_error(span: Any, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_attribute("error.type", f"{type(exc).__module__}.{type(exc).__qualname__}")
    span.set_status(_trace.Status(_trace.StatusCode.ERROR, str(exc) or type(exc).__name__))


# -- processing ------------------------------------------------------------------------------------
def _header_getter() -> Any:
    from opentelemetry.propagators.textmap import Getter

    class _Headers(Getter[dict[str, Any]]):
        """AMQP header values can arrive as bytes (another client's longstr): read them as text."""

        def get(self, carrier: dict[str, Any], key: str) -> list[str] | None:
            value = carrier.get(key)
            if value is None:
                return None
            if isinstance(value, (bytes, bytearray)):
                value = bytes(value).decode("utf-8", "replace")
            return [str(value)]

        def keys(self, carrier: dict[str, Any]) -> list[str]:
            return list(carrier)

    return _Headers()


_getter: Any = None


def start_process(queue: str, message: Any) -> Any:
    """Start the CONSUMER span of one delivery, current in this greenlet; None when off.

    Its parent is the context the message carries (a new trace without one), not
    whatever span happens to be current here.
    """
    global _getter
    tracer_ = tracer()
    if tracer_ is None:
        return None
    if _getter is None:
        _getter = _header_getter()
    parent = _propagate.extract(message.get("headers") or {}, context=_context.Context(), getter=_getter)
    exchange, routing_key = message.get("exchange") or "", message.get("routing_key") or ""
    parts = [part for part in (exchange, routing_key, queue if queue != routing_key else "") if part]
    destination = ":".join(parts) or "amq.default"
    attributes: dict[str, Any] = {
        "messaging.system": "rabbitmq",
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.destination.name": destination,
        "messaging.message.body.size": len(message.get("body") or b""),
    }
    if routing_key:
        attributes["messaging.rabbitmq.destination.routing_key"] = routing_key
    if message.get("delivery_tag") is not None:
        attributes["messaging.rabbitmq.message.delivery_tag"] = message["delivery_tag"]
    if message.get("message_id") is not None:
        attributes["messaging.message.id"] = str(message["message_id"])
    if message.get("correlation_id") is not None:
        attributes["messaging.message.conversation_id"] = str(message["correlation_id"])
    span = tracer_.start_span(f"process {destination}", context=parent, kind=_trace.SpanKind.CONSUMER,
                              attributes=attributes)
    processing[id(message)] = _Processing(span)
    token = _context.attach(_trace.set_span_in_context(span))
    return span, token, message


def end_process(started: Any, exc: BaseException | None = None) -> None:
    """End a CONSUMER span: the outcome, and the exception the callback raised, if any."""
    span, token, message = started
    _context.detach(token)
    state = processing.pop(id(message), None)
    if exc is not None:
        _record_error(span, exc)
    span.set_attribute(OUTCOME, state.outcome if state is not None and state.outcome else "unsettled")
    span.end()


def settled(message: Any, action: str, requeue: bool) -> None:
    """A message was acked / rejected / nacked: note it on its process span (the first outcome counts)."""
    state = processing.get(id(message))
    if state is not None and state.outcome is None:
        state.outcome = "acked" if action == "ack" else "requeued" if requeue else "rejected"


def outcome(message: Any, what: str) -> None:
    """Name the outcome of a message being processed, before it is settled (retried, dead-lettered)."""
    state = processing.get(id(message))
    if state is not None and state.outcome is None:
        state.outcome = what


def failed(exc: BaseException) -> None:
    """Record an exception on the current span (a callback's, handled by the listener)."""
    span = _trace.get_current_span()
    if span.is_recording():
        _record_error(span, exc)


def process(queue: str, message: Any, callback: Callable[..., Any], *args: Any) -> Any:
    """Run a ``consume`` callback in a process span (unless it makes its own, as listeners do)."""
    if getattr(callback, SELF_TRACED, False) or queue == "amq.rabbitmq.reply-to":
        return callback(*args)
    started = start_process(queue, message)
    if started is None:
        return callback(*args)
    try:
        result = callback(*args)
    except BaseException as exc:
        end_process(started, exc)
        raise
    end_process(started)
    return result
