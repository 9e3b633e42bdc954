"""The MoE test bed against its dense source: FP32 perplexity and routing statistics.

Reproduce (about 25 minutes on 2 cores for the full WikiText-2 raw test):

    MOEDGE_DATA=../shared/data .venv/bin/python benchmarks/testbed_report.py

Writes ``benchmarks/results/testbed_report.json`` and ``testbed_routing.png``.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from provenance import command_line, dataset_files, model_files, write_result

from moedge.datasets import load_text, windows
from moedge.evaluation import perplexity, torch_logits
from moedge.loading import load_model

RESULTS = Path(__file__).parent / "results"


def routing_statistics(loaded, ids: np.ndarray, *, seqlen: int, max_windows: int) -> dict:
    """Per-layer expert load and cross-layer path concentration over real text (top-k choices per token)."""
    layers = loaded.model.model.layers
    num_experts = loaded.model.config.num_local_experts
    picks: list[list[np.ndarray]] = [[] for _ in layers]
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda _m, _a, out, i=i: picks[i].append(out[2].numpy().copy()))
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            for row in windows(ids, seqlen, max_windows=max_windows):
                loaded.model(input_ids=torch.from_numpy(row)[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    topk = [np.concatenate(p) for p in picks]  # layer -> (tokens, k)
    tokens = topk[0].shape[0]
    load = np.stack([np.bincount(t.ravel(), minlength=num_experts) / t.size for t in topk])  # layer x expert
    top1 = np.stack([t[:, 0] for t in topk], axis=1)  # tokens x layers

    def entropy(p: np.ndarray) -> float:
        p = p[p > 0]
        return float(-(p * np.log2(p)).sum())

    # layer-to-layer: how predictable is the next layer's top-1 expert from this layer's?
    follow = []
    for i in range(len(layers) - 1):
        pairs = collections.Counter(zip(top1[:, i].tolist(), top1[:, i + 1].tolist(), strict=True))
        best: dict[int, int] = collections.defaultdict(int)
        for (a, _b), n in pairs.items():
            best[a] = max(best[a], n)
        follow.append(sum(best.values()) / tokens)
    paths = collections.Counter(map(tuple, top1.tolist()))
    ranked = [n for _, n in paths.most_common()]
    segments = collections.Counter(
        tuple(r) for r in np.concatenate([top1[:, i : i + 4] for i in range(len(layers) - 3)]).tolist()
    )
    seg_ranked = [n for _, n in segments.most_common()]
    seg_total = sum(seg_ranked)
    return {
        "tokens": tokens,
        "top_k": int(topk[0].shape[1]),
        "load_per_layer_expert": load.round(4).tolist(),
        "load_max_over_mean_per_layer": (load.max(axis=1) * num_experts).round(3).tolist(),
        "load_entropy_bits_per_layer": [round(entropy(row), 3) for row in load],
        "uniform_entropy_bits": math.log2(num_experts),
        "next_layer_top1_predictability": [round(f, 3) for f in follow],
        "whole_depth_top1_paths": {
            "distinct": len(paths),
            "coverage_top10": round(sum(ranked[:10]) / tokens, 4),
            "coverage_top100": round(sum(ranked[:100]) / tokens, 4),
        },
        "four_layer_top1_segments": {
            "possible": num_experts**4,
            "distinct": len(segments),
            "coverage_top16": round(sum(seg_ranked[:16]) / seg_total, 4),
            "coverage_top64": round(sum(seg_ranked[:64]) / seg_total, 4),
            "coverage_if_uniform_top64": round(64 / num_experts**4, 4),
        },
    }


def plot(load: list[list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 7))
    im = ax.imshow(np.asarray(load), aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title("smollm2-135m-moe: share of routed slots per expert\n(WikiText-2 raw test, top-2)")
    fig.colorbar(im, ax=ax, label="share of the layer's top-2 slots")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-windows", type=int, help="default: the full WikiText-2 raw test")
    parser.add_argument("--routing-windows", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS / "testbed_report.json")
    args = parser.parse_args()

    text = load_text("wikitext2")
    report: dict = {
        "protocol": {
            "dataset": text.origin,
            "seqlen": args.seqlen,
            "max_windows": args.max_windows,
            "routing_windows": args.routing_windows,
        },
    }
    runs: list[dict] = []
    inputs: list[Path] = []
    for name in ("smollm2-135m", "smollm2-135m-moe"):
        reuse = RESULTS / "smollm2_wikitext2_pytorch.json"
        if name == "smollm2-135m" and reuse.is_file():
            # `moedge eval smollm2-135m --data wikitext2 --json ...` measured it with the same function
            record = json.loads(reuse.read_text())
            if record["seqlen"] == args.seqlen and (
                args.max_windows is None or record["windows"] == args.max_windows
            ):
                report[name] = {"perplexity": record, "reused_from": str(reuse)}
                runs.append({"model": name, "measure": "perplexity", "reused_from": str(reuse), **record})
                inputs.append(reuse)
                print(name, "reused", reuse, flush=True)
                continue
        loaded = load_model(name)
        ids = np.asarray(loaded.encode(text.text), dtype=np.int64)
        start = time.perf_counter()
        result = perplexity(
            torch_logits(loaded.model),
            ids,
            seqlen=args.seqlen,
            max_windows=args.max_windows,
            dataset="wikitext2",
            backend="pytorch fp32",
        )
        entry = {
            "perplexity": result.to_dict(),
            "provenance": loaded.provenance,
            "seconds": time.perf_counter() - start,
        }
        runs.append({"model": name, "measure": "perplexity", **result.to_dict(), "seconds": entry["seconds"]})
        inputs += model_files(loaded)
        if name.endswith("-moe"):
            start = time.perf_counter()
            entry["routing"] = routing_statistics(
                loaded, ids, seqlen=args.seqlen, max_windows=args.routing_windows
            )
            runs.append(
                {
                    "model": name,
                    "measure": "routing statistics",
                    "windows": args.routing_windows,
                    "tokens": entry["routing"]["tokens"],
                    "seconds": time.perf_counter() - start,
                }
            )
        report[name] = entry
        print(name, result.summary(), flush=True)
        del loaded
    dense = report["smollm2-135m"]["perplexity"]["perplexity"]
    moe = report["smollm2-135m-moe"]["perplexity"]["perplexity"]
    report["moe_over_dense"] = moe / dense
    write_result(
        args.out,
        benchmark="testbed_report",
        command=command_line(),
        threads=torch.get_num_threads(),
        inputs=[*dataset_files("wikitext2"), *inputs],
        runs=runs,
        statistic="one deterministic PyTorch FP32 pass per model (runs: each evaluation and the routing "
        "pass): perplexity pooled over every predicted token of the windows; routing loads and coverages "
        "counted over every token of the first routing_windows windows",
        results=report,
        engines=("torch",),
    )
    plot(
        report["smollm2-135m-moe"]["routing"]["load_per_layer_expert"],
        args.out.with_name("testbed_routing.png"),
    )
    print(f"MoE / dense perplexity: {moe / dense:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
