"""The shape of the source tree: no import cycles between modules, no module too long
to read, the architectures in one registry, the command line on top of the library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import speedec

ROOT = Path(speedec.__file__).parent

# Longest a module may be (lines of its .py file).
MAX_LINES = 450
# Modules allowed to be longer, each with the reason.
LONG_MODULES: dict[str, str] = {}  # module -> why it may be longer (none today)


def module_files() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is its __init__.py)."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(name: str, path: Path, modules) -> set[str]:
    """The modules ``name`` imports when it is imported: its top-level ``import`` and
    ``from ... import`` statements (also inside top-level ``if`` / ``try`` blocks, but not
    under ``if TYPE_CHECKING:`` nor inside functions or classes), relative ones resolved.
    ``from package import a, b`` counts ``package.a`` where that is a module (of
    ``modules``), and the package itself where some name is not (an attribute of its
    ``__init__``, which must then have run)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0]  # up one package per extra dot
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module
                submodules = {f"{base}.{alias.name}" for alias in node.names} & set(modules)
                found.update(submodules)
                if len(submodules) < len(node.names):
                    found.add(base)
            elif isinstance(node, ast.If):
                if not _is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, ast.With):
                visit(node.body)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found


def all_imports(name: str, path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` statement of ``name`` names, wherever
    the statement is (module level, functions, classes, ``if TYPE_CHECKING:``), relative ones
    resolved: ``from package import a`` names ``package`` and ``package.a``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """speedec module -> the speedec modules it imports at module level."""
    modules = module_files()
    return {name: {m for m in module_level_imports(name, path, modules) if m in modules and m != name}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) through every strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    found = []
    for group in groups:
        start = min(group)
        # Shortest way back to start within the group (breadth first).
        paths = {start: [start]}
        queue = [start]
        while queue:
            v = queue.pop(0)
            for w in sorted(graph[v] & group):
                if w == start:
                    found.append(paths[v] + [start])
                    queue = []
                    break
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
    return found


def test_cycle_finder_names_the_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("from typing import TYPE_CHECKING\nfrom ..model.layer import LoopedLayer\nfrom . import base\n"
                    "if TYPE_CHECKING:\n    from ..hf import export_hf\n"
                    "def f():\n    from ..storage import save_pretrained\n")
    found = module_level_imports("speedec.architectures.x", path, module_files())
    assert found - {"typing"} == {"speedec.model.layer", "speedec.architectures.base"}  # (`from . import base`)
    assert not any(m.startswith(("speedec.hf", "speedec.storage")) for m in found)


def test_all_imports_include_functions(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("import os\nfrom .. import cli\n"
                    "def f():\n    import click\n    from ..cli.common import load_model\n"
                    "class C:\n    from . import base\n")
    found = all_imports("speedec.training.x", path)
    assert {"os", "click", "speedec.cli", "speedec.cli.common", "speedec.training.base"} <= found


def _is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_only_the_cli_imports_the_cli_and_click():
    """Every click command lives in speedec.cli, and the library under it never imports it
    (nor click), at module level or in a function."""
    offenders = sorted(f"{name} imports {target}" for name, path in module_files().items()
                       if not _is_within(name, "speedec.cli")
                       for target in all_imports(name, path)
                       if _is_within(target, "speedec.cli") or _is_within(target, "click"))
    assert not offenders, offenders


def test_no_module_level_import_cycles():
    """No chain of module-level imports leads from a speedec module back to itself
    (imports inside functions and under ``if TYPE_CHECKING:`` do not count)."""
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in found)


def test_model_and_architectures_import_submodules():
    """The model and architectures packages import each other's (and their own)
    submodules, never the package ``__init__``s, which are for users outside."""
    graph = import_graph()
    offenders = sorted(f"{name} imports {target}" for name, targets in graph.items()
                       if name.startswith(("speedec.model.", "speedec.architectures."))
                       for target in targets & {"speedec.model", "speedec.architectures"})
    assert not offenders, offenders


def test_no_module_is_too_long():
    lengths = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in module_files().items()}
    offenders = sorted(f"{name} ({n} lines)" for name, n in lengths.items()
                       if n > MAX_LINES and name not in LONG_MODULES)
    assert not offenders, f"modules over {MAX_LINES} lines: {', '.join(offenders)}"


def test_architectures_are_registered_once():
    """Every architecture file is in the registry, the config accepts exactly the registered
    names, and the checkpoints speedec imports are the registry's imported architectures."""
    from speedec.architectures import ARCHITECTURES, IMPORTED
    from speedec.storage import IMPORTED as STORAGE_IMPORTED

    files = {p.stem for p in (ROOT / "architectures").glob("*.py")} - {"__init__", "base"}
    assert set(ARCHITECTURES) == files
    assert set(STORAGE_IMPORTED) == set(IMPORTED) == {a.model_type for a in ARCHITECTURES.values() if a.imported}
    assert all(STORAGE_IMPORTED[t].reader is IMPORTED[t] for t in IMPORTED)
    from speedec import ConfigError, ModelConfig

    base = dict(vocab_size=16, d_model=16, n_heads=2, n_kv_heads=2, ffn_dim=8, n_unique_layers=1, n_loops=2)
    for name in ARCHITECTURES:
        assert ModelConfig(**base, architecture=name).architecture == name
    with pytest.raises(ConfigError, match="architecture must be one of llama, ouro, nanbeige, huginn, got 'gpt2'"):
        ModelConfig(**base, architecture="gpt2")
