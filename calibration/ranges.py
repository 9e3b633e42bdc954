"""Activation range modes: how the clipping range of one linear's input is chosen.

One small class per mode, each with one method (``choose``), picked by name from ``RANGE_MODES``.
A mode sees the linear's observed input (sampled rows, already divided by the smoothing scale when
the linear is smoothed), the input's calibration absmax and the quantized weight, and returns the
clip value with its ratio to that absmax.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from moedge._errors import MoedgeError
from moedge.calibration.observers import InputObserver
from moedge.calibration.search import COARSE_CLIPS, CoarseRows, search_clip, search_clips

if TYPE_CHECKING:
    from moedge.calibration.config import CalibrationConfig


@dataclass(frozen=True)
class RangeSample:
    """What a range mode may look at for one linear."""

    observer: InputObserver  # the streamed statistics of the unsmoothed input
    x: torch.Tensor  # sampled input rows (``InputObserver.rows``), smoothed when the linear is
    row_weights: torch.Tensor  # each row's weight in sums over all tokens
    amax: float  # absmax of the (smoothed) input over every calibration token
    smoothed: bool  # whether ``x`` was divided by a smoothing scale
    w_deq: torch.Tensor  # the dequantized int8 weight
    y_ref: torch.Tensor  # the FP output of the (smoothed) FP weight on ``x``
    coarse: CoarseRows | None = None  # fewer rows of the input, for a search's coarse grid


@dataclass(frozen=True)
class RangeChoice:
    """The chosen clip value and its ratio to the input's absmax (None when no token was seen)."""

    clip: float
    ratio: float | None


class RangeMode(ABC):
    """One way of choosing an activation range."""

    name: ClassVar[str]
    histogram: ClassVar[bool] = False  # observation must keep the |x| histogram
    output_search: ClassVar[bool] = False  # the smoothing-strength search also picks ranges by output error

    @classmethod
    def from_config(cls, config: CalibrationConfig) -> RangeMode:
        """The mode with the settings ``config`` gives it."""
        return cls()

    @abstractmethod
    def choose(self, sample: RangeSample) -> RangeChoice:
        """The clip value for the input described by ``sample``."""

    def choose_many(self, samples: Sequence[RangeSample]) -> list[tuple[RangeChoice, float | None]]:
        """The choice for each of ``samples`` (linears reading one input), with the weighted squared
        output error it leaves when the mode measured it on the way (else None)."""
        return [(self.choose(s), None) for s in samples]


class AbsmaxRange(RangeMode):
    """The calibration maximum: nothing is clipped."""

    name = "absmax"

    def choose(self, sample: RangeSample) -> RangeChoice:
        """The absmax itself (ratio 1)."""
        return RangeChoice(sample.amax, 1.0)


@dataclass(frozen=True)
class PercentileRange(RangeMode):
    """A percentile of |x| over every input element."""

    name: ClassVar[str] = "percentile"
    histogram: ClassVar[bool] = True
    percentile: float = 99.99

    @classmethod
    def from_config(cls, config: CalibrationConfig) -> RangeMode:
        """The mode at ``config.percentile``."""
        return cls(config.percentile)

    def choose(self, sample: RangeSample) -> RangeChoice:
        """The streamed histogram's percentile; for a smoothed input, the exact one of the uniform rows.

        The histogram is of the unsmoothed input, so a smoothed linear reads the percentile off its
        (smoothed) uniform sample rows instead. Clamped to (0, absmax].
        """
        if not sample.smoothed:
            clip = sample.observer.percentile(self.percentile)
        else:
            uniform = sample.x[sample.row_weights == 1].abs().flatten()
            clip = float(torch.quantile(uniform[: 1 << 24], self.percentile / 100.0))
        amax = sample.amax
        clip = min(max(clip, 1e-8), amax) if amax > 0 else 1.0
        return RangeChoice(clip, clip / amax if amax > 0 else 1.0)


class MseRange(RangeMode):
    """The clip ratio that minimizes the input's own quantization error."""

    name = "mse"

    def choose(self, sample: RangeSample) -> RangeChoice:
        """Searched on the coarse grid, then refined."""
        ratio, _ = search_clip(sample.x, sample.amax, weights=sample.row_weights, refine=True)
        return RangeChoice(ratio * sample.amax, ratio)


class OutputRange(RangeMode):
    """The clip ratio that minimizes the int8 linear's output error against the FP output."""

    name = "output"
    output_search = True

    def choose(self, sample: RangeSample) -> RangeChoice:
        """Searched on the coarse grid with the quantized weight, then refined."""
        return self.choose_many([sample])[0][0]

    def choose_many(self, samples: Sequence[RangeSample]) -> list[tuple[RangeChoice, float | None]]:
        """Each linear's ratio searched on the coarse grid (on the samples' ``coarse`` rows when given),
        then refined around its own best; the linears share every quantization of their common input
        (``search.search_clips``)."""
        first = samples[0]
        coarse = None
        if first.coarse is not None:
            coarse = CoarseRows(
                first.coarse.x, first.coarse.weights, [s.coarse.y_refs[0] for s in samples if s.coarse]
            )
        found = search_clips(
            first.x,
            first.amax,
            [s.w_deq for s in samples],
            [s.y_ref for s in samples],
            weights=first.row_weights,
            ratios=COARSE_CLIPS,
            refine=True,
            coarse=coarse,
        )
        return [(RangeChoice(r * first.amax, r), e) for r, e in found]


RANGE_MODES: dict[str, type[RangeMode]] = {
    "absmax": AbsmaxRange,
    "percentile": PercentileRange,
    "mse": MseRange,
    "output": OutputRange,
}


def range_mode(config: CalibrationConfig) -> RangeMode:
    """The range mode ``config`` selects (``config.clip_mode``), with its settings."""
    try:
        mode = RANGE_MODES[config.clip_mode]
    except KeyError:
        raise MoedgeError(
            f"unknown activation clipping {config.clip_mode!r}; choose one of {', '.join(RANGE_MODES)}"
        ) from None
    return mode.from_config(config)
