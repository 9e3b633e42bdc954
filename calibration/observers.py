"""Streaming statistics of linear inputs, gathered through forward hooks without storing activations.

Per input key (one tensor read by one or more linears): per-channel absmax, a log-spaced histogram of
|x| (for percentile clipping), the second moment E[x xᵀ] (the GPTQ Hessian up to a factor 2) and a
seeded fixed-size sample of rows for error-driven searches. Expert inputs hold only the tokens routed
to that expert, because the hook sits on the expert's own linear.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from moedge._errors import MoedgeError
from moedge.calibration.rotation import input_rotation

HIST_LO, HIST_HI, HIST_PER_OCTAVE = -24, 24, 8  # |x| bins from 2^-24 to 2^24
_BLOCKED_FROM, _HESSIAN_BLOCKS = 256, 4  # inputs this wide accumulate xᵀ x by upper block rows


class InputObserver:
    """Running statistics of one linear input."""

    def __init__(
        self,
        key: str,
        *,
        hessian: bool,
        sample_tokens: int,
        seed: int,
        tail_tokens: int = 64,
        histogram: bool = True,
        retain: bool = False,
    ) -> None:
        self.key = key
        self.seed = seed
        # every batch seen, kept for ``transformed`` (the input of a linear rotated after observation)
        self.retained: list[torch.Tensor] | None = [] if retain else None
        self.want_hessian = hessian
        self.want_histogram = histogram
        self.sample_tokens = sample_tokens
        self.tail_tokens = tail_tokens
        self._tail: torch.Tensor | None = None
        self._tags = torch.zeros(0, dtype=torch.int8)
        self._tail_tags = torch.zeros(0, dtype=torch.int8)
        self._tail_amax = torch.zeros(0)
        self._symmetric = True
        self.tokens = 0
        self.batches = 0
        self.absmax: torch.Tensor | None = None
        # per-channel absmax of even and odd batches: a range calibrated on one half, judged on the other
        self.half_absmax: list[torch.Tensor | None] = [None, None]
        self.hist = torch.zeros((HIST_HI - HIST_LO) * HIST_PER_OCTAVE + 2, dtype=torch.float64)
        self._xtx: torch.Tensor | None = None
        self._sample: torch.Tensor | None = None
        self._priority: torch.Tensor | None = None
        self._gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))

    def update(self, x: torch.Tensor) -> None:
        """Fold a batch of inputs (any leading shape, channels last) into the statistics."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        if x.shape[0] == 0:
            return
        magnitude = x.abs()
        amax = magnitude.amax(dim=0)  # NaN and Inf propagate into the channel maxima
        row_amax = magnitude.amax(dim=1)
        del magnitude
        if not torch.isfinite(amax).all():
            raise MoedgeError(
                f"non-finite activations (NaN/Inf) reach {self.key}: the model or the calibration data is broken"
            )
        if self.retained is not None:
            self.retained.append(x.clone())
        self.tokens += x.shape[0]
        half = self.batches % 2
        self.batches += 1
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        prev = self.half_absmax[half]
        self.half_absmax[half] = amax if prev is None else torch.maximum(prev, amax)
        if self.want_histogram:
            logs = torch.log2(x.abs().clamp_min(2.0**HIST_LO)).flatten()
            idx = torch.clamp(
                ((logs - HIST_LO) * HIST_PER_OCTAVE).floor().long() + 1, 0, self.hist.numel() - 1
            )
            self.hist += torch.bincount(idx, minlength=self.hist.numel()).to(torch.float64)
        if self.want_hessian:
            self._add_second_moment(x)
        pr = torch.rand(x.shape[0], generator=self._gen)
        tag = torch.full((x.shape[0],), half, dtype=torch.int8)
        if self._sample is None or self._priority is None:
            rows, pri, tags = x, pr, tag
        else:
            rows = torch.cat([self._sample, x])
            pri = torch.cat([self._priority, pr])
            tags = torch.cat([self._tags, tag])
        if rows.shape[0] > self.sample_tokens:
            keep = torch.topk(pri, self.sample_tokens).indices.sort().values
            rows, pri, tags = rows[keep], pri[keep], tags[keep]
        self._sample, self._priority, self._tags = rows.clone(), pri, tags
        # The rows with the largest magnitudes, kept apart: a uniform sample almost never holds the rare
        # massive-activation tokens, and a range chosen without them clips them in deployment.
        if self._tail is None:
            tail, tail_tags, tail_amax = x, tag, row_amax
        else:
            tail = torch.cat([self._tail, x])
            tail_tags = torch.cat([self._tail_tags, tag])
            tail_amax = torch.cat([self._tail_amax, row_amax])
        if tail.shape[0] > self.tail_tokens:
            top = torch.topk(tail_amax, self.tail_tokens).indices
            tail, tail_tags, tail_amax = tail[top], tail_tags[top], tail_amax[top]
        self._tail, self._tail_tags, self._tail_amax = tail.clone(), tail_tags, tail_amax

    def _add_second_moment(self, x: torch.Tensor) -> None:
        """Add xᵀ x to the running sum, upper block triangle only (the lower part is filled on reading)."""
        n = int(x.shape[1])
        if self._xtx is None:
            self._xtx = torch.zeros(n, n)
        self._symmetric = False
        if n < _BLOCKED_FROM:
            self._xtx.addmm_(x.T, x)
            return
        edges = [n * i // _HESSIAN_BLOCKS for i in range(_HESSIAN_BLOCKS + 1)]
        for lo, hi in itertools.pairwise(edges):
            self._xtx[lo:hi, lo:].addmm_(x[:, lo:hi].T, x[:, lo:])

    def _second_moment(self) -> torch.Tensor | None:
        """The running sum of x xᵀ, made symmetric."""
        if self._xtx is not None and not self._symmetric:
            n = int(self._xtx.shape[0])
            if n >= _BLOCKED_FROM:
                edges = [n * i // _HESSIAN_BLOCKS for i in range(_HESSIAN_BLOCKS + 1)]
                for lo, hi in itertools.pairwise(edges):
                    self._xtx[hi:, lo:hi] = self._xtx[lo:hi, hi:].T
            self._symmetric = True
        return self._xtx

    def transformed(
        self, fn: Callable[[torch.Tensor], torch.Tensor], exact: Callable[[torch.Tensor], torch.Tensor]
    ) -> InputObserver:
        """The statistics this input would have had as x -> fn(x) = x M, from the retained batches.

        ``exact`` is the same map in float64 on rows ([rows, in] -> x M): the Hessian turns exactly
        (Mᵀ E[x xᵀ] M = exact(exact(H)ᵀ)ᵀ, in float64) instead of being accumulated again; absmax, histogram and sampled rows come from ``fn`` of every retained
        batch in the order seen, so the same tokens are sampled. Needs ``retain``; the retained batches
        are released.
        """
        if self.retained is None:
            raise MoedgeError(f"the inputs of {self.key} were not retained: cannot transform its statistics")
        out = InputObserver(
            self.key,
            hessian=False,
            sample_tokens=self.sample_tokens,
            seed=self.seed,
            tail_tokens=self.tail_tokens,
            histogram=self.want_histogram,
        )
        for x in self.retained:
            out.update(fn(x))
        self.retained = None
        xtx = self._second_moment()
        if self.want_hessian and xtx is not None:
            half_turned = exact(xtx.to(torch.float64))  # H M
            out._xtx = exact(half_turned.T.contiguous()).T.to(torch.float32).contiguous()
            out.want_hessian = True
        return out

    @property
    def hessian(self) -> torch.Tensor:
        """E[x xᵀ] over every token seen; refused when it was not collected or no token reached the input."""
        xtx = self._second_moment()
        if xtx is None or self.tokens == 0:
            raise MoedgeError(f"no Hessian was collected for {self.key}")
        return xtx / self.tokens

    def rows(
        self, uniform: int | None = None, *, half: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows for error estimates and their weights: (the first ``uniform`` of) a seeded uniform sample,
        then the largest-magnitude rows.

        Weighted sums over the rows estimate sums over every token seen, scaled so a uniform row
        weighs 1: each tail row stands for itself (weight n / tokens). When the uniform sample already
        holds every token, the tail adds nothing (weight 0). ``half`` (0 or 1) keeps only rows of even
        or odd batches.
        """
        if self._sample is None or self._tail is None:
            raise MoedgeError(f"no calibration token reached {self.key}")
        sample, tail = self._sample, self._tail
        tokens = self.tokens
        if half is not None:
            sample, tail = sample[self._tags == half], tail[self._tail_tags == half]
            tokens = round(self.tokens * sample.shape[0] / max(self._sample.shape[0], 1))
        picked = sample if uniform is None else sample[:uniform]
        n = picked.shape[0]
        tail_w = n / tokens if self.tokens > self._sample.shape[0] and tokens > 0 else 0.0
        weights = torch.cat([torch.ones(n), torch.full((tail.shape[0],), tail_w)])
        return torch.cat([picked, tail]), weights

    def percentile(self, q: float) -> float:
        """The |x| value below which ``q`` percent of all observed elements fall (histogram resolution)."""
        if not self.want_histogram:
            raise MoedgeError(f"no histogram was collected for {self.key}")
        total = float(self.hist.sum())
        if total == 0:
            return 0.0
        cum = torch.cumsum(self.hist, 0) / total
        b = int(torch.searchsorted(cum, torch.tensor(q / 100.0, dtype=torch.float64)).item())
        upper = 2.0 ** (HIST_LO + b / HIST_PER_OCTAVE)
        assert self.absmax is not None
        return min(upper, float(self.absmax.max()))

    def outlier_ratio(self) -> float:
        """Largest channel absmax over the median channel absmax (how hard per-tensor quantization is)."""
        if self.absmax is None:
            return math.nan
        med = float(self.absmax.median())
        return float(self.absmax.max()) / med if med > 0 else math.inf


@contextmanager
def observe(
    modules: dict[str, nn.Module],
    *,
    hessian_keys: set[str],
    sample_tokens: int,
    seed: int,
    histogram: bool = True,
    retain_keys: frozenset[str] = frozenset(),
) -> Iterator[dict[str, InputObserver]]:
    """Attach one observer per input key to the module that owns it; detach on exit.

    The observers of ``retain_keys`` keep every batch (``InputObserver.transformed``).
    """
    observers = {
        key: InputObserver(
            key,
            hessian=key in hessian_keys,
            sample_tokens=sample_tokens,
            seed=seed,
            histogram=histogram,
            retain=key in retain_keys,
        )
        for key in modules
    }
    handles = []
    for key, module in modules.items():
        obs = observers[key]

        def hook(m: nn.Module, args: tuple[torch.Tensor, ...], obs: InputObserver = obs) -> None:
            rotation = input_rotation(m)  # a rotated linear's input is what it quantizes
            obs.update(args[0] if rotation is None else rotation(args[0]))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield observers
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _returning_zeros(linears: Sequence[nn.Module]) -> Iterator[None]:
    """Inside, each of ``linears`` returns zeros of its output shape (its hooks still run)."""

    def zeros(x: torch.Tensor, out_features: int) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], out_features)

    for lin in linears:
        out_features = int(lin.weight.shape[0])  # type: ignore[union-attr,index]
        lin.forward = lambda x, n=out_features: zeros(x, n)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for lin in linears:
            del lin.forward


def observe_layer(
    layer: nn.Module,
    modules: dict[str, nn.Module],
    inputs: Sequence[tuple[torch.Tensor, dict[str, Any]]],
    *,
    hessian_keys: set[str],
    sample_tokens: int,
    seed: int,
    histogram: bool,
    retain_keys: frozenset[str] = frozenset(),
    skip: Sequence[nn.Module] = (),
) -> dict[str, InputObserver]:
    """Run ``layer`` on every captured (hidden states, keyword arguments) input and return the statistics.

    One observer per input key of ``modules`` (see ``observe``; ``retain_keys`` keep their batches); the
    layer's outputs are discarded and its modules are left untouched. The linears in ``skip`` record
    their input but return zeros instead of computing: for linears whose outputs no observed input
    depends on (each MLP's last linear), whose products the pass would throw away.
    """
    with (
        _returning_zeros(skip),
        observe(
            modules,
            hessian_keys=hessian_keys,
            sample_tokens=sample_tokens,
            seed=seed,
            histogram=histogram,
            retain_keys=retain_keys,
        ) as observers,
    ):
        for hidden, kwargs in inputs:
            layer(hidden, **kwargs)
    return observers
