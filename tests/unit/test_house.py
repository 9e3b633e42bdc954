"""The shape of the code: packages layered without cycles, small functions and files.

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
# The packages, lowest layer first (docs/ARCHITECTURE.md, "Layout and import namespace"): a package
# imports only packages of its own layer or below, directly or through root modules (``moedge.paths``,
# ``moedge.ort_sessions``, ...), which are not ranked themselves.
LAYERS = (
    ("moedge.formats",),
    ("moedge.arch",),
    ("moedge.sources", "moedge.calibration", "moedge.export", "moedge.graph_passes"),
    ("moedge.runtime",),
    ("moedge.doctor",),
    ("moedge.cli",),
)
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


def _packages(files: dict[str, Path]) -> set[str]:
    return {m.rpartition(".")[0] for m in files if m.count(".") >= 2} | {
        m for m in files if m.count(".") == 1 and files[m].name == "__init__.py"
    }


def _graph() -> dict[str, set[str]]:
    files = _python_files()
    packages = _packages(files)
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


def _packages_reached(edges: dict[str, set[str]], package: str, ranked: set[str]) -> set[str]:
    """The ranked packages ``package`` imports, directly or through unranked (root) modules."""
    reached: set[str] = set()
    seen = {package}
    todo = [package]
    while todo:
        for target in edges.get(todo.pop(), ()):
            if target in seen:
                continue
            seen.add(target)
            if target in ranked:
                reached.add(target)
            else:
                todo.append(target)
    return reached


def test_packages_import_only_their_layer_or_below():
    edges = _graph()
    rank = {package: i for i, layer in enumerate(LAYERS) for package in layer}
    nodes = {node for node in _packages(_python_files()) if node.count(".") == 1}
    assert nodes == set(rank), f"rank every package in LAYERS: unranked {sorted(nodes - set(rank))}"
    upward = [
        f"{package} -> {target}"
        for package in sorted(rank)
        for target in sorted(_packages_reached(edges, package, set(rank)))
        if rank[target] > rank[package]
    ]
    assert not upward, "imports of a higher layer (through root modules too): " + "; ".join(upward)


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
