"""The smoothing map of a family: which module of a decoder layer feeds which linears.

A *smoothing group* is a producer whose output channels can absorb a per-channel scale exactly (a norm,
or the rows of a linear whose output reaches the consumers through a channel-wise map) and the
linears that consume those channels. Valid folds, by family: norm -> q/k/v; norm -> gate/up (dense) or
router + every expert's gate/up + shared expert (MoE); v -> o per head (GQA: an o column takes the
scale of the v channel it reads); up -> down through the gated product; fc1 -> fc2 through ReLU (OPT).

A ``SmoothingMap`` names those modules, relative to a decoder layer; the MoE parts (experts, router,
shared expert) are the family's ``ArchitectureConfig`` paths. Torch-free: ``moedge.calibration.layers``
resolves the names against a model and folds the scales.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class MlpMap:
    """A feed-forward block: the linears that read its input, and the producer -> output fold inside it."""

    inputs: tuple[str, ...]  # read the block's input (the norm's output): gate/up, or fc1
    producer: str  # a linear whose output rows reach ``output``'s input columns channel-wise
    output: str  # the block's last linear


GATED_MLP = MlpMap(inputs=("gate_proj", "up_proj"), producer="up_proj", output="down_proj")
"""SwiGLU: ``down(act(gate(x)) * up(x))``, so up's rows fold into down's columns (also every
split expert, ``moedge.arch.per_expert.ExpertMLP``, and a shared expert)."""
RELU_MLP = MlpMap(inputs=("fc1",), producer="fc1", output="fc2")
"""``fc2(relu(fc1(x)))``: ReLU is positively homogeneous, so fc1's rows fold into fc2's columns."""


@dataclass(frozen=True, kw_only=True)
class SmoothingMap:
    """Module names of one decoder layer that smoothing folds through (see the module docstring)."""

    attn_norm: str  # the norm whose output q/k/v read
    qkv: tuple[str, str, str]
    out_proj: str  # reads v's channels, head by head
    mlp_norm: str  # the norm whose output the MLP (or router and experts) read
    mlp_prefix: str  # where the dense MLP's linears sit ("" for the layer itself)
    mlp: MlpMap  # a dense layer's MLP
    expert_mlp: MlpMap = GATED_MLP  # each routed expert (split per expert) and the shared expert
    shared_expert_gate: str | None = None  # an FP gate reading the MoE input beside the router
    pre_norm_flag: str | None = None  # an HF config flag that must be true for the norms to come first
    smoothquant_alpha: float = 0.8  # SmoothQuant's published strength for the family


LLAMA_LIKE = SmoothingMap(
    attn_norm="input_layernorm",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    out_proj="self_attn.o_proj",
    mlp_norm="post_attention_layernorm",
    mlp_prefix="mlp",
    mlp=GATED_MLP,
)
"""Llama, Mistral and the MoE families built on them (Mixtral, OLMoE; Qwen2-MoE adds a shared gate)."""
OPT_MAP = SmoothingMap(
    attn_norm="self_attn_layer_norm",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    out_proj="self_attn.out_proj",
    mlp_norm="final_layer_norm",
    mlp_prefix="",
    mlp=RELU_MLP,
    pre_norm_flag="do_layer_norm_before",  # False (opt-350m): LayerNorm after attention, nothing to fold into
    smoothquant_alpha=0.5,
)
