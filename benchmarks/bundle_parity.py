"""Bundle parity on a real MoE: the split bundle (reference orchestrator, ORT CPU) against PyTorch.

Two rows, each on the first 64 windows (seqlen 512) of WikiText-2 raw test:

- fp32: FP32 bundle vs the PyTorch model: top-1 agreement >= 99.9% of positions, perplexity within 0.05%.
- w8a8: QDQ bundle (export with the recipe applied) vs the recipe's fake-quant PyTorch model: top-1
  agreement >= 99%, perplexity within 0.5%.

It also counts router decisions that differ between the bundle and PyTorch, and how close the PyTorch
router was to a tie there (the gap between the k-th and (k+1)-th softmax score): float rounding can only
flip near-ties. `--exact-int-reference` makes the fake-quant reference compute every quantized matmul
as ORT's fused MatMulIntegerToFloat does (exact integer sums, then float(acc) * (input scale * weight
scale) + bias), which removes the accumulation-order difference from the comparison. Exports and bundles are cached under ~/.cache/moedge/bench/. Writes
benchmarks/results/bundle_parity_<model>.json.

    MOEDGE_DATA=../shared/data .venv/bin/python benchmarks/bundle_parity.py --model smollm2-135m-moe \
        --recipe ~/.cache/moedge/recipes/smollm2-135m-moe-haq
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from provenance import (
    carry_over,
    command_line,
    dataset_files,
    model_files,
    read_result,
    run_stamp,
    write_result,
)

RESULTS = Path(__file__).resolve().parent / "results"
BARS = {"fp32": (0.999, 0.0005), "w8a8": (0.99, 0.005)}  # top-1 agreement >=, |ppl ratio - 1| <=


def _router_choices(model: Any) -> tuple[dict[int, np.ndarray], list[Any]]:
    """Hooks recording each MoE layer's top-k indices and softmax scores in PyTorch."""
    seen: dict[int, np.ndarray] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is None:
            continue

        def hook(_m: Any, _a: Any, out: Any, i: int = i) -> None:
            import torch

            probs = torch.softmax(out[0].float(), dim=-1).numpy()
            seen[i] = np.concatenate([out[2].numpy().astype(np.float32), probs], axis=1)

        handles.append(gate.register_forward_hook(hook))
    return seen, handles


def _exact_int_forward(self: Any, x: Any) -> Any:
    """FakeQuantLinear's product as ORT's MatMulIntegerToFloat computes it: exact int sums, one scale."""
    import torch

    from moedge.calibration.quant import QMAX_ACT, QMIN_ACT

    scale = torch.tensor(self.input_scale, dtype=torch.float32)
    codes = torch.clamp(torch.round(x / scale), QMIN_ACT, QMAX_ACT)
    acc = torch.nn.functional.linear(codes.double(), self.qweight.double())  # exact below 2**53
    out = acc.float() * (scale * self.weight_scale)
    return out if self.bias is None else out + self.bias


def _compare(
    label: str,
    model: Any,
    bundle_dir: Path,
    windows: np.ndarray,
    threads: int,
    runs: list[dict[str, Any]],
    optimize: bool = True,
) -> dict[str, Any]:
    """The row's pooled figures; each window's raw counts are appended to ``runs``."""
    import torch

    from moedge.evaluation import window_nll
    from moedge.runtime.bundle_runner import BundleRunner, RoutingTrace

    runner = BundleRunner(bundle_dir, intra_op_threads=threads, optimize=optimize)
    top_k = next(layer.moe.gating.top_k for layer in runner.manifest.layers if layer.moe)
    nll_ref = nll_bundle = 0.0
    agree = positions = 0
    flips = decisions = 0
    flip_gaps: list[float] = []
    max_abs = 0.0
    seconds = {"pytorch": 0.0, "bundle": 0.0}
    stamp = run_stamp()
    for w, ids in enumerate(windows):
        before = {"flips": flips, "decisions": decisions, **seconds}
        seen, handles = _router_choices(model)
        start = time.perf_counter()
        try:
            with torch.no_grad():
                ref = model(input_ids=torch.from_numpy(ids)[None], use_cache=False).logits[0].float().numpy()
        finally:
            for h in handles:
                h.remove()
        seconds["pytorch"] += time.perf_counter() - start
        trace = RoutingTrace()
        start = time.perf_counter()
        got = runner.forward(ids[None], trace=trace)[0][0]
        seconds["bundle"] += time.perf_counter() - start
        run = {
            "row": label,
            "window": w,
            "positions": len(ids) - 1,
            "top1_agree": int((ref[:-1].argmax(-1) == got[:-1].argmax(-1)).sum()),
            "nll_pytorch": window_nll(ref, ids),
            "nll_bundle": window_nll(got, ids),
            "max_abs_logit_diff": float(np.abs(ref - got).max()),
        }
        nll_ref += run["nll_pytorch"]
        nll_bundle += run["nll_bundle"]
        agree += run["top1_agree"]
        positions += run["positions"]
        max_abs = max(max_abs, run["max_abs_logit_diff"])
        for layer, chosen in trace.chosen.items():
            torch_idx = seen[layer][:, :top_k].astype(np.int64)
            probs = seen[layer][:, top_k:]
            same = (np.sort(chosen, axis=1) == np.sort(torch_idx, axis=1)).all(axis=1)
            decisions += len(same)
            flips += int((~same).sum())
            ordered = -np.sort(-probs, axis=1)
            gaps = ordered[:, top_k - 1] - ordered[:, top_k]
            flip_gaps += [float(g) for g in gaps[~same]]
        runs.append(
            {
                **run,
                "router_decisions": decisions - before["decisions"],
                "router_flips": flips - before["flips"],
                "pytorch_s": seconds["pytorch"] - before["pytorch"],
                "bundle_s": seconds["bundle"] - before["bundle"],
                **stamp,
            }
        )
        print(
            f"  {label} window {w + 1}/{len(windows)}: top-1 agreement {agree / positions:.5f}, "
            f"router flips {flips}",
            flush=True,
        )
    tokens = positions
    ppl_ref, ppl_bundle = float(np.exp(nll_ref / tokens)), float(np.exp(nll_bundle / tokens))
    bar_agree, bar_ppl = BARS[label.split("-")[0]]
    row = {
        "windows": len(windows),
        "seqlen": int(windows.shape[1]),
        "predicted_tokens": tokens,
        "top1_agreement": agree / positions,
        "perplexity_pytorch": ppl_ref,
        "perplexity_bundle": ppl_bundle,
        "perplexity_ratio": ppl_bundle / ppl_ref,
        "max_abs_logit_diff": max_abs,
        "router_decisions": decisions,
        "router_flips": flips,
        "router_flip_gaps": {
            "max": max(flip_gaps) if flip_gaps else None,
            "median": float(np.median(flip_gaps)) if flip_gaps else None,
        },
        "seconds": seconds,
        "bars": {"top1_agreement_min": bar_agree, "perplexity_rel_max": bar_ppl},
        "passes": agree / positions >= bar_agree and abs(ppl_bundle / ppl_ref - 1) <= bar_ppl,
    }
    print(
        f"  {label}: {json.dumps({k: row[k] for k in ('top1_agreement', 'perplexity_ratio', 'router_flips', 'passes')})}"
    )
    return row


def _ensure_bundle(loaded: Any, export_dir: Path, bundle_dir: Path) -> dict[str, float]:
    from moedge.export.exporter import export_model
    from moedge.graph_passes.bundle import split_bundle

    times: dict[str, float] = {}
    if not (bundle_dir / "manifest.json").is_file():
        if not (export_dir / "model.onnx").is_file():
            start = time.perf_counter()
            export_model(loaded, export_dir)
            times["export_s"] = time.perf_counter() - start
        start = time.perf_counter()
        split_bundle(export_dir, bundle_dir)
        times["split_s"] = time.perf_counter() - start
    return times


def main() -> None:
    """Measure both rows and write the JSON."""
    import torch

    from moedge.calibration import apply_recipe
    from moedge.datasets import load_text, windows
    from moedge.loading import load_model
    from moedge.paths import cache_dir

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-moe")
    parser.add_argument("--recipe", type=Path, help="recipe folder for the w8a8 row (skipped without)")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="fp32,w8a8")
    parser.add_argument(
        "--no-optimize",
        action="store_true",
        help="run the bundle op for op (ORT graph optimizations off); rows are saved as <row>-unoptimized",
    )
    parser.add_argument(
        "--exact-int-reference",
        action="store_true",
        help="the w8a8 reference sums quantized matmuls exactly in integers, as ORT's fused kernel does; "
        "rows are saved as <row>-exactint",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.exact_int_reference:
        from moedge.calibration.quant import FakeQuantLinear

        FakeQuantLinear.forward = _exact_int_forward  # type: ignore[method-assign]
    work = cache_dir() / "bench" / "bundle_parity"
    out_file = RESULTS / f"bundle_parity_{args.model}.json"
    previous = read_result(out_file)
    record: dict[str, Any] = previous["results"] if previous else {}
    record.update(model=args.model, protocol=f"wikitext2 test, first {args.windows} windows of 512")
    record.setdefault("rows", {})
    runs: list[dict[str, Any]] = []
    inputs: list[Path] = []
    for label in args.rows.split(","):
        loaded = load_model(args.model)
        ids = np.asarray(loaded.encode(load_text("wikitext2").text), dtype=np.int64)
        win = windows(ids, 512, max_windows=args.windows)
        suffix = "fp32"
        if label == "w8a8":
            if args.recipe is None:
                print("w8a8 row skipped: no --recipe")
                continue
            apply_recipe(loaded, args.recipe)
            suffix = f"w8a8-{args.recipe.name}"
        times = _ensure_bundle(
            loaded, work / f"{args.model}-{suffix}-export", work / f"{args.model}-{suffix}-bundle"
        )
        name = (
            (f"{label}-unoptimized" if args.no_optimize else label)
            + ("-exactint" if args.exact_int_reference and label == "w8a8" else "")
            + ("" if args.windows == 64 else f"-{args.windows}w")
        )
        bundle = work / f"{args.model}-{suffix}-bundle"
        row = _compare(name, loaded.model, bundle, win, args.threads, runs, optimize=not args.no_optimize)
        row.update(times, bundle=str(work / f"{args.model}-{suffix}-bundle"), threads=args.threads)
        inputs += [*model_files(loaded), bundle, *([args.recipe] if label == "w8a8" else [])]
        if label == "w8a8":
            row["recipe"] = str(args.recipe)
        record["rows"][name] = row
        measured = {r["row"] for r in runs}
        current = list(dict.fromkeys([*inputs, *dataset_files("wikitext2")]))
        kept, earlier = carry_over(previous, lambda r, m=measured: r.get("row") not in m, current)
        write_result(
            out_file,
            benchmark="bundle_parity",
            command=command_line(),
            threads=args.threads,
            inputs=[*current, *earlier],
            runs=[*kept, *runs],
            statistic="one PyTorch and one bundle pass per window (runs: each window's counts, NLL sums, "
            "router decisions and seconds, stamped with when they ran): top-1 agreement and perplexities "
            "pooled over every predicted token of the windows, max_abs_logit_diff the max over windows, "
            "router flip gaps the max and median over flipped decisions, seconds summed; rows not rerun "
            "keep their earlier runs",
            results=record,
            engines=("onnxruntime", "torch"),
        )
        del loaded
        gc.collect()
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
