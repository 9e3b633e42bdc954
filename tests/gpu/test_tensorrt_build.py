"""On a GPU with TensorRT: QDQ graphs build strongly typed engines that run, match ONNX Runtime on the CPU on
the same inputs, and multiply in INT8 (read back through TensorRT's engine inspector)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.unit.test_check_tensorrt import K, N, qdq_matmul_proto

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("needs_tensorrt")]

# TensorRT vs ONNX Runtime CPU on a W8A8 graph, the same inputs. Both quantize activations with the
# graph's own scales, but their float kernels round differently (TensorRT may also run the graph's FP32
# MatMuls, attention's, in TF32), and a value that lands on the other side of an int8 rounding boundary
# moves one step: every output of its row then moves by that step times a weight row, and the change
# flows on to later quantizers. Measured on the CPU (ORT 1.32, this tiny-mixtral, these inputs):
# perturbing the inputs by 1e-3 relative, a TF32-sized error, moves the layer-0 stage outputs by at most
# 2.2% of each output's max-abs (mean 0.55%) and expert 0 by 4.3% (mean 0.71%). The bounds below give
# about 2x that; a wrong scale, a lost zero point or a transposed weight moves the mean by 10% or more.
MAX_ABS_OF_SCALE = 0.08
MEAN_ABS_OF_SCALE = 0.015


def _close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype)
    if want.size == 0:
        return
    scale = max(float(np.abs(want).max()), 1e-6)
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    assert diff.max() <= MAX_ABS_OF_SCALE * scale and diff.mean() <= MEAN_ABS_OF_SCALE * scale, (
        f"{what}: max |TensorRT - ORT CPU| {diff.max():.3g}, mean {diff.mean():.3g}, output max-abs {scale:.3g}"
    )


def _layer_summary(layers: list[dict]) -> str:
    """One line per engine layer (type, name, input and output formats): what a failed INT8 check shows."""
    lines = []
    for layer in layers:
        formats = [str(t.get("Format/Datatype", "?")) for t in layer.get("Inputs", []) if isinstance(t, dict)]
        outs = [str(t.get("Format/Datatype", "?")) for t in layer.get("Outputs", []) if isinstance(t, dict)]
        lines.append(
            f"  {layer.get('LayerType', '?')} {str(layer.get('Name', ''))[:90]}: {formats} -> {outs}"
        )
    return "\n".join(lines)


def test_builds_runs_and_deserializes_qdq_matmul(tmp_path):
    import onnx
    import onnxruntime as ort
    import tensorrt as trt
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    from moedge.runtime.tensorrt_build import build_engine

    onnx_file = tmp_path / "qdq_matmul.onnx"
    proto = qdq_matmul_proto()
    onnx.save(proto, str(onnx_file))
    engine_file = tmp_path / "engines" / "qdq_matmul.engine"
    cache = tmp_path / "timing.cache"
    profiles = {"x": ((1, 1, K), (2, 16, K), (4, 64, K))}

    out = build_engine(onnx_file, engine_file, profiles=profiles, timing_cache=cache, workspace_bytes=1 << 28)

    assert out == engine_file and engine_file.stat().st_size > 0 and cache.stat().st_size > 0
    assert [p.name for p in engine_file.parent.iterdir()] == [engine_file.name]  # no temp file left
    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(engine_file.read_bytes())
    assert engine is not None
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    assert names == ["x", "y"]
    assert tuple(engine.get_tensor_profile_shape("x", 0)[2]) == (4, 64, K)
    assert engine.get_tensor_dtype("y") == trt.DataType.FLOAT
    assert tuple(engine.get_tensor_shape("y"))[-1] == N

    x = np.random.default_rng(1).standard_normal((3, 5, K)).astype(np.float32)
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    with TrtRunner(EngineFromBytes(BytesFromPath(str(engine_file)))) as runner:
        got = np.asarray(runner.infer({"x": x})["y"])
    # One quantizer: the two can differ only where x / x_scale lands on a .5 boundary in one float
    # rounding and not the other; each such flip moves a row by x_scale times a weight (|w| <= 127 * 0.01).
    one_flip = 0.05 * 127 * 0.01
    assert got.shape == want.shape and np.abs(got - want).max() <= one_flip + 1e-5


def test_qdq_bundle_engines_run_int8_and_match_ort_cpu(qdq_bundle, tmp_path):
    """tiny-mixtral W8A8 (rtn): the embedding, the layer-0 stage, expert 0 and the head build as engines
    and run through the tensorrt backend on a 6-token prompt step and a 1-token decode step (past 6);
    every output matches ORT CPU on the same inputs; the stage and the expert multiply in INT8."""
    from moedge.formats.manifest import read_manifest
    from moedge.runtime.backends.ort_cpu import OrtCpuBackend
    from moedge.runtime.backends.tensorrt import TensorRtBackend, engine_path, shape_ranges
    from moedge.runtime.ort_session import step_inputs
    from moedge.runtime.tensorrt_build import build_engine, engine_layers, int8_compute_layers

    manifest = read_manifest(qdq_bundle)
    layer = manifest.layers[0]
    assert layer.moe is not None
    expert = layer.moe.experts[0]
    graphs = [manifest.embedding, layer.stage, expert, manifest.head]
    engines = tmp_path / "engines"
    for graph in graphs:
        engine_path(engines, graph).parent.mkdir(parents=True, exist_ok=True)
        build_engine(
            qdq_bundle / graph.file,
            engine_path(engines, graph),
            profiles=shape_ranges(graph, max_tokens=16, context=32),
            timing_cache=engines / "timing.cache",
            detailed=True,
        )

    for graph in (layer.stage, expert):
        layers = engine_layers(engine_path(engines, graph))
        assert int8_compute_layers(layers), (
            f"no MatMul/GEMM layer of the {graph.file} engine takes INT8 data:\n{_layer_summary(layers)}"
        )

    cpu, gpu = OrtCpuBackend(), TensorRtBackend(engine_dir=engines)
    heads, head_dim = int(manifest.model["num_kv_heads"]), int(manifest.model["head_dim"])
    rng = np.random.default_rng(0)
    past_len = 0
    layer0_past = {k: np.zeros((1, heads, 0, head_dim), np.float32) for k in ("key", "value")}
    try:
        for new_ids in (rng.integers(0, 256, (1, 6)), rng.integers(0, 256, (1, 1))):
            values: dict[str, np.ndarray] = dict(step_inputs(new_ids.astype(np.int64), past_len, None, None))
            for spec in manifest.layers:  # layer 0's real cache; the others' only give the embedding a length
                for k in ("key", "value"):
                    values[f"past_key_values.{spec.index}.{k}"] = (
                        layer0_past[k] if spec.index == layer.index else np.zeros_like(layer0_past[k])
                    )
            where = f"past {past_len}"
            values |= _compare(cpu, gpu, qdq_bundle, manifest.embedding, values, where)
            stage_out = _compare(cpu, gpu, qdq_bundle, layer.stage, values, where)
            _compare(cpu, gpu, qdq_bundle, expert, {expert.input_names[0]: stage_out["moe_input"]}, where)
            _compare(cpu, gpu, qdq_bundle, manifest.head, {"hidden_states": stage_out["residual"]}, where)
            layer0_past = {k: stage_out[f"present.{layer.index}.{k}"] for k in ("key", "value")}
            past_len += new_ids.shape[1]
        # every comparison above ran a TensorRT engine: two completed executions each, none skipped
        assert gpu.executions() == {graph.file: 2 for graph in graphs}
    finally:
        for graph in graphs:
            gpu.runner(qdq_bundle, graph).release()


def _compare(cpu, gpu, bundle, graph, values: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Run ``graph`` on both backends with the same feeds; check every output; return the CPU's."""
    feeds = {name: values[name] for name in graph.input_names}
    want = cpu.runner(bundle, graph).infer(feeds)
    got = gpu.runner(bundle, graph).infer(feeds)
    for name in graph.output_names:
        _close(got[name], want[name], f"{graph.file} {name} ({where})")
    return want
