"""Sphinx extension: the configuration reference, generated from ``flask_nucleon_amqp.config``.

``.. amqp-config:: app`` renders ``APP_SETTINGS`` and ``.. amqp-config:: pool``
renders ``POOL_SETTINGS`` (key, default, meaning); ``outbox`` renders ``OUTBOX_SETTINGS``. The tables are read from the
module at build time, so the docs cannot drift from what ``init_app`` accepts.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

_SINGLE_BACKTICKS = re.compile(r"(?<![`:])`([^`]+)`(?!`)")


def _rst(text: str) -> str:
    """Comments use Markdown-style `code`; reST wants ``code``."""
    return _SINGLE_BACKTICKS.sub(r"``\1``", text)


def _default(setting: Any) -> str:
    return _rst(setting.shown_default) if setting.shown_default is not None else f"``{setting.default_text}``"


class AMQPConfigDirective(SphinxDirective):
    """``.. amqp-config:: app`` or ``.. amqp-config:: pool``."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        from flask_nucleon_amqp import config

        self.env.note_dependency(inspect.getsourcefile(config) or "")
        which = self.arguments[0]
        tables = {"app": (config.APP_SETTINGS, "key"), "pool": (config.POOL_SETTINGS, "pool key"),
                  "outbox": (config.OUTBOX_SETTINGS, "key")}
        if which not in tables:
            raise self.error(f"amqp-config takes 'app', 'pool' or 'outbox', not {which!r}")
        table, first = tables[which]
        rows = [[f"``{key}``", _default(setting), _rst(setting.doc)] for key, setting in table.items()]
        header, widths = [first, "default", "meaning"], "22 28 50"
        text = [".. list-table::", "   :header-rows: 1", f"   :widths: {widths}", ""]
        for row in [header, *rows]:
            text.append(f"   * - {row[0]}")
            text.extend(f"     - {cell}" for cell in row[1:])
        container = nodes.container()
        self.state.nested_parse(StringList(text, source="flask_nucleon_amqp/config.py"), self.content_offset,
                                container)
        return container.children


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("amqp-config", AMQPConfigDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
