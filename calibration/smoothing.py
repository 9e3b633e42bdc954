"""Smoothing, group by group: choose each group's strength from the observed statistics, then fold it.

``choose_smoothing`` is the decision (it reads weights and statistics and changes nothing);
``smooth_layer`` applies the decisions of one layer in group order and says, per linear, which
smoothing its input received.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import torch

from moedge.calibration.config import CalibrationConfig
from moedge.calibration.layers import LayerSpec, SmoothGroup
from moedge.calibration.observers import InputObserver
from moedge.calibration.search import GroupInput, group_error, smoothing_scale


@dataclass(frozen=True)
class LinearSmoothing:
    """The smoothing one linear's input received."""

    group: str | None = None  # qualified group name (None: the linear is in no group)
    alpha: float | None = None  # strength (None: not smoothed)
    cols: torch.Tensor | None = None  # input column j was divided by cols[j] (None: not smoothed)


@dataclass(frozen=True)
class GroupSmoothing:
    """One group's decision: the scale over its producer's channels and the strength (None, None: none)."""

    scale: torch.Tensor | None
    alpha: float | None


NO_SMOOTHING = GroupSmoothing(None, None)


@dataclass
class SmoothingPlan:
    """What smoothing did to one layer: each group's strength and each linear's input smoothing."""

    alphas: dict[str, float | None] = field(default_factory=dict)  # qualified group name -> strength
    linears: dict[str, LinearSmoothing] = field(default_factory=dict)  # linear name (relative) -> input


def smooth_layer(
    spec: LayerSpec,
    obs: dict[str, InputObserver],
    keep: Collection[str],
    config: CalibrationConfig,
    alpha_fixed: float | None,
    qualified: Callable[[str], str],
) -> SmoothingPlan:
    """Choose and fold every group of ``spec`` in order; linears in ``keep`` stay FP and do not vote.

    The folds change the layer's weights in place (exactly: the layer computes the same function).
    """
    cols: dict[str, torch.Tensor] = {}  # input key -> column scale its consumers' inputs were divided by
    group_of: dict[str, tuple[str, float | None]] = {}
    plan = SmoothingPlan()
    for group in spec.groups:
        consumers = [n for n in group.consumers if n not in keep]
        decision = NO_SMOOTHING
        if config.groups_smoothed(group) and obs[group.stat_key].absmax is not None and consumers:
            decision = choose_smoothing(group, consumers, spec, obs, config, alpha_fixed)
        if decision.scale is not None:
            group.fold(decision.scale, spec.linears)
            expanded = decision.scale if group.expand is None else decision.scale[group.expand]
            for n in group.consumers:
                cols[spec.input_key[n]] = expanded
        name = qualified(group.name)
        plan.alphas[name] = decision.alpha
        for n in group.consumers:
            group_of[n] = (name, decision.alpha)
    for n in spec.linears:
        group_name, alpha = group_of.get(n, (None, None))
        plan.linears[n] = LinearSmoothing(group_name, alpha, cols.get(spec.input_key[n]))
    return plan


@dataclass(frozen=True)
class _GroupView:
    """A group's consumer weights, with the map from consumer columns to producer channels."""

    group: SmoothGroup
    w_absmax_cols: torch.Tensor  # per consumer column: the largest |w| over the consumers

    def to_producer(self, cols_vec: torch.Tensor) -> torch.Tensor:
        """Per-column values as per-channel values of the producer."""
        if self.group.expand is None:
            return cols_vec
        # GQA: several o columns read one v channel; the channel takes their maximum
        return torch.zeros(self.group.channels).scatter_reduce(
            0, self.group.expand, cols_vec, "amax", include_self=False
        )

    def to_cols(self, s: torch.Tensor) -> torch.Tensor:
        """A per-channel producer scale as the consumers' per-column scale."""
        return s if self.group.expand is None else s[self.group.expand]


def choose_smoothing(
    group: SmoothGroup,
    consumers: list[str],
    spec: LayerSpec,
    obs: dict[str, InputObserver],
    config: CalibrationConfig,
    alpha_fixed: float | None,
) -> GroupSmoothing:
    """The group's smoothing scale (over producer channels) and strength: fixed, or searched.

    A searched strength is judged out of sample: scales and ranges come from the even calibration
    batches, the error from rows of the odd ones. Judged in sample, the strongest smoothing always
    looks best, because it puts every channel exactly at its calibration maximum, and the first
    unseen excursion is clipped.
    """
    stat = obs[group.stat_key]
    assert stat.absmax is not None
    view = _GroupView(
        group,
        torch.stack([spec.linears[n].weight.detach().abs().amax(dim=0) for n in consumers]).amax(dim=0),
    )
    w_absmax = view.to_producer(view.w_absmax_cols)
    if alpha_fixed is not None:
        return GroupSmoothing(
            smoothing_scale(view.to_producer(stat.absmax), w_absmax, alpha_fixed), alpha_fixed
        )
    live = [n for n in consumers if obs[spec.input_key[n]].tokens > 0]
    if not live:
        return NO_SMOOTHING
    alpha = _search_alpha(view, w_absmax, live, spec, obs, config)
    if alpha is None:
        return NO_SMOOTHING
    return GroupSmoothing(smoothing_scale(view.to_producer(stat.absmax), w_absmax, alpha), alpha)


def _search_alpha(
    view: _GroupView,
    w_absmax: torch.Tensor,
    live: list[str],
    spec: LayerSpec,
    obs: dict[str, InputObserver],
    config: CalibrationConfig,
) -> float | None:
    """The grid strength with the smallest held-out output error of the ``live`` consumers.

    ``w_absmax`` is the consumers' weight absmax per producer channel. None when no strength beats
    leaving the group unsmoothed.
    """
    stat = obs[view.group.stat_key]
    held_out = stat.batches >= 2 and stat.half_absmax[0] is not None
    eval_half = 1 if held_out else None

    def fit_absmax(o: InputObserver) -> torch.Tensor:
        vec = o.half_absmax[0] if held_out and o.half_absmax[0] is not None else o.absmax
        assert vec is not None
        return vec

    inputs: dict[int, GroupInput] = {}  # consumers reading one input share its rows
    for n in live:
        o = obs[spec.input_key[n]]
        w = spec.linears[n].weight.detach().to(torch.float32)
        if id(o) not in inputs:
            x, rw = o.rows(config.search_tokens, half=eval_half)
            if x.shape[0] == 0:
                x, rw = o.rows(config.search_tokens)
            inputs[id(o)] = GroupInput(x, rw, fit_absmax(o), [], [])
        inputs[id(o)].weights.append(w)
        inputs[id(o)].y_refs.append(inputs[id(o)].x @ w.T)
    group = list(inputs.values())
    x_absmax = view.to_producer(fit_absmax(stat))
    clip_search = config.range_mode.output_search
    errors: dict[float | None, float] = {
        None: group_error(group, torch.ones_like(view.w_absmax_cols), clip_search=clip_search)
    }

    def error(alpha: float) -> float:
        if alpha not in errors:
            s = smoothing_scale(x_absmax, w_absmax, alpha)
            errors[alpha] = group_error(group, view.to_cols(s), clip_search=clip_search)
        return errors[alpha]

    return walk_grid(config.alpha_grid, error, errors[None])


def walk_grid(grid: Sequence[float], error: Callable[[float], float], baseline: float) -> float | None:
    """The strength of ``grid`` with the smallest ``error``, or None when none beats ``baseline``.

    Every other grid point is evaluated first (from the second), then the walk moves to a neighbour of
    the best point while a neighbour improves on it: the full grid's answer when the error has one
    minimum along the grid, with about two thirds of the evaluations.
    """
    if len(grid) <= 3:
        start = list(range(len(grid)))
    else:
        start = list(range(1, len(grid), 2))
    best = min(start, key=lambda i: (error(grid[i]), i))
    while True:
        neighbours = [j for j in (best - 1, best + 1) if 0 <= j < len(grid)]
        better = [j for j in neighbours if error(grid[j]) < error(grid[best])]
        if not better:
            break
        best = min(better, key=lambda j: (error(grid[j]), j))
    return grid[best] if error(grid[best]) < baseline else None
