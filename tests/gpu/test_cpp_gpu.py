"""moedge-run on the CUDA execution provider: the CPU's first-step logits and greedy tokens (tiny-mixtral).

moedge-run itself refuses to run when the CUDA provider cannot start (ORT's C API has no silent CPU
fallback) or when ORT assigned none of a graph's nodes to it (cpp/src/runner.cc, check_placement), so a
successful --provider cuda run is one whose graphs were placed on the CUDA provider.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from tests.gpu.capabilities import MOEDGE_RUN, gpu_ort_library, nvidia_library_path

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("needs_cpp_cuda")]

PROMPTS = ["1,17,33,50,7", "3,99,140"]
# ORT's CUDA provider may run float32 MatMuls in TF32 (10 mantissa bits); emulating that in PyTorch moves
# tiny-mixtral's logits by 1.9e-3 at most against a max |logit| of 2.58 (tests/gpu/test_ort_cuda_parity.py).
# 5e-3 of the logit scale leaves a margin of about 7x; a wrong expert or a stale KV cache moves them by O(1).
RELATIVE_TOLERANCE = 5e-3


@pytest.mark.parametrize("budget", [None, "50%"])
def test_cuda_provider_gives_the_cpu_logits_and_tokens(bundles, tmp_path, budget):
    bundle = bundles("mixtral")
    library = gpu_ort_library()
    assert library is not None  # needs_cpp_cuda
    env = {**os.environ, "LD_LIBRARY_PATH": nvidia_library_path()}
    extra = [] if budget is None else ["--gpu-budget", budget]
    runs, logits = {}, {}
    for provider in ("cpu", "cuda"):
        out, first = tmp_path / f"{provider}.json", tmp_path / f"{provider}.logits"
        ids = [arg for p in PROMPTS for arg in ("--ids", p)]
        result = subprocess.run(
            [str(MOEDGE_RUN), str(bundle), *ids, "-n", "16", "--provider", provider, "--ort-lib", str(library),
             "--logits-out", str(first), "--json", str(out), *extra],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        runs[provider] = json.loads(out.read_text())
        logits[provider] = np.fromfile(first, dtype=np.float32).reshape(len(PROMPTS), -1)
    assert runs["cuda"]["provider"] == "cuda"
    # without a budget every expert runs on a provider session; with one, some do (the rest are CPU misses)
    if budget is None:
        assert runs["cuda"]["hits"] == runs["cuda"]["expert_runs"] > 0
    else:
        assert runs["cuda"]["hits"] > 0
    tolerance = RELATIVE_TOLERANCE * max(1.0, float(np.abs(logits["cpu"]).max()))
    assert np.abs(logits["cuda"] - logits["cpu"]).max() <= tolerance
    assert [g["token_ids"] for g in runs["cuda"]["generations"]] == [
        g["token_ids"] for g in runs["cpu"]["generations"]
    ]
