"""GPU tests run only where an NVIDIA GPU and its runtime exist; elsewhere they skip, saying why."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _needs_gpu() -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        pytest.skip("onnxruntime is not installed")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA execution provider: install onnxruntime-gpu on a machine with an NVIDIA GPU")
