"""Int8 primitives in the one form TensorRT explicit quantization and ORT's int8 kernels run.

Weights: symmetric per output channel, integers in [-127, 127]. Activations: static symmetric per
tensor, zero point 0, saturating to [-128, 127] and rounding half to even, exactly as ONNX
QuantizeLinear does, so the fake-quant PyTorch model and a QDQ graph agree bit for bit on the grid.
"""

from __future__ import annotations

import torch
from torch import nn

from moedge._errors import MoedgeError
from moedge.calibration.rotation import OnlineHadamard

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
    return torch.div(x, scale).round_().clamp_(QMIN_ACT, QMAX_ACT).mul_(scale)


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
