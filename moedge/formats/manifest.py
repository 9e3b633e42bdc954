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
import os
import posixpath
import re
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moedge._errors import MoedgeError
from moedge.formats.external_data import external_files
from moedge.formats.json_fields import FieldReader as _Reader
from moedge.formats.json_fields import show as _show

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


MAX_FILE_BYTES = 1 << 62  # a byte count any runtime can add up without overflowing int64
MAX_DIM = 1 << 16  # heads, head size, experts per layer
MAX_LAYERS = 1 << 16
MAX_VOCAB = 1 << 31
MAX_ROPE_THETA = 1e12  # RoPE base: real models use 1e4 to 1e8
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FIX = "re-split the bundle with moedge split"


def relative_path(value: Any, field_path: str, where: str) -> str:
    """``value`` when it is a normalised relative path (``a/b.onnx``: no ``..``, ``.``, empty parts,
    backslashes or NULs), else one error naming the manifest field."""
    ok = isinstance(value, str) and bool(value) and "\\" not in value and "\0" not in value
    if ok and not value.startswith("/"):
        ok = all(part not in ("", ".", "..") for part in value.split("/"))
    else:
        ok = False
    if not ok:
        raise MoedgeError(
            f"{where}: {field_path} {_show(value)} is not a relative path inside the bundle: {_FIX}"
        )
    return str(value)


def _confine(root: Path, rel: str, field_path: str, where: str) -> Path:
    """``root/rel`` when it resolves (symlinks followed) inside ``root``; nothing is opened."""
    target = Path(os.path.realpath(root / rel))
    if target != root and root not in target.parents:
        raise MoedgeError(
            f"{where}: {field_path} {_show(rel)} is not a relative path inside the bundle: {_FIX}"
        )
    return target


def _tensor(r: _Reader, d: Any, f: str) -> TensorSpec:
    d = r.obj(d, f)
    shape = r.array(r.get(d, "shape", f + ".shape"), f + ".shape")
    for i, dim in enumerate(shape):
        if isinstance(dim, bool) or not isinstance(dim, int | str):
            r.fail(f"{f}.shape[{i}]", "an integer or a name", dim)
    return TensorSpec(
        name=r.string(r.get(d, "name", f + ".name"), f + ".name"),
        dtype=r.string(r.get(d, "dtype", f + ".dtype"), f + ".dtype"),
        shape=list(shape),
    )


def _graph(r: _Reader, d: Any, f: str) -> GraphSpec:
    d = r.obj(d, f)
    inputs = r.array(r.get(d, "inputs", f + ".inputs"), f + ".inputs")
    outputs = r.array(r.get(d, "outputs", f + ".outputs"), f + ".outputs")
    file = relative_path(r.get(d, "file", f + ".file"), f + ".file", r.where)
    if file in r.graph_files:
        raise MoedgeError(f"{r.where}: {f} {_show(file)} is used by two graphs")
    r.graph_files.add(file)
    return GraphSpec(
        file=file,
        inputs=[_tensor(r, t, f"{f}.inputs[{i}]") for i, t in enumerate(inputs)],
        outputs=[_tensor(r, t, f"{f}.outputs[{i}]") for i, t in enumerate(outputs)],
        bytes=r.integer(r.get(d, "bytes", f + ".bytes"), f + ".bytes", 0, MAX_FILE_BYTES),
    )


def _layer(r: _Reader, d: Any, i: int) -> LayerSpec:
    f = f"layers[{i}]"
    d = r.obj(d, f)
    index = r.get(d, "index", f + ".index")
    if isinstance(index, bool) or index != i:
        r.fail(f + ".index", f"layer index {i}", index)
    moe = d.get("moe")
    spec = None
    if moe is not None:
        m = r.obj(moe, f + ".moe")
        num = r.integer(r.get(m, "num_experts", f + ".moe.num_experts"), f + ".moe.num_experts", 1, MAX_DIM)
        experts = r.array(r.get(m, "experts", f + ".moe.experts"), f + ".moe.experts")
        in_graph = r.boolean(m.get("experts_in_graph", False), f + ".moe.experts_in_graph")
        if in_graph and experts:
            r.fail(
                f + ".moe.experts", "[] (the experts run inside the stage graph)", f"{len(experts)} graphs"
            )
        if in_graph and m.get("router") is not None:
            r.fail(f + ".moe.router", "null (the experts run inside the stage graph)", m.get("router"))
        if not in_graph and len(experts) != num:
            r.fail(f + ".moe.experts", f"an array of num_experts={num} graphs", f"{len(experts)} graphs")
        g = r.obj(r.get(m, "gating", f + ".moe.gating"), f + ".moe.gating")
        scoring = r.get(g, "scoring", f + ".moe.gating.scoring")
        if scoring != "softmax":
            r.fail(f + ".moe.gating.scoring", "'softmax'", scoring)
        gating = GatingRule(
            scoring="softmax",
            top_k=r.integer(r.get(g, "top_k", f + ".moe.gating.top_k"), f + ".moe.gating.top_k", 1, num),
            normalize_top_k=r.boolean(
                r.get(g, "normalize_top_k", f + ".moe.gating.normalize_top_k"),
                f + ".moe.gating.normalize_top_k",
            ),
            shared_expert=r.boolean(g.get("shared_expert", False), f + ".moe.gating.shared_expert"),
        )
        router = m.get("router")
        spec = MoeSpec(
            num_experts=num,
            gating=gating,
            experts=[_graph(r, e, f"{f}.moe.experts[{j}]") for j, e in enumerate(experts)],
            router=None if router is None else relative_path(router, f + ".moe.router", r.where),
            experts_in_graph=in_graph,
        )
    stage = r.get(d, "stage", f + ".stage")
    return LayerSpec(
        index=i,
        stage=None if stage is None else _graph(r, stage, f + ".stage"),
        moe=spec,
        span=r.integer(d.get("span", 1), f + ".span", 1, MAX_LAYERS),
    )


def _check_spans(r: _Reader, layers: list[LayerSpec]) -> None:
    """Every layer has a stage or lies in an earlier stage's span of dense layers (or MoE layers whose
    experts run inside the graph)."""
    covered_to = -1  # the last layer the latest stage runs
    for i, layer in enumerate(layers):
        f = f"layers[{i}]"
        separate = layer.moe is not None and not layer.moe.experts_in_graph
        if layer.stage is None:
            if i > covered_to:
                r.fail(f + ".stage", "a graph (no earlier layer's stage spans this layer)", None)
            if separate:
                r.fail(f + ".moe", "null (a layer inside a span is dense)", "an MoE layer")
            if layer.span != 1:
                r.fail(f + ".span", "1 (the layer has no stage)", layer.span)
            continue
        if i <= covered_to:
            r.fail(f + ".stage", "null (an earlier layer's stage spans this layer)", "a graph")
        if layer.span > 1 and separate:
            r.fail(f + ".span", "1 for an MoE layer", layer.span)
        if i + layer.span > len(layers):
            r.fail(f + ".span", f"at most {len(layers) - i} (the layers from here on)", layer.span)
        covered_to = i + layer.span - 1


def _model(r: _Reader, d: Any) -> dict[str, Any]:
    model = r.obj(d, "model")
    r.integer(r.get(model, "num_kv_heads", "model.num_kv_heads"), "model.num_kv_heads", 1, MAX_DIM)
    r.integer(r.get(model, "head_dim", "model.head_dim"), "model.head_dim", 1, MAX_DIM)
    r.optional_int(model, "vocab_size", "model.vocab_size", 1, MAX_VOCAB - 1)
    r.optional_int(model, "max_position_embeddings", "model.max_position_embeddings", 1, MAX_VOCAB - 1)
    r.optional_int(model, "hidden_size", "model.hidden_size", 1, MAX_DIM * 16)
    r.optional_int(model, "num_heads", "model.num_heads", 1, MAX_DIM)
    r.optional_float(model, "rope_theta", "model.rope_theta", 0.0, MAX_ROPE_THETA)
    vocab = int(model.get("vocab_size") or MAX_VOCAB)
    for key in ("eos_token_id", "bos_token_id"):
        value = model.get(key)
        for j, token in enumerate(value if isinstance(value, list) else [value]):
            if token is not None:
                where = f"model.{key}" + (f"[{j}]" if isinstance(value, list) else "")
                r.integer(token, where, 0, vocab - 1)
    return dict(model)


def _stage_target(r: _Reader, raw: dict[str, Any]) -> str:
    target = raw.get("stage_target", TARGET_TENSORRT)
    if target not in STAGE_TARGETS:
        r.fail("stage_target", " or ".join(repr(t) for t in STAGE_TARGETS), target)
    if target == TARGET_ORT_CPU and raw.get("rotary") is None:
        r.fail("rotary", "the cos/sin table file an ort-cpu bundle's stages read", None)
    return str(target)


def parse_manifest(raw: Any, folder: Path, where: str | None = None) -> Manifest:
    """The manifest of the bundle at ``folder`` from its parsed JSON, checked before any file is opened.

    Types and ranges of every field a runtime reads; every path (graph files, routers, tokenizer,
    routing, ``files`` keys) relative, normalised and resolving inside ``folder``; every one of them
    listed under ``files``; no file used by two graphs. Raises ``MoedgeError`` naming the field.
    """
    where = where or str(folder / MANIFEST_FILE)
    r = _Reader(where)
    raw = r.obj(raw, "the manifest")
    if raw.get("format") != BUNDLE_FORMAT:
        raise MoedgeError(f"{where} is not a moedge bundle manifest (format {_show(raw.get('format'))})")
    version = raw.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int) or version > SCHEMA_VERSION:
        raise MoedgeError(
            f"{where} has schema version {_show(version)}; this moedge reads up to {SCHEMA_VERSION}: "
            "upgrade moedge"
        )
    r.integer(version, "schema_version", 1, SCHEMA_VERSION)
    model = _model(r, r.get(raw, "model", "model"))
    files_raw = r.obj(r.get(raw, "files", "files"), "files")
    files: dict[str, dict[str, Any]] = {}
    for rel, entry in files_raw.items():
        f = f"files[{json.dumps(rel)}]"
        relative_path(rel, f, where)
        entry = r.obj(entry, f)
        sha = r.get(entry, "sha256", f + ".sha256")
        if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            r.fail(f + ".sha256", "a 64-digit lowercase hex sha256", sha)
        size = r.integer(r.get(entry, "bytes", f + ".bytes"), f + ".bytes", 0, MAX_FILE_BYTES)
        files[rel] = {"sha256": sha, "bytes": size}
    layers_raw = r.array(r.get(raw, "layers", "layers"), "layers", nonempty=True)
    if model.get("num_layers") is not None and model["num_layers"] != len(layers_raw):
        r.fail("model.num_layers", f"the number of layers listed ({len(layers_raw)})", model["num_layers"])
    quantization = raw.get("quantization")
    if quantization is not None:
        r.obj(quantization, "quantization")
    manifest = Manifest(
        model=model,
        precision=r.string(r.get(raw, "precision", "precision"), "precision"),
        embedding=_graph(r, r.get(raw, "embedding", "embedding"), "embedding"),
        layers=[_layer(r, layer, i) for i, layer in enumerate(layers_raw)],
        head=_graph(r, r.get(raw, "head", "head"), "head"),
        files=files,
        quantization=quantization,
        tokenizer=None
        if raw.get("tokenizer") is None
        else relative_path(raw["tokenizer"], "tokenizer", where),
        routing=None if raw.get("routing") is None else relative_path(raw["routing"], "routing", where),
        stage_target=_stage_target(r, raw),
        rotary=None if raw.get("rotary") is None else relative_path(raw["rotary"], "rotary", where),
        schema_version=version,
        extra=r.obj(raw.get("extra", {}), "extra"),
    )
    _check_spans(r, manifest.layers)
    if manifest.experts_in_graph:
        if version < IN_GRAPH_SCHEMA_VERSION:
            r.fail(
                "schema_version",
                f"{IN_GRAPH_SCHEMA_VERSION} (a bundle with experts_in_graph layers)",
                version,
            )
        if manifest.stage_target != TARGET_ORT_CPU:
            r.fail(
                "stage_target",
                f"{TARGET_ORT_CPU!r} (the only target with experts_in_graph)",
                manifest.stage_target,
            )
    root = Path(os.path.realpath(folder))
    for field_path, rel in manifest.named_paths():
        if rel not in files:
            raise MoedgeError(f"{where}: {field_path} {_show(rel)} is not listed under files")
    for rel in files:
        _confine(root, rel, f"files[{json.dumps(rel)}]", where)
    return manifest


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


MAX_MANIFEST_BYTES = 64 << 20


def read_manifest(bundle: str | Path, *, verify: bool = False) -> Manifest:
    """Parse and check ``bundle/manifest.json`` (see ``parse_manifest``), then the files it lists.

    Every listed file must be a regular file of its recorded size, and every graph's external data
    a listed file in its folder (checked always: cheap, and what keeps a runtime inside the bundle);
    with ``verify`` each file's sha256 is checked too.
    """
    folder = Path(bundle)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise MoedgeError(f"{folder} is not a moedge bundle (no {MANIFEST_FILE}): run `moedge split` first")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise MoedgeError(f"{path} is larger than {MAX_MANIFEST_BYTES >> 20} MiB: not a moedge manifest")
    try:
        raw = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        detail = (
            f"line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else exc.reason
        )
        raise MoedgeError(f"{path} is not valid JSON ({detail})") from None
    except RecursionError:
        raise MoedgeError(f"{path} is not valid JSON (nested too deeply)") from None
    manifest = parse_manifest(raw, folder, str(path))
    check_files(folder, manifest, hashes=verify)
    return manifest


def check_files(folder: Path, manifest: Manifest, *, hashes: bool = True) -> None:
    """Check that every listed file is a regular file with its recorded size (and, with ``hashes``, its
    sha256), and that every graph's external data is a listed file beside it."""
    for rel, entry in manifest.files.items():
        path = folder / rel
        try:
            info = path.stat()
        except OSError:
            raise MoedgeError(f"bundle {folder} is missing {rel}: copy the whole bundle folder") from None
        if not stat.S_ISREG(info.st_mode):
            raise MoedgeError(f"bundle file {rel} is not a regular file: re-copy the bundle")
        if info.st_size != entry["bytes"]:
            raise MoedgeError(
                f"bundle file {rel} has {info.st_size} bytes, the manifest says {entry['bytes']}: re-copy the bundle"
            )
    for field_path, graph in manifest.named_graphs():
        base = graph.file.rpartition("/")[0]
        for location in external_files(folder / graph.file):
            rel = posixpath.normpath(posixpath.join(base, location)) if location else ""
            ok = bool(location) and not location.startswith("/") and "\\" not in location
            if not ok or rel.startswith("../") or rel == ".." or rel not in manifest.files:
                raise MoedgeError(
                    f"bundle graph {graph.file} ({field_path}) reads external data {location!r}, which is not "
                    "a file listed under files: re-split the bundle with moedge split"
                )
    if hashes:
        for rel, entry in manifest.files.items():
            if sha256_file(folder / rel) != entry["sha256"]:
                raise MoedgeError(
                    f"bundle file {rel} does not match its sha256 in manifest.json: re-copy or re-split the bundle"
                )


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Check every listed file's size and sha256 and every graph's external data (``check_files``)."""
    check_files(folder, manifest, hashes=True)
