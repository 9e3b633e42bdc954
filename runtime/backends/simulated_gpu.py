"""A modeled GPU: graphs execute on the CPU (so outputs are exact), device bytes are accounted, and time
comes from a hardware profile. Every time this backend reports is modeled, and labelled so."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from moedge._errors import MoedgeError
from moedge.formats.manifest import GraphSpec
from moedge.runtime.backends.base import Backend, Runner
from moedge.runtime.backends.ort_cpu import OrtCpuBackend
from moedge.runtime.profiles import HardwareProfile, load_profile
from moedge.runtime.static_cache import InPlace


class SimulatedRunner(Runner):
    """Residency bookkeeping around the CPU runner of the same graph."""

    def __init__(self, backend: SimulatedGpuBackend, folder: Path, graph: GraphSpec) -> None:
        super().__init__(folder / graph.file, graph)
        self.backend = backend
        self.cpu = backend.cpu.runner(folder, graph)

    def activate(self) -> None:
        """Account the graph's bytes on the modeled device."""
        if not self.active:
            self.active = True
            self.backend.account(self.nbytes)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Execute on the CPU (bit-identical to the CPU backend)."""
        if not self.active:
            raise MoedgeError(f"{self.graph.file} is not resident on the simulated GPU: activate it first")
        return self.cpu.infer(feeds)

    def infer_in_place(
        self, feeds: dict[str, np.ndarray], in_place: Sequence[InPlace]
    ) -> dict[str, np.ndarray]:
        """Execute on the CPU with its buffers bound in place."""
        if not self.active:
            raise MoedgeError(f"{self.graph.file} is not resident on the simulated GPU: activate it first")
        return self.cpu.infer_in_place(feeds, in_place)

    def release(self) -> None:
        """Give the bytes back."""
        if self.active:
            self.active = False
            self.backend.account(-self.nbytes)


class SimulatedGpuBackend(Backend):
    """A GPU modeled on a hardware profile; shares the CPU backend's sessions for execution."""

    name = "simulated"
    device = "gpu"
    modeled = True

    def __init__(
        self,
        *,
        profile: str | HardwareProfile = "rtx4090-pcie4",
        cpu: OrtCpuBackend | None = None,
    ) -> None:
        super().__init__()
        self.profile = profile if isinstance(profile, HardwareProfile) else load_profile(profile)
        self.cpu = cpu or OrtCpuBackend()
        self.used = 0
        self.peak = 0

    def _make_runner(self, folder: Path, graph: GraphSpec) -> Runner:
        return SimulatedRunner(self, folder, graph)

    def account(self, delta: int) -> None:
        """Add ``delta`` device bytes; over the profile's device memory is an error."""
        self.used += delta
        if self.used > self.profile.device_memory_bytes:
            raise MoedgeError(
                f"the simulated {self.profile.name} is out of memory ({self.used:,} of "
                f"{self.profile.device_memory_bytes:,} bytes): lower --gpu-budget"
            )
        self.peak = max(self.peak, self.used)

    def free_memory(self) -> int | None:
        """The profile's device memory not yet accounted."""
        return self.profile.device_memory_bytes - self.used
