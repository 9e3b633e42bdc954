"""The embedding table as the int8 head's codes: one int8 copy of a tied table, as llama.cpp's Q8_0 stores it.

A model with tied embeddings calibrated with ``--quantize-head`` has an int8 head ``W[c, t] = q[c, t] *
scale[t]`` (hidden x vocab codes, one scale per token) that equals the embedding table times the final
norm's smoothing factors, ``E[t, c] * s[c]`` (smoothing multiplies the head's input columns by ``s``).
So the embedding of token ``t`` is ``q[:, t] * scale[t] / s``: the head's bytes serve both graphs, and the
FP32 table (vocab x hidden x 4 bytes, 113 MB for smollm2-135m) leaves the bundle.

``s`` is the least-squares factor per hidden channel between the dequantized head and the FP32 table
(exact up to the head's rounding; the fit is refused when the residual is not rounding noise, i.e. the
head is not the table's). The new embedding graph gathers the token's column of the codes (``Gather``
axis 1), casts, transposes to (batch, sequence, hidden) and multiplies by the token's scale and ``1 / s``.
``split_bundle`` stores the codes and scales once (``_share_tensors``).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from moedge.formats.manifest import HIDDEN
from moedge.graph_passes.stage_patterns import const_array

log = logging.getLogger(__name__)

# Relative squared residual of the fit above which the head is not the embedding table's (rounding noise
# of int8 codes per row is about 1e-4 to 1e-3 of the signal; an untied head gives about 1)
MAX_FIT_RESIDUAL = 1e-2

__all__ = ["embed_with_head_codes"]


def embed_with_head_codes(embedding: ir.Model, head: ir.Model) -> bool:
    """Rewrite ``embedding`` (``input_ids`` -> ``hidden_states`` by a Gather on an FP32 table) to read the
    int8 ``head``'s codes when they are the table's (see the module docstring); in place. Returns False,
    changing nothing, when the head is not int8 per token or not the table's."""
    gather = _table_gather(embedding)
    codes = _head_codes(head)
    if gather is None or codes is None:
        return False
    table = const_array(gather.inputs[0])
    q_value, scale_value = codes
    q, scale = const_array(q_value), const_array(scale_value)
    if table is None or q is None or scale is None or q.shape != table.shape[::-1]:
        return False
    factors = _fit(table, q, scale)
    if factors is None:
        return False
    _rewrite(embedding, gather, q, scale, factors)
    return True


def _table_gather(model: ir.Model) -> ir.Node | None:
    """The embedding stage's one Gather of an FP32 (vocab, hidden) initializer by ``input_ids``."""
    graph = model.graph
    out = next((v for v in graph.outputs if v.name == HIDDEN), None)
    node = out.producer() if out is not None else None
    if node is None or node.op_type != "Gather" or len(graph.outputs) != 1:
        return None
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
    table, ids = node.inputs
    if axis != 0 or table is None or table.const_value is None or ids is None or not ids.is_graph_input():
        return None
    return node if table.dtype == ir.DataType.FLOAT and len(table.shape or ()) == 2 else None


def _head_codes(model: ir.Model) -> tuple[ir.Value, ir.Value] | None:
    """The head's int8 weight codes (hidden, vocab) and per-token scales (vocab,), zero points 0."""
    logits = next((v for v in model.graph.outputs if v.name == "logits"), None)
    matmul = logits.producer() if logits is not None else None
    if matmul is None or matmul.op_type != "MatMul":
        return None
    dq = matmul.inputs[1].producer() if matmul.inputs[1] is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.inputs) < 2:
        return None
    axis = dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1
    codes, scale = dq.inputs[0], dq.inputs[1]
    zero = const_array(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    if codes is None or scale is None or codes.const_value is None or scale.const_value is None:
        return None
    if axis != 1 or codes.dtype != ir.DataType.INT8 or (zero is not None and np.any(zero != 0)):
        return None
    return codes, scale


def _fit(table: np.ndarray, q: np.ndarray, scale: np.ndarray) -> np.ndarray | None:
    """Per hidden channel ``s`` minimising ||q * scale - table.T * s||, or None when the residual says
    the head is not this table's."""
    hidden = table.shape[1]
    cross, power, head_power = np.zeros(hidden), np.zeros(hidden), np.zeros(hidden)
    step = 4096
    for start in range(0, table.shape[0], step):  # tokens in chunks: float64 without a full copy
        e = table[start : start + step].astype(np.float64)  # (n, hidden)
        w = (q[:, start : start + step].astype(np.float64) * scale[start : start + step]).T
        cross += np.einsum("nc,nc->c", w, e)
        power += np.einsum("nc,nc->c", e, e)
        head_power += np.einsum("nc,nc->c", w, w)
    s = np.where(power > 0, cross / np.where(power > 0, power, 1.0), 1.0)
    residual = head_power - 2 * s * cross + s * s * power  # sum over tokens of (w - e s)^2 per channel
    total = float(head_power.sum())
    if total <= 0 or not np.all(s > 0) or float(residual.sum()) / total > MAX_FIT_RESIDUAL:
        log.info("the int8 head is not the embedding table's: the embedding stays FP32")
        return None
    return s


def _rewrite(model: ir.Model, gather: ir.Node, q: np.ndarray, scale: np.ndarray, s: np.ndarray) -> None:
    graph = model.graph
    ids = gather.inputs[1]
    assert ids is not None
    out = gather.outputs[0]

    def init(name: str, array: np.ndarray) -> ir.Value:
        tensor = ir.tensor(array, name=name)
        value = ir.Value(
            name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
        )
        graph.register_initializer(value)
        return value

    codes = init("lm_head.weight_quantized", q)  # the head's names and bytes: stored once
    scales = init("lm_head.weight_scale", scale.astype(np.float32))
    inverse = init("embedding.inverse_smoothing", (1.0 / s).astype(np.float32))
    axes = init("embedding.last_axis", np.asarray([-1], dtype=np.int64))
    column = ir.node("Gather", [codes, ids], attributes={"axis": 1})  # (hidden, batch, sequence) int8
    real = ir.node("Cast", [column.outputs[0]], attributes={"to": ir.DataType.FLOAT})
    rows = ir.node("Transpose", [real.outputs[0]], attributes={"perm": [1, 2, 0]})
    token_scale = ir.node("Gather", [scales, ids], attributes={"axis": 0})
    expanded = ir.node("Unsqueeze", [token_scale.outputs[0], axes])
    scaled = ir.node("Mul", [rows.outputs[0], expanded.outputs[0]])
    hidden = ir.node("Mul", [scaled.outputs[0], inverse])
    graph.insert_before(gather, [column, real, rows, token_scale, expanded, scaled, hidden])
    new = hidden.outputs[0]
    new.type, new.shape = out.type, out.shape
    out.replace_all_uses_with(new, replace_graph_outputs=True)
    out.name = f"{HIDDEN}.fp32_table"
    new.name = HIDDEN
    table = gather.inputs[0]
    graph.remove(gather, safe=True)
    if table is not None and not table.uses():
        graph.initializers.pop(table.name or "")
