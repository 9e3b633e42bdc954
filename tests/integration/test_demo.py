"""``moedge demo`` on a tiny MoE: every step for real (calibrate, export, split, ONNX Runtime, the expert
cache on a modeled Jetson, the C++ runner), the table and the JSON; a second run reuses the products."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from moedge.demo import CPP_RUNNER, DemoConfig, run_demo

TINY = dict(
    model="tiny-mixtral",
    calib_windows=2,
    calib_seqlen=32,
    eval_windows=2,
    eval_seqlen=32,
    new_tokens=8,
    gpu_budget="25%",
    threads=1,
)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """Two demo runs on tiny-mixtral in one folder, without a data folder: (first, second, folder)."""
    if not CPP_RUNNER.is_file():
        pytest.fail(f"{CPP_RUNNER} is not built: run `make cpp` (make test does it first)")
    mp = pytest.MonkeyPatch()
    mp.delenv("MOEDGE_DATA", raising=False)
    try:
        out = tmp_path_factory.mktemp("demo")
        config = DemoConfig(out_dir=out / "demo", cache_dir=out / "cache", **TINY)  # type: ignore[arg-type]
        first = run_demo(config)
        second = run_demo(config)
    finally:
        mp.undo()
    return first, second, out / "demo"


def test_demo_table_shows_fp32_beside_w8a8_and_the_cpp_tokens(demo_runs):
    first, _, _ = demo_runs
    fp, q = first.sides["fp32"], first.sides["w8a8"]
    for side in (fp, q):
        assert side.perplexity is not None and math.isfinite(side.perplexity) and side.perplexity > 1
        assert side.prompt_tokens_per_s and side.decode_tokens_per_s
        assert side.hit_rate is not None and 0.0 <= side.hit_rate <= 1.0
        assert len(side.tokens) == TINY["new_tokens"]
    assert q.bundle_bytes < fp.bundle_bytes and q.expert_bytes < fp.expert_bytes  # int8 experts
    # W8A8 stays near FP32 on the same windows (rtn, residual stream rotated)
    assert abs(q.perplexity - fp.perplexity) / fp.perplexity < 0.05
    assert first.cpp["tokens"] == q.tokens and first.tokens_match is True
    table = "\n".join(first.table())
    assert "FP32" in table and "W8A8" in table and "GPU hit rate (25%, haq)" in table
    assert f"C++ runner tokens == Python tokens (W8A8, {len(q.tokens)} tokens): yes" in table
    assert f"{fp.perplexity:.3f}" in table and f"{q.perplexity:.3f}" in table


def test_demo_writes_its_timings_and_cache_hits(demo_runs):
    first, second, folder = demo_runs
    doc = json.loads((folder / "demo.json").read_text())
    want = json.loads(json.dumps(second.to_json(), default=str))
    assert doc.pop("environment") and want.pop("environment")  # versions of what ran (read at each call)
    assert doc == want  # the second run's file
    assert set(doc["steps_seconds"]) >= {"perplexity fp32", "run w8a8", "moedge-run w8a8"}
    assert doc["tokens_match"] is True and doc["cpp"]["tokens"] == doc["sides"]["w8a8"]["tokens"]
    assert doc["config"]["calib_windows"] == 2 and doc["config"]["method"] == "rtn"
    # the first run made everything, the second reused the demo folder's products
    assert first.cache_hits == {
        "test bed": True,
        "fp32 bundle": False,
        "w8a8 recipe": False,
        "w8a8 bundle": False,
    }
    assert "calibrate w8a8" in first.steps and "export+split fp32" in first.steps
    assert all(second.cache_hits.values())
    assert not {"calibrate w8a8", "export+split fp32", "export+split w8a8"} & set(second.steps)
    assert second.sides["w8a8"].tokens == first.sides["w8a8"].tokens
    assert second.sides["fp32"].perplexity == first.sides["fp32"].perplexity


def test_the_recipe_stamp_names_its_settings(demo_runs):
    # a run with another budget or method finds a different stamp and recalibrates
    _, _, folder = demo_runs
    stamp = json.loads((folder / "recipe.stamp.json").read_text())
    assert stamp["calib_windows"] == 2 and stamp["method"] == "rtn" and stamp["rotate"] == "full"


def test_demo_command_prints_the_table(demo_runs, tmp_path):
    # the command on the fixture's demo folder and settings: every product is reused, every figure remade
    first, _, folder = demo_runs
    env = dict(os.environ)
    env.pop("MOEDGE_DATA", None)  # the shipped text path
    flags = [
        "-o",
        str(folder),
        "--cache-dir",
        str(folder.parent / "cache"),
        "--json",
        str(tmp_path / "d.json"),
    ]
    flags += ["--calib-windows", "2", "--calib-seqlen", "32", "--windows", "2", "--seqlen", "32"]
    flags += ["--new-tokens", "8", "--gpu-budget", "25%", "--threads", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "moedge", "-q", "demo", "--model", "tiny-mixtral", *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "== moedge demo ==" in result.stdout
    assert "calibrated on 2 windows of 32 tokens" in result.stdout
    assert "not a published figure" in result.stdout  # no data folder: the shipped demo text
    assert "cache hits  test bed, fp32 bundle, w8a8 recipe, w8a8 bundle" in result.stdout
    assert "C++ runner tokens == Python tokens (W8A8, 8 tokens): yes" in result.stdout
    doc = json.loads((tmp_path / "d.json").read_text())
    assert doc["sides"]["w8a8"]["tokens"] == first.sides["w8a8"].tokens
    assert all(line in result.stdout for line in doc["table"])
    assert not (folder / "w8a8-cpu-export").exists()  # exports are removed once split


def test_demo_refuses_a_bad_budget():
    from moedge._errors import MoedgeError

    with pytest.raises(MoedgeError, match="at least one calibration window"):
        run_demo(DemoConfig(model="tiny-mixtral", calib_windows=0))
