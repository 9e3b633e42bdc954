"""Error-driven choices: smoothing strength per group and the activation clipping range per linear."""

from __future__ import annotations

import torch

from moedge.calibration.quant import act_scale, fake_quant_act, rtn_weight

# Clip ratios (of the input's calibration absmax) tried when the range is chosen by error.
COARSE_CLIPS = (1.0, 0.8, 0.63, 0.5, 0.4, 0.32, 0.25, 0.2, 0.16, 0.125, 0.1, 0.08, 0.063, 0.05, 0.04, 0.03)
SEARCH_CLIPS = (1.0, 0.7, 0.5, 0.35, 0.22, 0.12)  # inside the smoothing-strength search
FINE_STEPS = (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.18, 1.25)


def smoothing_scale(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-channel scale s_j = max|X_j|^a / max|W_j|^(1-a) (1 for channels never active)."""
    x = x_absmax.clamp_min(1e-5)
    w = w_absmax.clamp_min(1e-5)
    s = x.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where(x_absmax > 0, s, torch.ones_like(s))
    return s.clamp(1e-4, 1e4)


def output_error(
    x: torch.Tensor,
    w_deq: torch.Tensor,
    y_ref: torch.Tensor,
    clip: float,
    weights: torch.Tensor | None = None,
) -> float:
    """Squared error of the int8 linear (input clipped at ``clip``, weight ``w_deq``) against ``y_ref``.

    ``weights`` weighs each row (see ``InputObserver.rows``).
    """
    y = fake_quant_act(x, act_scale(clip)) @ w_deq.T
    err = (y - y_ref).square().sum(dim=1)
    return float(err.sum() if weights is None else (err * weights).sum())


def input_error(x: torch.Tensor, clip: float, weights: torch.Tensor | None = None) -> float:
    """Squared quantization error of the input itself (MSE clipping)."""
    err = (fake_quant_act(x, act_scale(clip)) - x).square().sum(dim=1)
    return float(err.sum() if weights is None else (err * weights).sum())


def search_clip(
    x: torch.Tensor,
    amax: float,
    *,
    w_deq: torch.Tensor | None = None,
    y_ref: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    ratios: tuple[float, ...] = COARSE_CLIPS,
    refine: bool = False,
) -> tuple[float, float]:
    """(clip ratio, error) minimizing output error (``w_deq``/``y_ref`` given) or input MSE.

    With ``refine`` the best coarse ratio is refined on a finer multiplicative grid around it.
    """

    def err(r: float) -> float:
        if w_deq is not None and y_ref is not None:
            return output_error(x, w_deq, y_ref, r * amax, weights)
        return input_error(x, r * amax, weights)

    best_r, best_e = 1.0, float("inf")
    for r in ratios:
        e = err(r)
        if e < best_e:
            best_r, best_e = r, e
    if refine:
        center = best_r
        for step in FINE_STEPS:
            r = min(1.0, center * step)
            if r == center:
                continue
            e = err(r)
            if e < best_e:
                best_r, best_e = r, e
    return best_r, best_e


def group_error(
    samples: list[tuple[torch.Tensor, torch.Tensor]],
    weights: list[torch.Tensor],
    absmaxes: list[torch.Tensor],
    cols: torch.Tensor,
    *,
    clip_search: bool,
    y_refs: list[torch.Tensor] | None = None,
) -> float:
    """Summed output error of a group's consumers at column scale ``cols`` (RTN weights, best clip each).

    ``y_refs`` are the consumers' FP outputs on their sample rows (computed here when not given; a
    search over many scales passes them once).
    """
    total = 0.0
    refs = y_refs if y_refs is not None else [x @ w.T for (x, _), w in zip(samples, weights, strict=True)]
    for (x, rw), w, amax, y_ref in zip(samples, weights, absmaxes, refs, strict=True):
        xs = x / cols
        q, sc = rtn_weight(w * cols)
        w_deq = q.to(torch.float32) * sc[:, None]
        a = float((amax / cols).max())  # absmax of the smoothed input, over all calibration tokens
        if clip_search:
            _, e = search_clip(xs, a, w_deq=w_deq, y_ref=y_ref, weights=rw, ratios=SEARCH_CLIPS)
        else:
            e = output_error(xs, w_deq, y_ref, a, rw)
        total += e
    return total
