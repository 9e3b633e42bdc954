"""Backends: each runs bundle graphs on one device through lazy runners (activate, infer, release).

``OrtCpu`` (ONNX Runtime CPU), ``OrtCuda`` (onnxruntime-gpu, IO binding, weights resident on the
device), ``TensorRt`` (engines built by ``moedge build``, run through polygraphy) and ``SimulatedGpu``
(executes on the CPU, accounts device bytes; its times come from a hardware profile and are modeled).
"""

from moedge.runtime.backends.base import Backend, Runner, make_backend
from moedge.runtime.backends.ort_cpu import OrtCpuBackend
from moedge.runtime.backends.ort_cuda import OrtCudaBackend
from moedge.runtime.backends.simulated_gpu import SimulatedGpuBackend
from moedge.runtime.backends.tensorrt import TensorRtBackend

BACKENDS = ("ort-cpu", "simulated", "ort-cuda", "tensorrt")

__all__ = [
    "BACKENDS",
    "Backend",
    "OrtCpuBackend",
    "OrtCudaBackend",
    "Runner",
    "SimulatedGpuBackend",
    "TensorRtBackend",
    "make_backend",
]
