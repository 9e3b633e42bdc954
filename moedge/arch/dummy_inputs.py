"""The example inputs and dynamic shapes the exporter traces a causal LM with (torch needed)."""

from __future__ import annotations

from typing import Any

from moedge.arch.config import ArchitectureConfig


def example_inputs(hf_config: Any, arch: ArchitectureConfig, with_cache: bool) -> tuple[Any, ...]:
    """``(input_ids, attention_mask, position_ids, *past)`` for one trace, seeded (same every call).

    Batch 2, 3 new tokens, 4 cached: distinct sizes, so no dynamic axis is specialized or merged.
    """
    import torch

    batch, seq, past = 2, 3, 4
    ids = torch.randint(
        0, int(hf_config.vocab_size), (batch, seq), generator=torch.Generator().manual_seed(0)
    )
    total = seq + (past if with_cache else 0)
    mask = torch.ones(batch, total, dtype=torch.int64)
    start = past if with_cache else 0
    pos = torch.arange(start, start + seq, dtype=torch.int64)[None].expand(batch, seq).contiguous()
    kv: list[torch.Tensor] = []
    if with_cache:
        shape = (batch, arch.num_kv_heads(hf_config), past, arch.head_dim(hf_config))
        kv = [torch.zeros(shape) for _ in range(2 * int(hf_config.num_hidden_layers))]
    return (ids, mask, pos, *kv)


def dynamic_shapes(num_layers: int, with_cache: bool) -> dict[str, Any]:
    """``torch.export`` dynamic axes of those inputs: batch, sequence, total and past lengths."""
    from torch.export import Dim

    batch, seq, total, past = Dim("batch"), Dim("sequence"), Dim("total_sequence"), Dim("past_sequence")
    shapes: dict[str, Any] = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total if with_cache else seq},
        "position_ids": {0: batch, 1: seq},
    }
    if with_cache:
        shapes["past"] = tuple({0: batch, 2: past} for _ in range(2 * num_layers))
    return shapes
