"""Expert cache policies: how a run places experts, evicts them, handles a miss, and prefetches."""

from __future__ import annotations

from dataclasses import dataclass

from moedge._errors import MoedgeError


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
    lfu_decay: float = 1.0  # lfu: each step scales every use count by this first (1: plain counts)
    cpu_layers: int | None = None  # last-layers: first N MoE layers on the CPU (None: the fewest that fit)


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
