"""W8A8 calibration: streamed observers, smoothing, Hessian-aware weights, activation ranges, recipes."""

from moedge.calibration.calibrator import calibrate
from moedge.calibration.config import CalibrationConfig
from moedge.calibration.data import calibration_windows, sample_stories
from moedge.calibration.mixed_precision import keep_most_sensitive
from moedge.calibration.recipe import apply_recipe, save_recipe
from moedge.calibration.result import CalibrationResult

__all__ = [
    "CalibrationConfig",
    "CalibrationResult",
    "apply_recipe",
    "calibrate",
    "calibration_windows",
    "keep_most_sensitive",
    "sample_stories",
    "save_recipe",
]
