"""GPTQ (Frantar et al. 2022) for a batch of weights at once: per-output-channel symmetric int8 codes.

Every matrix of the batch has its own Hessian; one Python column loop serves them all (batched tensor
ops), which is what makes a MoE layer's experts cheap to quantize: the loop, not the arithmetic, is the
cost at these sizes. Linears that read the same input share its Hessian, so their rows are stacked into
one matrix of the batch before the call (``calibration.decision.layer_weight_codes``).
"""

from __future__ import annotations

import logging

import torch

from moedge._errors import MoedgeError
from moedge.calibration.quant import QMAX_W, weight_scale

log = logging.getLogger(__name__)


def gptq_batch(
    w: torch.Tensor,
    hessian: torch.Tensor,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    max_damp_tries: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hessian-aware int8 codes of each ``w[b]`` ([B, out, in]) under its ``hessian[b]`` ([B, in, in]).

    ``hessian[b]`` is E[x xᵀ] of matrix b's input. Per matrix, columns are quantized in order of
    decreasing Hessian diagonal (act-order) and each column's rounding error is spread over the columns
    not yet quantized through the upper Cholesky factor of the inverse Hessian, in lazy blocks. A column
    whose Hessian diagonal is zero (never active) is zeroed. The damping (a fraction of the matrix's mean
    diagonal) grows tenfold for a matrix whose factorization fails. Returns (int8 codes [B, out, in],
    float32 per-row scales [B, out]); the scales map each row's absmax to 127.
    """
    if w.dim() != 3 or hessian.dim() != 3:
        raise MoedgeError(f"gptq_batch takes [B, out, in] weights and [B, in, in] Hessians, got {w.dim()}-D")
    batch, _, cols = w.shape
    if hessian.shape != (batch, cols, cols):
        raise MoedgeError(
            f"Hessian shape {tuple(hessian.shape)} does not match {batch} weights of {cols} columns"
        )
    w = w.detach().to(torch.float32)
    scale = weight_scale(w.reshape(-1, cols)).reshape(batch, -1)  # [B, out]
    h = hessian.detach().to(torch.float32)
    diag = h.diagonal(dim1=1, dim2=2).clone()
    dead = diag <= 0  # [B, in]
    diag[dead] = 1.0
    wt = w.transpose(1, 2).clone()  # [B, in, out]: a column of w is a contiguous row here
    wt[dead] = 0.0
    if act_order:
        perm = torch.argsort(diag, dim=1, descending=True)
    else:
        perm = torch.arange(cols).expand(batch, cols)
    wt = torch.stack([wt[b].index_select(0, perm[b]) for b in range(batch)])
    # the Hessian in reversed act order (see _inverse_cholesky_upper), gathered before the float64 copy
    back = perm.flip(1)
    h_rev = torch.stack([h[b].index_select(0, back[b]).index_select(1, back[b]) for b in range(batch)])
    h_rev = h_rev.to(torch.float64)
    h_rev.diagonal(dim1=1, dim2=2)[dead.gather(1, back)] = 1.0
    hinv_u = _inverse_cholesky_upper(h_rev, damp, max_damp_tries).to(torch.float32)
    s = scale[:, None, :]  # [B, 1, out]
    q = torch.empty_like(wt)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = wt[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        h1 = hinv_u[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i : i + 1]  # [B, 1, out]
            qc = torch.clamp(torch.round(col / s), -QMAX_W, QMAX_W)
            q[:, i1 + i : i1 + i + 1] = qc
            err = (col - qc * s) / h1[:, i, i, None, None]
            w1[:, i:] -= h1[:, i, i:, None] * err
            err1[:, i : i + 1] = err
        if i2 < cols:
            wt[:, i2:] -= torch.bmm(hinv_u[:, i1:i2, i2:].transpose(1, 2), err1)
    inverse = torch.argsort(perm, dim=1)
    codes = torch.stack([q[b].index_select(0, inverse[b]) for b in range(batch)]).transpose(1, 2)
    return codes.to(torch.int8).contiguous(), scale


def _inverse_cholesky_upper(h_rev: torch.Tensor, damp: float, max_tries: int) -> torch.Tensor:
    """Per matrix, the upper triangular U with Uᵀ U = (H + lam I)⁻¹, given ``h_rev`` = J H J (float64).

    J is the order-reversing permutation: with L the lower Cholesky factor of J (H + lam I) J,
    U = J L⁻¹ J, so one Cholesky factorization and one triangular inverse give U, with no explicit
    inverse. ``lam`` starts at ``damp`` x the mean diagonal and grows tenfold for each matrix whose
    factorization fails. ``h_rev`` is damped in place.
    """
    batch, n, _ = h_rev.shape
    diagonal = h_rev.diagonal(dim1=1, dim2=2)
    mean_diag = diagonal.mean(dim=1)
    lam = damp * mean_diag
    diagonal.add_(lam[:, None])
    eye = torch.eye(n, dtype=torch.float64)
    out = torch.empty_like(h_rev)
    todo = torch.arange(batch)
    for _ in range(max_tries):
        chol, info = torch.linalg.cholesky_ex(h_rev if todo.numel() == batch else h_rev[todo])
        ok = info == 0
        if bool(ok.any()):
            inv = torch.linalg.solve_triangular(chol[ok], eye.expand(int(ok.sum()), n, n), upper=False)
            good = torch.isfinite(inv).flatten(1).all(dim=1)
            out[todo[ok][good]] = inv[good].flip(1, 2)
            ok[ok.clone()] = good
        todo = todo[~ok]
        if todo.numel() == 0:
            break
        log.debug("GPTQ: Cholesky failed for %d matrices, retrying with 10x damping", todo.numel())
        for b in todo.tolist():
            new = max(float(lam[b]) * 10.0, 1e-6 * float(mean_diag[b]))
            diagonal[b].add_(new - float(lam[b]))
            lam[b] = new
    else:
        raise MoedgeError(f"GPTQ: the Hessian stays singular after {max_tries} damping increases")
    raised = lam > damp * mean_diag
    if bool(raised.any()):
        log.info("GPTQ: damping raised for %d of %d matrices", int(raised.sum()), batch)
    return out
