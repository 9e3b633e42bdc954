"""On a GPU: the exported model runs under ORT's CUDA provider and matches the CPU logits."""

from __future__ import annotations

import numpy as np
import pytest

from moedge.runtime import OrtCausalLM

pytestmark = pytest.mark.gpu


def test_cuda_matches_cpu(tiny_exports):
    folder = tiny_exports("mixtral")
    ids = np.random.default_rng(0).integers(0, 258, (2, 17))
    cpu, _ = OrtCausalLM(folder).forward(ids)
    gpu_lm = OrtCausalLM(folder, providers=("CUDAExecutionProvider",))
    # ORT falls back to the CPU silently when CUDA cannot start: make sure the GPU really ran
    assert gpu_lm.session.get_providers()[0] == "CUDAExecutionProvider"
    gpu, _ = gpu_lm.forward(ids)
    assert np.abs(cpu - gpu).max() < 1e-3
