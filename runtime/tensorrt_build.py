"""Build a serialized TensorRT 10 engine from a QDQ ONNX file (explicit quantization, strongly typed).

The network is created STRONGLY_TYPED: every int8 tensor comes from the graph's
QuantizeLinear/DequantizeLinear nodes, so there is no calibrator and no INT8/FP16 builder flag (TensorRT
rejects precision flags on strongly typed networks). ``tensorrt`` is imported only inside the functions
here; run ``moedge.graph_passes.check_tensorrt`` first for readable diagnostics.

Whether the quantized layers really run in INT8 is up to TensorRT's fusions (a DequantizeLinear it
cannot fuse into the MatMul leaves that MatMul in FP32). An engine built with ``detailed=True`` records
its layers with their tensor formats; :func:`engine_layers` reads them back through TensorRT's engine
inspector and :func:`int8_compute_layers` names the MatMul/GEMM/convolution layers that take INT8 data.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moedge._errors import MoedgeError
from moedge.paths import atomic_file

if TYPE_CHECKING:
    import tensorrt as trt
    from typing_extensions import Buffer

log = logging.getLogger(__name__)

__all__ = ["ShapeRange", "build_engine", "engine_layers", "int8_compute_layers"]

ShapeRange = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
"""(min, opt, max) shapes of one dynamic input, for the engine's optimization profile."""

_INSTALL = (
    "TensorRT's Python package is not installed: pip install 'moedge[trt]' "
    "(on Jetson, install JetPack's python3-libnvinfer instead)"
)


def build_engine(
    onnx_file: Path,
    engine_file: Path,
    *,
    profiles: dict[str, ShapeRange],
    timing_cache: Path | None = None,
    workspace_bytes: int | None = None,
    detailed: bool = False,
) -> Path:
    """Parse ``onnx_file`` and write a serialized engine to ``engine_file``; returns ``engine_file``.

    ``profiles`` gives (min, opt, max) shapes for every input with dynamic dims (one optimization
    profile; ``moedge.graph_passes.check_tensorrt.profile_inputs`` lists them). ``timing_cache`` is
    loaded when the file exists and saved after the build, so rebuilds on the same device are fast.
    ``workspace_bytes`` caps the builder's workspace memory pool. ``detailed`` builds with
    ``ProfilingVerbosity.DETAILED``: the engine then records every layer's type, tensor formats and tactic
    for :func:`engine_layers` (a slightly larger file; the kernels are the same). External weights next
    to the model are found because the parser reads the file itself.
    """
    _check_tensorrt()
    import tensorrt as trt

    onnx_file, engine_file = Path(onnx_file), Path(engine_file)
    if not onnx_file.is_file():
        raise MoedgeError(f"{onnx_file} does not exist: export the model to ONNX first")
    builder_errors: list[str] = []
    logger = _logger(builder_errors)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    _parse(network, logger, onnx_file)
    config = builder.create_builder_config()
    if detailed:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    _add_profile(builder, network, config, profiles)
    _load_timing_cache(config, timing_cache)

    log.info("building the TensorRT engine (minutes on a Jetson)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:  # the bindings return None when the build fails
        detail = "\n".join(f"  {m}" for m in builder_errors) or "  (no message; see the log)"
        raise MoedgeError(f"TensorRT could not build an engine from {onnx_file}:\n{detail}")
    if timing_cache is not None:
        _write_atomically(timing_cache, config.get_timing_cache().serialize())
    _write_atomically(engine_file, serialized)
    log.info("wrote %s", engine_file)
    return engine_file


def _check_tensorrt() -> None:
    """One error naming the install command when TensorRT itself is not installed."""
    try:
        import tensorrt as trt
    except ImportError:
        raise MoedgeError(_INSTALL) from None
    if not hasattr(trt, "Builder"):  # only the type stubs (an empty namespace package) are installed
        raise MoedgeError(_INSTALL)


def _logger(builder_errors: list[str]) -> trt.ILogger:
    """A TensorRT logger that routes messages to Python logging and keeps the errors."""
    import tensorrt as trt

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                builder_errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return _Logger()


def _parse(network: trt.INetworkDefinition, logger: trt.ILogger, onnx_file: Path) -> None:
    """Parse ``onnx_file`` into ``network``, or one error listing the parser's findings."""
    import tensorrt as trt

    parser = trt.OnnxParser(network, logger)
    log.info("parsing %s", onnx_file)
    if not parser.parse_from_file(str(onnx_file)):
        lines = []
        for i in range(parser.num_errors):
            error = parser.get_error(i)
            where = f"node {error.node()} ({error.node_operator()} {error.node_name()!r})"
            lines.append(f"  {where if error.node() >= 0 else 'graph'}: {error.desc()}")
        raise MoedgeError(f"TensorRT cannot parse {onnx_file} ({len(lines)} errors):\n" + "\n".join(lines))


def _add_profile(
    builder: trt.Builder,
    network: trt.INetworkDefinition,
    config: trt.IBuilderConfig,
    profiles: dict[str, ShapeRange],
) -> None:
    """One optimization profile with the (min, opt, max) shapes of every dynamic input."""
    import tensorrt as trt

    inputs: dict[str, tuple[int, ...]] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        inputs[tensor.name] = tuple(tensor.shape[d] for d in range(len(tensor.shape)))
    _check_profiles(inputs, profiles)
    if profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profiles.items():
            profile.set_shape(name, trt.Dims(list(low)), trt.Dims(list(opt)), trt.Dims(list(high)))
        config.add_optimization_profile(profile)


def _load_timing_cache(config: trt.IBuilderConfig, timing_cache: Path | None) -> None:
    """Start from the timing cache on disk when it fits this device and TensorRT, else a new one."""
    cache_data = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning(
            "timing cache %s was made for another device or TensorRT; starting a new one", timing_cache
        )
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def engine_layers(engine_file: Path) -> list[dict[str, Any]]:
    """The layers of a serialized engine as TensorRT's engine inspector reports them (its JSON format).

    Engines built with ``build_engine(..., detailed=True)`` give each layer's ``Name``, ``LayerType``,
    ``Inputs``/``Outputs`` (with ``Format/Datatype``), ``Metadata`` (the ONNX nodes it came from) and
    ``TacticName``; other engines give names only (returned as ``{"Name": ...}``). Needs a GPU: the
    engine is deserialized.
    """
    try:
        import tensorrt as trt
    except ImportError:
        raise MoedgeError(_INSTALL) from None
    if not hasattr(trt, "Builder"):  # only the type stubs (an empty namespace package) are installed
        raise MoedgeError(_INSTALL)
    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(Path(engine_file).read_bytes())
    if engine is None:
        raise MoedgeError(
            f"TensorRT cannot deserialize {engine_file}: it was built by another TensorRT or for another GPU"
        )
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    layers = info.get("Layers", []) if isinstance(info, dict) else []
    return [layer if isinstance(layer, dict) else {"Name": str(layer)} for layer in layers]


_PRODUCT_WORDS = ("matmul", "matrixmultiply", "matrix_multiply", "gemm", "convolution")


def int8_compute_layers(layers: list[dict[str, Any]]) -> list[str]:
    """Names of the layers that multiply INT8 data: a MatMul/GEMM/convolution layer (by its type, name,
    ONNX metadata or tactic) with an INT8 input tensor or INT8 weights. A DequantizeLinear left unfused
    takes INT8 too but is not a product layer, so it does not count."""
    names = []
    for layer in layers:
        text = " ".join(
            str(layer.get(k, "")) for k in ("LayerType", "ParameterType", "Name", "Metadata", "TacticName")
        )
        if not any(word in text.lower() for word in _PRODUCT_WORDS):
            continue
        inputs = [t for t in layer.get("Inputs", []) if isinstance(t, dict)]
        weights = layer.get("Weights")
        weight_type = str(weights.get("Type", "")) if isinstance(weights, dict) else ""
        if (
            any("int8" in str(t.get("Format/Datatype", "")).lower() for t in inputs)
            or weight_type.lower() == "int8"
        ):
            names.append(str(layer.get("Name", "")))
    return names


def _check_profiles(inputs: dict[str, tuple[int, ...]], profiles: dict[str, ShapeRange]) -> None:
    """One clear error for missing, unknown or inconsistent optimization-profile shapes."""
    problems = [f"{name} is not a network input" for name in profiles if name not in inputs]
    for name, dims in inputs.items():
        if -1 in dims and name not in profiles:
            problems.append(f"{name} {list(dims)} has dynamic dims but no (min, opt, max) shapes")
        if name not in profiles:
            continue
        low, opt, high = profiles[name]
        if not len(low) == len(opt) == len(high) == len(dims):
            problems.append(f"{name}: min/opt/max must each have rank {len(dims)}")
            continue
        for i, (d, lo, op, hi) in enumerate(zip(dims, low, opt, high, strict=True)):
            if d >= 0 and not lo == op == hi == d:
                problems.append(f"{name}: dim {i} is fixed at {d}, the profile gives {lo}/{op}/{hi}")
            elif not 0 <= lo <= op <= hi:
                problems.append(f"{name}: dim {i} needs 0 <= min <= opt <= max, got {lo}/{op}/{hi}")
    if problems:
        raise MoedgeError("bad optimization profile:\n" + "\n".join(f"  {p}" for p in problems))


def _write_atomically(path: Path, data: Buffer) -> None:
    """Write ``data`` to a temporary sibling of ``path`` and rename it over ``path`` (``atomic_file``)."""
    with atomic_file(path) as tmp, tmp.open("wb") as f:
        f.write(data)
