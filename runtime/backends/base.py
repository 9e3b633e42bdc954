"""What every backend provides: lazy per-graph runners with activate / infer / release."""

from __future__ import annotations

import ctypes
import ctypes.util
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moedge.formats.manifest import GraphSpec

if TYPE_CHECKING:
    from moedge.runtime.static_cache import InPlace


class Runner(ABC):
    """One graph on one device. Nothing is loaded until :meth:`activate` (or the first :meth:`infer`)."""

    def __init__(self, path: Path, graph: GraphSpec) -> None:
        self.path = path
        self.graph = graph
        self.active = False

    @property
    def nbytes(self) -> int:
        """Bytes of the graph's weights, as stored."""
        return self.graph.bytes

    @abstractmethod
    def activate(self) -> None:
        """Load the graph and its weights onto the device."""

    @abstractmethod
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph: output name -> host array."""

    @abstractmethod
    def release(self) -> None:
        """Free the device memory the graph holds."""

    def infer_in_place(
        self, feeds: dict[str, np.ndarray], in_place: Sequence[InPlace]
    ) -> dict[str, np.ndarray]:
        """Run the graph with each ``in_place`` buffer as both an input and an output (updated in place,
        as an ort-cpu stage's KV cache is); returns the other outputs. Backends without I/O binding copy
        the output into the buffer."""
        outs = self.infer({**feeds, **{b.input: b.array for b in in_place}})
        for b in in_place:
            np.copyto(b.array, outs.pop(b.output))
        return outs


class Backend(ABC):
    """A device that runs bundle graphs."""

    name: str = ""
    device: str = "cpu"  # "cpu" or "gpu"
    modeled: bool = False  # times reported for this backend come from a profile, not a clock

    def __init__(self) -> None:
        self._runners: dict[str, Runner] = {}

    def runner(self, folder: Path, graph: GraphSpec) -> Runner:
        """The (lazy) runner of one bundle graph, created once per graph."""
        runner = self._runners.get(graph.file)
        if runner is None:
            runner = self._runners[graph.file] = self._make_runner(folder, graph)
        return runner

    @abstractmethod
    def _make_runner(self, folder: Path, graph: GraphSpec) -> Runner: ...

    def free_memory(self) -> int | None:
        """Free device memory in bytes, where the device reports it."""
        return None


def cuda_free_memory() -> int | None:
    """Free CUDA device memory through the CUDA runtime library, without torch; None when there is none."""
    for name in ("cudart", "cudart64_12", "cudart64_110"):
        lib_path = ctypes.util.find_library(name)
        if lib_path is None:
            continue
        try:
            lib = ctypes.CDLL(lib_path)
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            if lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) == 0:
                return int(free.value)
        except OSError:
            continue
    return None


def make_backend(name: str, **kwargs: object) -> Backend:
    """A backend by its CLI name (ort-cpu, simulated, ort-cuda, tensorrt)."""
    from moedge._errors import MoedgeError
    from moedge.runtime.backends.ort_cpu import OrtCpuBackend
    from moedge.runtime.backends.ort_cuda import OrtCudaBackend
    from moedge.runtime.backends.simulated_gpu import SimulatedGpuBackend
    from moedge.runtime.backends.tensorrt import TensorRtBackend

    kinds: dict[str, type[Backend]] = {
        "ort-cpu": OrtCpuBackend,
        "simulated": SimulatedGpuBackend,
        "ort-cuda": OrtCudaBackend,
        "tensorrt": TensorRtBackend,
    }
    if name not in kinds:
        raise MoedgeError(f"unknown backend {name!r}: use one of {', '.join(kinds)}")
    return kinds[name](**kwargs)  # type: ignore[arg-type]
