"""How far two correct implementations of the same W8A8 model can disagree: the noise floor of parity.

Static int8 activations turn float rounding differences (1e-7 relative, e.g. another matmul kernel)
into whole quantization steps wherever a value sits near a rounding boundary, and the steps compound
over layers (and flip near-tie routing decisions). This measures it inside PyTorch alone: the model's
top-1 agreement with itself when its embeddings are perturbed by a relative 1e-6, for FP32 and for the
recipe's fake-quant model, on the first windows of WikiText-2. Any bundle-vs-PyTorch W8A8 parity figure
should be read against this floor. Writes benchmarks/results/quant_noise_floor_<model>.json.

    MOEDGE_DATA=../shared/data .venv/bin/python benchmarks/quant_noise_floor.py --model smollm2-135m-moe \
        --recipe ~/.cache/moedge/recipes/smollm2-135m-moe-haq
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from provenance import command_line, dataset_files, model_files, write_result

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    """Measure FP32 and W8A8 self-agreement under a 1e-6 relative perturbation."""
    import torch

    from moedge.calibration import apply_recipe
    from moedge.datasets import load_text, windows
    from moedge.evaluation import window_nll
    from moedge.loading import load_model

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-moe")
    parser.add_argument("--recipe", type=Path, required=True)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--eps", default="1e-7,1e-6", help="relative perturbations, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    ids = np.asarray(loaded.encode(load_text("wikitext2").text), dtype=np.int64)
    wins = windows(ids, 512, max_windows=args.windows)

    def logits(w: np.ndarray, eps: float) -> np.ndarray:
        emb = loaded.model.get_input_embeddings()  # type: ignore[operator]
        noise = torch.Generator().manual_seed(1)
        handle = emb.register_forward_hook(
            lambda _m, _a, out: out * (1 + eps * torch.randn(out.shape, generator=noise))
        )
        try:
            with torch.no_grad():
                return loaded.model(input_ids=torch.from_numpy(w)[None], use_cache=False).logits[0].numpy()
        finally:
            handle.remove()

    runs: list[dict[str, Any]] = []

    def measure(eps: float, precision: str) -> dict[str, Any]:
        agree = positions = 0
        nll = {"clean": 0.0, "perturbed": 0.0}
        for i, w in enumerate(wins):
            clean, noisy = logits(w, 0.0), logits(w, eps)
            run = {
                "precision": precision,
                "eps": eps,
                "window": i,
                "positions": len(w) - 1,
                "top1_agree": int((clean[:-1].argmax(-1) == noisy[:-1].argmax(-1)).sum()),
                "nll_clean": window_nll(clean, w),
                "nll_perturbed": window_nll(noisy, w),
            }
            runs.append(run)
            agree += run["top1_agree"]
            positions += run["positions"]
            nll["clean"] += run["nll_clean"]
            nll["perturbed"] += run["nll_perturbed"]
        ppl = {k: float(np.exp(v / positions)) for k, v in nll.items()}
        return {
            "top1_agreement": agree / positions,
            "perplexity": ppl,
            "ppl_ratio": ppl["perturbed"] / ppl["clean"],
        }

    eps_values = [float(e) for e in args.eps.split(",")]
    record: dict[str, Any] = {"model": args.model, "windows": len(wins), "seqlen": 512}
    record["fp32"] = {f"{e:g}": measure(e, "fp32") for e in eps_values}
    print(f"fp32: {record['fp32']}", flush=True)
    apply_recipe(loaded, args.recipe)
    record["w8a8"] = {f"{e:g}": measure(e, "w8a8") for e in eps_values}
    record["recipe"] = str(args.recipe)
    print(f"w8a8: {record['w8a8']}", flush=True)
    out = RESULTS / f"quant_noise_floor_{args.model}.json"
    write_result(
        out,
        benchmark="quant_noise_floor",
        command=command_line(),
        threads=args.threads,
        inputs=[*model_files(loaded), args.recipe, *dataset_files("wikitext2")],
        runs=runs,
        statistic="one clean and one perturbed pass per window (seed 1 noise); top-1 agreement and "
        "perplexities pooled over every predicted position of the windows (runs: per-window counts and NLL sums)",
        results=record,
        engines=("torch",),
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
