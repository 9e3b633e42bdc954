"""Expert routing statistics recorded during calibration: the input of the runtime's placement policies.

``routing.json`` holds, per MoE layer, how many tokens each expert received (top-k choices), the
layer-to-layer transition counts (expert i at layer l and expert j at layer l+1 chosen for the same
token, over all k x k pairs), and the most frequent whole-depth paths (the top-1 expert of every MoE
layer for a token), so path coverage is computed from recorded paths rather than guessed from pairs.
"""

from __future__ import annotations

import collections
import itertools
import json
from pathlib import Path
from typing import Any

import torch

ROUTING_FORMAT = 1


class RoutingRecorder:
    """Collects each MoE layer's top-k expert choices per calibration token, in token order."""

    def __init__(self, num_experts: int, top_k: int) -> None:
        self.num_experts = num_experts
        self.top_k = top_k
        self.choices: dict[int, list[torch.Tensor]] = {}

    def record(self, layer: int, top_k_index: torch.Tensor) -> None:
        """Append one batch of ``[tokens, k]`` choices (best first) of ``layer``."""
        self.choices.setdefault(layer, []).append(top_k_index.detach().to(torch.int16).cpu())

    def reset_layer(self, layer: int) -> None:
        """Forget ``layer``'s choices (before it is observed again)."""
        self.choices.pop(layer, None)

    def to_dict(self, *, top_paths: int = 256) -> dict[str, Any]:
        """The JSON document (see module docstring)."""
        layers = sorted(self.choices)
        per_layer = {layer: torch.cat(self.choices[layer]) for layer in layers}
        counts = {
            str(layer): torch.bincount(idx.long().flatten(), minlength=self.num_experts).tolist()
            for layer, idx in per_layer.items()
        }
        transitions = {}
        for a, b in itertools.pairwise(layers):
            src, dst = per_layer[a].long(), per_layer[b].long()
            pairs = (src[:, :, None] * self.num_experts + dst[:, None, :]).flatten()
            matrix = torch.bincount(pairs, minlength=self.num_experts**2).reshape(
                self.num_experts, self.num_experts
            )
            transitions[f"{a}->{b}"] = matrix.tolist()
        paths: collections.Counter[tuple[int, ...]] = collections.Counter()
        tokens = 0
        if layers:
            top1 = torch.stack([per_layer[layer][:, 0].long() for layer in layers], dim=1)
            tokens = int(top1.shape[0])
            paths.update(map(tuple, top1.tolist()))
        return {
            "format_version": ROUTING_FORMAT,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "tokens": tokens,
            "layers": layers,
            "expert_token_counts": counts,
            "transition_counts": transitions,
            "top1_paths": {
                "distinct": len(paths),
                "most_common": [{"path": list(p), "count": n} for p, n in paths.most_common(top_paths)],
            },
        }

    def save(self, path: Path) -> None:
        """Write ``routing.json``."""
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
