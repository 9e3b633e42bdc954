"""What a bundle's layer stage computes, read off its graph: the patterns the ORT CPU rewrite replaces.

Pure functions over an onnx-ir graph (nothing here changes it). They find, by structure and the
``moedge.module`` metadata every exported node carries:

- the two RMSNorms of a pre-norm decoder layer (``Pow -> ReduceMean -> Add eps -> Sqrt -> Reciprocal
  -> Mul x -> Mul weight``) and the residual Add between them;
- the rotary attention block: the query/key/value projections' outputs before the head reshape, the
  rotate-half RoPE on query and key, the Concat-based KV cache, the softmax scale, and the value the
  output projection reads;
- bias-free linears (FP ``MatMul(x, Transpose(W))`` or the W8A8 ``MatMul(DQ(Q(x)), DQ(W))``) that can be
  packed into one matmul.

A stage that does not match exactly gets ``None`` (or a ``FusionRefused`` saying what differs), never
a half-understood rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from moedge._errors import MoedgeError
from moedge.graph_passes.graph_walk import boundary, module_of


class FusionRefused(MoedgeError):
    """The stage cannot use ORT's fused CPU kernels; the caller keeps the unfused stage."""


@dataclass(frozen=True)
class RmsNorm:
    """``output = weight * input / sqrt(mean(input^2, last axis) + epsilon)``."""

    input: ir.Value
    output: ir.Value
    weight: ir.Value
    epsilon: float
    module: str


@dataclass(frozen=True)
class RotaryAttention:
    """The attention block between the q/k/v projections and the output projection."""

    query: ir.Value  # (B, S, heads * head_dim): the query projection's output, before the head reshape
    key: ir.Value  # (B, S, kv_heads * head_dim)
    value: ir.Value
    output: ir.Value  # (B, S, heads * head_dim): what the output projection reads
    present_key: ir.Value  # the stage's Concat-based cache outputs
    present_value: ir.Value
    rotary_dim: int  # last axis of the rotary tables the stage reads (== head_dim: full rotary)
    scale: float  # the product of the constants QK^T is multiplied by before the softmax
    module: str


_PASS = frozenset({"Identity", "Cast"})


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value as an array when it folds to a constant (initializers, Constant and shape glue)."""
    if value is None:
        return None
    if value.const_value is not None:
        return np.asarray(value.const_value.numpy())
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "Constant":
        attr = node.attributes.get("value")
        if attr is not None and not attr.is_ref():
            # read directly: get_const_tensor renames this tensor, which other graphs of a split share
            return np.asarray(attr.as_tensor().numpy())
        tensor = ir.convenience.get_const_tensor(value)  # value_int(s)/value_float(s): a new tensor
        return None if tensor is None else np.asarray(tensor.numpy())
    args = [const_array(v) for v in node.inputs]
    if not args or any(a is None for a in args):
        return None
    op, first = node.op_type, args[0]
    assert first is not None
    if op == "Identity":
        return first
    if op == "Cast":
        return first.astype(ir.DataType(node.attributes["to"].as_int()).numpy())
    if op == "Reshape":
        shape = [first.shape[i] if d == 0 else int(d) for i, d in enumerate(np.asarray(args[1]).tolist())]
        return first.reshape(shape)
    if op in ("Unsqueeze", "Squeeze"):
        axes = tuple(int(a) for a in np.asarray(args[1]).reshape(-1)) if len(args) > 1 else ()
        if op == "Unsqueeze":
            return np.expand_dims(first, axes)
        return np.squeeze(first, axes or None)
    if op == "Concat":
        return np.concatenate([np.asarray(a) for a in args], axis=node.attributes["axis"].as_int())
    return None


def _scalar(value: ir.Value | None) -> float | None:
    array = const_array(value)
    return float(array.reshape(-1)[0]) if array is not None and array.size == 1 else None


def _producer(value: ir.Value | None, *ops: str) -> ir.Node | None:
    """The node making ``value`` (through Identity/Cast) when its op is one of ``ops``."""
    while value is not None:
        node = value.producer()
        if node is None:
            return None
        if node.op_type in _PASS and node.op_type not in ops:
            value = node.inputs[0]
            continue
        return node if node.op_type in ops else None
    return None


def _source(value: ir.Value | None) -> ir.Value | None:
    """``value`` with Identity/Cast producers looked through."""
    while value is not None and (node := value.producer()) is not None and node.op_type in _PASS:
        value = node.inputs[0]
    return value


def _split_const(node: ir.Node) -> tuple[ir.Value, np.ndarray] | None:
    """(the other input, the constant) of a binary node with exactly one constant input."""
    a, b = node.inputs[0], node.inputs[1]
    ca, cb = const_array(a), const_array(b)
    if (ca is None) == (cb is None):
        return None
    return (b, ca) if ca is not None else (a, cb)  # type: ignore[return-value]


# -- RMSNorm --------------------------------------------------------------------------------------


def match_rms_norm(output: ir.Value) -> RmsNorm | None:
    """The RMSNorm computing ``output``, or None when ``output`` is something else."""
    last = _producer(output, "Mul")
    split = None if last is None else _split_const(last)
    if last is None or split is None or split[1].ndim != 1:
        return None
    weight = next(v for v in last.inputs if v is not None and const_array(v) is not None)
    scaled = _producer(split[0], "Mul", "Div")
    if scaled is None:
        return None
    if scaled.op_type == "Div":
        x, inv = scaled.inputs[0], None
        root = _producer(scaled.inputs[1], "Sqrt")
    else:
        x, inv = _rms_operands(scaled)
        root = None if inv is None else _reciprocal_sqrt(inv)
    if x is None or root is None:
        return None
    add = _producer(root.inputs[0], "Add")
    split_eps = None if add is None else _split_const(add)
    mean = None if split_eps is None else _producer(split_eps[0], "ReduceMean")
    if split_eps is None or mean is None or not _is_mean_of_square(mean, _source(x)):
        return None
    return RmsNorm(_source(x), output, weight, float(split_eps[1].reshape(-1)[0]), module_of(last))  # type: ignore[arg-type]


def _rms_operands(mul: ir.Node) -> tuple[ir.Value | None, ir.Value | None]:
    """(x, 1/sqrt(..)) of ``Mul(x, Reciprocal(Sqrt(..)))`` in either order."""
    for x, inv in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
        if _reciprocal_sqrt(inv) is not None:
            return x, inv
    return None, None


def _reciprocal_sqrt(value: ir.Value | None) -> ir.Node | None:
    """The Sqrt node of ``Reciprocal(Sqrt(..))`` or ``Div(1, Sqrt(..))``."""
    node = _producer(value, "Reciprocal", "Div")
    if node is None:
        return None
    if node.op_type == "Div" and _scalar(node.inputs[0]) != 1.0:
        return None
    return _producer(node.inputs[-1], "Sqrt")


def _is_mean_of_square(mean: ir.Node, x: ir.Value | None) -> bool:
    axes = const_array(mean.inputs[1]) if len(mean.inputs) > 1 else None
    if axes is None and "axes" in mean.attributes:
        axes = np.asarray(mean.attributes["axes"].as_ints())
    rank = len(x.shape) if x is not None and x.shape is not None else None
    if axes is None or axes.size != 1 or int(axes.reshape(-1)[0]) not in (-1, (rank or 0) - 1):
        return False
    if "keepdims" in mean.attributes and mean.attributes["keepdims"].as_int() != 1:
        return False
    square = _producer(mean.inputs[0], "Pow", "Mul")
    if square is None:
        return False
    if square.op_type == "Pow":
        return _source(square.inputs[0]) is x and _scalar(square.inputs[1]) == 2.0
    return _source(square.inputs[0]) is x and _source(square.inputs[1]) is x


# -- rotary attention ------------------------------------------------------------------------------


def match_attention(
    graph: ir.Graph, present_key: ir.Value, present_value: ir.Value, head_dim: int
) -> RotaryAttention:
    """The rotary attention block whose Concat-based cache outputs are ``present_key``/``present_value``."""
    k_rot = _cache_append(present_key, "key")
    v_heads = _cache_append(present_value, "value")
    k_heads, rotary_dim = _rotary_input(k_rot, head_dim)
    others = [n for n in graph if n.op_type == "Add" and n.outputs[0] is not k_rot]
    rotated = [(n.outputs[0], _try_rotary(n.outputs[0], head_dim)) for n in others]
    queries = [(v, m[0]) for v, m in rotated if m is not None]
    if len(queries) != 1:
        raise FusionRefused(f"found {len(queries)} rotary query tensors beside the key's, expected 1")
    q_rot, q_heads = queries[0]
    scale, output = _softmax_scale(present_key, present_value, q_rot)
    module = module_of(present_key.producer())  # type: ignore[arg-type]
    return RotaryAttention(
        query=_head_split_source(q_heads),
        key=_head_split_source(k_heads),
        value=_head_split_source(v_heads),
        output=output,
        present_key=present_key,
        present_value=present_value,
        rotary_dim=rotary_dim,
        scale=scale,
        module=module,
    )


def _cache_append(present: ir.Value, what: str) -> ir.Value:
    """The new rows of ``present = Concat(past, new)`` on the sequence axis."""
    concat = _producer(present, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.attributes["axis"].as_int() not in (2, -2):
        raise FusionRefused(f"the stage's {what} cache output is not Concat(past, new) on the sequence axis")
    past = _source(concat.inputs[0])
    if past is None or not past.is_graph_input():
        raise FusionRefused(f"the stage's {what} cache does not extend a cache input")
    return concat.inputs[1]  # type: ignore[return-value]


def _rotary_input(rotated: ir.Value, head_dim: int) -> tuple[ir.Value, int]:
    match = _try_rotary(rotated, head_dim)
    if match is None:
        raise FusionRefused(
            "the key is not rotated by rotate-half RoPE (x * cos + rotate_half(x) * sin) on full heads"
        )
    return match


def _try_rotary(rotated: ir.Value, head_dim: int) -> tuple[ir.Value, int] | None:
    """(x, rotary_dim) when ``rotated = x * cos + rotate_half(x) * sin`` with cos/sin graph inputs."""
    add = _producer(rotated, "Add")
    if add is None:
        return None
    for first, second in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        plain, turned = _producer(first, "Mul"), _producer(second, "Mul")
        if plain is None or turned is None:
            continue
        for x, cos in ((plain.inputs[0], plain.inputs[1]), (plain.inputs[1], plain.inputs[0])):
            table = _table_input(cos)
            for half, sin in ((turned.inputs[0], turned.inputs[1]), (turned.inputs[1], turned.inputs[0])):
                if table is not None and _table_input(sin) is not None and _is_rotate_half(half, x, head_dim):
                    dim = table.shape[-1] if table.shape is not None else None
                    return (x, dim) if isinstance(dim, int) else None  # type: ignore[return-value]
    return None


def _table_input(value: ir.Value | None) -> ir.Value | None:
    """The float graph input (a rotary table) ``value`` is, through Unsqueeze/Identity/Cast."""
    while value is not None and not value.is_graph_input():
        node = value.producer()
        if node is None or node.op_type not in (*_PASS, "Unsqueeze"):
            return None
        value = node.inputs[0]
    return value if value is not None and value.dtype == ir.DataType.FLOAT else None


def _is_rotate_half(value: ir.Value | None, x: ir.Value | None, head_dim: int) -> bool:
    """``value = Concat(-x[..., h:], x[..., :h])`` with h = head_dim / 2."""
    concat = _producer(value, "Concat")
    if concat is None or len(concat.inputs) != 2 or concat.attributes["axis"].as_int() not in (-1, 3):
        return False
    neg = _producer(concat.inputs[0], "Neg")
    upper = None if neg is None else _slice_of(neg.inputs[0], x)
    lower = _slice_of(concat.inputs[1], x)
    half = head_dim // 2
    return (
        upper is not None
        and lower is not None
        and upper[0] == half
        and upper[1] >= head_dim
        and lower == (0, half)
    )


def _slice_of(value: ir.Value | None, x: ir.Value | None) -> tuple[int, int] | None:
    """(start, end) of a unit-step Slice of ``x`` on the last axis."""
    node = _producer(value, "Slice")
    if node is None or node.inputs[0] is not x:
        return None
    parts = [const_array(v) for v in node.inputs[1:]]
    if any(p is None or p.size != 1 for p in parts[:3]) or (
        len(parts) > 3 and parts[3] is not None and int(parts[3].reshape(-1)[0]) != 1
    ):
        return None
    start, end, axis = (int(p.reshape(-1)[0]) for p in parts[:3])  # type: ignore[union-attr]
    return (start, end) if axis in (-1, 3) else None


def _head_split_source(heads: ir.Value) -> ir.Value:
    """``x`` of ``Transpose(Reshape(x, (B, S, N, H)), perm=(0, 2, 1, 3))``."""
    transpose = _producer(heads, "Transpose")
    if transpose is None or tuple(transpose.attributes["perm"].as_ints()) != (0, 2, 1, 3):
        raise FusionRefused("a query/key/value head split is not Transpose(Reshape(x), perm=(0, 2, 1, 3))")
    reshape = _producer(transpose.inputs[0], "Reshape")
    if reshape is None or reshape.inputs[0] is None:
        raise FusionRefused("a query/key/value head split does not start with a Reshape")
    return reshape.inputs[0]


_GLUE = frozenset({"Reshape", "Transpose", "Identity", "Cast", "Where", "Add", "Mul", "Div"})


def _softmax_scale(present_key: ir.Value, present_value: ir.Value, q_rot: ir.Value) -> tuple[float, ir.Value]:
    """(softmax scale, attention output): QK^T -> scale -> mask -> Softmax -> x V -> head merge."""
    scale = 1.0
    value, qk = present_key, None
    while qk is None:  # from the cache output to the QK^T MatMul (a transpose, maybe a scale)
        users = _data_users(value)
        if len(users) != 1 or users[0].op_type not in (*_GLUE, "MatMul"):
            raise FusionRefused("the key cache feeds more than the attention scores")
        node = users[0]
        scale *= _glue_scale(node)
        qk = node if node.op_type == "MatMul" else None
        value = node.outputs[0]
    softmax = None
    while softmax is None:
        users = _data_users(value)
        if len(users) != 1 or users[0].op_type not in (*_GLUE, "Softmax"):
            raise FusionRefused(
                "the attention scores go through something other than scale, mask and softmax"
            )
        softmax = users[0] if users[0].op_type == "Softmax" else None
        scale *= 1.0 if softmax is not None else _glue_scale(users[0])
        value = users[0].outputs[0]
    scale *= _query_scale(qk, q_rot)
    pv = [u for u, _ in present_value.uses() if u.op_type == "MatMul"]
    if len(pv) != 1:
        raise FusionRefused("the value cache is not read by one MatMul")
    return scale, _merged_heads(pv[0].outputs[0])


def _data_users(value: ir.Value) -> list[ir.Node]:
    """Nodes reading ``value``'s data (not only its type or shape: CastLike's target, Shape)."""
    return [u for u, i in value.uses() if u.op_type != "Shape" and not (u.op_type == "CastLike" and i == 1)]


def _glue_scale(node: ir.Node) -> float:
    """The factor a Mul/Div by a scalar constant applies; 1 for shape glue and mask ops."""
    if node.op_type in ("Mul", "Div"):
        split = _split_const(node)
        if split is not None and split[1].size == 1:
            factor = float(split[1].reshape(-1)[0])
            return factor if node.op_type == "Mul" else 1.0 / factor
        raise FusionRefused(f"the attention scores are multiplied by a non-scalar ({node.op_type})")
    return 1.0


def _query_scale(qk: ir.Node, q_rot: ir.Value) -> float:
    """Scalar factors between the rotated query and the QK^T MatMul (some exports scale q there)."""
    value, scale = qk.inputs[0], 1.0
    while value is not q_rot:
        node = value.producer() if value is not None else None
        if node is None or node.op_type not in _GLUE:
            raise FusionRefused("the attention scores are not computed from the rotated query")
        scale *= _glue_scale(node)
        split = _split_const(node) if node.op_type == "Mul" else None
        value = node.inputs[0] if split is None else split[0]
    return scale


def _merged_heads(value: ir.Value) -> ir.Value:
    """Follow probabilities x V through the head merge to the (B, S, heads * head_dim) value."""
    while True:
        users = _data_users(value)
        if len(users) != 1:
            raise FusionRefused("the attention output is read by more than the head merge")
        node = users[0]
        if node.op_type not in ("Reshape", "Transpose", "Identity"):
            return value
        value = node.outputs[0]
        if value.shape is not None and len(value.shape) == 3:
            return value


def module_nodes(graph: ir.Graph, module: str) -> set[ir.Node]:
    """The nodes tagged with exactly ``module``."""
    return {n for n in graph if module_of(n) == module}


def module_input(graph: ir.Graph, output: ir.Value) -> ir.Value:
    """The one non-constant value the module making ``output`` reads (e.g. a linear's activation)."""
    producer = output.producer()
    module = module_of(producer) if producer is not None else ""
    ins, _ = boundary(module_nodes(graph, module)) if module else ([], [])
    if len(ins) != 1:
        raise FusionRefused(f"module {module or '?'} does not read exactly one activation")
    return ins[0]
