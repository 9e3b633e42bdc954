"""The bundle format: ``manifest.json``, what any runner (Python or C++) needs to run a split model.

A bundle is a folder: ``manifest.json``, ``tokenizer.json``, ``stages/`` (embedding, one graph per
decoder layer, head) and ``experts/`` (one graph per routed expert, weights as external data), plus
optional ``routing.json``. The manifest names every graph's inputs and outputs, the gating rule of
every MoE layer, the quantization summary and the sha256 of every file. numpy/json only: a device
reads it without torch, transformers or onnx.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moedge._errors import MoedgeError

SCHEMA_VERSION = 1
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
    """The routed part of one decoder layer."""

    num_experts: int
    gating: GatingRule
    experts: list[GraphSpec]
    router: str | None = None  # .npy of the router weight (experts x hidden), for speculative gating


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer: its stage graph and, for MoE layers, its experts."""

    index: int
    stage: GraphSpec
    moe: MoeSpec | None = None


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
    schema_version: int = SCHEMA_VERSION
    format: str = BUNDLE_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """The manifest as written to disk."""
        return json.dumps(asdict(self), indent=1)

    def graphs(self) -> list[GraphSpec]:
        """Every graph of the bundle, in run order."""
        out = [self.embedding]
        for layer in self.layers:
            out.append(layer.stage)
            if layer.moe is not None:
                out += layer.moe.experts
        return [*out, self.head]

    def expert_bytes(self) -> int:
        """Bytes of every routed expert's files, as stored."""
        return sum(g.bytes for layer in self.layers if layer.moe for g in layer.moe.experts)


def _tensor(d: dict[str, Any]) -> TensorSpec:
    return TensorSpec(name=str(d["name"]), dtype=str(d["dtype"]), shape=list(d["shape"]))


def _graph(d: dict[str, Any]) -> GraphSpec:
    return GraphSpec(
        file=str(d["file"]),
        inputs=[_tensor(t) for t in d["inputs"]],
        outputs=[_tensor(t) for t in d["outputs"]],
        bytes=int(d["bytes"]),
    )


def _layer(d: dict[str, Any]) -> LayerSpec:
    moe = d.get("moe")
    return LayerSpec(
        index=int(d["index"]),
        stage=_graph(d["stage"]),
        moe=None
        if moe is None
        else MoeSpec(
            num_experts=int(moe["num_experts"]),
            gating=GatingRule(**moe["gating"]),
            experts=[_graph(g) for g in moe["experts"]],
            router=moe.get("router"),
        ),
    )


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(bundle: str | Path, *, verify: bool = False) -> Manifest:
    """Parse ``bundle/manifest.json``; with ``verify``, check every listed file's size and sha256."""
    folder = Path(bundle)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise MoedgeError(f"{folder} is not a moedge bundle (no {MANIFEST_FILE}): run `moedge split` first")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MoedgeError(f"{path} is not valid JSON ({exc})") from None
    if raw.get("format") != BUNDLE_FORMAT:
        raise MoedgeError(f"{path} is not a moedge bundle manifest (format {raw.get('format')!r})")
    version = raw.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise MoedgeError(
            f"{path} has schema version {version}; this moedge reads up to {SCHEMA_VERSION}: upgrade moedge"
        )
    try:
        manifest = Manifest(
            model=dict(raw["model"]),
            precision=str(raw["precision"]),
            embedding=_graph(raw["embedding"]),
            layers=[_layer(x) for x in raw["layers"]],
            head=_graph(raw["head"]),
            files=dict(raw["files"]),
            quantization=raw.get("quantization"),
            tokenizer=raw.get("tokenizer"),
            routing=raw.get("routing"),
            schema_version=version,
            extra=dict(raw.get("extra", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise MoedgeError(f"{path} is missing or mangles a field ({exc!r})") from None
    for graph in manifest.graphs():
        if graph.file not in manifest.files:
            raise MoedgeError(f"{path}: graph {graph.file} is not listed under files")
    if verify:
        verify_files(folder, manifest)
    return manifest


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Check that every file the manifest lists exists with its recorded size and sha256."""
    for rel, entry in manifest.files.items():
        path = folder / rel
        if not path.is_file():
            raise MoedgeError(f"bundle {folder} is missing {rel}: copy the whole bundle folder")
        if path.stat().st_size != int(entry["bytes"]):
            raise MoedgeError(
                f"bundle file {rel} has {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
            )
        if sha256_file(path) != entry["sha256"]:
            raise MoedgeError(f"bundle file {rel} does not match its sha256 in the manifest: re-copy it")
