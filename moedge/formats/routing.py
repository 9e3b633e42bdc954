"""Expert routing statistics (``routing.json``): its recorder, writer, reader and checks.

``routing.json`` holds, per MoE layer, how many tokens each expert received (top-k choices), the
layer-to-layer transition counts (expert i at layer l and expert j at layer l+1 chosen for the same
token, over all k x k pairs), and the most frequent whole-depth paths (the top-1 expert of every MoE
layer for a token), so path coverage is computed from recorded paths rather than guessed from pairs.
Calibration records it from PyTorch (``RoutingRecorder``, numpy only); ``moedge profile`` writes it
from a bundle run; both merge. The placement policies (``moedge.runtime.placement``) plan from it.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moedge._errors import MoedgeError

ROUTING_FORMAT = 1
ROUTING_FILE = "routing.json"
"""Its name in a recipe, an export and a bundle."""


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


MAX_EXPERTS = 4096  # routed experts per layer a routing.json may describe
MAX_LAYERS = 1024


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_counts(value: Any, length: int, where: str) -> None:
    if not (isinstance(value, list) and len(value) == length and all(_is_index(x) for x in value)):
        raise MoedgeError(f"{where} must be a list of {length} integers >= 0 (one per expert)")


def check_routing_document(raw: Any, where: str) -> None:
    """Raise one clear line naming ``where`` and the field when ``raw`` is not a routing.json document."""
    if not isinstance(raw, dict):
        raise MoedgeError(f"{where}: not a routing.json object")
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > ROUTING_FORMAT:
        raise MoedgeError(f"{where}: format_version {version!r} is not one this moedge reads (1)")
    for key in ("num_experts", "top_k", "tokens", "layers", "expert_token_counts"):
        if key not in raw:
            raise MoedgeError(f"{where}: field {key} is missing: re-run `moedge profile`")
    experts, top_k = raw["num_experts"], raw["top_k"]
    if not _is_index(experts) or not 1 <= experts <= MAX_EXPERTS:
        raise MoedgeError(f"{where}: num_experts must be an integer in 1..{MAX_EXPERTS}, got {experts!r}")
    if not _is_index(top_k) or not 1 <= top_k <= experts:
        raise MoedgeError(f"{where}: top_k must be an integer in 1..num_experts ({experts}), got {top_k!r}")
    if not _is_index(raw["tokens"]):
        raise MoedgeError(f"{where}: tokens must be an integer >= 0, got {raw['tokens']!r}")
    layers = raw["layers"]
    if (
        not isinstance(layers, list)
        or len(layers) > MAX_LAYERS
        or not all(_is_index(x) for x in layers)
        or len(set(layers)) != len(layers)
    ):
        raise MoedgeError(f"{where}: layers must be a list of distinct layer indices (integers >= 0)")
    counts = raw["expert_token_counts"]
    if not isinstance(counts, dict) or sorted(counts) != sorted(str(x) for x in layers):
        raise MoedgeError(f"{where}: expert_token_counts must have one entry per layer in layers {layers}")
    for key, value in counts.items():
        _check_counts(value, experts, f"{where}: expert_token_counts[{key!r}]")
    transitions = raw.get("transition_counts", {})
    if not isinstance(transitions, dict):
        raise MoedgeError(f"{where}: transition_counts must be an object")
    for key, matrix in transitions.items():
        parts = key.split("->")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) in layers for p in parts):
            raise MoedgeError(
                f"{where}: transition_counts key {key!r} is not 'layer->layer' of two listed layers"
            )
        if not isinstance(matrix, list) or len(matrix) != experts:
            raise MoedgeError(f"{where}: transition_counts[{key!r}] must be a {experts} x {experts} matrix")
        for row in matrix:
            _check_counts(row, experts, f"{where}: transition_counts[{key!r}] row")
    paths = raw.get("top1_paths", {})
    if not isinstance(paths, dict) or not _is_index(paths.get("distinct", 0)):
        raise MoedgeError(f"{where}: top1_paths must be an object with an integer distinct count")
    most_common = paths.get("most_common", [])
    if not isinstance(most_common, list):
        raise MoedgeError(f"{where}: top1_paths.most_common must be a list")
    for i, entry in enumerate(most_common):
        path = entry.get("path") if isinstance(entry, dict) else None
        if (
            not isinstance(path, list)
            or len(path) != len(layers)
            or not all(_is_index(e) and e < experts for e in path)
            or not _is_index(entry.get("count"))
        ):
            raise MoedgeError(
                f"{where}: top1_paths.most_common entry {i} must be {{path: one expert < {experts} per layer, "
                "count: integer >= 0}"
            )
    recall = raw.get("speculative_recall", {})
    if not isinstance(recall, dict):
        raise MoedgeError(f"{where}: speculative_recall must be an object")
    for key, value in recall.items():
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not (key.isdigit() and int(key) in layers and ok and 0 <= value <= 1):
            raise MoedgeError(
                f"{where}: speculative_recall[{key!r}] must be a share in [0, 1] of a listed layer"
            )


def check_routing_for_bundle(stats: RoutingStats, experts: dict[int, int], where: str) -> None:
    """Raise one clear line when ``stats`` names a layer or expert the bundle (``{MoE layer: experts}``) lacks."""
    for layer in stats.layers:
        if layer not in experts:
            moe = ", ".join(map(str, sorted(experts))) or "none"
            raise MoedgeError(
                f"{where}: layer {layer} is not an MoE layer of the bundle (MoE layers: {moe}): "
                "the statistics are another model's; re-run `moedge profile` on this bundle"
            )
        if experts[layer] != stats.num_experts:
            raise MoedgeError(
                f"{where}: num_experts is {stats.num_experts}, but layer {layer} of the bundle has "
                f"{experts[layer]} experts: the statistics are another model's; re-run `moedge profile`"
            )


def read_routing(path: str | Path, *, experts: dict[int, int] | None = None) -> RoutingStats:
    """Load ``routing.json`` with one clear error when it is missing, damaged or not this bundle's.

    The file is read only when it is a regular file of at most 64 MiB and every field is checked; with
    ``experts`` ({MoE layer: experts} of a bundle) it must describe that bundle's layers and experts.
    """
    from moedge.inputs import read_input_json

    file = Path(path)
    if not file.exists():
        raise MoedgeError(f"no routing statistics at {file}: run `moedge profile BUNDLE` to record them")
    where = f"routing statistics {file}"
    raw = read_input_json(file, "routing statistics")
    check_routing_document(raw, where)
    try:
        stats = RoutingStats.from_dict(raw)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MoedgeError(
            f"{where} is not a readable routing.json ({exc!r}): re-run `moedge profile`"
        ) from None
    if experts is not None:
        check_routing_for_bundle(stats, experts, where)
    return stats
