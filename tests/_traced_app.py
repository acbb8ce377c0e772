"""The example chat app with OpenTelemetry, for tests that run it in other processes.

``create_app()`` installs an SDK tracer provider whose spans go to ``$TRACE_FILE``
(JSON lines, appended: one line per span, from every process that writes there),
instruments Flask, then builds the example app. ``render(spans)`` draws the
span tree of one trace as text (the docs' "Tracing" page shows one).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flask import Flask
from opentelemetry import trace
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

EXAMPLE = Path(__file__).parent.parent / "example_app"


class FileExporter(SpanExporter):
    """Appends each finished span to a file as one JSON line."""

    def __init__(self, path: str, service: str) -> None:
        self.path, self.service = path, service

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self.path, "a", encoding="utf-8") as out:
            for span in spans:
                out.write(json.dumps({
                    "name": span.name, "kind": span.kind.name, "service": self.service, "pid": os.getpid(),
                    "trace_id": f"{span.context.trace_id:032x}", "span_id": f"{span.context.span_id:016x}",
                    "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
                    "start": span.start_time, "end": span.end_time, "status": span.status.status_code.name,
                    "attributes": dict(span.attributes or {}),
                }) + "\n")
        return SpanExportResult.SUCCESS


def create_app() -> Flask:
    service = os.environ.get("TRACE_SERVICE", "chat")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(FileExporter(os.environ["TRACE_FILE"], service)))
    trace.set_tracer_provider(provider)
    sys.path.insert(0, str(EXAMPLE))
    from app import create_app as create_chat_app  # type: ignore[import-not-found]  # example_app, on sys.path

    app: Flask = create_chat_app()
    FlaskInstrumentor().instrument_app(app)  # type: ignore[no-untyped-call]  # untyped library
    return app


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def render(spans: list[dict[str, Any]]) -> str:
    """One trace as an indented tree: offset from the root's start, duration, span, kind, process."""
    by_parent: dict[str | None, list[dict[str, Any]]] = {}
    ids = {span["span_id"] for span in spans}
    for span in sorted(spans, key=lambda s: s["start"]):
        by_parent.setdefault(span["parent_id"] if span["parent_id"] in ids else None, []).append(span)
    roots = by_parent.get(None, [])
    origin = min(span["start"] for span in spans)
    lines = [f"trace {spans[0]['trace_id']}", f"{'start':>9} {'duration':>9}  span"]

    def draw(span: dict[str, Any], prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└─ " if last else "├─ ")
        outcome = span["attributes"].get("nucleon.amqp.outcome")
        extra = f", {outcome}" if outcome else ""
        lines.append(f"{(span['start'] - origin) / 1e6:7.1f}ms {(span['end'] - span['start']) / 1e6:7.1f}ms  "
                     f"{prefix}{branch}{span['name']}  [{span['kind']}, {span['service']}{extra}]")
        children = by_parent.get(span["span_id"], [])
        for index, child in enumerate(children):
            draw(child, prefix + ("" if top else ("   " if last else "│  ")), index == len(children) - 1, False)

    for root in roots:
        draw(root, "", True, True)
    return "\n".join(lines)
