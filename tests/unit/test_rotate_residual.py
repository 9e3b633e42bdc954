"""The offline rotation of the residual stream: the factored Hadamard products against the dense matrix,
the exactness of the rotated model (logits and routing) on every tiny family, the rotated stream itself,
the head's smoothing fold, and the one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from moedge._errors import MoedgeError
from moedge.arch import get_config
from moedge.arch.per_expert import split_experts
from moedge.calibration.hadamard import hadamard_matrix, random_hadamard
from moedge.calibration.layers import HeadBlock, decoder_layers, head_modules, head_spec
from moedge.calibration.residual_rotation import (
    KroneckerRotation,
    RotatedFinalNorm,
    kronecker_orders,
    residual_rotation_of,
    rotate_residual,
)
from moedge.calibration.rotation import MAX_FACTOR
from moedge.testbeds import build_tiny

IDS = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (2, 20)))
KINDS = ("llama", "mistral", "mixtral", "qwen2-moe", "olmoe")


def _tie(model: nn.Module) -> nn.Module:
    """The tiny model with its head tied to the embedding (as smollm2's is)."""
    model.lm_head.weight = model.get_input_embeddings().weight  # type: ignore[union-attr]
    model.config.tie_word_embeddings = True  # type: ignore[union-attr]
    return model


def _split(kind: str, *, tied: bool = False):
    loaded = build_tiny(kind)
    if tied:
        _tie(loaded.model)
    split_experts(loaded.model, get_config(loaded.model_type))
    return loaded


def _routing(model: nn.Module, kind: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of IDS and, per router, the sorted top-k expert choices of every token."""
    arch = get_config(model.config.model_type)  # type: ignore[union-attr]
    choices: list[torch.Tensor] = []
    handles = []
    if arch.router_path is not None:
        top_k = int(model.config.num_experts_per_tok)  # type: ignore[union-attr]
        for layer in decoder_layers(model):
            router = layer.get_submodule(arch.router_path)
            handles.append(
                router.register_forward_hook(
                    lambda _m, _a, out: choices.append(
                        torch.topk(out[0], top_k, dim=-1).indices.sort(dim=-1).values
                    )
                )
            )
    try:
        with torch.no_grad():
            logits = model(input_ids=IDS, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return logits, choices


@pytest.mark.parametrize(
    ("n", "orders"), [(64, (1, 64)), (576, (4, 144)), (1536, (8, 192)), (8192, (32, 256)), (12, (1, 12))]
)
def test_the_hadamard_matrix_is_a_kronecker_product_of_two_small_ones(n, orders):
    p, q = kronecker_orders(n)
    assert (p, q) == orders and q <= MAX_FACTOR
    np.testing.assert_array_equal(hadamard_matrix(n), np.kron(hadamard_matrix(p), hadamard_matrix(q)))


def test_an_order_without_a_hadamard_matrix_is_refused():
    with pytest.raises(MoedgeError, match="no Hadamard matrix of order 112"):
        kronecker_orders(112)


@pytest.mark.parametrize("n", [64, 96, 576])
@pytest.mark.parametrize("transpose", [False, True])
def test_the_factored_products_are_the_dense_normalised_hadamard(n, transpose):
    rot = KroneckerRotation.hadamard(n, transpose=transpose)
    hn = torch.from_numpy(hadamard_matrix(n).astype(np.float64) / n**0.5)
    torch.testing.assert_close(rot.dense(), hn.T if transpose else hn, atol=1e-7, rtol=0)
    g = torch.Generator().manual_seed(0)
    for shape in ((5, n), (2, 3, n)):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        got = rot.to(torch.float64)(x)
        torch.testing.assert_close(got, x @ rot.dense(), atol=1e-6, rtol=0)
        torch.testing.assert_close(rot.flatten(rot.unflatten(x)), x, atol=0, rtol=0)
    assert not any(name for name, _ in rot.named_buffers() if name in rot.state_dict())


def test_q_transposed_diag_g_q_drops_the_random_signs():
    n = 96
    q = random_hadamard(n, seed=5)
    hn = hadamard_matrix(n) / np.sqrt(n)
    g = np.random.default_rng(0).uniform(0.5, 1.5, n)
    np.testing.assert_allclose(q.T @ np.diag(g) @ q, hn.T @ np.diag(g) @ hn, atol=1e-12)


@pytest.mark.parametrize("kind", [*KINDS, "llama-tied"])
def test_the_rotated_model_is_the_same_function_with_the_same_routing(kind):
    tied = kind.endswith("-tied")
    base = kind.removesuffix("-tied")
    original = _split(base, tied=tied).model
    loaded = _split(base, tied=tied)
    want, want_routes = _routing(original, base)
    rotation = rotate_residual(loaded.model, loaded.model_type, seed=7, name=loaded.name)
    got, got_routes = _routing(loaded.model, base)
    assert float((got - want).abs().max()) < 1e-4, float((got - want).abs().max())
    assert len(got_routes) == len(want_routes) == (2 if base in ("mixtral", "qwen2-moe", "olmoe") else 0)
    for a, b in zip(got_routes, want_routes, strict=True):
        assert torch.equal(a, b)
    assert residual_rotation_of(loaded.model) == rotation and rotation.order == 64 and rotation.seed == 7
    model = loaded.model
    assert isinstance(head_modules(model)[1], RotatedFinalNorm)
    for layer in decoder_layers(model):
        assert torch.equal(layer.input_layernorm.weight, torch.ones(64))
        assert torch.equal(layer.post_attention_layernorm.weight, torch.ones(64))
    if tied:  # the head still shares the (rotated) table: the bundle does not grow
        assert model.lm_head.weight is model.get_input_embeddings().weight
    else:
        assert model.lm_head.weight is not model.get_input_embeddings().weight


def test_the_residual_stream_between_layers_is_the_original_times_q():
    seen: dict[str, torch.Tensor] = {}
    models = {"fp": _split("qwen2-moe").model, "rotated": _split("qwen2-moe").model}
    rotate_residual(models["rotated"], "qwen2_moe", seed=3)
    for label, model in models.items():
        layer = decoder_layers(model)[1]
        layer.register_forward_pre_hook(
            lambda _m, args, kwargs, label=label: seen.__setitem__(
                label, (args[0] if args else kwargs["hidden_states"]).detach()
            ),
            with_kwargs=True,
        )
        with torch.no_grad():
            model(input_ids=IDS, use_cache=False)
    q = torch.from_numpy(random_hadamard(64, 3))
    want = seen["fp"].double() @ q
    torch.testing.assert_close(seen["rotated"].double(), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(seen["rotated"], seen["fp"], atol=1e-2)
    # and the embedding table is E Q
    emb = build_tiny("qwen2-moe").model.get_input_embeddings().weight.double()
    torch.testing.assert_close(
        models["rotated"].get_input_embeddings().weight.double(), emb @ q, atol=1e-6, rtol=0
    )


def test_smoothing_folds_exactly_into_the_rotated_final_norm():
    """``--quantize-head``: the head group's producer is RotatedFinalNorm; its weight takes the scale."""
    loaded = _split("llama", tied=True)
    rotate_residual(loaded.model, loaded.model_type, seed=0)
    model = loaded.model
    from moedge.calibration.layers import untie_head

    untie_head(model)
    want = _routing(model, "llama")[0]
    block = HeadBlock(head_modules(model)[1], model.lm_head)
    spec = head_spec(block)
    (group,) = spec.groups
    s = torch.rand(64, generator=torch.Generator().manual_seed(1)) * 4 + 0.25
    group.fold(s, spec.linears)
    got = _routing(model, "llama")[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(head_modules(model)[1].weight, 1 / s)


def test_opt_is_refused_in_one_line_and_left_unchanged():
    loaded = build_tiny("opt")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    with pytest.raises(MoedgeError) as err:
        rotate_residual(loaded.model, loaded.model_type, seed=0, name=loaded.name)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("tiny-opt: OPT is not rotation-invariant")
    assert "--rotate none or --rotate online" in message
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_norm_that_is_not_an_rmsnorm_is_refused_naming_the_layer():
    loaded = _split("llama")
    decoder_layers(loaded.model)[1].post_attention_layernorm = nn.LayerNorm(64)
    with pytest.raises(
        MoedgeError,
        match=r"^tiny-llama: layer 1 post_attention_layernorm is a LayerNorm, not an RMSNorm.*--rotate none",
    ):
        rotate_residual(loaded.model, loaded.model_type, seed=0, name=loaded.name)
    assert not isinstance(head_modules(loaded.model)[1], RotatedFinalNorm)


def test_a_width_without_a_hadamard_matrix_is_refused_naming_the_layer():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=258,
        hidden_size=112,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(MoedgeError) as err:
        rotate_residual(model, "llama", seed=0, name="odd")
    assert str(err.value).startswith(
        "odd: layer 0's input (the residual stream, hidden size 112): no Hadamard matrix of order 112"
    )
    assert "--rotate none or --rotate online" in str(err.value) and "\n" not in str(err.value)


def test_a_rotated_model_is_not_rotated_twice():
    loaded = _split("llama")
    rotate_residual(loaded.model, loaded.model_type, seed=0, name=loaded.name)
    with pytest.raises(MoedgeError, match="tiny-llama: the residual stream is already rotated"):
        rotate_residual(loaded.model, loaded.model_type, seed=0, name=loaded.name)
