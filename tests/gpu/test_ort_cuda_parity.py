"""On a GPU: the exported model runs under ORT's CUDA provider and matches the CPU logits."""

from __future__ import annotations

import numpy as np
import pytest

from moedge.runtime import OrtCausalLM
from moedge.runtime.backends.ort_cuda import CUDA_PROVIDER, check_cuda_session

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("needs_cuda_ep")]

# ORT's CUDA provider may run float32 MatMuls in TF32 (10 mantissa bits). Emulating TF32 rounding of every
# Linear's inputs in PyTorch moves tiny-mixtral's logits by 1.9e-3 at most (max |logit| 2.58, measured on
# the CPU with these ids): 5e-3 of the logit scale leaves a margin of about 7x. A wrong kernel or a
# layer run twice moves them by O(1).
RELATIVE_TOLERANCE = 5e-3


def test_cuda_matches_cpu(tiny_exports):
    folder = tiny_exports("mixtral")
    ids = np.random.default_rng(0).integers(0, 258, (2, 17))
    cpu, _ = OrtCausalLM(folder).forward(ids)
    gpu_lm = OrtCausalLM(folder, providers=(CUDA_PROVIDER,))
    # ORT falls back to the CPU silently when CUDA cannot start: the same check the ort-cuda backend makes
    placement = check_cuda_session(gpu_lm.session, gpu_lm.info.model_file.name)
    assert gpu_lm.session.get_providers()[0] == CUDA_PROVIDER
    assert placement is None or placement.get(CUDA_PROVIDER, 0) > 0, placement
    gpu, _ = gpu_lm.forward(ids)
    tolerance = RELATIVE_TOLERANCE * max(1.0, float(np.abs(cpu).max()))
    assert np.abs(cpu - gpu).max() <= tolerance
