"""``SplitExpertsPass``: cut a monolithic export into a bundle's graphs, by module metadata.

Functional: the input model is never changed; the pass returns new graphs. The cut points come from
the ``moedge.module`` metadata every exported node carries:

- the embedding stage ends where decoder layer 0 begins (its input hidden state);
- each decoder layer is one stage graph. For an MoE layer the stage stops before the routed experts:
  it outputs the residual stream (``residual``), the normalized tokens the experts read
  (``moe_input``, tokens x hidden), the router logits and, for an always-on shared expert, its gated
  output (``shared_output``), plus the layer's KV cache. The gating (softmax, top-k,
  renormalization) is left to the runner, which follows the manifest's ``GatingRule``;
- each routed expert is its own graph, ``y = expert(x)`` on the routed tokens' rows;
- the head stage is the final norm and lm_head.

Model-level tensors the layers read (the attention mask, rotary tables; see ``shared_values``) are
computed once, by the embedding stage, which outputs them as ``shared.<name>``; every layer stage
takes the ones it uses as inputs, plus the graph inputs it still reaches (its own
``past_key_values`` among them).
The graph walking itself is ``moedge.graph_passes.graph_walk``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from moedge._errors import MoedgeError
from moedge.formats.graph_names import PAST_PREFIX, PRESENT_PREFIX
from moedge.formats.manifest import (
    EXPERT_INPUT,
    EXPERT_OUTPUT,
    HIDDEN,
    HIDDEN_OUT,
    LOGITS,
    MOE_INPUT,
    RESIDUAL,
    ROUTER_LOGITS,
    SHARED_OUTPUT,
    GatingRule,
)
from moedge.graph_passes.graph_walk import (
    LAYER,
    PASS_THROUGH,
    ancestors,
    boundary,
    consumed,
    descendants,
    is_shape_math,
    layer_index,
    module_of,
    router_weight,
    shared_values,
)

log = logging.getLogger(__name__)


@dataclass
class SplitLayer:
    """One decoder layer's graphs."""

    index: int
    stage: ir.Model
    experts: list[ir.Model] = field(default_factory=list)
    gating: GatingRule | None = None
    router_weight: np.ndarray | None = None  # experts x hidden, for speculative next-layer gating
    in_graph_experts: int = 0  # routed experts the stage graph runs itself (``dispatch_experts_in_graph``)


@dataclass
class SplitModel:
    """What ``SplitExpertsPass`` returns: every graph of the bundle, in run order."""

    embedding: ir.Model
    layers: list[SplitLayer]
    head: ir.Model


class SplitExpertsPass:
    """Cut the monolithic graph into embedding, per-layer stages, per-expert graphs and head.

    Functional: calling it returns a ``SplitModel`` of new graphs and leaves the input untouched. It
    returns many graphs, so it is not an onnx-ir pass (one model in, one model out); the passes that
    run on each graph afterwards are. The decoder-layer prefix is found from the metadata;
    ``experts_path`` and ``router_path`` name the routed experts and the router inside a decoder layer
    (``ArchitectureConfig``), ``gating`` the rule every MoE layer applies.
    """

    def __init__(
        self,
        *,
        experts_path: str | None,
        router_path: str | None,
        gating: GatingRule | None,
    ) -> None:
        self.experts_path = experts_path
        self.router_path = router_path
        self._shared: dict[ir.Value, str] = {}
        self.gating = gating
        self._order_of: tuple[ir.Model | None, dict[ir.Node, int]] = (None, {})

    def __call__(self, model: ir.Model) -> SplitModel:
        """Find the cut values, then extract each graph (the input model is not modified)."""
        graph = model.graph
        by_layer: dict[int, list[ir.Node]] = {}
        prefixes: set[str] = set()
        for node in graph:
            match = LAYER.match(module_of(node))
            if match:
                by_layer.setdefault(int(match.group("index")), []).append(node)
                prefixes.add(match.group("prefix"))
        if not by_layer or len(prefixes) != 1:
            raise MoedgeError(
                "the graph's nodes carry no decoder-layer module names (moedge.module): "
                "split a graph made by `moedge export`"
            )
        prefix = prefixes.pop()
        num_layers = max(by_layer) + 1
        outputs_of = [self._layer_output(by_layer.get(i, []), f"{prefix}.{i}") for i in range(num_layers)]
        first_input = self._layer_input(by_layer[0], f"{prefix}.0")
        logits = next((v for v in graph.outputs if v.name == LOGITS), graph.outputs[0])

        shared = shared_values(by_layer, first_input)
        names = {v: f"shared.{v.name}" for v in shared}
        embedding = self._extract(model, [], {first_input: HIDDEN, **names}, "embedding")
        layers: list[SplitLayer] = []
        for i in range(num_layers):
            hidden_in = first_input if i == 0 else outputs_of[i - 1]
            self._shared = {v: names[v] for v in shared if v in consumed(by_layer[i])}
            layers.append(self._split_layer(model, i, f"{prefix}.{i}", by_layer[i], hidden_in, outputs_of[i]))
        self._shared = {}
        head = self._extract(
            model, [outputs_of[-1]], {logits: LOGITS}, "head", rename={outputs_of[-1]: HIDDEN}
        )
        return SplitModel(embedding=embedding, layers=layers, head=head)

    # -- cut values ---------------------------------------------------------------------------

    @staticmethod
    def _layer_adds(nodes: list[ir.Node], scope: str) -> list[ir.Node]:
        adds = [n for n in nodes if n.op_type == "Add" and module_of(n) == scope]
        if not adds:
            raise MoedgeError(f"{scope}: no residual Add at decoder-layer level; cannot find the layer's cut")
        return adds

    def _layer_output(self, nodes: list[ir.Node], scope: str) -> ir.Value:
        """The hidden state a decoder layer hands on: its last residual Add, through any final reshape."""
        inside = set(nodes)
        value = self._layer_adds(nodes, scope)[-1].outputs[0]
        while True:
            users = [u for u, _ in value.uses() if u.op_type != "Shape"]
            if any(u not in inside for u in users) or value.is_graph_output():
                return value
            follow = [u for u in users if u.op_type in PASS_THROUGH]
            if len(follow) != 1:
                raise MoedgeError(f"{scope}: cannot find the hidden state the layer hands on")
            value = follow[0].outputs[0]

    def _layer_input(self, nodes: list[ir.Node], scope: str) -> ir.Value:
        """The hidden state entering the first layer: the residual input of its first Add."""
        inside = set(nodes)
        for value in self._layer_adds(nodes, scope)[0].inputs:
            if value is not None and value.producer() not in inside:
                return value
        raise MoedgeError(f"{scope}: cannot find the hidden state entering the layer")

    def _split_layer(
        self,
        model: ir.Model,
        index: int,
        scope: str,
        nodes: list[ir.Node],
        hidden_in: ir.Value,
        hidden_out: ir.Value,
    ) -> SplitLayer:
        """One decoder layer: its stage graph and, for an MoE layer, one graph per routed expert."""
        kv = {v: str(v.name) for v in model.graph.outputs if _layer_index_of_value(v) == index}
        experts_scope = f"{scope}.{self.experts_path}" if self.experts_path else None
        block = {n for n in nodes if experts_scope and module_of(n).startswith(experts_scope)}
        if not block:
            stage = self._extract(
                model,
                [hidden_in],
                {hidden_out: HIDDEN_OUT, **kv},
                f"layer {index}",
                rename={hidden_in: HIDDEN},
                layer=index,
            )
            return SplitLayer(index=index, stage=stage)
        assert experts_scope is not None and self.gating is not None
        router = self._router(nodes, scope)
        outputs = self._moe_cut(nodes, scope, block, router, hidden_in)
        stage = self._extract(
            model, [hidden_in], {**outputs, **kv}, f"layer {index}", rename={hidden_in: HIDDEN}, layer=index
        )
        experts = self._expert_graphs(model, block, experts_scope, scope)
        gating = dataclasses.replace(self.gating, shared_expert=SHARED_OUTPUT in outputs.values())
        return SplitLayer(
            index=index, stage=stage, experts=experts, gating=gating, router_weight=router_weight(router)
        )

    def _router(self, nodes: list[ir.Node], scope: str) -> ir.Node:
        """The layer's router: the one MatMul/Gemm under ``router_path``."""
        router = [
            n
            for n in nodes
            if module_of(n) == f"{scope}.{self.router_path}" and n.op_type in ("MatMul", "Gemm")
        ]
        if len(router) != 1:
            raise MoedgeError(
                f"{scope}: expected one router MatMul/Gemm under {self.router_path}, found {len(router)}"
            )
        return router[0]

    def _moe_cut(
        self, nodes: list[ir.Node], scope: str, block: set[ir.Node], router: ir.Node, hidden_in: ir.Value
    ) -> dict[ir.Value, str]:
        """The values an MoE layer stage outputs: residual, MoE input, router logits, shared output."""
        router_logits = router.outputs[0]
        after = descendants(block)
        router_needs, _ = ancestors([router_logits], {hidden_in})
        block_ins, _ = boundary(block)
        moe_inputs = [v for v in block_ins if v.producer() in router_needs or v is router.inputs[0]]
        moe_inputs = [v for v in moe_inputs if v.dtype == ir.DataType.FLOAT and v not in after]
        if len(moe_inputs) != 1:
            raise MoedgeError(f"{scope}: cannot tell which experts input is the tokens' hidden state")
        final_add = self._layer_adds(nodes, scope)[-1]
        residual = [v for v in final_add.inputs if v is not None and v not in after]
        moe_out = [v for v in final_add.inputs if v is not None and v in after]
        if len(residual) != 1 or len(moe_out) != 1:
            raise MoedgeError(f"{scope}: the layer's last Add is not residual + MoE output")
        shared = self._shared_output(moe_out[0], block, after, scope)
        outputs: dict[ir.Value, str] = {
            residual[0]: RESIDUAL,
            moe_inputs[0]: MOE_INPUT,
            router_logits: ROUTER_LOGITS,
        }
        if shared is not None:
            outputs[shared] = SHARED_OUTPUT
        return outputs

    def _expert_graphs(
        self, model: ir.Model, block: set[ir.Node], experts_scope: str, scope: str
    ) -> list[ir.Model]:
        """One graph per routed expert, ``y = expert(x)``, in expert order."""
        by_expert: dict[int, set[ir.Node]] = {}
        expert_re = re.compile(rf"^{re.escape(experts_scope)}\.(\d+)(?:\.|$)")
        for node in block:
            m = expert_re.match(module_of(node))
            if m:
                by_expert.setdefault(int(m.group(1)), set()).add(node)
        if sorted(by_expert) != list(range(len(by_expert))):
            raise MoedgeError(f"{scope}: experts {sorted(by_expert)} are not numbered 0..E-1")
        experts: list[ir.Model] = []
        for e in range(len(by_expert)):
            ins, outs = boundary(by_expert[e])
            if len(ins) != 1 or len(outs) != 1:
                raise MoedgeError(
                    f"{experts_scope}.{e}: an expert must read one tensor and produce one "
                    f"(found {len(ins)} inputs, {len(outs)} outputs)"
                )
            experts.append(
                self._extract(
                    model,
                    ins,
                    {outs[0]: EXPERT_OUTPUT},
                    f"{experts_scope}.{e}",
                    rename={ins[0]: EXPERT_INPUT},
                )
            )
        return experts

    @staticmethod
    def _shared_output(
        moe_out: ir.Value, block: set[ir.Node], after: set[ir.Value], scope: str
    ) -> ir.Value | None:
        """Walk from the MoE output back to the experts: an Add on the way brings the shared expert."""
        shared: ir.Value | None = None
        value = moe_out
        while value.producer() not in block:
            node = value.producer()
            assert node is not None
            if node.op_type == "Add":
                ours = [v for v in node.inputs if v is not None and v in after]
                other = [v for v in node.inputs if v is not None and v not in after]
                if len(ours) != 1 or len(other) != 1 or shared is not None:
                    raise MoedgeError(f"{scope}: unexpected combine of the experts' output ({node.name})")
                shared, value = other[0], ours[0]
            elif node.op_type in PASS_THROUGH:
                value = node.inputs[0]  # type: ignore[assignment]
            else:
                raise MoedgeError(
                    f"{scope}: {node.op_type} between the experts and the residual Add; "
                    "the bundle's gating rule cannot express it"
                )
        return shared

    # -- extraction ---------------------------------------------------------------------------

    def _order(self, model: ir.Model) -> dict[ir.Node, int]:
        """Each node's position in the graph (topological), computed once per model."""
        if self._order_of[0] is not model:
            self._order_of = (model, {node: i for i, node in enumerate(model.graph)})
        return self._order_of[1]

    def _extract(
        self,
        model: ir.Model,
        inputs: list[ir.Value],
        outputs: dict[ir.Value, str],
        what: str,
        *,
        rename: dict[ir.Value, str] | None = None,
        layer: int | None = None,
    ) -> ir.Model:
        """``outputs`` (renamed as given) computed from ``inputs`` and the graph inputs they reach.

        ``layer``: a decoder layer's stage, which must not pull in another layer's nodes and reads only
        its own cache; it takes the shared model-level tensors it uses (the attention mask, rotary
        tables) as inputs from the embedding stage instead of recomputing them.
        """
        if layer is not None and self._shared:
            inputs = list(inputs) + list(self._shared)
            rename = {**(rename or {}), **self._shared}
        needed, graph_inputs = ancestors(outputs, set(inputs))
        stray = sorted({i for n in needed if not is_shape_math(n) and (i := layer_index(n)) is not None})
        if layer is not None and stray != [layer]:
            raise MoedgeError(f"{what}: its graph would pull in nodes of layers {stray}; cannot cut here")
        ordered_inputs = list(inputs) + [
            v for v in model.graph.inputs if v in graph_inputs and v not in inputs
        ]
        # The nodes are known already; a view over them, cloned, is the subgraph. (onnx-ir's extract()
        # re-maps the whole graph per call, which would make the split quadratic in the experts.)
        order = self._order(model)
        nodes = sorted(needed, key=order.__getitem__)
        inits = {v.name: v for n in nodes for v in n.inputs if v is not None and v.is_initializer()}
        view = ir.GraphView(
            ordered_inputs,
            list(outputs),
            nodes=nodes,
            initializers=tuple(inits.values()),
            opset_imports=dict(model.graph.opset_imports),
        )
        sub = view.clone()
        names = {**{v.name: n for v, n in outputs.items()}, **{v.name: n for v, n in (rename or {}).items()}}
        taken = {v.name for n in sub for v in n.outputs} | {v.name for v in sub.inputs}
        for value in [*sub.inputs, *sub.outputs]:
            new = names.get(value.name)
            if new is None or new == value.name:
                continue
            if new in taken:
                raise MoedgeError(f"{what}: value name {new} already used inside the graph")
            value.name = new
        sub.name = what.replace(" ", "_").replace(".", "_")
        if layer is not None:
            _own_cache_shapes(sub, layer)
        return _model(sub, model)


def _own_cache_shapes(graph: ir.Graph, index: int) -> None:
    """Read the past length from the layer's own cache, not another layer's.

    The exporter shares shape computations across layers, so a layer stage can read another layer's
    cache input only for its shape (all caches have the same shape). Rewire those uses to the layer's
    own cache input so each stage takes exactly its own cache.
    """
    own = {v.name: v for v in graph.inputs}
    for value in list(graph.inputs):
        match = re.match(rf"^{PAST_PREFIX}\.(\d+)\.(key|value)$", value.name or "")
        if not match or int(match.group(1)) == index:
            continue
        if any(user.op_type != "Shape" for user, _ in value.uses()):
            raise MoedgeError(f"layer {index} reads another layer's cache ({value.name}) beyond its shape")
        mine = own.get(f"{PAST_PREFIX}.{index}.{match.group(2)}")
        if mine is None:
            value.name = f"{PAST_PREFIX}.{index}.{match.group(2)}"
            own[value.name] = value
            continue
        value.replace_all_uses_with(mine)
        graph.inputs.remove(value)


def _model(graph: ir.Graph, like: ir.Model) -> ir.Model:
    graph.opset_imports.update(like.graph.opset_imports)
    return ir.Model(graph, ir_version=like.ir_version, producer_name="moedge")


def _layer_index_of_value(value: ir.Value) -> int | None:
    """Layer of a ``present.{i}.key``-style graph output."""
    match = re.match(rf"^{PRESENT_PREFIX}\.(\d+)\.", value.name or "")
    return int(match.group(1)) if match else None
