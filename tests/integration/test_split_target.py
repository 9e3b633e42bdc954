"""``moedge split --target``: ort-cpu bundles (fused layer stages, rotary tables) and the refusals.

An ort-cpu split of a tiny model must differ from the tensorrt split of the same export only in its
layer stages, its embedding stage (cut to what the fused stages read), ``rotary_cache.npy`` and the
manifest fields that say so; a dense model's layers become one stage graph that computes what the
tensorrt split's stages compute; a model whose stages cannot be fused (stories260K: head size 8) is
refused in one line, writing nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import pytest

from moedge._errors import MoedgeError
from moedge.cli import main
from moedge.formats.export_folder import read_export_info
from moedge.formats.manifest import (
    MANIFEST_FILE,
    TARGET_ORT_CPU,
    TARGET_TENSORRT,
    GraphSpec,
    Manifest,
    TensorSpec,
    read_manifest,
)
from moedge.graph_passes.bundle import ROTARY_FILE, split_bundle
from moedge.graph_passes.ort_cpu_target import (
    COS_CACHE,
    SEQLENS_K,
    SIN_CACHE,
    TOTAL_SEQUENCE_LENGTH,
    AttentionSpec,
    past_names,
    present_names,
    rotary_caches,
)

KIND = "mixtral"  # MoE stages (residual, moe_input, router_logits), experts, router weights


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def ort_bundle(tiny_exports, tmp_path_factory) -> Path:
    """tiny-mixtral split with ``--target ort-cpu`` through the CLI (in-process)."""
    out = tmp_path_factory.mktemp("ort-cpu") / "bundle"
    code = main(["-q", "split", str(tiny_exports(KIND)), "-o", str(out), "--target", "ort-cpu"])
    assert code == 0
    return out


def _io(values: Iterable[onnx.ValueInfoProto]) -> list[TensorSpec]:
    """A graph's inputs or outputs as the manifest writes them (numpy dtype name, ints or axis names)."""
    out = []
    for value in values:
        t = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        shape: list[int | str] = [
            d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim
        ]
        out.append(TensorSpec(name=value.name, dtype=dtype, shape=shape))
    return out


def _graph_io(bundle: Path, spec: GraphSpec) -> tuple[list[TensorSpec], list[TensorSpec]]:
    model = onnx.load(str(bundle / spec.file), load_external_data=False)
    return _io(model.graph.input), _io(model.graph.output)


def test_manifest_names_the_target_the_rotary_tables_and_the_attention_facts(ort_bundle, tiny_exports):
    manifest = read_manifest(ort_bundle, verify=True)  # every file listed, confined, of its sha256
    config = read_export_info(tiny_exports(KIND)).config
    assert manifest.stage_target == TARGET_ORT_CPU
    assert manifest.rotary == ROTARY_FILE and ROTARY_FILE in manifest.files
    assert manifest.model["num_heads"] == config["num_attention_heads"] == 4
    assert manifest.model["rope_theta"] == AttentionSpec.from_config(config).rope_theta == 1e6
    assert manifest.model["max_position_embeddings"] == config["max_position_embeddings"]
    on_disk = {str(p.relative_to(ort_bundle)) for p in ort_bundle.rglob("*") if p.is_file() or p.is_symlink()}
    assert on_disk == {MANIFEST_FILE, *manifest.files}, (
        "a written file is not listed, or a listed one missing"
    )
    raw = json.loads((ort_bundle / MANIFEST_FILE).read_text())
    assert raw["stage_target"] == "ort-cpu" and raw["rotary"] == "rotary_cache.npy"


def test_rotary_file_holds_the_caches_the_fused_stages_read(ort_bundle, tiny_exports):
    config = read_export_info(tiny_exports(KIND)).config
    spec = AttentionSpec.from_config(config, max_positions=config["max_position_embeddings"])
    table = np.load(ort_bundle / ROTARY_FILE, allow_pickle=False)
    cos, sin = rotary_caches(spec)
    assert table.dtype == np.float32 and table.shape == (2, 512, 8)
    np.testing.assert_array_equal(table[0], cos)
    np.testing.assert_array_equal(table[1], sin)


def test_every_graphs_manifest_io_is_its_onnx_files_io(ort_bundle):
    manifest = read_manifest(ort_bundle)
    for field, spec in manifest.named_graphs():
        inputs, outputs = _graph_io(ort_bundle, spec)
        assert (spec.inputs, spec.outputs) == (inputs, outputs), field
    for layer in manifest.layers:
        names = layer.stage.input_names
        assert names == [
            "hidden_states",
            *past_names(layer.index),
            SEQLENS_K,
            TOTAL_SEQUENCE_LENGTH,
            COS_CACHE,
            SIN_CACHE,
        ]
        assert layer.stage.output_names[-2:] == list(present_names(layer.index))
        assert "residual" in layer.stage.output_names and "router_logits" in layer.stage.output_names
        ops = {(n.domain, n.op_type) for n in onnx.load(str(ort_bundle / layer.stage.file)).graph.node}
        assert ("com.microsoft", "GroupQueryAttention") in ops


def _stage_files(manifest: Manifest) -> set[str]:
    """The stages' files (graph and external data): embedding, layers, head."""
    graphs = [run.stage for run in manifest.stage_runs()] + [manifest.embedding, manifest.head]
    names = [f for graph in graphs for f in (graph.file, graph.file + ".data")]
    return {f for f in names if f in manifest.files}


def test_only_the_stages_differ_from_a_tensorrt_split(ort_bundle, bundles):
    trt_bundle = bundles(KIND)  # the same export, split with the default target
    ort, trt = read_manifest(ort_bundle), read_manifest(trt_bundle)
    assert trt.stage_target == TARGET_TENSORRT and trt.rotary is None
    shared = set(ort.files) - _stage_files(ort) - {ROTARY_FILE}
    assert shared == set(trt.files) - _stage_files(trt)
    assert any(f.startswith("experts/") for f in shared)
    for rel in sorted(shared):
        assert (ort_bundle / rel).read_bytes() == (trt_bundle / rel).read_bytes(), rel
        assert ort.files[rel] == trt.files[rel], rel
    assert ort.head.input_names == trt.head.input_names and ort.head.outputs == trt.head.outputs
    head_ops = [n.op_type for n in onnx.load(str(ort_bundle / ort.head.file)).graph.node]
    assert head_ops.count("SimplifiedLayerNormalization") == 1 and "Pow" not in head_ops
    # the fused stages read no mask or rotary tables from the embedding: it maps ids to hidden states
    assert ort.embedding.input_names == ["input_ids"] and ort.embedding.output_names == ["hidden_states"]
    assert len(trt.embedding.output_names) > 1
    for a, b in zip(ort.layers, trt.layers, strict=True):
        assert a.moe == b.moe and a.span == b.span == 1  # MoE layers: one stage each
        assert a.stage is not None and b.stage is not None
        assert a.stage.input_names != b.stage.input_names
    assert ort.model == trt.model


def test_a_dense_models_layers_are_one_stage_graph(tiny_exports, bundles, tmp_path):
    """tiny-llama: both dense layers in one graph, reading each layer's KV buffers, whose tokens and
    logits are the tensorrt split's (through the one generation loop, on both caches)."""
    from moedge.runtime import greedy
    from moedge.runtime.bundle_runner import BundleRunner

    out = tmp_path / "bundle"
    split_bundle(tiny_exports("llama"), out, target="ort-cpu", progress=False, validate=True)
    manifest = read_manifest(out, verify=True)
    runs = manifest.stage_runs()
    assert len(runs) == 1 and [layer.index for layer in runs[0].layers] == [0, 1]
    first, second = manifest.layers
    assert first.span == 2 and first.stage is not None and second.stage is None
    assert first.stage.file == "stages/layers_000_001.onnx"
    assert first.stage.input_names == [
        "hidden_states",
        *past_names(0),
        SEQLENS_K,
        TOTAL_SEQUENCE_LENGTH,
        COS_CACHE,
        SIN_CACHE,
        *past_names(1),
    ]
    assert first.stage.output_names == [*present_names(0), *present_names(1), "hidden_states_out"]
    ops = [n.op_type for n in onnx.load(str(out / first.stage.file)).graph.node]
    assert ops.count("GroupQueryAttention") == 2
    # layer 0's closing residual Add and layer 1's input norm became one SkipSimplifiedLayerNormalization
    assert (
        ops.count("SkipSimplifiedLayerNormalization") == 3 and ops.count("SimplifiedLayerNormalization") == 1
    )
    ids = np.array([[3, 17, 42, 5, 9, 11]], dtype=np.int64)
    fused, reference = BundleRunner(out), BundleRunner(bundles("llama"))
    np.testing.assert_allclose(fused.forward(ids)[0], reference.forward(ids)[0], rtol=1e-4, atol=1e-4)
    prompt = ids[0].tolist()
    assert greedy(fused, prompt, max_new_tokens=12) == greedy(reference, prompt, max_new_tokens=12)


def test_moedge_build_refuses_an_ort_cpu_bundle(ort_bundle, capsys):
    code, _, err = _run(capsys, "-q", "build", str(ort_bundle))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1
    assert "contrib ops TensorRT cannot parse" in err and "--target tensorrt" in err


def test_validate_loads_the_fused_stages_in_onnx_runtime(tiny_exports, tmp_path, capsys):
    """The ONNX checker does not know ORT's contrib ops: ``--validate`` checks fused stages with ORT."""
    out = tmp_path / "bundle"
    code, _, err = _run(
        capsys,
        "-q",
        "split",
        str(tiny_exports("qwen2-moe")),
        "-o",
        str(out),
        "--target",
        "ort-cpu",
        "--validate",
    )
    assert code == 0, err
    assert read_manifest(out, verify=True).stage_target == TARGET_ORT_CPU


def test_help_documents_the_target(capsys):
    code, out, _ = _run(capsys, "split", "--help")
    assert code == 0
    assert "--target {tensorrt,ort-cpu}" in out and "GroupQueryAttention" in " ".join(out.split())


def test_an_unknown_target_is_a_usage_error(tiny_exports, tmp_path, capsys):
    code, _, err = _run(
        capsys, "split", str(tiny_exports(KIND)), "-o", str(tmp_path / "b"), "--target", "gpu"
    )
    assert code == 2 and "--target" in err and not (tmp_path / "b").exists()
    with pytest.raises(MoedgeError, match="unknown stage target 'gpu'"):
        split_bundle(tiny_exports(KIND), tmp_path / "b", target="gpu", progress=False)
    assert not (tmp_path / "b").exists()


def test_a_model_that_cannot_be_fused_is_refused_writing_nothing(data_dir, tmp_path, capsys):
    """stories260K (head size 8: ORT's rotary GroupQueryAttention needs a multiple of 16)."""
    export = tmp_path / "export"
    code, _, err = _run(
        capsys, "-q", "export", str(data_dir / "stories260K" / "stories260K.bin"), "-o", str(export)
    )
    assert code == 0, err
    out = tmp_path / "out" / "bundle"
    code, stdout, err = _run(capsys, "-q", "split", str(export), "-o", str(out), "--target", "ort-cpu")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and not stdout, err
    assert "layer 0" in err and "head size 8 is not a multiple of 16" in err
    assert "--target tensorrt" in err and "keep the unfused stage" not in err
    assert not out.exists() and not (tmp_path / "out").exists()  # not even a temporary sibling
    assert sorted(os.listdir(tmp_path)) == ["export"]
    code, _, err = _run(capsys, "-q", "split", str(export), "-o", str(out))  # the default target splits it
    assert code == 0, err
    assert read_manifest(out).stage_target == TARGET_TENSORRT


@pytest.mark.parametrize("tied", [True, False])
def test_a_tied_int8_head_serves_as_the_embedding_table(tmp_path, tied):
    """--quantize-head on a model with tied embeddings: the ort-cpu bundle's embedding reads the head's
    int8 codes (stored once) and its FP32 table leaves the bundle; an untied head leaves the table FP32."""
    from moedge.calibration import CalibrationConfig, apply_recipe, calibrate, save_recipe
    from moedge.export.exporter import export_model
    from moedge.runtime.bundle_runner import BundleRunner
    from moedge.testbeds import build_tiny

    def tiny():
        loaded = build_tiny("llama")
        if tied:
            model = loaded.model
            model.config.tie_word_embeddings = True
            model.lm_head.weight = model.model.embed_tokens.weight
        return loaded

    loaded = tiny()
    samples = list(np.random.default_rng(0).integers(0, 256, (8, 48)))
    config = CalibrationConfig(method="haq", quantize_head=True)
    save_recipe(loaded, calibrate(loaded, samples, config, progress=False), tmp_path / "recipe")
    export_model(apply_recipe(tiny(), tmp_path / "recipe"), tmp_path / "export")
    split_bundle(tmp_path / "export", tmp_path / "trt", progress=False)
    split_bundle(tmp_path / "export", tmp_path / "cpu", target="ort-cpu", progress=False, validate=True)
    cpu, trt = read_manifest(tmp_path / "cpu", verify=True), read_manifest(tmp_path / "trt")
    embedding = onnx.load(str(tmp_path / "cpu" / cpu.embedding.file), load_external_data=False)
    kinds = {
        onnx.TensorProto.DataType.Name(t.data_type) for t in embedding.graph.initializer if len(t.dims) == 2
    }
    assert kinds == ({"INT8"} if tied else {"FLOAT"})
    table = 256 * int(cpu.model["hidden_size"]) * 4  # the FP32 (vocab, hidden) table
    assert (trt.embedding.bytes + trt.head.bytes) - (cpu.embedding.bytes + cpu.head.bytes) > (
        0.7 * table if tied else -0.1 * table
    )
    if tied:  # the head's codes live in the embedding's data file: one copy
        head = onnx.load(str(tmp_path / "cpu" / cpu.head.file), load_external_data=False)
        codes = [
            t for t in head.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2
        ]
        locations = {e.value for t in codes for e in t.external_data if e.key == "location"}
        assert len(codes) == 1 and locations == {"embedding.onnx.data"}
    ids = np.random.default_rng(3).integers(0, 256, (1, 24))
    got, want = BundleRunner(tmp_path / "cpu").forward(ids)[0], BundleRunner(tmp_path / "trt").forward(ids)[0]
    # int8 rows of the table: close to the FP32 table's logits, not equal
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
