"""The KV cache of an ort-cpu target bundle: allocated once, updated in place by the layer stages.

The fused stages (``moedge split --target ort-cpu``) run ONNX Runtime's ``GroupQueryAttention``, which
writes a step's keys and values into a (rows, kv_heads, capacity, head_dim) buffer in place when the
same buffer is bound as its past and present. :class:`StaticCache` holds one such buffer per layer for
keys and one for values, each row's length, and the ONNX Runtime values bound to them, so a decode
step copies nothing. Rows are right-padded (GroupQueryAttention has no mask): row ``b`` holds its
``lengths[b]`` tokens at positions 0 .. lengths[b] - 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from moedge._errors import MoedgeError

MIN_CAPACITY = 256
DECODE_ROOM = 64  # positions a first allocation leaves for decoding beyond the prompt (a multiple of 64)


def initial_capacity(prompt: int) -> int:
    """The buffers' first capacity for a ``prompt``-token first step: room for it and ``DECODE_ROOM``
    more, rounded up to a multiple of 64, at least ``MIN_CAPACITY`` (later steps grow it by doubling)."""
    return max(MIN_CAPACITY, 64 * -(-(prompt + DECODE_ROOM) // 64))


@dataclass
class InPlace:
    """A graph input and output bound to the same buffer (``array``, as ``value`` for ONNX Runtime)."""

    input: str
    output: str
    array: np.ndarray
    value: ort.OrtValue


class StaticCache:
    """Per layer one key and one value buffer (rows, kv_heads, capacity, head_dim), float32, and row lengths."""

    def __init__(self, rows: int, layers: int, kv_heads: int, head_dim: int, capacity: int) -> None:
        self.shape = (rows, kv_heads, capacity, head_dim)
        self.layers = layers
        self.lengths = np.zeros(rows, dtype=np.int64)
        self.buffers = [np.zeros(self.shape, dtype=np.float32) for _ in range(2 * layers)]
        self._values = [ort.OrtValue.ortvalue_from_numpy(b) for b in self.buffers]

    @property
    def rows(self) -> int:
        """How many sequences the cache holds."""
        return self.shape[0]

    @property
    def capacity(self) -> int:
        """How many positions each row can hold before the buffers grow."""
        return self.shape[2]

    def reserve(self, positions: int, limit: int) -> None:
        """Make room for ``positions`` per row (grown by doubling, at most ``limit``; 0: no limit)."""
        if positions <= self.capacity:
            return
        if limit and positions > limit:
            raise MoedgeError(f"{positions} positions exceed the model's context of {limit}")
        capacity = max(positions, 2 * self.capacity)
        capacity = min(capacity, limit) if limit else capacity
        rows, heads, old, dim = self.shape
        self.shape = (rows, heads, capacity, dim)
        grown = []
        for buffer in self.buffers:
            new = np.zeros(self.shape, dtype=np.float32)
            new[:, :, :old] = buffer
            grown.append(new)
        self.buffers = grown
        self._values = [ort.OrtValue.ortvalue_from_numpy(b) for b in self.buffers]

    def bound(self, layer: int, names: tuple[str, str, str, str]) -> list[InPlace]:
        """Layer ``layer``'s key and value buffers bound as (past key, past value, present key, present
        value) = ``names``."""
        k, v = 2 * layer, 2 * layer + 1
        return [
            InPlace(names[0], names[2], self.buffers[k], self._values[k]),
            InPlace(names[1], names[3], self.buffers[v], self._values[v]),
        ]

    def select(self, rows: Sequence[int]) -> StaticCache:
        """A cache of only ``rows`` (in that order): what a batch keeps when other rows finish."""
        keep = list(rows)
        out = StaticCache(len(keep), self.layers, self.shape[1], self.shape[3], self.capacity)
        out.lengths = self.lengths[keep].copy()
        for mine, theirs in zip(out.buffers, self.buffers, strict=True):
            mine[:] = theirs[keep]
        return out


def right_padded(ids: np.ndarray, attention_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ``ids`` (rows x seq; the mask's last ``seq`` columns say which are tokens) as
    right-padded rows and each row's token count."""
    rows, seq = ids.shape
    if attention_mask is None:
        return ids, np.full(rows, seq, dtype=np.int64)
    new = np.asarray(attention_mask)[:, -seq:].astype(bool)
    counts = new.sum(axis=1).astype(np.int64)
    out = np.zeros_like(ids)
    for row in range(rows):
        n = int(counts[row])
        if not new[row, seq - n :].all() or n == 0:
            raise MoedgeError(
                "an ort-cpu bundle takes left-padded rows with at least one token each "
                "(the attention mask's new columns must be 0s then 1s)"
            )
        out[row, :n] = ids[row, seq - n :]
    return out, counts


def left_padded(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Right-padded per-position ``values`` (rows x seq x ...) back in the caller's left-padded layout."""
    seq = values.shape[1]
    if bool((counts == seq).all()):
        return values  # no row is padded
    out = np.zeros_like(values)
    for row, n in enumerate(counts.tolist()):
        out[row, seq - n :] = values[row, :n]
    return out
