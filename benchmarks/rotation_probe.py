"""Smoothing, rotation, or both, and what to do with the sink token: a probe on down_proj's input (issue 17).

The W8A8 loss left on smollm2-135m sits in every layer's ``mlp.down_proj`` input, act(gate(x)) * up(x),
quantized static per-tensor int8: a few tokens (the attention sink at position 0 first) carry channels
in the thousands where a typical token stays near 2. This probe transforms only that input and its
weight, leaves everything else FP32 (weights too), and measures:

- ``none``: x as is;
- ``smooth``: SmoothQuant per channel, s = max|x_c|^alpha / max|W_:,c|^(1 - alpha); x / s and W * s;
- ``rotate``: x Q and W Q with Q = ``random_hadamard(1536, seed)`` (orthonormal, so (x Q)(W Q)^T = x W^T);
- ``smooth+rotate``: smoothing, then the rotation.

Per layer and variant, on the calibration sample: the per-tensor absmax of x', the 99.99th percentile of
|x'|, the median over tokens of each token's absmax, absmax / that median, and the absmax with position 0
of every window left out (plus position 0's own absmax and where the absmax sits). Then x' goes through
the pipeline's static symmetric int8 fake quantizer (``fake_quant_act``: scale = range / 127,
round-to-nearest, clamp to [-128, 127] as QuantizeLinear does) with three range choices: ``absmax``
(every calibration token), ``absmax_no_sink`` (positions >= 1; position 0 is quantized and clamps) and
``absmax_no_sink_fp_sink`` (the same scale; position 0 is left in FP32, as a prefix whose KV cache stays
FP would be). Ranges and smoothing come from the FP32 model's calibration activations. The score is the
whole model's perplexity on WikiText-2 test windows; each exact transform alone (no quantization) is
checked on the first of them to leave the FP32 perplexity unchanged (1e-4 relative) and its logit change.

Calibration text: C4 windows drawn from documents 0-999 (``calibration_windows``, the calibration text
of BENCHMARKS.md; the data folder holds no WikiText-2 train split). Writes
benchmarks/results/rotation_probe.json.

    MOEDGE_DATA=../shared/data .venv/bin/python benchmarks/rotation_probe.py

Flags: --windows 8 (evaluation windows of 512), --calib-windows 8 (calibration windows of 512),
--seed 0 (the calibration draw and the Hadamard signs), --alpha 0.5, --threads 2, --out PATH,
--model smollm2-135m (a test bed name or any source ``moedge.loading.load_model`` takes).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from provenance import command_line, dataset_files, model_files, write_result
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

OUT = Path(__file__).resolve().parent / "results" / "rotation_probe.json"
SEQLEN = 512
EXACT_TOLERANCE = 1e-4
VARIANTS = ("none", "smooth", "rotate", "smooth+rotate")
RANGES = {
    "absmax": "scale from the absmax over every calibration token; every token quantized",
    "absmax_no_sink": "scale from the absmax over positions >= 1; position 0 quantized too (it clamps)",
    "absmax_no_sink_fp_sink": "scale from the absmax over positions >= 1; position 0 left in FP32",
}


@dataclass(frozen=True)
class Transform:
    """x' = (x / smooth) @ rotation and W' = (W * smooth) @ rotation, so x' W'^T = x W^T (None: skipped)."""

    smooth: torch.Tensor | None
    rotation: torch.Tensor | None

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """The transformed activation x' (last axis: input channels)."""
        if self.smooth is not None:
            x = x / self.smooth
        return x if self.rotation is None else x @ self.rotation

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """The transformed weight W' [out, in]."""
        if self.smooth is not None:
            w = w * self.smooth
        return w if self.rotation is None else w @ self.rotation


def down_proj(mlp: nn.Module) -> nn.Linear:
    """The ``down_proj`` linear of an MLP block (its original, outside ``swapped``)."""
    linear = mlp.down_proj
    assert isinstance(linear, nn.Linear), f"down_proj is a {type(linear).__name__}, not a Linear"
    return linear


class ProbeLinear(nn.Module):
    """A linear whose input is transformed, then optionally fake-quantized with one static scale."""

    weight: torch.Tensor

    def __init__(
        self, linear: nn.Linear, transform: Transform, scale: float | None, *, fp_sink: bool
    ) -> None:
        super().__init__()
        self.transform = transform
        self.scale = scale  # None: no quantization
        self.fp_sink = fp_sink  # position 0 bypasses the quantizer
        self.register_buffer("weight", transform.weight(linear.weight.detach()))
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [batch, tokens, in] -> [batch, tokens, out]."""
        from moedge.calibration.quant import fake_quant_act

        x = self.transform.input(x)
        if self.scale is not None:
            q = fake_quant_act(x, self.scale)
            if self.fp_sink:
                q[:, 0] = x[:, 0]
            x = q
        return nn.functional.linear(x, self.weight, self.bias)


@contextlib.contextmanager
def swapped(mlps: Sequence[nn.Module], replacements: Sequence[nn.Module]) -> Iterator[None]:
    """Every ``mlp.down_proj`` replaced for the duration; the originals are back on exit."""
    originals = [m.down_proj for m in mlps]
    try:
        for mlp, new in zip(mlps, replacements, strict=True):
            mlp.down_proj = new
        yield
    finally:
        for mlp, old in zip(mlps, originals, strict=True):
            mlp.down_proj = old


def capture_inputs(model: nn.Module, mlps: Sequence[nn.Module], rows: np.ndarray) -> list[torch.Tensor]:
    """Each layer's down_proj input over ``rows`` (FP32 model): [windows, tokens, channels] per layer."""
    grabbed: list[list[torch.Tensor]] = [[] for _ in mlps]
    handles = [
        down_proj(mlp).register_forward_pre_hook(
            lambda _m, args, i=i: grabbed[i].append(args[0][0].detach().clone())
        )
        for i, mlp in enumerate(mlps)
    ]
    try:
        with torch.no_grad():
            for row in rows:
                model(input_ids=torch.from_numpy(row)[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [torch.stack(g) for g in grabbed]


def transforms(
    x: torch.Tensor, w: torch.Tensor, rotation: torch.Tensor, alpha: float
) -> dict[str, Transform]:
    """The four variants for one layer, smoothing scales from its calibration input ``x``."""
    from moedge.calibration.search import smoothing_scale

    s = smoothing_scale(x.abs().amax(dim=(0, 1)), w.abs().amax(dim=0), alpha)
    return {
        "none": Transform(None, None),
        "smooth": Transform(s, None),
        "rotate": Transform(None, rotation),
        "smooth+rotate": Transform(s, rotation),
    }


def input_stats(xt: torch.Tensor) -> dict[str, Any]:
    """Range figures of one transformed calibration input [windows, tokens, channels]."""
    a = xt.abs()
    token = a.amax(dim=-1)  # [windows, tokens]
    absmax, median = float(token.max()), float(token.median())
    flat_at = int(token.argmax())
    return {
        "absmax": absmax,
        "p99_99": float(np.percentile(a.numpy().ravel(), 99.99)),
        "median_token_absmax": median,
        "ratio": absmax / median,
        "absmax_no_sink": float(token[:, 1:].max()),
        "sink_absmax": float(token[:, 0].max()),
        "absmax_position": flat_at % token.shape[1],
    }


def layer_probes(
    mlps: Sequence[nn.Module], inputs: list[torch.Tensor], rotation: torch.Tensor, alpha: float
) -> tuple[dict[str, list[Transform]], list[dict[str, Any]]]:
    """Per variant, each layer's transform; and one statistics record per (variant, layer)."""
    plans: dict[str, list[Transform]] = {v: [] for v in VARIANTS}
    stats: list[dict[str, Any]] = []
    for layer, (mlp, x) in enumerate(zip(mlps, inputs, strict=True)):
        for variant, t in transforms(x, down_proj(mlp).weight.detach(), rotation, alpha).items():
            plans[variant].append(t)
            with torch.no_grad():
                stats.append(
                    {
                        "kind": "calibration_stats",
                        "variant": variant,
                        "layer": layer,
                        **input_stats(t.input(x)),
                    }
                )
    return plans, stats


def modules_for(
    mlps: Sequence[nn.Module],
    plan: list[Transform],
    stats: list[dict[str, Any]],
    variant: str,
    rng: str | None,
) -> list[nn.Module]:
    """One ProbeLinear per layer: ``rng`` None for the exact transform, else a RANGES key."""
    rows = sorted((s for s in stats if s["variant"] == variant), key=lambda s: s["layer"])
    out: list[nn.Module] = []
    for mlp, t, row in zip(mlps, plan, rows, strict=True):
        if rng is None:
            scale = None
        else:
            from moedge.calibration.quant import act_scale

            scale = act_scale(row["absmax"] if rng == "absmax" else row["absmax_no_sink"])
        out.append(ProbeLinear(down_proj(mlp), t, scale, fp_sink=rng == "absmax_no_sink_fp_sink"))
    return out


def summarize(stats: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per variant: mean and max over layers of each range figure."""
    out: dict[str, dict[str, float]] = {}
    for variant in VARIANTS:
        rows = [s for s in stats if s["variant"] == variant]
        row: dict[str, float] = {}
        for key in ("absmax", "p99_99", "ratio", "absmax_no_sink", "sink_absmax"):
            values = np.array([r[key] for r in rows])
            row[f"{key}_mean"], row[f"{key}_max"] = float(values.mean()), float(values.max())
        row["layers_absmax_at_position_0"] = sum(r["absmax_position"] == 0 for r in rows)
        out[variant] = row
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=8, help="WikiText-2 test windows of 512 scored")
    parser.add_argument("--calib-windows", type=int, default=8, help="C4 calibration windows of 512")
    parser.add_argument("--seed", type=int, default=0, help="calibration draw and Hadamard signs")
    parser.add_argument("--alpha", type=float, default=0.5, help="smoothing strength")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    return parser.parse_args()


def exact_checks(
    model: PreTrainedModel,
    mlps: Sequence[nn.Module],
    plans: dict[str, list[Transform]],
    stats: list[dict[str, Any]],
    row: np.ndarray,
) -> dict[str, Any]:
    """Each exact transform (no quantization) against FP32 on one window: perplexity and logits."""
    from moedge.evaluation import torch_logits, window_nll

    def scored() -> tuple[np.ndarray, float]:
        logits = torch_logits(model)(row)
        return logits, math.exp(window_nll(logits, row) / (len(row) - 1))

    ref, ref_ppl = scored()
    out: dict[str, Any] = {"window": "first evaluation window", "tolerance": EXACT_TOLERANCE, "fp32": ref_ppl}
    for variant in VARIANTS[1:]:
        with swapped(mlps, modules_for(mlps, plans[variant], stats, variant, None)):
            logits, ppl = scored()
        rel = abs(ppl - ref_ppl) / ref_ppl
        out[variant] = {
            "perplexity": ppl,
            "relative_change": rel,
            "max_abs_logit_diff": float(np.abs(logits - ref).max()),
            "within_tolerance": rel <= EXACT_TOLERANCE,
        }
        print(f"{variant + ' exact (window 0)':<40} {ppl:10.4f}  (FP32 {ref_ppl:.4f}, relative {rel:.1e})")
    return out


def main() -> None:
    """Calibrate, measure the ranges, score every (variant, range choice), write the JSON, print a table."""
    from moedge.calibration.data import calibration_windows
    from moedge.calibration.hadamard import random_hadamard
    from moedge.datasets import load_text, windows
    from moedge.evaluation import perplexity, torch_logits
    from moedge.loading import load_model

    args = parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    model = loaded.model
    mlps = [m for name, m in model.named_modules() if name.endswith(".mlp") and hasattr(m, "down_proj")]
    calib = calibration_windows(loaded, dataset="c4", count=args.calib_windows, seqlen=SEQLEN, seed=args.seed)
    eval_ids = np.asarray(loaded.encode(load_text("wikitext2").text), dtype=np.int64)
    start = time.perf_counter()
    inputs = capture_inputs(model, mlps, calib)
    width = inputs[0].shape[-1]
    rotation = torch.from_numpy(random_hadamard(width, args.seed)).float()
    plans, stats = layer_probes(mlps, inputs, rotation, args.alpha)
    del inputs
    print(f"calibration: {len(calib)} windows, {len(mlps)} layers, {time.perf_counter() - start:.0f} s")
    exact = exact_checks(model, mlps, plans, stats, windows(eval_ids, SEQLEN, max_windows=1)[0])
    runs: list[dict[str, Any]] = list(stats)

    def score(label: str, replacements: list[nn.Module] | None) -> float:
        with swapped(mlps, replacements) if replacements is not None else contextlib.nullcontext():
            res = perplexity(
                torch_logits(model),
                eval_ids,
                seqlen=SEQLEN,
                max_windows=args.windows,
                dataset="wikitext2",
                backend=label,
                progress=False,
            )
        runs.append({"kind": "perplexity", "label": label, **res.to_dict()})
        print(f"{label:<40} {res.perplexity:10.4f}  ({res.seconds:.0f} s)")
        return res.perplexity

    fp32 = score("fp32", None)
    table = {
        v: {r: score(f"{v} w8a8 {r}", modules_for(mlps, plans[v], stats, v, r)) for r in RANGES}
        for v in VARIANTS
    }
    summary = summarize(stats)
    results = {
        "model": loaded.name,
        "layers": len(mlps),
        "linear": f"mlp.down_proj (input width {width}); every other module FP32, weights included",
        "evaluation": {"dataset": "wikitext2 test", "windows": runs[-1]["windows"], "seqlen": SEQLEN},
        "calibration": {
            "dataset": "c4 documents 0-999 (calibration_windows)",
            "windows": len(calib),
            "seqlen": SEQLEN,
            "seed": args.seed,
        },
        "alpha": args.alpha,
        "hadamard": {
            "order": width,
            "seed": args.seed,
            "function": "moedge.calibration.hadamard.random_hadamard",
        },
        "quantizer": "static per-tensor symmetric int8 on x': scale = range / 127, round-to-nearest, "
        "clamp [-128, 127] (moedge.calibration.quant.fake_quant_act, as QuantizeLinear)",
        "ranges": RANGES,
        "fp32_perplexity": fp32,
        "exact_checks": exact,
        "perplexity": table,
        "ranges_over_layers": summary,
    }
    write_result(
        args.out,
        benchmark="rotation_probe",
        command=command_line(),
        threads=args.threads,
        inputs=[*model_files(loaded), *dataset_files("wikitext2", "c4")],
        runs=runs,
        statistic="calibration_stats runs: per (variant, layer), figures over every token of the calibration "
        "windows (FP32 model); ranges_over_layers: their mean and max over layers. perplexity runs: one "
        "deterministic pass per evaluation window, exp(mean NLL) over every predicted token. exact_checks: "
        "the first evaluation window alone",
        results=results,
        engines=("torch",),
    )
    print_table(fp32, summary, table)
    passed = all(exact[v]["within_tolerance"] for v in VARIANTS[1:])
    print(f"exact transforms within {EXACT_TOLERANCE:g} of FP32: {passed}")
    print(f"wrote {args.out}")


def print_table(
    fp32: float, summary: dict[str, dict[str, float]], table: dict[str, dict[str, float]]
) -> None:
    """Ranges (mean / max over layers) and perplexity per range choice, one row per variant."""
    print(f"\nFP32 perplexity {fp32:.4f}")
    head = f"{'variant':<14} {'absmax mean/max':>18} {'ratio mean/max':>16} {'no-sink mean/max':>18}"
    print(head + "".join(f" {r:>23}" for r in RANGES))
    for v in VARIANTS:
        s = summary[v]
        row = (
            f"{v:<14} {s['absmax_mean']:8.1f}/{s['absmax_max']:8.1f} {s['ratio_mean']:7.1f}/{s['ratio_max']:7.1f}"
            f" {s['absmax_no_sink_mean']:8.1f}/{s['absmax_no_sink_max']:8.1f}"
        )
        print(row + "".join(f" {table[v][r]:>23.4f}" for r in RANGES))


if __name__ == "__main__":
    main()
