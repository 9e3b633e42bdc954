"""What calibration needs to know about one decoder layer: its linears, shared inputs and smoothing groups.

A *smoothing group* is a producer whose output channels can absorb a per-channel scale exactly (a norm,
or the rows of a linear whose output reaches the consumers through a channel-wise map) and the
linears that consume those channels. Dividing the producer's channel j by s_j and multiplying every
consumer's input column j by s_j leaves the function unchanged while moving activation outliers into
the weights. Which module feeds which linears is a fact of the family, named in its smoothing map
(``moedge.arch.smoothing``); ``layer_spec`` resolves those names against a model's decoder layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moedge._errors import MoedgeError
from moedge.arch import ArchitectureConfig, get_config, smoothing_map
from moedge.arch.smoothing import MlpMap, SmoothingMap


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
    mlp_outputs: list[str] = field(default_factory=list)  # each MLP's last linear (down_proj, fc2)


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
    """Describe decoder layer ``index`` of ``model`` by its family's smoothing map (experts split per expert)."""
    cfg: Any = getattr(model, "config", None)
    model_type = str(getattr(cfg, "model_type", type(model).__name__))
    smap = smoothing_map(model_type)
    arch = get_config(model_type)
    if smap.pre_norm_flag is not None and not getattr(cfg, smap.pre_norm_flag, True):
        raise MoedgeError(
            f"this {arch.name} checkpoint applies its norms after attention ({smap.pre_norm_flag}=False): "
            f"there is no norm to fold smoothing into; calibration supports pre-norm {arch.name} models"
        )
    layer: Any = decoder_layers(model)[index]
    spec = LayerSpec(index, linears={}, input_key={}, observed={}, groups=[], routers=[])
    expand = _gqa_expand(int(cfg.num_attention_heads), arch.num_kv_heads(cfg), arch.head_dim(cfg))
    _attention(spec, layer, smap, expand)
    experts = _submodule(layer, arch.experts_path)
    fp_consumers: list[nn.Module] = []
    if experts is None:
        mlp = layer.get_submodule(smap.mlp_prefix)
        consumers = _mlp(spec, mlp, smap.mlp_prefix, smap.mlp, ("mlp_in", "mlp_out", "mlp_out"))
    else:
        consumers, fp_consumers = _moe(spec, layer, arch, smap, experts)
    norm = layer.get_submodule(smap.mlp_norm)
    spec.groups.insert(2, SmoothGroup("mlp_in", "norm", norm, consumers, "mlp_in", fp_consumers=fp_consumers))
    return spec


def _submodule(layer: nn.Module, path: str | None) -> nn.Module | None:
    """``layer``'s module at ``path``; None when there is none (a dense layer of an MoE family)."""
    if path is None:
        return None
    try:
        return layer.get_submodule(path)
    except AttributeError:
        return None


def _attention(spec: LayerSpec, layer: nn.Module, smap: SmoothingMap, expand: torch.Tensor | None) -> None:
    """q/k/v read the attention norm; o (or out_proj) reads v's channels, head by head."""
    q, k, v = smap.qkv
    for name, key in ((q, "attn_in"), (k, "attn_in"), (v, "attn_in"), (smap.out_proj, "attn_out")):
        spec.linears[name] = layer.get_submodule(name)  # type: ignore[assignment]
        spec.input_key[name] = key
    spec.observed["attn_in"] = spec.linears[q]
    spec.observed["attn_out"] = spec.linears[smap.out_proj]
    norm = layer.get_submodule(smap.attn_norm)
    spec.groups.append(SmoothGroup("attn_in", "norm", norm, [q, k, v], "attn_in"))
    spec.groups.append(
        SmoothGroup("attn_out", "rows", spec.linears[v], [smap.out_proj], "attn_out", expand=expand)
    )


def _moe(
    spec: LayerSpec, layer: nn.Module, arch: ArchitectureConfig, smap: SmoothingMap, experts: nn.Module
) -> tuple[list[str], list[nn.Module]]:
    """Register the router (FP), every routed expert and a shared expert; returns the MoE input's
    quantized consumers (the experts' input linears) and FP ones (router, shared-expert gate)."""
    if not isinstance(experts, nn.ModuleList) or arch.router_path is None:
        raise MoedgeError(
            "calibration needs the experts split per expert (moedge.arch.per_expert.split_experts)"
        )
    spec.experts_module = experts
    router = layer.get_submodule(arch.router_path)
    spec.routers.append(arch.router_path)
    spec.observed["mlp_in"] = router
    consumers: list[str] = []
    fp_consumers = [router]
    for e, expert in enumerate(experts):
        prefix = f"{arch.experts_path}.{e}"
        keys = (f"{prefix}.in", f"{prefix}.out", f"{prefix}.mlp_out")
        consumers += _mlp(spec, expert, prefix, smap.expert_mlp, keys)
    shared = _submodule(layer, arch.shared_expert_path)
    if shared is not None and arch.shared_expert_path is not None:
        prefix = arch.shared_expert_path  # reads the same tensor as the router: its input key is mlp_in
        consumers += _mlp(
            spec, shared, prefix, smap.expert_mlp, ("mlp_in", f"{prefix}.out", f"{prefix}.mlp_out")
        )
        gate = _submodule(layer, smap.shared_expert_gate)
        if gate is not None and smap.shared_expert_gate is not None:
            spec.routers.append(smap.shared_expert_gate)
            fp_consumers.append(gate)
    return consumers, fp_consumers


def _mlp(spec: LayerSpec, mlp: nn.Module, prefix: str, form: MlpMap, keys: tuple[str, str, str]) -> list[str]:
    """Register a feed-forward block (dense, routed expert or shared expert) and its producer -> output group.

    ``keys`` are its input key, its output linear's input key and the group's name. Returns the names
    of its input linears, the consumers of the norm that feeds its input.
    """
    in_key, out_key, group = keys

    def full(name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    for name in (*form.inputs, form.output):
        spec.linears[full(name)] = mlp.get_submodule(name)  # type: ignore[assignment]
        spec.input_key[full(name)] = in_key
    spec.input_key[full(form.output)] = out_key
    spec.observed.setdefault(in_key, spec.linears[full(form.inputs[0])])  # an MoE layer's is the router
    spec.observed[out_key] = spec.linears[full(form.output)]
    spec.mlp_outputs.append(full(form.output))
    producer = spec.linears[full(form.producer)]
    spec.groups.append(SmoothGroup(group, "rows", producer, [full(form.output)], out_key))
    return [full(name) for name in form.inputs]
