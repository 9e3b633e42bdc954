"""Offline rotation of the residual stream (QuaRot / SpinQuant style): ``--rotate offline`` and ``full``.

Every decoder layer of a pre-norm RMSNorm model reads the residual stream h only through an RMSNorm and
writes it only through linears (o_proj, every down_proj), and RMSNorm without its weight commutes with
any orthogonal Q: rms(h Q) = rms(h). So, with Q = ``random_hadamard(hidden, seed)`` (D H / sqrt(n),
random signs D), the model computes the same function when, in float64:

1. each layer norm's weight g is folded into the linears that read its output (W <- W diag(g): q/k/v;
   gate/up, or the router, every expert's gate/up, the shared expert's gate/up and the shared expert
   gate) and set to 1;
2. every linear that reads the stream turns with it (W <- W Q) and every linear that writes it turns
   back (W <- Q^T W, bias b <- b Q), so the stream between layers is h Q;
3. the embedding table becomes E Q (a tied head shares it; an untied head also takes W <- W Q), and the
   final norm becomes ``RotatedFinalNorm``: x -> rms(x) Hn^T diag(g_f) Hn diag(w), where Hn = H / sqrt(n)
   and w (ones) is the per-channel scale smoothing folds into with ``--quantize-head``. Since
   Q^T diag(g) Q = Hn^T D diag(g) D Hn = Hn^T diag(g) Hn, the head's input is (h / rms) D diag(g_f) Hn
   and its logits are (h / rms) diag(g_f) E^T, as before. Hn = kron(A, B) with A a power-of-two
   Sylvester matrix, so both products run as small constant MatMuls on a p x q layout of the channels
   made by channel-axis Slices and Concats (``KroneckerRotation``), never a dense n x n constant, in the
   exported head graph, which reads no input but its hidden state.

The one approach serves tied and untied heads alike; the bundle grows by the factor matrices only
(4 x 4 and 144 x 144, twice, for smollm2's 576). The rotation spreads outlier channels of the stream
over all channels before each static int8 quantizer. A recipe records the order and seed; ``apply_recipe``
rebuilds E Q, the head's rotation and ``RotatedFinalNorm`` from them on a fresh FP model (the decoder
layers and the final norm come from the recipe's weights, the rotated embedding is never stored).

Refused, in one line before anything changes: OPT (mean-subtracting LayerNorm with a bias, learned
positions), any residual norm that is not a plain RMSNorm, and hidden sizes with no Hadamard matrix.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from moedge._errors import MoedgeError
from moedge.calibration.hadamard import hadamard_matrix, normalised_hadamard, random_hadamard
from moedge.calibration.layers import decoder_layers, head_modules, layer_spec
from moedge.calibration.rotation import MAX_FACTOR

__all__ = [
    "HADAMARD_MATRIX",
    "KroneckerRotation",
    "ResidualRotation",
    "RotatedFinalNorm",
    "check_residual_rotatable",
    "kronecker_orders",
    "residual_rotation_of",
    "restore_residual_rotation",
    "rotate_residual",
]

log = logging.getLogger(__name__)

HADAMARD_MATRIX = "random_hadamard"
"""The rotation a recipe names: ``moedge.calibration.hadamard.random_hadamard(order, seed)``."""
_ADVICE = "calibrate it with --rotate none or --rotate online"
_RMS_CHECK_TOLERANCE = 1e-5


@dataclass(frozen=True)
class ResidualRotation:
    """The rotation of a model's residual stream: Q = ``random_hadamard(order, seed)``.

    ``embedding_sha256`` is the fingerprint digest of the embedding table before it became E Q (the
    recipe identifies the original model by it).
    """

    order: int
    seed: int
    embedding_sha256: str

    def to_dict(self) -> dict[str, Any]:
        """The recipe's ``residual_rotation`` record."""
        return {
            "matrix": HADAMARD_MATRIX,
            "order": self.order,
            "seed": self.seed,
            "head": "model's final norm: x -> rms(x) Hn^T diag(gain) Hn diag(weight), Hn = H / sqrt(order)",
        }


def kronecker_orders(n: int) -> tuple[int, int]:
    """(p, q) with ``hadamard_matrix(n) == kron(hadamard_matrix(p), hadamard_matrix(q))``, p a power of two
    (``hadamard_matrix`` doubles its base matrix by Sylvester's construction): the smallest p whose q is
    at most ``MAX_FACTOR``, else the most balanced split. p is the number of channel slices a graph
    takes, q the order of the larger constant MatMul (4 x 144 for smollm2's 576).

    Raises ``MoedgeError`` (``hadamard_matrix``'s message) when n has no Hadamard matrix.
    """
    hadamard_matrix(n)  # refuses an order with none
    splits = [(1, n)]
    p = 2
    while n % p == 0:
        try:
            hadamard_matrix(n // p)
        except MoedgeError:
            break
        splits.append((p, n // p))
        p *= 2
    small = [s for s in splits if s[1] <= MAX_FACTOR]
    return small[0] if small else min(splits, key=max)


class KroneckerRotation(nn.Module):
    """x -> x kron(L^T, R) for x with ``p * q`` channels last: the row-major flattening of L X R, X being
    x laid out as p x q (row i: channels i q .. i q + q - 1).

    The layout changes are channel-axis Slices and Concats (``unflatten``, ``flatten``), never a Reshape
    to the leading sizes: the exporter would read those from whichever graph input shares them (the
    batch size from a KV-cache input), so the stage holding the rotation would need inputs besides its
    hidden state.
    """

    left: torch.Tensor
    right: torch.Tensor

    def __init__(self, left: np.ndarray, right: np.ndarray) -> None:
        super().__init__()
        self.p, self.q = int(left.shape[0]), int(right.shape[0])
        self.width = self.p * self.q
        # not in the state dict: rebuilt from the order (a recipe stores no rotation matrices)
        self.register_buffer("left", torch.from_numpy(np.ascontiguousarray(left)).float(), persistent=False)
        self.register_buffer("right", torch.from_numpy(np.ascontiguousarray(right)).float(), persistent=False)

    @classmethod
    def hadamard(cls, n: int, *, transpose: bool = False) -> KroneckerRotation:
        """x -> x Hn (or x Hn^T with ``transpose``), Hn = ``hadamard_matrix(n) / sqrt(n)`` = kron(A, B)."""
        p, q = kronecker_orders(n)
        a, b = normalised_hadamard(p), normalised_hadamard(q)
        return cls(a, b.T) if transpose else cls(a.T, b)

    def dense(self) -> torch.Tensor:
        """The n x n float64 matrix this module multiplies by (for tests; never put in a graph)."""
        return torch.from_numpy(np.kron(self.left.double().numpy().T, self.right.double().numpy()))

    def unflatten(self, x: torch.Tensor) -> torch.Tensor:
        """(..., p q) -> (..., p, q)."""
        x = x.unsqueeze(-2)
        return torch.cat([x[..., i * self.q : (i + 1) * self.q] for i in range(self.p)], dim=-2)

    def flatten(self, y: torch.Tensor) -> torch.Tensor:
        """(..., p, q) -> (..., p q)."""
        return torch.cat([y[..., i : i + 1, :] for i in range(self.p)], dim=-1).squeeze(-2)

    def product(self, y: torch.Tensor) -> torch.Tensor:
        """L Y R on the p x q layout."""
        return torch.matmul(torch.matmul(self.left.to(y.dtype), y), self.right.to(y.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x times the rotation, for any leading shape."""
        return self.flatten(self.product(self.unflatten(x)))

    def extra_repr(self) -> str:
        """The factorisation, for printing the model."""
        return f"width={self.width}, factors={self.p}x{self.q}"


class RotatedFinalNorm(nn.Module):
    """The final RMSNorm of a model whose residual stream is rotated by Q = D Hn (module docstring):
    x -> rms(x) Hn^T diag(gain) Hn diag(weight).

    ``gain`` is the original norm weight g_f; ``weight`` (ones) is the per-channel scale of the head's
    input that ``--quantize-head`` smoothing divides (its fold target, as a norm's weight would be).
    Between the two rotations the tensor stays in their p x q layout (one unflatten, one flatten).
    """

    def __init__(self, norm: nn.Module, rotation: ResidualRotation) -> None:
        super().__init__()
        gain: Any = norm.weight
        self.variance_epsilon = float(_norm_epsilon(norm) or 0.0)
        self.gain = nn.Parameter(gain.detach().clone(), requires_grad=False)
        self.weight = nn.Parameter(torch.ones_like(self.gain), requires_grad=False)
        self.unrotate = KroneckerRotation.hadamard(rotation.order, transpose=True).to(self.gain.device)
        self.rotate = KroneckerRotation.hadamard(rotation.order).to(self.gain.device)
        self.rotation = rotation

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The normalised stream, scaled by g_f in the unrotated basis, rotated by Hn, scaled by ``weight``."""
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(dtype)
        rot = self.rotate
        y = self.unrotate.product(rot.unflatten(x)) * self.gain.view(rot.p, rot.q)
        return rot.flatten(rot.product(y)) * self.weight

    def extra_repr(self) -> str:
        """The rotation, for printing the model."""
        return f"order={self.rotation.order}, seed={self.rotation.seed}, eps={self.variance_epsilon}"


def residual_rotation_of(model: nn.Module) -> ResidualRotation | None:
    """The rotation of ``model``'s residual stream (None when it is not rotated)."""
    try:
        _, norm = head_modules(model)
    except MoedgeError:
        return None
    return norm.rotation if isinstance(norm, RotatedFinalNorm) else None


def _norm_epsilon(norm: nn.Module) -> float | None:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return float(eps) if isinstance(eps, int | float) else None


def _check_rms_norm(norm: nn.Module, where: str, width: int) -> None:
    """Refuse ``norm`` unless it computes g * x / sqrt(mean(x^2) + eps), with no bias."""
    kind = type(norm).__name__
    weight = getattr(norm, "weight", None)
    eps = _norm_epsilon(norm)
    plain = (
        kind.endswith("RMSNorm")
        and isinstance(weight, torch.Tensor)
        and tuple(weight.shape) == (width,)
        and getattr(norm, "bias", None) is None
        and eps is not None
    )
    if plain:
        assert weight is not None and eps is not None
        x = torch.randn(3, width, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
            got = norm(x.to(weight)).float()
        tolerance = max(_RMS_CHECK_TOLERANCE, 8 * torch.finfo(weight.dtype).eps)
        plain = bool(torch.allclose(got, want, rtol=tolerance, atol=tolerance))
    if not plain:
        raise MoedgeError(
            f"{where} is a {kind}, not an RMSNorm (weight * x / rms(x), no bias): the residual stream "
            f"cannot be rotated exactly; {_ADVICE}"
        )


def check_residual_rotatable(model: nn.Module, model_type: str, name: str | None = None) -> int:
    """Refuse, in one line naming the model, a model whose residual stream cannot be rotated exactly;
    returns the stream's width (the hidden size)."""
    from moedge.arch import smoothing_map

    label = name or str(getattr(getattr(model, "config", None), "name_or_path", "")) or type(model).__name__
    if model_type == "opt":
        raise MoedgeError(
            f"{label}: OPT is not rotation-invariant (its LayerNorm subtracts the mean and adds a bias, and "
            f"its learned positions join the residual stream): {_ADVICE}"
        )
    if residual_rotation_of(model) is not None:
        raise MoedgeError(f"{label}: the residual stream is already rotated")
    smap = smoothing_map(model_type)
    emb: Any = model.get_input_embeddings()  # type: ignore[operator]
    width = int(emb.weight.shape[1])
    try:
        hadamard_matrix(width)
    except MoedgeError as exc:
        raise MoedgeError(
            f"{label}: layer 0's input (the residual stream, hidden size {width}): {exc}; {_ADVICE}"
        ) from None
    for index, layer in enumerate(decoder_layers(model)):
        for path in (smap.attn_norm, smap.mlp_norm):
            _check_rms_norm(layer.get_submodule(path), f"{label}: layer {index} {path}", width)
    norm_name, norm = head_modules(model)
    _check_rms_norm(norm, f"{label}: {norm_name}", width)
    return width


def rotate_residual(
    model: nn.Module, model_type: str, seed: int, *, name: str | None = None
) -> ResidualRotation:
    """Rotate ``model``'s residual stream by Q = ``random_hadamard(hidden, seed)`` in place, exactly (the
    same function up to float rounding; computed in float64, cast back). See the module docstring.

    Needs the experts split per expert (``moedge.arch.per_expert.split_experts``). Refused, in one line
    naming the model (``name``) before anything changes, for a model that is not rotation-invariant.
    """
    from moedge.arch import smoothing_map
    from moedge.calibration.recipe import model_fingerprint

    width = check_residual_rotatable(model, model_type, name)
    rotation = ResidualRotation(width, int(seed), str(model_fingerprint(model)["embedding_sha256"]))
    q = torch.from_numpy(random_hadamard(width, rotation.seed))
    out_proj = smoothing_map(model_type).out_proj
    with torch.no_grad():
        for index in range(len(decoder_layers(model))):
            spec = layer_spec(model, index)
            for group in spec.groups:
                if group.kind != "norm":
                    continue
                norm: Any = group.producer
                gain = norm.weight.detach().to(torch.float64)
                readers: list[Any] = [spec.linears[c] for c in group.consumers] + list(group.fp_consumers)
                for reader in readers:  # linears, and routers holding a [experts, hidden] weight
                    _set(reader.weight, (reader.weight.to(torch.float64) * gain[None, :]) @ q)
                norm.weight.fill_(1.0)
            for writer_name in (out_proj, *spec.mlp_outputs):
                writer = spec.linears[writer_name]
                _set(writer.weight, q.T @ writer.weight.to(torch.float64))
                if writer.bias is not None:
                    _set(writer.bias, writer.bias.to(torch.float64) @ q)
        _rotate_embedding_and_head(model, rotation, q)
    log.info("rotated the residual stream (order %d, seed %d)", width, rotation.seed)
    return rotation


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


def _rotate_embedding_and_head(model: nn.Module, rotation: ResidualRotation, q: torch.Tensor) -> None:
    """E <- E Q, an untied head W <- W Q, the final norm -> ``RotatedFinalNorm`` (its gain the norm's weight)."""
    emb: Any = model.get_input_embeddings()  # type: ignore[operator]
    head: Any = getattr(model, "lm_head", None)
    tied = head is not None and head.weight is emb.weight
    _set(emb.weight, emb.weight.to(torch.float64) @ q)
    if head is not None and not tied:
        _set(head.weight, head.weight.to(torch.float64) @ q)
    norm_name, norm = head_modules(model)
    model.set_submodule(norm_name, RotatedFinalNorm(norm, rotation))


def restore_residual_rotation(
    model: nn.Module, record: Mapping[str, Any], *, embedding_sha256: str, where: str
) -> ResidualRotation:
    """Rebuild a recipe's rotated embedding and head on the fresh FP model it was made from, in place:
    E Q, an untied head's W Q and ``RotatedFinalNorm`` (its gain and weight then come from the recipe's
    weights, as the decoder layers do). ``record`` is the recipe's ``residual_rotation``; ``where``
    names the recipe in a refusal."""
    emb: Any = model.get_input_embeddings()  # type: ignore[operator]
    width = int(emb.weight.shape[1])
    order, seed = record.get("order"), record.get("seed")
    if (
        record.get("matrix") != HADAMARD_MATRIX
        or not isinstance(order, int)
        or isinstance(order, bool)
        or not isinstance(seed, int)
        or isinstance(seed, bool)
    ):
        raise MoedgeError(
            f"recipe {where}: field residual_rotation must name {HADAMARD_MATRIX!r} with an integer order "
            f"and seed, got {dict(record)!r}: re-run `moedge calibrate`"
        )
    if order != width:
        raise MoedgeError(
            f"recipe {where} rotates a residual stream of width {order}; this model's is {width}: "
            "the recipe is another model's"
        )
    if residual_rotation_of(model) is not None:
        raise MoedgeError(f"recipe {where}: this model's residual stream is already rotated")
    rotation = ResidualRotation(order, seed, embedding_sha256)
    with torch.no_grad():
        _rotate_embedding_and_head(model, rotation, torch.from_numpy(random_hadamard(order, seed)))
    return rotation
