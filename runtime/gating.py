"""An MoE layer's gating rule in numpy: router logits to expert choices and weights, as the model does."""

from __future__ import annotations

import numpy as np

from moedge._errors import MoedgeError
from moedge.formats.manifest import GatingRule


def _sum_in_order(x: np.ndarray) -> np.ndarray:
    """Row sums added left to right (``cumsum`` is sequential; ``sum`` is pairwise past 8 terms), as the
    C++ runner adds them."""
    return np.cumsum(x, axis=-1)[..., -1:]


def route(logits: np.ndarray, rule: GatingRule) -> tuple[np.ndarray, np.ndarray]:
    """Chosen experts (tokens x top_k, int64, best first) and their weights (float32) for ``logits``.

    Scores are a softmax over all experts computed in float64 and weights rounded to float32 once at
    the end, so a runner in another language (the C++ ``moedge_rt``) reproduces them bit for bit
    whatever its ``exp``; ties go to the lower expert index; with ``normalize_top_k`` the chosen scores
    are divided by their sum (``GatingRule``).
    """
    if rule.scoring != "softmax":
        raise MoedgeError(f"gating scoring {rule.scoring!r} is not supported by this runtime")
    x = np.asarray(logits, dtype=np.float32).astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    probs = np.exp(x)
    probs /= _sum_in_order(probs)
    index = np.argsort(-probs, axis=-1, kind="stable")[:, : rule.top_k]
    weights = np.take_along_axis(probs, index, axis=-1)
    if rule.normalize_top_k:
        weights = weights / _sum_in_order(weights)
    return index.astype(np.int64), weights.astype(np.float32)
