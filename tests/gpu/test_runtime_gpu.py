"""Generation on real GPU backends agrees with the CPU run (tiny-mixtral, greedy)."""

from __future__ import annotations

import pytest

from moedge.runtime import BundleRunner, Generator

PROMPT = [1, 17, 33, 50, 7]


@pytest.mark.parametrize("policy", ["haq", "lru", "full-gpu"])
def test_ort_cuda_generation_matches_cpu(bundles, policy):
    bundle = bundles("mixtral")
    want = BundleRunner(bundle).generate(PROMPT, max_new_tokens=12)
    gen = Generator(bundle, backend="ort-cuda", policy=policy, gpu_budget="30%")
    assert gen.generate(PROMPT, max_new_tokens=12)[0].token_ids == want
    assert (
        gen.summary()["gpu"]["peak_expert_bytes"] <= gen.summary()["gpu"]["budget_bytes"]
        or policy == "full-gpu"
    )


def test_tensorrt_generation_matches_cpu(bundles):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    pytest.importorskip("polygraphy", reason="polygraphy is not installed")
    from moedge.runtime.backends.tensorrt import build_bundle_engines

    bundle = bundles("mixtral")
    build_bundle_engines(bundle, max_tokens=64, context=128, progress=False)
    want = BundleRunner(bundle).generate(PROMPT, max_new_tokens=12)
    gen = Generator(bundle, backend="tensorrt", policy="lru", gpu_budget="50%")
    assert gen.generate(PROMPT, max_new_tokens=12)[0].token_ids == want
