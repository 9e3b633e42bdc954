"""Wall time per calibration phase, for the result and the recipe."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

PHASES = ("capture", "rotate-residual", "observe", "smooth", "rotate", "decide", "swap", "propagate", "other")
"""The calibration phases ``CalibrationResult.phase_seconds`` times: layer-0 input capture, the offline
residual rotation, observation passes, smoothing search and folds, online rotations (statistics turned),
weight codes and ranges (GPTQ, range search), the fake-quant swap, the quantized pass to the next layer."""


class PhaseClock:
    """Wall seconds per calibration phase (``PHASES``), accumulated over every layer."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as part of phase ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start
