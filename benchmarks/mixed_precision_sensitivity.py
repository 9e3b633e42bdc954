"""How much each linear's W8A8 quantization costs, measured: the evidence behind automatic mixed precision.

Calibrates HAQ by the protocol (128 C4 windows of 512, seed 0), then restores each quantized linear to
FP alone and measures the loss saved on held-out C4 windows (8 windows drawn with seed 1, not used to
calibrate). Keeps linears greedily by measured gain within 2% of the linear parameters, and evaluates
that selection on the first 128 WikiText-2 windows. Writes benchmarks/results/mixed_precision_<model>.json.

    MOEDGE_DATA=../shared/data .venv/bin/python benchmarks/mixed_precision_sensitivity.py --threads 1
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from provenance import command_line, dataset_files, model_files, write_result

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    """Calibrate, measure every linear's revert gain on held-out windows, evaluate the 2% selection."""
    import torch

    from moedge.calibration import CalibrationConfig, calibrate, calibration_windows
    from moedge.calibration.calibrator import _fp_linear, _probe_loss
    from moedge.datasets import load_text
    from moedge.evaluation import perplexity, torch_logits
    from moedge.loading import load_model

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--probe", type=int, default=8, help="held-out C4 windows the gains are measured on")
    parser.add_argument("--fraction", type=float, default=0.02)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    calib = list(calibration_windows(loaded, dataset="c4", count=128, seqlen=512, seed=0))
    held = [
        torch.from_numpy(w).long() for w in calibration_windows(loaded, count=args.probe, seqlen=512, seed=1)
    ]
    start = time.perf_counter()
    result = calibrate(
        loaded, calib, CalibrationConfig(method="haq", rotate="none"), progress=False, retain_fp=True
    )
    print(f"calibrated in {time.perf_counter() - start:.0f} s", flush=True)
    model = loaded.model
    tokens = sum(len(h) - 1 for h in held)
    base = _probe_loss(model, held)
    gains: dict[str, float] = {}
    runs: list[dict[str, Any]] = [{"measure": "probe loss, all linears quantized", "probe_nll": base}]
    start = time.perf_counter()
    for name, entry in result.fp_weights.items():
        parent, leaf, _, _ = entry
        quantized = getattr(parent, leaf)
        setattr(parent, leaf, _fp_linear(entry))
        loss = _probe_loss(model, held)
        runs.append({"measure": "probe loss, one linear reverted to FP", "linear": name, "probe_nll": loss})
        gains[name] = (base - loss) / tokens  # nats per token saved
        setattr(parent, leaf, quantized)
    print(f"measured {len(gains)} reverts in {time.perf_counter() - start:.0f} s", flush=True)
    total = sum(r.params for r in result.linears.values())
    kept, used = [], 0
    for name in sorted(gains, key=lambda n: gains[n], reverse=True):
        params = result.linears[name].params
        if gains[name] > 0 and used + params <= args.fraction * total:
            kept.append(name)
            used += params
    for name in kept:
        parent, leaf, _, _ = result.fp_weights[name]
        setattr(parent, leaf, _fp_linear(result.fp_weights[name]))
    ids = np.asarray(loaded.encode(load_text("wikitext2").text), dtype=np.int64)
    ppl = perplexity(
        torch_logits(model), ids, seqlen=512, max_windows=128, dataset="wikitext2", backend="pytorch"
    )
    print(f"kept {kept} ({100 * used / total:.2f}%): WikiText-2 {ppl.perplexity:.4f}", flush=True)
    by_kind: dict[str, list[float]] = {}
    for name, gain in gains.items():
        by_kind.setdefault(name.rsplit(".", 1)[-1], []).append(gain)
    record: dict[str, Any] = {
        "model": args.model,
        "protocol": "HAQ, 128 C4 windows (seed 0); gains on held-out C4 windows (seed 1); WikiText-2 first 128 x 512",
        "base_probe_nll_per_token": base / tokens,
        "gains_nats_per_token": dict(sorted(gains.items(), key=lambda kv: -kv[1])),
        "gain_by_kind": {k: {"sum": float(np.sum(v)), "max": float(np.max(v))} for k, v in by_kind.items()},
        "kept": kept,
        "kept_fraction": used / total,
        "wikitext2": ppl.to_dict(),
        "threads": args.threads,
    }
    runs.append({"measure": "wikitext2 perplexity of the selection", **ppl.to_dict()})
    out = RESULTS / f"mixed_precision_{args.model}.json"
    write_result(
        out,
        benchmark="mixed_precision_sensitivity",
        command=command_line(),
        threads=args.threads,
        inputs=[*model_files(loaded), *dataset_files("c4", "wikitext2")],
        runs=runs,
        statistic=f"one deterministic pass each: the probe loss is summed over {args.probe} held-out C4 "
        f"windows ({tokens} predicted tokens), a gain is (base loss - loss with that linear in FP) / tokens; "
        "the selection's perplexity pools the first 128 WikiText-2 windows",
        results=record,
        engines=("torch",),
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
