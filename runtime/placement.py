"""Placement plans: which experts live on the GPU for good, chosen from routing statistics.

``haq`` is the two-stage placement of arXiv:2508.07329: first cover the most frequent whole-depth
expert paths (so a token that follows a common path finds every layer's expert resident), then top
up the layer whose expected hit rate is lowest, one expert at a time, which keeps the hit rate even
across layers. ``popularity`` (Fiddler) takes the most used experts anywhere; ``last-layers``
(llama.cpp ``--n-cpu-moe``) keeps whole layers' experts on the GPU from the last layer down.
A plan is a JSON file (``moedge profile --plan``) that ``static`` and ``haq`` policies load; its
writer and reader are ``moedge.formats.placement_plan``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from moedge._errors import MoedgeError
from moedge.formats.routing import RoutingStats
from moedge.runtime.cache import ExpertKey


def _fits(
    chosen: set[ExpertKey], sizes: dict[ExpertKey, int], key: ExpertKey, budget: int, used: int
) -> bool:
    return key not in chosen and used + sizes[key] <= budget


def plan_popularity(stats: RoutingStats, sizes: dict[ExpertKey, int], budget: int) -> list[ExpertKey]:
    """The most used experts of any layer, most used first, while they fit."""
    ranked = sorted(
        ((int(stats.counts[layer][e]), layer, e) for layer in stats.layers for e in range(stats.num_experts)),
        reverse=True,
    )
    chosen: list[ExpertKey] = []
    used = 0
    for _, layer, e in ranked:
        if used + sizes[(layer, e)] <= budget:
            chosen.append((layer, e))
            used += sizes[(layer, e)]
    return chosen


def plan_last_layers(
    layers: Iterable[int], num_experts: int, sizes: dict[ExpertKey, int], budget: int
) -> list[ExpertKey]:
    """Every expert of the last layers, whole layers only, while they fit (the first N stay on the CPU)."""
    chosen: list[ExpertKey] = []
    used = 0
    for layer in sorted(layers, reverse=True):
        keys = [(layer, e) for e in range(num_experts)]
        size = sum(sizes[k] for k in keys)
        if used + size > budget:
            break
        chosen += keys
        used += size
    return chosen


def plan_haq(
    stats: RoutingStats,
    sizes: dict[ExpertKey, int],
    budget: int,
    *,
    path_fraction: float = 0.5,
    prefetch_share: float = 0.0,
    topup: str = "balanced",
) -> list[ExpertKey]:
    """Two-stage placement: frequent whole-depth paths within ``path_fraction`` of the budget, then per-layer top-up.

    The top-up raises the layer with the lowest expected hit rate first. With prefetch, a layer's
    expected rate also counts the misses its speculative gate recovers (``stats.speculative_recall``),
    up to ``prefetch_share`` of its routed experts (what the link can move per layer; the policy
    tuner measures it), so layers the gate predicts badly (always the first MoE layer) get more
    resident experts. ``topup="popular"`` fills the rest by use count instead (most hits per byte,
    uneven across layers); the tuner keeps whichever models faster on the profile.
    """
    chosen: list[ExpertKey] = []
    members: set[ExpertKey] = set()
    used = 0
    path_budget = int(budget * path_fraction)
    for path, _ in stats.paths:
        new = [(layer, e) for layer, e in zip(stats.layers, path, strict=True) if (layer, e) not in members]
        cost = sum(sizes[k] for k in new)
        if used + cost > path_budget:
            continue
        chosen += new
        members.update(new)
        used += cost
    if topup == "popular":
        for key in plan_popularity(stats, sizes, budget):
            if _fits(members, sizes, key, budget, used):
                chosen.append(key)
                members.add(key)
                used += sizes[key]
        return chosen
    if topup != "balanced":
        raise MoedgeError(f"unknown top-up {topup!r}: use balanced or popular")
    totals = {layer: max(int(stats.counts[layer].sum()), 1) for layer in stats.layers}
    covered = {
        layer: sum(int(stats.counts[m][e]) for m, e in members if m == layer) for layer in stats.layers
    }
    recall = {layer: stats.speculative_recall.get(layer, 0.0) for layer in stats.layers}
    if stats.layers:
        recall[stats.layers[0]] = 0.0  # nothing runs before the first MoE layer's router to predict it
    while True:
        best: tuple[float, int, int] | None = None
        for layer in stats.layers:
            order = np.argsort(-stats.counts[layer], kind="stable")
            for e in order:
                key = (layer, int(e))
                if _fits(members, sizes, key, budget, used):
                    cov = covered[layer] / totals[layer]
                    rate = cov + min(prefetch_share, (1.0 - cov) * recall[layer])
                    if best is None or rate < best[0]:
                        best = (rate, layer, int(e))
                    break
        if best is None:
            break
        _, layer, e = best
        chosen.append((layer, e))
        members.add((layer, e))
        used += sizes[(layer, e)]
        covered[layer] += int(stats.counts[layer][e])
    return chosen
