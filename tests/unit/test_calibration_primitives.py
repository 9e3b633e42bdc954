"""Int8 primitives, GPTQ and the streaming observers on synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moedge._errors import MoedgeError
from moedge.calibration.gptq import gptq_batch
from moedge.calibration.observers import HIST_PER_OCTAVE, InputObserver
from moedge.calibration.quant import FakeQuantLinear, fake_quant_act, rtn_weight


def gptq(w: torch.Tensor, h: torch.Tensor, **options: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = gptq_batch(w[None], h[None], **options)  # type: ignore[arg-type]
    return q[0], s[0]


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


def test_wide_inputs_accumulate_the_full_symmetric_hessian():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(40, 300, generator=g) for _ in range(3)]  # wide enough for block rows
    obs = InputObserver("wide", hessian=True, sample_tokens=16, seed=0)
    for b in batches:
        obs.update(b)
    flat = torch.cat(batches)
    torch.testing.assert_close(obs.hessian, flat.T @ flat / 120, atol=1e-4, rtol=1e-5)
    obs.update(batches[0])  # more tokens after a read: still the full sum
    flat = torch.cat([flat, batches[0]])
    torch.testing.assert_close(obs.hessian, flat.T @ flat / 160, atol=1e-4, rtol=1e-5)


def test_batched_gptq_equals_one_at_a_time_and_shares_stacked_rows():
    g = torch.Generator().manual_seed(2)
    ws = torch.randn(3, 24, 40, generator=g)
    hs = torch.stack([_correlated(500, 40, s).T @ _correlated(500, 40, s) / 500 for s in range(3)])
    q, s = gptq_batch(ws, hs)
    for b in range(3):
        q1, s1 = gptq(ws[b], hs[b])
        assert torch.equal(q[b], q1) and torch.equal(s[b], s1)
    # two linears reading one input: their stacked rows get each one's own codes
    top, _ = gptq(ws[0, :10], hs[0])
    assert torch.equal(q[0, :10], top)


def test_gram_output_errors_equal_the_direct_ones():
    from moedge.calibration.search import OutputErrors

    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 32, generator=g) * torch.logspace(-1, 1, 32)
    x[7, 3] = 80.0  # one massive activation
    ws = [torch.randn(96, 32, generator=g), torch.randn(16, 32, generator=g)]  # wide (Gram) and narrow
    w_deqs = [(lambda q, s: q.float() * s[:, None])(*rtn_weight(w)) for w in ws]
    y_refs = [x @ w.T for w in ws]
    rw = torch.ones(200)
    rw[-10:] = 0.25
    clips = [80.0, 20.0, 5.0, 1.0]
    gram = OutputErrors(x, w_deqs, y_refs, rw, expected_clips=100)
    assert list(gram.gram) == [0]  # only the consumer wider than its input goes through its Gram matrix
    direct = OutputErrors(x, w_deqs, y_refs, rw, expected_clips=0)
    torch.testing.assert_close(gram.errors(clips), direct.errors(clips), rtol=1e-5, atol=0)
    by_hand = [
        float((((fake_quant_act(x, c / 127) @ w_deqs[0].T - y_refs[0]) ** 2).sum(1) * rw).sum())
        for c in clips
    ]
    torch.testing.assert_close(
        gram.errors(clips)[:, 0], torch.tensor(by_hand, dtype=torch.float64), rtol=1e-5, atol=0
    )


def test_searching_many_consumers_finds_what_one_at_a_time_finds():
    from moedge.calibration.search import search_clip, search_clips

    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 24, generator=g)
    x[::50, 5] = 30.0
    ws = [torch.randn(n, 24, generator=g) for n in (8, 72, 24)]
    w_deqs = [(lambda q, s: q.float() * s[:, None])(*rtn_weight(w)) for w in ws]
    y_refs = [x @ w.T for w in ws]
    amax = float(x.abs().max())
    together = search_clips(x, amax, w_deqs, y_refs, refine=True)
    for (ratio, err), w_deq, y_ref in zip(together, w_deqs, y_refs, strict=True):
        r1, e1 = search_clip(x, amax, w_deq=w_deq, y_ref=y_ref, refine=True)
        assert ratio == r1
        assert err == pytest.approx(e1, rel=1e-5)


@pytest.mark.parametrize("minimum", range(8))
def test_the_grid_walk_finds_a_single_minimum_with_fewer_evaluations(minimum):
    from moedge.calibration.smoothing import walk_grid

    grid = (0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95, 1.0)
    seen: list[float] = []

    def error(a: float) -> float:
        seen.append(a)
        return abs(grid.index(a) - minimum) + 1.0

    assert walk_grid(grid, error, baseline=10.0) == grid[minimum]
    assert len(set(seen)) < len(grid)
    assert walk_grid(grid, error, baseline=0.5) is None  # nothing beats leaving the group unsmoothed
