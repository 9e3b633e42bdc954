"""Routing traces of real text, and their replay through the scheduler on a modeled device.

A trace records, per token in decode order and per MoE layer, the experts the router chose and the
candidates a speculative gate (the layer's router applied to the previous MoE layer's input)
predicted. A causal model routes a token the same way in a prompt pass as in a decode step, so a
trace is recorded with whole windows and replayed one token per step. Replays execute nothing: they
drive the same ``ExpertScheduler`` a live run uses, so their figures are the modeled ones.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from moedge._errors import MoedgeError
from moedge.formats.routing import RoutingStats
from moedge.runtime.bundle_runner import BundleRunner, RoutingTrace
from moedge.runtime.costs import ModelCosts
from moedge.runtime.placement import plan_last_layers
from moedge.runtime.policies import Policy
from moedge.runtime.profiles import HardwareProfile
from moedge.runtime.scheduler import ExpertScheduler


@dataclass
class DecodeTrace:
    """Per token (decode order): chosen experts and speculative candidates of every MoE layer."""

    layers: list[int]
    chosen: np.ndarray  # tokens x layers x top_k, best first
    speculative: np.ndarray  # tokens x layers x candidates, best first; -1 where none (first MoE layer)
    num_experts: int

    def save(self, path: str | Path) -> None:
        """Write the trace as ``.npz``."""
        np.savez_compressed(
            path,
            layers=np.asarray(self.layers),
            chosen=self.chosen,
            speculative=self.speculative,
            num_experts=np.asarray(self.num_experts),
        )

    @classmethod
    def load(cls, path: str | Path) -> DecodeTrace:
        """Read a trace written by :meth:`save`."""
        with np.load(path) as z:
            return cls(
                layers=[int(x) for x in z["layers"]],
                chosen=z["chosen"],
                speculative=z["speculative"],
                num_experts=int(z["num_experts"]),
            )

    def stats(self, *, candidates: int | None = None) -> RoutingStats:
        """The routing statistics of this trace, with each layer's speculative-gate recall."""
        per_layer = {layer: self.chosen[:, i, :] for i, layer in enumerate(self.layers)}
        stats = RoutingStats.from_choices(per_layer, self.num_experts, self.chosen.shape[2])
        k = candidates or self.chosen.shape[2]
        spec = self.speculative[:, :, :k]
        found = (self.chosen[..., :, None] == spec[..., None, :]).any(axis=-1)
        stats.speculative_recall = {layer: float(found[:, i].mean()) for i, layer in enumerate(self.layers)}
        return stats

    def prefetch_recall(self, candidates: int) -> float:
        """How many of each layer's chosen experts the speculative gate's top ``candidates`` contain."""
        spec = self.speculative[:, 1:, :candidates]
        chosen = self.chosen[:, 1:, :]
        found = (chosen[..., :, None] == spec[..., None, :]).any(axis=-1)
        return float(found.mean())


def record_trace(
    runner: BundleRunner,
    token_ids: Sequence[int],
    *,
    window: int = 512,
    progress: Callable[[int, int], None] | None = None,
) -> DecodeTrace:
    """Run ``token_ids`` through the bundle in ``window``-token passes and record the routing of each token."""
    runner.manifest.require_separate_experts("a routing trace", runner.folder)
    moe = [layer.index for layer in runner.manifest.layers if layer.moe is not None]
    if not moe:
        raise MoedgeError("the bundle has no MoE layers: there is no routing to trace")
    ids = np.asarray(token_ids, dtype=np.int64)
    chosen: list[np.ndarray] = []
    spec: list[np.ndarray] = []
    starts = range(0, len(ids), window)
    for n, start in enumerate(starts):
        chunk = ids[start : start + window][None, :]
        trace = RoutingTrace()
        runner.forward(chunk, trace=trace)
        chosen.append(np.stack([trace.chosen[layer] for layer in moe], axis=1).astype(np.int16))
        cols = []
        for layer in moe:
            cand = trace.speculative.get(layer)
            if cand is None:
                cand = np.full((chunk.shape[1], runner.speculative_candidates), -1, dtype=np.int64)
            cols.append(cand)
        spec.append(np.stack(cols, axis=1).astype(np.int16))
        if progress is not None:
            progress(n + 1, len(starts))
    num_experts = runner.manifest.layers[moe[0]].moe.num_experts  # type: ignore[union-attr]
    return DecodeTrace(
        layers=moe, chosen=np.concatenate(chosen), speculative=np.concatenate(spec), num_experts=num_experts
    )


def replay(
    trace: DecodeTrace,
    costs: ModelCosts,
    policy: Policy,
    budget: int,
    profile: HardwareProfile,
    *,
    stats: RoutingStats | None,
    context: int = 512,
    plan: list[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Decode ``trace`` token by token through a scheduler; its summary (every time modeled).

    ``plan`` pins those experts instead of the policy's own placement. The summary's ``plan`` lists
    the experts the run pinned.
    """
    if trace.layers != costs.moe_layers:
        raise MoedgeError("the trace was recorded on a bundle with different MoE layers")
    sched = ExpertScheduler(costs, policy, budget, profile, stats=stats, plan=plan)
    stage_layers = sorted(costs.stages)
    moe_pos = {layer: i for i, layer in enumerate(trace.layers)}
    for t in range(trace.chosen.shape[0]):
        sched.begin_step(1, context + t)
        for layer in stage_layers:
            sched.run_stage(layer)
            i = moe_pos.get(layer)
            if i is None:
                continue
            experts = {int(e): 1 for e in trace.chosen[t, i]}
            nxt = trace.speculative[t, i + 1] if i + 1 < len(trace.layers) else None
            sched.dispatch(layer, experts, None if nxt is None else [int(e) for e in nxt])
        sched.end_step()
    out = sched.summary()
    out["device_bytes"] = sched.device_bytes(context + trace.chosen.shape[0])
    out["plan"] = sorted(sched.cache.pinned)
    return out


HAQ_GRID: dict[str, tuple[Any, ...]] = {
    "static_fraction": (1.0, 0.7, 0.5),
    "prefetch": (0, 1, 2),
    "prefetch_share": (0.25, 0.5, 1.0),
    "path_fraction": (0.5, 0.25, 0.0),
}


def half_life_decay(tokens: float) -> float:
    """The per-step LFU decay whose counts halve every ``tokens`` decode steps (1.0: no decay)."""
    return 1.0 if tokens == float("inf") else 0.5 ** (1.0 / tokens)


# The baselines' knobs (fields of ``Policy``), each grid containing the policy's default, so a tuned
# baseline is never slower on the tuning text than its default beyond the tie rule.
BASELINE_GRIDS: dict[str, dict[str, tuple[Any, ...]]] = {
    "cpu": {},  # nothing to tune
    "lru": {"per_layer": (True, False), "prefetch": (0, 1, 2, 4)},
    "lfu": {"lfu_decay": (1.0, 0.99, 0.95, 0.8)},
    "static": {"static_fraction": (1.0, 0.9, 0.75, 0.5)},
    # steps above the fewest first layers the budget lets stay on the CPU (resolved by policy_grid)
    "n-cpu-moe": {"cpu_layers": (0, 1, 2, 4)},
    "fate": {"prefetch": (1, 2, 4)},
    "moe-infinity": {
        "lfu_decay": tuple(half_life_decay(h) for h in (float("inf"), 256, 64, 16)),
        "prefetch": (1, 2, 4),
    },
}

# What the record says about grids that differ from the list, or whose knob needs reading.
TUNING_NOTES: dict[str, str] = {
    "lru": "per_layer: a per-layer LRU (mixtral-offloading) or one global LRU; prefetch: next-layer "
    "candidates from the speculative gate (0: none)",
    "lfu": "lfu_decay d: each step scales every use count by d before adding the step's uses "
    "(1: plain counts; half-life log(0.5) / log(d) tokens)",
    "static": "static_fraction: the pinned share of the budget; Fiddler keeps no dynamic cache (misses run "
    "on the CPU), so a share below 1 leaves budget unused and wins only where running more experts on the "
    "CPU, beside the GPU's hits, models faster",
    "n-cpu-moe": "cpu_layers N: the first N MoE layers' experts stay on the CPU; N from the budget-filling "
    "value (the fewest first layers the budget cannot hold beside the last ones) up by 1, 2 and 4, where a "
    "larger N leaves budget unused",
    "fate": "prefetch: next-layer candidates from the speculative gate; prefetch_share is not tuned: it "
    "only shapes haq's placement, and fate pins nothing",
    "moe-infinity": "lfu_decay: the activation window as an LFU decay with half-lives of inf, 256, 64 and "
    "16 tokens; prefetch: next-layer candidates from the recorded layer-to-layer transitions",
    "haq": "tune_haq: HAQ_GRID (prefetch_share only with prefetch), then the balancing pass on the best plan",
}


def fewest_cpu_layers(costs: ModelCosts, budget: int) -> int:
    """``n-cpu-moe``'s budget-filling N: the first MoE layers whose experts do not fit beside the last ones."""
    sizes = {k: c.bytes for k, c in costs.experts.items()}
    kept = {layer for layer, _ in plan_last_layers(costs.moe_layers, costs.num_experts, sizes, budget)}
    return len(costs.moe_layers) - len(kept)


def policy_grid(name: str, costs: ModelCosts, budget: int) -> dict[str, tuple[Any, ...]]:
    """The grid ``tune_policy`` searches for policy ``name`` at ``budget``: ``HAQ_GRID`` for haq, else
    ``BASELINE_GRIDS``, with n-cpu-moe's steps turned into N values from the budget-filling N up."""
    if name == "haq":
        return dict(HAQ_GRID)
    if name not in BASELINE_GRIDS:
        raise MoedgeError(f"no tuning grid for policy {name!r}: use one of haq, {', '.join(BASELINE_GRIDS)}")
    grid = dict(BASELINE_GRIDS[name])
    if "cpu_layers" in grid:
        first, layers = fewest_cpu_layers(costs, budget), len(costs.moe_layers)
        grid["cpu_layers"] = tuple(sorted({min(first + step, layers) for step in grid["cpu_layers"]}))
    return grid


def _short(trace: DecodeTrace, tokens: int) -> DecodeTrace:
    return DecodeTrace(trace.layers, trace.chosen[:tokens], trace.speculative[:tokens], trace.num_experts)


def tune_policy(
    trace: DecodeTrace,
    costs: ModelCosts,
    budget: int,
    profile: HardwareProfile,
    *,
    base: Policy,
    grid: dict[str, tuple[Any, ...]],
    stats: RoutingStats | None = None,
    tokens: int = 512,
    tie: float = 0.01,
) -> tuple[Policy, dict[str, Any]]:
    """The setting of ``grid`` (``Policy`` field -> values) with the lowest modeled decode latency when
    ``base`` so set replays ``trace``'s first ``tokens`` tokens, and that replay's summary.

    Settings within ``tie`` of the fastest are ranked by the per-layer hit-rate spread, then latency;
    exact ties go to the earliest in grid order (``itertools.product`` over the fields in order). A
    ``prefetch_share`` other than its first value is skipped where ``prefetch`` is 0 (it only matters
    with prefetch). An empty grid replays ``base`` as it is. Tune on one text and evaluate on another:
    the statistics come from the same trace.
    """
    short = _short(trace, tokens)
    stats = stats if stats is not None else trace.stats()
    fields = list(grid)
    results: list[tuple[float, float, Policy, dict[str, Any]]] = []
    for values in itertools.product(*(grid[k] for k in fields)):
        setting = dict(zip(fields, values, strict=True))
        if (
            "prefetch_share" in setting
            and not setting.get("prefetch", base.prefetch)
            and setting["prefetch_share"] != grid["prefetch_share"][0]
        ):
            continue  # the share only matters with prefetch
        policy = replace(base, **setting)
        summary = replay(short, costs, policy, budget, profile, stats=stats)
        results.append((summary["modeled_decode_ms"]["mean"], summary["hit_rate_layer_std"], policy, summary))
    best = min(r[0] for r in results)
    _, _, policy, summary = min((r for r in results if r[0] <= best * (1 + tie)), key=lambda r: (r[1], r[0]))
    return policy, summary


def tune_haq(
    trace: DecodeTrace,
    costs: ModelCosts,
    budget: int,
    profile: HardwareProfile,
    *,
    base: Policy,
    stats: RoutingStats | None = None,
    tokens: int = 512,
    tie: float = 0.01,
) -> tuple[Policy, dict[str, Any]]:
    """The ``haq`` settings with the lowest modeled decode latency on ``trace`` (the profiling text).

    ``tune_policy`` over ``HAQ_GRID`` (settings within ``tie`` of the fastest ranked by the per-layer
    hit-rate spread), then ``balance_plan`` on the chosen setting's plan. Tune on one text and evaluate
    on another: the statistics come from the same trace.
    """
    stats = stats if stats is not None else trace.stats()
    policy, summary = tune_policy(
        trace, costs, budget, profile, base=base, grid=HAQ_GRID, stats=stats, tokens=tokens, tie=tie
    )
    if policy.static_fraction > 0:
        short = _short(trace, tokens)
        summary = balance_plan(short, costs, policy, budget, profile, stats=stats, start=summary)
    return policy, summary


def balance_plan(
    trace: DecodeTrace,
    costs: ModelCosts,
    policy: Policy,
    budget: int,
    profile: HardwareProfile,
    *,
    stats: RoutingStats,
    start: dict[str, Any],
    rounds: int = 10,
    slack: float = 0.005,
) -> dict[str, Any]:
    """Even out per-layer hit rates as measured on ``trace``: move a pinned expert from a layer that hits
    most to one that hits least while the spread shrinks and latency grows by under ``slack``.

    The placement's top-up balances *expected* rates; prefetch and the dynamic cache make the real ones
    differ, so this second pass balances what the replay measures. Returns the best replay's summary.
    """
    best = start
    for _ in range(rounds):
        rates = {int(k): v for k, v in best["hit_rate_per_layer"].items()}
        order = sorted(rates, key=lambda layer: rates[layer])
        plan = [tuple(k) for k in best["plan"]]
        tried: list[dict[str, Any]] = []
        for high in reversed(order[-2:]):
            for low in order[:2]:
                mine = [k for k in plan if k[0] == high]
                free = [
                    (low, int(e))
                    for e in np.argsort(-stats.counts[low], kind="stable")
                    if (low, int(e)) not in plan
                ]
                if not mine or not free:
                    continue
                drop = min(mine, key=lambda k: int(stats.counts[high][k[1]]))
                moved = [k for k in plan if k != drop] + [free[0]]
                if sum(costs.experts[k].bytes for k in moved) > budget:
                    continue
                tried.append(replay(trace, costs, policy, budget, profile, stats=stats, plan=moved))
        better = [
            t
            for t in tried
            if t["hit_rate_layer_std"] < best["hit_rate_layer_std"]
            and t["modeled_decode_ms"]["mean"] <= start["modeled_decode_ms"]["mean"] * (1 + slack)
        ]
        if not better:
            break
        best = min(better, key=lambda t: t["hit_rate_layer_std"])
    return best
