"""ONNX Runtime sessions as every stage opens them: CPU session options, the shared thread pool, loading.

Below the graph passes and the runtime: ``moedge inspect`` loads a graph the way the runners do, and
the runners (``moedge.runtime``) load every graph through ``load_session``, which turns ORT's load
failures into one clear error and checks a bundle graph's inputs and outputs against its manifest.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from moedge._errors import MoedgeError
from moedge.formats.manifest import GraphSpec


def session_options(
    *, intra_op_threads: int | None = None, optimize: bool = True, spinning: bool = True, quiet: bool = False
) -> ort.SessionOptions:
    """Options for CPU sessions: thread count, graph optimizations, and whether idle pools spin.

    ``optimize=False`` runs the graph op for op (ORT's fusions change float rounding). Turn
    ``spinning`` off when many sessions share the cores: idle spinning pools steal them from the one
    session running. ``quiet`` keeps ORT's own warnings out of the log.
    """
    options = ort.SessionOptions()
    if quiet:
        options.log_severity_level = 3
    if intra_op_threads:
        options.intra_op_num_threads = intra_op_threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


_SHARED_POOL: list[bool] = []  # set once per process


def shared_thread_pool(threads: int | None) -> bool:
    """Create ONNX Runtime's process-wide intra-op thread pool (once); True when sessions can share it.

    A bundle has hundreds of sessions: one pool shared by all of them can spin between ops (the fast
    path for a decode step's many small ops) without idle pools stealing the cores, which per-session
    pools do (measured by ``benchmarks/bundle_speed.py --parts spinning``). The first caller in a
    process sizes the pool (``threads``; None: ORT's default, the physical cores).
    """
    if not _SHARED_POOL:
        try:
            ort.set_global_thread_pool_sizes(int(threads or 0), 1)
            _SHARED_POOL.append(True)
        except Exception as exc:  # ORT raises its own Fail type
            _SHARED_POOL.append("already been created" in str(exc))
    return _SHARED_POOL[0]


_SHARED_ALLOCATOR: list[bool] = []  # set once per process


def shared_cpu_allocator() -> bool:
    """Register one CPU arena allocator with ONNX Runtime's environment (once); True when sessions can
    use it (``session.use_env_allocators``).

    Every session otherwise grows its own arena: a bundle's 30-odd stage sessions each kept a
    prompt's worth of activations, and peak memory was several times the weights (measured by
    ``benchmarks/side_by_side.py --parts rss``). One shared arena holds one step's activations.
    """
    if not _SHARED_ALLOCATOR:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        try:
            ort.create_and_register_allocator(info, None)
            _SHARED_ALLOCATOR.append(True)
        except Exception as exc:  # ORT raises its own Fail type
            _SHARED_ALLOCATOR.append("already" in str(exc))
    return _SHARED_ALLOCATOR[0]


def load_session(
    path: Path, options: ort.SessionOptions, providers: Sequence[str], graph: GraphSpec | None = None
) -> ort.InferenceSession:
    """An ORT session for ``path``, or one clear error when ORT cannot load it or (given the manifest's
    ``graph``) when the graph's inputs and outputs are not the ones the manifest lists."""
    if _SHARED_POOL and _SHARED_POOL[0]:
        options.use_per_session_threads = False  # ORT refuses per-session pools once the global one exists
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as exc:  # ORT raises several unrelated types for a bad file
        raise MoedgeError(f"ONNX Runtime cannot load {path}: {' '.join(str(exc).split())}") from None
    if graph is not None:
        for kind, listed, actual in (
            ("inputs", graph.input_names, [i.name for i in session.get_inputs()]),
            ("outputs", graph.output_names, [o.name for o in session.get_outputs()]),
        ):
            if sorted(listed) != sorted(actual):
                raise MoedgeError(
                    f"bundle graph {graph.file} has {kind} {_names(actual)}, the manifest lists {_names(listed)}: "
                    "re-split the bundle with moedge split"
                )
    return session


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
    return f"[{shown}]"
