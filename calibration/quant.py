"""Int8 primitives in the one form TensorRT explicit quantization and ORT's int8 kernels run.

Weights: symmetric per output channel, integers in [-127, 127]. Activations: static symmetric per
tensor, zero point 0, saturating to [-128, 127] and rounding half to even, exactly as ONNX
QuantizeLinear does, so the fake-quant PyTorch model and a QDQ graph agree bit for bit on the grid.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from moedge._errors import MoedgeError
from moedge.calibration.rotation import OnlineHadamard

log = logging.getLogger(__name__)

QMIN_ACT, QMAX_ACT = -128, 127
QMAX_W = 127


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scale that maps each row's absmax to 127 (rows of zeros get scale 1)."""
    amax = w.abs().amax(dim=1)
    return torch.where(amax > 0, amax / QMAX_W, torch.ones_like(amax))


def quantize_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Int8 codes of ``w`` [out, in] on the per-row grid ``scale`` [out] (round to nearest)."""
    return torch.clamp(torch.round(w / scale[:, None]), -QMAX_W, QMAX_W).to(torch.int8)


def rtn_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest int8 codes and scales of ``w``."""
    scale = weight_scale(w)
    return quantize_weight(w, scale), scale


def fake_quant_act(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``x`` through QuantizeLinear -> DequantizeLinear with a per-tensor symmetric int8 scale."""
    return torch.clamp(torch.round(x / scale), QMIN_ACT, QMAX_ACT) * scale


def act_scale(clip: float) -> float:
    """The per-tensor scale whose int8 grid covers [-clip, clip]."""
    return max(float(clip), 1e-8) / QMAX_ACT


class FakeQuantLinear(nn.Module):
    """A Linear whose input and weight pass through int8 quantize-dequantize: the accuracy reference.

    Holds the int8 codes and scales the recipe stores; the forward pass uses their dequantized product,
    which is what a QDQ graph computes.
    """

    qweight: torch.Tensor
    weight_scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        qweight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        input_scale: float,
        rotation: OnlineHadamard | None = None,
    ) -> None:
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise MoedgeError(
                f"qweight must be a 2-D int8 tensor, got {qweight.dtype} {tuple(qweight.shape)}"
            )
        self.in_features = int(qweight.shape[1])
        self.out_features = int(qweight.shape[0])
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("weight_scale", weight_scale.to(torch.float32).contiguous())
        self.register_buffer("weight", qweight.to(torch.float32) * self.weight_scale[:, None])
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        self.input_scale = float(input_scale)
        self.rotation = rotation  # an online input rotation (rotation.OnlineHadamard), applied first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate the input (when the linear has an online rotation), quantize-dequantize it, then the
        float matmul with the dequantized weight.

        Under autograd the rounding passes gradients straight through (values are unchanged), which
        the sensitivity analysis of the automatic mixed-precision mode needs.
        """
        if self.rotation is not None:
            x = self.rotation(x)
        xq = fake_quant_act(x, self.input_scale)
        if x.requires_grad:
            xq = x + (xq - x).detach()
        return nn.functional.linear(xq, self.weight, self.bias)

    def extra_repr(self) -> str:
        """Shapes and the activation scale, for printing the model."""
        return f"in={self.in_features}, out={self.out_features}, input_scale={self.input_scale:.4g}"


def gptq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    max_damp_tries: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hessian-aware int8 codes of ``w`` [out, in] (GPTQ: Frantar et al. 2022), per-output-channel symmetric.

    ``hessian`` is E[x xᵀ] of the layer input ([in, in]). Columns are quantized in order of decreasing
    Hessian diagonal (act-order) and the rounding error of each is spread over the not yet quantized
    columns through the inverse Hessian's Cholesky factor, in lazy blocks. The damping (a fraction of
    the mean diagonal) grows tenfold whenever the Cholesky factorization fails.
    Returns (int8 codes, scales).
    """
    w = w.detach().to(torch.float32).clone()
    cols = w.shape[1]
    if hessian.shape != (cols, cols):
        raise MoedgeError(f"Hessian shape {tuple(hessian.shape)} does not match weight columns {cols}")
    if scale is None:
        scale = weight_scale(w)
    h = hessian.detach().to(torch.float64).clone()
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    w = w[:, perm]
    h = h[perm][:, perm]
    mean_diag = float(torch.mean(torch.diag(h)))
    eye = torch.eye(cols, dtype=torch.float64)
    lam = damp * mean_diag
    for _ in range(max_damp_tries):
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                break
        log.debug("GPTQ: Cholesky failed with damping %.3g, retrying x10", lam)
        lam = max(lam * 10.0, 1e-6 * mean_diag)
    else:
        raise MoedgeError(f"GPTQ: the Hessian stays singular after {max_damp_tries} damping increases")
    if lam > damp * mean_diag:
        log.info("GPTQ: damping raised to %.3g x mean diagonal", lam / mean_diag)
    hinv_u = upper.to(torch.float32)
    s = scale.to(torch.float32)[:, None]
    q = torch.zeros_like(w)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        h1 = hinv_u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i : i + 1]
            qc = torch.clamp(torch.round(col / s), -QMAX_W, QMAX_W)
            q1[:, i : i + 1] = qc
            err = (col - qc * s) / h1[i, i]
            w1[:, i:] -= err @ h1[i : i + 1, i:]
            err1[:, i : i + 1] = err
        q[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv_u[i1:i2, i2:]
    inverse = torch.argsort(perm)
    return q[:, inverse].to(torch.int8), scale.to(torch.float32)
