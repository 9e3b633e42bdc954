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
from pathlib import Path
from typing import Any

from moedge._errors import MoedgeError
from moedge.formats.bundle_spec import (
    BUNDLE_FORMAT as BUNDLE_FORMAT,
)
from moedge.formats.bundle_spec import (
    COS_CACHE as COS_CACHE,
)
from moedge.formats.bundle_spec import (
    EXPERT_INPUT as EXPERT_INPUT,
)
from moedge.formats.bundle_spec import (
    EXPERT_OUTPUT as EXPERT_OUTPUT,
)
from moedge.formats.bundle_spec import (
    HIDDEN as HIDDEN,
)
from moedge.formats.bundle_spec import (
    HIDDEN_OUT as HIDDEN_OUT,
)
from moedge.formats.bundle_spec import (
    IN_GRAPH_SCHEMA_VERSION as IN_GRAPH_SCHEMA_VERSION,
)
from moedge.formats.bundle_spec import (
    LOGITS as LOGITS,
)
from moedge.formats.bundle_spec import (
    MANIFEST_FILE as MANIFEST_FILE,
)
from moedge.formats.bundle_spec import (
    MOE_INPUT as MOE_INPUT,
)
from moedge.formats.bundle_spec import (
    RESIDUAL as RESIDUAL,
)
from moedge.formats.bundle_spec import (
    ROUTER_LOGITS as ROUTER_LOGITS,
)
from moedge.formats.bundle_spec import (  # the records and names, re-exported
    SCHEMA_VERSION as SCHEMA_VERSION,
)
from moedge.formats.bundle_spec import (
    SEQLENS_K as SEQLENS_K,
)
from moedge.formats.bundle_spec import (
    SHARED_OUTPUT as SHARED_OUTPUT,
)
from moedge.formats.bundle_spec import (
    SIN_CACHE as SIN_CACHE,
)
from moedge.formats.bundle_spec import (
    STAGE_TARGETS as STAGE_TARGETS,
)
from moedge.formats.bundle_spec import (
    TARGET_ORT_CPU as TARGET_ORT_CPU,
)
from moedge.formats.bundle_spec import (
    TARGET_TENSORRT as TARGET_TENSORRT,
)
from moedge.formats.bundle_spec import (
    TOTAL_SEQUENCE_LENGTH as TOTAL_SEQUENCE_LENGTH,
)
from moedge.formats.bundle_spec import (
    GatingRule as GatingRule,
)
from moedge.formats.bundle_spec import (
    GraphSpec as GraphSpec,
)
from moedge.formats.bundle_spec import (
    LayerSpec as LayerSpec,
)
from moedge.formats.bundle_spec import (
    Manifest as Manifest,
)
from moedge.formats.bundle_spec import (
    MoeSpec as MoeSpec,
)
from moedge.formats.bundle_spec import (
    StageRun as StageRun,
)
from moedge.formats.bundle_spec import (
    TensorSpec as TensorSpec,
)
from moedge.formats.bundle_spec import (
    past_names as past_names,
)
from moedge.formats.bundle_spec import (
    present_names as present_names,
)
from moedge.formats.external_data import external_files
from moedge.formats.json_fields import FieldReader as _Reader
from moedge.formats.json_fields import show as _show

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
