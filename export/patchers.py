"""Export-time rewrites, as context managers that restore the model on exit."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from moedge.export.configs import ArchitectureConfig


class ExpertMLP(nn.Module):
    """One expert as its own module (gate/up/down Linears) sharing storage with the fused 3-D weights."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act: nn.Module) -> None:
        super().__init__()
        inter = down.shape[1]
        self.gate_proj = nn.Linear(gate_up.shape[1], inter, bias=False, device="meta")
        self.up_proj = nn.Linear(gate_up.shape[1], inter, bias=False, device="meta")
        self.down_proj = nn.Linear(inter, down.shape[0], bias=False, device="meta")
        # Views, not copies: a 2.5 GB MoE stays 2.5 GB while it is exported.
        self.gate_proj.weight = nn.Parameter(gate_up[:inter], requires_grad=False)
        self.up_proj.weight = nn.Parameter(gate_up[inter:], requires_grad=False)
        self.down_proj.weight = nn.Parameter(down, requires_grad=False)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU-style expert MLP on the tokens routed to it."""
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PerExpertExperts(nn.ModuleList):
    """Drop-in for transformers' fused experts: same call signature, one submodule per expert.

    Each expert gathers exactly the tokens routed to it, runs, scales by its routing weight and
    scatter-adds into the output, in expert order, as transformers' eager loop does, so results are
    exact; every expert stays in the traced graph even when no example token reaches it.
    """

    def __init__(self, fused: Any) -> None:
        gate_up = fused.gate_up_proj.detach()
        down = fused.down_proj.detach()
        super().__init__([ExpertMLP(gate_up[e], down[e], fused.act_fn) for e in range(gate_up.shape[0])])

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Weighted sum of the routed experts' outputs for every token."""
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            routed = expert(hidden_states[token]) * top_k_weights[token, slot, None].to(hidden_states.dtype)
            out = out.index_add(0, token, routed)
        return out


def _resolve(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    parent_path, _, leaf = dotted.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), leaf


def split_experts(model: nn.Module, arch: ArchitectureConfig) -> list[tuple[nn.Module, str, Any]]:
    """Replace every fused experts module by ``PerExpertExperts`` in place; returns what to restore.

    Calibration keeps the split for good (the fake-quant model quantizes each expert's own linears);
    the exporter undoes it through ``per_expert_modules``.
    """
    swapped: list[tuple[nn.Module, str, Any]] = []
    if arch.experts_path is None:
        return swapped
    for layer in model.model.layers:  # type: ignore[union-attr]
        parent, leaf = _resolve(layer, arch.experts_path)
        fused = getattr(parent, leaf)
        if not hasattr(fused, "gate_up_proj"):
            continue  # a dense layer inside an MoE model (e.g. mlp_only_layers), or already split
        swapped.append((parent, leaf, fused))
        setattr(parent, leaf, PerExpertExperts(fused))
    return swapped


@contextmanager
def per_expert_modules(model: nn.Module, arch: ArchitectureConfig) -> Iterator[nn.Module]:
    """Rewrite every fused experts module into ``PerExpertExperts`` for the duration of the block."""
    swapped: list[tuple[nn.Module, str, Any]] = []
    try:
        swapped = split_experts(model, arch)
        yield model
    finally:
        for parent, leaf, fused in reversed(swapped):
            setattr(parent, leaf, fused)


@contextmanager
def fake_quant_as_linear(model: nn.Module) -> Iterator[dict[str, Any]]:
    """Trace the recipe's fake-quant linears as plain ``nn.Linear`` holding their dequantized weights.

    Yields, by module name, the int8 decisions (``LinearQuant``) that ``InsertQDQPass`` turns back into
    Q/DQ nodes on the exported graph; the fake-quant modules are restored on exit.
    """
    from moedge.calibration.quant import FakeQuantLinear
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
            parent, leaf = _resolve(model, name)
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
