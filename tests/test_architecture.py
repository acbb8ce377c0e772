"""The package's structure, checked by reading the source (ast): imports only go down the layers, there is no
import circle, only the puka modules (_puka.py, _puka_client.py) touch puka's internals, and no module is too long."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import flask_nucleon_amqp

PACKAGE = Path(flask_nucleon_amqp.__file__).resolve().parent

#: The package's modules, bottom layer first. A module may import modules of its own layer or of layers
#: below it, never above. A new module must be placed here (the test fails for a module not listed):
#: put it in the lowest layer whose modules it needs, or add a layer.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("exceptions",),
    ("config", "message", "runtime", "signals", "tracing", "_codec"),
    ("_puka", "_puka_client"),  # puka's fixes: module patches and publish frames; the fixed client
    ("_base", "protocol", "_connection_records", "_argument_checks", "_session_life", "_publishing",
     "_topology_methods", "_request_reply"),  # the contract, and the base connection with its parts
    ("connection", "_puka_session", "memory", "_memory_broker", "_memory_queue", "_memory_routing"),  # transports
    ("pool",),
    ("topology", "retry"),
    ("listener",),
    ("lifecycle", "_cli_group"),
    ("extension",),  # all the Flask wiring: init_app, before_request, the `flask amqp` group, app.extensions
    # The transactional outbox: publishes through the extension's pools. ``outbox`` is its face (Outbox, the
    # session hooks) and re-exports the rest; ``_outbox_relay`` names Outbox only for the type checker.
    ("outbox", "_outbox_relay", "_outbox_cli", "_outbox_metrics"),
    ("cli", "gunicorn", "testing", "metrics"),
    ("__init__",),  # the package's face: re-exports, and loads the CLI commands
)


def _layer_of() -> dict[str, int]:
    return {module: index for index, layer in enumerate(LAYERS) for module in layer}


def _modules() -> list[str]:
    return sorted(path.stem for path in PACKAGE.glob("*.py"))


def _imports(module: str, *, running: bool = False) -> set[str]:
    """Package modules ``module`` imports anywhere: at the top, in functions, under ``TYPE_CHECKING``.

    ``running``: only the imports that run (not those under ``if TYPE_CHECKING:``).
    """
    return _imports_in((PACKAGE / f"{module}.py").read_text(encoding="utf-8"), module, running=running)


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """The import nodes inside ``if TYPE_CHECKING:`` blocks."""
    inside: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for statement in node.body:
                inside.update(ast.walk(statement))
    return inside


def _imports_in(source: str, module: str, *, running: bool = False) -> set[str]:
    tree = ast.parse(source)
    modules = set(_modules())
    skipped = _type_checking_only(tree) if running else set()
    found: set[str] = set()
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE.name:
                    found.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").split(".")[0] != PACKAGE.name:
                continue  # another package
            if node.level > 1:
                raise AssertionError(f"{module}: relative import above the package: {ast.unparse(node)}")
            parts = (node.module or "").split(".")
            if node.level == 0:
                parts = parts[1:]
            if parts and parts[0]:
                found.add(parts[0])
            else:  # `from . import x`: x is a module, or a name of __init__
                found.update(alias.name if alias.name in modules else "__init__" for alias in node.names)
    found.discard(module)
    return found


def test_every_module_has_a_layer() -> None:
    layer_of = _layer_of()
    unplaced = [module for module in _modules() if module not in layer_of]
    assert not unplaced, f"place these modules in LAYERS of {Path(__file__).name}: {unplaced}"


def test_imports_only_go_down() -> None:
    layer_of = _layer_of()
    upward = [f"{module} ({LAYERS[layer_of[module]]}) imports {imported} ({LAYERS[layer_of[imported]]})"
              for module in _modules() if module in layer_of
              for imported in sorted(_imports(module))
              if imported in layer_of and layer_of[imported] > layer_of[module]]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_circle() -> None:
    """Among the imports that run; a ``TYPE_CHECKING`` back-reference (a session naming its connection's
    class) must still not go up a layer (the test above), but is no circle."""
    graph = {module: _imports(module, running=True) for module in _modules()}
    circles: list[list[str]] = []
    state: dict[str, str] = {}  # "visiting" or "done"
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "visiting"
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "visiting":
                circles.append([*path[path.index(imported):], imported])
            elif imported not in state:
                visit(imported)
        path.pop()
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(circle) for circle in circles)


def test_the_architecture_page_shows_the_layers_of_the_code() -> None:
    """docs/architecture.rst's import-layers table (layer number, modules) is LAYERS, for every module."""
    page = (PACKAGE.parent / "docs" / "architecture.rst").read_text(encoding="utf-8")
    table = page.split("Import layers\n", 1)[1].split("\n---", 1)[0]  # that section
    shown: dict[str, int] = {}
    for number, modules in re.findall(r"^   \* - (\d+)\n     - (.*)$", table, flags=re.MULTILINE):
        shown.update((module, int(number)) for module in re.findall(r"``([\w.]+)``", modules))
    assert shown, "no rows found in the import-layers table"
    layer_of = _layer_of()
    assert {module: layer_of.get(module) for module in shown} == shown, "table rows whose layer is not LAYERS'"
    missing = [module for module in _modules() if module not in shown and module != "__init__"]
    assert not missing, f"docs/architecture.rst's import-layers table lacks {missing}"


def test_the_import_parser_sees_every_form() -> None:
    """The checks above only mean something if the parser finds imports in every form the package uses."""
    source = ("from . import signals, AMQP\nimport flask_nucleon_amqp.pool\nfrom flask_nucleon_amqp import cli\n"
              "from .retry import RetryPolicy\nif TYPE_CHECKING:\n    from .extension import AMQPState\n"
              "def f():\n    from .listener import Listener\nimport json\nfrom flask import Flask\n")
    assert _imports_in(source, "probe") == {"signals", "__init__", "pool", "cli", "retry", "extension", "listener"}
    assert _imports_in(source, "probe", running=True) == {"signals", "__init__", "pool", "cli", "retry", "listener"}


# -- puka's internals stay in the puka modules ---------------------------------------------------------
#: The only modules that may touch puka's internals: its fixes (module patches, the fixed client) and accessors.
PUKA_MODULES = frozenset({"_puka", "_puka_client"})
#: Names that, in this package, hold puka objects: its client, promise and channel registries.
PUKA_HANDLES = frozenset({"client", "promises", "channels", "puka_promise", "promise", "channel"})


def _puka_names(tree: ast.Module) -> set[str]:
    """Names a module binds to puka's modules (and to our puka modules, whose ``_`` names are private too)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.asname or alias.name.split(".")[0] for alias in node.names
                         if alias.name.split(".")[0] == "puka")
        elif isinstance(node, ast.ImportFrom):
            if node.module and node.module.split(".")[0] == "puka":
                names.update(alias.asname or alias.name for alias in node.names)
            elif node.level and (node.module or "") == "":
                names.update(alias.asname or alias.name for alias in node.names if alias.name in PUKA_MODULES)
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
from . import _puka, _puka_client

def f(session, client, puka_promise):
    session.client.promises._promises.get(1)
    client._send_frames(1, [])
    client.channels.channels.get(2)
    puka_spec._private
    _puka._lenient_as_str(b"")
    puka_promise._x
    session._closed           # ours, not puka's
    client.send_frames(1, [])  # public accessor
    _puka_client._log_frame
"""
    assert private_puka_accesses(source) == [
        "line 6: session.client.promises._promises",
        "line 7: client._send_frames",
        "line 9: puka_spec._private",
        "line 10: _puka._lenient_as_str",
        "line 11: puka_promise._x",
        "line 14: _puka_client._log_frame",
    ]


def test_only_puka_modules_touch_puka_internals() -> None:
    offenders = {}
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem in PUKA_MODULES:
            continue
        found = private_puka_accesses(path.read_text(encoding="utf-8"))
        if found:
            offenders[path.name] = found
    assert offenders == {}, f"puka internals used outside {sorted(PUKA_MODULES)}: {offenders}"


# -- module size ----------------------------------------------------------------------------------------
#: The most lines a module of the package may have: past it, split the module by concept.
MAX_MODULE_LINES = 800


def test_no_module_is_too_long() -> None:
    counts = {path.name: len(path.read_text(encoding="utf-8").splitlines()) for path in sorted(PACKAGE.glob("*.py"))}
    too_long = [f"{name}: {count} lines" for name, count in counts.items() if count > MAX_MODULE_LINES]
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines (split them by concept): {too_long}"
