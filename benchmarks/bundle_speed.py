"""W8A8 QDQ vs FP32 on ORT CPU: expert speed, whole-bundle tokens/s, bytes, and split time.

All variants of a comparison are timed in the same run, interleaved, and reported as medians and
ratios (the machine is shared and noisy).

1. A Mixtral-shaped expert scaled to hidden 2048 / intermediate 7168 (random weights, RTN int8), QDQ vs
   FP32 at 1 and 64 tokens (bar: >= 2.5x at both).
2. smollm2-135m-moe experts (hidden 576 / intermediate 1536) from the FP32 and W8A8 bundles at 1 and 64
   tokens (bar: >= 2x at 64 tokens), the per-call overhead of an ORT session run (an Identity graph on
   the same input), whole-bundle prompt and decode tokens/s, and what spinning ORT thread pools cost a
   process holding hundreds of sessions.
3. Bytes: QDQ expert and stage graphs vs their FP32 twins (bar: <= 0.3x), whole bundles, embedding and
   head.
4. Split time of the 240-expert bundle (bar: < 60 s) and of tiny Mixtrals with 4..64 experts per layer
   (time per expert graph stays flat: linear in the number of experts).

Needs the two smollm2-135m-moe bundles that benchmarks/bundle_parity.py builds. Writes
benchmarks/results/bundle_speed.json.

    MOEDGE_DATA=../shared/data .venv/bin/python benchmarks/bundle_speed.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from provenance import carry_over, command_line, read_result, run_stamp, write_result

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path.home() / ".cache" / "moedge" / "bench" / "bundle_parity"
RUNS: list[dict[str, Any]] = []  # every timed call of this invocation: {"part", "variant", "seconds": [...]}


def _session(path: Path | bytes, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # sessions alternate
    return ort.InferenceSession(
        path if isinstance(path, bytes) else str(path), options, providers=["CPUExecutionProvider"]
    )


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int, part: str) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin after one warm-up each; the raw
    seconds go to ``RUNS`` under ``part``."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    RUNS.extend({"part": part, "variant": k, "seconds": v, **run_stamp()} for k, v in times.items())
    return {k: statistics.median(v) for k, v in times.items()}


def _expert_models(hidden: int, inter: int, seed: int = 0) -> tuple[bytes, bytes]:
    """A SwiGLU expert as an FP32 graph and its QDQ twin (per-channel RTN weights, per-tensor inputs)."""
    import onnx_ir as ir

    from moedge.formats.graph_names import MODULE_KEY
    from moedge.graph_passes.insert_qdq import InsertQDQPass, LinearQuant

    rng = np.random.default_rng(seed)
    quant: dict[str, LinearQuant] = {}
    for name, (out_f, in_f) in {
        "gate": (inter, hidden),
        "up": (inter, hidden),
        "down": (hidden, inter),
    }.items():
        w = rng.normal(0, 0.02, (out_f, in_f)).astype(np.float32)
        scale = np.abs(w).max(axis=1) / 127
        quant[name] = LinearQuant(
            np.round(w / scale[:, None]).astype(np.int8), scale.astype(np.float32), 0.05
        )

    def build() -> ir.Model:
        x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["n", hidden]))
        inits = {
            n: ir.Value(name=n, const_value=ir.tensor(np.ascontiguousarray(q.dequantized().T)))
            for n, q in quant.items()
        }
        g = ir.node("MatMul", [x, inits["gate"]], metadata_props={MODULE_KEY: "gate"})
        u = ir.node("MatMul", [x, inits["up"]], metadata_props={MODULE_KEY: "up"})
        sig = ir.node("Sigmoid", [g.outputs[0]])
        silu = ir.node("Mul", [g.outputs[0], sig.outputs[0]])
        prod = ir.node("Mul", [silu.outputs[0], u.outputs[0]])
        d = ir.node("MatMul", [prod.outputs[0], inits["down"]], metadata_props={MODULE_KEY: "down"})
        for node, width in ((g, inter), (u, inter), (sig, inter), (silu, inter), (prod, inter), (d, hidden)):
            node.outputs[0].dtype, node.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(["n", width])
        d.outputs[0].name = "y"
        graph = ir.Graph(
            [x],
            [d.outputs[0]],
            nodes=[g, u, sig, silu, prod, d],
            initializers=list(inits.values()),
            opset_imports={"": 18},
            name="expert",
        )
        return ir.Model(graph, ir_version=10)

    fp = build()
    qdq = build()
    InsertQDQPass(quant)(qdq)
    return (
        ir.serde.serialize_model(fp).SerializeToString(),
        ir.serde.serialize_model(qdq).SerializeToString(),
    )


def synthetic_expert(threads: int, repeats: int) -> dict[str, Any]:
    """Part 1: the 2048 / 7168 expert."""
    fp_bytes, q_bytes = _expert_models(2048, 7168)
    fp, q = _session(fp_bytes, threads), _session(q_bytes, threads)
    out: dict[str, Any] = {"hidden": 2048, "intermediate": 7168}
    for tokens in (1, 64):
        x = np.random.default_rng(1).normal(size=(tokens, 2048)).astype(np.float32)
        med = _interleaved(
            {"fp32": lambda f={"x": x}: fp.run(None, f), "w8a8": lambda f={"x": x}: q.run(None, f)},
            repeats,
            f"synthetic_expert/{tokens}_tokens",
        )
        out[f"{tokens}_tokens"] = {
            "fp32_ms": 1e3 * med["fp32"],
            "w8a8_ms": 1e3 * med["w8a8"],
            "speedup": med["fp32"] / med["w8a8"],
        }
        print(f"  expert 2048/7168 at {tokens} tokens: {out[f'{tokens}_tokens']}", flush=True)
    return out


def smollm2_experts(fp_bundle: Path, q_bundle: Path, threads: int, repeats: int) -> dict[str, Any]:
    """Part 2a: the real experts, and the cost of one ORT call."""
    import onnx

    from moedge.formats.manifest import read_manifest

    fp_m, q_m = read_manifest(fp_bundle), read_manifest(q_bundle)
    out: dict[str, Any] = {}
    layer = fp_m.layers[0].moe, q_m.layers[0].moe
    assert layer[0] is not None and layer[1] is not None
    fp = _session(fp_bundle / layer[0].experts[0].file, threads)
    q = _session(q_bundle / layer[1].experts[0].file, threads)
    hidden = int(fp_m.model["hidden_size"])
    ident = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            "identity",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", hidden])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", hidden])],
        ),
        opset_imports=[onnx.helper.make_opsetid("", 18)],
    )
    idn = _session(ident.SerializeToString(), threads)
    for tokens in (1, 64):
        x = np.random.default_rng(2).normal(size=(tokens, hidden)).astype(np.float32)
        feeds = {"x": x}
        med = _interleaved(
            {
                "fp32": lambda f=feeds: fp.run(None, f),
                "w8a8": lambda f=feeds: q.run(None, f),
                "call_overhead": lambda f=feeds: idn.run(None, f),
            },
            repeats,
            f"smollm2_experts/{tokens}_tokens",
        )
        out[f"{tokens}_tokens"] = {
            "fp32_ms": 1e3 * med["fp32"],
            "w8a8_ms": 1e3 * med["w8a8"],
            "speedup": med["fp32"] / med["w8a8"],
            "ort_call_overhead_ms": 1e3 * med["call_overhead"],
            "overhead_share_of_w8a8": med["call_overhead"] / med["w8a8"],
        }
        print(f"  smollm2 expert at {tokens} tokens: {out[f'{tokens}_tokens']}", flush=True)
    return out


def whole_bundle(fp_bundle: Path, q_bundle: Path, threads: int, repeats: int) -> dict[str, Any]:
    """Part 2b: prompt (128 tokens) and decode (16 steps) tokens/s of the reference orchestrator."""
    from moedge.runtime.bundle_runner import BundleRunner
    from moedge.runtime.decoding import StopRule, generate

    runners = {
        "fp32": BundleRunner(fp_bundle, intra_op_threads=threads),
        "w8a8": BundleRunner(q_bundle, intra_op_threads=threads),
    }
    prompt = np.random.default_rng(3).integers(0, 49152, (1, 128))

    def prompt_fn(r: BundleRunner) -> Callable[[], object]:
        return lambda: r.forward(prompt)

    def decode_fn(r: BundleRunner) -> Callable[[], object]:
        return lambda: generate(r, [prompt[0, :16].tolist()], StopRule(max_new_tokens=17))

    prompt_med = _interleaved(
        {k: prompt_fn(r) for k, r in runners.items()}, repeats, "whole_bundle/prompt128"
    )
    decode_med = _interleaved(
        {k: decode_fn(r) for k, r in runners.items()}, max(3, repeats // 3), "whole_bundle/prefill16+decode16"
    )
    prefill16 = _interleaved(
        {k: (lambda r=r: r.forward(prompt[:, :16])) for k, r in runners.items()},
        repeats,
        "whole_bundle/prefill16",
    )
    out = {}
    for k in runners:
        decode_s = max(decode_med[k] - prefill16[k], 1e-9) / 16
        out[k] = {"prompt_tokens_per_s": 128 / prompt_med[k], "decode_tokens_per_s": 1 / decode_s}
    out["w8a8_vs_fp32"] = {
        m: out["w8a8"][m] / out["fp32"][m] for m in ("prompt_tokens_per_s", "decode_tokens_per_s")
    }
    print(f"  whole bundle: {out}", flush=True)
    return out


def spinning_cost(q_bundle: Path, threads: int, repeats: int) -> dict[str, Any]:
    """Part 2c: decode seconds per token of the W8A8 bundle with ORT's idle thread pools spinning or not."""
    from moedge.runtime.bundle_runner import BundleRunner
    from moedge.runtime.decoding import StopRule, generate

    prompt = np.random.default_rng(3).integers(0, 49152, (1, 16))

    def decode(runner: BundleRunner) -> Callable[[], object]:
        return lambda: generate(runner, [prompt[0].tolist()], StopRule(max_new_tokens=9))

    runners = {
        name: BundleRunner(q_bundle, intra_op_threads=threads, spinning=name == "spinning", shared_pool=False)
        for name in ("spinning", "not_spinning")
    }
    med = _interleaved({k: decode(r) for k, r in runners.items()}, repeats, "spinning/prefill16+decode8")
    out = {k: {"prefill16_plus_8_decode_s": v} for k, v in med.items()}
    out["ratio"] = med["spinning"] / med["not_spinning"]
    print(f"  spinning pools: {out}", flush=True)
    return out


def sizes(fp_bundle: Path, q_bundle: Path) -> dict[str, Any]:
    """Part 3: bytes as stored (graph + external data)."""
    from moedge.formats.manifest import read_manifest

    fp_m, q_m = read_manifest(fp_bundle), read_manifest(q_bundle)
    expert_ratio = [
        qe.bytes / fe.bytes
        for fl, ql in zip(fp_m.layers, q_m.layers, strict=True)
        if fl.moe and ql.moe
        for fe, qe in zip(fl.moe.experts, ql.moe.experts, strict=True)
    ]
    stage_ratio = [
        q.stage.bytes / f.stage.bytes for f, q in zip(fp_m.stage_runs(), q_m.stage_runs(), strict=True)
    ]
    total = {k: sum(e["bytes"] for e in m.files.values()) for k, m in (("fp32", fp_m), ("w8a8", q_m))}
    out = {
        "expert_bytes_ratio": {"max": max(expert_ratio), "median": statistics.median(expert_ratio)},
        "stage_bytes_ratio": {"max": max(stage_ratio), "median": statistics.median(stage_ratio)},
        "bundle_bytes": total,
        "expert_bytes": {"fp32": fp_m.expert_bytes(), "w8a8": q_m.expert_bytes()},
        "embedding_bytes": {"fp32": fp_m.embedding.bytes, "w8a8": q_m.embedding.bytes, "precision": "fp32"},
        "head_bytes": {"fp32": fp_m.head.bytes, "w8a8": q_m.head.bytes, "precision": "fp32"},
    }
    print(f"  sizes: {out}", flush=True)
    return out


def split_times(fp_export: Path) -> dict[str, Any]:
    """Part 4: the 240-expert split, and tiny Mixtrals with growing expert counts."""
    import onnx_ir as ir

    from moedge.export.exporter import export_model
    from moedge.formats.manifest import GatingRule
    from moedge.graph_passes.bundle import split_bundle
    from moedge.graph_passes.split_experts import SplitExpertsPass
    from moedge.testbeds import build_tiny

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        manifest = split_bundle(fp_export, Path(tmp) / "bundle", progress=False)
        out["smollm2_135m_moe_split_bundle_s"] = time.perf_counter() - start
        RUNS.append(
            {
                "part": "split/smollm2_135m_moe",
                "seconds": [out["smollm2_135m_moe_split_bundle_s"]],
                **run_stamp(),
            }
        )
        out["smollm2_135m_moe_graphs"] = len(manifest.graphs())
        print(
            f"  split of the 240-expert bundle (write included): {out['smollm2_135m_moe_split_bundle_s']:.1f} s",
            flush=True,
        )
        per_expert = {}
        for experts in (4, 16, 64):
            loaded = build_tiny("mixtral", num_experts=experts)
            export_model(loaded, Path(tmp) / f"e{experts}")
            graph = ir.load(Path(tmp) / f"e{experts}" / "model.onnx")
            splitter = SplitExpertsPass(
                experts_path="mlp.experts",
                router_path="mlp.gate",
                gating=GatingRule("softmax", 2, True, False),
            )
            start = time.perf_counter()
            splitter(graph)
            seconds = time.perf_counter() - start
            RUNS.append(
                {"part": f"split/tiny_mixtral_{experts}_experts", "seconds": [seconds], **run_stamp()}
            )
            per_expert[experts] = {
                "split_s": seconds,
                "nodes": len(list(graph.graph)),
                "s_per_expert_graph": seconds / (2 * experts),
            }
            print(f"  tiny mixtral, {experts} experts/layer: {per_expert[experts]}", flush=True)
        out["tiny_mixtral_split"] = per_expert
    return out


def main() -> None:
    """Run the four parts and write the JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--fp-bundle", type=Path, default=WORK / "smollm2-135m-moe-fp32-bundle")
    parser.add_argument(
        "--w8a8-bundle", type=Path, default=WORK / "smollm2-135m-moe-w8a8-smollm2-135m-moe-haq-bundle"
    )
    parser.add_argument("--fp-export", type=Path, default=WORK / "smollm2-135m-moe-fp32-export")
    parser.add_argument("--parts", default="synthetic,experts,bundle,spinning,sizes,split")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    out_file = RESULTS / "bundle_speed.json"
    previous = read_result(out_file)
    record: dict[str, Any] = previous["results"] if previous else {}
    record.update(threads=args.threads, repeats=args.repeats, backend="onnxruntime CPU")
    if "synthetic" in parts:
        record["synthetic_expert"] = synthetic_expert(args.threads, args.repeats)
    if "experts" in parts:
        record["smollm2_experts"] = smollm2_experts(
            args.fp_bundle, args.w8a8_bundle, args.threads, args.repeats
        )
    if "bundle" in parts:
        record["whole_bundle"] = whole_bundle(
            args.fp_bundle, args.w8a8_bundle, args.threads, max(6, args.repeats // 5)
        )
    if "spinning" in parts:
        record["spinning"] = spinning_cost(args.w8a8_bundle, args.threads, 3)
    if "sizes" in parts:
        record["sizes"] = sizes(args.fp_bundle, args.w8a8_bundle)
    if "split" in parts:
        record["split"] = split_times(args.fp_export)
    keys = {"synthetic": "synthetic_expert", "experts": "smollm2_experts", "bundle": "whole_bundle"}
    rerun = {keys.get(p, p) for p in parts}  # the record's keys of the parts measured now
    inputs = [args.fp_bundle, args.w8a8_bundle, *([args.fp_export] if "split" in parts else [])]
    kept, earlier = carry_over(previous, lambda r: r.get("part", "").split("/")[0] not in rerun, inputs)
    write_result(
        out_file,
        benchmark="bundle_speed",
        command=command_line(),
        threads=args.threads,
        inputs=[*inputs, *earlier],
        runs=[*kept, *RUNS],
        statistic="medians of interleaved repeats (variants round-robin after one warm-up call each; runs: "
        "every call's seconds per part and variant, stamped with when they ran): expert ms, ORT call "
        "overhead, whole-bundle prompt tokens/s (128 tokens) and decode tokens/s ((median prefill16+decode16 "
        "- median prefill16) / 16 steps), spinning cost; speedups and ratios are ratios of medians; sizes "
        "are byte counts; split times one timed run each. Parts not rerun keep their earlier runs",
        results=record,
        engines=("onnxruntime",),
    )
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
