"""The cached CPU+GPU runtime on real bundles: exactness for every policy and budget, metrics, CLI, bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from moedge._errors import MoedgeError
from moedge.cli import main
from moedge.runtime import BundleRunner, Generator
from moedge.runtime.profiling import profile_bundle

PROMPTS = [[1, 17, 33, 50, 7], [3, 99, 140, 11, 12, 200, 5]]


@pytest.fixture(scope="module")
def profiled(bundles, tmp_path_factory):
    """tiny-mixtral's bundle, its routing statistics and a haq plan from the demo text."""
    bundle = bundles("mixtral")
    out = tmp_path_factory.mktemp("profile")
    profile_bundle(
        bundle,
        text="demo",
        tokens=400,
        output=out / "routing.json",
        plan=out / "plan.json",
        gpu_budget="30%",
        profile="jetson-agx-orin-64gb",
    )
    return bundle, out / "routing.json", out / "plan.json"


def _reference(bundle):
    runner = BundleRunner(bundle)
    return [runner.generate(p, max_new_tokens=8) for p in PROMPTS]


@pytest.mark.parametrize(
    "policy", ["haq", "lru", "lfu", "static", "n-cpu-moe", "fate", "moe-infinity", "cpu", "full-gpu"]
)
@pytest.mark.parametrize("budget", ["13%", "30%", "60%"])
def test_greedy_is_identical_for_every_policy_and_budget(profiled, policy, budget):
    bundle, routing, _ = profiled
    gen = Generator(bundle, backend="simulated", policy=policy, gpu_budget=budget, routing=routing)
    got = [r.token_ids for r in gen.generate(PROMPTS, max_new_tokens=8)]
    assert got == _reference(bundle)
    # every routed expert ran exactly once per step, on exactly its routed tokens
    assert gen.metrics.routed and gen.metrics.computed == gen.metrics.routed
    summary = gen.summary()
    gpu = summary["gpu"]
    assert gpu["modeled"] is True and gpu["peak_expert_bytes"] <= max(gpu["budget_bytes"], 0)
    assert summary["simulated_device_peak_bytes"] <= gpu["device_bytes"]["graphs"] + gpu["budget_bytes"]
    if policy == "full-gpu":
        assert gpu["hit_rate"] == 1.0
    if policy == "cpu":
        assert gpu["hit_rate"] == 0.0


def test_cache_off_and_plan_agree_with_the_reference(profiled):
    bundle, routing, plan = profiled
    ref = _reference(bundle)
    off = Generator(bundle, backend="simulated", cache=False)
    assert [r.token_ids for r in off.generate(PROMPTS, max_new_tokens=8)] == ref
    planned = Generator(
        bundle, backend="simulated", policy="haq", gpu_budget="30%", plan=plan, routing=routing
    )
    assert [r.token_ids for r in planned.generate(PROMPTS, max_new_tokens=8)] == ref
    assert (
        planned.summary()["gpu"]["prefetch_recall"] is None
        or planned.summary()["gpu"]["prefetch_recall"] >= 0
    )


def test_sampling_is_seeded_and_stops(profiled):
    bundle, routing, _ = profiled
    gen = Generator(bundle, backend="simulated", policy="lru", gpu_budget="30%", routing=routing)
    a = gen.generate(PROMPTS[0], max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=7)[0].token_ids
    b = gen.generate(PROMPTS[0], max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=7)[0].token_ids
    c = gen.generate(PROMPTS[0], max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=8)[0].token_ids
    assert a == b and a != c
    stop = _reference(bundle)[0][2]
    out = gen.generate(PROMPTS[0], max_new_tokens=8, stop=[stop])[0]
    assert out.token_ids[-1] == stop and out.stopped_by == "stop"


def test_profile_merges_workloads(profiled, tmp_path):
    bundle, routing, _ = profiled
    first = json.loads(routing.read_text())
    main(
        [
            "-q",
            "profile",
            str(bundle),
            "--text",
            "demo",
            "--tokens",
            "200",
            "-o",
            str(tmp_path / "r.json"),
            "--merge",
            str(routing),
        ]
    )
    merged = json.loads((tmp_path / "r.json").read_text())
    assert merged["tokens"] == first["tokens"] + 200
    assert merged["speculative_recall"] and 0 <= merged["speculative_recall"]["1"] <= 1


def test_bad_input_is_one_clear_error(profiled, tmp_path):
    bundle, routing, _ = profiled
    with pytest.raises(MoedgeError, match="smaller than the largest expert"):
        Generator(bundle, backend="simulated", policy="lru", gpu_budget="1KiB", routing=routing)
    gen = Generator(bundle, backend="simulated", policy="lru", gpu_budget="30%", routing=routing)
    with pytest.raises(MoedgeError, match="token id out of range"):
        gen.generate([1, 2, 10**6], max_new_tokens=2)
    with pytest.raises(MoedgeError, match="context is 512"):
        gen.generate(list(range(1, 200)) * 3, max_new_tokens=2)
    with pytest.raises(MoedgeError, match="not a moedge placement plan"):
        Generator(bundle, backend="simulated", plan=routing)
    manifest = json.loads((bundle / "manifest.json").read_text())
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "manifest.json").write_text(json.dumps(dict(manifest, schema_version=99)))
    assert main(["run", str(newer), "--ids", "1,2"]) == 1


@pytest.mark.parametrize("batch", [False, True])
def test_interrupt_returns_what_was_generated(profiled, batch):
    bundle, routing, _ = profiled
    gen = Generator(bundle, backend="simulated", policy="lru", gpu_budget="30%", routing=routing)

    def stop_after_three(_index: int, _token: int) -> None:
        if len(gen.metrics.token_latencies) >= 2:
            raise KeyboardInterrupt

    out = gen.generate(PROMPTS, max_new_tokens=20, on_token=stop_after_three, batch=batch)
    assert out[0].stopped_by == "interrupt" and len(out[0].token_ids) == 3
    if batch:  # the second row had not received its third token when Ctrl-C came
        assert len(out) == 2 and out[1].stopped_by == "interrupt" and len(out[1].token_ids) == 2
    else:  # prompts run one after another: the second never started
        assert len(out) == 1
    assert gen.summary()["interrupted"] is True


def test_a_batch_drops_finished_rows_and_matches_one_by_one(profiled):
    bundle, routing, _ = profiled
    prompts = [*PROMPTS, [9, 8, 7], list(range(20, 41))]
    ref = BundleRunner(bundle)
    want = [ref.generate(p, max_new_tokens=12) for p in prompts]
    stop = want[2][3]  # the third prompt stops early; the others go on without it
    gen = Generator(bundle, backend="simulated", policy="haq", gpu_budget="30%", routing=routing)
    out = gen.generate(prompts, max_new_tokens=12, stop=[stop])
    for got, full in zip(out, want, strict=True):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert got.token_ids == full[:cut]
        assert got.stopped_by == ("stop" if stop in full else "length")
    assert gen.metrics.routed == gen.metrics.computed
    assert gen.metrics.prompt_tokens == sum(len(p) for p in prompts)
    assert gen.metrics.decode_tokens == sum(len(g.token_ids) for g in out) - len(prompts)


def test_cli_run_prints_tokens_and_metrics(profiled, tmp_path):
    bundle, routing, plan = profiled
    metrics = tmp_path / "m.json"
    args = [
        "run",
        str(bundle),
        "-p",
        "hello",
        "--ids",
        "1,2,3",
        "-n",
        "6",
        "--backend",
        "simulated",
        "--gpu-budget",
        "30%",
        "--plan",
        str(plan),
        "--routing",
        str(routing),
        "--metrics-json",
        str(metrics),
    ]
    # its own process: `moedge run` gives every session of the process one shared ORT thread pool
    result = subprocess.run([sys.executable, "-m", "moedge", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "decode 10 tokens" in out and "hit rate" in out and "modeled on rtx4090-pcie4" in out
    doc = json.loads(metrics.read_text())
    assert len(doc["generations"]) == 2 and all(len(g["token_ids"]) == 6 for g in doc["generations"])
    assert {"p50", "p90", "p99", "std"} <= set(doc["token_latency_ms"])
    # --batch: both prompts in one forward pass per step, the same greedy tokens
    batched = tmp_path / "b.json"
    args[args.index(str(metrics))] = str(batched)
    result = subprocess.run(
        [sys.executable, "-m", "moedge", *args, "--batch"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "hello" in result.stdout and "1 2 3 |" in result.stdout
    again = json.loads(batched.read_text())
    assert [g["token_ids"] for g in again["generations"]] == [g["token_ids"] for g in doc["generations"]]
    assert again["decode_tokens"] == 10


def test_cli_ctrl_c_prints_the_metrics_so_far(bundles, tmp_path):
    bundle = bundles("mixtral")
    (tmp_path / "prompts.txt").write_text("hello there\n" * 2000)  # minutes of work: Ctrl-C comes first
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moedge",
            "run",
            str(bundle),
            "--prompt-file",
            str(tmp_path / "prompts.txt"),
            "-n",
            "400",
            "--backend",
            "simulated",
            "--policy",
            "lru",
            "--gpu-budget",
            "50%",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell that started the tests in the background ignores SIGINT, and children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    first = proc.stdout.read(5)  # the first prompt's echo: the runtime is up and generating
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    out = first + out
    assert proc.returncode == 130, err
    assert "interrupted: metrics cover the tokens generated so far" in out and "decode" in out


def test_run_and_generator_need_neither_torch_nor_transformers(profiled, python_without):
    bundle, routing, _ = profiled
    result = python_without(
        f"""
        from moedge.runtime import Generator
        gen = Generator({str(bundle)!r}, backend="simulated", policy="haq", gpu_budget="30%", routing={str(routing)!r})
        assert len(gen.generate([1, 2, 3], max_new_tokens=4)[0].token_ids) == 4
        from moedge.cli import main
        code = main(["run", {str(bundle)!r}, "--ids", "1,2,3", "-n", "3", "--backend", "simulated",
                     "--gpu-budget", "30%", "--routing", {str(routing)!r}])
        print("ok", code, "torch" in sys.modules, "transformers" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-4:] == ["ok", "0", "False", "False"]
    assert "hit rate" in result.stdout


def test_speculative_gate_uses_the_next_router(bundles):
    """The bundle's router weights reproduce the router logits; the gate ranks from them."""
    runner = BundleRunner(bundles("mixtral"))
    ids = np.asarray([[5, 9, 13, 17, 40, 41]])
    from moedge.runtime.bundle_runner import RoutingTrace

    trace = RoutingTrace()
    runner.forward(ids, trace=trace)
    moe = [layer.index for layer in runner.manifest.layers if layer.moe]
    assert set(trace.speculative) == set(moe[1:])
    assert trace.speculative[moe[1]].shape == (
        ids.size,
        min(4, runner.manifest.layers[moe[1]].moe.num_experts),
    )


def test_gpu_backends_that_cannot_start_name_what_is_missing(bundles):
    import onnxruntime as ort

    bundle = bundles("mixtral")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(MoedgeError, match="needs onnxruntime-gpu"):
            Generator(bundle, backend="ort-cuda")
    try:
        import tensorrt

        has_trt = hasattr(tensorrt, "Builder")
    except ImportError:
        has_trt = False
    if not has_trt:
        with pytest.raises(MoedgeError, match="needs TensorRT"):
            Generator(bundle, backend="tensorrt")
        assert main(["build", str(bundle)]) == 1
