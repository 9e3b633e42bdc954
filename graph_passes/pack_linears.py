"""Packing linears that read the same input into one matmul: q/k/v, and gate/up.

Bias-free linears in either form the exporter writes: FP ``MatMul(x, Transpose(W))`` and W8A8
``MatMul(DequantizeLinear(QuantizeLinear(x, s, z), s, z), DequantizeLinear(Wq, ws, wz, axis=1))``. They are
packed only when they read the same ``x`` in the same form and, for W8A8, at the same activation scale and
zero point: then ``x`` is quantized once, the int8 weight codes and their per-output-channel scales are
concatenated, and every output element is the same integer dot product scaled by the same two factors
(exact). Different activation scales (HAQ picks one per linear) leave the linears as they are.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from moedge.formats.graph_names import MODULE_KEY
from moedge.graph_passes.stage_patterns import RotaryAttention, const_array


@dataclass(frozen=True)
class _Linear:
    output: ir.Value
    input: ir.Value  # the activation, before any Q/DQ
    weight: np.ndarray  # FP: (in, out) float; W8A8: int8 codes (in, out)
    weight_scale: np.ndarray | None  # W8A8: (out,) per output channel
    weight_zero_point: np.ndarray | None
    input_scale: np.ndarray | None  # W8A8: the static activation scale and zero point
    input_zero_point: np.ndarray | None
    module: str


def _producer(value: ir.Value | None, op: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op else None


def _linear(output: ir.Value) -> _Linear | None:
    """The bias-free linear computing ``output``, or None."""
    matmul = _producer(output, "MatMul")
    if matmul is None:
        return None
    module = matmul.metadata_props.get(MODULE_KEY, "")
    act, weight = matmul.inputs
    w_dq = _producer(weight, "DequantizeLinear")
    if w_dq is None:  # FP
        transpose = _producer(weight, "Transpose")
        w = const_array(transpose.inputs[0]) if transpose is not None else const_array(weight)
        if w is None or w.ndim != 2 or act is None or _producer(act, "DequantizeLinear") is not None:
            return None
        if transpose is not None:
            if tuple(transpose.attributes["perm"].as_ints()) != (1, 0):
                return None
            w = w.T
        return _Linear(output, act, np.ascontiguousarray(w), None, None, None, None, module)
    a_dq = _producer(act, "DequantizeLinear")
    quant = _producer(a_dq.inputs[0], "QuantizeLinear") if a_dq is not None else None
    if a_dq is None or quant is None or quant.inputs[0] is None:
        return None
    w, ws, wz = (_arg(w_dq, i) for i in range(3))
    s, z, qs, qz = _arg(a_dq, 1), _arg(a_dq, 2), _arg(quant, 1), _arg(quant, 2)
    axis = w_dq.attributes["axis"].as_int() if "axis" in w_dq.attributes else 1
    if w is None or ws is None or wz is None or s is None or z is None or qs is None or qz is None:
        return None  # zero points always explicit: a missing one would change the int8 type
    if axis != 1 or w.ndim != 2 or not (_same(s, qs) and _same(z, qz)):
        return None
    return _Linear(output, quant.inputs[0], w, ws, wz, s, z, module)  # type: ignore[arg-type]


def _arg(node: ir.Node, index: int) -> np.ndarray | None:
    value = node.inputs[index] if index < len(node.inputs) else None
    return const_array(value) if value is not None else None


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and np.array_equal(a, b)


def _packable(linears: list[_Linear | None]) -> list[_Linear] | None:
    found = [lin for lin in linears if lin is not None]
    if len(found) != len(linears) or len({id(lin.input) for lin in found}) != 1:
        return None
    first = found[0]
    for lin in found[1:]:
        if (lin.weight_scale is None) != (
            first.weight_scale is None
        ) or lin.weight.dtype != first.weight.dtype:
            return None
        if not (
            _same(lin.input_scale, first.input_scale) and _same(lin.input_zero_point, first.input_zero_point)
        ):
            return None
    return found


def _pack(graph: ir.Graph, linears: list[_Linear], name: str, module: str) -> ir.Value:
    """One matmul computing every linear's outputs side by side (last axis, in order)."""
    first = linears[0]
    anchor = first.output.producer()
    assert anchor is not None
    new: list[ir.Node] = []

    def const(suffix: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(
            name=f"{name}.{suffix}",
            const_value=ir.tensor(np.ascontiguousarray(array), name=f"{name}.{suffix}"),
        )
        graph.register_initializer(value)
        return value

    weight = const("weight", np.concatenate([lin.weight for lin in linears], axis=1))
    act: ir.Value = first.input
    if first.weight_scale is not None:
        scales = const("weight_scale", np.concatenate([lin.weight_scale for lin in linears]))  # type: ignore[misc]
        zeros = (
            np.concatenate([lin.weight_zero_point for lin in linears])
            if first.weight_zero_point is not None
            else None
        )  # type: ignore[misc]
        w_inputs = [weight, scales] + ([const("weight_zero_point", zeros)] if zeros is not None else [])
        new.append(ir.node("DequantizeLinear", w_inputs, attributes={"axis": 1}))
        weight = new[-1].outputs[0]
        scale = const("input_scale", first.input_scale)  # type: ignore[arg-type]
        zero = (
            [const("input_zero_point", first.input_zero_point)] if first.input_zero_point is not None else []
        )
        new.append(ir.node("QuantizeLinear", [act, scale, *zero]))
        new.append(ir.node("DequantizeLinear", [new[-1].outputs[0], scale, *zero]))
        act = new[-1].outputs[0]
    new.append(ir.node("MatMul", [act, weight]))
    for node in new:
        node.metadata_props[MODULE_KEY] = module
    graph.insert_before(anchor, new)
    out = new[-1].outputs[0]
    out.name, out.dtype = f"{name}.matmul", ir.DataType.FLOAT
    return out


def pack_qkv(graph: ir.Graph, attention: RotaryAttention) -> RotaryAttention | None:
    """The attention reading one packed (q | k | v) projection, or None when they cannot be packed."""
    linears = _packable([_linear(v) for v in (attention.query, attention.key, attention.value)])
    if linears is None:
        return None
    packed = _pack(graph, linears, f"{attention.module}.qkv_proj", f"{attention.module}.qkv_proj")
    return dataclasses.replace(attention, query=packed, key=packed, value=packed)


def pack_gate_up(graph: ir.Graph, source: ir.Value) -> list[str]:
    """Pack every ``P.gate_proj``/``P.up_proj`` pair reading ``source`` into one matmul and a Split;
    returns the packed modules' parents."""
    found: dict[str, _Linear] = {}
    for user, _ in list(source.uses()):
        value = user.outputs[0]
        if user.op_type == "QuantizeLinear":  # -> DequantizeLinear -> MatMul
            value = next((u.outputs[0] for u, _ in value.uses() if u.op_type == "DequantizeLinear"), value)
            value = next((u.outputs[0] for u, _ in value.uses() if u.op_type == "MatMul"), value)
        lin = _linear(value) if user.op_type in ("MatMul", "QuantizeLinear") else None
        if lin is not None and lin.input is source:
            found[lin.module] = lin
    parents = []
    for module, gate in found.items():
        if not module.endswith(".gate_proj") or f"{module[: -len('gate_proj')]}up_proj" not in found:
            continue
        parent = module[: -len(".gate_proj")]
        up = found[f"{parent}.up_proj"]
        pair = _packable([gate, up])
        if pair is None:
            continue
        packed = _pack(graph, pair, f"{parent}.gate_up_proj", f"{parent}.gate_up_proj")
        sizes = ir.Value(
            name=f"{parent}.gate_up_proj.split",
            const_value=ir.tensor(
                np.array([gate.weight.shape[1], up.weight.shape[1]], dtype=np.int64),
                name=f"{parent}.gate_up_proj.split",
            ),
        )
        graph.register_initializer(sizes)
        split = ir.node("Split", [packed, sizes], attributes={"axis": -1}, num_outputs=2)
        split.metadata_props[MODULE_KEY] = f"{parent}.gate_up_proj"
        graph.insert_after(packed.producer(), split)  # type: ignore[arg-type]
        for old, new in zip((gate.output, up.output), split.outputs, strict=True):
            new.type, new.shape = old.type, old.shape
            old.replace_all_uses_with(new, replace_graph_outputs=True)
        parents.append(parent)
    return parents
