"""One --gpu-budget grammar for both runtimes: every row of tests/data/budget_grammar.json through each.

Python: ``moedge.inputs.gpu_budget`` (the argparse type of ``moedge run``/``moedge profile``) checks the
text, ``moedge.runtime.scheduler.parse_budget`` turns it into bytes. C++: ``moedge-run BUNDLE --gpu-budget
TEXT --print-budget`` (release and ASan builds of ``make cpp``) prints the bytes for a bundle whose
experts hold ``total_expert_bytes``, or exits 2 with one usage line. The table says what each runtime
gives; where they differ (``python_*``/``cpp_*`` keys) its note says why.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from moedge._errors import MoedgeError
from moedge.inputs import gpu_budget
from moedge.runtime.costs import GraphCost, ModelCosts, parse_budget

ROOT = Path(__file__).resolve().parents[2]
TABLE = json.loads((ROOT / "tests" / "data" / "budget_grammar.json").read_text())
ROWS: list[dict[str, Any]] = TABLE["rows"]
TOTAL: int = TABLE["total_expert_bytes"]
CLASSES: dict[str, dict[str, str]] = TABLE["error_classes"]
BUILDS = {"release": ROOT / "build" / "cpp", "asan": ROOT / "build" / "cpp-asan"}
EXPERT_BYTES = (4_000_000_000, TOTAL - 4_000_000_000)  # two experts of one MoE layer
SHA = "0" * 64  # never checked: --print-budget reads the manifest without hashing


def _outcome(row: dict[str, Any], runtime: str) -> tuple[str, Any]:
    """("bytes", n) or ("error", class) for `runtime` ("python" or "cpp")."""
    found = [
        (kind, row[key]) for kind in ("bytes", "error") for key in (f"{runtime}_{kind}", kind) if key in row
    ]
    assert len(found) == 1, f"row {row['input']!r} needs exactly one {runtime} outcome, has {found}"
    return found[0]


def _costs() -> ModelCosts:
    experts = {(0, e): GraphCost(nbytes, 0) for e, nbytes in enumerate(EXPERT_BYTES)}
    none = GraphCost(0, 0)
    return ModelCosts(
        moe_layers=[0], num_experts=2, top_k=1, experts=experts, stages={0: none}, head=none,
        embedding=none, kv_bytes_per_token=0, int8=False, num_params=0,
    )  # fmt: skip


def _graph(file: str, nbytes: int) -> dict[str, Any]:
    return {"file": file, "inputs": [], "outputs": [], "bytes": nbytes}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle folder moedge-run's manifest checks accept (empty graph files, hashes unchecked)."""
    root = tmp_path_factory.mktemp("budget_bundle")
    experts = [_graph(f"expert_{e}.onnx", n) for e, n in enumerate(EXPERT_BYTES)]
    graphs = [_graph("embedding.onnx", 0), _graph("layer_0.onnx", 0), _graph("head.onnx", 0), *experts]
    for g in graphs:
        (root / g["file"]).write_bytes(b"")
    gating = {"scoring": "softmax", "top_k": 1, "normalize_top_k": False}
    moe = {"num_experts": 2, "experts": experts, "gating": gating}
    manifest = {
        "format": "moedge-bundle",
        "schema_version": 1,
        "model": {"num_kv_heads": 1, "head_dim": 2},
        "precision": "fp32",
        "files": {g["file"]: {"sha256": SHA, "bytes": 0} for g in graphs},
        "embedding": graphs[0],
        "layers": [{"index": 0, "stage": graphs[1], "moe": moe}],
        "head": graphs[2],
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _id(row: dict[str, Any]) -> str:
    return ascii(row["input"])


def test_table_is_consistent():
    inputs = [row["input"] for row in ROWS]
    assert len(set(inputs)) == len(inputs), "an input is listed twice"
    assert sum(EXPERT_BYTES) == TOTAL == _costs().expert_bytes()
    for row in ROWS:
        for runtime in ("python", "cpp"):
            kind, value = _outcome(row, runtime)
            if kind == "error":
                assert runtime in CLASSES[value], (row, runtime)
        differs = any(key.startswith(("python_", "cpp_")) for key in row)
        assert differs == ("note" in row) and (not differs or row["note"] in TABLE["notes"]), row
        if "bytes" in row:
            assert 0 <= row["bytes"] <= TABLE["max_bytes"], row


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_python_reads_the_table(row):
    kind, want = _outcome(row, "python")
    costs = _costs()
    if kind == "error":
        with pytest.raises(argparse.ArgumentTypeError) as info:
            gpu_budget(row["input"])
        assert CLASSES[want]["python"] in str(info.value)
        return
    text = gpu_budget(row["input"])  # what `moedge run` passes on
    if "free_device_bytes" in row:  # auto: only with a device that reports free memory
        with pytest.raises(MoedgeError, match="needs a device that reports free memory"):
            parse_budget(text, costs)
        assert parse_budget(text, costs, free_device_bytes=row["free_device_bytes"]) == want
    else:
        assert parse_budget(text, costs) == want


@pytest.mark.parametrize("build", sorted(BUILDS))
@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_moedge_run_reads_the_table(bundle, build, row):
    binary = BUILDS[build] / "moedge-run"
    if not binary.is_file():
        pytest.fail(f"{binary} is not built: run `make cpp` (make test does it first)")
    kind, want = _outcome(row, "cpp")
    env = {"PATH": "/usr/bin:/bin", "ASAN_OPTIONS": "detect_leaks=1"}
    args = [str(binary), str(bundle), "--gpu-budget", row["input"], "--print-budget"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, errors="replace")
    if kind == "bytes":
        assert (result.returncode, result.stdout, result.stderr) == (0, f"{want}\n", "")
    else:
        assert result.returncode == 2 and result.stdout == "", result
        line = result.stderr
        assert line.startswith("moedge-run: error: ") and line.count("\n") == 1, line
        assert CLASSES[want]["cpp"] in line
