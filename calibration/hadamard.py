"""Hadamard matrices for rotating activations before static int8 quantization (QuaRot-style).

A rotation multiplies a linear's input by an orthogonal matrix Q and its weight by Q as well
((x Q)(W Q)^T = x W^T), so an outlier channel spreads over every channel. A normalised Hadamard matrix
with random signs is such a Q. Sizes are 2^k * m with m in {1, 12, 20, 36}: a base matrix of order m
(Paley's constructions) doubled k times (Sylvester), which covers the widths of the models moedge
handles (576 = 36 * 16, 1536 = 12 * 128, and every power of two).

numpy only; nothing here imports torch.
"""

from __future__ import annotations

import operator

import numpy as np

from moedge._errors import MoedgeError

__all__ = ["BASE_ORDERS", "hadamard_matrix", "orthonormal_dct", "random_hadamard"]

BASE_ORDERS = (1, 12, 20, 36)  # n = 2^k * m; 12, 20 and 36 need k >= 0 on top of their own factor 4


def _quadratic_character(q: int) -> np.ndarray:
    """chi(a) for a = 0..q-1 modulo the prime q: 0 at 0, 1 on the nonzero squares, -1 elsewhere."""
    chi = -np.ones(q, dtype=np.int64)
    chi[0] = 0
    chi[[(a * a) % q for a in range(1, q)]] = 1
    return chi


def _jacobsthal(q: int) -> np.ndarray:
    """The q x q Jacobsthal matrix Q[i, j] = chi(j - i) of the prime q."""
    idx = np.arange(q)
    return _quadratic_character(q)[(idx[None, :] - idx[:, None]) % q]


def _paley_one(q: int) -> np.ndarray:
    """Paley construction I (prime q = 3 mod 4): H = I + S of order q + 1, with S = [[0, 1^T], [-1, Q]]."""
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return np.eye(q + 1, dtype=np.int64) + s


def _paley_two(q: int) -> np.ndarray:
    """Paley construction II (prime q = 1 mod 4): order 2(q + 1) from the symmetric conference matrix
    C = [[0, 1^T], [1, Q]]: each 0 of C becomes [[1, -1], [-1, -1]] and each +-1 becomes +-[[1, 1], [1, -1]]."""
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    zero = np.array([[1, -1], [-1, -1]], dtype=np.int64)
    sign = np.array([[1, 1], [1, -1]], dtype=np.int64)
    return np.kron(c, sign) + np.kron((c == 0).astype(np.int64), zero)


def _base(m: int) -> np.ndarray:
    if m == 1:
        return np.ones((1, 1), dtype=np.int64)
    if m == 12:
        return _paley_one(11)
    if m == 20:
        return _paley_one(19)
    return _paley_two(17)  # m == 36


def order_split(n: int) -> tuple[int, int] | None:
    """(m, k) with n = 2^k * m and m in BASE_ORDERS, or None when n has no such form."""
    if n < 1:
        return None
    k, odd = 0, n
    while odd % 2 == 0:
        odd //= 2
        k += 1
    for m in BASE_ORDERS:
        twos = m & -m  # the power of two inside m (1 or 4)
        if m // twos == odd and k >= twos.bit_length() - 1:
            return m, k - (twos.bit_length() - 1)
    return None


def hadamard_matrix(n: int) -> np.ndarray:
    """An n x n matrix of +-1 (int64) with H @ H.T == n * I, for n = 2^k * m, m in {1, 12, 20, 36}.

    Other sizes raise ``MoedgeError`` naming n and the supported forms.
    """
    n = operator.index(n)
    split = order_split(n)
    if split is None:
        raise MoedgeError(
            f"no Hadamard matrix of order {n} here: supported orders are 2^k, 12 * 2^k, 20 * 2^k "
            "and 36 * 2^k (k >= 0)"
        )
    m, k = split
    h = _base(m)
    doubling = np.array([[1, 1], [1, -1]], dtype=np.int64)
    for _ in range(k):
        h = np.kron(doubling, h)
    return h


def normalised_hadamard(n: int) -> np.ndarray:
    """``hadamard_matrix(n) / sqrt(n)`` as float64: orthonormal."""
    return hadamard_matrix(n).astype(np.float64) / np.sqrt(n)


def random_hadamard(n: int, seed: int) -> np.ndarray:
    """An n x n orthonormal float64 matrix D H / sqrt(n): ``hadamard_matrix(n)`` with its rows multiplied
    by random signs D drawn from ``np.random.default_rng(seed)``, so x @ Q flips x's channels, then mixes them.
    """
    h = hadamard_matrix(n).astype(np.float64)
    signs = np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=n)
    return (signs[:, None] * h) / np.sqrt(n)


def orthonormal_dct(n: int) -> np.ndarray:
    """The n x n orthonormal DCT-II matrix, transposed (float64; C^T C = I), so x @ C^T is x's DCT.

    The online rotation's odd factor where no Hadamard matrix of that order exists here (43 in
    stories260K's 172 = 4 x 43): like a Hadamard matrix it spreads one channel over all n, with entries
    of magnitude at most sqrt(2 / n) instead of exactly 1 / sqrt(n), and it needs no seed.
    """
    n = operator.index(n)
    k = np.arange(n, dtype=np.float64)[:, None]
    i = np.arange(n, dtype=np.float64)[None, :]
    c = np.sqrt(2.0 / n) * np.cos(np.pi * (i + 0.5) * k / n)
    c[0] /= np.sqrt(2.0)
    return np.ascontiguousarray(c.T)
