"""The traced module: flat tensors in and out, KV cache as explicit inputs/outputs."""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

MODULE_PREFIX = "hf"  # attribute holding the HF model; stripped from node module names


class CausalLMExport(nn.Module):
    """``(input_ids, attention_mask, position_ids, *past) -> (logits, *present)`` around an HF causal LM."""

    def __init__(self, model: PreTrainedModel, *, with_cache: bool) -> None:
        super().__init__()
        self.hf = model
        self.with_cache = with_cache
        self.num_layers = int(model.config.num_hidden_layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """Logits for every input position, plus the updated cache when exporting with one."""
        if not self.with_cache:
            out = self.hf(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
            return (out.logits,)
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.hf.config)
        out = self.hf(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        present: list[torch.Tensor] = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)
