"""docs/RESULTS.md and README.md's results table, generated from the committed benchmark JSON.

    .venv/bin/python benchmarks/results_doc.py           # rewrite docs/RESULTS.md and README's results table
    .venv/bin/python benchmarks/results_doc.py --check   # exit 1 with a unified diff when either differs

Each section of the document is a template, ``benchmarks/results_doc/<name>.md``, whose ``{placeholders}``
are filled by one render function in ``benchmarks/results_doc/sections.py`` (registered in its
``SECTIONS``, in document order). A render function reads its JSON through ``Results`` (a missing file or
key raises ``ResultsError`` naming both) and formats every figure with a fixed precision; ``Results.cite``
gives the line that names the JSON and the commit its provenance records. Figures no JSON holds are in
the template ``legacy.md``, each with the commit that introduced it. Nothing in the output depends on
the clock, the machine or the order of dictionary keys.

README.md is rewritten only between ``<!-- results:begin -->`` and ``<!-- results:end -->``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
TEMPLATES = Path(__file__).resolve().parent / "results_doc"
DOC = ROOT / "docs" / "RESULTS.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SCHEMA = "moedge.benchmark/1"  # provenance.SCHEMA (kept literal: this module imports no benchmark code)
# Files written before the provenance writer existed record no commit: the commit that last wrote each.
PRE_PROVENANCE_COMMITS = {
    "bundle_parity_smollm2-135m-moe.json": "fd14935",
    "bundle_speed.json": "85a9bf3",
    "calibration_smollm2-135m-moe.json": "509c3fb",
    "calibration_stories260k.json": "8b600ff",
    "cpp_runtime.json": "c3867aa",
    "quant_noise_floor_smollm2-135m-moe.json": "25258cd",
    "smollm2_wikitext2_ort.json": "e4ed92d",
    "smollm2_wikitext2_pytorch.json": "9f4fdb8",
    "testbed_report.json": "a2a2286",
    "runtime/haq_spread_study.json": "5435692",
    "runtime/runtime_policies.json": "ba87f1e",
    "runtime/runtime_speed.json": "583659f",
}


class ResultsError(RuntimeError):
    """A JSON file the document needs is missing, unreadable, or lacks a key."""


class Results:
    """The committed benchmark JSON under one folder, read once each, with the provenance of each file."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._docs: dict[str, dict[str, Any]] = {}

    def doc(self, rel: str) -> dict[str, Any]:
        """The whole document at ``rel`` (relative to the folder); a pre-provenance file comes wrapped as
        {"schema": None, "results": <its content>}."""
        if rel not in self._docs:
            path = self.folder / rel
            if not path.is_file():
                raise ResultsError(f"{self.shown(rel)}: missing (the results document needs it)")
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ResultsError(f"{self.shown(rel)}: unreadable: {exc}") from exc
            is_doc = isinstance(raw, dict) and raw.get("schema") == SCHEMA
            self._docs[rel] = raw if is_doc else {"schema": None, "results": raw}
        return self._docs[rel]

    def get(self, rel: str, *keys: str | int) -> Any:
        """``results[k0][k1]...`` of the file ``rel``; ``ResultsError`` names the file and the key path."""
        value: Any = self.doc(rel)["results"]
        for i, key in enumerate(keys):
            try:
                value = value[key]
            except (KeyError, IndexError, TypeError):
                path = ".".join(str(k) for k in keys[: i + 1])
                raise ResultsError(f"{self.shown(rel)}: no key results.{path}") from None
        return value

    def commit(self, rel: str) -> str:
        """The short commit that measured the file (its provenance), else the one that last wrote it."""
        doc = self.doc(rel)
        if doc["schema"] == SCHEMA:
            moedge = doc.get("environment", {}).get("moedge", {})
            sha = str(moedge.get("commit", "unknown"))[:7]
            return f"commit {sha}{', dirty tree' if moedge.get('dirty') else ''}"
        sha = PRE_PROVENANCE_COMMITS.get(rel, "unknown")
        return f"pre-provenance file, last written at commit {sha}"

    def cite(self, *rels: str) -> str:
        """The source line under a table or figure: every JSON path with its commit."""
        parts = [f"`{self.shown(rel)}` ({self.commit(rel)})" for rel in rels]
        return "Source: " + "; ".join(parts) + "."

    def shown(self, rel: str) -> str:
        """``rel`` as the document names it: benchmarks/results/<rel> for the committed folder."""
        return f"benchmarks/results/{rel}"


class _Strict(dict[str, str]):
    def __missing__(self, key: str) -> str:
        raise ResultsError(f"template placeholder {{{key}}} has no value")


def fill(template: str, values: Mapping[str, Any]) -> str:
    """Template text with each ``{name}`` replaced by ``values[name]`` (a missing one is an error)."""
    text = (TEMPLATES / f"{template}.md").read_text(encoding="utf-8")
    return text.format_map(_Strict({k: str(v) for k, v in values.items()}))


def _sections() -> ModuleType:
    """``benchmarks/results_doc/sections.py``: the render functions (loaded by path: the folder shares
    this module's name)."""
    name = "moedge_results_doc_sections"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TEMPLATES / "sections.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def render_doc(results_dir: Path = RESULTS_DIR) -> str:
    """docs/RESULTS.md as the committed JSON under ``results_dir`` gives it."""
    res = Results(results_dir)
    parts = [fill(name, render(res)) for name, render in _sections().SECTIONS]
    return "\n".join(part.rstrip("\n") + "\n" for part in parts)


def render_readme(readme_text: str, results_dir: Path = RESULTS_DIR) -> str:
    """README.md's text with the part between the results markers regenerated."""
    head, sep, rest = readme_text.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise ResultsError(f"README.md lacks the markers {BEGIN} ... {END}")
    return f"{head}{BEGIN}\n{_sections().readme_table(Results(results_dir))}{END}{tail}"


def _diff(path: Path, want: str) -> str:
    have = path.read_text(encoding="utf-8") if path.is_file() else ""
    if have == want:
        return ""
    name = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
    return "".join(
        difflib.unified_diff(
            have.splitlines(True), want.splitlines(True), f"{name} (committed)", f"{name} (generated)"
        )
    )


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check`` compare) docs/RESULTS.md and README.md's results table; the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check", action="store_true", help="compare instead of writing; exit 1 on a difference"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="folder of the benchmark JSON")
    parser.add_argument(
        "--out", type=Path, default=DOC, help="the results document (default docs/RESULTS.md)"
    )
    parser.add_argument(
        "--readme", type=Path, default=README, help="the README whose results table to render"
    )
    args = parser.parse_args(argv)
    try:
        outputs: list[tuple[Path, Callable[[], str]]] = [
            (args.out, lambda: render_doc(args.results_dir)),
            (args.readme, lambda: render_readme(args.readme.read_text(encoding="utf-8"), args.results_dir)),
        ]
        generated = [(path, make()) for path, make in outputs]
    except ResultsError as exc:
        print(f"results_doc: {exc}", file=sys.stderr)
        return 2
    if args.check:
        diffs = [d for path, text in generated if (d := _diff(path, text))]
        if diffs:
            sys.stdout.write("".join(diffs))
            print("results_doc: out of date; run `python benchmarks/results_doc.py`", file=sys.stderr)
            return 1
        return 0
    for path, text in generated:
        path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
