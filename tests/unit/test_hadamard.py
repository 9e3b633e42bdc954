"""moedge.calibration.hadamard: exact +-1 Hadamard matrices and their seeded, normalised rotations."""

from __future__ import annotations

import numpy as np
import pytest

from moedge._errors import MoedgeError
from moedge.calibration.hadamard import hadamard_matrix, random_hadamard

SIZES = (1, 2, 4, 12, 20, 24, 36, 40, 64, 128, 576, 1536)


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_rows_are_exactly_orthogonal(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and np.issubdtype(h.dtype, np.integer)
    assert set(np.unique(h).tolist()) <= {-1, 1}
    assert np.array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))


@pytest.mark.parametrize("n", SIZES)
def test_random_hadamard_is_orthonormal(n):
    q = random_hadamard(n, seed=3)
    assert q.shape == (n, n) and q.dtype == np.float64
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(q.T @ q, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(np.abs(q), 1 / np.sqrt(n), rtol=1e-15)


def test_random_signs_multiply_the_rows_and_depend_on_the_seed_alone():
    n = 576
    h = hadamard_matrix(n)
    a, again, other = random_hadamard(n, 0), random_hadamard(n, 0), random_hadamard(n, 1)
    assert np.array_equal(a, again)
    assert not np.allclose(a, other)
    signs = np.sign(a * np.sqrt(n) * h)  # each row of D H / sqrt(n) is +-1 times the row of H
    assert np.all(signs == signs[:, :1])
    assert 0 < (signs[:, 0] < 0).sum() < n  # some rows flipped, not all


def test_a_rotation_leaves_the_linear_unchanged():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((7, 36)), rng.standard_normal((5, 36))
    x[0, 3] = 3000.0  # a massive activation
    q = random_hadamard(36, seed=9)
    np.testing.assert_allclose((x @ q) @ (w @ q).T, x @ w.T, rtol=1e-10, atol=1e-9)
    assert np.abs(x @ q)[0].max() < 3000.0 / 5  # spread over the channels


@pytest.mark.parametrize("n", (0, -4, 3, 6, 7, 100, 172, 44, 60))
def test_unsupported_orders_are_refused_by_name(n):
    with pytest.raises(MoedgeError, match=rf"order {n}\b.*2\^k, 12 \* 2\^k, 20 \* 2\^k and 36 \* 2\^k"):
        hadamard_matrix(n)
    with pytest.raises(MoedgeError, match=rf"order {n}\b"):
        random_hadamard(n, seed=0)
