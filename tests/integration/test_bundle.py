"""Graph passes end to end on tiny models: QDQ export from a recipe, split into a bundle, reference runner.

Chain of parity (prompt, then 8 cached decode steps): bundle == monolithic ONNX == PyTorch within 1e-4
on FP32 logits; for W8A8, the QDQ graph computes the recipe's fake-quant model.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from moedge._errors import MoedgeError
from moedge.calibration import CalibrationConfig, apply_recipe, calibrate, save_recipe
from moedge.export.exporter import export_model
from moedge.formats.manifest import read_manifest
from moedge.graph_passes.bundle import split_bundle
from moedge.graph_passes.inspect import INT8_KERNELS, ort_census, qdq_coverage
from moedge.runtime.bundle_runner import BundleRunner, RoutingTrace
from moedge.runtime.ort_causal_lm import OrtCausalLM
from moedge.testbeds import build_tiny

MOE_KINDS = ("mixtral", "qwen2-moe", "olmoe")
PARITY_KINDS = (*MOE_KINDS, "llama")
TOL = 1e-4


def _torch_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


def _prompt_and_decode(runner, ids: np.ndarray, steps: int = 8) -> tuple[list[np.ndarray], list[int]]:
    """Logits of the prompt and of ``steps`` greedy cached steps, plus the tokens chosen."""
    logits, past = runner.forward(ids)
    out, tokens = [logits], []
    for _ in range(steps):
        token = int(np.argmax(logits[0, -1]))
        tokens.append(token)
        logits, past = runner.forward(np.array([[token]]), past=past)
        out.append(logits)
    return out, tokens


@pytest.mark.parametrize("kind", PARITY_KINDS)
def test_fp32_bundle_matches_monolithic_and_pytorch(kind, bundles, tiny_exports, tiny_models):
    ids = np.random.default_rng(3).integers(0, 256, (1, 11))
    bundle, mono = BundleRunner(bundles(kind)), OrtCausalLM(tiny_exports(kind))
    got, tokens = _prompt_and_decode(bundle, ids)
    want, want_tokens = _prompt_and_decode(mono, ids)
    assert tokens == want_tokens
    for a, b in zip(got, want, strict=True):
        assert np.abs(a - b).max() < TOL
    # the whole sequence in PyTorch equals the prompt + cached steps of the bundle
    full = np.concatenate([ids, np.array([tokens[:-1]])], axis=1)
    ref = _torch_logits(tiny_models(kind).model, full)
    steps = np.concatenate([got[0][0], *[g[0] for g in got[1:-1]]], axis=0)
    assert np.abs(steps - ref[0]).max() < TOL


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_bundle_routes_like_the_pytorch_router(kind, bundles, tiny_models):
    model = tiny_models(kind).model
    ids = np.random.default_rng(4).integers(0, 256, (2, 9))
    torch_choice: dict[int, np.ndarray] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):

        def hook(_m, _a, out, i=i):
            torch_choice[i] = out[2].numpy()

        handles.append(layer.mlp.gate.register_forward_hook(hook))
    try:
        _torch_logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    trace = RoutingTrace()
    BundleRunner(bundles(kind)).forward(ids, trace=trace)
    assert sorted(trace.chosen) == sorted(torch_choice)
    for i, chosen in trace.chosen.items():
        assert np.array_equal(np.sort(chosen, axis=1), np.sort(torch_choice[i], axis=1))


def test_manifest_describes_every_graph_and_file(bundles):
    folder = bundles("qwen2-moe")
    manifest = read_manifest(folder, verify=True)
    assert manifest.schema_version == 1 and manifest.precision == "fp32"
    assert len(manifest.layers) == 2
    for layer in manifest.layers:
        assert layer.moe is not None and layer.moe.num_experts == 4
        assert layer.moe.gating.top_k == 2 and layer.moe.gating.shared_expert
        assert not layer.moe.gating.normalize_top_k  # tiny qwen2-moe: norm_topk_prob=False
        assert {"residual", "moe_input", "router_logits", "shared_output"} <= set(layer.stage.output_names)
        for expert in layer.moe.experts:
            assert expert.input_names == ["x"] and expert.output_names == ["y"]
            assert (folder / (expert.file + ".data")).is_file()  # weights as external data
    for graph in manifest.graphs():
        model = onnx.load(str(folder / graph.file))
        onnx.checker.check_model(model)
        assert [i.name for i in model.graph.input] == graph.input_names
    assert "tokenizer.json" in manifest.files
    mixtral = read_manifest(bundles("mixtral"))
    assert all(layer.moe and layer.moe.gating.normalize_top_k for layer in mixtral.layers)


@pytest.mark.parametrize(
    ("kind", "edit", "error"),
    [
        ("llama", {0: {"span": 2}, 1: {"stage": None}}, None),  # one stage runs both dense layers
        (
            "llama",
            {1: {"stage": None}},
            r"layers\[1\]\.stage must be a graph \(no earlier layer's stage spans",
        ),
        ("llama", {0: {"span": 2}}, r"layers\[1\]\.stage must be null \(an earlier layer's stage spans"),
        ("llama", {0: {"span": 3}, 1: {"stage": None}}, r"layers\[0\]\.span must be at most 2"),
        ("llama", {0: {"span": 0}}, r"layers\[0\]\.span must be an integer in \[1, "),
        ("llama", {0: {"stage": None}}, r"layers\[0\]\.stage must be a graph"),
        ("mixtral", {0: {"span": 2}, 1: {"stage": None}}, r"layers\[0\]\.span must be 1 for an MoE layer"),
    ],
)
def test_a_stage_spans_only_consecutive_dense_layers(bundles, tmp_path, kind, edit, error):
    """A layer without a stage must lie in an earlier dense layer's span; spans stay inside the model."""
    from moedge.formats.manifest import MANIFEST_FILE, parse_manifest

    raw = json.loads((bundles(kind) / MANIFEST_FILE).read_text())
    dropped = []
    for index, changes in edit.items():
        if changes.get("stage", 0) is None:
            dropped.append(raw["layers"][index]["stage"]["file"])
        raw["layers"][index].update(changes)
    for rel in dropped:  # a graph no layer names is no longer a listed graph file
        raw["files"].pop(rel, None)
    if error is None:
        manifest = parse_manifest(raw, bundles(kind))
        runs = manifest.stage_runs()
        assert len(runs) == 1 and [layer.index for layer in runs[0].layers] == [0, 1]
        assert [g.file for g in manifest.graphs()].count(runs[0].stage.file) == 1
    else:
        with pytest.raises(MoedgeError, match=error):
            parse_manifest(raw, bundles(kind))


def test_dense_bundle_has_one_stage_per_layer_and_no_experts(bundles):
    manifest = read_manifest(bundles("llama"))
    assert [layer.moe for layer in manifest.layers] == [None, None]
    assert manifest.layers[0].stage.output_names[0] == "hidden_states_out"


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_stages_read_shared_tensors_from_the_embedding_stage(bundles, kind):
    """The attention mask and rotary tables are computed once, not in every stage."""
    manifest = read_manifest(bundles(kind))
    shared = {name for name in manifest.embedding.output_names if name.startswith("shared.")}
    assert shared, "the embedding stage should hand the layers their shared tensors"
    for layer in manifest.layers:
        wanted = {n for n in layer.stage.input_names if n.startswith("shared.")}
        assert wanted and wanted <= shared
        ops = {
            n.op_type
            for n in onnx.load(str(bundles(kind) / layer.stage.file), load_external_data=False).graph.node
        }
        assert not {"Cos", "Sin", "Range"} & ops  # rotary tables and mask positions come in ready


@pytest.fixture(scope="module")
def qdq_mixtral(tmp_path_factory):
    """tiny-mixtral calibrated with rtn and --rotate full (the default, auto, spelled out), its fake-quant
    model, QDQ export and bundle."""
    root = tmp_path_factory.mktemp("qdq")
    loaded = build_tiny("mixtral")
    samples = list(np.random.default_rng(0).integers(0, 256, (8, 48)))
    result = calibrate(loaded, samples, CalibrationConfig(method="rtn", rotate="full"), progress=False)
    save_recipe(loaded, result, root / "recipe")
    fake = apply_recipe(build_tiny("mixtral"), root / "recipe")
    export_model(fake, root / "export", validate=True)  # strict shape inference + checker after each pass
    split_bundle(root / "export", root / "bundle", progress=False, validate=True)
    return fake, root, result


def test_qdq_export_quantizes_every_recipe_linear_and_ort_runs_int8(qdq_mixtral):
    _, root, result = qdq_mixtral
    quantized = [n for n, r in result.linears.items() if r.quantized]
    model = onnx.load(str(root / "export" / "model.onnx"), load_external_data=False)
    coverage = qdq_coverage(model)
    assert coverage["quantized_matmuls"] == len(quantized) == coverage["activation_quantizers"]
    rotated = [n for n, r in result.linears.items() if r.input_rotation]
    assert len(rotated) == sum(".experts." in n and n.endswith("down_proj") for n in result.linears)
    # two routers + lm_head stay FP; each online rotation and the rotated final norm (Hn, then Hn^T) put
    # their right-hand Kronecker factors in float MatMuls (the left factors multiply from the left)
    assert coverage["float_matmuls"] == 2 + 1 + len(rotated) + 2
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":  # symmetric int8, zero point 0, one consumer
            zp = next(i for i in model.graph.initializer if i.name == node.input[2])
            assert zp.data_type == onnx.TensorProto.INT8 and onnx.numpy_helper.to_array(zp) == 0
            users = [n for n in model.graph.node if node.output[0] in n.input]
            assert [u.op_type for u in users] == ["DequantizeLinear"]
    census = ort_census(root / "export" / "model.onnx")
    assert sum(n for op, n in census.items() if op in INT8_KERNELS) == len(quantized)
    config = json.loads((root / "export" / "config.json").read_text())
    assert config["moedge"]["precision"] == "w8a8"
    assert config["moedge"]["quantization"]["quantized_linears"] == len(quantized)


def test_qdq_graph_computes_the_fake_quant_model(qdq_mixtral):
    fake, root, _ = qdq_mixtral
    ids = np.random.default_rng(5).integers(0, 256, (1, 16))
    want = _torch_logits(fake.model, ids)
    exact = OrtCausalLM(root / "export", optimize=False).forward(ids)[0]
    assert np.abs(exact - want).max() < 1e-5  # the same float math, op for op
    fused = OrtCausalLM(root / "export").forward(ids)[0]  # ORT's int8 kernels
    assert np.abs(fused - want).max() < 1e-3
    assert (fused.argmax(-1) == want.argmax(-1)).all()


def test_qdq_bundle_matches_the_qdq_monolithic_graph(qdq_mixtral):
    _, root, _ = qdq_mixtral
    manifest = read_manifest(root / "bundle")
    assert manifest.precision == "w8a8" and manifest.quantization is not None
    ids = np.random.default_rng(6).integers(0, 256, (1, 10))
    got, tokens = _prompt_and_decode(BundleRunner(root / "bundle"), ids)
    want, want_tokens = _prompt_and_decode(OrtCausalLM(root / "export"), ids)
    assert tokens == want_tokens
    for a, b in zip(got, want, strict=True):
        assert np.abs(a - b).max() < TOL


def test_bundle_bad_input_is_one_clear_error(bundles, tmp_path, tiny_exports):
    good = bundles("mixtral")
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    victim = next((broken / "experts").glob("*.onnx.data"))
    victim.write_bytes(victim.read_bytes()[::-1])
    with pytest.raises(MoedgeError, match="sha256"):
        BundleRunner(broken)
    victim.unlink()
    with pytest.raises(MoedgeError, match="missing"):
        BundleRunner(broken)
    newer = tmp_path / "newer"
    shutil.copytree(good, newer)
    raw = json.loads((newer / "manifest.json").read_text())
    raw["schema_version"] = 99
    (newer / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(MoedgeError, match="schema version 99"):
        BundleRunner(newer)
    with pytest.raises(MoedgeError, match="out of range"):
        BundleRunner(good).forward(np.array([[5, 100000]]))
    with pytest.raises(MoedgeError, match="not a moedge bundle"):
        BundleRunner(tmp_path)
    with pytest.raises(MoedgeError, match="not an empty folder"):
        split_bundle(tiny_exports("mixtral"), good, progress=False)
    with pytest.raises(MoedgeError, match=r"holds no model\.onnx"):
        split_bundle(tmp_path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_split_refuses_damaged_or_foreign_graphs_and_writes_nothing(tiny_exports, tmp_path):
    import onnx_ir as ir

    from moedge.formats.graph_names import MODULE_KEY
    from moedge.graph_passes.split_experts import SplitExpertsPass

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_exports("llama"), truncated)
    data = (truncated / "model.onnx").read_bytes()
    (truncated / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(MoedgeError, match="not a readable ONNX model"):
        split_bundle(truncated, tmp_path / "b1", progress=False)
    model = ir.load(tiny_exports("mixtral") / "model.onnx")
    for node in model.graph:
        node.metadata_props.pop(MODULE_KEY, None)
    with pytest.raises(MoedgeError, match="no decoder-layer module names"):
        SplitExpertsPass(experts_path="mlp.experts", router_path="mlp.gate", gating=None)(model)
    bare = tmp_path / "bare"
    shutil.copytree(tiny_exports("llama"), bare)
    ir.save(model, bare / "model.onnx", external_data="model.onnx.data")
    with pytest.raises(MoedgeError, match="no decoder-layer module names"):
        split_bundle(bare, tmp_path / "b2", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "truncated"]  # nothing half-written


def test_expert_graphs_run_only_int8_kernels_after_ort_optimization(qdq_mixtral):
    _, root, _ = qdq_mixtral
    manifest = read_manifest(root / "bundle")
    for layer in manifest.layers:
        assert layer.moe is not None
        for expert in layer.moe.experts:
            census = ort_census(root / "bundle" / expert.file)
            assert sum(n for op, n in census.items() if op in INT8_KERNELS) == 3
            # the float matmuls are the down_proj input rotation's two constant factors, nothing else
            assert census.get("MatMul") == 2 and not {"Gemm", "FusedMatMul"} & set(census), census


def test_a_tied_lm_head_reads_the_embeddings_stored_weight(tmp_path):
    loaded = build_tiny("llama")
    model = loaded.model
    model.lm_head.weight = model.model.embed_tokens.weight  # tie, as smollm2 does
    model.config.tie_word_embeddings = True
    export_model(loaded, tmp_path / "export")
    manifest = split_bundle(tmp_path / "export", tmp_path / "bundle", progress=False)
    assert (
        "stages/head.onnx.data" not in manifest.files
        and not (tmp_path / "bundle/stages/head.onnx.data").exists()
    )
    head = onnx.load(str(tmp_path / "bundle" / manifest.head.file), load_external_data=False)
    locations = {e.value for t in head.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"embedding.onnx.data"}
    ids = np.random.default_rng(7).integers(0, 256, (1, 9))
    got, _ = _prompt_and_decode(BundleRunner(tmp_path / "bundle"), ids, steps=3)
    want, _ = _prompt_and_decode(OrtCausalLM(tmp_path / "export"), ids, steps=3)
    for a, b in zip(got, want, strict=True):
        assert np.abs(a - b).max() < TOL
