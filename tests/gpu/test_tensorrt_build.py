"""On a GPU with TensorRT: the clean QDQ MatMul graph builds a strongly typed engine that deserializes."""

from __future__ import annotations

import pytest

from tests.unit.test_check_tensorrt import K, N, qdq_matmul_proto

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_gpu() -> None:
    """Overrides tests/gpu/conftest.py's fixture: a TensorRT build needs TensorRT and a GPU, not ORT's CUDA provider."""
    try:
        import tensorrt as trt
    except ImportError:
        pytest.skip(
            "tensorrt is not installed: pip install 'moedge[trt]' (JetPack's python3-libnvinfer on Jetson)"
        )
    if not hasattr(trt, "Builder"):
        pytest.skip("only the tensorrt type stubs are installed, not TensorRT: pip install 'moedge[trt]'")
    try:
        trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as exc:  # no CUDA device or driver: TensorRT cannot create a builder
        pytest.skip(f"TensorRT cannot start on this machine (no NVIDIA GPU or driver?): {exc}")


def test_builds_and_deserializes_qdq_matmul(tmp_path):
    import onnx
    import tensorrt as trt

    from moedge.runtime.tensorrt_build import build_engine

    onnx_file = tmp_path / "qdq_matmul.onnx"
    onnx.save(qdq_matmul_proto(), str(onnx_file))
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


def test_builds_an_engine_for_every_graph_kind_of_a_qdq_bundle(tmp_path):
    """A real W8A8 bundle (tiny-olmoe, rtn recipe): one layer stage and one expert build as INT8 engines."""
    import numpy as np

    from moedge.calibration import CalibrationConfig, apply_recipe, calibrate, save_recipe
    from moedge.export.exporter import export_model
    from moedge.graph_passes.bundle import split_bundle
    from moedge.runtime.tensorrt_build import build_engine
    from moedge.testbeds import build_tiny

    loaded = build_tiny("olmoe")
    samples = list(np.random.default_rng(0).integers(0, 256, (4, 32)))
    save_recipe(
        loaded, calibrate(loaded, samples, CalibrationConfig(method="rtn"), progress=False), tmp_path / "r"
    )
    export_model(apply_recipe(build_tiny("olmoe"), tmp_path / "r"), tmp_path / "e")
    manifest = split_bundle(tmp_path / "e", tmp_path / "b", progress=False)
    layer = manifest.layers[0]
    assert layer.moe is not None
    expert = layer.moe.experts[0]
    build_engine(
        tmp_path / "b" / expert.file, tmp_path / "expert.engine", profiles={"x": ((1, 64), (8, 64), (64, 64))}
    )
    dims = {"hidden_states": ((1, 1, 64), (1, 16, 64), (1, 64, 64)), "input_ids": ((1, 1), (1, 16), (1, 64))}
    dims |= {"attention_mask": ((1, 1), (1, 32), (1, 128)), "position_ids": ((1, 1), (1, 16), (1, 64))}
    dims |= {
        f"past_key_values.0.{k}": ((1, 2, 0, 16), (1, 2, 16, 16), (1, 2, 64, 16)) for k in ("key", "value")
    }
    build_engine(tmp_path / "b" / layer.stage.file, tmp_path / "stage.engine", profiles=dims)
    assert (tmp_path / "expert.engine").stat().st_size > 0 and (tmp_path / "stage.engine").stat().st_size > 0
