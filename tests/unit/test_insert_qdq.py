"""InsertQDQPass on hand-built graphs: the node pattern it writes, and its refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from moedge._errors import MoedgeError
from moedge.formats.graph_names import MODULE_KEY
from moedge.graph_passes.insert_qdq import InsertQDQPass, LinearQuant
from moedge.graph_passes.pipeline import run_passes

IN, OUT = 8, 6


def _quant(seed: int) -> LinearQuant:
    """First linear IN -> OUT (seed 1), second OUT -> OUT (any other seed)."""
    rng = np.random.default_rng(seed)
    return LinearQuant(
        qweight=rng.integers(-127, 128, (OUT, IN if seed == 1 else OUT)).astype(np.int8),
        weight_scale=rng.uniform(0.001, 0.01, OUT).astype(np.float32),
        input_scale=0.05,
    )


def _graph(w_matmul: np.ndarray, w_gemm: np.ndarray) -> ir.Model:
    """y = Gemm(MatMul(x, W1^T)[as 2-D], W2, b, transB=1), as torch.export writes nn.Linear."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["n", IN]))
    w1 = ir.Value(name="w1", const_value=ir.tensor(w_matmul))
    w2 = ir.Value(name="w2", const_value=ir.tensor(w_gemm))
    b = ir.Value(name="b", const_value=ir.tensor(np.full(OUT, 0.5, np.float32)))
    t = ir.node("Transpose", [w1], {"perm": [1, 0]}, metadata_props={MODULE_KEY: "first"})
    mm = ir.node("MatMul", [x, t.outputs[0]], metadata_props={MODULE_KEY: "first"})
    relu = ir.node("Relu", [mm.outputs[0]])
    gemm = ir.node("Gemm", [relu.outputs[0], w2, b], {"transB": 1}, metadata_props={MODULE_KEY: "second"})
    for node, shape in ((t, [IN, OUT]), (mm, ["n", OUT]), (relu, ["n", OUT]), (gemm, ["n", OUT])):
        node.outputs[0].dtype, node.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(shape)
    gemm.outputs[0].name = "y"
    graph = ir.Graph(
        [x],
        [gemm.outputs[0]],
        nodes=[t, mm, relu, gemm],
        initializers=[w1, w2, b],
        opset_imports={"": 18},
        name="g",
    )
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, x: np.ndarray, optimize: bool = False) -> np.ndarray:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), options).run(None, {"x": x})[0]


def _fake_quant(x: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(np.round(x / scale), -128, 127).astype(np.float32) * np.float32(scale)  # half-to-even


def test_matmul_and_gemm_become_int8_qdq_matmuls_computing_the_fake_quant_linear():
    q1, q2 = _quant(1), _quant(2)
    model = _graph(q1.dequantized(), q2.dequantized())
    run_passes(model, [InsertQDQPass({"first": q1, "second": q2})], debug=True)
    ops = [n.op_type for n in model.graph]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 4
    assert "Transpose" not in ops and "Gemm" not in ops and ops.count("MatMul") == 2
    assert {"w1", "w2"}.isdisjoint(model.graph.initializers)  # float weights dropped
    for node in model.graph:
        if node.op_type == "DequantizeLinear" and node.inputs[0].is_initializer():
            assert node.inputs[0].dtype == ir.DataType.INT8 and node.attributes.get_int("axis") == 1
            assert node.metadata_props[MODULE_KEY] in ("first", "second")
    x = np.random.default_rng(0).normal(size=(5, IN)).astype(np.float32)
    h = np.maximum(_fake_quant(x, 0.05) @ q1.dequantized().T, 0)
    want = _fake_quant(h, 0.05) @ q2.dequantized().T + 0.5
    assert np.abs(_run(model, x) - want).max() < 1e-5
    assert np.abs(_run(model, x, optimize=True) - want).max() < 1e-4  # ORT's int8 kernels


def test_refuses_a_graph_whose_weights_are_not_the_recipes():
    q1, q2 = _quant(1), _quant(2)
    model = _graph(q1.dequantized() * 1.01, q2.dequantized())
    with pytest.raises(MoedgeError, match="not the recipe's dequantized int8 weight"):
        InsertQDQPass({"first": q1, "second": q2})(model)


def test_refuses_a_recipe_linear_the_graph_lacks_and_leaves_others_float():
    q1, q2 = _quant(1), _quant(2)
    with pytest.raises(MoedgeError, match="no linear for 1 quantized recipe entries"):
        InsertQDQPass({"first": q1, "third": q2})(_graph(q1.dequantized(), q2.dequantized()))
    model = _graph(q1.dequantized(), q2.dequantized())
    qdq = InsertQDQPass({"first": q1})
    qdq(model)
    assert qdq.report.quantized == ["first"] and qdq.report.float_linears == ["second"]
    onnx.checker.check_model(ir.serde.serialize_model(model))
