"""docs/RESULTS.md and README.md's results table regenerate byte for byte from the committed JSON."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
RERUN = "run `python benchmarks/results_doc.py` and commit docs/RESULTS.md and README.md"


def _module() -> ModuleType:
    name = "moedge_results_doc"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "results_doc.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_results_document_matches_the_committed_json():
    rd = _module()
    assert rd.render_doc() == (ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8"), (
        f"docs/RESULTS.md differs from what the JSON gives: {RERUN}"
    )


def test_readme_results_table_matches_the_committed_json():
    rd = _module()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert rd.BEGIN in readme and rd.END in readme
    assert rd.render_readme(readme) == readme, f"README.md's results table differs: {RERUN}"


def test_check_mode_passes_on_the_committed_files():
    assert _module().main(["--check"]) == 0, RERUN


def _copy(tmp_path: Path) -> Path:
    out = tmp_path / "results"
    shutil.copytree(
        ROOT / "benchmarks" / "results", out, ignore=shutil.ignore_patterns("robustness", "*.png")
    )
    return out


def test_missing_json_fails_naming_the_file(tmp_path, capsys):
    results = _copy(tmp_path)
    (results / "bundle_speed.json").unlink()
    rd = _module()
    with pytest.raises(rd.ResultsError, match=r"benchmarks/results/bundle_speed\.json: missing"):
        rd.render_doc(results)
    status = rd.main(["--check", "--results-dir", str(results)])
    assert status == 2 and "bundle_speed.json: missing" in capsys.readouterr().err


def test_missing_key_fails_naming_the_file_and_key(tmp_path):
    results = _copy(tmp_path)
    path = results / "cpp_runtime.json"
    doc = json.loads(path.read_text())
    del doc["rows"]["w8a8"]
    path.write_text(json.dumps(doc))
    rd = _module()
    with pytest.raises(rd.ResultsError, match=r"cpp_runtime\.json: no key results\.rows\.w8a8"):
        rd.render_doc(results)


def test_check_mode_reports_a_changed_figure_as_a_diff(tmp_path, capsys):
    results = _copy(tmp_path)
    path = results / "runtime" / "runtime_speed.json"
    doc = json.loads(path.read_text())
    doc["variants"]["llama.cpp"]["decode_tokens_per_s"] = 200.0
    path.write_text(json.dumps(doc))
    assert _module().main(["--check", "--results-dir", str(results)]) == 1
    captured = capsys.readouterr()
    assert "+| smollm2-135m llama.cpp Q8_0 | 601 | 200.0 |" in captured.out
    assert "results_doc.py" in captured.err


def test_output_does_not_depend_on_the_robustness_results(tmp_path):
    results = _copy(tmp_path)
    assert not (results / "robustness").exists()
    assert _module().render_doc(results) == _module().render_doc()
