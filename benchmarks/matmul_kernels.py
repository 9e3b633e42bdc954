"""One smollm2-135m layer's linears on ORT CPU: moedge's W8A8 kernel vs MatMulNBits 8-bit vs FP32.

Issue 16 asks which int8 kernel the CPU target's stages should use. This times, in one process and
interleaved, the seven linears of layer 0 (q 576x576, k/v 576x192, o 576x576, gate/up 576x1536, down
1536x576) as three graphs each:

- ``w8a8``: what a moedge bundle runs today. The linear is built as moedge builds it (``InsertQDQPass``:
  ``MatMul(DQ(Q(x)), DQ(W_int8))``, per-output-channel symmetric int8 weights, a static per-tensor
  activation scale) and ORT's optimizer fuses it to ``QuantizeLinear`` (uint8, zero point 128) +
  ``com.microsoft.MatMulIntegerToFloat``; the script checks that fusion in ORT's optimized model.
- ``nbits8``: ``com.microsoft.MatMulNBits`` bits=8, block_size=32, accuracy_level=4, symmetric weights,
  made by ORT's ``MatMulNBitsQuantizer`` the way ORT GenAI's model builder makes its ``-p int8 -e cpu``
  graphs. Activations are quantized per block of 32 on the fly; int8 dot products.
- ``fp32``: a plain MatMul, the reference.

Each linear is its own session; ``layer`` is one session holding all seven (what a fused stage pays
without six extra calls); ``layer_sum`` is the sum of the seven per-linear medians. Rows M = 1 (decode)
and 512 (prompt), at each thread count. A linear or a layer called back to back keeps its weights in the
CPU caches, which a decode step does not (it reads every layer's weights once per token): ``all_layers``,
at M = 1 only, is one session holding the linears of all 30 layers (each layer's own weights, all fed the
same inputs), so its weights stream from memory as in decode. Each round times every (threads, rows,
graph, variant) once; a sample is the mean of enough back-to-back calls to fill ~10 ms. Reported:
medians (and minimums) over rounds, ratios, every sample, weight bytes, and numerics against FP32 (``max_err_rel``: max |y - y_fp32| / max |y_fp32|;
``l2_err_rel``: ||y - y_fp32|| / ||y_fp32||).

Weights: the real smollm2-135m loaded by moedge's GGUF loader (``--weights smollm2``, the default; the
GGUF is Q4_1, so the FP32 weights lie on a 4-bit grid per block of 32) or seeded N(0, 0.02) of the same
shapes (``--weights random``). Activations: layer 0's real linear inputs, the static scales
calibrated (absmax / 127) on a C4 calibration window (documents 0-999) and the timed/evaluated inputs
from the first 512-token window of WikiText-2 raw test (M = 1 is its last row); seeded N(0, 1)
activations when the data folder or the real weights are absent. The kernel's
speed does not depend on the scale's value; only the W8A8 numerics do (moedge's recipes choose clips and
smoothing that this naive absmax scale lacks).

    MOEDGE_DATA=../shared/data .venv/bin/python benchmarks/matmul_kernels.py --threads 2,1 --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# smollm2-135m layer 0: name -> (input group, in_features, out_features). Linears sharing a group read
# the same input (q/k/v the attention norm's output, gate/up the MLP norm's).
LINEARS: dict[str, tuple[str, int, int]] = {
    "q_proj": ("attn_in", 576, 576),
    "k_proj": ("attn_in", 576, 192),
    "v_proj": ("attn_in", 576, 192),
    "o_proj": ("o_in", 576, 576),
    "gate_proj": ("mlp_in", 576, 1536),
    "up_proj": ("mlp_in", 576, 1536),
    "down_proj": ("down_in", 1536, 576),
}
HF_MODULE = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
VARIANTS = ("w8a8", "nbits8", "fp32")
NBITS = {"bits": 8, "block_size": 32, "accuracy_level": 4, "is_symmetric": True}
FUSED_W8A8 = ["QuantizeLinear", "com.microsoft.MatMulIntegerToFloat"]
SAMPLE_S = 0.010  # each sample: back-to-back calls filling about this long
SEQLEN = 512
LAYERS = 30  # smollm2-135m's depth (the random test bed's too)


@dataclass
class LayerData:
    """Every layer's linear weights (out, in) by ``L{i}.{linear}``, and per input group layer 0's
    calibration and evaluation inputs (rows, in)."""

    weights: dict[str, np.ndarray]
    calib: dict[str, np.ndarray]
    evals: dict[str, np.ndarray]
    source: dict[str, Any]
    files: list[Path]  # the input files (GGUF, texts), digested into the result's provenance


def _base(name: str) -> str:
    """``L3.q_proj`` -> ``q_proj``."""
    return name.split(".", 1)[1]


def _groups() -> dict[str, int]:
    return {group: k for group, k, _ in LINEARS.values()}


def random_layer(seed: int) -> LayerData:
    rng = np.random.default_rng(seed)
    weights = {
        f"L{i}.{n}": rng.normal(0, 0.02, (out, k)).astype(np.float32)
        for i in range(LAYERS)
        for n, (_, k, out) in LINEARS.items()
    }
    calib = {g: rng.normal(size=(SEQLEN, k)).astype(np.float32) for g, k in _groups().items()}
    evals = {g: rng.normal(size=(SEQLEN, k)).astype(np.float32) for g, k in _groups().items()}
    return LayerData(
        weights,
        calib,
        evals,
        {
            "weights": f"seeded N(0, 0.02), seed {seed}, {LAYERS} layers",
            "activations": f"seeded N(0, 1), seed {seed}",
        },
        [],
    )


def _data_dir(arg: str | None) -> Path | None:
    for cand in (arg, os.environ.get("MOEDGE_DATA"), str(ROOT.parent / "shared" / "data")):
        if cand and (Path(cand) / "wikitext-2-raw" / "wiki.test.raw").is_file():
            return Path(cand)
    return None


def smollm2_layer(data_dir: Path | None, seed: int) -> LayerData:
    """Layer 0 of smollm2-135m through moedge's loader; its real linear inputs on real text."""
    import torch

    from moedge.datasets import c4_documents, load_text, sample_windows
    from moedge.sources.gguf import load_gguf
    from moedge.testbeds import smollm2_gguf_path

    start = time.perf_counter()
    path = smollm2_gguf_path()
    loaded = load_gguf(path)
    load_s = time.perf_counter() - start
    layers = loaded.model.model.layers
    weights = {
        f"L{i}.{n}": layer.get_submodule(HF_MODULE[n]).weight.detach().float().numpy().copy()
        for i, layer in enumerate(layers)
        for n in LINEARS
    }
    layer = layers[0]
    source: dict[str, Any] = {
        "weights": f"smollm2-135m ({path.name}, dequantized to FP32 by moedge.sources.gguf): layer 0, and "
        f"all {len(layers)} layers for the all_layers graph",
        "load_seconds": round(load_s, 1),
    }
    if data_dir is None:
        rng = np.random.default_rng(seed)
        calib = {g: rng.normal(size=(SEQLEN, k)).astype(np.float32) for g, k in _groups().items()}
        evals = {g: rng.normal(size=(SEQLEN, k)).astype(np.float32) for g, k in _groups().items()}
        source["activations"] = f"seeded N(0, 1), seed {seed} (no data folder: set MOEDGE_DATA)"
        return LayerData(weights, calib, evals, source, [path])

    captured: dict[str, np.ndarray] = {}
    first = {"attn_in": "q_proj", "o_in": "o_proj", "mlp_in": "gate_proj", "down_in": "down_proj"}
    hooks = [
        layer.get_submodule(HF_MODULE[name]).register_forward_pre_hook(
            lambda _m, args, g=group: captured.__setitem__(g, args[0][0].detach().float().numpy().copy())
        )
        for group, name in first.items()
    ]
    c4_ids = np.asarray(loaded.encode("\n\n".join(c4_documents(0, 1000, data_dir=data_dir))), np.int64)
    calib_ids = sample_windows(c4_ids, 1, SEQLEN, seed=seed)[0]
    wiki_ids = np.asarray(loaded.encode(load_text("wikitext2", data_dir=data_dir).text), np.int64)
    eval_ids = wiki_ids[:SEQLEN]
    out: list[dict[str, np.ndarray]] = []
    with torch.no_grad():
        for ids in (calib_ids, eval_ids):
            captured.clear()
            loaded.model(torch.from_numpy(ids[None, :]))
            out.append(dict(captured))
    for h in hooks:
        h.remove()
    source["activations"] = (
        f"layer 0 linear inputs; static scales from C4 documents 0-999 (one {SEQLEN}-token window, seed "
        f"{seed}); timed and evaluated on WikiText-2 raw test tokens 0-{SEQLEN - 1} (M=1: its last row)"
    )
    files = [
        path,
        data_dir / "c4" / "c4_validation_2k.parquet",
        data_dir / "wikitext-2-raw" / "wiki.test.raw",
    ]
    return LayerData(weights, out[0], out[1], source, files)


def graph_fp32(weights: dict[str, np.ndarray], names: Sequence[str], *, opset: int = 21) -> Any:
    """An onnx_ir model: one MatMul per linear, W (out, in) as an (in, out) initializer, inputs by group."""
    import onnx_ir as ir

    from moedge.formats.graph_names import MODULE_KEY

    inputs: dict[str, ir.Value] = {}
    nodes, inits, outputs = [], [], []
    for name in names:
        group, k, n = LINEARS[_base(name)]
        if group not in inputs:
            inputs[group] = ir.Value(
                name=group, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["m", k])
            )
        w = ir.Value(name=f"{name}.weight", const_value=ir.tensor(np.ascontiguousarray(weights[name].T)))
        node = ir.node("MatMul", [inputs[group], w], name=name, metadata_props={MODULE_KEY: name})
        out = node.outputs[0]
        out.name, out.dtype, out.shape = name, ir.DataType.FLOAT, ir.Shape(["m", n])
        nodes.append(node)
        inits.append(w)
        outputs.append(out)
    graph = ir.Graph(
        list(inputs.values()),
        outputs,
        nodes=nodes,
        initializers=inits,
        opset_imports={"": opset},
        name="linears",
    )
    return ir.Model(graph, ir_version=10)


def w8a8_quant(data: LayerData) -> dict[str, Any]:
    """moedge's LinearQuant per linear: per-output-channel symmetric RTN int8, absmax/127 input scale
    (layer 0's inputs set every layer's scale: the kernel's speed does not depend on it)."""
    from moedge.graph_passes.insert_qdq import LinearQuant

    quant = {}
    for name, w in data.weights.items():
        group = LINEARS[_base(name)][0]
        scale = np.maximum(np.abs(w).max(axis=1), 1e-12) / 127
        qweight = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
        input_scale = float(np.abs(data.calib[group]).max()) / 127
        quant[name] = LinearQuant(qweight, scale.astype(np.float32), input_scale)
    return quant


def build_models(data: LayerData, names: Sequence[str], quant: dict[str, Any]) -> dict[str, bytes]:
    """The three variants of a graph holding ``names``, serialized."""
    import onnx_ir as ir
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from moedge.graph_passes.insert_qdq import InsertQDQPass

    fp = ir.serde.serialize_model(graph_fp32(data.weights, names))
    # InsertQDQPass checks that the graph holds the recipe's dequantized weight (as a moedge export does).
    qdq_model = graph_fp32({n: quant[n].dequantized() for n in names}, names)
    InsertQDQPass({n: quant[n] for n in names})(qdq_model)
    nbits = MatMulNBitsQuantizer(ir.serde.serialize_model(graph_fp32(data.weights, names)), **NBITS)
    nbits.process()
    return {
        "w8a8": ir.serde.serialize_model(qdq_model).SerializeToString(),
        "nbits8": nbits.model.model.SerializeToString(),
        "fp32": fp.SerializeToString(),
    }


def session(model: bytes, threads: int, optimized_path: str | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def optimized_ops(model: bytes) -> list[str]:
    """The node list ORT's CPU provider runs for ``model`` (its saved optimized graph)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "optimized.onnx")
        session(model, 1, path)
        graph = onnx.load(path).graph
    return [f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in graph.node]


def weight_bytes(model: bytes) -> int:
    import onnx

    return sum(
        onnx.numpy_helper.to_array(t).nbytes for t in onnx.load_from_string(model).graph.initializer if t.dims
    )


def feeds_for(data: LayerData, names: Sequence[str], rows: int) -> dict[str, np.ndarray]:
    groups = {LINEARS[_base(n)][0] for n in names}
    return {g: np.ascontiguousarray(data.evals[g][-rows:]) for g in sorted(groups)}


def errors(y: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    diff = y.astype(np.float64) - ref.astype(np.float64)
    return {
        "max_err_rel": float(np.abs(diff).max() / np.abs(ref).max()),
        "l2_err_rel": float(np.linalg.norm(diff) / np.linalg.norm(ref)),
    }


def _calls_per_sample(fn: Any) -> int:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(1, round(SAMPLE_S / max(once, 1e-6)))


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]], list[Path]]:
    """Build, check, time: (results, every sample, the input files)."""
    threads_list = [int(t) for t in args.threads.split(",")]
    rows_list = [int(r) for r in args.rows.split(",")]
    if args.weights == "smollm2":
        data = smollm2_layer(_data_dir(args.data_dir), args.seed)
    else:
        data = random_layer(args.seed)
    print(f"weights: {data.source['weights']}\nactivations: {data.source['activations']}", flush=True)
    quant = w8a8_quant(data)
    graphs = {name: [f"L0.{name}"] for name in LINEARS}
    graphs["layer"] = [f"L0.{name}" for name in LINEARS]
    graphs["all_layers"] = list(data.weights)  # M=1 only: every layer's weights read once, as in decode
    models = {g: build_models(data, names, quant) for g, names in graphs.items()}

    # What ORT runs: moedge's QDQ linear must fuse to exactly Q + MatMulIntegerToFloat.
    fusion = {v: optimized_ops(models["q_proj"][v]) for v in VARIANTS}
    layer_ops = optimized_ops(models["layer"]["w8a8"])
    print(
        f"ORT CPU runs moedge's QDQ linear as {fusion['w8a8']}; MatMulNBits as {fusion['nbits8']}", flush=True
    )
    if fusion["w8a8"] != FUSED_W8A8 or layer_ops.count("com.microsoft.MatMulIntegerToFloat") != len(LINEARS):
        raise SystemExit(f"ORT did not fuse the QDQ linears as expected: {fusion['w8a8']} / {layer_ops}")
    if fusion["nbits8"] != ["com.microsoft.MatMulNBits"]:
        raise SystemExit(f"unexpected MatMulNBits graph after optimization: {fusion['nbits8']}")

    # Numerics against FP32, single-threaded, every rows count.
    numerics: dict[str, Any] = {}
    for rows in rows_list:
        for g, names in graphs.items():
            if g in ("layer", "all_layers"):
                continue
            feeds = feeds_for(data, names, rows)
            ys = {v: session(models[g][v], 1).run(None, feeds)[0] for v in VARIANTS}
            numerics.setdefault(f"M{rows}", {})[g] = {
                v: errors(ys[v], ys["fp32"]) for v in ("w8a8", "nbits8")
            }
    clipped = {g: float(np.mean(np.abs(data.evals[g]) > np.abs(data.calib[g]).max())) for g in _groups()}

    sessions = {(t, g, v): session(models[g][v], t) for t in threads_list for g in graphs for v in VARIANTS}
    cells = [
        (t, m, g, v)
        for t in threads_list
        for m in rows_list
        for g in graphs
        for v in VARIANTS
        if m == 1 or g != "all_layers"
    ]
    feeds = {(m, g): feeds_for(data, names, m) for m in rows_list for g, names in graphs.items()}
    fns = {c: (lambda s=sessions[c[0], c[2], c[3]], f=feeds[c[1], c[2]]: s.run(None, f)) for c in cells}
    reps = {c: _calls_per_sample(fns[c]) for c in cells}
    samples: dict[tuple[int, int, str, str], list[float]] = {c: [] for c in cells}
    runs: list[dict[str, Any]] = []
    load_before = os.getloadavg()  # the machine is shared: how busy it was while timing
    start = time.perf_counter()
    for r in range(args.rounds):
        order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]  # rotate which variant goes first
        for t in threads_list:
            for m in rows_list:
                for g in graphs:
                    for v in order:
                        c = (t, m, g, v)
                        if c not in fns:
                            continue
                        fn, n = fns[c], reps[c]
                        t0 = time.perf_counter()
                        for _ in range(n):
                            fn()
                        samples[c].append((time.perf_counter() - t0) / n)
                        runs.append(
                            {
                                "round": r,
                                "threads": t,
                                "rows": m,
                                "graph": g,
                                "variant": v,
                                "calls": n,
                                "ms_per_call": round(1e3 * samples[c][-1], 5),
                            }
                        )
        print(f"  round {r + 1}/{args.rounds} done ({time.perf_counter() - start:.0f} s)", flush=True)

    results: dict[str, Any] = {}
    for t in threads_list:
        for m in rows_list:
            table: dict[str, Any] = {}
            for g in graphs:
                if (t, m, g, VARIANTS[0]) in samples:
                    cell = {v: samples[t, m, g, v] for v in VARIANTS}
                    table[g] = _row(
                        {v: 1e3 * statistics.median(x) for v, x in cell.items()},
                        {v: 1e3 * min(x) for v, x in cell.items()},
                    )
            table["layer_sum"] = _row(
                *({v: sum(table[n][f"{v}{k}_ms"] for n in LINEARS) for v in VARIANTS} for k in ("", "_min"))
            )
            results[f"threads{t}_M{m}"] = table
            _print_table(t, m, table)

    figures = {
        "protocol": {
            "model": "smollm2-135m layer 0" if args.weights == "smollm2" else "random, smollm2-135m shapes",
            **data.source,
            "linears": {n: {"in": k, "out": o} for n, (_, k, o) in LINEARS.items()},
            "threads": threads_list,
            "rows": rows_list,
            "rounds": args.rounds,
            "seed": args.seed,
            "sample": f"mean of back-to-back calls filling ~{SAMPLE_S * 1e3:.0f} ms, one per cell per round",
            "sessions": "one per (graph, variant, threads), intra_op_num_threads=threads, ORT defaults "
            "otherwise (spinning on)",
        },
        "variants": {
            "w8a8": "moedge InsertQDQPass linear (int8 per-output-channel weights, static per-tensor int8 "
            "activation scale, zero points 0) as ORT fuses it: " + " + ".join(fusion["w8a8"]),
            "nbits8": f"com.microsoft.MatMulNBits from onnxruntime.quantization MatMulNBitsQuantizer({NBITS})",
            "fp32": "MatMul, FP32 weights",
        },
        "ort_optimized_ops": {**fusion, "layer_w8a8": layer_ops},
        "weight_bytes": {g: {v: weight_bytes(models[g][v]) for v in VARIANTS} for g in graphs},
        "medians_ms": results,
        "numerics_vs_fp32": numerics,
        "eval_inputs_beyond_calibration_absmax": clipped,
        "timing_seconds": round(time.perf_counter() - start, 1),
        "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
    }
    return figures, runs, data.files


def _row(med: dict[str, float], low: dict[str, float]) -> dict[str, float]:
    """Medians, minimums (the least disturbed sample, on a shared machine) and the medians' ratios."""
    return {
        **{f"{v}_ms": round(med[v], 5) for v in VARIANTS},
        **{f"{v}_min_ms": round(low[v], 5) for v in VARIANTS},
        "nbits8_speedup_vs_w8a8": round(med["w8a8"] / med["nbits8"], 3),
        "w8a8_speedup_vs_fp32": round(med["fp32"] / med["w8a8"], 3),
        "nbits8_speedup_vs_fp32": round(med["fp32"] / med["nbits8"], 3),
    }


def _print_table(threads: int, rows: int, table: dict[str, Any]) -> None:
    print(f"\n{threads} thread(s), M={rows}   (ms; ratio = w8a8 / nbits8, >1: MatMulNBits faster)")
    print(f"  {'graph':<10} {'w8a8':>9} {'nbits8':>9} {'fp32':>9} {'ratio':>7}")
    for g, row in table.items():
        print(
            f"  {g:<10} {row['w8a8_ms']:>9.4f} {row['nbits8_ms']:>9.4f} {row['fp32_ms']:>9.4f}"
            f" {row['nbits8_speedup_vs_w8a8']:>7.2f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", default="2,1", help="comma-separated intra-op thread counts (default 2,1)"
    )
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--rows", default="1,512", help="comma-separated row counts M (default 1,512)")
    parser.add_argument("--weights", choices=("smollm2", "random"), default="smollm2")
    parser.add_argument("--data-dir", default=None, help="shared/data layout (default: $MOEDGE_DATA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "matmul_kernels.json")
    args = parser.parse_args(argv)

    figures, runs, files = run(args)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from provenance import command_line, write_result

    write_result(
        args.out,
        benchmark="matmul_kernels",
        command=command_line(argv),
        threads=None,  # several: results.protocol.threads
        inputs=files,
        runs=runs,
        statistic="per (threads, rows, graph, variant): median (and minimum) over the interleaved rounds of "
        "the mean call time in a ~10 ms sample of back-to-back calls; layer_sum = sum of the seven "
        "per-linear medians (minimums); ratios from the medians",
        results=figures,
        engines=["onnxruntime"],
    )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
