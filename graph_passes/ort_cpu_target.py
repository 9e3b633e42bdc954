"""The ORT CPU target for a bundle's layer stages: the same computation on ONNX Runtime's fused CPU kernels.

``fuse_stage_for_ort_cpu`` rewrites one layer stage (``moedge split``'s ``stages/layer_NNN.onnx``):

- the attention block (head reshapes, rotate-half RoPE, the Concat-based KV cache, the mask, QK^T,
  softmax, x V, head merge) becomes one ``com.microsoft.GroupQueryAttention`` (float32) with
  ``do_rotary=1``: it rotates q and k from cos/sin tables that are graph inputs (shared by every stage,
  not copied into each) and writes the new keys/values into a (B, kv_heads, capacity, head_dim) cache
  that ORT updates in place when the same buffer is bound as past and present;
- the input RMSNorm becomes ``SimplifiedLayerNormalization``; the attention residual Add and the
  post-attention RMSNorm become one ``com.microsoft.SkipSimplifiedLayerNormalization``;
- the linears stay as they are (W8A8 QDQ pairs, which ORT fuses into ``QuantizeLinear`` +
  ``MatMulIntegerToFloat``, or FP MatMuls); with ``pack=True`` q/k/v (and gate/up) become one matmul
  when they read the same input at the same activation scale (int8 codes and per-channel weight scales
  concatenated: the integer products and their scaling are unchanged);
- the MLP, router and shared expert, and the stage's non-cache outputs, are kept as they are.

The fused stage reads ``hidden_states``, ``past_key.L``/``past_value.L``, ``seqlens_k`` (int32 (B),
each row's total length - 1), ``total_sequence_length`` (int32 scalar) and ``cos_cache``/``sin_cache``
((max_positions, head_dim / 2), see ``rotary_caches``), and writes the original stage's non-cache
outputs plus ``present_key.L``/``present_value.L``. Rows of a batch are right-padded (GQA takes no
mask). docs/ARCHITECTURE.md ("ORT CPU target") has the GroupQueryAttention contract as read in ORT's
source and checked on ORT 1.32.

A stage ORT's kernels cannot run (a head size that is not a multiple of 16, no rotary, another
attention form) is refused with ``FusionRefused`` (a ``MoedgeError``): catch it to keep the unfused stage.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from moedge.arch import get_config
from moedge.formats.graph_names import MODULE_KEY, PRESENT_PREFIX
from moedge.formats.manifest import (
    COS_CACHE,
    HIDDEN,
    SEQLENS_K,
    SIN_CACHE,
    TOTAL_SEQUENCE_LENGTH,
    past_names,
    present_names,
)
from moedge.graph_passes.expert_dispatch import MOE_COMBINE_KEY
from moedge.graph_passes.pack_linears import pack_gate_up, pack_qkv
from moedge.graph_passes.stage_patterns import (
    FusionRefused,
    RmsNorm,
    RotaryAttention,
    match_attention,
    match_rms_norm,
    module_input,
)

MS_DOMAIN = "com.microsoft"
CACHE_AXIS = "max_sequence"  # the KV buffer's (symbolic) capacity axis

__all__ = [
    "COS_CACHE",
    "SEQLENS_K",
    "SIN_CACHE",
    "TOTAL_SEQUENCE_LENGTH",
    "AttentionSpec",
    "FusionRefused",
    "fuse_norms",
    "fuse_residual_joins",
    "fuse_stage_for_ort_cpu",
    "past_names",
    "present_names",
    "rotary_caches",
]


@dataclass(frozen=True, kw_only=True)
class AttentionSpec:
    """The attention facts the fused stage is built for (one model: every layer shares them)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int  # rows of the cos/sin tables: the longest context the stages serve
    rope_theta: float

    @classmethod
    def from_config(
        cls, hf_config: Mapping[str, Any] | Any, *, max_positions: int | None = None
    ) -> AttentionSpec:
        """From a Hugging Face config (object, or dict such as an export's ``config.json``), reading the
        KV heads and head size through ``moedge.arch``; refuses RoPE variants and windows GQA's rotary
        would not reproduce (scaled RoPE, partial rotary, a sliding window)."""

        def get(key: str, default: Any = None) -> Any:
            if isinstance(hf_config, Mapping):
                return hf_config.get(key, default)
            return getattr(hf_config, key, default)

        arch = get_config(str(get("model_type")))
        rope = dict(get("rope_parameters") or get("rope_scaling") or {})
        theta = rope.get("rope_theta", get("rope_theta"))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if theta is None or kind != "default":
            raise FusionRefused(f"{arch.name}: RoPE {kind!r} (theta {theta}) is not plain RoPE")
        if float(get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
            raise FusionRefused(f"{arch.name}: partial rotary embedding")
        if get("sliding_window") and get("use_sliding_window", True):
            raise FusionRefused(f"{arch.name}: a sliding attention window")
        return cls(
            num_heads=int(get("num_attention_heads")),
            num_kv_heads=arch.num_kv_heads(
                hf_config if not isinstance(hf_config, Mapping) else _Attrs(hf_config)
            ),
            head_dim=arch.head_dim(hf_config if not isinstance(hf_config, Mapping) else _Attrs(hf_config)),
            max_positions=int(max_positions or get("max_position_embeddings")),
            rope_theta=float(theta),
        )


class _Attrs:
    """A dict read as attributes (``ArchitectureConfig`` reads HF config objects)."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.__dict__.update(raw)


def rotary_caches(spec: AttentionSpec) -> tuple[np.ndarray, np.ndarray]:
    """GroupQueryAttention's ``cos_cache``/``sin_cache``, (max_positions, head_dim / 2) float32.

    Computed as transformers' default RoPE (and the exported embedding stage) computes its tables, in
    float32: ``inv_freq = 1 / theta ** (arange(0, H, 2) / H)``, angle = position * inv_freq; GQA's
    rotate-half mode reads column i for both halves of a head.
    """
    exponent = np.arange(0, spec.head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(spec.head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(spec.rope_theta), exponent)).astype(np.float32)
    angles = np.arange(spec.max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


_Model = TypeVar("_Model")


def fuse_stage_for_ort_cpu(stage: _Model, spec: AttentionSpec, *, pack: bool = True) -> _Model:
    """``stage`` (an ``onnx_ir.Model`` or ``onnx.ModelProto`` of one layer stage) on ORT's fused CPU kernels.

    A ``ModelProto`` must hold its weights (``onnx.load`` loads external data by default); an
    ``onnx_ir.Model`` may keep them external (``ir.load``): they are read only to pack linears.

    Functional: returns a new model of the same kind and leaves ``stage`` as it was. Raises
    ``FusionRefused`` when the stage cannot use them (see the module docstring).
    """
    if spec.head_dim % 16 != 0:
        raise FusionRefused(
            f"head size {spec.head_dim} is not a multiple of 16, which ORT's GroupQueryAttention needs to "
            "apply rotary embeddings: keep the unfused stage"
        )
    if spec.num_heads % spec.num_kv_heads != 0:
        raise FusionRefused(f"{spec.num_heads} query heads do not group over {spec.num_kv_heads} KV heads")
    if isinstance(stage, ir.Model):
        return _fuse(stage.clone(), spec, pack)  # type: ignore[return-value]
    import onnx

    if not isinstance(stage, onnx.ModelProto):
        raise TypeError(f"expected an onnx_ir.Model or onnx.ModelProto, got {type(stage).__name__}")
    return ir.to_proto(_fuse(ir.from_proto(stage), spec, pack))  # type: ignore[return-value]


@dataclass(frozen=True)
class _Layer:
    index: int
    hidden: ir.Value
    input_norm: RmsNorm
    residual: ir.Node  # Add(hidden, attention output projection)
    post_norm: RmsNorm
    attention: RotaryAttention


def _fuse(model: ir.Model, spec: AttentionSpec, pack: bool) -> ir.Model:
    graph = model.graph
    layer = _match_layer(graph, spec)
    attention = layer.attention
    if pack:
        attention = pack_qkv(graph, attention) or attention
        pack_gate_up(graph, layer.post_norm.output)
    inputs = _fused_inputs(layer, spec)
    _replace_norms(graph, layer)
    _replace_attention(graph, layer.index, attention, spec, inputs)
    _replace_other_norms(graph)
    old_inputs = [v for v in graph.inputs if v is not layer.hidden]
    graph.inputs.clear()
    graph.inputs.extend([layer.hidden, *inputs.values()])
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    graph.opset_imports.setdefault(MS_DOMAIN, 1)
    common_passes.RemoveUnusedNodesPass()(model)
    _reroute_shape_reads(graph, layer.hidden, old_inputs)
    common_passes.TopologicalSortPass()(model)
    return model


def _match_layer(graph: ir.Graph, spec: AttentionSpec) -> _Layer:
    hidden = next((v for v in graph.inputs if v.name == HIDDEN), None)
    if hidden is None:
        raise FusionRefused(f"the graph has no {HIDDEN!r} input: not a bundle layer stage")
    outputs = {v.name: v for v in graph.outputs}
    found = [
        int(m.group(1)) for n in outputs if (m := re.fullmatch(rf"{PRESENT_PREFIX}\.(\d+)\.key", n or ""))
    ]
    if len(found) != 1 or f"{PRESENT_PREFIX}.{found[0]}.value" not in outputs:
        raise FusionRefused(
            "the stage has no single layer's KV-cache outputs (an export made with --no-cache?)"
        )
    index = found[0]
    attention = match_attention(
        graph,
        outputs[f"{PRESENT_PREFIX}.{index}.key"],
        outputs[f"{PRESENT_PREFIX}.{index}.value"],
        spec.head_dim,
    )
    if attention.rotary_dim != spec.head_dim:
        raise FusionRefused(
            f"rotary tables of width {attention.rotary_dim}, not the head size {spec.head_dim}"
        )
    if not (math.isfinite(attention.scale) and attention.scale > 0):
        raise FusionRefused(f"softmax scale {attention.scale:g}")
    adds = [u for u, _ in hidden.uses() if u.op_type == "Add"]
    norms = _unique(
        n for n in (_norm_after(v) for v, _ in hidden.uses()) if n is not None and n.input is hidden
    )
    if len(adds) != 1 or len(norms) != 1:
        raise FusionRefused(
            "the stage is not a pre-norm layer (one RMSNorm and one residual Add on its input)"
        )
    residual = adds[0]
    after = _unique(n for n in (_norm_after(u) for u, _ in residual.outputs[0].uses()) if n is not None)
    if len(after) != 1 or after[0].input is not residual.outputs[0]:
        raise FusionRefused("no RMSNorm follows the attention residual")
    o_out = next(v for v in residual.inputs if v is not hidden)
    if o_out is None or module_input(graph, o_out) is not attention.output:
        raise FusionRefused("the residual Add does not add the attention's output projection")
    return _Layer(index, hidden, norms[0], residual, after[0], attention)


def _unique(norms: Iterable[RmsNorm]) -> list[RmsNorm]:
    return list({id(n.output): n for n in norms}.values())


def _norm_after(start: ir.Node) -> RmsNorm | None:
    """The RMSNorm (if any) that ``start`` (a node reading the norm's input) belongs to."""
    seen: set[ir.Node] = set()
    todo = [start]
    while todo:  # the norm's nodes share its module: follow them to its last Mul
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op_type == "Mul":
            norm = match_rms_norm(node.outputs[0])
            if norm is not None:
                return norm
        todo += [
            u for v in node.outputs for u, _ in v.uses() if u.metadata_props.get(MODULE_KEY) == _module(start)
        ]
    return None


def _module(node: ir.Node) -> str:
    return node.metadata_props.get(MODULE_KEY, "")


def _fused_inputs(layer: _Layer, spec: AttentionSpec) -> dict[str, ir.Value]:
    batch = layer.hidden.shape[0] if layer.hidden.shape is not None else "batch"
    cache = ir.Shape([batch, spec.num_kv_heads, CACHE_AXIS, spec.head_dim])
    table = ir.Shape([spec.max_positions, spec.head_dim // 2])
    past_key, past_value = past_names(layer.index)
    specs = {
        past_key: (ir.DataType.FLOAT, cache),
        past_value: (ir.DataType.FLOAT, cache),
        SEQLENS_K: (ir.DataType.INT32, ir.Shape([batch])),
        TOTAL_SEQUENCE_LENGTH: (ir.DataType.INT32, ir.Shape([])),
        COS_CACHE: (ir.DataType.FLOAT, table),
        SIN_CACHE: (ir.DataType.FLOAT, table),
    }
    return {
        name: ir.Value(name=name, type=ir.TensorType(dtype), shape=shape)
        for name, (dtype, shape) in specs.items()
    }


def _node(
    graph: ir.Graph, before: ir.Node, op: str, inputs: list[ir.Value | None], module: str, **kw: Any
) -> ir.Node:
    """A node inserted before ``before``, tagged with ``module`` like the nodes it replaces."""
    domain = kw.pop("domain", "")
    outputs = kw.pop("num_outputs", 1)
    node = ir.node(op, inputs, attributes=kw, domain=domain, num_outputs=outputs)
    node.metadata_props[MODULE_KEY] = module
    graph.insert_before(before, node)
    return node


def _take_over(old: ir.Value, new: ir.Value) -> None:
    """Every use of ``old`` (graph outputs too, keeping the output's name) now reads ``new``."""
    name, output = old.name, old.is_graph_output()
    new.type, new.shape = old.type, old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if output:
        old.name = f"{name}.unfused"
        new.name = name


def _replace_norms(graph: ir.Graph, layer: _Layer) -> None:
    first, post = layer.input_norm, layer.post_norm
    anchor = first.output.producer()
    assert anchor is not None
    _simplified_norm(graph, anchor, first)
    skip_in = next(v for v in layer.residual.inputs if v is not layer.hidden)
    anchor = post.output.producer()
    assert anchor is not None
    fused = _node(
        graph,
        anchor,
        "SkipSimplifiedLayerNormalization",
        [skip_in, layer.hidden, post.weight],
        post.module,
        epsilon=post.epsilon,
        domain=MS_DOMAIN,
        num_outputs=4,
    )
    _take_over(post.output, fused.outputs[0])
    _take_over(layer.residual.outputs[0], fused.outputs[3])


def _replace_other_norms(graph: ir.Graph) -> None:
    """Any other RMSNorm in the stage (OLMoE's q/k norms) as ``SimplifiedLayerNormalization``."""
    for node in [n for n in graph if n.op_type == "Mul"]:
        live = node.outputs[0].is_graph_output() or bool(node.outputs[0].uses())
        norm = match_rms_norm(node.outputs[0]) if live else None  # not the replaced norms' leftovers
        if norm is not None:
            _simplified_norm(graph, node, norm)


def _simplified_norm(graph: ir.Graph, anchor: ir.Node, norm: RmsNorm) -> None:
    """``norm`` as one ``SimplifiedLayerNormalization`` placed at ``anchor``, taking over its readers."""
    fused = _node(
        graph,
        anchor,
        "SimplifiedLayerNormalization",
        [norm.input, norm.weight],
        norm.module,
        axis=-1,
        epsilon=norm.epsilon,
    )
    _take_over(norm.output, fused.outputs[0])


def _replace_attention(
    graph: ir.Graph, index: int, att: RotaryAttention, spec: AttentionSpec, inputs: dict[str, ir.Value]
) -> None:
    anchor = att.output.producer()
    assert anchor is not None
    past_key, past_value = past_names(index)
    packed = att.key is att.query  # pack_qkv made query the one (q | k | v) projection
    gqa = _node(
        graph,
        anchor,
        "GroupQueryAttention",
        [
            att.query,
            None if packed else att.key,
            None if packed else att.value,
            inputs[past_key],
            inputs[past_value],
            inputs[SEQLENS_K],
            inputs[TOTAL_SEQUENCE_LENGTH],
            inputs[COS_CACHE],
            inputs[SIN_CACHE],
        ],
        att.module,
        domain=MS_DOMAIN,
        num_outputs=3,
        num_heads=spec.num_heads,
        kv_num_heads=spec.num_kv_heads,
        do_rotary=1,
        rotary_interleaved=0,
        scale=float(att.scale),
    )
    _take_over(att.output, gqa.outputs[0])
    for old, new, name in zip(
        (att.present_key, att.present_value), gqa.outputs[1:], present_names(index), strict=True
    ):
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        old.name = f"{old.name}.unfused"
        new.name = name
        new.dtype = ir.DataType.FLOAT
        new.shape = inputs[past_key].shape


def _reroute_shape_reads(graph: ir.Graph, hidden: ir.Value, old_inputs: list[ir.Value]) -> None:
    """Shape reads of a dropped ``input_ids`` come from ``hidden_states`` (same batch and sequence
    axes), and so do reads of a dropped cache input's batch axis (the exporter may take the batch size
    from any input that has it); anything else still reading a dropped input is a part of the stage
    this pass does not know."""
    for value in old_inputs:
        for user, _ in list(value.uses()):
            start = user.attributes["start"].as_int() if "start" in user.attributes else 0
            end = user.attributes["end"].as_int() if "end" in user.attributes else None
            if (
                value.name == "input_ids"
                and user.op_type == "Shape"
                and 0 <= start
                and (end in (1, 2) or end is None)
            ):
                user.replace_input_with(0, hidden)
                user.attributes["end"] = ir.AttrInt64("end", 2 if end is None else end)
                continue
            if user.op_type == "Shape" and start == 0 and end == 1:  # the batch axis of a cache input
                user.replace_input_with(0, hidden)
                continue
            raise FusionRefused(
                f"{user.op_type} node {user.name} outside the attention block reads {value.name}"
            )


def fuse_residual_joins(model: ir.Model) -> int:
    """In joined dense layers (``merge_layer_stages``), each layer's closing residual Add and the next
    layer's input RMSNorm as one ``SkipSimplifiedLayerNormalization`` (the attention residual and the
    post-attention norm already are one): its first output is the norm, its fourth the sum, which the
    next layer's attention residual reads. An in-graph MoE layer's closing Add (``MOE_COMBINE_KEY``)
    is left as it is. Returns how many joins were fused; in place.
    """
    graph = model.graph
    fused = 0
    for norm in [n for n in graph if n.op_type == "SimplifiedLayerNormalization" and n.domain == ""]:
        total = norm.inputs[0]
        add = total.producer() if total is not None else None
        if add is None or add.op_type != "Add" or total is None or total.is_graph_output():
            continue
        if MOE_COMBINE_KEY in add.metadata_props:  # an in-graph MoE layer's output: kept exact
            continue
        residual = next((v for v in add.inputs if _is_skip_sum(v)), None)
        other = next((v for v in add.inputs if v is not residual), None)
        if residual is None or other is None or not _same_rank3(residual, other):
            continue
        epsilon = norm.attributes["epsilon"].as_float() if "epsilon" in norm.attributes else 1e-5
        skip = _node(
            graph,
            norm,
            "SkipSimplifiedLayerNormalization",
            [other, residual, norm.inputs[1]],
            _module(norm),
            epsilon=epsilon,
            domain=MS_DOMAIN,
            num_outputs=4,
        )
        _take_over(norm.outputs[0], skip.outputs[0])
        _take_over(total, skip.outputs[3])
        fused += 1
    if fused:
        common_passes.RemoveUnusedNodesPass()(model)
        common_passes.TopologicalSortPass()(model)
    return fused


def _is_skip_sum(value: ir.Value | None) -> bool:
    """``value`` is a SkipSimplifiedLayerNormalization's sum output (a layer's residual stream)."""
    node = value.producer() if value is not None else None
    return (
        value is not None
        and node is not None
        and node.op_type == "SkipSimplifiedLayerNormalization"
        and len(node.outputs) == 4
        and node.outputs[3] is value
    )


def _same_rank3(a: ir.Value, b: ir.Value) -> bool:
    """Both (batch, sequence, hidden) as far as their shapes are known (no broadcasting Add)."""
    if a.shape is None or b.shape is None:
        return a.shape is not None or b.shape is not None
    return len(a.shape) == 3 and len(b.shape) == 3 and a.shape[-1] == b.shape[-1]


def fuse_norms(model: ir.Model) -> ir.Model:
    """Every RMSNorm of ``model`` (the head's final norm) as one ``SimplifiedLayerNormalization``; in place."""
    _replace_other_norms(model.graph)
    common_passes.RemoveUnusedNodesPass()(model)
    return model
