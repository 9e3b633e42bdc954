"""ONNX Runtime on the CPU: one InferenceSession per graph, created on activation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from moedge.formats.manifest import GraphSpec
from moedge.ort_sessions import load_session, session_options, shared_cpu_allocator, shared_thread_pool
from moedge.runtime.backends.base import Backend, Runner
from moedge.runtime.static_cache import InPlace


class OrtRunner(Runner):
    """A graph as an ORT session with the backend's options and providers."""

    def __init__(
        self, path: Path, graph: GraphSpec, options: ort.SessionOptions, providers: Sequence[str]
    ) -> None:
        super().__init__(path, graph)
        self.options = options
        self.providers = list(providers)
        self.session: ort.InferenceSession | None = None
        # the last in-place binding and the buffers it binds (held, so they stay alive while bound): a
        # decode step reuses it, rebinding only the host inputs and outputs (the KV buffers are the same
        # OrtValues until the cache grows or another cache comes)
        self._binding: tuple[tuple[ort.OrtValue, ...], ort.IOBinding] | None = None

    def activate(self) -> None:
        """Create the session (reads the weights)."""
        if self.session is None:
            self.session = load_session(self.path, self.options, self.providers, self.graph)
        self.active = True

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on host arrays."""
        if self.session is None:
            self.activate()
        assert self.session is not None
        names = self.graph.output_names
        return dict(zip(names, self.session.run(names, feeds), strict=True))

    def infer_in_place(
        self, feeds: dict[str, np.ndarray], in_place: Sequence[InPlace]
    ) -> dict[str, np.ndarray]:
        """Run with I/O binding: each ``in_place`` buffer bound as its input and its output (ONNX Runtime
        writes into it, copying nothing), host arrays for the other inputs and outputs."""
        if self.session is None:
            self.activate()
        assert self.session is not None
        bound = tuple(b.value for b in in_place)
        held = self._binding
        if (
            held is not None
            and len(held[0]) == len(bound)
            and all(a is b for a, b in zip(held[0], bound, strict=True))
        ):
            binding = held[1]
        else:
            binding = self.session.io_binding()
            for b in in_place:
                binding.bind_ortvalue_input(b.input, b.value)
                binding.bind_ortvalue_output(b.output, b.value)
            self._binding = (bound, binding)
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        skip = {b.output for b in in_place}
        names = [n for n in self.graph.output_names if n not in skip]
        for name in names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()[len(in_place) :]
        return {name: value.numpy() for name, value in zip(names, values, strict=True)}

    def release(self) -> None:
        """Drop the session."""
        self.session = None
        self._binding = None
        self.active = False


class OrtCpuBackend(Backend):
    """Graphs on the CPU through ONNX Runtime.

    Each session has its own pool of ``intra_op_threads``, not spinning unless ``spinning``; with
    ``shared_pool`` all sessions share one process-wide pool that may spin (faster decode: see
    ``shared_thread_pool``, which says what that costs the rest of the process).
    """

    name = "ort-cpu"
    device = "cpu"

    def __init__(
        self,
        *,
        intra_op_threads: int | None = None,
        optimize: bool = True,
        spinning: bool = False,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        shared_pool: bool = False,
    ) -> None:
        super().__init__()
        self.shared_pool = shared_pool and shared_thread_pool(intra_op_threads)
        if self.shared_pool:  # one process-wide pool: spinning is safe and fast
            self.options = session_options(optimize=optimize, quiet=True)
            self.options.use_per_session_threads = False
        else:
            # Per-session pools: hundreds of them must not spin, or idle pools steal the cores from the
            # one session running (measured by benchmarks/bundle_speed.py --parts spinning).
            self.options = session_options(
                intra_op_threads=intra_op_threads, optimize=optimize, spinning=spinning, quiet=True
            )
        if shared_cpu_allocator():  # one arena for every session, not one each
            self.options.add_session_config_entry("session.use_env_allocators", "1")
        self.providers = list(providers)

    def _make_runner(self, folder: Path, graph: GraphSpec) -> Runner:
        return OrtRunner(folder / graph.file, graph, self.options, self.providers)
