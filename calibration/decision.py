"""One linear's W8A8 decision, computed from its weight and observed input without changing anything.

``quantize_linear`` is the solver: weight codes (GPTQ on the observed Hessian, or round-to-nearest),
the activation range (the config's range mode), and the measurements the report records. Swapping
the linear for its fake-quant form is the caller's business.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch

from moedge.calibration.config import CalibrationConfig
from moedge.calibration.gptq import gptq_batch
from moedge.calibration.observers import InputObserver
from moedge.calibration.quant import QMAX_ACT, act_scale, rtn_weight
from moedge.calibration.ranges import RangeChoice, RangeSample
from moedge.calibration.search import CoarseRows, output_error
from moedge.calibration.smoothing import LinearSmoothing


@dataclass(frozen=True, kw_only=True)
class LinearDecision:
    """What calibration decided and measured for one linear."""

    name: str  # qualified module name
    kept_fp: bool  # left in full precision (no codes, no scales)
    group: str | None  # smoothing group (qualified), if any
    alpha: float | None  # smoothing strength folded into the input (None: not smoothed)
    qweight: torch.Tensor | None = field(repr=False)  # int8 codes [out, in]
    weight_scale: torch.Tensor | None = field(repr=False)  # float32 per-output-channel scales [out]
    input_scale: float | None  # per-tensor activation scale
    clip_ratio: float | None  # clip / input absmax (None: no token reached the input)
    input_absmax: float  # of the smoothed input
    outlier_ratio_before: float  # channel absmax max / median, before smoothing
    outlier_ratio_after: float  # the same after smoothing
    rel_error: float  # ||Y_q - Y||² / ||Y||² on the calibration sample, W8A8 vs FP
    params: int
    tokens: int
    input_rotation: str | None = None  # the online rotation of the input (rotation.OnlineHadamard.name)

    @property
    def quantized(self) -> bool:
        """Whether the linear runs in W8A8."""
        return not self.kept_fp


def quantize_linear(
    name: str,
    weight: torch.Tensor,
    stats: InputObserver,
    config: CalibrationConfig,
    *,
    smoothing: LinearSmoothing | None = None,
    keep_fp: bool = False,
    idle_clip: float | None = None,
    input_rotation: str | None = None,
    codes: tuple[torch.Tensor, torch.Tensor] | None = None,
    input_range: tuple[RangeChoice, float] | None = None,
) -> LinearDecision:
    """Decide one linear: ``weight`` [out, in] (already smoothed) whose input ``stats`` observed.

    ``smoothing`` says how the input was smoothed (its column scale divides the observed rows and
    the Hessian); ``keep_fp`` keeps the linear in FP with its measurements only. ``idle_clip`` is the
    range used when no token reached the input (else 1.0); ``input_rotation`` names the online rotation
    the observed input already went through (recorded only). Nothing passed in is modified.
    """
    sm = smoothing or LinearSmoothing()
    absmax = stats.absmax if stats.absmax is not None else torch.zeros(weight.shape[1])
    if sm.cols is not None:
        absmax = absmax / sm.cols
    amax = float(absmax.max())
    kept = LinearDecision(
        name=name,
        kept_fp=True,
        group=sm.group,
        alpha=sm.alpha,
        qweight=None,
        weight_scale=None,
        input_scale=None,
        clip_ratio=None,
        input_absmax=amax,
        outlier_ratio_before=stats.outlier_ratio(),
        outlier_ratio_after=amax / max(float(absmax.median()), 1e-12) if stats.tokens else math.nan,
        rel_error=0.0,
        params=weight.numel(),
        tokens=stats.tokens,
        input_rotation=input_rotation,
    )
    if keep_fp:
        return kept
    w = weight.detach().to(torch.float32)
    one = ({name: w}, {name: stats}, {name: sm.cols})
    q, sc = codes if codes is not None else layer_weight_codes(*one, config)[name]
    if stats.tokens == 0:
        choice, rel = RangeChoice(idle_clip or 1.0, None), math.nan
    elif input_range is not None:
        choice, rel = input_range
    else:
        choice, rel = layer_input_ranges(one[0], {name: (q, sc)}, one[1], one[2], config)[name]
    return replace(
        kept,
        kept_fp=False,
        qweight=q,
        weight_scale=sc,
        input_scale=act_scale(choice.clip),
        clip_ratio=choice.ratio,
        rel_error=rel,
    )


def _smoothed_hessian(stats: InputObserver, cols: torch.Tensor | None) -> torch.Tensor:
    """The observed Hessian of the input divided by the smoothing scale on both sides."""
    h = stats.hessian
    return h if cols is None else h / (cols[:, None] * cols[None, :])


def layer_weight_codes(
    linears: Mapping[str, torch.Tensor],
    stats: Mapping[str, InputObserver],
    cols: Mapping[str, torch.Tensor | None],
    config: CalibrationConfig,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ codes and scales of every linear in ``linears`` (name -> weight [out, in]), all at once.

    ``stats`` and ``cols`` give, per linear, its input's observer and smoothing scale. Linears that
    read one input (the same observer) share its Hessian, so their rows are stacked into one matrix;
    matrices of one shape are solved in one batch (a MoE layer's experts). Linears whose input no token
    reached, and every linear of a method without Hessian-aware weights, are rounded to nearest.
    """
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    by_input: dict[int, list[str]] = {}
    for name, w in linears.items():
        if config.hessian_weights and stats[name].tokens > 0:
            by_input.setdefault(id(stats[name]), []).append(name)
        else:
            out[name] = rtn_weight(w.detach().to(torch.float32))
    by_shape: dict[tuple[int, int], list[list[str]]] = {}
    for names in by_input.values():
        rows = sum(int(linears[n].shape[0]) for n in names)
        by_shape.setdefault((rows, int(linears[names[0]].shape[1])), []).append(names)
    for groups in by_shape.values():
        w = torch.stack([torch.cat([linears[n].detach().to(torch.float32) for n in g]) for g in groups])
        h = torch.stack([_smoothed_hessian(stats[g[0]], cols[g[0]]) for g in groups])
        q, sc = gptq_batch(
            w, h, damp=config.gptq_damp, block_size=config.gptq_block, act_order=config.act_order
        )
        for b, g in enumerate(groups):
            start = 0
            for n in g:
                end = start + int(linears[n].shape[0])
                out[n] = (q[b, start:end].clone(), sc[b, start:end].clone())
                start = end
    return out


def peer_clip(decisions: Iterable[LinearDecision], name: str) -> float | None:
    """The widest activation range among the ``decisions`` of experts in ``name``'s layer with its role.

    For an expert no calibration token reached: its range comes from its calibrated peers.
    """
    head, _, leaf = name.rpartition(".")
    layer_prefix = head.rsplit(".experts.", 1)[0]
    peers = [
        d.input_scale * QMAX_ACT
        for d in decisions
        if d.name.startswith(layer_prefix + ".experts.")
        and d.name.endswith("." + leaf)
        and d.input_scale is not None
    ]
    return max(peers) if peers else None


def layer_input_ranges(
    linears: Mapping[str, torch.Tensor],
    codes: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    stats: Mapping[str, InputObserver],
    cols: Mapping[str, torch.Tensor | None],
    config: CalibrationConfig,
) -> dict[str, tuple[RangeChoice, float]]:
    """The activation range and relative output error of every linear in ``codes`` whose input saw tokens.

    Arguments as ``layer_weight_codes`` (``codes``: its result). Linears reading one input are decided
    together (``RangeMode.choose_many``), each against its own FP output.
    """
    mode = config.range_mode
    by_input: dict[int, list[str]] = {}
    for name in codes:
        if stats[name].tokens > 0:
            by_input.setdefault(id(stats[name]), []).append(name)
    out: dict[str, tuple[RangeChoice, float]] = {}
    for names in by_input.values():
        st, c = stats[names[0]], cols[names[0]]
        x, rw = st.rows()
        absmax = st.absmax if st.absmax is not None else torch.zeros(x.shape[1])
        if c is not None:
            x, absmax = x / c, absmax / c
        amax = float(absmax.max())
        cx = crw = None
        if (
            mode.output_search
            and 0 < config.coarse_tokens < st.sample_tokens
            and st.tokens > config.coarse_tokens
        ):
            cx, crw = st.rows(config.coarse_tokens)
            cx = cx / c if c is not None else cx
        samples = []
        for n in names:
            w = linears[n].detach().to(torch.float32)
            q, sc = codes[n]
            coarse = None if cx is None or crw is None else CoarseRows(cx, crw, [cx @ w.T])
            samples.append(
                RangeSample(
                    st, x, rw, amax, c is not None, q.to(torch.float32) * sc[:, None], x @ w.T, coarse
                )
            )
        for n, sample, (choice, err) in zip(names, samples, mode.choose_many(samples), strict=True):
            if err is None:
                err = output_error(x, sample.w_deq, sample.y_ref, choice.clip, rw)
            denom = float((sample.y_ref.square().sum(dim=1) * rw).sum())
            out[n] = (choice, err / denom if denom > 0 else 0.0)
    return out
