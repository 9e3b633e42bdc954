"""Is the offline residual rotation exact on real weights? smollm2-135m and smollm2-135m-moe (issue 17).

``rotate_residual`` (calibration/residual_rotation.py: norm weights folded into the linears that read
them, the residual stream turned by Q = ``random_hadamard(576, seed)``, the embedding E Q, the final
norm's weight applied between Hn^T and Hn before the head) should leave an FP32 model's function
unchanged up to float rounding. Per model, on WikiText-2 test windows of 512 tokens, the original FP32
model's logits and routing are recorded, the same model is rotated in place, and the rotated model's are
compared:

- ``top1_agreement``: the fraction of positions whose argmax token is the same (>= 0.999 required);
  for each disagreement, the original's gap between its top two logits (a tie broken by rounding);
- ``max_abs_logit_diff`` and its ratio to the largest |logit|;
- MoE: per router and token, whether the set of top-k experts changed (a routing flip) and, for each
  flip, the original's top-k gap: the k-th minus the (k+1)-th softmax probability (every flip must
  have a gap below 1e-3: only near-ties may flip).

smollm2-135m-moe needs the data folder (MOEDGE_DATA; skipped without it), and so does WikiText-2 (without
it the dense model is measured on the packaged demo text, recorded as such). Writes
benchmarks/results/rotation_exactness.json.

    MOEDGE_DATA=../shared/data .venv/bin/python benchmarks/rotation_exactness.py

Flags: --windows 4, --seqlen 512, --seed 0 (the Hadamard signs), --threads 2, --out PATH,
--models smollm2-135m smollm2-135m-moe.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from provenance import command_line, dataset_files, model_files, write_result
from torch import nn

OUT = Path(__file__).resolve().parent / "results" / "rotation_exactness.json"
MODELS = ("smollm2-135m", "smollm2-135m-moe")
MIN_TOP1_AGREEMENT = 0.999
MAX_FLIP_GAP = 1e-3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--windows", type=int, default=4, help="WikiText-2 test windows scored")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="the Hadamard signs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    return parser.parse_args()


class RouterTap:
    """Records, per router call, the softmax probabilities of every token (float64)."""

    def __init__(self, model: nn.Module) -> None:
        from moedge.arch import get_config
        from moedge.calibration.layers import decoder_layers

        arch = get_config(str(model.config.model_type))  # type: ignore[union-attr]
        self.top_k = int(getattr(model.config, "num_experts_per_tok", 0) or 0)  # type: ignore[union-attr]
        self.probs: list[torch.Tensor] = []
        self.handles = []
        if arch.router_path is None:
            return
        for layer in decoder_layers(model):
            router = layer.get_submodule(arch.router_path)
            self.handles.append(router.register_forward_hook(self._record))

    def _record(self, _m: nn.Module, _args: Any, out: Any) -> None:
        logits = out[0] if isinstance(out, tuple) else out
        self.probs.append(torch.softmax(logits.detach().double(), dim=-1))

    def take(self) -> list[torch.Tensor]:
        """The probabilities recorded since the last call, one tensor per router call."""
        probs, self.probs = self.probs, []
        return probs

    def close(self) -> None:
        """Remove the hooks."""
        for h in self.handles:
            h.remove()


def run_windows(
    model: nn.Module, rows: np.ndarray, tap: RouterTap
) -> tuple[list[torch.Tensor], list[list[torch.Tensor]], float]:
    """Logits (float32) and router probabilities of every window, and the seconds it took."""
    start = time.perf_counter()
    logits, routes = [], []
    with torch.no_grad():
        for row in rows:
            out = model(input_ids=torch.from_numpy(row)[None], use_cache=False).logits[0].float()
            logits.append(out)
            routes.append(tap.take())
    return logits, routes, time.perf_counter() - start


def compare(
    want: list[torch.Tensor],
    got: list[torch.Tensor],
    want_routes: list[list[torch.Tensor]],
    got_routes: list[list[torch.Tensor]],
    top_k: int,
) -> dict[str, Any]:
    """Top-1 agreement, logit differences and routing flips of the rotated model against the original."""
    positions = agree = 0
    max_diff = scale = 0.0
    disagreement_gaps: list[float] = []
    for a, b in zip(want, got, strict=True):
        top_a, top_b = a.argmax(-1), b.argmax(-1)
        positions += int(top_a.numel())
        agree += int((top_a == top_b).sum())
        max_diff = max(max_diff, float((a - b).abs().max()))
        scale = max(scale, float(a.abs().max()))
        for pos in torch.nonzero(top_a != top_b).flatten().tolist():
            two = torch.topk(a[pos], 2).values
            disagreement_gaps.append(float(two[0] - two[1]))
    out: dict[str, Any] = {
        "positions": positions,
        "top1_agreement": agree / positions,
        "top1_disagreements": positions - agree,
        "top1_disagreement_logit_gaps": disagreement_gaps,
        "max_abs_logit_diff": max_diff,
        "max_abs_logit": scale,
        "relative_max_logit_diff": max_diff / scale,
    }
    if top_k == 0:
        return out
    decisions = flips = 0
    flip_gaps: list[float] = []
    for window_a, window_b in zip(want_routes, got_routes, strict=True):
        for pa, pb in zip(window_a, window_b, strict=True):
            chosen_a = torch.topk(pa, top_k, dim=-1).indices.sort(dim=-1).values
            chosen_b = torch.topk(pb, top_k, dim=-1).indices.sort(dim=-1).values
            decisions += int(chosen_a.shape[0])
            changed = (chosen_a != chosen_b).any(dim=-1)
            flips += int(changed.sum())
            for token in torch.nonzero(changed).flatten().tolist():
                ranked = torch.sort(pa[token], descending=True).values
                flip_gaps.append(float(ranked[top_k - 1] - ranked[top_k]))
    out.update(
        {
            "routing_decisions": decisions,
            "routing_flips": flips,
            "routing_flip_topk_gaps": flip_gaps,
            "max_flip_topk_gap": max(flip_gaps, default=None),
            "max_abs_router_prob_diff": max(
                float((pa - pb).abs().max())
                for wa, wb in zip(want_routes, got_routes, strict=True)
                for pa, pb in zip(wa, wb, strict=True)
            ),
        }
    )
    return out


def measure(name: str, text: str, args: argparse.Namespace) -> tuple[dict[str, Any], list[Path]]:
    """One model: the original's logits and routing, the rotation in place, the rotated model's; compared."""
    from moedge.arch import get_config
    from moedge.arch.per_expert import split_experts
    from moedge.calibration.residual_rotation import rotate_residual
    from moedge.datasets import load_text, windows
    from moedge.loading import load_model

    loaded = load_model(name)
    model = loaded.model.eval()
    ids = np.asarray(loaded.encode(load_text(text).text), dtype=np.int64)
    rows = windows(ids, args.seqlen, max_windows=args.windows)
    split_experts(model, get_config(loaded.model_type))  # what calibrate() does first (exact)
    tap = RouterTap(model)
    want, want_routes, seconds_fp = run_windows(model, rows, tap)
    start = time.perf_counter()
    rotation = rotate_residual(model, loaded.model_type, args.seed, name=loaded.name)
    seconds_rotate = time.perf_counter() - start
    got, got_routes, seconds_rotated = run_windows(model, rows, tap)
    tap.close()
    result = compare(want, got, want_routes, got_routes, tap.top_k)
    passed = result["top1_agreement"] >= MIN_TOP1_AGREEMENT
    if tap.top_k:
        gap = result["max_flip_topk_gap"]
        passed = passed and (gap is None or gap < MAX_FLIP_GAP)
    result.update(
        {
            "model": loaded.name,
            "model_type": loaded.model_type,
            "hidden_size": rotation.order,
            "hadamard": {"function": "random_hadamard", "order": rotation.order, "seed": rotation.seed},
            "head_rotation_factors": _factors(model),
            "dataset": text,
            "windows": int(rows.shape[0]),
            "seqlen": args.seqlen,
            "top_k": tap.top_k,
            "seconds": {"fp32": seconds_fp, "rotate": seconds_rotate, "rotated": seconds_rotated},
            "passed": passed,
        }
    )
    return result, model_files(loaded)


def _factors(model: nn.Module) -> str:
    from moedge.calibration.layers import head_modules

    norm: Any = head_modules(model)[1]
    return f"{norm.rotate.p}x{norm.rotate.q}"


def main() -> None:
    """Measure every model, write the JSON, print a summary."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    data = os.environ.get("MOEDGE_DATA")
    has_data = bool(data) and Path(str(data)).is_dir()
    text = "wikitext2" if has_data else "demo"
    results: dict[str, Any] = {"skipped": {}}
    inputs: list[Path] = []
    runs: list[dict[str, Any]] = []
    for name in args.models:
        if name.endswith("-moe") and not has_data:
            results["skipped"][name] = "MOEDGE_DATA is not set: the MoE test bed needs the data folder"
            print(f"{name}: skipped (no MOEDGE_DATA)")
            continue
        result, files = measure(name, text, args)
        inputs += files
        runs.append({"kind": "exactness", **result})
        results[name] = {
            k: v
            for k, v in result.items()
            if k not in ("top1_disagreement_logit_gaps", "routing_flip_topk_gaps")
        }
        line = (
            f"{name}: top-1 agreement {result['top1_agreement']:.6f} ({result['top1_disagreements']} of "
            f"{result['positions']}), max |logit diff| {result['max_abs_logit_diff']:.3g} "
            f"(relative {result['relative_max_logit_diff']:.2e})"
        )
        if result["top_k"]:
            line += (
                f", routing flips {result['routing_flips']} of {result['routing_decisions']} "
                f"(largest top-k gap {result['max_flip_topk_gap']})"
            )
        print(line + f": {'PASS' if result['passed'] else 'FAIL'}")
    results["requirements"] = {
        "min_top1_agreement": MIN_TOP1_AGREEMENT,
        "max_flip_topk_gap": MAX_FLIP_GAP,
    }
    results["passed"] = all(r["passed"] for r in runs)
    write_result(
        args.out,
        benchmark="rotation_exactness",
        command=command_line(),
        threads=args.threads,
        inputs=[*dict.fromkeys(inputs), *dataset_files(text)],
        runs=runs,
        statistic="one FP32 pass per window before and after rotate_residual on the same model (experts "
        "split first, as calibration does); top-1 agreement over every position of every window; routing "
        "flips over every (router, token); a flip's gap is the original's k-th minus (k+1)-th softmax "
        "probability",
        results=results,
        engines=("torch",),
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
