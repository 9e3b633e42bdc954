"""Real weights: stories260K from its llama2.c file, smollm2-135m from its GGUF, the upcycled MoE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moedge.loading import load_model
from moedge.runtime import OrtCausalLM, greedy
from moedge.upcycle import UpcycleConfig, upcycle_loaded

STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture(scope="module")
def stories(data_dir):
    return load_model(data_dir / "stories260K" / "stories260K.bin")


def _greedy_torch(model, ids: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=steps, do_sample=False, top_k=None, top_p=None
        )
    return out[0, len(ids) :].tolist()


def test_stories260k_tells_the_story_in_pytorch(stories):
    new = _greedy_torch(stories.model, [stories.bos_token_id], 40)
    assert stories.decode(new).startswith(STORY)


def test_stories260k_tells_the_story_from_its_onnx_export(stories, tmp_path):
    from moedge.export.exporter import export_model

    export_model(stories, tmp_path / "stories")
    lm = OrtCausalLM(tmp_path / "stories")
    new = greedy(lm, [stories.bos_token_id], max_new_tokens=40)
    assert stories.decode(new).startswith(STORY)


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smollm2):
    ids = smollm2.encode("The capital of France is")
    new = _greedy_torch(smollm2.model, ids, 3)
    assert smollm2.decode(new).startswith(" Paris")


@pytest.mark.slow
@pytest.mark.parametrize("top_k", [2, 8])
def test_upcycled_smollm2_with_zero_noise_is_the_dense_model(smollm2, data_dir, top_k):
    moe = upcycle_loaded(smollm2, UpcycleConfig(sigma=0.0, top_k=top_k, build_windows=2, window_len=128))
    assert moe.model.config.model_type == "mixtral" and moe.model.config.num_experts_per_tok == top_k
    ids = torch.tensor([smollm2.encode("The capital of France is Paris, and the capital of Italy is Rome.")])
    with torch.no_grad():
        dense = smollm2.model(ids).logits
        upcycled = moe.model(ids).logits
    assert (dense - upcycled).abs().max().item() < 1e-4


def test_upcycled_noise_makes_experts_differ_and_router_follows_kmeans(tiny_models):
    dense = tiny_models("llama")
    moe = upcycle_loaded(
        dense, UpcycleConfig(sigma=0.05, num_experts=4, top_k=2, build_windows=4, window_len=64)
    )
    experts = moe.model.model.layers[0].mlp.experts.gate_up_proj
    assert not torch.allclose(experts[0], experts[1])
    router = moe.model.model.layers[0].mlp.gate.weight
    np.testing.assert_allclose(router.norm(dim=1).detach().numpy(), 1.0, rtol=1e-5)
    again = upcycle_loaded(
        dense, UpcycleConfig(sigma=0.05, num_experts=4, top_k=2, build_windows=4, window_len=64)
    )
    assert torch.equal(again.model.model.layers[0].mlp.gate.weight, router), "the build must be deterministic"


def test_stories260k_with_an_int8_head_keeps_its_embedding_and_runs_the_head_in_int8(data_dir, tmp_path):
    """quantize_head on a tied head: the embedding table stays FP, the bundle's head stage runs int8."""
    from moedge.calibration import (
        CalibrationConfig,
        apply_recipe,
        calibrate,
        calibration_windows,
        save_recipe,
    )
    from moedge.export.exporter import export_model
    from moedge.formats.manifest import read_manifest
    from moedge.graph_passes.bundle import split_bundle
    from moedge.graph_passes.inspect import INT8_KERNELS, ort_census
    from moedge.runtime.bundle_runner import BundleRunner

    path = data_dir / "stories260K" / "stories260K.bin"
    loaded = load_model(path)
    model = loaded.model
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied, as released
    table = model.get_input_embeddings().weight.detach().clone()
    samples = list(calibration_windows(loaded, dataset="demo", count=8, seqlen=64, seed=0))
    # no residual rotation: it would rotate the table (E Q) and add the final norm's factors to the head
    cfg = CalibrationConfig(method="haq", quantize_head=True, rotate="none")
    result = calibrate(loaded, samples, cfg, progress=False)
    assert result.linears["lm_head"].quantized and "lm_head" not in result.excluded
    assert torch.equal(model.get_input_embeddings().weight, table)  # smoothing never touched the table
    save_recipe(loaded, result, tmp_path / "recipe")
    fake = apply_recipe(load_model(path), tmp_path / "recipe")
    ids = np.asarray([[fake.bos_token_id, *fake.encode("Once upon a time")]])
    with torch.no_grad():
        want = fake.model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    got_recipe = loaded.model(input_ids=torch.from_numpy(ids), use_cache=False).logits.detach().numpy()
    np.testing.assert_array_equal(got_recipe, want)  # the recipe reproduces the calibrated model
    export_model(fake, tmp_path / "export")
    split_bundle(tmp_path / "export", tmp_path / "bundle", progress=False)
    manifest = read_manifest(tmp_path / "bundle")
    census = ort_census(tmp_path / "bundle" / manifest.head.file)
    assert sum(n for op, n in census.items() if op in INT8_KERNELS) == 1
    assert not {"MatMul", "Gemm", "FusedMatMul"} & set(census)
    got = BundleRunner(tmp_path / "bundle").forward(ids)[0]
    # The int8 head's integer matmul is exact, so the bundle matches the fake-quant model up to float32
    # rounding elsewhere: measured max |diff| 5.7e-6 on logits of magnitude up to 18 (x86, 2 cores); 1e-4,
    # the FP32 parity bound of test_bundle.py, leaves a 17x margin.
    tol = 1e-4
    assert np.abs(got - want).max() < tol
    # every position's top-1/top-2 gap (0.51 at least on this prompt) exceeds 2 * tol: argmax is settled
    top2 = np.sort(want[0], axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 2 * tol
    assert np.array_equal(got.argmax(-1), want.argmax(-1))
