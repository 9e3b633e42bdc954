"""The shape of the code: no import cycles between packages, small functions and files.

Imports are read from the source (module-level and function-level alike), so a lazy import inside a
function counts: it still means one package needs the other. Nodes are the subpackages
(``moedge.calibration``, ``moedge.export``, ...) and each module at the root of ``moedge`` (the root
``__init__`` re-exports the public API lazily and is left out).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# folder -> import name (pyproject.toml's package-dir)
PACKAGES = {
    "moedge": "moedge",
    "calibration": "moedge.calibration",
    "export": "moedge.export",
    "graph_passes": "moedge.graph_passes",
    "runtime": "moedge.runtime",
}
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 500


def _python_files() -> dict[str, Path]:
    """Import name -> file, for every module of the five folders."""
    out: dict[str, Path] = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([name, *parts])] = path
    return out


def _node(module: str, packages: set[str]) -> str:
    """The node a module belongs to: its subpackage of moedge, or itself for a root module."""
    head = ".".join(module.split(".")[:2])
    return head if head in packages else module


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - node.level + 1]
                base = ".".join([*up, base]) if base else ".".join(up)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m == "moedge" or m.startswith("moedge.")}


def _graph() -> dict[str, set[str]]:
    files = _python_files()
    packages = {m.rpartition(".")[0] for m in files if m.count(".") >= 2} | {
        m for m in files if m.count(".") == 1 and files[m].name == "__init__.py"
    }
    edges: dict[str, set[str]] = {}
    for module, path in files.items():
        if module == "moedge":  # the root __init__: lazy re-exports of the public API
            continue
        src = _node(module, packages)
        for target in _imports(path, module):
            if target not in files or target == "moedge":
                continue
            dst = _node(target, packages)
            if dst != src:
                edges.setdefault(src, set()).add(dst)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_packages():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles between packages (function-level imports count): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def _is_literal_table(node: ast.stmt) -> bool:
    value = getattr(node, "value", None)
    return isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(
        value, ast.Dict | ast.List | ast.Tuple | ast.Set | ast.Constant
    )


def test_functions_and_files_are_small():
    long_functions, long_files = [], []
    for path in _python_files().values():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append(
                        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)"
                    )
        tables = sum((n.end_lineno or n.lineno) - n.lineno + 1 for n in tree.body if _is_literal_table(n))
        total = len(path.read_text().splitlines()) - tables
        if total > MAX_FILE_LINES:
            long_files.append(f"{path.relative_to(ROOT)} ({total} lines besides literal tables)")
    for path in sorted((ROOT / "cpp" / "src").glob("*")):
        total = len(path.read_text().splitlines())
        if total > MAX_FILE_LINES:
            long_files.append(f"{path.relative_to(ROOT)} ({total} lines)")
    assert not long_functions and not long_files, "\n".join(
        [
            f"functions over {MAX_FUNCTION_LINES} lines:",
            *long_functions,
            f"files over {MAX_FILE_LINES} lines:",
            *long_files,
        ]
    )
