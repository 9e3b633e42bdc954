"""Error-driven choices: smoothing strength per group and the activation clipping range per linear."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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
    return float(clip_errors(x, [w_deq], [y_ref], [clip], weights)[0, 0])


def clip_errors(
    x: torch.Tensor,
    w_deqs: Sequence[torch.Tensor],
    y_refs: Sequence[torch.Tensor],
    clips: Sequence[float],
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared output errors [clip, consumer] of int8 linears that read one input ``x``.

    Consumer i has the dequantized weight ``w_deqs[i]`` and FP output ``y_refs[i]`` on ``x``; at each
    clip the input is quantized once for all consumers (``OutputErrors``). ``weights`` weighs each row.
    """
    return OutputErrors(x, w_deqs, y_refs, weights, expected_clips=len(clips)).errors(clips)


class OutputErrors:
    """Weighted squared output errors ||Q_c(x) Wᵢᵀ - yᵢ||² of linears reading one input, at any clip c.

    A consumer whose output is wider than its input (an MLP's gate and up) is evaluated through its
    weight's Gram matrix G = Wᵀ W when that pays over ``expected_clips`` evaluations: with E = Q_c(x) - x
    and D = x Wᵀ - y, the error is Σ_rows e G eᵀ + 2 e·(d W) + |d|² (in x in per row instead of in x out).
    The others run directly, as one matmul for all of them per clip.
    """

    def __init__(
        self,
        x: torch.Tensor,
        w_deqs: Sequence[torch.Tensor],
        y_refs: Sequence[torch.Tensor],
        weights: torch.Tensor | None,
        *,
        expected_clips: int,
    ) -> None:
        self.x = x
        self.weights = weights if weights is not None else torch.ones(x.shape[0])
        self.w_deqs, self.y_refs = list(w_deqs), list(y_refs)
        n_in = int(x.shape[1])
        self.gram: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for i, w in enumerate(self.w_deqs):
            out = int(w.shape[0])
            if expected_clips * (out - n_in) > 3 * out:  # three matmuls of precompute, then in/out per clip
                d = torch.addmm(self.y_refs[i], x, w.T, beta=-1)
                self.gram[i] = (w.T @ w, d @ w, float(self.weights @ d.square().sum(dim=1)))

    def errors(self, clips: Sequence[float], members: Sequence[int] | None = None) -> torch.Tensor:
        """Errors [clip, member] at each clip value, for the consumers ``members`` (default: all)."""
        members = list(range(len(self.w_deqs))) if members is None else list(members)
        direct = [i for i in members if i not in self.gram]
        column = {i: j for j, i in enumerate(members)}
        out = torch.empty(len(clips), len(members), dtype=torch.float64)
        w_cat = y_cat = None
        if direct:
            w_cat = torch.cat([self.w_deqs[i] for i in direct]) if len(direct) > 1 else self.w_deqs[direct[0]]
            y_cat = (
                torch.cat([self.y_refs[i] for i in direct], dim=1)
                if len(direct) > 1
                else self.y_refs[direct[0]]
            )
            bounds = torch.tensor([0] + [int(self.w_deqs[i].shape[0]) for i in direct]).cumsum(0).tolist()
        for k, clip in enumerate(clips):
            xq = fake_quant_act(self.x, act_scale(clip))
            if w_cat is not None and y_cat is not None:
                r = torch.addmm(y_cat, xq, w_cat.T, beta=-1).square_()
                per_col = self.weights @ r
                for j, i in enumerate(direct):
                    out[k, column[i]] = per_col[bounds[j] : bounds[j + 1]].sum()
            if len(direct) < len(members):
                e = xq.sub_(self.x)
                for i in members:
                    if i in self.gram:
                        g, c, const = self.gram[i]
                        per_row = (e @ g).mul_(e).sum(dim=1) + 2.0 * (e * c).sum(dim=1)
                        out[k, column[i]] = float(self.weights @ per_row) + const
        return out


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


def search_clips(
    x: torch.Tensor,
    amax: float,
    w_deqs: Sequence[torch.Tensor],
    y_refs: Sequence[torch.Tensor],
    *,
    weights: torch.Tensor | None = None,
    ratios: Sequence[float] = COARSE_CLIPS,
    refine: bool = False,
    coarse: CoarseRows | None = None,
) -> list[tuple[float, float]]:
    """Per consumer of input ``x``, the (clip ratio, output error) ``search_clip`` would find.

    The consumers share each quantization of ``x`` (``OutputErrors``); a ratio earlier in ``ratios``
    wins a tie, and with ``refine`` each consumer refines around its own best coarse ratio. With
    ``coarse``, the coarse grid is judged on those (fewer) rows and only the refinement on ``x``;
    every returned error is on ``x``.
    """
    expected = len(FINE_STEPS) + (1 if coarse is not None else len(ratios))
    evaluator = OutputErrors(x, w_deqs, y_refs, weights, expected_clips=expected)
    if coarse is None:
        errs = evaluator.errors([r * amax for r in ratios])
        first = errs.argmin(dim=0).tolist()  # the first minimum, as a strict < scan finds it
        best = [(ratios[k], float(errs[k, i])) for i, k in enumerate(first)]
    else:
        on_coarse = OutputErrors(coarse.x, w_deqs, coarse.y_refs, coarse.weights, expected_clips=len(ratios))
        first = on_coarse.errors([r * amax for r in ratios]).argmin(dim=0).tolist()
        best = [(ratios[k], math.inf) for k in first]
    if not refine and coarse is None:
        return best
    by_center: dict[float, list[int]] = {}
    for i, (r, _) in enumerate(best):
        by_center.setdefault(r, []).append(i)
    for center, members in by_center.items():
        fine = [r for r in (min(1.0, center * step) for step in FINE_STEPS) if r != center] if refine else []
        candidates = ([center] if coarse is not None else []) + fine
        if not candidates:
            continue
        errs = evaluator.errors([r * amax for r in candidates], members)
        for j, i in enumerate(members):
            for k, r in enumerate(candidates):
                e = float(errs[k, j])
                if e < best[i][1]:
                    best[i] = (r, e)
    return best


@dataclass(frozen=True)
class CoarseRows:
    """Fewer rows of the same input (and each consumer's FP output on them) for a coarse grid."""

    x: torch.Tensor
    weights: torch.Tensor
    y_refs: list[torch.Tensor]


def group_error(
    inputs: Sequence[GroupInput],
    cols: torch.Tensor,
    *,
    clip_search: bool,
) -> float:
    """Summed output error of a group's consumers at column scale ``cols`` (RTN weights, best clip each).

    Each of ``inputs`` is one input the group's consumers read, with those consumers' weights and FP
    outputs on its sample rows.
    """
    total = 0.0
    for inp in inputs:
        xs = inp.x / cols
        w_deqs = []
        for w in inp.weights:
            q, sc = rtn_weight(w * cols)
            w_deqs.append(q.to(torch.float32) * sc[:, None])
        a = float((inp.absmax / cols).max())  # absmax of the smoothed input, over all calibration tokens
        ratios = SEARCH_CLIPS if clip_search else (1.0,)
        errs = clip_errors(xs, w_deqs, inp.y_refs, [r * a for r in ratios], inp.row_weights)
        total += float(errs.min(dim=0).values.sum())
    return total


@dataclass(frozen=True)
class GroupInput:
    """One input read by consumers of a smoothing group: sample rows, their weights, the input's absmax,
    and per consumer its FP weight and FP output on the rows."""

    x: torch.Tensor
    row_weights: torch.Tensor
    absmax: torch.Tensor
    weights: list[torch.Tensor]
    y_refs: list[torch.Tensor]
