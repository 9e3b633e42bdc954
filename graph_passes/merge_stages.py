"""``merge_layer_stages``: consecutive dense layer stages as one graph (one session call for all of them).

A dense layer stage reads ``hidden_states`` and writes ``hidden_states_out``; the next one reads that
as its ``hidden_states``. Nothing needs the cut between two dense layers (no routing, no expert cache),
so ``moedge split --target ort-cpu`` joins each run of consecutive dense layers into one graph: layer
``i + 1``'s nodes read layer ``i``'s output directly, the inputs every stage shares (the ort-cpu
target's ``seqlens_k``, ``total_sequence_length`` and cos/sin tables) are read once, and each layer's
own inputs and outputs (its KV buffers) stay graph inputs and outputs under their names. The joined
graph computes exactly what the stages compute one after the other; ONNX Runtime then plans memory and
schedules kernels across the layers, and a decode step makes one call instead of one per layer.

An MoE layer stage whose experts run inside it (``dispatch_experts_in_graph``, ``--experts-in-graph``)
has the same interface and is joined the same way; the names inside its ``If`` branches count as names
of the graph, and a branch name that collides with one is refused.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import onnx_ir as ir

from moedge._errors import MoedgeError
from moedge.formats.manifest import HIDDEN, HIDDEN_OUT
from moedge.graph_passes.expert_dispatch import merge_opsets, subgraph_names

__all__ = ["merge_layer_stages"]


def merge_layer_stages(stages: Sequence[ir.Model], indices: Sequence[int]) -> ir.Model:
    """One graph running the dense layer stages ``stages`` (decoder layers ``indices``, consecutive) in order.

    Consumes the models: the first one is returned extended with the others' nodes and weights. Inputs
    of the same name in several stages (other than ``hidden_states``) must agree in type and become one
    input; every other input and output keeps its name. Internal names that collide are made unique
    with the layer's index. Raises ``MoedgeError`` for a stage that is not a dense layer stage.
    """
    if len(stages) != len(indices) or not stages:
        raise MoedgeError("merge_layer_stages needs one layer index per stage")
    if any(b != a + 1 for a, b in itertools.pairwise(indices)):
        raise MoedgeError(f"layers {list(indices)} are not consecutive")
    merged = stages[0]
    graph = merged.graph
    _interface(graph, indices[0])
    taken = _names(graph)
    node_names = {n.name for n in graph if n.name}
    for model, index in zip(stages[1:], indices[1:], strict=True):
        _append(graph, model.graph, index, taken, node_names)
        merge_opsets(merged, model, f"layer {index}'s stage", f"layer {indices[0]}'s")
    graph.name = f"layers_{indices[0]:03d}_{indices[-1]:03d}"
    return merged


def _interface(graph: ir.Graph, index: int) -> tuple[ir.Value, ir.Value]:
    """The stage's ``hidden_states`` input and ``hidden_states_out`` output (refusing anything else)."""
    hidden = next((v for v in graph.inputs if v.name == HIDDEN), None)
    out = next((v for v in graph.outputs if v.name == HIDDEN_OUT), None)
    if hidden is None or out is None:
        raise MoedgeError(
            f"layer {index}'s stage is not a dense layer stage (it needs a {HIDDEN!r} input and a "
            f"{HIDDEN_OUT!r} output)"
        )
    return hidden, out


def _names(graph: ir.Graph) -> set[str]:
    """Every value name of the graph and its subgraphs (an MoE stage's ``If`` branches)."""
    return subgraph_names(graph)


def _append(graph: ir.Graph, stage: ir.Graph, index: int, taken: set[str], node_names: set[str]) -> None:
    """Move ``stage``'s nodes and weights into ``graph``, reading ``graph``'s hidden output as its input."""
    _, previous = _interface(graph, index - 1)
    hidden, out = _interface(stage, index)
    shared = {v.name: v for v in graph.inputs}
    stage_inputs = list(stage.inputs)
    stage_outputs = list(stage.outputs)
    stage.inputs.clear()
    stage.outputs.clear()
    nodes = list(stage)
    inner = subgraph_names(stage) - {v.name for v in stage.inputs} - set(stage.initializers)
    inner -= {v.name for n in nodes for v in n.outputs}  # what is left: names inside its subgraphs
    clash = sorted(inner & taken)
    if clash:
        raise MoedgeError(f"layer {index}'s stage subgraphs name {clash[0]!r}, already a name of the graph")
    taken |= inner
    stage.remove(nodes, safe=False)
    weights = list(stage.initializers.values())
    stage.initializers.clear()

    def fresh(name: str) -> str:
        new = name
        while new in taken:
            new = f"layer{index}.{new}"
        taken.add(new)
        return new

    for value in weights:
        value.name = fresh(value.name or "weight")
        graph.register_initializer(value)
    graph.outputs.remove(previous)
    taken.discard(previous.name or "")
    previous.name = fresh(f"{HIDDEN}.{index}")  # layer ``index``'s input, now internal
    interface = {id(v) for v in stage_outputs}
    for node in nodes:
        for value in node.outputs:
            if id(value) in interface:
                if value.name in taken:
                    raise MoedgeError(
                        f"layer {index}'s stage output {value.name!r} is already a name of the graph"
                    )
                taken.add(value.name or "")
            elif value.name:
                value.name = fresh(value.name)
        if node.name:
            while node.name in node_names:
                node.name = f"layer{index}.{node.name}"
            node_names.add(node.name)
    graph.extend(nodes)
    for value in stage_inputs:
        if value is hidden:
            value.replace_all_uses_with(previous)
        elif value.name in shared:
            mine = shared[value.name]
            if value.dtype != mine.dtype or (
                value.shape is not None and mine.shape is not None and len(value.shape) != len(mine.shape)
            ):
                raise MoedgeError(
                    f"layer {index}'s stage reads {value.name!r} as {value.dtype} {value.shape}, an earlier "
                    f"layer as {mine.dtype} {mine.shape}"
                )
            value.replace_all_uses_with(mine)
        else:
            if value.name in taken:
                raise MoedgeError(
                    f"layer {index}'s stage input {value.name!r} is already a name of the graph"
                )
            taken.add(value.name or "")
            graph.inputs.append(value)
    graph.outputs.extend(v for v in stage_outputs if v is not out)
    graph.outputs.append(out)
