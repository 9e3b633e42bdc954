"""A readable summary of an exported model: I/O, op census, weights, and the modules the graph keeps."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moedge._errors import MoedgeError
from moedge.module_names import MODULE_KEY, experts_per_layer


@dataclass
class GraphSummary:
    """What ``moedge inspect`` prints."""

    path: Path
    opset: int
    inputs: list[tuple[str, str, list[Any]]]
    outputs: list[tuple[str, str, list[Any]]]
    num_nodes: int
    op_census: dict[str, int]
    weight_bytes: int
    file_bytes: dict[str, int]
    experts_per_layer: dict[int, int] = field(default_factory=dict)
    nodes_with_module: int = 0

    def lines(self) -> list[str]:
        """The summary as terminal lines."""
        out = [
            f"{self.path}  (opset {self.opset}, {self.num_nodes} nodes, weights {self.weight_bytes / 2**20:.1f} MiB)"
        ]
        for label, items in (("input ", self.inputs), ("output", self.outputs)):
            shown = items if len(items) <= 8 else [*items[:6], ("...", "", [f"{len(items) - 6} more"])]
            out += [f"  {label} {name} {dtype} {shape}" for name, dtype, shape in shown]
        census = ", ".join(f"{op} {n}" for op, n in sorted(self.op_census.items(), key=lambda kv: -kv[1]))
        out.append(f"  ops: {census}")
        out.append(f"  nodes tagged with their module: {self.nodes_with_module}/{self.num_nodes}")
        if self.experts_per_layer:
            counts = sorted(set(self.experts_per_layer.values()))
            out.append(f"  MoE: {len(self.experts_per_layer)} layers, experts per layer {counts}")
        out += [f"  file {name}: {size / 2**20:.1f} MiB" for name, size in sorted(self.file_bytes.items())]
        return out


def inspect_model(path: str | Path) -> GraphSummary:
    """Summarize ``model.onnx`` (or the folder holding it) without loading its weights."""
    try:
        import onnx
    except ImportError:
        raise MoedgeError("inspect needs onnx: pip install 'moedge[export]'") from None
    path = Path(path)
    model_file = path / "model.onnx" if path.is_dir() else path
    if not model_file.is_file():
        raise MoedgeError(f"{model_file} does not exist: give an exported folder or an .onnx file")
    try:
        model = onnx.load(str(model_file), load_external_data=False)
    except Exception as exc:
        raise MoedgeError(f"{model_file} is not a readable ONNX model ({exc})") from None

    def describe(values: Any) -> list[tuple[str, str, list[Any]]]:
        rows = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            rows.append((v.name, onnx.TensorProto.DataType.Name(t.elem_type).lower(), dims))
        return rows

    census = collections.Counter(n.op_type for n in model.graph.node)
    modules = [p.value for node in model.graph.node for p in node.metadata_props if p.key == MODULE_KEY]
    weight_bytes = 0
    for init in model.graph.initializer:
        size = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        count = 1
        for d in init.dims:
            count *= d
        weight_bytes += size * count
    folder = model_file.parent
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()} if path.is_dir() else {}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return GraphSummary(
        path=model_file,
        opset=opset,
        inputs=describe(model.graph.input),
        outputs=describe(model.graph.output),
        num_nodes=len(model.graph.node),
        op_census=dict(census),
        weight_bytes=weight_bytes,
        file_bytes=files,
        experts_per_layer=experts_per_layer(modules),
        nodes_with_module=len(modules),
    )
