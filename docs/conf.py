"""Sphinx configuration: ``make docs`` (sphinx-build -W -b html docs docs/_build/html)."""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
# Document this checkout, not whichever copy happens to be installed.
sys.path[:0] = [str(DOCS.parent), str(DOCS / "_ext")]

import flask_nucleon_amqp  # noqa: E402

project = "flask_nucleon_amqp"
author = "the flask_nucleon_amqp authors"
copyright = "2026, the flask_nucleon_amqp authors"
version = release = flask_nucleon_amqp.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "amqp_config",  # docs/_ext/amqp_config.py: the configuration tables
]

root_doc = "index"
exclude_patterns = ["_build"]
# Offline: no intersphinx, nothing fetched at build time.
html_theme = "alabaster"
html_theme_options = {"description": "Pooled AMQP for Flask + gevent", "fixed_sidebar": True}
html_static_path: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_class_signature = "separated"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Every sample is included from a tested file; highlight them as Python unless said otherwise.
highlight_language = "python"
