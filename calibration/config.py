"""The settings of a calibration run and what each method implies."""

from __future__ import annotations

from dataclasses import dataclass

from moedge._errors import MoedgeError
from moedge.arch import smoothing_map
from moedge.calibration.layers import SmoothGroup
from moedge.calibration.ranges import RANGE_MODES, RangeMode, range_mode
from moedge.calibration.rotation import ROTATIONS
from moedge.formats.recipe import METHODS

ACT_CLIPS = tuple(RANGE_MODES)
# Up to 1.0: with the grid ending at 0.9, 83 of smollm2-135m's 120 groups chose 0.9; extending it moved
# 52 groups higher and WikiText-2 from 31.017 to 30.972 (benchmarks/calibration_table.py, haq-a1 row).
HAQ_ALPHAS = (0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95, 1.0)


@dataclass(frozen=True, kw_only=True)
class CalibrationConfig:
    """Every setting of a calibration run; recorded in the recipe.

    ``method`` picks the defaults: ``rtn`` (no smoothing, round-to-nearest weights, absmax
    activations), ``smoothquant`` (norm-preceded groups smoothed at one published strength, RTN,
    absmax), ``gptq`` (Hessian-aware weights, absmax activations), ``haq`` (every foldable group
    smoothed at a strength searched per group, Hessian-aware weights, activation range searched by
    output error). ``act_clip`` and ``alpha`` override the method's choice.
    """

    method: str = "haq"
    act_clip: str | None = None  # a name in ranges.RANGE_MODES (None: the method's default)
    percentile: float = 99.99
    alpha: float | None = None  # fixed smoothing strength (None: the method's default or search)
    alpha_grid: tuple[float, ...] = HAQ_ALPHAS
    sample_tokens: int = 1024
    search_tokens: int = 256  # rows of the sample used while searching the smoothing strength
    coarse_tokens: int = 512  # rows of the sample the output range search's coarse grid is judged on
    gptq_damp: float = 0.01
    gptq_block: int = 128
    act_order: bool = True
    keep_fp: tuple[str, ...] = ()
    auto_keep_fp: float = 0.0  # fraction of linear parameters the automatic mixed-precision mode may keep
    probe_sequences: int = 8  # calibration sequences the automatic mode measures loss sensitivity on
    quantize_head: bool = False  # the LM head too (final norm smoothed into it), as llama.cpp's Q8_0 does
    tie_input_scales: bool = False  # one activation scale for q/k/v and for gate/up (calibration/tie.py)
    # "online": Hadamard-rotate every MLP output linear's input (calibration/rotation.py); "offline":
    # rotate the residual stream by random_hadamard(hidden, seed) (calibration/residual_rotation.py);
    # "full": both; "auto": calibrate() replaces it with the most the model allows (rotate_layer.py)
    rotate: str = "auto"
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MoedgeError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.act_clip is not None and self.act_clip not in ACT_CLIPS:
            raise MoedgeError(
                f"unknown activation clipping {self.act_clip!r}; choose one of {', '.join(ACT_CLIPS)}"
            )
        if self.rotate not in ROTATIONS:
            raise MoedgeError(f"unknown rotation {self.rotate!r}; choose one of {', '.join(ROTATIONS)}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise MoedgeError(f"--alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.auto_keep_fp < 1.0:
            raise MoedgeError(f"the automatic FP fraction must be in [0, 1), got {self.auto_keep_fp}")

    @property
    def clip_mode(self) -> str:
        """The name of the activation range mode."""
        return self.act_clip or ("output" if self.method == "haq" else "absmax")

    @property
    def range_mode(self) -> RangeMode:
        """The activation range mode object (see ``ranges.RANGE_MODES``)."""
        return range_mode(self)

    @property
    def hessian_weights(self) -> bool:
        """Whether weights are quantized with GPTQ (else round-to-nearest)."""
        return self.method in ("gptq", "haq")

    def groups_smoothed(self, group: SmoothGroup) -> bool:
        """Whether ``group`` is smoothed under this method."""
        if self.method == "haq":
            return True
        if self.method == "smoothquant":
            return group.kind == "norm"
        return False

    def fixed_alpha(self, model_type: str) -> float | None:
        """The one smoothing strength every smoothed group gets; None when it is searched per group."""
        if self.method == "smoothquant" and self.alpha is None:
            return smoothing_map(model_type).smoothquant_alpha  # the family's published strength
        return self.alpha
