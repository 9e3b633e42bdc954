"""Every registered architecture: ORT logits of the export match PyTorch within 1e-4 (FP32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moedge.arch import get_config, supported_model_types
from moedge.graph_passes.inspect import inspect_model
from moedge.runtime import OrtCausalLM
from tests.conftest import TINY_KINDS

ATOL = 1e-4


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


def test_every_registered_architecture_has_a_tiny_testbed(tiny_models):
    covered = {tiny_models(kind).model_type for kind in TINY_KINDS}
    assert covered == set(supported_model_types())


@pytest.mark.parametrize("kind", TINY_KINDS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("prompt_len", [1, 17])
def test_prompt_and_cached_decode_match_pytorch(kind, batch, prompt_len, tiny_models, tiny_exports):
    loaded = tiny_models(kind)
    lm = OrtCausalLM(tiny_exports(kind, with_cache=True))
    rng = np.random.default_rng(batch * 100 + prompt_len)
    ids = rng.integers(0, loaded.model.config.vocab_size, (batch, prompt_len))

    logits, past = lm.forward(ids)
    np.testing.assert_allclose(logits, _torch_logits(loaded.model, ids), atol=ATOL, rtol=0)
    assert past[0].shape[2] == prompt_len

    seq = ids
    for _ in range(8):  # greedy decode step by step through the cache
        nxt = logits[:, -1].argmax(-1)[:, None]
        seq = np.concatenate([seq, nxt], axis=1)
        logits, past = lm.forward(nxt, past=past)
        ref = _torch_logits(loaded.model, seq)[:, -1:]
        np.testing.assert_allclose(logits, ref, atol=ATOL, rtol=0)
    assert past[0].shape[2] == prompt_len + 8


@pytest.mark.parametrize("kind", TINY_KINDS)
@pytest.mark.parametrize("shape", [(1, 1), (2, 17)])
def test_no_cache_variant_matches_pytorch(kind, shape, tiny_models, tiny_exports):
    loaded = tiny_models(kind)
    folder = tiny_exports(kind, with_cache=False)
    lm = OrtCausalLM(folder)
    assert lm.info.inputs == ("input_ids", "attention_mask", "position_ids")
    ids = np.random.default_rng(7).integers(0, loaded.model.config.vocab_size, shape)
    logits, present = lm.forward(ids)
    assert present == []
    np.testing.assert_allclose(logits, _torch_logits(loaded.model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", [k for k in TINY_KINDS if k in ("mixtral", "qwen2-moe", "olmoe")])
def test_every_expert_is_its_own_tagged_subgraph(kind, tiny_models, tiny_exports):
    loaded = tiny_models(kind)
    arch = get_config(loaded.model_type)
    summary = inspect_model(tiny_exports(kind))
    layers = loaded.model.config.num_hidden_layers
    assert summary.experts_per_layer == {
        layer: arch.num_experts(loaded.model.config) for layer in range(layers)
    }
    # one routed-token gather per expert: the graph really is sparse, not every expert on every token
    assert summary.op_census.get("NonZero", 0) >= layers * arch.num_experts(loaded.model.config)


def test_export_restores_the_fused_experts(tiny_models, tiny_exports):
    loaded = tiny_models("mixtral")
    tiny_exports("mixtral")
    experts = loaded.model.model.layers[0].mlp.experts
    assert hasattr(experts, "gate_up_proj"), "the export patcher must restore transformers' fused experts"


def test_export_metadata_and_opset(tiny_exports):
    summary = inspect_model(tiny_exports("llama"))
    assert summary.opset >= 17
    assert summary.nodes_with_module > 0.5 * summary.num_nodes
    names = [name for name, _, _ in summary.inputs]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert "past_key_values.0.key" in names
    dims = dict((n, s) for n, _, s in summary.inputs)
    assert all(isinstance(d, str) for d in dims["input_ids"]), "batch and sequence axes must be dynamic"
