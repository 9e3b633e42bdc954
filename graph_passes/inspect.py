"""A readable summary of an exported model: I/O, op census, weights, and the modules the graph keeps."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moedge._errors import MoedgeError
from moedge.formats.external_data import check_external_data
from moedge.formats.graph_names import MODULE_KEY, experts_per_layer


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
    if model_file.stat().st_size >= 2**31:
        raise MoedgeError(f"{model_file} is over 2 GiB, the protobuf limit: not a readable ONNX model")
    check_external_data(model_file)
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


_WEIGHTED = ("MatMul", "Gemm")
# Kernels ONNX Runtime's CPU provider runs int8 arithmetic in (after its QDQ fusions).
INT8_KERNELS = frozenset(
    {"QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "QAttention"}
)


def qdq_coverage(model: Any) -> dict[str, int]:
    """Weighted ops (MatMul/Gemm) whose weight comes through a DequantizeLinear, and those left float."""
    producers = {out: node for node in model.graph.node for out in node.output}
    inits = {i.name for i in model.graph.initializer}
    quantized = float_weighted = activations = 0
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            activations += 1
        if node.op_type not in _WEIGHTED or len(node.input) < 2:
            continue
        source = producers.get(node.input[1])
        if source is not None and source.op_type == "DequantizeLinear":
            quantized += 1
        elif node.input[1] in inits or (
            source is not None and source.op_type == "Transpose" and source.input[0] in inits
        ):  # a weight, possibly transposed; attention's K^T is an activation
            float_weighted += 1
    return {
        "quantized_matmuls": quantized,
        "float_matmuls": float_weighted,
        "activation_quantizers": activations,
    }


def ort_census(model_file: Path) -> dict[str, int]:
    """Op census of ``model_file`` after ONNX Runtime's CPU graph optimizations (the kernels it will run)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    from moedge.ort_sessions import load_session

    with tempfile.TemporaryDirectory(prefix="moedge-inspect-") as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "optimized.onnx.data"
        )
        load_session(Path(model_file), options, ["CPUExecutionProvider"])
        optimized = onnx.load(str(Path(tmp) / "optimized.onnx"), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in optimized.graph.node))


def _census_lines(model_file: Path, *, ort_too: bool, indent: str = "  ") -> list[str]:
    import onnx

    model = onnx.load(str(model_file), load_external_data=False)
    cov = qdq_coverage(model)
    lines = [
        f"{indent}Q/DQ: {cov['quantized_matmuls']} int8-weight MatMuls, {cov['float_matmuls']} float weighted ops, "
        f"{cov['activation_quantizers']} activation quantizers"
    ]
    if ort_too:
        census = ort_census(model_file)
        int8 = {op: n for op, n in census.items() if op in INT8_KERNELS}
        floats = {op: n for op, n in census.items() if op in ("MatMul", "Gemm", "FusedMatMul")}
        lines.append(
            f"{indent}after ORT optimization: int8 kernels {int8 or 'none'}, float matmuls {floats or 'none'}"
        )
    lines += _lint_lines(model_file, indent)
    return lines


def _lint_lines(model_file: Path, indent: str) -> list[str]:
    import onnx_ir as ir

    from moedge.graph_passes.check_tensorrt import check_tensorrt_ready

    findings = check_tensorrt_ready(ir.load(str(model_file)))  # lazily mapped external weights
    errors = [f for f in findings if f.severity == "error"]
    warnings = [f for f in findings if f.severity != "error"]
    lines = [f"{indent}TensorRT lint: {len(errors)} errors, {len(warnings)} warnings"]
    shown = collections.Counter(f"{f.severity}: {f.op_type}: {f.message}" for f in findings)
    lines += [f"{indent}  {text}" + (f" (x{n})" if n > 1 else "") for text, n in list(shown.items())[:8]]
    return lines


def inspect_bundle(folder: Path, *, ort_census_too: bool = True) -> list[str]:
    """Summary lines of a bundle: model, graphs, gating, sizes, and a census of one stage and one expert."""
    from moedge.formats.manifest import read_manifest

    manifest = read_manifest(folder, verify=True)  # every file it reads is listed, sized and hashed
    model = manifest.model
    moe = [layer for layer in manifest.layers if layer.moe is not None]
    expert_sizes = [g.bytes for layer in moe if layer.moe for g in layer.moe.experts]
    in_graph = sum(layer.moe.num_experts for layer in moe if layer.moe and layer.moe.experts_in_graph)
    stage_bytes = (
        sum(run.stage.bytes for run in manifest.stage_runs()) + manifest.embedding.bytes + manifest.head.bytes
    )
    lines = [
        f"{folder}  (bundle schema {manifest.schema_version}, {model.get('name')}, {model.get('architecture')}, "
        f"precision {manifest.precision})",
        f"  graphs: embedding, {len(manifest.stage_runs())} stages for {len(manifest.layers)} layers, "
        f"{len(expert_sizes)} experts in {len(moe)} MoE layers"
        + (f" ({in_graph} experts inside the stage graphs)" if in_graph else "")
        + ", head",
        f"  stages {stage_bytes / 2**20:.1f} MiB; experts {sum(expert_sizes) / 2**20:.1f} MiB"
        + (
            f" ({min(expert_sizes) / 2**10:.0f}-{max(expert_sizes) / 2**10:.0f} KiB each)"
            if expert_sizes
            else ""
        ),
    ]
    rules = collections.Counter(str(layer.moe.gating) for layer in moe if layer.moe)
    lines += [f"  gating ({n} layers): {rule}" for rule, n in rules.items()]
    if manifest.quantization:
        q = manifest.quantization
        lines.append(
            f"  quantization: {q.get('method')} recipe, {q.get('quantized_linears')} linears W8A8; "
            f"float: {', '.join(q.get('float_linears', [])[:4])}{' ...' if len(q.get('float_linears', [])) > 4 else ''}"
        )
    samples = [("layer 0 stage", manifest.stage_runs()[0].stage)]
    if moe and moe[0].moe and moe[0].moe.experts:
        samples.append((f"layer {moe[0].index} expert 0", moe[0].moe.experts[0]))
    for label, graph in samples:
        lines.append(f"  {label} ({graph.file}): in {graph.input_names} -> out {graph.output_names}")
        lines += _census_lines(folder / graph.file, ort_too=ort_census_too, indent="    ")
    return lines


def inspect_path(path: str | Path, *, ort_census: bool = True) -> list[str]:
    """What ``moedge inspect`` prints for an exported folder, an .onnx file or a bundle."""
    from moedge.formats.manifest import MANIFEST_FILE

    path = Path(path)
    if path.is_dir() and (path / MANIFEST_FILE).is_file():
        return inspect_bundle(path, ort_census_too=ort_census)
    summary = inspect_model(path)
    return summary.lines() + _census_lines(summary.path, ort_too=ort_census)
