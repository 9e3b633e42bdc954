"""Placement plans: which experts live on the GPU for good, chosen from routing statistics.

``haq`` is the two-stage placement of arXiv:2508.07329: first cover the most frequent whole-depth
expert paths (so a token that follows a common path finds every layer's expert resident), then top
up the layer whose expected hit rate is lowest, one expert at a time, which keeps the hit rate even
across layers. ``popularity`` (Fiddler) takes the most used experts anywhere; ``last-layers``
(llama.cpp ``--n-cpu-moe``) keeps whole layers' experts on the GPU from the last layer down.
A plan is a JSON file (``moedge profile --plan``) that ``static`` and ``haq`` policies load.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from moedge._errors import MoedgeError
from moedge.runtime.cache import ExpertKey
from moedge.runtime.routing import RoutingStats

PLAN_FORMAT = "moedge-placement"


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


def write_plan(
    path: str | Path,
    experts: list[ExpertKey],
    *,
    budget: int,
    policy: str,
    settings: dict[str, Any],
    source: dict[str, Any],
) -> None:
    """Write a placement plan file: the pinned experts and the policy settings they were tuned with."""
    doc = {
        "format": PLAN_FORMAT,
        "version": 1,
        "policy": policy,
        "budget_bytes": int(budget),
        "settings": settings,
        "experts": [list(k) for k in experts],
        "source": source,
    }
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


# settings a plan may carry, with a check of each value (what the haq tuner writes)
_SETTINGS: dict[str, tuple[str, Any]] = {
    "static_fraction": ("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1),
    "prefetch": ("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "prefetch_share": ("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1),
    "path_fraction": ("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1),
    "topup": ("balanced or popular", lambda v: v in ("balanced", "popular")),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def bundle_experts(manifest: Any) -> dict[int, int]:
    """Routed experts per MoE layer of a bundle manifest: {layer index: number of experts}."""
    return {layer.index: layer.moe.num_experts for layer in manifest.layers if layer.moe is not None}


def check_experts(
    experts: Iterable[ExpertKey], bundle: Mapping[int, int], where: str, *, what: str = "entry"
) -> None:
    """Raise one clear line for the first (layer, expert) that is not a routed expert of the bundle."""
    seen: set[ExpertKey] = set()
    for i, (layer, e) in enumerate(experts):
        if layer not in bundle:
            moe = ", ".join(map(str, sorted(bundle))) or "none"
            raise MoedgeError(
                f"{where}: {what} {i} names expert [{layer}, {e}], but layer {layer} is not an MoE layer "
                f"of the bundle (MoE layers: {moe}): was it made for another bundle?"
            )
        if not 0 <= e < bundle[layer]:
            raise MoedgeError(
                f"{where}: {what} {i} names expert [{layer}, {e}], but layer {layer} has experts "
                f"0-{bundle[layer] - 1}: was it made for another bundle?"
            )
        if (layer, e) in seen:
            raise MoedgeError(f"{where}: {what} {i} names expert [{layer}, {e}] a second time")
        seen.add((layer, e))


def read_plan_file(
    path: str | Path, *, experts: Mapping[int, int] | None = None
) -> tuple[list[ExpertKey], dict[str, Any]]:
    """The experts a plan file pins and its policy settings; one clear error for a file that is not a plan.

    The file is read only when it is a regular file of at most 64 MiB; its format, version, experts and
    settings are checked, and with ``experts`` (``bundle_experts`` of the bundle it is for) every pinned
    expert must be one of the bundle's.
    """
    from moedge.inputs import read_input_json

    file = Path(path)
    doc = read_input_json(file, "placement plan")
    where = f"placement plan {file}"
    if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
        raise MoedgeError(f"{file} is not a moedge placement plan: write one with `moedge profile --plan`")
    version = doc.get("version", 1)
    if version != 1:
        raise MoedgeError(f"{where}: version {version!r} is not one this moedge reads (1)")
    raw = doc.get("experts")
    if not isinstance(raw, list):
        raise MoedgeError(f"{where}: field experts must be a list of [layer, expert] pairs")
    pinned: list[ExpertKey] = []
    for i, pair in enumerate(raw):
        if not (isinstance(pair, list) and len(pair) == 2 and all(_is_index(x) for x in pair)):
            raise MoedgeError(
                f"{where}: experts entry {i} is {json.dumps(pair)[:60]}, not a [layer, expert] pair of "
                "integers >= 0"
            )
        pinned.append((int(pair[0]), int(pair[1])))
    budget = doc.get("budget_bytes")
    if budget is not None and not _is_index(budget):
        raise MoedgeError(f"{where}: field budget_bytes must be an integer >= 0, got {budget!r}")
    settings = doc.get("settings", {})
    if not isinstance(settings, dict):
        raise MoedgeError(f"{where}: field settings must be an object")
    for key, value in settings.items():
        if key not in _SETTINGS:
            raise MoedgeError(f"{where}: unknown setting {key!r} (known: {', '.join(_SETTINGS)})")
        want, ok = _SETTINGS[key]
        if not ok(value):
            raise MoedgeError(f"{where}: setting {key} must be {want}, got {json.dumps(value)[:40]}")
    if experts is not None:
        check_experts(pinned, experts, where, what="experts entry")
    return pinned, dict(settings)
