"""Rotation, side by side and bundle parity: issue 17's accuracy table on one set of windows.

On the first ``--windows`` WikiText-2 test windows of 512 tokens of smollm2-135m, in one run:

- perplexity of FP32, of a dynamic per-token W8A8 reference (every linear of every block, the head FP32
  as in the recipes: weights int8 per output channel by absmax, each token's activations int8 by its own
  absmax, as llama.cpp's Q8_0 quantizes them on the fly; a ceiling that TensorRT's explicit quantization
  cannot express),
  and of each recipe (``--recipe LABEL=DIR``: HAQ without rotation and HAQ with ``--rotate full``) as its
  fake-quant PyTorch model and as its ort-cpu bundle (ONNX Runtime's int8 kernels);
- bundle parity per recipe: mean per-token KL divergence KL(fake-quant || bundle) of the next-token
  distributions (teacher-forced), top-1 agreement, and the noise floor measured the same way: the
  fake-quant model against itself with its embeddings perturbed by a relative ``--eps`` (bar: KL <=
  max(0.01 nats, 1.5 x floor) and bundle perplexity within 0.5% of the fake-quant model's);
- decode cost: each recipe's bundle generating ``--new-tokens`` greedy tokens after a ``--prompt-tokens``
  WikiText-2 prompt, interleaved rounds, median decode ms per token (bar: the rotated bundle's step at
  most 1.05x the unrotated one's).

llama.cpp Q8_0's perplexity on the same windows comes from ``side_by_side.json`` (its ``ppl`` part: the
first 64 windows of 512 as well), cited with its own provenance.

    MOEDGE_DATA=../shared/data .venv/bin/python benchmarks/rotation_parity.py \\
        --recipe haq=~/.cache/moedge/recipes/smollm2-135m-haq \\
        --recipe haq+rot-full=~/.cache/moedge/recipes/smollm2-135m-haq-rot-full
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from provenance import command_line, dataset_files, model_files, read_result, write_result

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "rotation_parity.json"
SIDE_BY_SIDE = RESULTS / "side_by_side.json"
KL_FLOOR_NATS = 0.01
KL_FLOOR_FACTOR = 1.5
PPL_TOLERANCE = 0.005
DECODE_BAR = 1.05


def _recipes(items: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"--recipe takes LABEL=DIR, got {item!r}")
        folder = Path(path).expanduser()
        if not (folder / "recipe.json").is_file():
            raise SystemExit(
                f"--recipe {label}: {folder} holds no recipe.json (make it with moedge calibrate)"
            )
        out[label] = folder
    return out


def _bundle(model: str, label: str, recipe: Path, rebuild: bool) -> Path:
    """The recipe's ort-cpu bundle in the moedge cache (made when missing or with ``rebuild``)."""
    from moedge.calibration import apply_recipe
    from moedge.export.exporter import export_model
    from moedge.graph_passes.bundle import split_bundle
    from moedge.loading import load_model
    from moedge.paths import cache_dir

    tag = f"{model}-{label}-parity".replace("+", "-")
    export, bundle = cache_dir() / "bundles" / f"{tag}-export", cache_dir() / "bundles" / f"{tag}-cpu"
    if rebuild or not (bundle / "manifest.json").is_file():
        print(f"{label}: export and split {recipe} -> {bundle}", flush=True)
        export_model(apply_recipe(load_model(model), recipe), export, overwrite=True)
        split_bundle(export, bundle, target="ort-cpu", progress=False, overwrite=True)
    return bundle


def _dynamic_w8a8(model: Any) -> None:
    """Turn ``model`` (FP32, in place) into the dynamic per-token W8A8 reference: every linear of every
    decoder block gets int8 per-output-channel weights and per-token int8 inputs (the head stays FP32, as
    in the recipes compared)."""
    import torch
    from torch import nn

    from moedge.calibration.layers import decoder_layers

    def fake_quant(x: torch.Tensor, dim: int) -> torch.Tensor:
        scale = x.abs().amax(dim=dim, keepdim=True).clamp_min(1e-12) / 127.0
        return torch.clamp(torch.round(x / scale), -127, 127) * scale

    def per_token(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (fake_quant(args[0], -1), *args[1:])

    linears = [m for layer in decoder_layers(model) for m in layer.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for linear in linears:
            linear.weight.copy_(fake_quant(linear.weight, 1))
            linear.register_forward_pre_hook(per_token)


def _log_probs(logits: np.ndarray) -> Any:
    import torch

    return torch.log_softmax(torch.from_numpy(np.asarray(logits[:-1])).double(), dim=-1)


def _kl_sum(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Sum over positions of KL(P || Q) of the next-token distributions (nats)."""
    lp, lq = _log_probs(p_logits), _log_probs(q_logits)
    return float((lp.exp() * (lp - lq)).sum())


def _top1(a: np.ndarray, b: np.ndarray) -> int:
    return int((a[:-1].argmax(-1) == b[:-1].argmax(-1)).sum())


def main() -> None:
    """Measure the table, the parity and the decode cost; write benchmarks/results/rotation_parity.json."""
    import torch
    from runtime_speed import time_bundle

    from moedge.calibration import apply_recipe
    from moedge.datasets import load_text
    from moedge.evaluation import cut_windows, ort_logits, torch_logits, window_nll
    from moedge.loading import load_model
    from moedge.runtime.bundle_runner import BundleRunner

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--recipe", action="append", required=True, help="LABEL=DIR; repeat (first: unrotated)"
    )
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument(
        "--eps", type=float, default=1e-7, help="relative embedding perturbation (noise floor)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved decode timing rounds")
    parser.add_argument("--rebuild", action="store_true", help="re-export and re-split the bundles")
    args = parser.parse_args()
    recipes = _recipes(args.recipe)
    torch.set_num_threads(args.threads)

    bundles = {label: _bundle(args.model, label, path, args.rebuild) for label, path in recipes.items()}
    fp32 = load_model(args.model)
    dynamic = load_model(args.model)
    _dynamic_w8a8(dynamic.model)
    fake = {label: apply_recipe(load_model(args.model), path) for label, path in recipes.items()}
    runners = {label: BundleRunner(b, intra_op_threads=args.threads) for label, b in bundles.items()}
    ids = np.asarray(fp32.encode(load_text("wikitext2").text), dtype=np.int64)
    rows = cut_windows(ids, 512, max_windows=args.windows)

    def perturbed(model: Any, window: np.ndarray, seed: int) -> np.ndarray:
        emb = model.get_input_embeddings()
        noise = torch.Generator().manual_seed(seed)
        handle = emb.register_forward_hook(
            lambda _m, _a, out: out * (1 + args.eps * torch.randn(out.shape, generator=noise))
        )
        try:
            return torch_logits(model)(window)
        finally:
            handle.remove()

    runs: list[dict[str, Any]] = []
    start = time.perf_counter()
    for i, window in enumerate(rows):
        run: dict[str, Any] = {"window": i, "positions": len(window) - 1}
        run["nll_fp32"] = window_nll(torch_logits(fp32.model)(window), window)
        run["nll_dynamic_w8a8"] = window_nll(torch_logits(dynamic.model)(window), window)
        for label in recipes:
            fq = torch_logits(fake[label].model)(window)
            noisy = perturbed(fake[label].model, window, seed=i + 1)
            bundle = ort_logits(runners[label])(window)
            run[label] = {
                "nll_fake_quant": window_nll(fq, window),
                "nll_bundle": window_nll(bundle, window),
                "kl_bundle_sum": _kl_sum(fq, bundle),
                "kl_noise_sum": _kl_sum(fq, noisy),
                "top1_bundle": _top1(fq, bundle),
                "top1_noise": _top1(fq, noisy),
            }
        runs.append(run)
        print(f"window {i + 1}/{len(rows)} ({time.perf_counter() - start:.0f} s)", flush=True)

    positions = sum(r["positions"] for r in runs)

    def ppl(values: list[float]) -> float:
        return float(np.exp(sum(values) / positions))

    fp = ppl([r["nll_fp32"] for r in runs])
    results: dict[str, Any] = {
        "model": args.model,
        "windows": len(rows),
        "seqlen": 512,
        "positions": positions,
        "eps": args.eps,
        "fp32": {"perplexity": fp},
        "dynamic_w8a8": {"perplexity": ppl([r["nll_dynamic_w8a8"] for r in runs])},
        "recipes": {},
    }
    results["dynamic_w8a8"]["x_fp32"] = results["dynamic_w8a8"]["perplexity"] / fp
    for label, path in recipes.items():
        sums = {k: sum(r[label][k] for r in runs) for k in runs[0][label]}
        fq_ppl, b_ppl = (
            ppl([r[label]["nll_fake_quant"] for r in runs]),
            ppl([r[label]["nll_bundle"] for r in runs]),
        )
        kl, floor = sums["kl_bundle_sum"] / positions, sums["kl_noise_sum"] / positions
        bar = max(KL_FLOOR_NATS, KL_FLOOR_FACTOR * floor)
        results["recipes"][label] = {
            "recipe": str(path),
            "rotate": json.loads((path / "recipe.json").read_text())["config"].get("rotate", "none"),
            "bundle": str(bundles[label]),
            "fake_quant_perplexity": fq_ppl,
            "bundle_perplexity": b_ppl,
            "fake_quant_x_fp32": fq_ppl / fp,
            "bundle_x_fp32": b_ppl / fp,
            "bundle_over_fake_quant": b_ppl / fq_ppl,
            "kl_mean": kl,
            "kl_noise_floor": floor,
            "kl_bar": bar,
            "top1_agreement": sums["top1_bundle"] / positions,
            "top1_noise_floor": sums["top1_noise"] / positions,
            "kl_ok": kl <= bar,
            "perplexity_ok": abs(b_ppl / fq_ppl - 1) <= PPL_TOLERANCE,
        }
        print(f"{label}: {results['recipes'][label]}", flush=True)

    # decode cost: interleaved rounds, one untimed warm-up each
    prompt = [int(t) for t in ids[: args.prompt_tokens]]
    timers = {label: time_bundle(b, prompt, args.new_tokens, args.threads) for label, b in bundles.items()}
    for timer in timers.values():
        timer()
    decode: dict[str, list[float]] = {label: [] for label in timers}
    for round_ in range(args.rounds):
        order = list(timers)[round_ % len(timers) :] + list(timers)[: round_ % len(timers)]
        for label in order:
            prompt_s, decode_s = timers[label]()
            decode[label].append(decode_s / args.new_tokens * 1e3)
            runs.append({"decode_round": round_, "label": label, "prompt_s": prompt_s, "decode_s": decode_s})
    first = next(iter(recipes))
    medians = {label: statistics.median(v) for label, v in decode.items()}
    results["decode"] = {
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "median_ms_per_token": medians,
        "ratio_to_first": {label: medians[label] / medians[first] for label in medians},
        "bar": DECODE_BAR,
    }
    print(f"decode: {results['decode']}", flush=True)

    peer = read_result(SIDE_BY_SIDE)
    part = (peer or {}).get("results", {}).get("ppl", {})
    llama, reference = part.get("engines", {}).get("llama.cpp"), part.get("fp32_reference")
    if llama is not None and reference is not None:
        peer_fp = part["engines"][reference]["perplexity"]
        results["llama_cpp_q8_0"] = {
            "perplexity": llama["perplexity"],
            "x_fp32": llama["perplexity"] / peer_fp,  # against that run's FP32 on the same windows
            "windows": part.get("windows"),
            "seqlen": part.get("seqlen"),
            "source": "side_by_side.json, part ppl (engine llama.cpp)",
            "fp32_there": peer_fp,
            "same_windows_as_here": part.get("windows") == len(rows) and abs(peer_fp / fp - 1) < 1e-5,
        }

    write_result(
        OUT,
        benchmark="rotation_parity",
        command=command_line(),
        threads=args.threads,
        inputs=[*model_files(fp32), *recipes.values(), *bundles.values(), *dataset_files("wikitext2")],
        runs=runs,
        statistic="perplexities pooled over every predicted position of the windows; KL(fake-quant || other) "
        "summed per position in float64 and averaged over positions; the noise floor is the fake-quant model "
        f"against itself with embeddings times (1 + {args.eps:g} N(0, 1)) (seed: window index + 1); decode: "
        "median over interleaved rounds of decode seconds / new tokens (runs: every round)",
        results=results,
        engines=("torch",),
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
