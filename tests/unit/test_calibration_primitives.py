"""Int8 primitives, GPTQ and the streaming observers on synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moedge._errors import MoedgeError
from moedge.calibration.observers import HIST_PER_OCTAVE, InputObserver
from moedge.calibration.quant import FakeQuantLinear, fake_quant_act, gptq, rtn_weight


def test_activation_grid_matches_quantize_linear():
    scale = 0.5
    x = torch.tensor([0.25, 0.75, -0.25, 63.4, 100.0, -100.0])
    # ONNX QuantizeLinear: round half to even, saturate to [-128, 127]
    assert fake_quant_act(x, scale).tolist() == [0.0, 1.0, -0.0, 63.5, 63.5, -64.0]


def test_rtn_weights_are_symmetric_per_row():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [10.0, 3.0, -10.0]])
    q, scale = rtn_weight(w)
    assert q.dtype == torch.int8
    assert q.abs().max(dim=1).values.tolist() == [127, 0, 127]
    assert torch.allclose(q.float() * scale[:, None], w, atol=float(scale.max()) / 2)


def test_fake_quant_linear_is_qdq_then_matmul():
    torch.manual_seed(0)
    w = torch.randn(4, 8)
    q, s = rtn_weight(w)
    layer = FakeQuantLinear(q, s, torch.ones(4), input_scale=0.05)
    x = torch.randn(3, 8)
    want = fake_quant_act(x, 0.05) @ (q.float() * s[:, None]).T + 1
    assert torch.equal(layer(x), want)


def _correlated(n: int, d: int, seed: int) -> torch.Tensor:
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(123)) / d**0.5  # one distribution
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1, d)
    return (torch.randn(n, d, generator=g) @ mix) * scale


def test_gptq_beats_round_to_nearest_on_the_layer_output():
    x = _correlated(4096, 64, 0)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    h = x.T @ x / len(x)
    q_rtn, s_rtn = rtn_weight(w)
    q_gptq, s_gptq = gptq(w, h)
    test = _correlated(2048, 64, 2)

    def err(q: torch.Tensor, s: torch.Tensor) -> float:
        return float((test @ (q.float() * s[:, None] - w).T).square().mean())

    assert err(q_gptq, s_gptq) < 0.8 * err(q_rtn, s_rtn)


def test_gptq_survives_a_singular_hessian():
    x = torch.randn(100, 8)
    x[:, 3] = 0.0  # a dead input channel
    x[:, 5] = x[:, 4]  # and a duplicated one
    w = torch.randn(6, 8)
    q, s = gptq(w, x.T @ x / 100, damp=0.0)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert torch.isfinite(s).all()


def test_observer_streams_exact_statistics():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 50, 16, generator=g) for _ in range(5)]
    obs = InputObserver("k", hessian=True, sample_tokens=64, seed=0, tail_tokens=8)
    for b in batches:
        obs.update(b)
    flat = torch.cat([b.reshape(-1, 16) for b in batches])
    assert obs.tokens == 500
    assert torch.equal(obs.absmax, flat.abs().amax(0))
    assert torch.allclose(obs.hessian, flat.T @ flat / 500, atol=1e-5)
    rows, weights = obs.rows()
    assert rows.shape == (72, 16) and weights[:64].eq(1).all() and weights[64:].eq(64 / 500).all()
    # the tail holds the largest-magnitude rows
    top = flat.abs().amax(1).topk(8).values.sort().values
    assert torch.equal(rows[64:].abs().amax(1).sort().values, top)
    # the same seed gives the same sample
    again = InputObserver("k", hessian=False, sample_tokens=64, seed=0, tail_tokens=8)
    for b in batches:
        again.update(b)
    assert torch.equal(again.rows()[0], rows)
    # percentile(q) is the upper edge of the histogram bin holding the q-th percentile of |x| (capped at
    # the absmax): bins are 2^(1/HIST_PER_OCTAVE) wide, so it lies in [x_q, x_q * 2^(1/8)] with x_q the exact
    # value (numpy's inverted-CDF percentile: the smallest |x| with at least q% of the values at or below);
    # 1e-5 of slack either side covers a float32 log2 that puts a value at a bin edge one bin off
    values = flat.abs().numpy().ravel()
    width = 2.0 ** (1 / HIST_PER_OCTAVE)
    for q in (1.0, 10.0, 50.0, 90.0, 99.0, 100.0):
        exact = float(np.percentile(values, q, method="inverted_cdf"))
        assert exact * (1 - 1e-5) <= obs.percentile(q) <= exact * width * (1 + 1e-5), q
    assert obs.percentile(100.0) == float(flat.abs().max())


def test_observer_refuses_non_finite_activations():
    obs = InputObserver("model.layers.0.mlp.down_proj", hessian=False, sample_tokens=8, seed=0)
    with pytest.raises(MoedgeError, match="non-finite activations"):
        obs.update(torch.tensor([[1.0, float("nan")]]))
