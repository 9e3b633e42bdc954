"""Generation on real GPU backends agrees with the CPU run (tiny-mixtral, greedy), and the GPU really ran it.

What "really ran" means here: for ort-cuda, every session the backend created passed its CUDA check
(CUDAExecutionProvider first, and holding nodes of the graph where ORT reports placement) and each
stage graph ran once per step on such a session; for tensorrt, each stage engine completed one
TensorRT execution per step. Both: some expert ran on the GPU backend too.
"""

from __future__ import annotations

import pytest

from moedge.formats.manifest import read_manifest
from moedge.runtime import BundleRunner, Generator, greedy
from moedge.runtime.backends.ort_cuda import CUDA_PROVIDER, OrtCudaBackend
from moedge.runtime.backends.tensorrt import TensorRtBackend

pytestmark = pytest.mark.gpu

PROMPT = [1, 17, 33, 50, 7]
NEW_TOKENS = 12  # one prompt step and 11 decode steps: every stage graph runs 12 times


def _stage_files(bundle) -> list[str]:
    manifest = read_manifest(bundle)
    return [manifest.embedding.file, *[layer.stage.file for layer in manifest.layers], manifest.head.file]


@pytest.mark.usefixtures("needs_cuda_ep")
@pytest.mark.parametrize("policy", ["haq", "lru", "full-gpu"])
def test_ort_cuda_generation_matches_cpu(bundles, policy):
    bundle = bundles("mixtral")
    want = greedy(BundleRunner(bundle), PROMPT, max_new_tokens=NEW_TOKENS)
    gen = Generator(bundle, backend="ort-cuda", policy=policy, gpu_budget="30%")
    assert gen.generate(PROMPT, max_new_tokens=NEW_TOKENS)[0].token_ids == want
    assert (
        gen.summary()["gpu"]["peak_expert_bytes"] <= gen.summary()["gpu"]["budget_bytes"]
        or policy == "full-gpu"
    )
    backend = gen.gpu
    assert isinstance(backend, OrtCudaBackend)
    placements = backend.placements()
    for file, placement in placements.items():  # None: this ORT does not report node placement
        assert placement is None or placement.get(CUDA_PROVIDER, 0) > 0, (file, placement)
    runs = backend.runs()
    assert {f: runs.get(f, 0) for f in _stage_files(bundle)} == dict.fromkeys(
        _stage_files(bundle), NEW_TOKENS
    )
    assert any(f.startswith("experts/") for f in runs), runs
    assert set(runs) <= set(placements)  # nothing ran on a session that skipped the check


@pytest.mark.usefixtures("needs_tensorrt")  # TensorRT alone: no ORT CUDA provider involved
def test_tensorrt_generation_matches_cpu(bundles, tmp_path):
    from moedge.runtime.backends.tensorrt import build_bundle_engines

    bundle = bundles("mixtral")
    engines = tmp_path / "mixtral.engines"
    build_bundle_engines(bundle, engine_dir=engines, max_tokens=64, context=128, progress=False)
    want = greedy(BundleRunner(bundle), PROMPT, max_new_tokens=NEW_TOKENS)
    gen = Generator(bundle, backend="tensorrt", policy="lru", gpu_budget="50%", engines=engines)
    assert gen.generate(PROMPT, max_new_tokens=NEW_TOKENS)[0].token_ids == want
    backend = gen.gpu
    assert isinstance(backend, TensorRtBackend)
    executions = backend.executions()
    assert {f: executions.get(f, 0) for f in _stage_files(bundle)} == dict.fromkeys(
        _stage_files(bundle), NEW_TOKENS
    )
    assert any(f.startswith("experts/") for f in executions), executions
