"""``dispatch_experts_in_graph``: an MoE layer stage with its gating and routed experts inside the graph.

A bundle's MoE layer stage normally stops at the router: it outputs ``residual``, ``moe_input`` and
``router_logits`` (and ``shared_output``), and the runner routes in numpy and runs each chosen expert
graph in its own session. On a CPU where every expert is resident that costs a session call per chosen
expert per layer. This pass (``moedge split --target ort-cpu --experts-in-graph``) moves the rest of the
layer into the stage graph, computing what the runners compute (``moedge.runtime.gating.route`` and
``moedge.runtime.moe_layer.combine``):

- gating: the router logits cast to float64, ``Softmax`` over the experts, ``TopK`` (largest first;
  ONNX breaks ties by the lower index, as ``route`` does), with ``normalize_top_k`` the chosen scores
  divided by their sum, then the weights cast to float32 once;
- dispatch: for each expert in ascending order, ``NonZero(chosen == e)`` gives the routed (token, slot)
  pairs in token order and an ``If`` node runs only when some token chose the expert. Its ``then``
  branch gathers those tokens' ``moe_input`` rows, runs the expert's own nodes (the expert graph's
  nodes and quantization as split, its weights initializers of the branch: ORT's QDQ fusion does not
  look through outer-scope initializers, so there it would keep DequantizeLinear + FP32 MatMul instead
  of MatMulIntegerToFloat), multiplies by the routing weight and adds the result into the running sum at those rows
  (``ScatterND`` with ``reduction="add"``: ``routed[token] += y * w``, as ``combine`` does); the
  ``else`` branch passes the running sum on unchanged;
- the shared expert's gated output (when the model has one) and the residual are added as the
  runners add them, and the stage outputs ``hidden_states_out`` like a dense layer stage, so
  ``merge_layer_stages`` can join it with its neighbours (that Add carries ``MOE_COMBINE_KEY``:
  ``fuse_residual_joins`` does not fuse it with the next layer's norm, which keeps the bits).

The float operations and their order are the runners' own, so outputs match the runtime-dispatch bundle
to float rounding of the softmax (ORT's float64 exp and sum against numpy's), which can only move a
routing weight in its last float32 bit. Only ops ONNX Runtime's CPU execution provider runs are used.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from moedge._errors import MoedgeError
from moedge.formats.manifest import (
    EXPERT_INPUT,
    EXPERT_OUTPUT,
    HIDDEN_OUT,
    MOE_INPUT,
    RESIDUAL,
    ROUTER_LOGITS,
    SHARED_OUTPUT,
    GatingRule,
)

__all__ = ["MOE_COMBINE_KEY", "dispatch_experts_in_graph", "merge_opsets", "subgraph_names"]

# Node metadata on the Add that closes an in-graph MoE layer (residual + routed): ``fuse_residual_joins``
# leaves it and the next layer's norm apart, so the next norm runs as the runtime-dispatch bundle runs it
# (its own SimplifiedLayerNormalization, whose rounding differs from SkipSimplifiedLayerNormalization's).
MOE_COMBINE_KEY = "moedge.moe_combine"

# The scoring functions this pass builds (runtime/gating.py's ``route`` runs the same ones).
SUPPORTED_SCORING = ("softmax",)


def dispatch_experts_in_graph(
    stage: ir.Model, experts: Sequence[ir.Model], gating: GatingRule, index: int
) -> ir.Model:
    """MoE layer ``index``'s stage extended with its gating and ``experts`` (in expert order), writing
    ``hidden_states_out`` in place of ``residual``/``moe_input``/``router_logits``/``shared_output``.

    Consumes the models: ``stage`` is returned, holding the experts' nodes and weights. Raises
    ``MoedgeError`` for a stage without the MoE outputs, an expert graph that is not ``y = f(x)``, or a
    gating rule this pass cannot build.
    """
    if gating.scoring not in SUPPORTED_SCORING:
        raise MoedgeError(f"layer {index}: gating scoring {gating.scoring!r} cannot be built in the graph")
    if not experts or not 1 <= gating.top_k <= len(experts):
        raise MoedgeError(f"layer {index}: top-{gating.top_k} of {len(experts)} experts")
    graph = stage.graph
    outputs = {v.name: v for v in graph.outputs}
    wanted = [RESIDUAL, MOE_INPUT, ROUTER_LOGITS] + ([SHARED_OUTPUT] if gating.shared_expert else [])
    missing = [n for n in wanted if n not in outputs]
    if missing or HIDDEN_OUT in outputs:
        raise MoedgeError(f"layer {index}'s stage is not an MoE layer stage (no {missing} outputs)")
    taken = subgraph_names(graph)
    build = _Builder(graph, index, taken)
    x, logits, residual = outputs[MOE_INPUT], outputs[ROUTER_LOGITS], outputs[RESIDUAL]
    chosen, weights = build.gating(logits, gating)
    routed = build.op("ConstantOfShape", [build.op("Shape", [x])], value=ir.tensor(np.zeros(1, np.float32)))
    for e, expert in enumerate(experts):
        routed = build.expert(e, expert, x, chosen, weights, routed)
        merge_opsets(stage, expert, f"layer {index}'s expert {e}", "its stage")
    if gating.shared_expert:
        routed = build.op("Add", [routed, outputs[SHARED_OUTPUT]])
    reshaped = build.op("Reshape", [routed, build.op("Shape", [residual])])
    reshaped.dtype, reshaped.shape = ir.DataType.FLOAT, residual.shape
    hidden = build.op("Add", [residual, reshaped])
    producer = hidden.producer()
    assert producer is not None
    producer.metadata_props[MOE_COMBINE_KEY] = str(index)
    hidden.name = HIDDEN_OUT
    hidden.dtype = ir.DataType.FLOAT
    hidden.shape = residual.shape
    kept = [v for v in graph.outputs if v.name not in wanted]
    graph.outputs.clear()
    graph.outputs.extend([hidden, *kept])
    for value in (x, logits, residual, outputs.get(SHARED_OUTPUT)):
        if value is not None and value.name in wanted:  # now internal: free the public name
            value.name = build.fresh(f"{value.name}.{index}")
    return stage


def merge_opsets(into: ir.Model, other: ir.Model, what: str, into_what: str) -> None:
    """Add ``other``'s opset imports to ``into`` (model and graph); a domain imported at two versions is
    refused, naming ``what`` (``other``) and ``into_what``."""
    for domain, version in other.opset_imports.items():
        if into.opset_imports.setdefault(domain, version) != version:
            raise MoedgeError(
                f"{what} imports {domain or 'ai.onnx'} opset {version}, {into_what} "
                f"{into.opset_imports[domain]}"
            )
        into.graph.opset_imports.setdefault(domain, version)


def subgraph_names(graph: ir.Graph) -> set[str]:
    """Every value name of ``graph`` and of all its subgraphs (inputs, initializers, node outputs)."""
    names: set[str] = set()
    for g in [graph, *_subgraphs(graph)]:
        names |= {v.name for v in g.inputs if v.name}
        names |= set(g.initializers)
        names |= {v.name for n in g for v in n.outputs if v.name}
    return names


def _subgraphs(graph: ir.Graph) -> list[ir.Graph]:
    found: list[ir.Graph] = []
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                found += [attr.as_graph(), *_subgraphs(attr.as_graph())]
            elif attr.type == ir.AttributeType.GRAPHS:
                for g in attr.as_graphs():
                    found += [g, *_subgraphs(g)]
    return found


class _Builder:
    """Appends nodes to the stage graph (or to a branch being built), naming every value uniquely."""

    def __init__(self, graph: ir.Graph, index: int, taken: set[str]) -> None:
        self.graph = graph
        self.index = index
        self.taken = taken
        self.nodes: list[ir.Node] | None = None  # a branch's nodes while one is built
        self.consts: dict[str, ir.Value] = {}

    def fresh(self, name: str) -> str:
        new, n = name, 0
        while new in self.taken:
            n += 1
            new = f"{name}_{n}"
        self.taken.add(new)
        return new

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], **attributes: object) -> ir.Value:
        node = ir.node(op_type, list(inputs), attributes=attributes)  # type: ignore[arg-type]
        node.name = self.fresh(f"moe.{self.index}.{op_type}")
        node.outputs[0].name = self.fresh(f"moe.{self.index}.{op_type.lower()}")
        if self.nodes is not None:
            self.nodes.append(node)
        else:
            self.graph.append(node)
        return node.outputs[0]

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        if name in self.consts:
            return self.consts[name]
        value = ir.Value(name=self.fresh(f"moe.{self.index}.{name}"), const_value=ir.tensor(array))
        value.dtype = ir.DataType.from_numpy(array.dtype)
        value.shape = ir.Shape(array.shape)
        self.graph.register_initializer(value)
        self.consts[name] = value
        return value

    def gating(self, logits: ir.Value, rule: GatingRule) -> tuple[ir.Value, ir.Value]:
        """(chosen experts (tokens x top_k, int64, best first), their float32 weights), as ``route``."""
        scores = self.op("Softmax", [self.op("Cast", [logits], to=ir.DataType.DOUBLE)], axis=-1)
        k = self.const("top_k", np.asarray([rule.top_k], np.int64))
        node = ir.node("TopK", [scores, k], attributes={"axis": -1, "largest": 1, "sorted": 1}, num_outputs=2)
        node.name = self.fresh(f"moe.{self.index}.TopK")
        top, chosen = node.outputs
        top.name = self.fresh(f"moe.{self.index}.top_scores")
        chosen.name = self.fresh(f"moe.{self.index}.chosen")
        self.graph.append(node)
        if rule.normalize_top_k:
            top = self.op(
                "Div", [top, self.op("ReduceSum", [top, self.const("last_axis", np.asarray([-1]))])]
            )
        return chosen, self.op("Cast", [top], to=ir.DataType.FLOAT)

    def expert(
        self,
        e: int,
        expert: ir.Model,
        x: ir.Value,
        chosen: ir.Value,
        weights: ir.Value,
        routed: ir.Value,
    ) -> ir.Value:
        """``routed`` plus expert ``e``'s weighted output at the rows routed to it (an ``If`` node)."""
        hits = self.op(
            "NonZero", [self.op("Equal", [chosen, self.const(f"expert_{e}", np.asarray(e, np.int64))])]
        )
        pairs = self.op("Transpose", [hits], perm=[1, 0])  # (routed, 2): (token, slot) in token order
        any_row = self.op("Greater", [self.op("Size", [hits]), self.const("zero", np.asarray(0, np.int64))])
        body = expert.graph
        if len(body.inputs) != 1 or len(body.outputs) != 1:
            raise MoedgeError(f"layer {self.index}'s expert {e} is not one-input one-output (x -> y)")
        x_in, y_out = body.inputs[0], body.outputs[0]
        if x_in.name != EXPERT_INPUT or y_out.name != EXPERT_OUTPUT:
            raise MoedgeError(f"layer {self.index}'s expert {e} reads {x_in.name!r}, writes {y_out.name!r}")
        # then: gather the routed rows, run the expert, weight it, add it in at those rows
        self.nodes = []
        tokens = self.op("Slice", [pairs, *self._cols(0, 1)])  # (routed, 1)
        rows = self.op("GatherND", [x, tokens])  # (routed, hidden)
        weight = self.op("GatherND", [weights, pairs])  # (routed,)
        body_nodes = list(body)
        body.inputs.clear()
        body.outputs.clear()
        body.remove(body_nodes, safe=False)
        x_in.replace_all_uses_with(rows)
        weights_in = list(body.initializers.values())
        body.initializers.clear()
        for value in weights_in:
            value.name = self.fresh(value.name or "weight")
        prefix = f"layer{self.index}.expert{e}."
        for node in body_nodes:
            node.name = self.fresh(prefix + (node.name or node.op_type))
            for value in node.outputs:
                value.name = self.fresh(prefix + (value.name or "value"))
        self.nodes.extend(body_nodes)
        scaled = self.op(
            "Mul", [y_out, self.op("Unsqueeze", [weight, self.const("axis_1", np.asarray([1]))])]
        )
        total = self.op("ScatterND", [routed, tokens, scaled], reduction="add")
        then_nodes, self.nodes = self.nodes, None
        self.nodes = []
        unchanged = self.op("Identity", [routed])
        else_nodes, self.nodes = self.nodes, None
        for value in (total, unchanged):
            value.dtype, value.shape = (
                ir.DataType.FLOAT,
                ir.Shape(["tokens", x.shape[-1] if x.shape else "hidden"]),
            )
        then_branch = ir.Graph(
            [], [total], nodes=then_nodes, initializers=weights_in, name=f"layer{self.index}_expert{e}_routed"
        )
        else_branch = ir.Graph([], [unchanged], nodes=else_nodes, name=f"layer{self.index}_expert{e}_idle")
        node = ir.node("If", [any_row], attributes={"then_branch": then_branch, "else_branch": else_branch})
        node.name = self.fresh(f"moe.{self.index}.expert{e}")
        out = node.outputs[0]
        out.name = self.fresh(f"moe.{self.index}.routed_to_{e}")
        out.dtype, out.shape = ir.DataType.FLOAT, routed.shape
        self.graph.append(node)
        return out

    def _cols(self, start: int, end: int) -> list[ir.Value]:
        """Slice starts/ends/axes taking columns ``start:end``."""
        return [
            self.const(f"col_{start}", np.asarray([start], np.int64)),
            self.const(f"col_{end}", np.asarray([end], np.int64)),
            self.const("axis_1", np.asarray([1], np.int64)),
        ]
