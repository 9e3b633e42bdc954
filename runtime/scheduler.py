"""Expert scheduling: per layer, which experts run on the GPU, which on the CPU, what to move, and when.

One ``ExpertScheduler`` serves both a live run (the runner executes its decisions) and a replay of a
recorded routing trace (``benchmarks/runtime_bench.py``): it keeps the GPU expert cache under its byte
budget and a modeled clock on a hardware profile. Per layer: the stage graph runs on the GPU; when
the router's choices are known, each chosen expert is a hit (resident and ready), a transfer (copy
it, then run it on the GPU) or a CPU miss, as the policy and the latency predictor decide; GPU work
and CPU work overlap and the layer ends when both have. A policy with prefetch then issues copies of
the next layer's likely experts (a speculative gate: the next layer's router applied to this
layer's MoE input), which land while this layer computes. Every time here is modeled, never measured.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moedge._errors import MoedgeError
from moedge.formats.routing import RoutingStats
from moedge.runtime.cache import ExpertCache, ExpertKey, check_budget
from moedge.runtime.costs import ModelCosts
from moedge.runtime.placement import plan_haq, plan_last_layers, plan_popularity
from moedge.runtime.policies import Policy
from moedge.runtime.predictor import LatencyPredictor
from moedge.runtime.profiles import HardwareProfile

log = logging.getLogger(__name__)


@dataclass
class StepRecord:
    """One forward step as the scheduler saw it."""

    tokens: int
    decode: bool
    modeled_seconds: float = 0.0
    bytes_moved: int = 0


@dataclass
class SchedulerStats:
    """Counters of a run (decode steps only for hit rates, prefetch and per-token figures)."""

    hits: dict[int, int] = field(default_factory=dict)
    routed: dict[int, int] = field(default_factory=dict)
    cpu_runs: int = 0
    gpu_runs: int = 0
    transfers: int = 0
    bytes_moved: int = 0
    prefetch_issued: int = 0
    prefetch_recall_num: int = 0
    prefetch_recall_den: int = 0
    steps: list[StepRecord] = field(default_factory=list)


class ExpertScheduler:
    """The cache, the predictor and a modeled clock for one run of a bundle under one policy and budget."""

    def __init__(
        self,
        costs: ModelCosts,
        policy: Policy,
        budget: int,
        profile: HardwareProfile,
        *,
        stats: RoutingStats | None = None,
        plan: list[ExpertKey] | None = None,
        predictor: LatencyPredictor | None = None,
        on_admit: Callable[[ExpertKey], None] | None = None,
        on_evict: Callable[[ExpertKey], None] | None = None,
    ) -> None:
        self.costs = costs
        self.policy = policy
        self.profile = profile
        self.routing = stats
        self.predictor = predictor or LatencyPredictor(profile, int8=costs.int8)
        sizes = {k: c.bytes for k, c in costs.experts.items()}
        if policy.placement == "all":
            budget = sum(sizes.values())
        self.budget = budget
        if policy.name != "cpu":
            check_budget(budget, sizes)
        pinned = self._placement(policy, budget, sizes, stats, plan)
        per_layer_slots = None
        if policy.per_layer and costs.moe_layers:
            mean = sum(sizes.values()) / len(sizes)
            slots = int(budget / (len(costs.moe_layers) * mean) + 1e-4)  # the byte budget still rules
            per_layer_slots = slots if slots >= 1 else None  # under one slot per layer: one global LRU
        self.per_layer_slots = per_layer_slots
        self.cache = ExpertCache(
            budget if policy.name != "cpu" else 0,
            sizes,
            pinned=pinned,
            eviction=policy.eviction,
            per_layer_slots=per_layer_slots,
            lfu_decay=policy.lfu_decay,
            on_admit=on_admit,
            on_evict=on_evict,
        )
        self.clock = 0.0
        self.copy_free = 0.0
        self.stats = SchedulerStats()
        self._step: StepRecord | None = None
        self._context = 0
        self._candidates: dict[int, list[int]] = {}

    def _placement(
        self,
        policy: Policy,
        budget: int,
        sizes: dict[ExpertKey, int],
        stats: RoutingStats | None,
        plan: list[ExpertKey] | None,
    ) -> list[ExpertKey]:
        static_budget = int(budget * policy.static_fraction)
        if policy.placement == "none":
            return []
        if policy.placement == "all":
            return list(sizes)
        if policy.placement == "last-layers":  # the first cpu_layers MoE layers stay on the CPU
            layers = self.costs.moe_layers[policy.cpu_layers or 0 :]
            return plan_last_layers(layers, self.costs.num_experts, sizes, budget)
        if plan is not None:
            total = sum(sizes[k] for k in plan)
            if total > budget:
                raise MoedgeError(
                    f"the placement plan needs {total:,} bytes, more than the budget of {budget:,}"
                )
            return list(plan)
        if stats is None and policy.placement == "haq":
            log.warning(
                "no routing statistics: haq runs without a pinned placement (run `moedge profile BUNDLE`)"
            )
            return []
        if stats is None:
            raise MoedgeError(
                f"policy {policy.name!r} places experts from routing statistics: the bundle has no routing.json; "
                "run `moedge profile BUNDLE` or pass --plan"
            )
        if policy.placement == "popularity":
            return plan_popularity(stats, sizes, static_budget)
        share = policy.prefetch_share if policy.prefetch else 0.0
        return plan_haq(
            stats,
            sizes,
            static_budget,
            path_fraction=policy.path_fraction,
            prefetch_share=share,
            topup=policy.topup,
        )

    # --- one forward step -------------------------------------------------------------------------
    def begin_step(self, tokens: int, context: int, *, rows: int = 1) -> None:
        """Start a forward step over ``tokens`` new tokens (all ``rows`` of a batch) after ``context`` cached ones.

        A step is a decode step when each row adds one token.
        """
        self._step = StepRecord(tokens=tokens, decode=tokens == rows, modeled_seconds=self.clock)
        self._context = context * rows
        self.cache.step()  # LFU counts decay per step (a no-op without a decay)
        self.clock += self.profile.gpu_call_overhead  # embedding gather

    def run_stage(self, layer: int) -> None:
        """The layer's stage graph on the GPU (attention reads the KV cache)."""
        assert self._step is not None
        cost = self.costs.stages[layer]
        kv = (
            self.costs.kv_bytes_per_token
            / max(len(self.costs.stages), 1)
            * (self._context + self._step.tokens)
        )
        self.clock += self.predictor.gpu(cost, self._step.tokens) + kv / self.profile.gpu_mem_bandwidth

    def _queue_transfer(self, key: ExpertKey, now: float) -> float:
        start = max(now, self.copy_free)
        ready = start + self.predictor.transfer(self.costs.experts[key])
        self.copy_free = ready
        self.stats.transfers += 1
        self.stats.bytes_moved += self.costs.experts[key].bytes
        if self._step is not None:
            self._step.bytes_moved += self.costs.experts[key].bytes
        return ready

    def dispatch(
        self, layer: int, experts: dict[int, int], speculative_next: Sequence[int] | None = None
    ) -> dict[int, str]:
        """Decide where each chosen expert (expert -> routed tokens) runs, advance the clock; 'gpu' or 'cpu'."""
        assert self._step is not None
        decode = self._step.decode
        now = self.clock
        protect = {(layer, e) for e in experts}
        where: dict[int, str] = {}
        gpu_jobs: list[tuple[float, float, int]] = []  # (ready, seconds, bytes)
        cpu_seconds = 0.0
        cpu_bytes = 0
        policy = self.policy
        if decode and layer in self._candidates:
            cands = set(self._candidates.pop(layer))
            self.stats.prefetch_recall_num += len(cands & set(experts))
            self.stats.prefetch_recall_den += len(experts)
        for e in sorted(experts):
            key = (layer, e)
            n = experts[e]
            cost = self.costs.experts[key]
            g = self.predictor.gpu(cost, n)
            c = self.predictor.cpu(cost, n)
            hit = self.cache.is_ready(key, now)
            if decode:
                self.stats.routed[layer] = self.stats.routed.get(layer, 0) + 1
                self.stats.hits[layer] = self.stats.hits.get(layer, 0) + int(hit)
            if hit:
                where[e] = "gpu"
                gpu_jobs.append((now, g, cost.bytes))
            elif key in self.cache:  # a transfer in flight
                ready = self.cache.ready[key]
                if policy.miss == "cpu" or (policy.miss == "predict" and c < ready - now + g):
                    where[e] = "cpu"
                else:
                    where[e] = "gpu"
                    gpu_jobs.append((ready, g, cost.bytes))
            else:
                go = policy.miss == "transfer"
                if policy.miss == "predict":
                    start = max(now, self.copy_free)
                    go = start + self.predictor.transfer(cost) - now + g < c
                if go and self.cache.admit(key, math.inf, now=now, protect=protect):
                    ready = self._queue_transfer(key, now)
                    self.cache.ready[key] = ready
                    where[e] = "gpu"
                    gpu_jobs.append((ready, g, cost.bytes))
                else:
                    where[e] = "cpu"
            if where[e] == "cpu":
                cpu_seconds += c
                cpu_bytes += cost.bytes
                self.stats.cpu_runs += 1
            else:
                self.cache.touch(key)
                self.stats.gpu_runs += 1
        gpu_t = now
        for ready, seconds, _ in sorted(gpu_jobs):
            gpu_t = max(gpu_t, ready) + seconds
        end = max(gpu_t, now + cpu_seconds)
        if self.profile.unified_memory and self.profile.shared_memory_bandwidth:
            moved = cpu_bytes + sum(b for _, _, b in gpu_jobs)
            end = max(end, now + moved / self.profile.shared_memory_bandwidth)
        if policy.prefetch and policy.prefetch_from == "transitions":
            speculative_next = self._from_transitions(layer, experts)
        if policy.prefetch and speculative_next is not None:
            self._prefetch(layer, speculative_next, now, protect, end)
        self.clock = end
        return where

    def _from_transitions(self, layer: int, experts: dict[int, int]) -> list[int] | None:
        """The next layer's experts most often chosen after this layer's choices (routing statistics)."""
        pos = self.costs.moe_layers.index(layer)
        if self.routing is None or pos + 1 >= len(self.costs.moe_layers):
            return None
        matrix = self.routing.transitions.get((layer, self.costs.moe_layers[pos + 1]))
        if matrix is None:
            return None
        scores = matrix[sorted(experts)].sum(axis=0)
        return [int(e) for e in np.argsort(-scores, kind="stable")]

    def _prefetch(
        self,
        layer: int,
        speculative_next: Sequence[int],
        now: float,
        protect: set[ExpertKey],
        layer_end: float,
    ) -> None:
        """Copy the next layer's likely experts now, when they land in time to beat running them on the CPU."""
        pos = self.costs.moe_layers.index(layer)
        if pos + 1 >= len(self.costs.moe_layers):
            return
        nxt = self.costs.moe_layers[pos + 1]
        assert self._step is not None
        tokens = self._step.tokens
        cands = list(speculative_next)[: self.policy.prefetch]
        if self._step.decode:
            self._candidates[nxt] = cands
        needed_at = layer_end + self.predictor.gpu(self.costs.stages[nxt], tokens)
        keep = protect | {(nxt, e) for e in cands}
        for e in cands:
            key = (nxt, e)
            if key in self.cache:
                self.cache.touch(key)
                continue
            cost = self.costs.experts[key]
            lands = max(now, self.copy_free) + self.predictor.transfer(cost)
            if lands - needed_at > self.predictor.cpu(cost, tokens) - self.predictor.gpu(cost, tokens):
                break  # waiting for it would lose to the CPU: so would every later candidate
            if self.cache.admit(key, math.inf, now=now, protect=keep):
                self.cache.ready[key] = self._queue_transfer(key, now)
                self.stats.prefetch_issued += 1

    def end_step(self) -> float:
        """Finish the step (final norm and lm_head on the GPU); returns its modeled seconds."""
        assert self._step is not None
        self.clock += self.predictor.gpu(self.costs.head, self._step.tokens) + (
            self.costs.embedding.bytes / self.profile.gpu_mem_bandwidth
            if self.costs.head.bytes < 1 << 20
            else 0.0
        )
        step = self._step
        step.modeled_seconds = self.clock - step.modeled_seconds
        self.stats.steps.append(step)
        self._step = None
        return step.modeled_seconds

    # --- reporting -----------------------------------------------------------------------------------
    def device_bytes(self, context: int) -> dict[str, int]:
        """Peak GPU-resident bytes: non-expert graphs, the expert cache's peak, and a ``context``-token FP16 KV cache."""
        base = self.costs.resident_base_bytes()
        kv = self.costs.kv_bytes_per_token * context
        return {
            "graphs": base,
            "experts_peak": self.cache.peak,
            "kv_cache": kv,
            "total": base + self.cache.peak + kv,
        }

    def summary(self) -> dict[str, Any]:
        """Hit rates, prefetch, transfers and modeled per-token latency of the decode steps so far."""
        s = self.stats
        per_layer = {layer: s.hits.get(layer, 0) / s.routed[layer] for layer in sorted(s.routed)}
        rates = np.asarray(list(per_layer.values()) or [0.0])
        decode = [st for st in s.steps if st.decode]
        lat = np.asarray([st.modeled_seconds for st in decode] or [0.0])
        routed = sum(s.routed.values())
        return {
            "policy": self.policy.name,
            "budget_bytes": self.budget,
            "profile": self.profile.name,
            "modeled": True,
            "hit_rate": sum(s.hits.values()) / routed if routed else 0.0,
            "hit_rate_per_layer": {str(k): v for k, v in per_layer.items()},
            "hit_rate_layer_std": float(rates.std()),
            "prefetch_recall": s.prefetch_recall_num / s.prefetch_recall_den
            if s.prefetch_recall_den
            else None,
            "prefetch_issued": s.prefetch_issued,
            "bytes_moved_per_token": s.bytes_moved / max(len(decode), 1) if decode else 0.0,
            "decode_tokens": len(decode),
            "modeled_decode_ms": {
                "mean": float(lat.mean() * 1e3),
                "p50": float(np.percentile(lat, 50) * 1e3),
                "p90": float(np.percentile(lat, 90) * 1e3),
                "p99": float(np.percentile(lat, 99) * 1e3),
                "std": float(lat.std() * 1e3),
            },
            "cpu_runs": s.cpu_runs,
            "gpu_runs": s.gpu_runs,
            "per_layer_slots": self.per_layer_slots,
            "peak_expert_bytes": self.cache.peak,
        }
