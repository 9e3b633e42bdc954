"""ONNX Runtime on a CUDA GPU (onnxruntime-gpu): weights live on the device, inputs and outputs go through IO binding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from moedge._errors import MoedgeError
from moedge.manifest import GraphSpec
from moedge.runtime.backends.base import Backend, Runner, cuda_free_memory
from moedge.runtime.ort_session import load_session, session_options

CUDA_PROVIDER = "CUDAExecutionProvider"


class OrtCudaRunner(Runner):
    """A graph as an ORT session on the CUDA execution provider; activation uploads its weights."""

    def __init__(self, path: Path, graph: GraphSpec, options: ort.SessionOptions, device_id: int) -> None:
        super().__init__(path, graph)
        self.options = options
        self.device_id = device_id
        self.session: ort.InferenceSession | None = None

    def activate(self) -> None:
        """Create the session; ORT copies the initializers to the device."""
        if self.session is None:
            providers: list[str | tuple[str, dict[str, object]]] = [
                (CUDA_PROVIDER, {"device_id": self.device_id}),
                "CPUExecutionProvider",
            ]
            self.session = load_session(self.path, self.options, providers, self.graph)  # type: ignore[arg-type]
        self.active = True

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Bind host inputs, run on the device, copy outputs back."""
        if self.session is None:
            self.activate()
        assert self.session is not None
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self.graph.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        outs = binding.copy_outputs_to_cpu()
        return dict(zip(self.graph.output_names, outs, strict=True))

    def release(self) -> None:
        """Drop the session and its device memory."""
        self.session = None
        self.active = False


class OrtCudaBackend(Backend):
    """Graphs on a CUDA GPU through onnxruntime-gpu."""

    name = "ort-cuda"
    device = "gpu"

    def __init__(self, *, device_id: int = 0, intra_op_threads: int | None = None) -> None:
        super().__init__()
        available = ort.get_available_providers()
        if CUDA_PROVIDER not in available:
            raise MoedgeError(
                f"the ort-cuda backend needs onnxruntime-gpu with CUDA; this ONNX Runtime has {', '.join(available)}: "
                "pip uninstall onnxruntime && pip install onnxruntime-gpu (both install the same module)"
            )
        self.device_id = device_id
        self.options = session_options(intra_op_threads=intra_op_threads, spinning=False, quiet=True)

    def _make_runner(self, folder: Path, graph: GraphSpec) -> Runner:
        return OrtCudaRunner(folder / graph.file, graph, self.options, self.device_id)

    def free_memory(self) -> int | None:
        """Free device memory from the CUDA runtime."""
        return cuda_free_memory()
