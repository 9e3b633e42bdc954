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


HAQ_GRID: dict[str, tuple[float, ...]] = {
    "static_fraction": (1.0, 0.7, 0.5),
    "prefetch": (0, 1, 2),
    "prefetch_share": (0.25, 0.5, 1.0),
    "path_fraction": (0.5, 0.25, 0.0),
}


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

    Settings within ``tie`` of the fastest are ranked by the per-layer hit-rate spread. Tune on one
    text and evaluate on another: the statistics come from the same trace.
    """
    short = DecodeTrace(trace.layers, trace.chosen[:tokens], trace.speculative[:tokens], trace.num_experts)
    stats = stats if stats is not None else trace.stats()
    results: list[tuple[float, float, Policy, dict[str, Any]]] = []
    grid = itertools.product(
        HAQ_GRID["static_fraction"],
        HAQ_GRID["prefetch"],
        HAQ_GRID["prefetch_share"],
        HAQ_GRID["path_fraction"],
    )
    for fraction, prefetch, share, paths in grid:
        if not prefetch and share != HAQ_GRID["prefetch_share"][0]:
            continue  # the share only matters with prefetch
        policy = replace(
            base,
            static_fraction=float(fraction),
            prefetch=int(prefetch),
            prefetch_share=float(share),
            path_fraction=float(paths),
        )
        summary = replay(short, costs, policy, budget, profile, stats=stats)
        results.append((summary["modeled_decode_ms"]["mean"], summary["hit_rate_layer_std"], policy, summary))
    best = min(r[0] for r in results)
    _, _, policy, summary = min((r for r in results if r[0] <= best * (1 + tie)), key=lambda r: (r[1], r[0]))
    if policy.static_fraction > 0:
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
