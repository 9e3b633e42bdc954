"""One module per MoE expert: the rewrite of transformers' fused experts that calibration and export share.

Calibration keeps the split for good (the fake-quant model quantizes each expert's own linears); the
exporter applies it for the duration of a trace (``per_expert_modules``). ``experts_path`` of the
family's ``ArchitectureConfig`` says where the fused experts sit in a decoder layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from moedge.arch.config import ArchitectureConfig


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


def resolve(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the submodule ``dotted`` of ``root``."""
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
        parent, leaf = resolve(layer, arch.experts_path)
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
