"""The online rotation of a layer's MLP output linears, applied after smoothing, statistics turned to match."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch

from moedge.calibration.layers import LayerSpec
from moedge.calibration.observers import InputObserver
from moedge.calibration.rotation import rotate_input
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
