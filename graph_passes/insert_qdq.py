"""``InsertQDQPass``: a calibration recipe's int8 decisions as QuantizeLinear/DequantizeLinear nodes.

For every quantized linear the pass leaves ``MatMul(DQ(Q(x)), DQ(W_int8))``: the weight an int8
initializer in MatMul layout (in, out) behind a per-output-channel DequantizeLinear (axis 1, zero
points 0), the activation input behind its own per-tensor QuantizeLinear/DequantizeLinear pair
(symmetric, zero point 0, one consumer per Q). That is TensorRT's explicit-quantization form (quantize
the inputs of weighted ops, never their outputs) and the pattern ONNX Runtime's CPU provider fuses
into int8 kernels. Linears the recipe keeps in FP, the router and lm_head get nothing.

Per-op policies (``_mark_matmul``, ``_mark_gemm``) only find what to quantize; ``_insert`` builds
every node.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from moedge._errors import MoedgeError
from moedge.formats.graph_names import MODULE_KEY

log = logging.getLogger(__name__)

ROTATION_SUFFIX = ".rotation"
"""The module name of a linear's online input rotation (``moedge.calibration.rotation``), after the linear's."""


@dataclass(frozen=True)
class LinearQuant:
    """One quantized linear as the recipe stores it (PyTorch layout: weight rows are output channels)."""

    qweight: np.ndarray  # int8, (out, in)
    weight_scale: np.ndarray  # float32, (out,)
    input_scale: float

    def dequantized(self) -> np.ndarray:
        """The float weight the fake-quant model multiplies with, (out, in)."""
        return self.qweight.astype(np.float32) * self.weight_scale.astype(np.float32)[:, None]


def load_linear_quant(recipe_dir: str | Path) -> dict[str, LinearQuant]:
    """Every quantized linear of a recipe folder, by module name (numpy only, no torch)."""
    from safetensors.numpy import load_file

    folder = Path(recipe_dir)
    try:
        meta = json.loads((folder / "recipe.json").read_text())
        tensors = load_file(str(folder / "weights.safetensors"))
    except (OSError, json.JSONDecodeError) as exc:
        raise MoedgeError(f"{folder} is not a readable recipe folder ({exc})") from None
    out: dict[str, LinearQuant] = {}
    for name, rec in meta["linears"].items():
        if not rec.get("quantized"):
            continue
        try:
            out[name] = LinearQuant(
                qweight=tensors[f"{name}.qweight"],
                weight_scale=tensors[f"{name}.weight_scale"].astype(np.float32),
                input_scale=float(rec["input_scale"]),
            )
        except KeyError as exc:
            raise MoedgeError(f"recipe {folder} lacks {exc} for quantized linear {name}") from None
    return out


@dataclass(frozen=True)
class _Target:
    """A weighted op the policy marked for quantization."""

    node: ir.Node
    module: str
    activation: ir.Value
    weight: np.ndarray  # float, (out, in) as the graph holds it
    bias: ir.Value | None  # Gemm's C, re-added after the new MatMul
    dead: tuple[ir.Node, ...]  # nodes that only fed the float weight (a Transpose)
    source: ir.Value  # the float weight initializer, dropped once nothing uses it


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _mark_matmul(node: ir.Node, module: str) -> _Target | None:
    """``MatMul(x, Transpose(W))`` (or an (in, out) initializer) from ``nn.Linear`` on >2-D inputs."""
    x, w = node.inputs[0], node.inputs[1]
    if x is None or w is None:
        return None
    producer = w.producer()
    if producer is not None and producer.op_type == "Transpose":
        perm = producer.attributes.get_ints("perm", None)
        source = _const(producer.inputs[0])
        if source is None or source.ndim != 2 or (perm is not None and list(perm) != [1, 0]):
            return None
        dead = (producer,) if len(w.uses()) == 1 else ()
        return _Target(node, module, x, source, None, dead, producer.inputs[0])  # type: ignore[arg-type]
    array = _const(w)
    if array is None or array.ndim != 2:
        return None
    return _Target(node, module, x, array.T, None, (), w)


def _mark_gemm(node: ir.Node, module: str) -> _Target | None:
    """``Gemm(x, W, b, transB=1)`` from ``nn.Linear`` on 2-D inputs."""
    attrs = node.attributes
    if attrs.get_int("transA", 0) or not attrs.get_int("transB", 0):
        return None
    if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
        return None
    x, w = node.inputs[0], node.inputs[1]
    array = _const(w)
    if x is None or w is None or array is None or array.ndim != 2:
        return None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return _Target(node, module, x, array, bias, (), w)


_POLICIES: dict[str, Callable[[ir.Node, str], _Target | None]] = {"MatMul": _mark_matmul, "Gemm": _mark_gemm}


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(value)
    return value


def _insert(graph: ir.Graph, target: _Target, quant: LinearQuant) -> None:
    """Replace one marked op by MatMul(DQ(Q(x)), DQ(W_int8)) (+ bias), tagged with its module."""
    name, old = target.module, target.node
    meta = dict(old.metadata_props)
    w_q = _initializer(graph, f"{name}.weight_quantized", np.ascontiguousarray(quant.qweight.T))
    w_s = _initializer(graph, f"{name}.weight_scale", quant.weight_scale.astype(np.float32))
    w_z = _initializer(graph, f"{name}.weight_zero_point", np.zeros(quant.weight_scale.shape, np.int8))
    x_s = _initializer(graph, f"{name}.input_scale", np.array(quant.input_scale, np.float32))
    x_z = _initializer(graph, f"{name}.input_zero_point", np.array(0, np.int8))
    nodes = [
        ir.node("DequantizeLinear", [w_q, w_s, w_z], {"axis": 1}, name=f"{name}/DequantizeWeight"),
        ir.node("QuantizeLinear", [target.activation, x_s, x_z], name=f"{name}/QuantizeInput"),
    ]
    nodes.append(ir.node("DequantizeLinear", [nodes[1].outputs[0], x_s, x_z], name=f"{name}/DequantizeInput"))
    nodes.append(ir.node("MatMul", [nodes[2].outputs[0], nodes[0].outputs[0]], name=f"{name}/MatMul"))
    if target.bias is not None:
        nodes.append(ir.node("Add", [nodes[3].outputs[0], target.bias], name=f"{name}/AddBias"))
    for node, suffix in zip(
        nodes[:4], ("weight_dequantized", "input_quantized", "input_dequantized", "matmul"), strict=True
    ):
        node.outputs[0].name = f"{name}.{suffix}"
    for node in nodes:
        node.metadata_props.update(meta)
        node.outputs[0].dtype = ir.DataType.FLOAT
    nodes[1].outputs[0].dtype = ir.DataType.INT8
    nodes[0].outputs[0].shape = ir.Shape(np.shape(quant.qweight.T))
    nodes[1].outputs[0].shape = nodes[2].outputs[0].shape = target.activation.shape
    result = nodes[-1].outputs[0]
    out = old.outputs[0]
    result.shape = out.shape
    graph.insert_before(old, nodes)
    if out.is_graph_output():  # the new value takes the graph output's place and name
        index = graph.outputs.index(out)
        result.name, out.name = out.name, f"{out.name}.float"
        graph.outputs[index] = result
    out.replace_all_uses_with(result)
    graph.remove([old, *target.dead], safe=True)
    source = target.source
    if source.is_initializer() and not source.uses() and source.name and source.name in graph.initializers:
        del graph.initializers[source.name]


@dataclass
class QDQReport:
    """What ``InsertQDQPass`` did."""

    quantized: list[str] = field(default_factory=list)
    float_linears: list[str] = field(default_factory=list)  # weighted ops left in FP (router, lm_head, kept)
    rotated_inputs: list[str] = field(default_factory=list)  # linears whose input an online rotation turns


class InsertQDQPass(ir.passes.InPlacePass):
    """Quantize every linear the recipe quantized, in place; everything else stays FP."""

    def __init__(self, quant: Mapping[str, LinearQuant]) -> None:
        super().__init__()
        self.quant = dict(quant)
        self.report = QDQReport()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Mark, check against the recipe, insert."""
        graph = model.graph
        targets: list[_Target] = []
        for node in graph:
            policy = _POLICIES.get(node.op_type)
            module = node.metadata_props.get(MODULE_KEY, "")
            if policy is None:
                continue
            target = policy(node, module)
            if target is None:
                continue
            owner = module.removesuffix(ROTATION_SUFFIX)
            if owner != module:  # a constant factor of an online rotation: stays FP, before owner's Q/DQ
                if owner not in self.report.rotated_inputs:
                    self.report.rotated_inputs.append(owner)
                continue
            if module in self.quant:
                targets.append(target)
            else:
                self.report.float_linears.append(module or node.name or "?")
        found = {t.module for t in targets}
        if len(found) != len(targets):
            raise MoedgeError(
                "two weighted ops carry the same module name; cannot map the recipe onto the graph"
            )
        missing = sorted(set(self.quant) - found)
        if missing:
            raise MoedgeError(
                f"the graph has no linear for {len(missing)} quantized recipe entries (e.g. {missing[0]}): "
                "export the model the recipe was made for, with the recipe applied"
            )
        for target in targets:
            quant = self.quant[target.module]
            expected = quant.dequantized()
            if target.weight.shape != expected.shape or not np.allclose(
                target.weight, expected, rtol=0, atol=1e-6 * max(1.0, float(np.abs(expected).max()))
            ):
                raise MoedgeError(
                    f"{target.module}: the graph's weight is not the recipe's dequantized int8 weight; "
                    "export with the recipe applied (moedge export MODEL --recipe DIR)"
                )
            _insert(graph, target, quant)
            self.report.quantized.append(target.module)
        log.info(
            "inserted Q/DQ on %d linears; %d weighted ops stay FP",
            len(self.report.quantized),
            len(self.report.float_linears),
        )
        return ir.passes.PassResult(model, modified=bool(targets))
