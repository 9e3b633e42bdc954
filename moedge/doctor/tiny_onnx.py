"""The tiny model of the ONNX items: one W8A8 expert FFN of smollm2-135m-moe, as ONNX protobuf bytes.

The expert is x [n, 576] -> SwiGLU (576 -> 1536 -> 576) -> y [n, 576], quantized as moedge's bundles are:
int8 weights with per-output-channel scales behind DequantizeLinear, and a QuantizeLinear/DequantizeLinear
pair on each MatMul's activation (2.6 M parameters, 2.7 MB). The protobuf wire format is written here, so
the ``onnx`` package need not be installed; numpy gives the weights and computes the reference output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moedge.doctor.common import HIDDEN, INTER, PROMPT, fig, need

MODEL_FILE = "expert_w8a8.onnx"


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 fields: two's complement
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _msg(field: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _tensor(name: str, array: Any) -> bytes:
    """TensorProto: dims 1, data_type 2 (FLOAT 1, INT8 3), name 8, raw_data 9 (little-endian)."""
    dtype = {"float32": 1, "int8": 3}[str(array.dtype)]
    dims = b"".join(_int(1, d) for d in array.shape)
    return (
        dims + _int(2, dtype) + _msg(8, name) + _msg(9, array.astype(array.dtype.newbyteorder("<")).tobytes())
    )


def _value_info(name: str, dims: list[int | str]) -> bytes:
    """ValueInfoProto of a FLOAT tensor: name 1, type 2 (TypeProto.tensor_type 1: elem_type 1, shape 2)."""
    shape = b"".join(_msg(1, _int(1, d) if isinstance(d, int) else _msg(2, d)) for d in dims)
    return _msg(1, name) + _msg(2, _msg(1, _int(1, 1) + _msg(2, shape)))


def _node(op: str, inputs: list[str], output: str, axis: int | None = None) -> bytes:
    """NodeProto: input 1, output 2, name 3, op_type 4, attribute 5 (AttributeProto: name 1, i 3, type 20)."""
    attrs = _msg(5, _msg(1, "axis") + _int(3, axis) + _int(20, 2)) if axis is not None else b""
    return b"".join(_msg(1, i) for i in inputs) + _msg(2, output) + _msg(3, output) + _msg(4, op) + attrs


def expert_parts() -> dict[str, Any]:
    """The expert's int8 weights [in, out] with per-output-channel scales, and its activation scales."""
    np = need("numpy")
    rng = np.random.default_rng(0)
    parts: dict[str, Any] = {"x_scale": np.float32(4.0 / 127)}
    for name, shape in {"gate": (HIDDEN, INTER), "up": (HIDDEN, INTER), "down": (INTER, HIDDEN)}.items():
        w = rng.normal(0.0, 0.02, shape).astype(np.float32)
        scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
        parts[name] = (np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale)
    calib = np.random.default_rng(1).normal(size=(PROMPT, HIDDEN)).astype(np.float32)
    parts["p_scale"] = np.float32(np.abs(_product(parts, calib)).max() / 127)
    return parts


def _qdq(x: Any, scale: Any) -> Any:
    np = need("numpy")
    return (np.clip(np.rint(x / scale), -128, 127) * scale).astype(np.float32)


def _weight(parts: dict[str, Any], name: str) -> Any:
    q, scale = parts[name]
    return q.astype("float32") * scale


def _product(parts: dict[str, Any], x: Any) -> Any:
    np = need("numpy")
    xd = _qdq(x, parts["x_scale"])
    g, u = xd @ _weight(parts, "gate"), xd @ _weight(parts, "up")
    return (g / (1.0 + np.exp(-g)) * u).astype(np.float32)


def numpy_reference(parts: dict[str, Any], x: Any) -> Any:
    """The expert's output computed with numpy, quantization steps included (what every backend should give)."""
    return _qdq(_product(parts, x), parts["p_scale"]) @ _weight(parts, "down")


def expert_onnx(parts: dict[str, Any]) -> bytes:
    """The expert as an ONNX model (IR 8, opset 17): x [n, 576] -> y [n, 576], W8A8 QDQ around each MatMul."""
    np = need("numpy")
    zero = np.zeros((), np.int8)
    inits = [
        _tensor("x_scale", np.asarray(parts["x_scale"])),
        _tensor("p_scale", np.asarray(parts["p_scale"])),
    ]
    inits.append(_tensor("zp", zero))
    nodes = [
        _node("QuantizeLinear", ["x", "x_scale", "zp"], "x_q"),
        _node("DequantizeLinear", ["x_q", "x_scale", "zp"], "x_dq"),
    ]
    for name in ("gate", "up", "down"):
        q, scale = parts[name]
        width = q.shape[1]
        inits += [
            _tensor(f"{name}_w", q),
            _tensor(f"{name}_s", scale),
            _tensor(f"{name}_zp", np.zeros(width, np.int8)),
        ]
        nodes.append(
            _node("DequantizeLinear", [f"{name}_w", f"{name}_s", f"{name}_zp"], f"{name}_wdq", axis=1)
        )
    nodes += [
        _node("MatMul", ["x_dq", "gate_wdq"], "g"),
        _node("MatMul", ["x_dq", "up_wdq"], "u"),
        _node("Sigmoid", ["g"], "g_sig"),
        _node("Mul", ["g", "g_sig"], "g_silu"),
        _node("Mul", ["g_silu", "u"], "p"),
        _node("QuantizeLinear", ["p", "p_scale", "zp"], "p_q"),
        _node("DequantizeLinear", ["p_q", "p_scale", "zp"], "p_dq"),
        _node("MatMul", ["p_dq", "down_wdq"], "y"),
    ]
    graph = b"".join(_msg(1, n) for n in nodes) + _msg(2, "doctor_expert")
    graph += b"".join(_msg(5, t) for t in inits)
    graph += _msg(11, _value_info("x", ["n", HIDDEN])) + _msg(12, _value_info("y", ["n", HIDDEN]))
    opset = _msg(1, "") + _int(2, 17)
    return _int(1, 8) + _msg(2, "moedge doctor") + _msg(7, graph) + _msg(8, opset)


def identity_onnx() -> bytes:
    """A one-node graph (Identity of a float [1]): one call of it is ONNX Runtime's fixed cost per call."""
    graph = _msg(1, _node("Identity", ["a"], "b")) + _msg(2, "doctor_identity")
    graph += _msg(11, _value_info("a", [1])) + _msg(12, _value_info("b", [1]))
    return _int(1, 8) + _msg(7, graph) + _msg(8, _msg(1, "") + _int(2, 17))


def tiny_model(work: Path) -> tuple[Path, dict[str, Any]]:
    """The expert's ONNX file in ``work`` (written on first use) and its parts."""
    parts = expert_parts()
    path = work / MODEL_FILE
    if not path.is_file():
        path.write_bytes(expert_onnx(parts))
    return path, parts


def inputs() -> dict[int, Any]:
    """Token count -> the input of that many tokens (1: decoding, PROMPT: a prompt batch)."""
    np = need("numpy")
    return {n: np.random.default_rng(n).normal(size=(n, HIDDEN)).astype(np.float32) for n in (1, PROMPT)}


def parity(got: Any, want: Any) -> tuple[float, float]:
    """(max |got - want|, that over max |want|)."""
    np = need("numpy")
    diff = float(np.abs(got - want).max())
    return fig(diff), fig(diff / max(float(np.abs(want).max()), 1e-12))
