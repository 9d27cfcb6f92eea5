"""The import graph (no circle anywhere in txl; txl/model imports only torch + stdlib) and one home per pattern name.

Walks the source with ast (every import statement, function-level ones included), so a late
`from .x import y` inside a function counts as the edge it is."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from txl.model.attention import PATTERNS

ROOT = Path(__file__).resolve().parent.parent
TXL = ROOT / "txl"
MODEL = TXL / "model"


def _modname(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (a `from m import n` names m.n when that is a module)."""
    me = _modname(path)
    pkg = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _graph(root: Path) -> dict[str, set[str]]:
    """{module: txl modules it imports} for every module under root."""
    files = {_modname(p): p for p in root.rglob("*.py")}
    return {m: {i for i in _imports(p) if i in files and i != m} for m, p in files.items()}


def _cycle(graph: dict[str, set[str]]):
    """One import circle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_txl_model_has_no_import_circle():
    assert _cycle(_graph(MODEL)) is None, " -> ".join(_cycle(_graph(MODEL)))


def test_attention_registry_imports_nothing_of_txl():
    assert not {i for i in _imports(MODEL / "attention" / "registry.py") if i.split(".")[0] == "txl"}


@pytest.mark.parametrize("path", sorted(MODEL.rglob("*.py")), ids=lambda p: str(p.relative_to(MODEL)))
def test_txl_model_imports_only_torch_and_stdlib(path):
    allowed = set(sys.stdlib_module_names) | {"torch", "__future__"}
    bad = {i for i in _imports(path) if not i.startswith("txl.model") and i.split(".")[0] not in allowed}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def _string_homes(name: str) -> set[str]:
    """Modules under txl/ holding the string literal `name` (docstrings and prose do not count)."""
    homes = set()
    for p in TXL.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Constant) and node.value == name:
                homes.add(str(p.relative_to(ROOT)))
    return homes


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_each_pattern_name_lives_in_one_module(name):
    assert _string_homes(name) == {"txl/model/attention/patterns.py"}


def _package_graph() -> dict[str, set[str]]:
    """Like _graph(TXL), but `from pkg import submodule` is an edge to the submodule only: importing a
    submodule through its package does not need the package's __init__ to have finished."""
    files = {_modname(p): p for p in TXL.rglob("*.py")}
    out = {}
    for m, p in files.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(p.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = node.module
                if node.level:  # relative: from .x import y / from . import y
                    base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{mod}.{a.name}" for a in node.names]
                names = [s for s in subs if s in files]
                if len(names) < len(subs):  # names that are not submodules come from the module itself
                    names.append(mod)
            edges.update(n for n in names if n in files and n != m)
        out[m] = edges
    return out


def test_txl_has_no_import_circle():
    """The whole package (model, data, metrics, library modules, CLIs): no circle anywhere."""
    g = _package_graph()
    assert g["txl.train"] and g["txl.lit"], "the walker sees txl's imports"
    c = _cycle(g)
    assert c is None, " -> ".join(c)
