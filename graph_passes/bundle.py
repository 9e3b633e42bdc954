"""``split_bundle``: an exported folder (monolithic ONNX) to a bundle folder a device runs as-is."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from tqdm import tqdm

from moedge._errors import MoedgeError
from moedge.arch import get_config
from moedge.formats.export_folder import TOKENIZER_FILE, ExportInfo, read_export_info
from moedge.formats.external_data import check_external_data
from moedge.formats.manifest import (
    BUNDLE_FORMAT,
    IN_GRAPH_SCHEMA_VERSION,
    MANIFEST_FILE,
    STAGE_TARGETS,
    TARGET_ORT_CPU,
    TARGET_TENSORRT,
    GraphSpec,
    LayerSpec,
    Manifest,
    MoeSpec,
    TensorSpec,
    sha256_file,
)
from moedge.formats.routing import ROUTING_FILE
from moedge.graph_passes.expert_dispatch import dispatch_experts_in_graph
from moedge.graph_passes.int8_embedding import embed_with_head_codes
from moedge.graph_passes.merge_stages import merge_layer_stages
from moedge.graph_passes.ort_cpu_target import (
    AttentionSpec,
    FusionRefused,
    fuse_norms,
    fuse_residual_joins,
    fuse_stage_for_ort_cpu,
    rotary_caches,
)
from moedge.graph_passes.pipeline import run_passes
from moedge.graph_passes.split_experts import SplitExpertsPass, SplitLayer, SplitModel
from moedge.paths import OutputKind, atomic_folder, check_output_folder

log = logging.getLogger(__name__)

# Initializers at least this large go to the graph's external data file (memory-mappable weights).
EXTERNAL_THRESHOLD_BYTES = 1024
# The ort-cpu target's cos/sin tables: float32 (2, max_positions, head_dim / 2), cos then sin.
ROTARY_FILE = "rotary_cache.npy"


def _bundle_files(folder: Path) -> list[str] | None:
    """The files of a previous bundle in ``folder``: manifest.json and every file it lists.

    Only the manifest's format and ``files`` are read, so a damaged bundle can still be replaced.
    """
    try:
        raw = json.loads((folder / MANIFEST_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(raw, dict)
        or raw.get("format") != BUNDLE_FORMAT
        or not isinstance(raw.get("files"), dict)
    ):
        return None
    return [MANIFEST_FILE, *(str(rel) for rel in raw["files"])]


BUNDLE_KIND = OutputKind("moedge bundle", _bundle_files, bundle=True)
"""A bundle folder: ``--overwrite`` replaces one that holds only manifest.json and the files it lists."""


def _spec(value: ir.Value) -> TensorSpec:
    dtype = value.dtype.numpy().name if value.dtype is not None else "unknown"
    shape: list[int | str] = []
    if value.shape is not None:
        shape = [d if isinstance(d, int) else str(d) for d in value.shape]
    return TensorSpec(name=value.name or "", dtype=dtype, shape=shape)


def _save(model: ir.Model, folder: Path, rel: str, validate: bool) -> tuple[GraphSpec, list[str]]:
    """Write one graph (+ its external data) and describe it; returns the spec and the files written."""
    model = run_passes(model, [common_passes.RemoveUnusedNodesPass()], debug=validate)
    path = folder / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.name + ".data"
    ir.save(model, path, external_data=data, size_threshold_bytes=EXTERNAL_THRESHOLD_BYTES)
    files = [rel]
    if (path.parent / data).is_file():
        files.append(str(Path(rel).parent / data))
    size = sum((folder / f).stat().st_size for f in files)
    spec = GraphSpec(
        file=rel,
        inputs=[_spec(v) for v in model.graph.inputs],
        outputs=[_spec(v) for v in model.graph.outputs],
        bytes=size,
    )
    return spec, files


def _check_with_ort(path: Path) -> None:
    """``--validate`` for a graph of ORT contrib ops (which the ONNX checker does not know): ONNX Runtime
    loads it on the CPU, checking every node against its kernels' schemas and inferring its types."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises several types for an invalid graph
        raise MoedgeError(f"{path.name} is not a valid ONNX Runtime graph: {exc}") from None


def _share_tensors(folder: Path, owner: str, user: str) -> str | None:
    """Point ``user``'s external tensors at byte-identical ones ``owner`` already stores (a tied lm_head,
    or an untied one whose values equal the embedding's).

    Returns None when nothing was shared, ``user``'s data file when nothing references it any more (the
    caller drops it from the file list), else "" (the file was rewritten smaller).
    """
    import onnx

    def external(proto: onnx.TensorProto) -> dict[str, str]:
        return {e.key: e.value for e in proto.external_data}

    def read(path: Path, info: dict[str, str]) -> bytes:
        with path.open("rb") as f:
            f.seek(int(info.get("offset", 0)))
            return f.read(int(info["length"]))

    base = (folder / owner).parent
    if (folder / user).parent != base:
        return None
    owned = [
        t
        for t in onnx.load(str(folder / owner), load_external_data=False).graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    model = onnx.load(str(folder / user), load_external_data=False)
    own_data = Path(user).name + ".data"
    changed = False
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        mine = external(tensor)
        candidates = [
            t for t in owned if list(t.dims) == list(tensor.dims) and t.data_type == tensor.data_type
        ]
        data = read(base / mine["location"], mine) if candidates else b""
        theirs = next(
            (external(t) for t in candidates if read(base / external(t)["location"], external(t)) == data),
            None,
        )
        if theirs is None:
            continue
        del tensor.external_data[:]
        for key, value in theirs.items():
            tensor.external_data.add(key=key, value=value)
        changed = True
    if not changed:
        return None
    # Rewrite the user's data file with only the tensors it still owns.
    kept = [t for t in model.graph.initializer if external(t).get("location") == own_data]
    blob = bytearray()
    for tensor in kept:
        info = external(tensor)
        data = read(base / own_data, info)
        del tensor.external_data[:]
        for key, value in (("location", own_data), ("offset", str(len(blob))), ("length", str(len(data)))):
            tensor.external_data.add(key=key, value=value)
        blob += data
    onnx.save(model, str(folder / user))
    if kept:
        (base / own_data).write_bytes(bytes(blob))
        return ""
    (base / own_data).unlink()
    return str(Path(user).parent / own_data)


def split_bundle(
    export_dir: str | Path,
    out_dir: str | Path,
    *,
    progress: bool = True,
    validate: bool = False,
    overwrite: bool = False,
    target: str = TARGET_TENSORRT,
    experts_in_graph: bool = False,
) -> Manifest:
    """Cut ``export_dir`` (``moedge export`` output, FP32 or QDQ) into a bundle folder at ``out_dir``.

    The bundle holds ``stages/`` (embedding, one graph per decoder layer, head), ``experts/`` (one graph
    per routed expert), ``tokenizer.json``, ``routing.json`` when the export has one, and
    ``manifest.json``. Written to a temporary sibling and renamed at the end; ``validate`` runs the
    ONNX checker on every graph. ``out_dir`` must be missing or empty; with ``overwrite`` it may also
    be a previous bundle holding nothing but its listed files, which the new one replaces in one swap.
    Nothing is written inside another bundle.

    ``target`` is the runtime the layer stages are built for: ``tensorrt`` (standard ONNX ops) or
    ``ort-cpu`` (every layer stage fused for ONNX Runtime's CPU kernels by ``fuse_stage_for_ort_cpu``,
    each run of consecutive dense layers joined into one graph by ``merge_layer_stages``, the embedding
    stage cut to what the fused stages read, the head's final norm one ``SimplifiedLayerNormalization``,
    plus ``rotary_cache.npy``, the cos/sin tables the stages read). Experts are the same for both. A model a stage of which cannot be fused is refused with
    ``FusionRefused`` before anything is written.

    ``experts_in_graph`` (ort-cpu only) builds every MoE layer's gating and routed experts into its stage
    graph (``dispatch_experts_in_graph``): no ``experts/`` files or routers, each MoE layer's stage
    outputs ``hidden_states_out``, and runs of consecutive layers, MoE or dense, are joined into one
    graph. Such a bundle runs every expert on the CPU; it has no per-expert graphs for an expert cache.
    """
    if target not in STAGE_TARGETS:
        raise MoedgeError(f"unknown stage target {target!r}: use {' or '.join(STAGE_TARGETS)}")
    if experts_in_graph and target != TARGET_ORT_CPU:
        raise MoedgeError(f"--experts-in-graph needs --target {TARGET_ORT_CPU} (got {target})")
    info = read_export_info(export_dir)
    out = Path(out_dir).expanduser().resolve()
    check_output_folder(out, kind=BUNDLE_KIND, overwrite=overwrite)
    if not info.with_cache:
        raise MoedgeError(f"{info.folder} was exported without a KV cache: re-export without --no-cache")
    start = time.perf_counter()
    split = _split(info)
    spec = _fuse_for_ort_cpu(info, split, experts_in_graph) if target == TARGET_ORT_CPU else None
    with atomic_folder(out, kind=BUNDLE_KIND, replace=overwrite) as tmp:
        writer = _BundleWriter(tmp, validate=validate, progress=progress, fused=spec is not None)
        embedding, layers, head = writer.write_graphs(split)
        shutil.copyfile(info.tokenizer_file, tmp / TOKENIZER_FILE)
        writer.files.append(TOKENIZER_FILE)
        routing = None
        if info.routing_file is not None:
            shutil.copyfile(info.routing_file, tmp / ROUTING_FILE)
            writer.files.append(ROUTING_FILE)
            routing = ROUTING_FILE
        if spec is not None:
            np.save(tmp / ROTARY_FILE, np.stack(rotary_caches(spec)).astype(np.float32))
            writer.files.append(ROTARY_FILE)
        manifest = _manifest(info, tmp, writer.files, embedding, layers, head, routing, spec)
        (tmp / MANIFEST_FILE).write_text(manifest.to_json())
    log.info(
        "bundle %s: %d graphs, experts %.1f MiB, in %.1f s",
        out,
        len(manifest.graphs()),
        manifest.expert_bytes() / 2**20,
        time.perf_counter() - start,
    )
    return manifest


def _split(info: ExportInfo) -> SplitModel:
    """Load the export's graph and cut it by its family's experts/router paths and gating rule."""
    arch = get_config(str(info.config["model_type"]))
    log.info("loading %s", info.model_file)
    check_external_data(info.model_file)  # an export is read only from its own folder
    try:
        model = ir.load(info.model_file)
    except Exception as exc:  # protobuf and onnx-ir raise several types for a damaged file
        raise MoedgeError(f"{info.model_file} is not a readable ONNX model ({exc}): re-export it") from None
    splitter = SplitExpertsPass(
        experts_path=arch.experts_path, router_path=arch.router_path, gating=arch.gating_rule(info.config)
    )
    return splitter(model)


def _fuse_for_ort_cpu(info: ExportInfo, split: SplitModel, experts_in_graph: bool = False) -> AttentionSpec:
    """Replace every layer stage of ``split`` by its ``fuse_stage_for_ort_cpu`` rewrite, for cos/sin
    tables of the model's whole context (one refusal, the first layer that cannot be fused, refuses
    all), with ``experts_in_graph`` each MoE layer's experts moved into its stage; then cut the
    embedding to what the fused stages read, fuse the head's norm, and give the embedding a tied int8
    head's codes. Before anything is written."""
    fallback = "split with --target tensorrt (standard ONNX stages every runtime runs)"
    context = info.config.get("max_position_embeddings")
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise FusionRefused(
            f"--target ort-cpu: {info.folder}'s config.json has no max_position_embeddings to size the "
            f"rotary tables by: {fallback}"
        )
    try:
        spec = AttentionSpec.from_config(info.config, max_positions=context)
    except FusionRefused as exc:
        raise FusionRefused(f"--target ort-cpu refused for {info.name}: {_reason(exc)}: {fallback}") from None
    for layer in split.layers:
        try:
            layer.stage = fuse_stage_for_ort_cpu(layer.stage, spec)
        except FusionRefused as exc:
            raise FusionRefused(
                f"--target ort-cpu refused: layer {layer.index} of {info.name} cannot use ONNX Runtime's "
                f"fused CPU kernels ({_reason(exc)}): {fallback}"
            ) from None
        if experts_in_graph and layer.gating is not None:
            layer.stage = dispatch_experts_in_graph(layer.stage, layer.experts, layer.gating, layer.index)
            layer.in_graph_experts, layer.experts, layer.router_weight = len(layer.experts), [], None
    _keep_read_outputs(split)
    fuse_norms(split.head)
    if embed_with_head_codes(split.embedding, split.head):
        log.info("embedding: the int8 head's codes (the FP32 table left out)")
    return spec


def _reason(exc: FusionRefused) -> str:
    """A refusal's reason without the pass's own advice (the split refuses the whole target instead)."""
    return str(exc).removesuffix(": keep the unfused stage")


class _BundleWriter:
    """Writes a ``SplitModel``'s graphs under a bundle folder, recording every file it writes."""

    def __init__(self, folder: Path, *, validate: bool, progress: bool, fused: bool = False) -> None:
        self.folder = folder
        self.validate = validate
        self.fused = fused  # layer stages use ORT contrib ops: validated by ONNX Runtime, not the checker
        self.progress = progress
        self.files: list[str] = []
        self._bar: Any = None  # the progress bar while write_graphs runs

    def write_graphs(self, split: SplitModel) -> tuple[GraphSpec, list[LayerSpec], GraphSpec]:
        """Write embedding, layer stages, experts, router weights and head; a tied head shares weights.
        On the ort-cpu target each run of consecutive dense layers (and MoE layers with in-graph
        experts) is one stage graph."""
        total = 2 + sum(1 + len(layer.experts) for layer in split.layers)
        with tqdm(total=total, desc="writing bundle", unit="graph", disable=not self.progress) as bar:
            self._bar = bar
            embedding = self._save(split.embedding, "stages/embedding.onnx")
            layers: list[LayerSpec] = []
            for run in _dense_runs(split.layers) if self.fused else [[layer] for layer in split.layers]:
                layers += self._span(run) if len(run) > 1 else [self._layer(run[0])]
            head = self._save(split.head, "stages/head.onnx", ort_ops=self.fused)
        dropped = _share_tensors(self.folder, embedding.file, head.file)
        if dropped is not None:  # a tied lm_head now reads the embedding's stored weight
            if dropped:
                self.files.remove(dropped)
            size = sum((self.folder / f).stat().st_size for f in self.files if f.startswith(head.file))
            head = GraphSpec(file=head.file, inputs=head.inputs, outputs=head.outputs, bytes=size)
        return embedding, layers, head

    def _save(self, graph: ir.Model, rel: str, *, ort_ops: bool = False) -> GraphSpec:
        spec, written = _save(graph, self.folder, rel, self.validate and not ort_ops)
        if self.validate and ort_ops:
            _check_with_ort(self.folder / rel)
        self.files.extend(written)
        self._bar.update(1)
        return spec

    def _span(self, run: list[SplitLayer]) -> list[LayerSpec]:
        """Consecutive dense (or in-graph MoE) layers as one stage graph: the first layer's spec spans them all."""
        first, last = run[0].index, run[-1].index
        merged = merge_layer_stages([layer.stage for layer in run], [layer.index for layer in run])
        joins = fuse_residual_joins(merged)
        log.info("layers %d-%d: one stage graph, %d residual joins fused", first, last, joins)
        stage = self._save(merged, f"stages/layers_{first:03d}_{last:03d}.onnx", ort_ops=True)
        self._bar.update(len(run) - 1)
        return [LayerSpec(index=first, stage=stage, moe=_in_graph_moe(run[0]), span=len(run))] + [
            LayerSpec(index=layer.index, stage=None, moe=_in_graph_moe(layer)) for layer in run[1:]
        ]

    def _layer(self, layer: SplitLayer) -> LayerSpec:
        stage = self._save(layer.stage, f"stages/layer_{layer.index:03d}.onnx", ort_ops=self.fused)
        if layer.gating is None or layer.in_graph_experts:
            return LayerSpec(index=layer.index, stage=stage, moe=_in_graph_moe(layer))
        experts = [
            self._save(g, f"experts/layer_{layer.index:03d}_expert_{e:03d}.onnx")
            for e, g in enumerate(layer.experts)
        ]
        router = None
        if layer.router_weight is not None:
            router = f"stages/layer_{layer.index:03d}.router.npy"
            np.save(self.folder / router, layer.router_weight)
            self.files.append(router)
        moe = MoeSpec(num_experts=len(experts), gating=layer.gating, experts=experts, router=router)
        return LayerSpec(index=layer.index, stage=stage, moe=moe)


def _in_graph_moe(layer: SplitLayer) -> MoeSpec | None:
    """The manifest record of a layer whose stage runs its experts (None for a dense layer)."""
    if layer.gating is None:
        return None
    assert layer.in_graph_experts, f"layer {layer.index}'s experts are separate graphs"
    return MoeSpec(num_experts=layer.in_graph_experts, gating=layer.gating, experts=[], experts_in_graph=True)


def _joinable(layer: SplitLayer) -> bool:
    """A layer whose stage reads ``hidden_states`` and writes ``hidden_states_out`` (no runner work between)."""
    return layer.gating is None or layer.in_graph_experts > 0


def _dense_runs(layers: list[SplitLayer]) -> list[list[SplitLayer]]:
    """The layers in order, grouped: each MoE layer with separate experts alone, each run of consecutive
    dense layers (and MoE layers with in-graph experts) together."""
    runs: list[list[SplitLayer]] = []
    for layer in layers:
        if _joinable(layer) and runs and _joinable(runs[-1][-1]):
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return runs


def _keep_read_outputs(split: SplitModel) -> None:
    """The embedding stage without the outputs no layer stage or head reads (the unfused attention's
    mask and rotary tables, on the ort-cpu target), and without the inputs it then no longer reads."""
    read = {v.name for layer in split.layers for v in layer.stage.graph.inputs}
    read |= {v.name for v in split.head.graph.inputs}
    graph = split.embedding.graph
    kept = [v for v in graph.outputs if v.name in read]
    graph.outputs.clear()
    graph.outputs.extend(kept)
    common_passes.RemoveUnusedNodesPass()(split.embedding)
    used = [v for v in graph.inputs if v.uses()]
    graph.inputs.clear()
    graph.inputs.extend(used)


_MODEL_META_KEYS = (
    "name",
    "architecture",
    "num_layers",
    "num_kv_heads",
    "head_dim",
    "bos_token_id",
    "eos_token_id",
)


def _manifest(
    info: ExportInfo,
    folder: Path,
    files: list[str],
    embedding: GraphSpec,
    layers: list[LayerSpec],
    head: GraphSpec,
    routing: str | None,
    spec: AttentionSpec | None,
) -> Manifest:
    """The bundle's manifest: the model facts from the export's ``config.json``, the graphs, every file's
    hash; with ``spec`` (the ort-cpu target) the stage target and the rotary tables' file."""
    raw, meta = info.config, info.raw
    model_info: dict[str, Any] = {k: meta.get(k) for k in _MODEL_META_KEYS}
    model_info.update(
        model_type=raw["model_type"],
        hidden_size=raw.get("hidden_size"),
        vocab_size=raw.get("vocab_size"),
        max_position_embeddings=raw.get("max_position_embeddings"),
        num_heads=raw.get("num_attention_heads"),
        rope_theta=_rope_theta(raw),
        num_experts=meta.get("num_experts", 0),
        source=meta.get("source"),
    )
    return Manifest(
        model=model_info,
        precision=str(meta.get("precision", "fp32")),
        embedding=embedding,
        layers=layers,
        head=head,
        files={f: {"sha256": sha256_file(folder / f), "bytes": (folder / f).stat().st_size} for f in files},
        quantization=meta.get("quantization"),
        routing=routing,
        stage_target=TARGET_TENSORRT if spec is None else TARGET_ORT_CPU,
        rotary=None if spec is None else ROTARY_FILE,
        schema_version=IN_GRAPH_SCHEMA_VERSION
        if any(layer.moe and layer.moe.experts_in_graph for layer in layers)
        else 1,
        extra={"split_from": str(info.folder), "opset": meta.get("opset")},
    )


def _rope_theta(config: dict[str, Any]) -> float | None:
    """The RoPE base of a Hugging Face config (``rope_parameters`` or the top-level ``rope_theta``);
    None for a model without one (learned positions) or a value that is not a positive number."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    theta = config.get("rope_theta") if theta is None else theta
    if isinstance(theta, bool) or not isinstance(theta, int | float) or not 0 < theta < float("inf"):
        return None
    return float(theta)
