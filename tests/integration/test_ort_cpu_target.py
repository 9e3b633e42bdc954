"""The ORT CPU target's layer stages (``graph_passes/ort_cpu_target.py``) compute what the split stages do.

Each check runs the original stage and its fused rewrite in ONNX Runtime on the same hidden states and
cache contents: a prompt of S tokens, then single-token decode steps in which the fused stage's KV
cache is one buffer bound through IOBinding as both past and present (ORT updates it in place).

Tolerances. FP32: the fused kernels reassociate the same float32 sums (RMSNorm's mean of squares,
GroupQueryAttention's softmax and weighted sum, a packed matmul's blocking), so results move by a few
float32 ulps of the largest magnitudes (measured: <= 6e-7 of max |output| on tiny models and
smollm2-135m). The bound, 1e-4 of the largest magnitude, is two orders above that and far below
anything a changed computation produces. W8A8: those ulps can move an activation across an int8
rounding boundary, which changes a linear's output by one quantization step (input scale x weight)
there; the check reports the largest error and how many elements exceed the float bound, and bounds
them by a few such steps on a few elements.
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from moedge.formats.export_folder import read_export_info
from moedge.formats.manifest import read_manifest
from moedge.graph_passes.inspect import ort_census
from moedge.graph_passes.ort_cpu_target import (
    COS_CACHE,
    SEQLENS_K,
    SIN_CACHE,
    TOTAL_SEQUENCE_LENGTH,
    AttentionSpec,
    FusionRefused,
    fuse_stage_for_ort_cpu,
    past_names,
    present_names,
    rotary_caches,
)

FUSED_KINDS = ("llama", "mistral", "mixtral", "qwen2-moe", "olmoe")
FP_TOL = 1e-4
CAPACITY = 64  # rows of the KV buffer and of the rotary tables in these checks
GONE = ("Softmax", "Concat", "Transpose", "Where", "Slice", "Pow", "ReduceMean", "Sqrt", "Reciprocal")


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class Stages:
    """A bundle's embedding stage, one layer stage, and its fused rewrite, as ORT sessions."""

    layer: int
    spec: AttentionSpec
    embedding: ort.InferenceSession
    original: ort.InferenceSession
    fused: ort.InferenceSession
    fused_file: Path

    @classmethod
    def build(cls, bundle: Path, export: Path, layer: int, tmp: Path, **fuse_options: bool) -> Stages:
        manifest = read_manifest(bundle)
        spec = AttentionSpec.from_config(read_export_info(export).config, max_positions=CAPACITY)
        stage = bundle / manifest.layers[layer].stage.file
        fused_file = tmp / f"fused_{layer}.onnx"
        ir.save(
            fuse_stage_for_ort_cpu(ir.load(stage), spec, **fuse_options),
            fused_file,
            external_data=fused_file.name + ".data",
        )
        return cls(
            layer,
            spec,
            _session(bundle / manifest.embedding.file),
            _session(stage),
            _session(fused_file),
            fused_file,
        )

    def embed(self, ids: np.ndarray, start: int) -> dict[str, np.ndarray]:
        """Hidden states and shared tables of tokens at positions start.. (batch 1, no padding)."""
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones((1, start + ids.shape[1]), np.int64),
            "position_ids": np.arange(start, start + ids.shape[1])[None],
        }
        for i in self.embedding.get_inputs():
            if i.name not in feeds:  # cache inputs the embedding reads the past length from
                feeds[i.name] = np.zeros((1, self.spec.num_kv_heads, start, self.spec.head_dim), np.float32)
        return dict(
            zip([o.name for o in self.embedding.get_outputs()], self.embedding.run(None, feeds), strict=True)
        )

    def run_original(
        self, shared: dict[str, np.ndarray], ids: np.ndarray, past: tuple[np.ndarray, np.ndarray]
    ) -> dict[str, np.ndarray]:
        feeds = {i.name: shared[i.name] for i in self.original.get_inputs() if i.name in shared}
        feeds["input_ids"] = ids
        feeds[f"past_key_values.{self.layer}.key"], feeds[f"past_key_values.{self.layer}.value"] = past
        names = [o.name for o in self.original.get_outputs()]
        return dict(zip(names, self.original.run(None, feeds), strict=True))


class FusedCache:
    """The fused stage's KV cache: one (B, kv_heads, CAPACITY, head_dim) buffer per K and V, bound as
    past and present of every call (ORT writes the new rows in place)."""

    def __init__(self, stages: Stages, batch: int) -> None:
        shape = (batch, stages.spec.num_kv_heads, CAPACITY, stages.spec.head_dim)
        self.stages = stages
        self.key = ort.OrtValue.ortvalue_from_numpy(np.full(shape, 7.0, np.float32))  # 7: rows never written
        self.value = ort.OrtValue.ortvalue_from_numpy(np.full(shape, 7.0, np.float32))
        self.cos, self.sin = (ort.OrtValue.ortvalue_from_numpy(t) for t in rotary_caches(stages.spec))

    def step(self, hidden: np.ndarray, lengths: list[int]) -> dict[str, np.ndarray]:
        """Run the fused stage on ``hidden`` (B, S, D); ``lengths``: each row's total length after it."""
        session, layer = self.stages.fused, self.stages.layer
        binding = session.io_binding()
        binding.bind_cpu_input("hidden_states", hidden)
        for past, present, buffer in zip(
            past_names(layer), present_names(layer), (self.key, self.value), strict=True
        ):
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
        binding.bind_cpu_input(SEQLENS_K, np.asarray(lengths, np.int32) - 1)
        binding.bind_cpu_input(TOTAL_SEQUENCE_LENGTH, np.array(max(lengths), np.int32))
        binding.bind_ortvalue_input(COS_CACHE, self.cos)
        binding.bind_ortvalue_input(SIN_CACHE, self.sin)
        others = [o.name for o in session.get_outputs() if o.name not in present_names(layer)]
        for name in others:
            binding.bind_output(name)
        pointers = (self.key.data_ptr(), self.value.data_ptr())
        session.run_with_iobinding(binding)
        outputs = dict(zip([*present_names(layer), *others], binding.get_outputs(), strict=True))
        assert (
            outputs[present_names(layer)[0]].data_ptr(),
            outputs[present_names(layer)[1]].data_ptr(),
        ) == pointers
        return {name: outputs[name].numpy() for name in others}


def _errors(expected: np.ndarray, actual: np.ndarray) -> tuple[float, int, int]:
    """(largest error relative to the largest magnitude, elements beyond the FP32 bound, elements)."""
    scale = max(float(np.abs(expected).max()), 1e-30)
    diff = np.abs(expected - actual)
    return float(diff.max()) / scale, int((diff > FP_TOL * scale).sum()), diff.size


Report = list[dict[str, tuple[float, int, int]]]


def _prompt_then_decode(stages: Stages, steps: int = 4, prompt: int = 7) -> Report:
    """Per call, {output or cache name: _errors} of the fused stage against the original."""
    ids = np.random.default_rng(stages.layer).integers(0, 250, (1, prompt + steps))
    nkv, head_dim = stages.spec.num_kv_heads, stages.spec.head_dim
    past = (np.zeros((1, nkv, 0, head_dim), np.float32),) * 2
    cache = FusedCache(stages, batch=1)
    report = []
    for start, stop in [(0, prompt), *((p, p + 1) for p in range(prompt, prompt + steps))]:
        shared = stages.embed(ids[:, start:stop], start)
        expected = stages.run_original(shared, ids[:, start:stop], past)
        actual = cache.step(shared["hidden_states"], [stop])
        key, value = f"present.{stages.layer}.key", f"present.{stages.layer}.value"
        past = (expected[key], expected[value])
        row = {name: _errors(expected[name], actual[name]) for name in actual}
        row["cache key"] = _errors(past[0], cache.key.numpy()[:, :, :stop])
        row["cache value"] = _errors(past[1], cache.value.numpy()[:, :, :stop])
        assert np.all(cache.key.numpy()[:, :, stop:] == 7.0), "rows past the sequence were written"
        report.append(row)
    return report


def _assert_fp_parity(report: Report) -> None:
    worst = {name: max(r[name][0] for r in report) for name in report[0]}
    print(f"max error / max |expected| over prompt + decode: {worst}")
    assert all(r[name][1] == 0 for r in report for name in r), worst


def _assert_fused_kernels(stages: Stages, int8_matmuls: int | None = None) -> dict[str, int]:
    census = ort_census(stages.fused_file)
    print(f"fused stage after ORT's optimizations: {sorted(census.items())}")
    assert census.get("GroupQueryAttention") == 1
    assert (
        census.get("SimplifiedLayerNormalization", 0) >= 1  # OLMoE's q/k norms are two more
        and census.get("SkipSimplifiedLayerNormalization") == 1
    )
    assert not any(op in census for op in GONE), census
    if int8_matmuls is not None:
        assert census.get("MatMulIntegerToFloat") == int8_matmuls and "DequantizeLinear" not in census, census
    return census


@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_fused_fp32_stage_matches_the_split_stage(kind, bundles, tiny_exports, tmp_path):
    stages = Stages.build(bundles(kind), tiny_exports(kind), 1, tmp_path)
    before = len(ir.load(Path(bundles(kind)) / read_manifest(bundles(kind)).layers[1].stage.file).graph)
    after = len(ir.load(stages.fused_file).graph)
    print(f"tiny-{kind} layer 1: {before} nodes -> {after}")
    assert after < before / 5
    _assert_fp_parity(_prompt_then_decode(stages))
    _assert_fused_kernels(stages)


def _assert_qdq_parity(report: Report) -> None:
    """At most 1% of elements off by more than float noise, none by more than 2% of the largest: an
    int8 rounding flip moves a few elements by one quantization step; a wrong rewrite moves them all."""
    worst = {name: max(r[name][0] for r in report) for name in report[0]}
    beyond = {name: sum(r[name][1] for r in report) for name in report[0]}
    total = {name: sum(r[name][2] for r in report) for name in report[0]}
    print(f"W8A8: max error / max |expected| {worst}; elements beyond the FP32 bound {beyond} of {total}")
    assert all(beyond[name] <= 0.01 * total[name] for name in beyond) and max(worst.values()) < 0.02, worst


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "separate"])
def test_fused_w8a8_stage_keeps_the_int8_kernels(qdq_bundles, pack, tmp_path):
    bundle = qdq_bundles("llama")
    stages = Stages.build(bundle, bundle.parent / "export", 0, tmp_path, pack=pack)
    _assert_qdq_parity(_prompt_then_decode(stages))
    # packed: q|k|v and gate|up are one int8 matmul each, beside o_proj and down_proj
    _assert_fused_kernels(stages, int8_matmuls=4 if pack else 7)


def test_fused_w8a8_moe_stage(qdq_bundle, tmp_path):
    stages = Stages.build(qdq_bundle, qdq_bundle.parent / "export", 1, tmp_path)
    _assert_qdq_parity(_prompt_then_decode(stages))
    _assert_fused_kernels(stages, int8_matmuls=2)  # packed q|k|v and o_proj; the router stays FP


def test_right_padded_batch_rows_match_their_own_runs(bundles, tiny_exports, tmp_path):
    """Two prompts of 6 and 4 tokens in one right-padded batch, then decode steps: each row as alone."""
    stages = Stages.build(bundles("llama"), tiny_exports("llama"), 0, tmp_path)
    lengths = [6, 4]
    ids = np.random.default_rng(1).integers(0, 250, (2, 6 + 3))
    nkv, head_dim = stages.spec.num_kv_heads, stages.spec.head_dim
    pasts = [(np.zeros((1, nkv, 0, head_dim), np.float32),) * 2 for _ in lengths]
    cache = FusedCache(stages, batch=2)
    for step in range(4):
        starts = [0] * 2 if step == 0 else [n + step - 1 for n in lengths]
        stops = lengths if step == 0 else [s + 1 for s in starts]
        width = max(b - a for a, b in zip(starts, stops, strict=True))
        hidden = np.zeros((2, width, stages.original.get_inputs()[0].shape[2]), np.float32)
        expected = []
        for row, (a, b) in enumerate(zip(starts, stops, strict=True)):
            shared = stages.embed(ids[row : row + 1, a:b], a)
            hidden[row, : b - a] = shared["hidden_states"][0]
            expected.append(stages.run_original(shared, ids[row : row + 1, a:b], pasts[row]))
            pasts[row] = (
                expected[row][f"present.{stages.layer}.key"],
                expected[row][f"present.{stages.layer}.value"],
            )
        actual = cache.step(hidden, stops)["hidden_states_out"]
        for row, (a, b) in enumerate(zip(starts, stops, strict=True)):
            assert _errors(expected[row]["hidden_states_out"][0], actual[row, : b - a])[1] == 0
            assert _errors(pasts[row][0][0], cache.key.numpy()[row, :, :b])[1] == 0
            assert _errors(pasts[row][1][0], cache.value.numpy()[row, :, :b])[1] == 0


def test_rotary_caches_are_the_embedding_stage_tables(bundles, tiny_exports, tmp_path):
    stages = Stages.build(bundles("llama"), tiny_exports("llama"), 0, tmp_path)
    shared = stages.embed(np.zeros((1, CAPACITY), np.int64), 0)
    tables = [v for k, v in shared.items() if k.startswith("shared.") and v.dtype == np.float32]
    cos, sin = rotary_caches(stages.spec)
    half = stages.spec.head_dim // 2
    found = sorted(float(np.abs(t[0, :, :half] - c).max()) for t in tables for c in (cos, sin))
    assert found[0] < 1e-6 and found[1] < 1e-6, found  # one table is cos, the other sin


def test_refusals_and_the_input_model(bundles, tiny_exports):
    spec = AttentionSpec.from_config(read_export_info(tiny_exports("llama")).config, max_positions=CAPACITY)
    stage_file = bundles("llama") / read_manifest(bundles("llama")).layers[0].stage.file
    stage = ir.load(stage_file)
    narrow = AttentionSpec(num_heads=8, num_kv_heads=4, head_dim=8, max_positions=64, rope_theta=1e4)
    with pytest.raises(FusionRefused, match="multiple of 16"):
        fuse_stage_for_ort_cpu(stage, narrow)  # stories260K's head size
    wrong = dataclasses.replace(spec, head_dim=32, num_heads=2, num_kv_heads=1)
    with pytest.raises(FusionRefused):
        fuse_stage_for_ort_cpu(stage, wrong)  # the graph's rotary tables are 16 wide
    counts = collections.Counter(n.op_type for n in stage.graph)
    fused = fuse_stage_for_ort_cpu(stage, spec)
    assert collections.Counter(n.op_type for n in stage.graph) == counts  # the input model is untouched
    assert counts["Softmax"] == 1 and "GroupQueryAttention" in {n.op_type for n in fused.graph}
    proto = fuse_stage_for_ort_cpu(onnx.load(str(stage_file)), spec)  # an onnx.ModelProto in, one out
    assert isinstance(proto, onnx.ModelProto)
    assert sorted(n.op_type for n in proto.graph.node) == sorted(n.op_type for n in fused.graph)


def test_a_model_without_rope_is_refused(tiny_exports):
    with pytest.raises(FusionRefused, match="RoPE"):
        AttentionSpec.from_config(read_export_info(tiny_exports("opt")).config)


@pytest.mark.slow
def test_smollm2_layers_match(smollm2, tmp_path):
    """Real weights: the first 4 decoder layers of smollm2-135m (head size 64, 9/3 heads), exported."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from moedge.export.exporter import export_model
    from moedge.graph_passes.bundle import split_bundle

    config = copy.deepcopy(smollm2.model.config)
    config.num_hidden_layers = 4
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    kept = {
        k: v
        for k, v in smollm2.model.state_dict().items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < 4
    }
    model.load_state_dict(kept, strict=True)
    export_model(
        dataclasses.replace(smollm2, model=model.eval(), name="smollm2-135m-4-layers"), tmp_path / "export"
    )
    split_bundle(tmp_path / "export", tmp_path / "bundle", progress=False)
    stages = Stages.build(tmp_path / "bundle", tmp_path / "export", 3, tmp_path)
    _assert_fp_parity(_prompt_then_decode(stages, steps=3, prompt=12))
    _assert_fused_kernels(stages)
