"""The latency predictor: modeled CPU, GPU and transfer times of one graph call on a hardware profile."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moedge._errors import MoedgeError
from moedge.runtime.costs import GraphCost
from moedge.runtime.profiles import HardwareProfile


class LatencyPredictor:
    """Per expert and token count: CPU time, GPU time and transfer time.

    CPU costs come from timings measured at start-up (``cpu_fit``: seconds = a + b * tokens) when the
    run has a real GPU; on a modeled profile they come from the profile, as do GPU and transfer costs.
    """

    def __init__(
        self, profile: HardwareProfile, *, int8: bool, cpu_fit: tuple[float, float] | None = None
    ) -> None:
        self.profile = profile
        self.int8 = int8
        self.cpu_fit = cpu_fit

    def cpu(self, cost: GraphCost, tokens: int) -> float:
        """Seconds to run the expert on the CPU."""
        if self.cpu_fit is not None:
            return self.cpu_fit[0] + self.cpu_fit[1] * tokens
        return self.profile.cpu_time(cost.bytes, cost.params, tokens, int8=self.int8)

    def gpu(self, cost: GraphCost, tokens: int) -> float:
        """Seconds to run the resident expert on the GPU."""
        return self.profile.gpu_time(cost.bytes, cost.params, tokens, int8=self.int8)

    def transfer(self, cost: GraphCost) -> float:
        """Seconds to make the expert resident."""
        return self.profile.transfer_time(cost.bytes)


def fit_cpu_timings(timings: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``seconds = a + b * tokens`` from measured (tokens, seconds) pairs."""
    if len(timings) < 2:
        raise MoedgeError("fitting CPU timings needs at least two token counts")
    n = np.asarray([t for t, _ in timings], dtype=np.float64)
    s = np.asarray([x for _, x in timings], dtype=np.float64)
    b, a = np.polyfit(n, s, 1)
    return max(float(a), 0.0), max(float(b), 0.0)
