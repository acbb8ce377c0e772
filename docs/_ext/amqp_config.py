"""Sphinx extension: the configuration reference, generated from ``flask_nucleon_amqp.config``.

``.. amqp-config:: app`` renders ``APP_KEYS`` and ``EXTRA_APP_KEYS`` (key, default,
meaning); ``.. amqp-config:: pool`` renders ``POOL_KEYS`` (key, meaning). The
tables are read from the module at build time, so the docs cannot drift from
what ``init_app`` accepts.

An application key's meaning is its ``#:`` comment in ``config.py`` (the
comment lines right above the key in the dict literal). Keys of ``APP_KEYS``
have none yet, so :data:`FALLBACK` describes them until they do; a key with
neither is a build warning (an error under ``-W``).
"""

from __future__ import annotations

import ast
import inspect
import pprint
import re
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

log = logging.getLogger(__name__)

#: Meanings of application keys that have no ``#:`` comment in config.py (a comment there wins).
FALLBACK = {
    "AMQP_URL": "The broker of every pool, unless a pool names its own ``url``. ``amqp://`` or ``amqps://`` "
                "(TLS); the vhost is URL-encoded (``%2F`` is ``/``).",
    "AMQP_POOLS": "Pool name to that pool's settings (the pool keys below). ``publish`` and ``listen`` always "
                  "exist; get any pool with ``current_app.amqp.get_amqp_pool(type=name)``.",
    "AMQP_SHUTDOWN_TIMEOUT": "Seconds ``close()`` waits for pending confirms and running callbacks.",
}

_SINGLE_BACKTICKS = re.compile(r"(?<![`:])`([^`]+)`(?!`)")


def key_comments(module: Any, variable: str) -> dict[str, str]:
    """The ``#:`` comment lines right above each string key of the dict literal assigned to ``variable``."""
    source = inspect.getsource(module)
    lines = source.splitlines()
    comments: dict[str, str] = {}
    for node in ast.walk(ast.parse(source)):
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
        if not (isinstance(target, ast.Name) and target.id == variable and isinstance(node.value, ast.Dict)):
            continue
        for key in node.value.keys:
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                continue
            found: list[str] = []
            index = key.lineno - 2  # the line above the key (lineno is 1-based)
            while index >= 0 and lines[index].strip().startswith("#:"):
                found.insert(0, lines[index].strip()[2:].strip())
                index -= 1
            if found:
                comments[key.value] = " ".join(found)
    return comments


def _rst(text: str) -> str:
    """Comments use Markdown-style `code`; reST wants ``code``."""
    return _SINGLE_BACKTICKS.sub(r"``\1``", text)


def _literal(value: Any) -> str:
    return "``" + pprint.pformat(value, width=200, sort_dicts=False) + "``"


class AMQPConfigDirective(SphinxDirective):
    """``.. amqp-config:: app`` or ``.. amqp-config:: pool``."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        from flask_nucleon_amqp import config

        self.env.note_dependency(inspect.getsourcefile(config) or "")
        which = self.arguments[0]
        if which == "app":
            rows = self._app_rows(config)
            header, widths = ["key", "default", "meaning"], "25 25 50"
        elif which == "pool":
            rows = [[f"``{key}``", _rst(doc)] for key, (_parser, doc) in config.POOL_KEYS.items()]
            header, widths = ["pool key", "meaning"], "20 80"
        else:
            raise self.error(f"amqp-config takes 'app' or 'pool', not {which!r}")
        text = [".. list-table::", "   :header-rows: 1", f"   :widths: {widths}", ""]
        for row in [header, *rows]:
            text.append(f"   * - {row[0]}")
            text.extend(f"     - {cell}" for cell in row[1:])
        container = nodes.container()
        self.state.nested_parse(StringList(text, source="flask_nucleon_amqp/config.py"), self.content_offset,
                                container)
        return container.children

    def _app_rows(self, config: Any) -> list[list[str]]:
        rows = []
        for variable in ("APP_KEYS", "EXTRA_APP_KEYS"):
            comments = key_comments(config, variable)
            for key, default in getattr(config, variable).items():
                doc = comments.get(key) or FALLBACK.get(key)
                if doc is None:
                    log.warning("config key %s has no #: comment in flask_nucleon_amqp/config.py", key,
                                location=self.get_location())
                    doc = ""
                rows.append([f"``{key}``", _literal(default), _rst(doc)])
        return rows


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("amqp-config", AMQPConfigDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
