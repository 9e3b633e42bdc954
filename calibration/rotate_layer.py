"""The online rotation of a layer's MLP output linears, applied after smoothing, statistics turned to match."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch
from torch import nn

from moedge._errors import MoedgeError
from moedge.calibration.layers import LayerSpec, decoder_layers, layer_spec
from moedge.calibration.observers import InputObserver
from moedge.calibration.residual_rotation import check_residual_rotatable
from moedge.calibration.rotation import rotate_input, rotation_factors
from moedge.calibration.smoothing import SmoothingPlan


def rotate_mlp_outputs(
    spec: LayerSpec, rotated: list[str], obs: dict[str, InputObserver], plan: SmoothingPlan
) -> None:
    """Rotate the input of each MLP output linear in ``rotated`` (after its smoothing fold) and turn its
    observed statistics into those of the rotated input: its decision reads them, with no smoothing left
    to apply.

    The rotated input is (x / cols) R for the observed x: the retained batches give its absmax and
    sampled rows, and the Hessian turns exactly (M = diag(1 / cols) R, applied in factored float64 form),
    so the layer is not run again.
    """
    for name in rotated:
        rotation = rotate_input(spec.linears[name]).rotation
        key = spec.input_key[name]
        cols = plan.linears[name].cols
        if cols is None:
            obs[key] = obs[key].transformed(rotation, rotation.exact)
        else:
            obs[key] = obs[key].transformed(
                partial(_smoothed_then_rotated, cols, rotation),
                partial(_smoothed_then_rotated, cols.to(torch.float64), rotation.exact),
            )
        plan.linears[name] = replace(plan.linears[name], cols=None)


def _smoothed_then_rotated(
    cols: torch.Tensor, rotation: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    return rotation(x / cols)


def check_online_rotatable(model: nn.Module) -> None:
    """Refuse, naming the linear, a model with an MLP output linear whose input width has no rotation."""
    for index in range(len(decoder_layers(model))):
        spec = layer_spec(model, index)
        for name in spec.mlp_outputs:
            width = int(spec.linears[name].in_features)
            try:
                rotation_factors(width)
            except MoedgeError as exc:
                raise MoedgeError(f"layer {index} {name}: {exc}") from None


def choose_rotation(model: nn.Module, model_type: str, name: str | None = None) -> tuple[str, str]:
    """What ``--rotate auto`` means for ``model``: (``full``, ``offline``, ``online`` or ``none``, why).

    ``full`` when the residual stream rotates exactly (RMSNorm model, Hadamard of its width) and every
    MLP output linear's input width has an online Hadamard rotation; otherwise the part that applies.
    """
    reasons = []
    try:
        check_residual_rotatable(model, model_type, name)
        residual = True
    except MoedgeError as exc:
        residual = False
        reasons.append(f"no offline rotation ({exc})")
    try:
        check_online_rotatable(model)
        online = True
    except MoedgeError as exc:
        online = False
        reasons.append(f"no online rotation ({exc})")
    choice = {(True, True): "full", (True, False): "offline", (False, True): "online"}.get(
        (residual, online), "none"
    )
    return choice, "; ".join(reasons) or "every width has a Hadamard rotation"
