"""The online Hadamard rotation: factors, the graph-shaped forward against the dense matrix, the fold."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moedge._errors import MoedgeError
from moedge.calibration.rotation import (
    MAX_FACTOR,
    OnlineHadamard,
    RotatedLinear,
    as_rotated,
    hadamard_factors,
    input_rotation,
    rotate_input,
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


@pytest.mark.parametrize("n", [96, 576, 1536])
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
    # a massive channel spreads over the whole token: the per-tensor range drops by about sqrt(n)
    spike = torch.zeros(1, n)
    spike[0, 7] = 3000.0
    assert float(rot(spike).abs().max()) == pytest.approx(3000.0 / n**0.5, rel=1e-5)


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
