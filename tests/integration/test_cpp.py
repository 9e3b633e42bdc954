"""The C++ runtime (cpp/, built by `make cpp`): parity with the Python runtime, the expert cache, bad input.

`moedge-run` and the Python `BundleRunner` load the same libonnxruntime (1.32.0, from the SDK the build
fetched and from the onnxruntime wheel), route by the same rule and run the head on the last position
only, so tokens and logits agree exactly (ort-cpu target bundles: tests/integration/test_cpp_ort_cpu.py);
the tests assert identical bits, which implies the acceptance bars (same greedy ids; first-step logits
within 1e-4 FP32, same argmax QDQ). One parity run goes through the AddressSanitizer build.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from moedge.formats.manifest import read_manifest
from moedge.runtime import BundleRunner, greedy
from moedge.runtime.costs import ModelCosts, parse_budget
from moedge.runtime.policies import POLICIES
from moedge.runtime.profiles import BUILTIN
from moedge.runtime.scheduler import ExpertScheduler

ROOT = Path(__file__).resolve().parents[2]
RELEASE = ROOT / "build" / "cpp"
ASAN = ROOT / "build" / "cpp-asan"
PROMPTS = [[1, 17, 33, 50, 7], [3, 99, 140, 11, 12, 200, 5], [250, 4]]


def _binary(build: Path, name: str) -> Path:
    path = build / name
    if not path.is_file():
        pytest.fail(f"{path} is not built: run `make cpp` (make test does it first)")
    return path


def _run(
    args: list[str], build: Path = RELEASE, tool: str = "moedge-run"
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "ASAN_OPTIONS": "detect_leaks=1", "HOME": str(Path.home())}
    return subprocess.run(
        [str(_binary(build, tool)), *args], capture_output=True, text=True, timeout=600, env=env
    )


def _ids(prompts: list[list[int]]) -> list[str]:
    return [a for p in prompts for a in ("--ids", ",".join(map(str, p)))]


def _parity(
    bundle: Path,
    tmp_path: Path,
    build: Path = RELEASE,
    prompts: list[list[int]] = PROMPTS,
    new_tokens: int = 16,
) -> dict:
    """moedge-run's greedy ids and first-step logits for ``prompts``: the Python runtime's, bit for bit."""
    logits_file, json_file = tmp_path / "logits.bin", tmp_path / "run.json"
    args = [str(bundle), *_ids(prompts), "-n", str(new_tokens), "--threads", "1"]
    result = _run([*args, "--logits-out", str(logits_file), "--json", str(json_file)], build)
    assert result.returncode == 0, result.stderr
    doc = json.loads(json_file.read_text())
    runner = BundleRunner(bundle, intra_op_threads=1)
    eos = runner.manifest.model.get("eos_token_id")
    got_logits = np.fromfile(logits_file, dtype=np.float32).reshape(len(prompts), -1)
    for prompt, gen, cpp_logits in zip(prompts, doc["generations"], got_logits, strict=True):
        assert gen["token_ids"] == greedy(runner, prompt, max_new_tokens=new_tokens, eos_token_id=eos)
        # both run the head on the last position only (greedy() does too): the FP32 head's MatMul on one
        # row may differ in the last bits from the same row inside a longer MatMul
        want = runner.forward(np.asarray([prompt]), last_only=True)[0][0, -1]
        # the bars are 1e-4 (FP32) and the same argmax (QDQ); the bits are in fact the same: one ORT
        # library, one set of gating numerics
        np.testing.assert_array_equal(cpp_logits, want)
    return doc


@pytest.mark.parametrize("kind", ["mixtral", "llama"])
def test_fp32_bundle_matches_the_python_runtime(bundles, tmp_path, kind):
    doc = _parity(bundles(kind), tmp_path)
    assert doc["decode_tokens"] > 0 and doc["decode_tokens_per_s"] > 0
    assert doc["expert_runs"] == (doc["hits"] if kind == "mixtral" else 0)


def test_qdq_bundle_matches_the_python_runtime(qdq_bundle, tmp_path):
    assert read_manifest(qdq_bundle).precision == "w8a8"
    _parity(qdq_bundle, tmp_path)


def test_parity_under_address_sanitizer(bundles, qdq_bundle, tmp_path):
    for name, bundle in (("fp32", bundles("mixtral")), ("qdq", qdq_bundle)):
        (tmp_path / name).mkdir()
        _parity(bundle, tmp_path / name, ASAN)
    bad = _run([str(bundles("mixtral")), "--ids", "1,999999"], ASAN)
    assert bad.returncode == 1 and "out of range" in bad.stderr and "Sanitizer" not in bad.stderr


@pytest.mark.parametrize(
    ("budget", "policy", "evicts"),
    [("0", "pinned", False), ("0", "lru", False), ("30%", "lru", True), ("100%", "lru", False)],
)
def test_expert_cache_keeps_the_tokens_and_the_budget(bundles, tmp_path, budget, policy, evicts):
    bundle = bundles("mixtral")
    base = _run([str(bundle), *_ids(PROMPTS), "-n", "12", "--json", str(tmp_path / "a.json")])
    args = [str(bundle), *_ids(PROMPTS), "-n", "12", "--gpu-budget", budget, "--policy", policy]
    cached = _run([*args, "--json", str(tmp_path / "b.json")])
    assert base.returncode == 0 and cached.returncode == 0, cached.stderr
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert [g["token_ids"] for g in a["generations"]] == [g["token_ids"] for g in b["generations"]]
    expert_bytes = read_manifest(bundle).expert_bytes()
    limit = 0 if budget == "0" else int(float(budget[:-1]) / 100 * expert_bytes)
    assert b["peak_expert_bytes"] <= limit and b["hits"] + b["cpu_runs"] == b["expert_runs"]
    assert (b["evictions"] > 0) == evicts
    if policy == "lru":  # the Runner's per-layer slots from the manifest are the Python scheduler's
        costs = ModelCosts.from_manifest(read_manifest(bundle))
        sched = ExpertScheduler(costs, POLICIES["lru"], parse_budget(budget, costs), BUILTIN["rtx4090-pcie4"])
        assert b["per_layer_slots"] == sched.per_layer_slots
    if budget == "0":
        assert b["hits"] == 0
    if budget == "100%":  # every expert runs on the CPU once, then stays resident
        assert 0 < b["cpu_runs"] <= 8 and b["hits"] > b["cpu_runs"]


def test_plan_from_moedge_profile_pins_experts(bundles, tmp_path):
    from moedge.runtime.profiling import profile_bundle

    bundle = bundles("mixtral")
    plan = tmp_path / "plan.json"
    profile_bundle(
        bundle, text="demo", tokens=300, output=tmp_path / "routing.json", plan=plan, gpu_budget="40%",
        profile="jetson-agx-orin-64gb",
    )  # fmt: skip
    pinned = json.loads(plan.read_text())["experts"]
    result = _run(
        [str(bundle), *_ids(PROMPTS), "-n", "12", "--plan", str(plan), "--json", str(tmp_path / "p.json")]
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads((tmp_path / "p.json").read_text())
    runner = BundleRunner(bundle)
    eos = runner.manifest.model.get("eos_token_id")
    assert [g["token_ids"] for g in doc["generations"]] == [
        greedy(runner, p, max_new_tokens=12, eos_token_id=eos) for p in PROMPTS
    ]
    assert pinned and doc["hits"] > 0 and doc["evictions"] == 0  # --plan alone: policy pinned


def test_example_app_generates_what_the_runner_does(bundles):
    bundle = bundles("mixtral")
    result = _run([str(bundle), "1,17,33,50,7", "16"], tool="moedge-example")
    assert result.returncode == 0, result.stderr
    runner = BundleRunner(bundle)
    want = greedy(
        runner, PROMPTS[0], max_new_tokens=16, eos_token_id=runner.manifest.model.get("eos_token_id")
    )
    assert [int(t) for t in result.stdout.split()] == want


def test_runner_api_moves_and_shares_one_environment(bundles):
    # cpp/tests/api_test.cc: moves, one Ort::Env per process, option errors (both builds)
    for build in (RELEASE, ASAN):
        result = _run([str(bundles("mixtral"))], build, tool="moedge-api-test")
        assert (result.returncode, result.stdout) == (0, "ok\n"), result.stdout + result.stderr


def test_bad_input_is_one_clear_error_and_no_crash(bundles, tmp_path):
    src = bundles("mixtral")
    cases: dict[str, tuple[Path, list[str], str]] = {}
    missing = tmp_path / "missing"
    shutil.copytree(src, missing)
    expert = next((missing / "experts").glob("*.onnx"))
    expert.unlink()
    cases["missing file"] = (missing, ["--ids", "1,2"], "is missing experts/")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(src, corrupt)
    data = next((corrupt / "stages").glob("*.data"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    cases["hash mismatch"] = (corrupt, ["--ids", "1,2"], "does not match its sha256")
    newer = tmp_path / "newer"
    shutil.copytree(src, newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (newer / "manifest.json").write_text(json.dumps(manifest))
    cases["schema too new"] = (newer, ["--ids", "1,2"], "schema version 99")
    cases["token out of range"] = (src, ["--ids", "1,258"], "token id 258 is out of range")
    cases["not a bundle"] = (tmp_path, ["--ids", "1"], "is not a moedge bundle")
    cases["budget below an expert"] = (
        src,
        ["--ids", "1", "--gpu-budget", "10"],
        "smaller than the largest expert",
    )
    cases["missing library"] = (
        src,
        ["--ids", "1", "--ort-lib", str(tmp_path / "nope.so")],
        "cannot load ONNX Runtime",
    )
    cases["no such provider"] = (src, ["--ids", "1", "--provider", "cuda"], "has no CUDAExecutionProvider")
    for name, (bundle, args, message) in cases.items():
        result = _run([str(bundle), *args])
        assert result.returncode == 1, (name, result.stdout, result.stderr)
        assert message in result.stderr and result.stderr.count("\n") == 1, (name, result.stderr)
    usage = _run([str(src), "--ids", "1,x"])
    assert usage.returncode == 2 and "comma-separated integers" in usage.stderr
    for args in ([], ["--ids", "1,2,"], ["--ids", "1", "--gpu-budget", "nan"], ["--ids", "1", "-n", "16x"]):
        assert _run([str(src), *args]).returncode == 2, args
    # `static` is the Python runtime's popularity placement (Fiddler): moedge-run says so instead of
    # running something else under that name; its plan-only cache is `pinned`
    static = _run([str(src), "--ids", "1", "--policy", "static"])
    assert static.returncode == 2 and "popularity placement (Fiddler)" in static.stderr
    assert "--policy pinned" in static.stderr and static.stderr.count("\n") == 1
