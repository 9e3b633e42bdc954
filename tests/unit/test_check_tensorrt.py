"""CheckTensorRTReadyPass: a clean QDQ MatMul passes; each TensorRT-breaking defect names its node."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from moedge._errors import MoedgeError
from moedge.graph_passes.check_tensorrt import (
    CheckTensorRTReadyPass,
    Finding,
    check_tensorrt_ready,
    profile_inputs,
)

K, N = 8, 4


def qdq_matmul_proto(
    *,
    opset: int = 18,
    x_zero_point: np.ndarray | None = None,
    w_scale: np.ndarray | None = None,
    w_dtype: type = np.int8,
) -> onnx.ModelProto:
    """x -> Q -> DQ -> MatMul(A); int8 W [K, N] -> DQ(axis=1, per-channel) -> MatMul(B); dynamic batch/seq."""
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, (K, N)).astype(w_dtype)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(
            np.array(0, np.int8) if x_zero_point is None else x_zero_point, "x_zero_point"
        ),
        numpy_helper.from_array(weight, "w_q"),
        numpy_helper.from_array(np.full(N, 0.01, np.float32) if w_scale is None else w_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(N, w_dtype), "w_zero_point"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero_point"], ["x_q"], name="q_x"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero_point"], ["x_dq"], name="dq_x"),
        helper.make_node(
            "DequantizeLinear", ["w_q", "w_scale", "w_zero_point"], ["w_dq"], name="dq_w", axis=1
        ),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", N])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def qdq_matmul(**kwargs) -> ir.Model:
    return ir.serde.deserialize_model(qdq_matmul_proto(**kwargs))


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


def only_error(model: ir.Model) -> Finding:
    found = errors(check_tensorrt_ready(model))
    assert len(found) == 1, found
    return found[0]


def test_clean_qdq_matmul_has_no_findings():
    proto = qdq_matmul_proto()
    onnx.checker.check_model(proto, full_check=True)
    model = ir.serde.deserialize_model(proto)
    lint = CheckTensorRTReadyPass()
    result = lint(model)
    assert result.modified is False and result.model is model
    assert lint.findings == []
    assert lint.dynamic_inputs == {"x": ["batch", "sequence", K]}
    assert profile_inputs(model) == {"x": ["batch", "sequence", K]}


def test_nonzero_zero_point():
    # x's Q and DQ share the zero point: both are reported
    found = errors(check_tensorrt_ready(qdq_matmul(x_zero_point=np.array(3, np.int8))))
    assert [(f.node, f.op_type) for f in found] == [("q_x", "QuantizeLinear"), ("dq_x", "DequantizeLinear")]
    assert all("symmetric" in f.message for f in found)


def test_uint8_weight():
    model = qdq_matmul(w_dtype=np.uint8)
    found = errors(check_tensorrt_ready(model))
    assert [(f.node, f.op_type) for f in found] == [("dq_w", "DequantizeLinear")]
    assert "uint8" in found[0].message


def test_uint8_activation_and_missing_zero_point():
    proto = qdq_matmul_proto(x_zero_point=np.array(0, np.uint8))
    found = errors(check_tensorrt_ready(ir.serde.deserialize_model(proto)))
    assert {f.node for f in found} == {"q_x", "dq_x"}
    assert all("uint8" in f.message for f in found)
    # a QuantizeLinear without zero point quantizes to uint8 in ONNX but int8 in TensorRT
    proto = qdq_matmul_proto()
    for node in proto.graph.node[:2]:
        del node.input[2]
    found = errors(check_tensorrt_ready(ir.serde.deserialize_model(proto)))
    assert [f.node for f in found] == ["q_x"] and "no zero point" in found[0].message


def test_q_consumed_by_non_dq():
    proto = qdq_matmul_proto()
    proto.graph.node.append(helper.make_node("Identity", ["x_q"], ["x_q_copy"], name="leak"))
    proto.graph.output.append(helper.make_tensor_value_info("x_q_copy", TensorProto.INT8, None))
    f = only_error(ir.serde.deserialize_model(proto))
    assert (f.node, f.op_type) == ("q_x", "QuantizeLinear")
    assert "Identity" in f.message and "only by DequantizeLinear" in f.message


def test_dangling_dq_on_activation():
    proto = qdq_matmul_proto()
    # drop the Q: the activation DQ now reads a float graph input through a Cast
    del proto.graph.node[0]
    proto.graph.node.insert(0, helper.make_node("Cast", ["x"], ["x_q"], name="to_int8", to=TensorProto.INT8))
    f = only_error(ir.serde.deserialize_model(proto))
    assert (f.node, f.op_type) == ("dq_x", "DequantizeLinear")
    assert "dangling" in f.message and "Cast" in f.message


def test_per_axis_scale_length_mismatch():
    f = only_error(qdq_matmul(w_scale=np.full(N + 1, 0.01, np.float32)))
    assert (f.node, f.op_type) == ("dq_w", "DequantizeLinear")
    assert f"{N + 1} values" in f.message and f"has {N}" in f.message


def test_opset_12():
    found = errors(check_tensorrt_ready(qdq_matmul(opset=12)))
    assert [f.node for f in found] == ["(model)"]
    assert "opset 12" in found[0].message and "13" in found[0].message


def test_opset_above_tensorrt_10_3():
    f = only_error(qdq_matmul(opset=21))
    assert "opset 21" in f.message and "20" in f.message


def test_custom_domain_op():
    proto = qdq_matmul_proto()
    proto.graph.node.append(helper.make_node("FusedGelu", ["y"], ["z"], name="gelu", domain="com.example"))
    proto.graph.output[0].CopyFrom(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    proto.opset_import.append(helper.make_opsetid("com.example", 1))
    f = only_error(ir.serde.deserialize_model(proto))
    assert (f.node, f.op_type) == ("gelu", "FusedGelu") and "com.example" in f.message


def test_op_tensorrt_does_not_parse():
    # BitwiseAnd (opset 18) is marked N in every onnx-tensorrt 10.x operators.md
    proto = qdq_matmul_proto()
    proto.graph.input.append(helper.make_tensor_value_info("a", TensorProto.INT32, [4]))
    proto.graph.node.append(helper.make_node("BitwiseAnd", ["a", "a"], ["b"], name="bits"))
    proto.graph.output.append(helper.make_tensor_value_info("b", TensorProto.INT32, [4]))
    f = only_error(ir.serde.deserialize_model(proto))
    assert (f.node, f.op_type) == ("bits", "BitwiseAnd") and "support list" in f.message


def test_graph_input_dtype_tensorrt_cannot_bind():
    proto = qdq_matmul_proto()
    proto.graph.input.append(helper.make_tensor_value_info("flags", TensorProto.UINT16, [4]))
    f = only_error(ir.serde.deserialize_model(proto))
    assert (f.node, f.op_type) == ("flags", "graph input") and "UINT16" in f.message


def test_strict_raises_with_every_error():
    model = qdq_matmul(x_zero_point=np.array(3, np.int8))
    with pytest.raises(MoedgeError, match="2 errors") as info:
        CheckTensorRTReadyPass(strict=True)(model)
    assert "q_x" in str(info.value) and "dq_x" in str(info.value)
    CheckTensorRTReadyPass(strict=True)(qdq_matmul())  # a clean model does not raise


def test_tiny_llama_fp32_export(tiny_exports):
    model = ir.load(tiny_exports("llama") / "model.onnx")
    # opset 18, only parser-supported ops (CastLike, IsNaN and Reciprocal included), no Q/DQ yet
    assert check_tensorrt_ready(model) == []
    dynamic = profile_inputs(model)
    assert dynamic["input_ids"] == ["batch", "sequence"]
    assert "past_sequence" in dynamic["past_key_values.0.key"]


# The engine builder's checks that run without TensorRT (tests/gpu/test_tensorrt_build.py builds one).


def test_build_engine_without_tensorrt_names_the_install(tmp_path):
    trt = pytest.importorskip("tensorrt")
    if hasattr(trt, "Builder"):
        pytest.skip("TensorRT is installed here")
    from moedge.runtime.tensorrt_build import build_engine

    with pytest.raises(MoedgeError, match=r"pip install 'moedge\[trt\]'.*python3-libnvinfer"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", profiles={})


def test_build_engine_profile_checks():
    from moedge.runtime.tensorrt_build import _check_profiles

    inputs = {"x": (-1, -1, K), "mask": (-1, 4)}
    _check_profiles(inputs, {"x": ((1, 1, K), (2, 8, K), (4, 64, K)), "mask": ((1, 4), (2, 4), (4, 4))})
    with pytest.raises(MoedgeError) as info:
        _check_profiles(inputs, {"x": ((1, 1, K + 1), (2, 8, K), (4, 64, K)), "nope": ((1,), (1,), (1,))})
    message = str(info.value)
    assert "nope is not a network input" in message
    assert "mask [-1, 4] has dynamic dims" in message
    assert f"x: dim 2 is fixed at {K}" in message
