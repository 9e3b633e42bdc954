"""``CheckTensorRTReadyPass``: a static lint that a model is what TensorRT 10's ONNX parser accepts.

The target is explicit quantization in a strongly typed network: every int8 tensor comes from the
graph's QuantizeLinear/DequantizeLinear nodes, with no calibrator and no precision flags. The pass
reads the model and never changes it; it collects :class:`Finding` s (errors the parser or builder
would reject, or that would make TensorRT compute something other than ONNX Runtime; warnings for
what parses but needs care). :func:`profile_inputs` lists the graph inputs that need
optimization-profile ranges, for whoever builds the engine.

Sources for the rules (checked against, not copied):

- onnx/onnx-tensorrt ``docs/operators.md`` (the 10.x support matrix) and ``docs/Changelog.md``
  (which op arrived in which 10.x release).
- The parser's ``QuantDequantLinearHelper`` (onnx-tensorrt ``onnxOpImporters.cpp``): scales must be
  positive, zero points must be all zeros, a 1-D scale must match the axis dim, UINT8 input to
  DequantizeLinear is rejected, a missing zero point means INT8 to TensorRT (UINT8 to ONNX).
- TensorRT developer guide, "Working with Quantized Types" / "Explicit Quantization": symmetric
  quantization only; INT8 for weights and activations, INT4 weight-only, FP8 on compute capability
  8.9+ (so not on Jetson Orin); per-tensor activation scales, per-channel weight scales.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from moedge._errors import MoedgeError

log = logging.getLogger(__name__)

__all__ = ["CheckTensorRTReadyPass", "Finding", "check_tensorrt_ready", "profile_inputs"]

# Per-axis Q/DQ (the ``axis`` attribute) needs opset 13.
MIN_OPSET = 13
# TensorRT 10.3 (JetPack 6.1/6.2) is the oldest TensorRT this toolkit targets. onnx-tensorrt's
# operators.md for 10.0 states "opset 9 to opset 20", and the parser's ONNX submodule only moved to
# 1.17 (opset 22) in 10.6 (Changelog.md), so 20 is the highest default-domain opset 10.3 parses.
MAX_OPSET = 20

# Default-domain ops TensorRT 10.3's ONNX parser imports. Source: onnx/onnx-tensorrt docs/operators.md
# for TensorRT 10.x (rows marked Y), minus the ops Changelog.md lists as added after 10.3 (below).
# Reciprocal and CastLike are here although old operators.md tables mark Reciprocal N: both have
# importers in every 9.x/10.x parser source (builtin_op_importers.cpp / onnxOpImporters.cpp).
SUPPORTED_OPS: frozenset[str] = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast
    CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
    DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
    Flatten Floor Gather GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GridSample GroupNormalization GRU Hardmax HardSigmoid Identity If
    ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
    LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization
    Min Mod Mul Neg NonMaxSuppression NonZero Not Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
    RandomNormal RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
    ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape
    Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu
    Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
    Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)
# Marked Y in the latest 10.x operators.md, but neither the changelog nor a 10.3-era parser source
# confirms them for 10.3: reported as warnings.
UNCONFIRMED_OPS: frozenset[str] = frozenset({"Gelu", "HardSwish", "Mish", "OneHot", "RandomNormalLike"})
# Parsed only by later 10.x releases (Changelog.md): op -> first TensorRT version.
ADDED_AFTER_10_3: dict[str, str] = {
    "BlackmanWindow": "10.4",
    "HammingWindow": "10.4",
    "HannWindow": "10.4",
    "STFT": "10.5",
    "Attention": "10.14",
    "RMSNormalization": "10.15",
    "RotaryEmbedding": "10.15",
    "TensorScatter": "10.15",
}

_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
# Quantized types TensorRT 10 parses but with restrictions the W8A8 path does not meet.
_RESTRICTED_QTYPES = {
    ir.DataType.INT4: "INT4 is weight-only in TensorRT 10 (a DequantizeLinear on an initializer)",
    ir.DataType.FLOAT8E4M3FN: "FP8 needs compute capability 8.9+ (not Jetson Orin)",
}
# Network input types TensorRT 10 binds (INT8/INT4/FP8 only exist behind a QuantizeLinear).
INPUT_DTYPES: frozenset[ir.DataType] = frozenset(
    {
        ir.DataType.FLOAT,
        ir.DataType.FLOAT16,
        ir.DataType.BFLOAT16,
        ir.DataType.INT32,
        ir.DataType.INT64,
        ir.DataType.UINT8,
        ir.DataType.BOOL,
    }
)
_QDQ = ("QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class Finding:
    """One problem found in the model: which node, and what is wrong and what to do about it."""

    severity: Literal["error", "warning"]
    node: str
    op_type: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.op_type} {self.node!r}: {self.message}"


def _const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's data when it is a build-time constant (an initializer or a Constant node)."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is None or producer.op_type != "Constant":
        return None
    for name, attr in producer.attributes.items():
        if name == "value":
            return attr.as_tensor().numpy()
        if name in ("value_float", "value_floats", "value_int", "value_ints"):
            return np.asarray(attr.value)
    return None


def _is_const(value: ir.Value) -> bool:
    producer = value.producer()
    return value.const_value is not None or (producer is not None and producer.op_type == "Constant")


def _rank(value: ir.Value) -> int | None:
    if value.const_value is not None:
        return len(value.const_value.shape)
    return len(value.shape) if value.shape is not None else None


def _axis_dim(value: ir.Value, axis: int) -> int | None:
    shape = value.const_value.shape if value.const_value is not None else value.shape
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) else None


def _quantized_type(node: ir.Node) -> ir.DataType | None:
    """The int type a Q/DQ works in: the zero point's, else ``output_dtype``, else the data input's."""
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    if zero_point is not None and zero_point.dtype is not None:
        return zero_point.dtype
    if node.op_type == "QuantizeLinear":
        output_dtype = node.attributes.get_int("output_dtype", 0)
        return ir.DataType(output_dtype) if output_dtype else None
    data = node.inputs[0]
    if data is not None and data.dtype is None and (producer := data.producer()) is not None:
        if producer.op_type == "QuantizeLinear":
            return _quantized_type(producer)
    return data.dtype if data is not None else None


def _default_domain_nodes(model: ir.Model) -> Iterator[ir.Node]:
    yield from model.graph.all_nodes()
    for function in model.functions.values():
        yield from function.all_nodes()


class CheckTensorRTReadyPass(ir.passes.InPlacePass):
    """Lint a model for TensorRT 10's ONNX parser in explicit-quantization mode; never modifies it.

    After a call, ``findings`` holds what was found and ``dynamic_inputs`` the graph inputs that need
    optimization-profile ranges. With ``strict=True`` any error raises :class:`MoedgeError`.
    """

    def __init__(self, *, strict: bool = False) -> None:
        super().__init__()
        self.strict = strict
        self.findings: list[Finding] = []
        self.dynamic_inputs: dict[str, list[str | int]] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Collect findings for ``model``; the model is returned unchanged."""
        self.findings = []
        self._check_opset(model)
        self._check_inputs(model)
        for node in _default_domain_nodes(model):
            self._check_node(model, node)
        self.dynamic_inputs = profile_inputs(model)
        for name, dims in self.dynamic_inputs.items():
            log.debug("input %s %s needs optimization-profile ranges", name, dims)
        errors = [f for f in self.findings if f.severity == "error"]
        if self.strict and errors:
            lines = "\n".join(f"  {f}" for f in errors)
            raise MoedgeError(f"the model is not ready for TensorRT ({len(errors)} errors):\n{lines}")
        return ir.passes.PassResult(model, modified=False)

    def _add(self, severity: Literal["error", "warning"], node: ir.Node | None, message: str) -> None:
        name, op = (node.name or "", node.op_type) if node is not None else ("(model)", "")
        self.findings.append(Finding(severity, name, op, message))

    def _check_opset(self, model: ir.Model) -> None:
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        if opset is None or opset < MIN_OPSET:
            self._add(
                "error",
                None,
                f"default-domain opset {opset} is below {MIN_OPSET}: per-axis QuantizeLinear/DequantizeLinear "
                f"needs opset {MIN_OPSET}; re-export with opset {MIN_OPSET}..{MAX_OPSET}",
            )
        elif opset > MAX_OPSET:
            self._add(
                "error",
                None,
                f"default-domain opset {opset} is above {MAX_OPSET}, the highest TensorRT 10.3 parses; "
                f"re-export with opset {MAX_OPSET} or lower",
            )

    def _check_inputs(self, model: ir.Model) -> None:
        for value in model.graph.inputs:
            if value.is_initializer() or value.dtype is None or value.dtype in INPUT_DTYPES:
                continue
            self.findings.append(
                Finding(
                    "error",
                    value.name or "",
                    "graph input",
                    f"dtype {value.dtype.name} is not a TensorRT network input type; "
                    "feed float32/float16/int32/int64/bool and Cast (or QuantizeLinear) inside the graph",
                )
            )

    def _check_node(self, model: ir.Model, node: ir.Node) -> None:
        if node.domain not in ("", "ai.onnx"):
            if (node.domain, node.op_type, node.overload) in model.functions:
                return  # a model-local function: its body is checked node by node
            self._add(
                "error",
                node,
                f"op in custom domain {node.domain!r}: TensorRT's parser only imports it as a plugin; "
                "rewrite it with standard ONNX ops (or register a TensorRT plugin of that name)",
            )
            return
        if node.op_type in UNCONFIRMED_OPS:
            self._add(
                "warning",
                node,
                "listed as supported in onnx-tensorrt's latest 10.x operators.md, but unconfirmed for "
                "TensorRT 10.3: check with trtexec on the target, or decompose it",
            )
        elif node.op_type in ADDED_AFTER_10_3:
            self._add(
                "error",
                node,
                f"TensorRT parses {node.op_type} only from {ADDED_AFTER_10_3[node.op_type]}; decompose it "
                "for TensorRT 10.3",
            )
        elif node.op_type not in SUPPORTED_OPS:
            self._add(
                "error",
                node,
                "not in TensorRT 10's ONNX parser support list (onnx-tensorrt operators.md); "
                "rewrite it with supported ops",
            )
        elif node.op_type in _QDQ:
            self._check_qdq(node)

    def _check_qdq(self, node: ir.Node) -> None:
        is_q = node.op_type == "QuantizeLinear"
        data = node.inputs[0]
        if data is None:
            self._add("error", node, "has no data input")
            return
        if node.attributes.get_int("block_size", 0):
            self._add(
                "error",
                node,
                "block quantization (block_size) needs opset 21 and is INT4/FP4 weight-only in TensorRT "
                "10; use per-tensor or per-channel scales",
            )
        self._check_qtype(node, is_q, data)
        self._check_zero_point(node)
        self._check_scale(node, data)
        if is_q:
            output = node.outputs[0]
            others = sorted({use.node.op_type for use in output.uses()} - {"DequantizeLinear"})
            if others or output.is_graph_output():
                what = ", ".join(others) if others else "a graph output"
                self._add(
                    "error",
                    node,
                    f"output feeds {what}: TensorRT needs every QuantizeLinear output consumed only by "
                    "DequantizeLinear nodes (a Q/DQ pair in front of the op)",
                )
        elif not _is_const(data):
            producer = data.producer()
            if producer is None or producer.op_type != "QuantizeLinear":
                source = producer.op_type if producer is not None else "graph input"
                self._add(
                    "error",
                    node,
                    f"dangling DequantizeLinear: its input {data.name!r} comes from {source}, not a "
                    "QuantizeLinear or an int8 initializer; pair it with a QuantizeLinear or drop it",
                )

    def _check_qtype(self, node: ir.Node, is_q: bool, data: ir.Value) -> None:
        has_zero_point = len(node.inputs) > 2 and node.inputs[2] is not None
        if is_q and not has_zero_point and not node.attributes.get_int("output_dtype", 0):
            self._add(
                "error",
                node,
                "no zero point: ONNX then quantizes to uint8 while TensorRT uses int8, so results "
                "differ; add an int8 zero point of 0",
            )
            return
        qtype = _quantized_type(node)
        if qtype is None or qtype == ir.DataType.INT8:
            pass
        elif qtype in _RESTRICTED_QTYPES:
            weight_only = qtype == ir.DataType.INT4 and not is_q and _is_const(data)
            if qtype != ir.DataType.INT4 or weight_only:
                self._add("warning", node, f"{qtype.name} quantization: {_RESTRICTED_QTYPES[qtype]}")
            else:
                self._add("error", node, f"{qtype.name} on an activation: {_RESTRICTED_QTYPES[qtype]}")
        elif qtype == ir.DataType.UINT8:
            self._add(
                "error",
                node,
                "uint8 quantization: TensorRT quantizes symmetrically to int8 only (uint8 only on DLA); "
                "quantize to int8 with zero point 0",
            )
        else:
            self._add("error", node, f"{qtype.name} quantization is not supported by TensorRT 10; use int8")
        if not is_q and _is_const(data) and data.dtype is not None and data.dtype in _FLOATS:
            self._add("error", node, f"weight {data.name!r} is float; store it as an int8 initializer")

    def _check_zero_point(self, node: ir.Node) -> None:
        zero_point = node.inputs[2] if len(node.inputs) > 2 else None
        if zero_point is None:
            return
        array = _const_array(zero_point)
        if array is None:
            self._add(
                "error", node, f"zero point {zero_point.name!r} is not a constant; make it an initializer"
            )
        elif np.any(array.astype(np.float64) != 0):
            self._add(
                "error",
                node,
                f"non-zero zero point {zero_point.name!r}: TensorRT supports symmetric quantization only; "
                "re-quantize with zero point 0",
            )

    def _check_scale(self, node: ir.Node, data: ir.Value) -> None:
        scale = node.inputs[1] if len(node.inputs) > 1 else None
        array = _const_array(scale)
        if scale is None or array is None:
            self._add("error", node, "scale is not a constant; make it a float32 initializer")
            return
        if scale.dtype is not None and scale.dtype not in _FLOATS:
            self._add("error", node, f"scale {scale.name!r} is {scale.dtype.name}; use float32 or float16")
        if np.any(~(array.astype(np.float64) > 0)):
            self._add(
                "error", node, f"scale {scale.name!r} has non-positive values; TensorRT needs scale > 0"
            )
        if array.size == 1:
            return
        if array.ndim != 1:
            self._add(
                "error",
                node,
                f"scale {scale.name!r} has shape {list(array.shape)}: use a scalar or a 1-D scale",
            )
            return
        if not _is_const(data):
            self._add(
                "error",
                node,
                f"per-channel scale on activation {data.name!r}: TensorRT wants per-tensor (scalar) "
                "activation scales",
            )
            return
        axis = node.attributes.get_int("axis", 1)
        rank = _rank(data)
        if rank is not None and not -rank <= axis < rank:
            self._add("error", node, f"axis {axis} is out of range for rank-{rank} input {data.name!r}")
            return
        dim = _axis_dim(data, axis)
        if dim is not None and dim != array.shape[0]:
            self._add(
                "error",
                node,
                f"per-axis scale {scale.name!r} has {array.shape[0]} values but axis {axis} of "
                f"{data.name!r} has {dim}; use one scale per channel along the quantized axis",
            )


def check_tensorrt_ready(model: ir.Model) -> list[Finding]:
    """Every finding for ``model`` (errors and warnings), without raising."""
    lint = CheckTensorRTReadyPass()
    lint(model)
    return lint.findings


def profile_inputs(model: ir.Model) -> dict[str, list[str | int]]:
    """Graph inputs with dynamic dims, name -> dims (dim params by name, ``"?"`` for unnamed ones).

    These are the inputs a TensorRT builder needs min/opt/max shapes for (one optimization profile).
    """
    out: dict[str, list[str | int]] = {}
    for value in model.graph.inputs:
        if value.is_initializer() or value.shape is None:
            continue
        dims: list[str | int] = [
            d if isinstance(d, int) else (d.value if isinstance(d.value, str) else "?") for d in value.shape
        ]
        if any(isinstance(d, str) for d in dims):
            out[value.name or ""] = dims
    return out
