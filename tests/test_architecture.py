"""The package's structure: rules that keep the layers apart, checked by reading the source (ast)."""

from __future__ import annotations

import ast
from pathlib import Path

import flask_nucleon_amqp

PACKAGE = Path(flask_nucleon_amqp.__file__).parent
#: The one module that may touch puka's internals (its fixes and accessors live there).
PUKA_MODULE = "_puka.py"
#: Names that, in this package, hold puka objects: its client, promise and channel registries.
PUKA_HANDLES = frozenset({"client", "promises", "channels", "puka_promise", "promise", "channel"})


def _puka_names(tree: ast.Module) -> set[str]:
    """Names a module binds to puka's modules (and to our _puka module, whose ``_`` names are private too)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.asname or alias.name.split(".")[0] for alias in node.names
                         if alias.name.split(".")[0] == "puka")
        elif isinstance(node, ast.ImportFrom):
            if node.module and node.module.split(".")[0] == "puka":
                names.update(alias.asname or alias.name for alias in node.names)
            elif node.level and (node.module or "") == "":
                names.update(alias.asname or alias.name for alias in node.names if alias.name == "_puka")
    return names


def _chain(node: ast.expr) -> list[str]:
    """The names along an attribute chain: ``session.client.promises`` -> [session, client, promises]."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return parts[::-1]


def private_puka_accesses(source: str) -> list[str]:
    """Every ``x._name`` in ``source`` where ``x`` is a puka module, client, promise or channel."""
    tree = ast.parse(source)
    modules = _puka_names(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
            continue
        chain = _chain(node.value)
        if chain and (chain[0] in modules or PUKA_HANDLES.intersection(chain)):
            found.append((node.lineno, f"line {node.lineno}: {'.'.join(chain)}.{node.attr}"))
    return [text for _, text in sorted(found)]


def test_the_check_finds_what_connection_py_used_to_do() -> None:
    source = """
from puka import spec as puka_spec
from . import _puka

def f(session, client, puka_promise):
    session.client.promises._promises.get(1)
    client._send_frames(1, [])
    client.channels.channels.get(2)
    puka_spec._private
    _puka._lenient_as_str(b"")
    puka_promise._x
    session._closed           # ours, not puka's
    client.send_frames(1, [])  # public accessor
"""
    assert private_puka_accesses(source) == [
        "line 6: session.client.promises._promises",
        "line 7: client._send_frames",
        "line 9: puka_spec._private",
        "line 10: _puka._lenient_as_str",
        "line 11: puka_promise._x",
    ]


def test_only_puka_module_touches_puka_internals() -> None:
    offenders = {}
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == PUKA_MODULE:
            continue
        found = private_puka_accesses(path.read_text(encoding="utf-8"))
        if found:
            offenders[path.name] = found
    assert offenders == {}, f"puka internals used outside {PUKA_MODULE}: {offenders}"
