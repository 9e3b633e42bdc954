"""The names an exported graph carries: node metadata keys and the KV-cache input/output names.

This is the contract between export (which writes them) and the graph passes (which cut by them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MODULE_KEY = "moedge.module"  # e.g. model.layers.3.mlp.experts.5
CLASS_KEY = "moedge.class"  # the module's Python class

INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")
PAST_PREFIX = "past_key_values"  # cache inputs: past_key_values.{layer}.key / .value
PRESENT_PREFIX = "present"  # cache outputs: present.{layer}.key / .value

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:.*\.)?experts\.(\d+)(?:\.|$)")


def kv_names(num_layers: int, prefix: str) -> list[str]:
    """``{prefix}.{i}.key`` / ``.value`` for every layer, in graph order."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def expert_of(module: str) -> tuple[int, int] | None:
    """(layer, expert) when ``module`` is inside a routed expert, else None."""
    match = _EXPERT.match(module)
    return (int(match.group(1)), int(match.group(2))) if match else None


def experts_per_layer(modules: Iterable[str]) -> dict[int, int]:
    """How many distinct routed experts the given module names cover, per MoE layer."""
    found: dict[int, set[int]] = {}
    for module in modules:
        hit = expert_of(module)
        if hit is not None:
            found.setdefault(hit[0], set()).add(hit[1])
    return {layer: len(experts) for layer, experts in sorted(found.items())}
