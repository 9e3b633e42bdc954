"""Expert routing statistics: what the placement policies plan from (``routing.json``).

``routing.json`` holds, per MoE layer, how many tokens each expert received (top-k choices), the
layer-to-layer transition counts (expert i at layer l and expert j at layer l+1 chosen for the same
token, over all k x k pairs), and the most frequent whole-depth paths (the top-1 expert of every MoE
layer for a token), so path coverage is computed from recorded paths rather than guessed from pairs.
Calibration writes it from PyTorch; ``moedge profile`` writes it from a bundle run; both merge.
"""

from __future__ import annotations

import collections
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moedge._errors import MoedgeError

ROUTING_FORMAT = 1


class RoutingRecorder:
    """Collects each MoE layer's top-k expert choices per token, in token order."""

    def __init__(self, num_experts: int, top_k: int) -> None:
        self.num_experts = num_experts
        self.top_k = top_k
        self.choices: dict[int, list[np.ndarray]] = {}

    def record(self, layer: int, top_k_index: Any) -> None:
        """Append one batch of ``[tokens, k]`` choices (best first) of ``layer``."""
        self.choices.setdefault(layer, []).append(
            np.asarray(top_k_index, dtype=np.int16).reshape(-1, self.top_k)
        )

    def reset_layer(self, layer: int) -> None:
        """Forget ``layer``'s choices (before it is observed again)."""
        self.choices.pop(layer, None)

    def per_layer(self) -> dict[int, np.ndarray]:
        """Every layer's choices so far, tokens x top_k."""
        return {layer: np.concatenate(self.choices[layer]) for layer in sorted(self.choices)}

    def to_dict(self, *, top_paths: int = 256) -> dict[str, Any]:
        """The JSON document (see module docstring)."""
        return routing_document(self.per_layer(), self.num_experts, self.top_k, top_paths=top_paths)

    def save(self, path: Path) -> None:
        """Write ``routing.json``."""
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")


def routing_document(
    per_layer: dict[int, np.ndarray], num_experts: int, top_k: int, *, top_paths: int = 256
) -> dict[str, Any]:
    """``routing.json`` for choices given per layer as tokens x top_k arrays (same tokens in every layer)."""
    layers = sorted(per_layer)
    counts = {
        str(layer): np.bincount(per_layer[layer].astype(np.int64).ravel(), minlength=num_experts).tolist()
        for layer in layers
    }
    transitions = {}
    for a, b in itertools.pairwise(layers):
        src, dst = per_layer[a].astype(np.int64), per_layer[b].astype(np.int64)
        pairs = (src[:, :, None] * num_experts + dst[:, None, :]).ravel()
        matrix = np.bincount(pairs, minlength=num_experts**2).reshape(num_experts, num_experts)
        transitions[f"{a}->{b}"] = matrix.tolist()
    paths: collections.Counter[tuple[int, ...]] = collections.Counter()
    tokens = 0
    if layers:
        top1 = np.stack([per_layer[layer][:, 0].astype(np.int64) for layer in layers], axis=1)
        tokens = int(top1.shape[0])
        paths.update(map(tuple, top1.tolist()))
    return {
        "format_version": ROUTING_FORMAT,
        "num_experts": num_experts,
        "top_k": top_k,
        "tokens": tokens,
        "layers": layers,
        "expert_token_counts": counts,
        "transition_counts": transitions,
        "top1_paths": {
            "distinct": len(paths),
            "most_common": [{"path": list(p), "count": n} for p, n in paths.most_common(top_paths)],
        },
    }


@dataclass
class RoutingStats:
    """``routing.json`` parsed: per-layer expert counts, transitions and the most frequent paths."""

    num_experts: int
    top_k: int
    tokens: int
    layers: list[int]
    counts: dict[int, np.ndarray]  # layer -> experts
    transitions: dict[tuple[int, int], np.ndarray]  # (layer, next layer) -> experts x experts
    paths: list[tuple[tuple[int, ...], int]]  # (top-1 expert per layer in ``layers`` order, tokens)
    distinct_paths: int = 0
    # layer -> share of its top-k that the previous layer's speculative gate predicted (0 for the first)
    speculative_recall: dict[int, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RoutingStats:
        """Parse the JSON document."""
        version = raw.get("format_version")
        if not isinstance(version, int) or version > ROUTING_FORMAT:
            raise MoedgeError(f"routing statistics format {version!r} is newer than this moedge reads")
        layers = [int(x) for x in raw["layers"]]
        transitions = {}
        for key, matrix in raw.get("transition_counts", {}).items():
            a, b = key.split("->")
            transitions[(int(a), int(b))] = np.asarray(matrix, dtype=np.int64)
        paths = raw.get("top1_paths", {})
        return cls(
            num_experts=int(raw["num_experts"]),
            top_k=int(raw["top_k"]),
            tokens=int(raw["tokens"]),
            layers=layers,
            counts={int(k): np.asarray(v, dtype=np.int64) for k, v in raw["expert_token_counts"].items()},
            transitions=transitions,
            paths=[(tuple(int(e) for e in p["path"]), int(p["count"])) for p in paths.get("most_common", [])],
            distinct_paths=int(paths.get("distinct", 0)),
            speculative_recall={int(k): float(v) for k, v in raw.get("speculative_recall", {}).items()},
        )

    @classmethod
    def from_choices(cls, per_layer: dict[int, np.ndarray], num_experts: int, top_k: int) -> RoutingStats:
        """Statistics of recorded choices (tokens x top_k per layer)."""
        return cls.from_dict(routing_document(per_layer, num_experts, top_k, top_paths=4096))

    def to_dict(self, *, top_paths: int = 256) -> dict[str, Any]:
        """The JSON document."""
        return {
            "format_version": ROUTING_FORMAT,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "tokens": self.tokens,
            "layers": self.layers,
            "expert_token_counts": {str(k): v.tolist() for k, v in sorted(self.counts.items())},
            "transition_counts": {f"{a}->{b}": m.tolist() for (a, b), m in sorted(self.transitions.items())},
            "top1_paths": {
                "distinct": self.distinct_paths,
                "most_common": [{"path": list(p), "count": n} for p, n in self.paths[:top_paths]],
            },
            "speculative_recall": {str(k): v for k, v in sorted(self.speculative_recall.items())},
        }

    def merge(self, other: RoutingStats) -> RoutingStats:
        """Statistics of both workloads together (counts add; path lists merge by path)."""
        if (self.num_experts, self.top_k, self.layers) != (other.num_experts, other.top_k, other.layers):
            raise MoedgeError("routing statistics of different models (experts, top-k or layers differ)")
        paths: collections.Counter[tuple[int, ...]] = collections.Counter(dict(self.paths))
        paths.update(dict(other.paths))
        return RoutingStats(
            num_experts=self.num_experts,
            top_k=self.top_k,
            tokens=self.tokens + other.tokens,
            layers=list(self.layers),
            counts={k: v + other.counts[k] for k, v in self.counts.items()},
            transitions={
                k: v + other.transitions[k] for k, v in self.transitions.items() if k in other.transitions
            },
            paths=paths.most_common(),
            distinct_paths=max(self.distinct_paths, other.distinct_paths, len(paths)),
            speculative_recall={
                k: (v * self.tokens + other.speculative_recall[k] * other.tokens)
                / max(self.tokens + other.tokens, 1)
                for k, v in self.speculative_recall.items()
                if k in other.speculative_recall
            },
        )


def read_routing(path: str | Path) -> RoutingStats:
    """Load ``routing.json`` with one clear error when it is missing or damaged."""
    file = Path(path)
    if not file.is_file():
        raise MoedgeError(f"no routing statistics at {file}: run `moedge profile BUNDLE` to record them")
    try:
        return RoutingStats.from_dict(json.loads(file.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise MoedgeError(
            f"{file} is not a readable routing.json ({exc!r}): re-run `moedge profile`"
        ) from None
