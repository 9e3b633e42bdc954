"""Export-time rewrites, as context managers that restore the model on exit.

The per-expert rewrite of fused MoE experts, shared with calibration, is ``moedge.arch.per_expert``;
its module classes are re-exported here under the name exported graphs record for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from moedge.arch.per_expert import ExpertMLP, PerExpertExperts, resolve

__all__ = [
    "GROUPED_ATTENTION",
    "ExpertMLP",
    "PerExpertExperts",
    "fake_quant_as_linear",
    "grouped_attention",
    "grouped_attention_forward",
]


@contextmanager
def fake_quant_as_linear(model: nn.Module) -> Iterator[dict[str, Any]]:
    """Trace the recipe's fake-quant linears as plain ``nn.Linear`` holding their dequantized weights.

    Yields, by module name, the int8 decisions (``LinearQuant``) that ``InsertQDQPass`` turns back into
    Q/DQ nodes on the exported graph; the fake-quant modules are restored on exit.
    """
    from moedge.calibration.quant import FakeQuantLinear
    from moedge.calibration.rotation import as_rotated
    from moedge.graph_passes.insert_qdq import LinearQuant

    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    quant: dict[str, Any] = {}
    try:
        for name, module in list(model.named_modules()):
            if not isinstance(module, FakeQuantLinear):
                continue
            lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(module.weight)
                if module.bias is not None:
                    lin.bias.copy_(module.bias)
            if module.rotation is not None:  # traced as its own module, before the linear's MatMul
                lin = as_rotated(lin, module.rotation)
            parent, leaf = resolve(model, name)
            swapped.append((parent, leaf, module))
            setattr(parent, leaf, lin)
            quant[name] = LinearQuant(
                qweight=module.qweight.numpy().copy(),
                weight_scale=module.weight_scale.numpy().astype("float32"),
                input_scale=module.input_scale,
            )
        yield quant
    finally:
        for parent, leaf, module in reversed(swapped):
            setattr(parent, leaf, module)


GROUPED_ATTENTION = "moedge_grouped"


def grouped_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention with grouped query heads folded into the sequence axis instead of repeating K and V.

    ``query`` is (batch, heads, seq, dim); ``key``/``value`` are (batch, kv_heads, total, dim). Each
    group of ``heads / kv_heads`` query heads shares one KV head (transformers' ``repeat_kv`` order), so
    the query becomes (batch, kv_heads, group * seq, dim) and multiplies the cache directly: the exported
    graph copies no expanded KV cache per step (the Expand/Transpose of heads x total x dim that
    dominated a decode step) and stays in ops TensorRT and every ORT provider run.
    """
    b, h, s, d = query.shape
    kv, t = key.shape[1], key.shape[2]
    g = h // kv
    scale = scaling if scaling is not None else d**-0.5
    scores = torch.matmul(query.reshape(b, kv, g * s, d), key.transpose(-1, -2)) * scale
    scores = scores.view(b, kv, g, s, t)
    if attention_mask is None:  # causal over the cache: query i sits at position t - s + i
        rows = torch.arange(s, device=query.device)[:, None] + (t - s)
        attention_mask = (torch.arange(t, device=query.device)[None, :] <= rows)[None, None]
    mask = attention_mask[:, :, :, :t]
    mask = mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(b, kv, g, s, t)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs.view(b, kv, g * s, t), value).view(b, h, s, d)
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def grouped_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Trace every attention layer through :func:`grouped_attention_forward` (restored on exit).

    Models whose attention needs more than a mask (sliding windows, soft-capping) keep their own.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config: Any = model.config
    sliding = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    layer_types = getattr(config, "layer_types", None) or []
    if sliding or "sliding_attention" in layer_types or getattr(config, "attn_logit_softcapping", None):
        yield model
        return
    AttentionInterface.register(GROUPED_ATTENTION, grouped_attention_forward)
    AttentionMaskInterface.register(GROUPED_ATTENTION, sdpa_mask)
    previous = config._attn_implementation
    configs: list[Any] = [
        m.config for m in model.modules() if hasattr(m, "config") and m.config is not config
    ]
    try:
        config._attn_implementation = GROUPED_ATTENTION
        for sub in configs:
            sub._attn_implementation = GROUPED_ATTENTION
        yield model
    finally:
        config._attn_implementation = previous
        for sub in configs:
            sub._attn_implementation = previous
