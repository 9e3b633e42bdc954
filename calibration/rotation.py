"""Online Hadamard rotation of a linear's input: the down_proj (and every expert's) input, issue 17.

A rotation R (orthonormal) leaves a linear's output unchanged when both sides turn: x W^T = (x R)(W R)^T.
Rotating the input spreads a token's few huge channels over all of them, so one static per-tensor int8
scale fits the rotated input far better (benchmarks/results/rotation_probe.json). The input of the last
linear of a gated MLP has no fold (the gated product is not linear in anything upstream), so the
rotation runs in the graph, *online*, before the input's QuantizeLinear.

R is a normalised Hadamard matrix factored as a Kronecker product, R = kron(P, Q) with P of order p and Q
of order q (n = p q; p = m 2^i for m in {1, 12, 20, 36}, q a power of two): x R is the row-major
flattening of P^T X Q, X being x reshaped to p x q. In the graph that is a Reshape, two small constant
MatMuls (p x p and q x q: 12 x 12 and 128 x 128 for smollm2's 1536) and a Reshape, never a dense
n x n constant. The weight side, W R, is folded offline into the linear's weight.

A width n = 2^k r whose odd part r has no Hadamard matrix here (stories260K's 172 = 4 x 43) takes
P = the normalised Hadamard matrix of order 2^k and Q = the orthonormal DCT-II of order r
(``hadamard.orthonormal_dct``): still orthonormal and still spreading one channel over all n, same graph.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from moedge._errors import MoedgeError
from moedge.calibration.hadamard import normalised_hadamard, order_split, orthonormal_dct

ROTATIONS = ("auto", "none", "online", "offline", "full")
"""``CalibrationConfig.rotate`` values: the most the model's widths and norms allow (``full``, else
``offline`` or ``online``, else ``none``); no rotation; the online rotation of every MLP output linear's
input; the offline rotation of the residual stream (``calibration/residual_rotation.py``); both."""
MAX_FACTOR = 256
"""The largest factor order; an order needing a larger factor is refused."""


def hadamard_factors(n: int) -> tuple[int, int]:
    """(p, q) with n = p q, p = m 2^i (m in ``BASE_ORDERS``) and q = 2^j, both as small as possible.

    Raises ``MoedgeError`` when n has no Hadamard matrix here or would need a factor above ``MAX_FACTOR``.
    """
    split = order_split(n) if n >= 2 else None
    if split is None:
        raise MoedgeError(
            f"no online Hadamard rotation of width {n}: supported widths are 2^k, 12 * 2^k, 20 * 2^k and "
            "36 * 2^k; calibrate this model with --rotate none"
        )
    base, k = split  # n = base * 2^k
    best: tuple[int, int] | None = None
    for i in range(k + 1):
        p, q = base * (1 << i), 1 << (k - i)
        if best is None or max(p, q) < max(best):
            best = (p, q)
    assert best is not None
    if max(best) > MAX_FACTOR:
        raise MoedgeError(
            f"an online Hadamard rotation of width {n} needs a factor of order {max(best)} (> {MAX_FACTOR}); "
            "calibrate this model with --rotate none"
        )
    return best


def rotation_factors(n: int) -> tuple[int, int, bool]:
    """(p, q, dct) of the online rotation of width n: ``hadamard_factors(n)`` with dct False when n has a
    Hadamard matrix here; else, for n = 2^k r with r odd and at most ``MAX_FACTOR``, p = 2^i and
    q = r 2^(k - i) as balanced as possible and dct True, Q being the orthonormal DCT-II of order q.
    Raises ``MoedgeError`` when neither applies."""
    if n >= 2 and order_split(n) is not None:
        return (*hadamard_factors(n), False)
    odd = n
    while odd > 0 and odd % 2 == 0:
        odd //= 2
    if n < 2 or odd > MAX_FACTOR:
        raise MoedgeError(
            f"no online rotation of width {n}: its odd part {odd} is above {MAX_FACTOR} and it is not "
            f"a Hadamard order (2^k, 12 * 2^k, 20 * 2^k, 36 * 2^k); calibrate this model with --rotate none"
            if n >= 2
            else f"no online rotation of width {n}; calibrate this model with --rotate none"
        )
    twos = n // odd  # P = Hadamard 2^i, Q = DCT of odd 2^j (i + j = log2 twos): the most balanced split
    p = min((1 << i for i in range(twos.bit_length())), key=lambda p: (max(p, n // p), p))
    return p, n // p, True


@functools.lru_cache(maxsize=32)
def _factor_matrices(p: int, q: int, dct: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """P^T and Q of ``OnlineHadamard`` as float64 tensors, shared: callers must not modify them."""
    right = orthonormal_dct(q) if dct else normalised_hadamard(q)
    return torch.from_numpy(normalised_hadamard(p).T.copy()), torch.from_numpy(right)


class OnlineHadamard(nn.Module):
    """x -> x R with R = kron(P, Q) a normalised Hadamard matrix (or, where the width has none, a Hadamard
    matrix times an orthonormal DCT, ``rotation_factors``), as a reshape and two small matmuls."""

    left: torch.Tensor
    right: torch.Tensor

    def __init__(self, width: int) -> None:
        super().__init__()
        p, q, dct = rotation_factors(width)
        self.width, self.p, self.q, self.dct = width, p, q, dct
        left, right = self._factors()
        self.register_buffer("left", left.to(torch.float32))
        self.register_buffer("right", right.to(torch.float32))

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """P^T and Q, float64 (built once per factorisation: exact() runs for every rotated expert)."""
        return _factor_matrices(self.p, self.q, self.dct)

    @property
    def name(self) -> str:
        """The rotation as the recipe records it (``hadamard-PxQ``, or ``hadamard-PxdctQ``)."""
        return f"hadamard-{self.p}x{'dct' if self.dct else ''}{self.q}"

    def exact(self, x: torch.Tensor) -> torch.Tensor:
        """x R in float64 for x [rows, width] (float64 factors): for folding W R and turning statistics
        without a dense n x n product."""
        left, right = self._factors()
        y = torch.matmul(torch.matmul(left, x.to(torch.float64).reshape(-1, self.p, self.q)), right)
        return y.reshape(-1, self.width)

    def dense(self) -> torch.Tensor:
        """R as an n x n float64 matrix (for folding W R offline; never put in a graph)."""
        left, right = self._factors()
        return torch.kron(left.T.contiguous(), right)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x R for x of any leading shape with ``width`` channels last."""
        rows = x.dim() == 2  # an expert's routed rows: reshaped with -1, so its graph reads no shape
        y = x.reshape(-1, self.p, self.q) if rows else x.reshape(*x.shape[:-1], self.p, self.q)
        y = torch.matmul(torch.matmul(self.left.to(x.dtype), y), self.right.to(x.dtype))
        return y.reshape(-1, self.width) if rows else y.reshape(x.shape)

    def extra_repr(self) -> str:
        """The factorisation, for printing the model."""
        return f"width={self.width}, factors={self.name.removeprefix('hadamard-')}"


def rotation_for(name: str, width: int) -> OnlineHadamard:
    """The rotation a recipe names (``hadamard-PxQ``) for an input of ``width`` channels; refuses a mismatch."""
    rotation = OnlineHadamard(width)
    if rotation.name != name:
        raise MoedgeError(
            f"the recipe rotates a {width}-channel input with {name!r}, this moedge builds {rotation.name!r} "
            "for that width: re-run `moedge calibrate` with this version"
        )
    return rotation


class RotatedLinear(nn.Linear):
    """An ``nn.Linear`` whose input is rotated first: F.linear(x R, W, b), W already holding W R."""

    rotation: OnlineHadamard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The linear of the rotated input."""
        return nn.functional.linear(self.rotation(x), self.weight, self.bias)


def as_rotated(linear: nn.Linear, rotation: OnlineHadamard) -> RotatedLinear:
    """``linear`` turned, in place, into a ``RotatedLinear`` using ``rotation`` (its weight left as is)."""
    if type(linear) is not nn.Linear and not isinstance(linear, RotatedLinear):
        raise MoedgeError(
            f"cannot rotate the input of a {type(linear).__name__}: only nn.Linear is supported"
        )
    linear.__class__ = RotatedLinear
    linear.add_module("rotation", rotation)
    return linear  # type: ignore[return-value]


def rotate_input(linear: nn.Linear) -> RotatedLinear:
    """Fold R into ``linear``'s weight (W <- W R, in float64) and rotate its input online: same function."""
    if isinstance(linear, RotatedLinear):
        raise MoedgeError("this linear's input is already rotated")
    rotation = OnlineHadamard(int(linear.in_features)).to(linear.weight.device)
    with torch.no_grad():
        w = linear.weight.detach()
        linear.weight.copy_(rotation.exact(w).to(w.dtype))
    return as_rotated(linear, rotation)


def input_rotation(module: Any) -> OnlineHadamard | None:
    """The online rotation a linear applies to its input, if any."""
    rotation = getattr(module, "rotation", None)
    return rotation if isinstance(rotation, OnlineHadamard) else None


ONLINE_ROTATIONS = ("online", "full")
"""The ``rotate`` values that rotate every MLP output linear's input online."""
RESIDUAL_ROTATIONS = ("offline", "full")
"""The ``rotate`` values that rotate the residual stream offline (``calibration/residual_rotation.py``)."""
