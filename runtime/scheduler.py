"""Expert scheduling: per layer, which experts run on the GPU, which on the CPU, what to move, and when.

One ``ExpertScheduler`` serves both a live run (the runner executes its decisions) and a replay of a
recorded routing trace (``moedge bench runtime``): it keeps the GPU expert cache under its byte
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
from moedge.manifest import Manifest
from moedge.runtime.cache import ExpertCache, ExpertKey, check_budget
from moedge.runtime.placement import plan_haq, plan_last_layers, plan_popularity
from moedge.runtime.profiles import HardwareProfile
from moedge.runtime.routing import RoutingStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Policy:
    """How a run places experts, evicts them, handles a miss, and whether it prefetches."""

    name: str
    description: str
    placement: str = "none"  # none | popularity | haq | last-layers | all
    eviction: str | None = None  # dynamic part of the cache: lru | lfu | None (static only)
    per_layer: bool = False  # a separate LRU per layer (mixtral-offloading)
    miss: str = "cpu"  # cpu | transfer | predict
    prefetch: int = 0  # next-layer candidates to prefetch from the speculative gate (0: none)
    static_fraction: float = 1.0  # share of the budget the placement may pin (the rest is dynamic)
    prefetch_share: float = 0.5  # share of a layer's routed experts prefetch is expected to bring in time
    topup: str = "balanced"  # haq's second stage: balanced across layers, or popular
    path_fraction: float = 0.5  # share of the pinned budget haq's first stage gives whole-depth paths
    prefetch_from: str = "gate"  # gate: speculative next-layer router; transitions: routing.json's counts


POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("cpu", "every expert on the CPU (nothing cached)", miss="cpu"),
        Policy(
            "lru",
            "on-demand transfer into a per-layer LRU cache (mixtral-offloading)",
            eviction="lru",
            per_layer=True,
            miss="transfer",
        ),
        Policy("lfu", "on-demand transfer into one LFU cache", eviction="lfu", miss="transfer"),
        Policy(
            "static",
            "popular experts pinned, misses where the predictor says (Fiddler)",
            placement="popularity",
            miss="predict",
        ),
        Policy(
            "n-cpu-moe",
            "last layers' experts on the GPU, the first N layers' on the CPU (llama.cpp)",
            placement="last-layers",
            miss="cpu",
        ),
        Policy(
            "haq",
            "two-stage path placement, dynamic LRU remainder, speculative prefetch, predicted misses",
            placement="haq",
            eviction="lru",
            miss="predict",
            prefetch=2,
            static_fraction=0.75,
        ),
        Policy(
            "fate",
            "on-demand LRU plus prefetch of the next layer's experts from its router on this layer's input (Fate)",
            eviction="lru",
            miss="transfer",
            prefetch=2,
        ),
        Policy(
            "moe-infinity",
            "LFU cache plus prefetch from recorded activation paths (layer-to-layer transitions; MoE-Infinity)",
            eviction="lfu",
            miss="transfer",
            prefetch=2,
            prefetch_from="transitions",
        ),
        Policy(
            "full-gpu", "every expert resident (the memory upper bound; ignores the budget)", placement="all"
        ),
    )
}


def get_policy(name: str) -> Policy:
    """A policy by name, with one clear error for an unknown one."""
    if name not in POLICIES:
        raise MoedgeError(f"unknown cache policy {name!r}: use one of {', '.join(POLICIES)}")
    return POLICIES[name]


@dataclass(frozen=True)
class GraphCost:
    """What the cost model needs of one graph: bytes on the device and weight count."""

    bytes: int
    params: int


@dataclass
class ModelCosts:
    """Per-graph costs of a bundle (device bytes as stored)."""

    moe_layers: list[int]
    num_experts: int
    top_k: int
    experts: dict[ExpertKey, GraphCost]
    stages: dict[int, GraphCost]
    head: GraphCost
    embedding: GraphCost
    kv_bytes_per_token: int  # all layers, FP16 keys and values
    int8: bool
    num_params: int

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> ModelCosts:
        """Costs read from a bundle manifest; a W8A8 bundle stores one byte per weight, FP32 four."""
        int8 = manifest.precision == "w8a8"
        per = 1 if int8 else 4

        def cost(nbytes: int) -> GraphCost:
            return GraphCost(bytes=nbytes, params=nbytes // per)

        experts = {
            (layer.index, e): cost(g.bytes)
            for layer in manifest.layers
            if layer.moe
            for e, g in enumerate(layer.moe.experts)
        }
        moe = [layer for layer in manifest.layers if layer.moe]
        model = manifest.model
        kv = 2 * len(manifest.layers) * int(model["num_kv_heads"]) * int(model["head_dim"]) * 2
        stages = {layer.index: cost(layer.stage.bytes) for layer in manifest.layers}
        # the embedding and lm_head stay FP32 in every bundle (a tied head stores nothing of its own)
        embedding = GraphCost(bytes=manifest.embedding.bytes, params=manifest.embedding.bytes // 4)
        head = GraphCost(bytes=manifest.head.bytes, params=manifest.head.bytes // 4)
        total = sum(c.params for c in experts.values()) + sum(c.params for c in stages.values())
        total += embedding.params + head.params
        return cls(
            moe_layers=[layer.index for layer in moe],
            num_experts=moe[0].moe.num_experts if moe and moe[0].moe else 0,
            top_k=moe[0].moe.gating.top_k if moe and moe[0].moe else 0,
            experts=experts,
            stages=stages,
            head=head,
            embedding=embedding,
            kv_bytes_per_token=kv,
            int8=int8,
            num_params=total,
        )

    def expert_bytes(self) -> int:
        """Bytes of every expert, as stored."""
        return sum(c.bytes for c in self.experts.values())

    def resident_base_bytes(self) -> int:
        """Bytes always on the GPU besides experts and KV: embedding, stages and head."""
        return self.embedding.bytes + sum(c.bytes for c in self.stages.values()) + self.head.bytes

    def fp16_footprint(self, context: int) -> int:
        """Bytes of the same model all on the GPU in FP16 (weights and a ``context``-token KV cache)."""
        return 2 * self.num_params + self.kv_bytes_per_token * context


def parse_budget(
    spec: str | int | float | None,
    costs: ModelCosts,
    *,
    free_device_bytes: int | None = None,
    context: int = 0,
) -> int:
    """Bytes for ``--gpu-budget``: ``1.5GiB``/``800MB``/bytes, ``25%`` or ``0.25`` of expert bytes, or ``auto``.

    ``auto`` is 90% of the device's free memory (measured after the stage graphs are loaded) less a
    ``context``-token KV cache, capped at every expert's bytes.
    """
    total = costs.expert_bytes()
    if spec is None:
        return total
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        value = float(spec)
        return int(value * total) if 0 <= value <= 1 else int(value)
    text = str(spec).strip().lower()
    try:
        if text == "auto":
            if free_device_bytes is None:
                raise MoedgeError("--gpu-budget auto needs a device that reports free memory (a GPU backend)")
            # measured with the stage graphs already resident: leave the KV cache and a 10% margin
            room = free_device_bytes - costs.kv_bytes_per_token * context
            return max(0, min(total, int(room * 0.9)))
        if text.endswith("%"):
            return int(float(text[:-1]) / 100 * total)
        units = {"gib": 2**30, "mib": 2**20, "kib": 2**10, "gb": 10**9, "mb": 10**6, "kb": 10**3, "b": 1}
        for unit, scale in units.items():
            if text.endswith(unit):
                return int(float(text[: -len(unit)]) * scale)
        value = float(text)
    except ValueError:
        raise MoedgeError(
            f"cannot read GPU budget {spec!r}: give bytes (1.5GiB, 800MB), a share of expert bytes (25%) or auto"
        ) from None
    return int(value * total) if 0 <= value <= 1 else int(value)


class LatencyPredictor:
    """Per expert and token count: CPU time, GPU time and transfer time.

    CPU costs come from timings measured at start-up (``cpu_fit``: seconds = a + b * tokens) when the
    run has a real GPU; on a modeled profile they come from the profile, as do GPU and transfer costs.
    """

    def __init__(
        self, profile: HardwareProfile, *, int8: bool, cpu_fit: tuple[float, float] | None = None
    ) -> None:
        self.profile = profile
        self.int8 = int8
        self.cpu_fit = cpu_fit

    def cpu(self, cost: GraphCost, tokens: int) -> float:
        """Seconds to run the expert on the CPU."""
        if self.cpu_fit is not None:
            return self.cpu_fit[0] + self.cpu_fit[1] * tokens
        return self.profile.cpu_time(cost.bytes, cost.params, tokens, int8=self.int8)

    def gpu(self, cost: GraphCost, tokens: int) -> float:
        """Seconds to run the resident expert on the GPU."""
        return self.profile.gpu_time(cost.bytes, cost.params, tokens, int8=self.int8)

    def transfer(self, cost: GraphCost) -> float:
        """Seconds to make the expert resident."""
        return self.profile.transfer_time(cost.bytes)


def fit_cpu_timings(timings: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``seconds = a + b * tokens`` from measured (tokens, seconds) pairs."""
    if len(timings) < 2:
        raise MoedgeError("fitting CPU timings needs at least two token counts")
    n = np.asarray([t for t, _ in timings], dtype=np.float64)
    s = np.asarray([x for _, x in timings], dtype=np.float64)
    b, a = np.polyfit(n, s, 1)
    return max(float(a), 0.0), max(float(b), 0.0)


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
        if policy.placement == "last-layers":
            return plan_last_layers(self.costs.moe_layers, self.costs.num_experts, sizes, budget)
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
