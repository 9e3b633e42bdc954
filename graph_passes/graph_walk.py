"""Graph walking for the split pass: ancestors, boundaries, shape math, the router's weight.

Pure functions over an onnx-ir graph; nothing here changes it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from moedge._errors import MoedgeError
from moedge.formats.graph_names import MODULE_KEY

LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?layers)\.(?P<index>\d+)(?:\.|$)")
PASS_THROUGH = frozenset({"Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze", "View"})


def module_of(node: ir.Node) -> str:
    return node.metadata_props.get(MODULE_KEY, "")


def layer_index(node: ir.Node) -> int | None:
    match = LAYER.match(module_of(node))
    return int(match.group("index")) if match else None


def ancestors(values: Iterable[ir.Value], stop: set[ir.Value]) -> tuple[set[ir.Node], set[ir.Value]]:
    """Nodes needed to compute ``values`` when ``stop`` values are given, and the graph inputs reached."""
    nodes: set[ir.Node] = set()
    inputs: set[ir.Value] = set()
    todo = list(values)
    seen: set[ir.Value] = set()
    while todo:
        value = todo.pop()
        if value in seen or value in stop:
            continue
        seen.add(value)
        producer = value.producer()
        if producer is None:
            if value.is_graph_input():
                inputs.add(value)
            continue
        if producer in nodes:
            continue
        nodes.add(producer)
        todo += [v for v in producer.inputs if v is not None]
        for attr in producer.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                raise MoedgeError(f"node {producer.name} has a subgraph; the split pass needs a flat graph")
    return nodes, inputs


def descendants(nodes: set[ir.Node]) -> set[ir.Value]:
    """Every value computed from the outputs of ``nodes``."""
    out: set[ir.Value] = set()
    todo = [v for n in nodes for v in n.outputs]
    while todo:
        value = todo.pop()
        if value in out:
            continue
        out.add(value)
        for user, _ in value.uses():
            todo += list(user.outputs)
    return out


def consumed(nodes: Iterable[ir.Node]) -> set[ir.Value]:
    """Every value ``nodes`` read."""
    return {v for n in nodes for v in n.inputs if v is not None}


def shared_values(by_layer: dict[int, list[ir.Node]], hidden: ir.Value) -> list[ir.Value]:
    """Model-level tensors the decoder layers read (attention mask, rotary tables): computed once.

    A value qualifies when a non-trivial node outside every layer makes it from graph inputs only
    (never from a layer's output), so the embedding stage can compute it and hand it to every stage.
    """
    found: list[ir.Value] = []
    seen: set[ir.Value] = set()
    for index in sorted(by_layer):
        for value in consumed(by_layer[index]):
            producer = value.producer()
            if value in seen or value is hidden or producer is None or value.is_initializer():
                continue
            seen.add(value)
            if layer_index(producer) is not None or is_shape_math(producer) or producer.op_type == "Identity":
                continue  # a layer's own value, shape arithmetic, or an alias (of a cache input)
            needed, _ = ancestors([value], set())
            if any(layer_index(n) is not None and not is_shape_math(n) for n in needed):
                continue
            if any(n.outputs and hidden in n.outputs for n in needed):
                continue  # derived from the hidden state: stays in the stage
            found.append(value)
    return sorted(found, key=lambda v: v.name or "")


def _const_array(value: ir.Value | None) -> np.ndarray | None:
    """A constant input's array (initializer or Constant node), else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return np.asarray(value.const_value.numpy())
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        tensor = producer.attributes["value"].as_tensor()
        return np.asarray(tensor.numpy())
    return None


def router_weight(node: ir.Node) -> np.ndarray | None:
    """The router's weight as experts x hidden float32, when it is a bias-free constant linear."""
    if node.op_type == "Gemm":
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            return None
        weight = _const_array(node.inputs[1])
        attrs = {
            name: node.attributes[name].value
            for name in ("transA", "transB", "alpha")
            if name in node.attributes
        }
        if weight is None or attrs.get("transA", 0):
            return None
        weight = weight if attrs.get("transB", 0) else weight.T
        weight = weight * float(attrs.get("alpha", 1.0))
        return np.ascontiguousarray(weight, dtype=np.float32)
    weight = _const_array(node.inputs[1])
    if weight is not None:
        return np.ascontiguousarray(weight.T, dtype=np.float32)
    producer = node.inputs[1].producer() if node.inputs[1] is not None else None
    if producer is not None and producer.op_type == "Transpose":
        weight = _const_array(producer.inputs[0])
        if weight is not None and weight.ndim == 2:
            return np.ascontiguousarray(weight, dtype=np.float32)
    return None


_SHAPE_OPS = frozenset(
    {
        "Constant",
        "Shape",
        "Size",
        "Gather",
        "Squeeze",
        "Unsqueeze",
        "Concat",
        "Mul",
        "Add",
        "Sub",
        "Div",
        "Cast",
        "CastLike",
        "Reshape",
        "Slice",
        "Identity",
    }
)


def is_shape_math(node: ir.Node) -> bool:
    """A constant, or integer shape arithmetic (torch.export shares one symbolic size across layers).

    Such a node may be tagged with another layer's module and still be copied into a stage: its inputs
    are graph inputs, constants or other shape math, and whatever it reads of a layer's tensors is
    caught by that tensor's own producer.
    """
    if node.op_type == "Constant":
        return True
    return node.op_type in _SHAPE_OPS and all(
        v.dtype in (ir.DataType.INT64, ir.DataType.INT32) and (v.shape is None or len(v.shape) <= 1)
        for v in node.outputs
    )


def _is_const(value: ir.Value) -> bool:
    producer = value.producer()
    return value.const_value is not None or (producer is not None and producer.op_type == "Constant")


def boundary(nodes: set[ir.Node]) -> tuple[list[ir.Value], list[ir.Value]]:
    """Non-constant values ``nodes`` read from outside, and values they produce that outside reads."""
    ins: list[ir.Value] = []
    outs: list[ir.Value] = []
    for node in nodes:
        for value in node.inputs:
            if value is None or _is_const(value) or value in ins:
                continue
            producer = value.producer()
            if producer is None or producer not in nodes:
                ins.append(value)
        for value in node.outputs:
            if value.is_graph_output() or any(user not in nodes for user, _ in value.uses()):
                outs.append(value)
    return ins, outs
