"""ONNX Runtime on a CUDA GPU (onnxruntime-gpu): weights live on the device, inputs and outputs go through IO binding.

ONNX Runtime's Python session falls back to the CPU when the CUDA provider cannot start (a missing CUDA or
cuDNN library, no device): it prints an "EP Error" and carries on with CPUExecutionProvider alone. Every
session here is therefore checked after creation: CUDAExecutionProvider must be the first provider the
session runs with, and (where ORT reports node placement, 1.24 and later) it must have been assigned
nodes of the graph. Nodes the CUDA provider has no kernel for still run on the CPU, as ORT partitions
them; ``OrtCudaBackend.placements()`` says how many went where.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort

from moedge._errors import MoedgeError
from moedge.formats.manifest import GraphSpec
from moedge.ort_sessions import load_session, session_options
from moedge.runtime.backends.base import Backend, Runner, cuda_free_memory

CUDA_PROVIDER = "CUDAExecutionProvider"
# A session option (ORT >= 1.24) that makes get_provider_graph_assignment_info() answer.
RECORD_PLACEMENT = "session.record_ep_graph_assignment_info"

_CHECK = (
    "check that nvidia-smi sees the GPU, that onnxruntime-gpu (not onnxruntime) is installed, and that the "
    "CUDA and cuDNN libraries it was built for load (pip install 'onnxruntime-gpu[cuda,cudnn]', or the "
    "system CUDA toolkit on LD_LIBRARY_PATH); ONNX Runtime's own warning above says why"
)


def preload_cuda_libraries() -> None:
    """Let onnxruntime-gpu (1.21 and later) load the CUDA and cuDNN libraries of PyTorch or of the nvidia-*
    pip packages, which the dynamic loader may not find on its own (then the CUDA provider cannot start).
    Best effort: what still fails shows up as check_cuda_session's error."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception:  # missing libraries: check_cuda_session reports the fallback
            pass


def node_placement(session: ort.InferenceSession) -> dict[str, int] | None:
    """Nodes per execution provider as ORT assigned them; None when this ORT cannot say (before 1.24, or
    a session created without ``session.record_ep_graph_assignment_info``)."""
    info = getattr(session, "get_provider_graph_assignment_info", None)
    if info is None:
        return None
    try:
        subgraphs = info()
    except Exception:  # ORT raises its own Fail type when recording was off
        return None
    counts: Counter[str] = Counter()
    for subgraph in subgraphs:
        counts[str(subgraph.ep_name)] += len(subgraph.get_nodes())
    return dict(counts)


def check_cuda_session(session: ort.InferenceSession, graph_file: str) -> dict[str, int] | None:
    """One clear error unless ``session`` really runs on the CUDA provider; returns its node placement."""
    providers = list(session.get_providers())
    if not providers or providers[0] != CUDA_PROVIDER:
        raise MoedgeError(
            f"{graph_file}: ONNX Runtime {ort.__version__} started this graph on {', '.join(providers) or 'no provider'} "
            f"instead of {CUDA_PROVIDER} (it falls back to the CPU when CUDA cannot start): {_CHECK}"
        )
    placement = node_placement(session)
    if placement is not None and sum(placement.values()) > 0 and placement.get(CUDA_PROVIDER, 0) == 0:
        where = ", ".join(f"{ep}: {n}" for ep, n in sorted(placement.items()))
        raise MoedgeError(
            f"{graph_file}: ONNX Runtime assigned none of its {sum(placement.values())} nodes to {CUDA_PROVIDER} "
            f"({where}): the GPU would do nothing for this graph; {_CHECK}"
        )
    return placement


class OrtCudaRunner(Runner):
    """A graph as an ORT session on the CUDA execution provider; activation uploads its weights."""

    def __init__(self, path: Path, graph: GraphSpec, options: ort.SessionOptions, device_id: int) -> None:
        super().__init__(path, graph)
        self.options = options
        self.device_id = device_id
        self.session: ort.InferenceSession | None = None
        self.checked = False  # a session of this graph passed check_cuda_session
        self.placement: dict[str, int] | None = None  # its nodes per provider (None: this ORT cannot say)
        self.runs = 0  # infer() calls that ran on a checked CUDA session

    def activate(self) -> None:
        """Create the session (ORT copies the initializers to the device) and check it runs on CUDA."""
        if self.session is None:
            providers: list[str | tuple[str, dict[str, object]]] = [
                (CUDA_PROVIDER, {"device_id": self.device_id}),
                "CPUExecutionProvider",
            ]
            session = load_session(self.path, self.options, providers, self.graph)  # type: ignore[arg-type]
            session.disable_fallback()  # an EP failure in run() raises instead of retrying on the CPU
            self.placement = check_cuda_session(session, self.graph.file)
            self.session = session
            self.checked = True
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
        self.runs += 1
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
        preload_cuda_libraries()
        self.device_id = device_id
        self.options = session_options(intra_op_threads=intra_op_threads, spinning=False, quiet=True)
        self.options.add_session_config_entry(RECORD_PLACEMENT, "1")

    def _make_runner(self, folder: Path, graph: GraphSpec) -> Runner:
        return OrtCudaRunner(folder / graph.file, graph, self.options, self.device_id)

    def placements(self) -> dict[str, dict[str, int] | None]:
        """Graph file -> nodes per provider (None: this ORT cannot say), for every graph whose session
        passed the CUDA check so far."""
        return {
            f: r.placement for f, r in self._runners.items() if isinstance(r, OrtCudaRunner) and r.checked
        }

    def runs(self) -> dict[str, int]:
        """Graph file -> how many times it ran on a CUDA session."""
        return {f: r.runs for f, r in self._runners.items() if isinstance(r, OrtCudaRunner) and r.runs}

    def free_memory(self) -> int | None:
        """Free device memory from the CUDA runtime."""
        return cuda_free_memory()
