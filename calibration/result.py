"""What a calibration run returns: the per-linear reports (built from the decisions) and the run's totals."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from moedge.calibration.config import CalibrationConfig
from moedge.calibration.decision import LinearDecision

# A quantized linear's smoothed FP form, kept for the automatic mixed-precision mode:
# (the module holding it, its attribute name there, weight, bias).
FpWeight = tuple[nn.Module, str, torch.Tensor, torch.Tensor | None]


@dataclass
class LinearReport:
    """What calibration decided and measured for one linear (recipe.json's ``linears`` entries)."""

    quantized: bool
    group: str | None
    alpha: float | None
    input_scale: float | None
    clip_ratio: float | None
    input_absmax: float
    outlier_ratio_before: float
    outlier_ratio_after: float
    rel_error: float  # ||Y_q - Y||² / ||Y||² on the calibration sample, W8A8 vs FP
    params: int
    tokens: int
    untied_input_scale: float | None = None  # the calibrated scale, when tie_input_scales replaced it
    input_rotation: str | None = None  # the online rotation of the input (rotation.OnlineHadamard.name)

    @classmethod
    def from_decision(cls, d: LinearDecision) -> LinearReport:
        """The report of one decision (its tensors left out)."""
        return cls(
            quantized=d.quantized,
            group=d.group,
            alpha=d.alpha,
            input_scale=d.input_scale,
            clip_ratio=d.clip_ratio,
            input_absmax=d.input_absmax,
            outlier_ratio_before=d.outlier_ratio_before,
            outlier_ratio_after=d.outlier_ratio_after,
            rel_error=d.rel_error,
            params=d.params,
            tokens=d.tokens,
            input_rotation=d.input_rotation,
        )


@dataclass
class CalibrationResult:
    """The calibrated (fake-quant) model and everything the recipe records."""

    config: CalibrationConfig
    linears: dict[str, LinearReport]
    smoothing: dict[str, float | None]
    kept_fp: list[str]
    routing: dict[str, Any] | None
    seconds: float
    peak_rss_mb: float
    samples: int
    tokens: int
    excluded: list[str] = field(default_factory=list)
    # wall seconds per calibration phase (``calibrator.PHASES``), summed over layers
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # smoothed FP weights of the quantized linears, kept only when asked (automatic mixed precision)
    fp_weights: dict[str, FpWeight] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (routing is written separately)."""
        return {
            "config": asdict(self.config),
            "linears": {k: asdict(v) for k, v in self.linears.items()},
            "smoothing": self.smoothing,
            "kept_fp": self.kept_fp,
            "excluded": self.excluded,
            "seconds": self.seconds,
            "phase_seconds": self.phase_seconds,
            "peak_rss_mb": self.peak_rss_mb,
            "samples": self.samples,
            "tokens": self.tokens,
        }
