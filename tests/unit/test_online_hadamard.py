"""The online Hadamard rotation: factors, the graph-shaped forward against the dense matrix, the fold."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moedge._errors import MoedgeError
from moedge.calibration.observers import InputObserver
from moedge.calibration.rotation import (
    MAX_FACTOR,
    OnlineHadamard,
    RotatedLinear,
    as_rotated,
    hadamard_factors,
    input_rotation,
    rotate_input,
    rotation_factors,
    rotation_for,
)


@pytest.mark.parametrize(
    ("n", "factors"),
    [(64, (8, 8)), (96, (12, 8)), (80, (20, 4)), (576, (36, 16)), (1536, (48, 32)), (8192, (64, 128))],
)
def test_factors_are_balanced_hadamard_orders(n, factors):
    assert hadamard_factors(n) == factors
    p, q = factors
    assert p * q == n and max(p, q) <= MAX_FACTOR


@pytest.mark.parametrize("n", [172, 14336, 1, 7 * 64])
def test_widths_without_a_hadamard_matrix_are_refused_in_one_line(n):
    with pytest.raises(MoedgeError, match=f"width {n}.*--rotate none"):
        hadamard_factors(n)


@pytest.mark.parametrize(
    ("n", "factors"),
    [
        (172, (4, 43, True)),
        (112, (8, 14, True)),
        (14336, (128, 112, True)),
        (43, (1, 43, True)),
        (96, (12, 8, False)),
    ],
)
def test_a_width_without_a_hadamard_matrix_takes_a_dct_for_its_odd_part(n, factors):
    assert rotation_factors(n) == factors
    p, q, _ = factors
    assert p * q == n and max(p, q) <= MAX_FACTOR
    assert OnlineHadamard(n).name == f"hadamard-{p}x{'dct' if factors[2] else ''}{q}"


@pytest.mark.parametrize("n", [2 * 257, 1, 0])
def test_a_width_whose_odd_part_is_too_large_is_refused_in_one_line(n):
    with pytest.raises(MoedgeError, match=f"^no online rotation of width {n}.*--rotate none$"):
        rotation_factors(n)


@pytest.mark.parametrize("n", [96, 576, 1536, 172, 112])
def test_the_factored_forward_is_the_dense_orthonormal_rotation(n):
    rot = OnlineHadamard(n)
    dense = rot.dense()
    torch.testing.assert_close(dense @ dense.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    g = torch.Generator().manual_seed(0)
    for shape in ((5, n), (2, 3, n)):  # an expert's rows, and (batch, sequence, channels)
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        want = x @ dense
        got = rot.to(torch.float64)(x)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)  # float32 factors
        torch.testing.assert_close(rot.exact(x), want.reshape(-1, n), atol=1e-12, rtol=0)  # float64
    # a massive channel spreads over the whole token: the per-tensor range drops by about sqrt(n) (a
    # Hadamard matrix: exactly; with a DCT factor of order q: by at least sqrt(n / 2))
    spike = torch.zeros(1, n)
    spike[0, 7] = 3000.0
    peak = float(rot(spike).abs().max())
    if rot.dct:
        assert peak <= 3000.0 * (2.0 / n) ** 0.5 * (1 + 1e-5)
    else:
        assert peak == pytest.approx(3000.0 / n**0.5, rel=1e-5)


def test_rotating_a_linears_input_keeps_its_function():
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(96, 40)
    x = torch.randn(4, 7, 96, generator=g)
    want = lin(x)
    same = rotate_input(lin)
    assert same is lin and isinstance(lin, RotatedLinear) and input_rotation(lin) is not None
    torch.testing.assert_close(lin(x), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(lin.weight, nn.Linear(96, 40).weight)
    with pytest.raises(MoedgeError, match="already rotated"):
        rotate_input(lin)


def test_only_plain_linears_are_rotated_and_recipes_name_their_rotation():
    class Custom(nn.Linear):
        pass

    with pytest.raises(MoedgeError, match="Custom"):
        as_rotated(Custom(96, 8), OnlineHadamard(96))
    assert input_rotation(nn.Linear(96, 8)) is None
    assert rotation_for("hadamard-12x8", 96).name == "hadamard-12x8"
    with pytest.raises(MoedgeError, match=r"hadamard-8x12.*re-run `moedge calibrate`"):
        rotation_for("hadamard-8x12", 96)


@pytest.mark.parametrize("smoothed", [False, True])
def test_transformed_statistics_equal_a_second_observation_of_the_rotated_input(smoothed):
    """The rotated input's statistics turned from the retained batches match observing it again."""
    gen = torch.Generator().manual_seed(3)
    width = 96  # 12 x 8
    batches = [torch.randn(4, 32, width, generator=gen) for _ in range(5)]
    batches[2][1, 7, 5] = 300.0  # one token-specific massive channel
    cols = torch.rand(width, generator=gen) + 0.5 if smoothed else None

    def observer(retain: bool) -> InputObserver:
        return InputObserver("mlp.down_proj", hessian=True, sample_tokens=64, seed=0, retain=retain)

    first = observer(True)
    for x in batches:
        first.update(x)
    rotation = OnlineHadamard(width)
    if cols is None:
        turned = first.transformed(rotation, rotation.exact)
    else:
        turned = first.transformed(lambda x: rotation(x / cols), lambda x: rotation.exact(x / cols.double()))
    again = observer(False)
    for x in batches:
        again.update(rotation(x if cols is None else x / cols))
    assert first.retained is None  # released
    assert turned.tokens == again.tokens and turned.batches == again.batches
    torch.testing.assert_close(turned.absmax, again.absmax, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(turned.hessian, again.hessian, rtol=1e-4, atol=1e-4)
    for half in (None, 0, 1):
        rows, weights = turned.rows(half=half)
        rows_again, weights_again = again.rows(half=half)
        torch.testing.assert_close(rows, rows_again)
        torch.testing.assert_close(weights, weights_again)
    with pytest.raises(MoedgeError, match="not retained"):
        again.transformed(rotation, rotation.exact)
