"""GPU tests: each asks for the capabilities it needs through a fixture here, and skips naming what is missing.

``needs_gpu``       an NVIDIA GPU: /dev/nvidia0 (or a Jetson's /dev/nvhost-ctrl-gpu), or ``nvidia-smi -L`` listing one.
``needs_cuda_ep``   that GPU, and ONNX Runtime's CUDA provider starting a session (onnxruntime-gpu with its
                    CUDA/cuDNN libraries); the CPU onnxruntime wheel has no such provider.
``needs_tensorrt``  that GPU, TensorRT's Python package (not only tensorrt-stubs) creating a builder, and polygraphy.
``needs_cpp_cuda``  ``needs_cuda_ep``, the ONNX Runtime library of the installed onnxruntime-gpu with its
                    CUDA provider library beside it (what moedge-run --ort-lib loads), and build/cpp/moedge-run.

With ``MOEDGE_REQUIRE_GPU=1`` a missing capability fails the test instead (one line naming each one
missing), so a GPU machine cannot pass the GPU suite by skipping it. The fixtures are session-scoped
and listed first (``pytest.mark.usefixtures``), so a test skips before any bundle is built for it.
The checks themselves are in tests/gpu/capabilities.py.
"""

from __future__ import annotations

import pytest

from tests.gpu.capabilities import cpp_cuda_missing, cuda_ep_missing, gpu_missing, require, tensorrt_missing


@pytest.fixture(scope="session")
def needs_gpu() -> None:
    require(gpu_missing())


@pytest.fixture(scope="session")
def needs_cuda_ep() -> None:
    require(gpu_missing(), cuda_ep_missing())


@pytest.fixture(scope="session")
def needs_tensorrt() -> None:
    require(gpu_missing(), tensorrt_missing())


@pytest.fixture(scope="session")
def needs_cpp_cuda() -> None:
    require(gpu_missing(), cuda_ep_missing(), cpp_cuda_missing())
