"""The runtime on an ort-cpu target bundle: the fused stages with their KV cache updated in place give
what the tensorrt-target bundle of the same export gives, through every Python runner."""

from __future__ import annotations

import numpy as np
import pytest

from moedge._errors import MoedgeError
from moedge.graph_passes.bundle import split_bundle
from moedge.runtime import BundleRunner, Generator, greedy
from moedge.runtime.decoding import StopRule, generate
from moedge.runtime.static_cache import DECODE_ROOM, MIN_CAPACITY, StaticCache

KINDS = ("llama", "mixtral", "qwen2-moe")
PROMPTS = [[1, 5, 9, 17, 33], [2, 4, 6]]


@pytest.fixture(scope="module")
def pair(tiny_exports, tmp_path_factory):
    """(tensorrt-target bundle, ort-cpu-target bundle) of one tiny export, by kind."""
    made: dict[str, tuple] = {}

    def get(kind: str):
        if kind not in made:
            root = tmp_path_factory.mktemp(f"pair-{kind}")
            split_bundle(tiny_exports(kind), root / "trt", progress=False)
            split_bundle(tiny_exports(kind), root / "cpu", progress=False, target="ort-cpu")
            made[kind] = (root / "trt", root / "cpu")
        return made[kind]

    return get


@pytest.mark.parametrize("kind", KINDS)
def test_fused_bundle_logits_match_the_portable_bundle_step_by_step(kind, pair):
    portable, fused = (BundleRunner(b) for b in pair(kind))
    assert fused.manifest.stage_target == "ort-cpu" and portable.manifest.stage_target == "tensorrt"
    ids = np.asarray([PROMPTS[0]])
    want, want_past = portable.forward(ids)
    got, past = fused.forward(ids)
    assert isinstance(past, StaticCache) and past.lengths.tolist() == [5]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    address = past.buffers[0].ctypes.data
    token = int(want[0, -1].argmax())
    for _ in range(6):  # decode steps write into the same buffers
        want, want_past = portable.forward(np.asarray([[token]]), past=want_past)
        got, past = fused.forward(np.asarray([[token]]), past=past)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
        token = int(want[0, -1].argmax())
    assert past.buffers[0].ctypes.data == address and past.lengths.tolist() == [11]
    # the cache holds what the portable runner's concatenated cache holds, and nothing past the rows
    np.testing.assert_allclose(past.buffers[0][:, :, :11], want_past[0], atol=1e-5)
    assert not past.buffers[0][:, :, 11:].any()


@pytest.mark.parametrize("kind", KINDS)
def test_batched_generation_with_rows_leaving_matches_one_by_one(kind, pair):
    portable, fused = (BundleRunner(b) for b in pair(kind))
    prompts = [*PROMPTS, [7, 3, 11, 13, 2, 8, 40]]
    want = [greedy(portable, p, max_new_tokens=8) for p in prompts]
    stop = want[1][2]  # the second row stops early; the others go on without it
    rule = StopRule(max_new_tokens=8, stop=frozenset({stop}))
    out = generate(fused, prompts, rule)
    for got, full in zip(out, want, strict=True):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert got.token_ids == full[:cut]


def test_the_cache_grows_past_its_first_capacity_and_keeps_its_rows(pair):
    portable, fused = (BundleRunner(b) for b in pair("llama"))
    prompt = list(np.random.default_rng(0).integers(1, 250, MIN_CAPACITY - DECODE_ROOM))
    new = DECODE_ROOM + 8  # decoding crosses the first capacity
    assert greedy(fused, prompt, max_new_tokens=new) == greedy(portable, prompt, max_new_tokens=new)
    _, past = fused.forward(np.asarray([prompt]))
    assert past.capacity == MIN_CAPACITY
    for token in range(new):
        _, past = fused.forward(np.asarray([[token + 1]]), past=past)
    assert past.capacity == 2 * MIN_CAPACITY and int(past.lengths[0]) == len(prompt) + new


def test_generator_on_a_fused_moe_bundle_is_the_reference(pair):
    _, fused = pair("mixtral")
    want = [greedy(BundleRunner(fused), p, max_new_tokens=8) for p in PROMPTS]
    gen = Generator(fused, backend="simulated", policy="lru", gpu_budget="50%")
    assert [g.token_ids for g in gen.generate(PROMPTS, max_new_tokens=8)] == want
    assert gen.metrics.routed == gen.metrics.computed


def test_a_multi_token_continuation_of_a_batch_is_refused(pair):
    runner = BundleRunner(pair("llama")[1])
    _, past = runner.forward(np.asarray([[1, 2, 3], [4, 5, 6]]))
    with pytest.raises(MoedgeError, match="one token per row"):
        runner.forward(np.asarray([[1, 2], [3, 4]]), past=past)
