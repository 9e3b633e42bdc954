"""The bundle's data model: the tensor names stage graphs agree on, and the manifest's records
(``TensorSpec``, ``GraphSpec``, ``GatingRule``, ``MoeSpec``, ``LayerSpec``, ``StageRun``, ``Manifest``).

``moedge.formats.manifest`` reads and checks a ``manifest.json`` into these records (and re-exports
them); numpy/json only, like it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moedge._errors import MoedgeError

SCHEMA_VERSION = 2  # 2: MoE layers may run their experts inside the stage graph (``experts_in_graph``)
IN_GRAPH_SCHEMA_VERSION = (
    2  # the first version with ``experts_in_graph``; bundles without it are written as 1
)
MANIFEST_FILE = "manifest.json"
BUNDLE_FORMAT = "moedge-bundle"

# Stage I/O names: every runner binds values by these names.
HIDDEN = "hidden_states"  # a layer stage's input (and the embedding stage's output)
HIDDEN_OUT = "hidden_states_out"  # a dense layer stage's output
RESIDUAL = "residual"  # an MoE layer stage's output: the hidden state the MoE result is added to
MOE_INPUT = "moe_input"  # the normalized hidden state the router and experts read, (tokens, hidden)
ROUTER_LOGITS = "router_logits"  # (tokens, experts), before any softmax
SHARED_OUTPUT = "shared_output"  # always-on expert output, already multiplied by its gate
EXPERT_INPUT = "x"  # an expert graph's input: the routed tokens' MoE input rows
EXPERT_OUTPUT = "y"  # its output, before the routing weight
LOGITS = "logits"

# Stage targets: which runtime a bundle's layer stages are built for (the expert graphs are the same).
TARGET_TENSORRT = "tensorrt"  # standard ONNX ops TensorRT 10 parses (every ONNX Runtime runs them too)
TARGET_ORT_CPU = "ort-cpu"  # ONNX Runtime's fused CPU kernels: GroupQueryAttention with an in-place cache
STAGE_TARGETS = (TARGET_TENSORRT, TARGET_ORT_CPU)

# An ort-cpu layer stage's extra inputs (GroupQueryAttention's), beside HIDDEN and its KV buffers.
SEQLENS_K = "seqlens_k"  # int32 (rows,): each row's total length - 1
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"  # int32 scalar: the longest row's total length
COS_CACHE = "cos_cache"  # float32 (positions, head_dim / 2), shared by every stage
SIN_CACHE = "sin_cache"


def past_names(layer: int) -> tuple[str, str]:
    """An ort-cpu stage's KV buffer inputs: ``past_key.L``, ``past_value.L``."""
    return f"past_key.{layer}", f"past_value.{layer}"


def present_names(layer: int) -> tuple[str, str]:
    """Its KV buffer outputs ``present_key.L``, ``present_value.L`` (bound to the same buffers as past)."""
    return f"present_key.{layer}", f"present_value.{layer}"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, element type (numpy name) and shape (ints or symbolic names)."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX file of the bundle and its interface."""

    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    bytes: int

    @property
    def input_names(self) -> list[str]:
        """Input names in graph order."""
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        """Output names in graph order."""
        return [t.name for t in self.outputs]


@dataclass(frozen=True)
class GatingRule:
    """How an MoE layer turns router logits into expert choices and weights, exactly as the model does.

    ``scoring`` is applied to the float32 logits over all experts in float64 (exp, a sum in expert
    order, a division), then the ``top_k`` largest scores are taken (ties to the lower expert index);
    with ``normalize_top_k`` the chosen scores are divided by their sum (in float64); the weights are
    rounded to float32 once, at the end. The layer output is ``residual + reshape(sum over chosen experts of weight * expert(x)
    [+ shared_output])``, experts accumulated in ascending index order.
    """

    scoring: str  # "softmax"
    top_k: int
    normalize_top_k: bool
    shared_expert: bool  # the stage graph also outputs SHARED_OUTPUT (gate applied inside)


@dataclass(frozen=True)
class MoeSpec:
    """The routed part of one decoder layer.

    With ``experts_in_graph`` (``moedge split --target ort-cpu --experts-in-graph``) the layer's stage
    graph routes and runs its experts itself and outputs ``hidden_states_out`` like a dense stage: the
    record keeps the gating rule and expert count, ``experts`` is empty (no expert files) and there is
    no router file; such a layer may lie inside a stage's span.
    """

    num_experts: int
    gating: GatingRule
    experts: list[GraphSpec]
    router: str | None = None  # .npy of the router weight (experts x hidden), for speculative gating
    experts_in_graph: bool = False


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer: its stage graph and, for MoE layers, its experts.

    A stage may run several consecutive layers (``span`` > 1, written by ``moedge split --target
    ort-cpu``): dense layers, and MoE layers whose experts run inside the graph
    (``MoeSpec.experts_in_graph``). It reads and writes each covered layer's KV cache, and the layers it
    covers have no stage of their own (``stage`` None).
    """

    index: int
    stage: GraphSpec | None
    moe: MoeSpec | None = None
    span: int = 1


@dataclass(frozen=True)
class StageRun:
    """One stage graph and the decoder layers it runs, in order (one, or a span of dense layers)."""

    stage: GraphSpec
    layers: list[LayerSpec]

    @property
    def last(self) -> LayerSpec:
        """The last layer the stage runs: its output is the next stage's input."""
        return self.layers[-1]


@dataclass
class Manifest:
    """The parsed ``manifest.json`` of a bundle."""

    model: dict[str, Any]
    precision: str
    embedding: GraphSpec
    layers: list[LayerSpec]
    head: GraphSpec
    files: dict[str, dict[str, Any]]
    quantization: dict[str, Any] | None = None
    tokenizer: str | None = "tokenizer.json"
    routing: str | None = None
    stage_target: str = TARGET_TENSORRT
    rotary: str | None = None  # ort-cpu target: a float32 .npy (2, positions, head_dim / 2): cos, sin
    schema_version: int = (
        1  # what a bundle needs; the writer puts IN_GRAPH_SCHEMA_VERSION for in-graph experts
    )
    format: str = BUNDLE_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """The manifest as written to disk."""
        return json.dumps(asdict(self), indent=1)

    @property
    def experts_in_graph(self) -> bool:
        """Whether some MoE layer runs its experts inside its stage graph (no separate expert graphs)."""
        return any(layer.moe is not None and layer.moe.experts_in_graph for layer in self.layers)

    def require_separate_experts(self, feature: str, bundle: str | Path = "the bundle") -> None:
        """Refuse, with one line, a ``feature`` that needs each expert as its own graph (an expert cache,
        a routing trace, experts on a GPU, simulated profiles) on a bundle whose experts run in-graph."""
        if self.experts_in_graph:
            raise MoedgeError(
                f"{feature} needs each expert as its own graph, but {bundle} runs its experts inside its "
                "stage graphs (moedge split --experts-in-graph): use a bundle split without --experts-in-graph"
            )

    def graphs(self) -> list[GraphSpec]:
        """Every graph of the bundle, in run order."""
        out = [self.embedding]
        for layer in self.layers:
            if layer.stage is not None:
                out.append(layer.stage)
            if layer.moe is not None:
                out += layer.moe.experts
        return [*out, self.head]

    def stage_runs(self) -> list[StageRun]:
        """The layer stages in run order, each with the layers it runs."""
        runs: list[StageRun] = []
        for layer in self.layers:
            if layer.stage is not None:
                runs.append(StageRun(layer.stage, [layer]))
            else:  # covered by the previous stage's span (parse_manifest checks it)
                runs[-1].layers.append(layer)
        return runs

    def named_graphs(self) -> list[tuple[str, GraphSpec]]:
        """Every graph with its manifest field path (``layers[3].moe.experts[5]``), in run order."""
        out = [("embedding", self.embedding)]
        for i, layer in enumerate(self.layers):
            if layer.stage is not None:
                out.append((f"layers[{i}].stage", layer.stage))
            if layer.moe is not None:
                out += [(f"layers[{i}].moe.experts[{j}]", g) for j, g in enumerate(layer.moe.experts)]
        return [*out, ("head", self.head)]

    def named_paths(self) -> list[tuple[str, str]]:
        """Every file path the manifest names outside ``files``, with its field path."""
        out = [(f"{name}.file", g.file) for name, g in self.named_graphs()]
        out += [
            (f"layers[{i}].moe.router", layer.moe.router)
            for i, layer in enumerate(self.layers)
            if layer.moe is not None and layer.moe.router
        ]
        out += [
            (key, value)
            for key, value in (
                ("tokenizer", self.tokenizer),
                ("routing", self.routing),
                ("rotary", self.rotary),
            )
            if value
        ]
        return out

    def expert_bytes(self) -> int:
        """Bytes of every routed expert's files, as stored."""
        return sum(g.bytes for layer in self.layers if layer.moe for g in layer.moe.experts)
