"""The data layer's import graph has no circle (issue 10 §3), checked by parsing the sources."""
import ast
from pathlib import Path

import txl.data

PKG = Path(txl.data.__file__).parent


def _imports(path: Path) -> set:
    """txl.data modules imported anywhere in a file (module level or lazily inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("txl.data"):
            if node.module == "txl.data":  # from txl.data import build -> the submodule
                out |= {f"txl.data.{a.name}" for a in node.names if (PKG / f"{a.name}.py").is_file()}
            else:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("txl.data.")}
    return out


def test_no_import_circle_in_txl_data():
    graph = {f"txl.data.{p.stem}": _imports(p) for p in PKG.glob("*.py") if p.stem != "__init__"}
    for deps in graph.values():
        deps.discard("txl.data")
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in graph.get(m, ()):
            assert state.get(d) != "open", f"import circle: {' -> '.join(stack + [m, d])}"
            if d not in state:
                visit(d, stack + [m])
        state[m] = "done"
    for m in graph:
        if m not in state:
            visit(m, [])
    assert graph["txl.data.errors"] == set()  # every module may import DataError


def test_no_data_module_imports_a_cli():
    for p in PKG.glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module not in ("txl.train", "txl.eval", "txl.generate", "txl.convert"), p
