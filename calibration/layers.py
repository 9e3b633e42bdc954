"""What calibration needs to know about one decoder layer: its linears, shared inputs and smoothing map.

A *smoothing group* is a producer whose output channels can absorb a per-channel scale exactly (a norm,
or the rows of a linear whose output reaches the consumers through a channel-wise map) and the
linears that consume those channels. Dividing the producer's channel j by s_j and multiplying every
consumer's input column j by s_j leaves the function unchanged while moving activation outliers into
the weights. Valid folds, by family: norm -> q/k/v; norm -> gate/up (dense) or router + every expert's
gate/up + shared expert (MoE); v -> o per head (GQA: an o column takes the scale of the v channel
it reads); up -> down through the gated product; fc1 -> fc2 through ReLU (OPT).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moedge._errors import MoedgeError

SMOOTHABLE_TYPES = ("llama", "mistral", "opt", "mixtral", "qwen2_moe", "olmoe")


@dataclass
class SmoothGroup:
    """A producer, the linears that read its channels, and how their columns map to its channels."""

    name: str
    kind: str  # "norm" (a norm's weight/bias) or "rows" (a linear's output rows)
    producer: nn.Module
    consumers: list[str]  # linear names (relative to the layer) whose input columns take the scale
    stat_key: str  # the input key whose per-channel absmax sizes the scale
    fp_consumers: list[nn.Module] = field(
        default_factory=list
    )  # routers/gates: columns scaled, never quantized
    expand: torch.Tensor | None = None  # consumer column -> producer channel (GQA); None = identity

    @property
    def channels(self) -> int:
        """Number of producer channels that carry a scale."""
        producer: Any = self.producer
        return int(producer.weight.shape[0])

    def fold(self, s: torch.Tensor, linears: Mapping[str, nn.Module]) -> None:
        """Divide the producer's channels by ``s`` and multiply the consumers' columns by it (exact)."""
        with torch.no_grad():
            p: Any = self.producer
            if self.kind == "norm":
                p.weight.div_(s)
            else:
                p.weight.div_(s[:, None])
            if getattr(p, "bias", None) is not None:
                p.bias.div_(s)
            cols = s if self.expand is None else s[self.expand]
            consumers: list[Any] = [linears[name] for name in self.consumers] + list(self.fp_consumers)
            for module in consumers:
                module.weight.mul_(cols[None, :])


@dataclass
class LayerSpec:
    """The linears of one decoder layer, which of them share an input, and its smoothing groups."""

    index: int
    linears: dict[str, nn.Linear]  # quantizable linears, names relative to the layer
    input_key: dict[str, str]  # linear name -> shared-input key
    observed: dict[str, nn.Module]  # input key -> the one module whose input is recorded for the key
    groups: list[SmoothGroup]
    routers: list[str]  # FP-only modules (router, shared-expert gate), names relative to the layer
    experts_module: nn.Module | None = None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported causal LM."""
    inner: Any = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return inner.layers  # type: ignore[no-any-return]
    if inner is not None and hasattr(inner, "decoder"):
        return inner.decoder.layers  # type: ignore[no-any-return]
    raise MoedgeError(f"cannot find the decoder layers of {type(model).__name__}")


class HeadBlock(nn.Module):
    """The final norm and the LM head as one calibration unit (the norm is its smoothing producer)."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, hidden: torch.Tensor, **_: Any) -> torch.Tensor:
        """Logits of the last decoder layer's output."""
        return self.lm_head(self.norm(hidden))  # type: ignore[no-any-return]


def head_modules(model: nn.Module) -> tuple[str, nn.Module]:
    """The final norm's module name and module (the producer of the LM head's input)."""
    inner: Any = getattr(model, "model", None)
    for name in ("norm", "decoder.final_layer_norm"):
        try:
            norm = inner.get_submodule(name) if inner is not None else None
        except AttributeError:
            continue
        if norm is not None and getattr(model, "lm_head", None) is not None:
            return f"model.{name}", norm
    raise MoedgeError(
        f"cannot find the final norm and lm_head of {type(model).__name__}: quantizing the head is not supported"
    )


def untie_head(model: nn.Module) -> None:
    """Give the LM head its own weight when it shares the embedding's (quantizing it must not touch the table)."""
    head: Any = getattr(model, "lm_head", None)
    emb: Any = model.get_input_embeddings()  # type: ignore[operator]
    if head is not None and isinstance(head, nn.Linear) and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone())
    cfg: Any = getattr(model, "config", None)
    if cfg is not None:
        cfg.tie_word_embeddings = False


def head_spec(block: HeadBlock) -> LayerSpec:
    """The head as a one-linear layer: the final norm smooths into the LM head's columns."""
    linears: dict[str, nn.Linear] = {"lm_head": block.lm_head}  # type: ignore[dict-item]
    return LayerSpec(
        index=-1,
        linears=linears,
        input_key={"lm_head": "head_in"},
        observed={"head_in": block.lm_head},
        groups=[SmoothGroup("head_in", "norm", block.norm, ["lm_head"], "head_in")],
        routers=[],
    )


def _gqa_expand(num_heads: int, num_kv: int, head_dim: int) -> torch.Tensor | None:
    if num_heads == num_kv:
        return None
    group = num_heads // num_kv
    heads = torch.arange(num_heads * head_dim) // head_dim
    within = torch.arange(num_heads * head_dim) % head_dim
    return (heads // group) * head_dim + within


def layer_spec(model: nn.Module, index: int) -> LayerSpec:
    """Describe decoder layer ``index`` of ``model`` (experts must already be split per expert)."""
    cfg: Any = getattr(model, "config", None)
    model_type = str(getattr(cfg, "model_type", type(model).__name__))
    if model_type not in SMOOTHABLE_TYPES:
        raise MoedgeError(
            f"no smoothing map for model type {model_type!r}; calibration supports {', '.join(SMOOTHABLE_TYPES)}"
        )
    layer: Any = decoder_layers(model)[index]
    if model_type == "opt":
        return _opt_spec(layer, index, cfg)
    return _llama_like_spec(layer, index, cfg)


def _opt_spec(layer: Any, index: int, cfg: Any) -> LayerSpec:
    if not getattr(cfg, "do_layer_norm_before", True):
        raise MoedgeError(
            "this OPT checkpoint applies LayerNorm after attention (do_layer_norm_before=False, e.g. opt-350m): "
            "there is no norm to fold smoothing into; calibration supports pre-norm OPT models"
        )
    attn = layer.self_attn
    linears: dict[str, nn.Linear] = {
        "self_attn.q_proj": attn.q_proj,
        "self_attn.k_proj": attn.k_proj,
        "self_attn.v_proj": attn.v_proj,
        "self_attn.out_proj": attn.out_proj,
        "fc1": layer.fc1,
        "fc2": layer.fc2,
    }
    key = {
        "self_attn.q_proj": "attn_in",
        "self_attn.k_proj": "attn_in",
        "self_attn.v_proj": "attn_in",
        "self_attn.out_proj": "attn_out",
        "fc1": "mlp_in",
        "fc2": "mlp_out",
    }
    observed = {"attn_in": attn.q_proj, "attn_out": attn.out_proj, "mlp_in": layer.fc1, "mlp_out": layer.fc2}
    groups = [
        SmoothGroup(
            "attn_in",
            "norm",
            layer.self_attn_layer_norm,
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            "attn_in",
        ),
        SmoothGroup("attn_out", "rows", attn.v_proj, ["self_attn.out_proj"], "attn_out"),
        SmoothGroup("mlp_in", "norm", layer.final_layer_norm, ["fc1"], "mlp_in"),
        SmoothGroup("mlp_out", "rows", layer.fc1, ["fc2"], "mlp_out"),
    ]
    return LayerSpec(index, linears, key, observed, groups, routers=[])


def _llama_like_spec(layer: Any, index: int, cfg: Any) -> LayerSpec:
    attn = layer.self_attn
    num_heads = int(cfg.num_attention_heads)
    num_kv = int(getattr(cfg, "num_key_value_heads", None) or num_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads)
    linears: dict[str, nn.Linear] = {
        f"self_attn.{p}": getattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    }
    key = {
        "self_attn.q_proj": "attn_in",
        "self_attn.k_proj": "attn_in",
        "self_attn.v_proj": "attn_in",
        "self_attn.o_proj": "attn_out",
    }
    observed: dict[str, nn.Module] = {"attn_in": attn.q_proj, "attn_out": attn.o_proj}
    groups = [
        SmoothGroup(
            "attn_in",
            "norm",
            layer.input_layernorm,
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            "attn_in",
        ),
        SmoothGroup(
            "attn_out",
            "rows",
            attn.v_proj,
            ["self_attn.o_proj"],
            "attn_out",
            expand=_gqa_expand(num_heads, num_kv, head_dim),
        ),
    ]
    mlp = layer.mlp
    routers: list[str] = []
    experts_module: Any = None
    if hasattr(mlp, "experts"):
        experts_module = mlp.experts
        if not isinstance(experts_module, nn.ModuleList):
            raise MoedgeError(
                "calibration needs the experts split per expert (export.patchers.split_experts)"
            )
        routers.append("mlp.gate")
        observed["mlp_in"] = mlp.gate
        mlp_in_consumers: list[str] = []
        fp_consumers: list[nn.Module] = [mlp.gate]
        expert: Any
        for e, expert in enumerate(experts_module):
            prefix = f"mlp.experts.{e}"
            mlp_in_consumers += _gated_mlp(prefix, expert, f"{prefix}.in", linears, key, observed, groups)
        shared = getattr(mlp, "shared_expert", None)
        if shared is not None:  # reads the same tensor as the router: its input key is mlp_in
            mlp_in_consumers += _gated_mlp(
                "mlp.shared_expert", shared, "mlp_in", linears, key, observed, groups
            )
            gate = getattr(mlp, "shared_expert_gate", None)
            if gate is not None:
                routers.append("mlp.shared_expert_gate")
                fp_consumers.append(gate)
        groups.insert(
            2,
            SmoothGroup(
                "mlp_in",
                "norm",
                layer.post_attention_layernorm,
                mlp_in_consumers,
                "mlp_in",
                fp_consumers=fp_consumers,
            ),
        )
    else:
        consumers = _gated_mlp("mlp", mlp, "mlp_in", linears, key, observed, groups)
        groups.insert(2, SmoothGroup("mlp_in", "norm", layer.post_attention_layernorm, consumers, "mlp_in"))
    return LayerSpec(index, linears, key, observed, groups, routers, experts_module)


def _gated_mlp(
    prefix: str,
    mlp: Any,
    in_key: str,
    linears: dict[str, nn.Linear],
    key: dict[str, str],
    observed: dict[str, nn.Module],
    groups: list[SmoothGroup],
) -> list[str]:
    """Register a gate/up/down MLP (dense, routed expert or shared expert) and its up -> down group.

    Returns its gate/up names, the consumers of the norm that feeds ``in_key``.
    """
    for p in ("gate_proj", "up_proj", "down_proj"):
        linears[f"{prefix}.{p}"] = getattr(mlp, p)
    key[f"{prefix}.gate_proj"] = key[f"{prefix}.up_proj"] = in_key
    key[f"{prefix}.down_proj"] = f"{prefix}.out" if prefix != "mlp" else "mlp_out"
    observed.setdefault(in_key, mlp.gate_proj)  # an MoE layer's mlp_in is recorded at the router
    observed[key[f"{prefix}.down_proj"]] = mlp.down_proj
    groups.append(
        SmoothGroup(
            f"{prefix}.mlp_out" if prefix != "mlp" else "mlp_out",
            "rows",
            mlp.up_proj,
            [f"{prefix}.down_proj"],
            key[f"{prefix}.down_proj"],
        )
    )
    return [f"{prefix}.gate_proj", f"{prefix}.up_proj"]
