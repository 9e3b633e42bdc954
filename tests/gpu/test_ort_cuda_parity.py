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
    gpu, _ = OrtCausalLM(folder, providers=("CUDAExecutionProvider",)).forward(ids)
    assert np.abs(cpu - gpu).max() < 1e-3
