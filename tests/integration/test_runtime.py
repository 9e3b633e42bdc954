"""The cached CPU+GPU runtime on real bundles: exactness for every policy and budget, metrics, CLI, bad input."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from moedge._errors import MoedgeError
from moedge.cli import main
from moedge.runtime import BundleRunner, Generator, greedy
from moedge.runtime.backends.ort_cpu import OrtCpuBackend
from moedge.runtime.bundle_runner import RoutingTrace
from moedge.runtime.moe_layer import ReferenceExecutor
from moedge.runtime.profiling import profile_bundle

PROMPTS = [[1, 17, 33, 50, 7], [3, 99, 140, 11, 12, 200, 5]]
MOE_KINDS = ("mixtral", "qwen2-moe", "olmoe")


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
    return [greedy(runner, p, max_new_tokens=8) for p in PROMPTS]


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
    # the simulated device counts the bytes of every graph activated on it (stages from the start, experts
    # from admission to eviction) on its own: its peak is the stages plus the cache's true expert peak
    assert gpu["modeled"] is True
    assert summary["simulated_device_peak_bytes"] == gpu["device_bytes"]["graphs"] + gpu["peak_expert_bytes"]
    assert gpu["peak_expert_bytes"] <= gpu["budget_bytes"]
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


def _routers_from_npy(bundle) -> dict[int, np.ndarray]:
    """MoE layer index -> router weight (experts x hidden), read from the bundle's .npy files by numpy alone."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {
        layer["index"]: np.load(bundle / layer["moe"]["router"], allow_pickle=False)
        for layer in manifest["layers"]
        if layer.get("moe")
    }


def _recording_runner(bundle) -> tuple[BundleRunner, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """A reference runner whose executor records each MoE layer's input and chosen experts of every
    forward call (filled as it runs)."""
    seen: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    class Recording(ReferenceExecutor):
        def run(self, layer, x, routing, candidates):
            seen[layer.index] = (x.copy(), routing.chosen.copy())
            return super().run(layer, x, routing, candidates)

    cpu = OrtCpuBackend()
    return BundleRunner(bundle, cpu=cpu, executor=Recording(cpu)), seen


def test_prefetch_recall_is_the_next_routers_hit_rate_computed_by_hand(profiled):
    """haq prefetches the next MoE layer's top-2 experts by its router on this layer's input; the recall it
    reports is the share of the next layer's chosen experts among them, over decode steps."""
    bundle, routing, _ = profiled
    # no plan: the profiled plan's tuning turns prefetch off on this tiny model (its recall is None)
    gen = Generator(bundle, backend="simulated", policy="haq", gpu_budget="30%", routing=routing)
    assert gen.scheduler is not None and gen.scheduler.policy.prefetch == 2
    out = gen.generate(PROMPTS, max_new_tokens=8, batch=False)  # one row: its top-2 are the candidates
    routers = _routers_from_npy(bundle)
    moe = sorted(routers)
    ref, seen = _recording_runner(bundle)  # its forward never calls speculate (no trace, no prefetch)
    hits = total = 0
    for g in out:
        _, past = ref.forward(np.asarray([g.prompt_ids]))
        for token in g.token_ids[:-1]:  # the decode steps the generator ran
            _, past = ref.forward(np.asarray([[token]]), past=past)
            for layer, nxt in itertools.pairwise(moe):
                scores = seen[layer][0].astype(np.float64) @ routers[nxt].astype(np.float64).T
                candidates = set(np.argsort(-scores[0], kind="stable")[:2].tolist())
                chosen = set(seen[nxt][1].ravel().tolist())
                hits += len(candidates & chosen)
                total += len(chosen)
    assert total == 2 * 7 * 2  # 2 prompts x 7 decode steps x top-2 of the second MoE layer
    assert gen.summary()["gpu"]["prefetch_recall"] == hits / total


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
    want = [greedy(ref, p, max_new_tokens=12) for p in prompts]
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


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_speculative_gate_ranks_by_the_next_router_computed_by_hand(kind, bundles, tiny_models):
    """speculate: the next MoE layer's router (its .npy, read by numpy) on this layer's MoE input, best first."""
    import torch

    bundle = bundles(kind)
    routers = _routers_from_npy(bundle)
    moe = sorted(routers)
    runner, seen = _recording_runner(bundle)
    ids = np.random.default_rng(8).integers(0, 256, (2, 6))
    trace = RoutingTrace()
    runner.forward(ids, trace=trace)
    assert sorted(trace.speculative) == moe[1:]
    # the split kept PyTorch's routers, and the MoE input the runtime handed the gate is PyTorch's
    model = tiny_models(kind).model
    torch_inputs: dict[int, np.ndarray] = {}
    handles = [
        model.model.layers[i].mlp.register_forward_pre_hook(
            lambda _m, args, i=i: torch_inputs.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]).numpy())
        )
        for i in moe
    ]
    try:
        with torch.no_grad():
            model(input_ids=torch.from_numpy(ids), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for layer, nxt in itertools.pairwise(moe):
        np.testing.assert_array_equal(routers[nxt], model.model.layers[nxt].mlp.gate.weight.detach().numpy())
        x = seen[layer][0]
        # FP32 ORT stage against PyTorch: measured max |diff| 1.2e-6 (values up to 3.5, all three
        # architectures, x86, 2 cores); 1e-5 is an 8x margin
        assert np.abs(x - torch_inputs[layer]).max() < 1e-5
        scores = x.astype(np.float64) @ routers[nxt].astype(np.float64).T
        k = min(4, routers[nxt].shape[0])
        order = np.argsort(-scores, axis=-1, kind="stable")
        ranked = np.take_along_axis(scores, order[:, : k + 1], axis=-1)
        # the ranking is unambiguous at float32 precision: adjacent gaps (2.5e-3 at least, measured) > 1e-4
        assert np.diff(-ranked[:, : min(k + 1, scores.shape[1])], axis=-1).min() > 1e-4
        np.testing.assert_array_equal(trace.speculative[nxt], order[:, :k])
        # the test can tell the next router from this layer's own: on this input they rank differently
        own = np.argsort(
            -(x.astype(np.float64) @ routers[layer].astype(np.float64).T), axis=-1, kind="stable"
        )
        assert not np.array_equal(own[:, :k], order[:, :k])


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_generator_logits_match_pytorch(kind, bundles, tiny_models):
    """The cached runtime (experts split between the modeled GPU and the CPU, on-demand transfers, the
    speculative gate on) against PyTorch, which shares none of its routing, row gathering or combining:
    the prompt step and two cached decode steps."""
    import torch

    ids = np.random.default_rng(11).integers(0, 256, (2, 9))
    gen = Generator(bundles(kind), backend="simulated", policy="fate", gpu_budget="30%")
    got, past = gen.forward(ids)
    steps = [got[:, -1]]
    tokens = [got[:, -1].argmax(-1)]
    for _ in range(2):
        logits, past = gen.forward(tokens[-1][:, None], past)
        steps.append(logits[:, -1])
        tokens.append(logits[:, -1].argmax(-1))
    assert gen.scheduler is not None
    assert gen.scheduler.stats.gpu_runs > 0 and gen.scheduler.stats.cpu_runs > 0  # both sides ran
    full = np.concatenate([ids, np.stack(tokens[:-1], axis=1)], axis=1)
    with torch.no_grad():
        want = tiny_models(kind).model(input_ids=torch.from_numpy(full), use_cache=False).logits.numpy()
    # FP32 ONNX Runtime against FP32 PyTorch: measured max |diff| 1.2e-6 on logits up to 2.4 (all three
    # architectures, prompt and decode steps, x86, 2 cores); 1e-5 is an 8x margin
    assert np.abs(got - want[:, : ids.shape[1]]).max() < 1e-5
    assert np.abs(np.stack(steps, axis=1) - want[:, ids.shape[1] - 1 :]).max() < 1e-5


def test_gpu_backends_that_cannot_start_name_what_is_missing(bundles, monkeypatch, capsys):
    """Whatever this machine has: ONNX Runtime without CUDA, TensorRT absent or only its type stubs."""
    import types

    import onnxruntime as ort

    bundle = bundles("mixtral")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(MoedgeError, match="needs onnxruntime-gpu"):
        Generator(bundle, backend="ort-cuda")
    stubs_only = types.ModuleType("tensorrt")  # what tensorrt-stubs installs: a module without Builder
    for tensorrt in (None, stubs_only):  # None in sys.modules: `import tensorrt` raises ImportError
        monkeypatch.setitem(sys.modules, "tensorrt", tensorrt)
        with pytest.raises(MoedgeError, match="needs TensorRT"):
            Generator(bundle, backend="tensorrt")
        capsys.readouterr()
        assert main(["build", str(bundle)]) == 1
        assert "TensorRT" in capsys.readouterr().err
