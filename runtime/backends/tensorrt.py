"""TensorRT: one engine per bundle graph (built by ``moedge build``), run through polygraphy's TrtRunner.

Engines live outside the bundle (whose files its manifest lists by sha256): by default in
``<bundle>.engines/`` beside it (``default_engine_dir``), where both ``moedge build`` and the backend
look. Engines are strongly typed explicit-INT8 builds of the bundle's QDQ graphs with one optimization
profile over token counts (``moedge.runtime.tensorrt_build``); a timing cache on disk makes rebuilds
on the same device fast. ``tensorrt`` and ``polygraphy`` are imported only when the backend starts.

What proves an engine ran: polygraphy's ``TrtRunner.infer`` returns only after TensorRT's
``execute_async_v3`` returned success and the stream synchronized, and the outputs it returns are copied
from the device buffers TensorRT wrote (its output allocator); any failure raises. Each runner counts
those calls (``TensorRtBackend.executions()``): there is no CPU fallback on this path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from moedge._errors import MoedgeError
from moedge.formats.manifest import GraphSpec, Manifest, read_manifest
from moedge.paths import refuse_inside_bundle, write_text_atomic
from moedge.runtime.backends.base import Backend, Runner, cuda_free_memory
from moedge.runtime.tensorrt_build import ShapeRange, build_engine

log = logging.getLogger(__name__)

ENGINE_SUFFIX = ".engines"


def default_engine_dir(bundle: str | Path) -> Path:
    """Where a bundle's engines go unless told otherwise: ``<bundle>.engines/`` beside the bundle."""
    folder = Path(bundle).expanduser().resolve()
    return folder.with_name(folder.name + ENGINE_SUFFIX)


ENGINE_INDEX = "engines.json"
"""In the engine folder: the fingerprint of the bundle graphs the engines were built from, and the build settings."""


def graphs_fingerprint(manifest: Manifest) -> str:
    """sha256 over the sha256 of every graph and weight file the manifest lists (not routing or tokenizer)."""
    graphs = sorted(
        (f, str(e["sha256"])) for f, e in manifest.files.items() if f.endswith((".onnx", ".data"))
    )
    return hashlib.sha256(json.dumps(graphs).encode()).hexdigest()


def read_engine_index(engine_dir: Path) -> dict[str, Any]:
    """The engine folder's ``engines.json`` (empty when missing or unreadable)."""
    try:
        index = json.loads((engine_dir / ENGINE_INDEX).read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def engine_path(engine_dir: Path, graph: GraphSpec) -> Path:
    """Where the engine of one bundle graph lives."""
    return engine_dir / Path(graph.file).with_suffix(".engine")


def _require_tensorrt() -> Any:
    try:
        import tensorrt as trt
        from polygraphy.backend.trt import TrtRunner  # noqa: F401
    except ImportError as exc:
        raise MoedgeError(
            f"the tensorrt backend needs TensorRT and polygraphy ({exc.name} is missing): "
            "pip install 'moedge[trt]' (on Jetson, JetPack's python3-libnvinfer and pip install polygraphy)"
        ) from None
    if not hasattr(trt, "Builder"):  # only the type stubs are installed
        raise MoedgeError("the tensorrt backend needs TensorRT: only its type stubs are installed")
    return trt


class TensorRtRunner(Runner):
    """A deserialized engine and its execution context, created on activation."""

    def __init__(self, folder: Path, graph: GraphSpec, engine_dir: Path, *, stale: bool = False) -> None:
        super().__init__(engine_path(engine_dir, graph), graph)
        self._runner: Any = None
        self._stale = stale
        self.executions = 0  # completed TensorRT executions of this engine

    def activate(self) -> None:
        """Deserialize the engine onto the device."""
        if self._runner is None:
            if not self.path.is_file():
                raise MoedgeError(
                    f"no TensorRT engine for {self.graph.file} at {self.path}: run `moedge build BUNDLE` "
                    "(it writes BUNDLE.engines/ beside the bundle)"
                )
            if self._stale:
                raise MoedgeError(
                    f"the TensorRT engine {self.path} was not built from this bundle's {self.graph.file} "
                    "(see engines.json): run `moedge build BUNDLE` again"
                )
            from polygraphy.backend.common import BytesFromPath
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner

            self._runner = TrtRunner(EngineFromBytes(BytesFromPath(str(self.path))))
            self._runner.activate()
        self.active = True

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the engine on host arrays."""
        if self._runner is None:
            self.activate()
        outs = self._runner.infer(feed_dict=feeds, copy_outputs_to_host=True)  # raises unless TensorRT ran
        self.executions += 1
        return {name: np.asarray(outs[name]) for name in self.graph.output_names}

    def release(self) -> None:
        """Destroy the context and engine."""
        if self._runner is not None:
            self._runner.deactivate()
            self._runner = None
        self.active = False


class TensorRtBackend(Backend):
    """Graphs as TensorRT engines on the GPU, read from ``engine_dir`` (default: ``<bundle>.engines/``)."""

    name = "tensorrt"
    device = "gpu"

    def __init__(self, *, engine_dir: str | Path | None = None, **_: object) -> None:
        super().__init__()
        _require_tensorrt()
        self.engine_dir = None if engine_dir is None else Path(engine_dir)
        self._current: dict[Path, set[str] | None] = {}

    def _current_engines(self, folder: Path, engine_dir: Path) -> set[str] | None:
        """Graphs whose engines ``engines.json`` records as built from this bundle; None: no index (trusted)."""
        if folder not in self._current:
            index = read_engine_index(engine_dir)
            if not index:
                self._current[folder] = None
            elif index.get("graphs") != graphs_fingerprint(read_manifest(folder)):
                self._current[folder] = set()
            else:
                self._current[folder] = {str(f) for f in index.get("built", [])}
        return self._current[folder]

    def _make_runner(self, folder: Path, graph: GraphSpec) -> Runner:
        engine_dir = self.engine_dir or default_engine_dir(folder)
        current = self._current_engines(folder, engine_dir)
        return TensorRtRunner(
            folder, graph, engine_dir, stale=current is not None and graph.file not in current
        )

    def executions(self) -> dict[str, int]:
        """Graph file -> how many times its engine ran (TensorRT execute calls that completed)."""
        return {
            f: r.executions
            for f, r in self._runners.items()
            if isinstance(r, TensorRtRunner) and r.executions
        }

    def free_memory(self) -> int | None:
        """Free device memory from the CUDA runtime."""
        return cuda_free_memory()


def shape_ranges(graph: GraphSpec, *, max_tokens: int, context: int) -> dict[str, ShapeRange]:
    """(min, opt, max) shapes for a graph's dynamic inputs: one sequence, decode-optimal, up to ``max_tokens``.

    The opt shapes agree with each other (a decode step of one token after ``context // 2``: total
    ``context // 2 + 1``), so TensorRT tunes for shapes that can occur together. A dim written as a sum
    or product of named dims (``past_sequence + sequence``, ``batch*sequence``) gets the sum or product
    of their ranges; any other unknown name gets (1, 1, max_tokens).
    """
    half = context // 2
    ranges = {
        "batch": (1, 1, 1),
        "sequence": (1, 1, max_tokens),
        "past_sequence": (0, half, context),
        "total_sequence": (1, min(half + 1, context), context),
    }
    out: dict[str, ShapeRange] = {}
    for spec in graph.inputs:
        if all(isinstance(d, int) for d in spec.shape):
            continue
        low, opt, high = [], [], []
        for d in spec.shape:
            lo, op, hi = (d, d, d) if isinstance(d, int) else _dim_range(str(d), ranges, max_tokens)
            low.append(lo)
            opt.append(op)
            high.append(hi)
        out[spec.name] = (tuple(low), tuple(opt), tuple(high))
    return out


def _dim_range(dim: str, ranges: dict[str, tuple[int, int, int]], max_tokens: int) -> tuple[int, int, int]:
    """(min, opt, max) of a named dim, or of a sum of products of named dims and integers."""
    if dim in ranges:
        return ranges[dim]
    total = [0, 0, 0]
    for term in dim.split("+"):
        product = [1, 1, 1]
        for factor in term.split("*"):
            factor = factor.strip()
            if factor.isdigit():
                values: tuple[int, int, int] = (int(factor),) * 3
            elif factor in ranges:
                values = ranges[factor]
            else:
                return (1, 1, max_tokens)
            product = [p * v for p, v in zip(product, values, strict=True)]
        total = [t + p for t, p in zip(total, product, strict=True)]
    return (total[0], total[1], total[2])


def build_bundle_engines(
    bundle: str | Path,
    *,
    engine_dir: str | Path | None = None,
    max_tokens: int = 512,
    context: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Build (or reuse) an engine for every graph of a bundle; returns the engine files.

    Engines go to ``engine_dir`` (default: ``<bundle>.engines/`` beside the bundle), which must not be
    inside a bundle; each engine file is written atomically. Existing engines are reused only when
    ``engines.json`` records the same graphs (``graphs_fingerprint``) and settings; the index is
    rewritten after every engine built.
    """
    from tqdm import tqdm

    folder = Path(bundle)
    out_dir = Path(engine_dir).expanduser() if engine_dir is not None else default_engine_dir(folder)
    refuse_inside_bundle(out_dir, flag="--engines")
    _require_tensorrt()
    manifest: Manifest = read_manifest(folder, verify=True)
    context = context or int(manifest.model.get("max_position_embeddings") or 2048)
    cache = out_dir / "timing.cache"
    # shape_rules: the version of shape_ranges' rules (2: expression dims, consistent opt shapes)
    wanted = {
        "graphs": graphs_fingerprint(manifest),
        "max_tokens": max_tokens,
        "context": context,
        "shape_rules": 2,
    }
    index = read_engine_index(out_dir)
    done: set[str] = (
        set(index.get("built", [])) if all(index.get(k) == v for k, v in wanted.items()) else set()
    )
    built: list[Path] = []
    start = time.perf_counter()
    for graph in tqdm(manifest.graphs(), desc="building engines", unit="engine", disable=not progress):
        target = engine_path(out_dir, graph)
        if graph.file not in done or not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            build_engine(
                folder / graph.file,
                target,
                profiles=shape_ranges(graph, max_tokens=max_tokens, context=context),
                timing_cache=cache,
            )
            done.add(graph.file)
            write_text_atomic(out_dir / ENGINE_INDEX, json.dumps({**wanted, "built": sorted(done)}, indent=1))
        built.append(target)
    log.info("%d engines in %s (%.1f s)", len(built), out_dir, time.perf_counter() - start)
    return built
