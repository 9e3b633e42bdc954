"""What every ONNX Runtime runner here shares: the KV cache and step inputs.

Session options and loading are ``moedge.ort_sessions`` (below the graph passes, which load graphs too).
"""

from __future__ import annotations

import numpy as np

KVCache = list[np.ndarray]


def empty_cache(batch: int, num_layers: int, num_kv_heads: int, head_dim: int) -> KVCache:
    """A zero-length KV cache for ``batch`` sequences."""
    shape = (batch, num_kv_heads, 0, head_dim)
    return [np.zeros(shape, dtype=np.float32) for _ in range(2 * num_layers)]


def step_inputs(
    input_ids: np.ndarray,
    past_len: int,
    attention_mask: np.ndarray | None,
    position_ids: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """``input_ids``, ``attention_mask`` and ``position_ids`` for one call after ``past_len`` cached tokens."""
    batch, seq = input_ids.shape
    if attention_mask is None:
        attention_mask = np.ones((batch, past_len + seq), dtype=np.int64)
    if position_ids is None:
        position_ids = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq))
    return {
        "input_ids": input_ids,
        "attention_mask": np.asarray(attention_mask, dtype=np.int64),
        "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64),
    }
