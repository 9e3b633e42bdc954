"""Perplexity by the BENCHMARKS.md protocol, for a PyTorch model or an exported folder in ONNX Runtime."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from moedge.datasets import windows as cut_windows

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from moedge.runtime.bundle_runner import BundleRunner
    from moedge.runtime.ort_causal_lm import OrtCausalLM

WindowLogits = Callable[[np.ndarray], np.ndarray]  # (seqlen,) ids -> (seqlen, vocab) logits


@dataclass(frozen=True)
class PerplexityResult:
    """A perplexity figure with everything needed to reproduce it."""

    perplexity: float
    mean_nll: float
    dataset: str
    seqlen: int
    windows: int
    tokens: int
    backend: str
    seconds: float

    def summary(self) -> str:
        """One line for the terminal."""
        return (
            f"perplexity {self.perplexity:.4f} on {self.dataset} ({self.backend}; seqlen {self.seqlen}, "
            f"{self.windows} windows, {self.tokens:,} predicted tokens, {self.seconds:.0f} s)"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


def window_nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Summed negative log-likelihood of ``ids[1:]`` under ``logits[:-1]``.

    Exponentials run in float32 after subtracting each row's maximum (exact enough: every term is in
    (0, 1]); the sums accumulate in float64.
    """
    pred = np.asarray(logits[:-1], dtype=np.float32)
    target = ids[1:]
    peak = pred.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(pred - peak).sum(axis=-1, dtype=np.float64)) + peak[:, 0]
    return float((log_z - pred[np.arange(len(target)), target]).sum(dtype=np.float64))


def torch_logits(model: PreTrainedModel) -> WindowLogits:
    """Window scorer for a PyTorch causal LM (FP32, no cache)."""
    import torch

    def run(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids)[None], use_cache=False)
        return out.logits[0].float().numpy()

    return run


def ort_logits(lm: OrtCausalLM | BundleRunner) -> WindowLogits:
    """Window scorer for an exported folder or a bundle run by ONNX Runtime."""

    def run(ids: np.ndarray) -> np.ndarray:
        logits, _ = lm.forward(ids[None])
        return logits[0]

    return run


def perplexity(
    score: WindowLogits,
    ids: np.ndarray,
    *,
    seqlen: int,
    max_windows: int | None = None,
    dataset: str = "text",
    backend: str = "",
    progress: bool = True,
) -> PerplexityResult:
    """exp(mean NLL) over non-overlapping ``seqlen`` windows of ``ids``, every predicted token weighted equally."""
    rows = cut_windows(ids, seqlen, max_windows=max_windows)
    start = time.perf_counter()
    total = 0.0
    for row in tqdm(rows, desc=f"perplexity [{backend}]", unit="window", disable=not progress):
        total += window_nll(score(row), row)
    tokens = rows.shape[0] * (seqlen - 1)
    mean = total / tokens
    return PerplexityResult(
        perplexity=math.exp(mean),
        mean_nll=mean,
        dataset=dataset,
        seqlen=seqlen,
        windows=int(rows.shape[0]),
        tokens=tokens,
        backend=backend,
        seconds=time.perf_counter() - start,
    )
