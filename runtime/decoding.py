"""The one generation loop every Python runner uses: batching, sampling, stops and streaming.

A model is anything with ``forward(input_ids, *, past, attention_mask, position_ids) -> (logits,
cache)`` (``BundleRunner``, ``OrtCausalLM``, ``Generator``). Several prompts run as one batch: left
padding, an attention mask and per-row positions; one forward pass per step for all rows; a finished
row leaves the batch and its cache. The stop rule is the C++ runner's (``moedge-run``): a prompt must
be shorter than the context; after each new token, stop at the end-of-sequence token, at a stop
token, when ``max_new_tokens`` are out, or when the sequence fills the context.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from moedge._errors import MoedgeError


class CausalLM(Protocol):
    """What the loop needs of a model: one forward pass, with a KV cache when ``uses_cache``.

    Without one (an export made with ``--no-cache``) every step feeds the whole sequence again.
    """

    @property
    def uses_cache(self) -> bool:
        """Whether ``forward`` returns a cache that the next step continues from."""
        ...

    def forward(
        self,
        input_ids: np.ndarray,
        *,
        past: Any = None,
        attention_mask: np.ndarray | None = None,
        position_ids: np.ndarray | None = None,
        last_only: bool = False,
    ) -> tuple[np.ndarray, Any]:
        """Logits (batch x seq x vocab) for ``input_ids`` after ``past``, and the extended cache; with
        ``last_only`` only each row's last position's (batch x 1 x vocab: what sampling reads)."""
        ...


@dataclass
class Generation:
    """One prompt's result."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    stopped_by: str = "length"  # length | stop | eos | context | interrupt


@dataclass(frozen=True)
class Sampling:
    """Greedy when ``temperature`` is 0; otherwise sampled with ``top_k`` / ``top_p`` from ``seed``."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise MoedgeError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise MoedgeError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MoedgeError(f"top_p must lie in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class StopRule:
    """When a row stops: ``max_new_tokens``, the end-of-sequence token, stop tokens, the context (0: none)."""

    max_new_tokens: int
    eos_token_id: int | None = None
    stop: frozenset[int] = frozenset()
    context: int = 0

    def reason(self, token: int, length: int, new_tokens: int) -> str | None:
        """Why a row whose sequence is now ``length`` tokens (``new_tokens`` of them generated, the last
        ``token``) stops, or None when it goes on."""
        if self.eos_token_id is not None and token == self.eos_token_id:
            return "eos"
        if token in self.stop:
            return "stop"
        if new_tokens >= self.max_new_tokens:
            return "length"
        if self.context and length >= self.context:
            return "context"
        return None


StepHook = Callable[[bool, int, float], None]
"""(decode step?, tokens it processed, seconds it took): called after every forward pass and sampling."""


def select_rows(past: Any, rows: list[int]) -> Any:
    """The cache of only ``rows``: a list of (rows, ...) arrays indexed, or the cache's own ``select``."""
    select = getattr(past, "select", None)
    return select(rows) if select is not None else [kv[rows] for kv in past]


def cached_tokens(past: Any) -> int:
    """How many positions a cache holds (the longest row's): 0 for None."""
    if past is None:
        return 0
    lengths = getattr(past, "lengths", None)
    return int(lengths.max()) if lengths is not None else int(past[0].shape[2])


def sample(logits: np.ndarray, rng: np.random.Generator, sampling: Sampling) -> int:
    """The next token from one row's last logits."""
    if sampling.temperature <= 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k > 0:
        kth = np.partition(x, -sampling.top_k)[-sampling.top_k]
        x = np.where(x < kth, -np.inf, x)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        keep = np.cumsum(probs[order]) - probs[order] < sampling.top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))


def check_prompts(prompts: Sequence[Sequence[int]], context: int) -> None:
    """One clear error for an empty prompt or one that does not leave room in the context."""
    for index, ids in enumerate(prompts):
        if not ids:
            raise MoedgeError(f"prompt {index} has no tokens: generation needs at least one")
        if context and len(ids) >= context:
            raise MoedgeError(
                f"prompt {index} has {len(ids)} tokens; the model's context is {context}: shorten it"
            )


@dataclass
class _Batch:
    """The rows still generating: their prompt indexes, and the next step's inputs."""

    active: list[int]
    step: np.ndarray
    mask: np.ndarray
    positions: np.ndarray
    past: Any = None

    @classmethod
    def left_padded(cls, prompts: Sequence[Sequence[int]]) -> _Batch:
        width = max(len(p) for p in prompts)
        step = np.zeros((len(prompts), width), dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.int64)
        for row, ids in enumerate(prompts):
            step[row, width - len(ids) :] = ids
            mask[row, width - len(ids) :] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        return cls(list(range(len(prompts))), step, mask, positions)

    def advance(self, keep: list[int], tokens: list[int], cached: bool) -> None:
        """Keep rows ``keep`` (a finished row leaves the batch and its cache) and append their ``tokens``:
        the next step feeds only them (``cached``) or the whole sequences again."""
        new = np.asarray([tokens[r] for r in keep], dtype=np.int64)[:, None]
        if len(keep) < len(self.active):
            if self.past is not None:
                self.past = select_rows(self.past, keep)
            self.step, self.mask, self.positions = self.step[keep], self.mask[keep], self.positions[keep]
            self.active = [self.active[r] for r in keep]
        self.mask = np.concatenate([self.mask, np.ones((len(keep), 1), dtype=np.int64)], axis=1)
        if cached:
            self.step, self.positions = new, self.positions[:, -1:] + 1
        else:
            self.step = np.concatenate([self.step, new], axis=1)
            self.positions = np.concatenate([self.positions, self.positions[:, -1:] + 1], axis=1)
            self.past = None


def generate(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    stop: StopRule,
    *,
    sampling: Sampling = Sampling(),
    rng: np.random.Generator | None = None,
    on_token: Callable[[int, int], None] | None = None,
    on_step: StepHook | None = None,
) -> list[Generation]:
    """Continue ``prompts`` (token ids) as one batch; ``on_token(prompt index, token)`` streams tokens.

    ``rng`` (default: one from ``sampling.seed``) draws sampled tokens. Ctrl-C stops the loop: the rows
    still running are marked ``interrupt`` and the KeyboardInterrupt goes on to the caller, with
    every token so far in the returned objects it already holds (pass them in with
    :func:`generate_into`).
    """
    gens = [Generation(prompt_ids=[int(t) for t in p]) for p in prompts]
    generate_into(model, gens, stop, sampling=sampling, rng=rng, on_token=on_token, on_step=on_step)
    return gens


def generate_into(
    model: CausalLM,
    gens: Sequence[Generation],
    stop: StopRule,
    *,
    sampling: Sampling = Sampling(),
    rng: np.random.Generator | None = None,
    on_token: Callable[[int, int], None] | None = None,
    on_step: StepHook | None = None,
) -> None:
    """:func:`generate` into existing :class:`Generation` objects (their ``token_ids`` grow in place)."""
    check_prompts([g.prompt_ids for g in gens], stop.context)
    if not gens or stop.max_new_tokens <= 0:
        return
    rng = rng if rng is not None else np.random.default_rng(sampling.seed)
    batch = _Batch.left_padded([g.prompt_ids for g in gens])
    cached = model.uses_cache
    decided: set[int] = set()  # rows that stopped in the current step
    try:
        for i in range(stop.max_new_tokens):
            decided.clear()
            start = time.perf_counter()
            logits, batch.past = model.forward(
                batch.step,
                past=batch.past,
                attention_mask=batch.mask,
                position_ids=batch.positions,
                last_only=True,
            )
            tokens = [sample(logits[r, -1], rng, sampling) for r in range(len(batch.active))]
            if on_step is not None:
                processed = int(batch.mask.sum()) if i == 0 or not cached else len(batch.active)
                on_step(i > 0, processed, time.perf_counter() - start)
            keep: list[int] = []
            for r, (index, token) in enumerate(zip(batch.active, tokens, strict=True)):
                gen = gens[index]
                gen.token_ids.append(token)
                if on_token is not None:
                    on_token(index, token)
                reason = stop.reason(token, len(gen.prompt_ids) + len(gen.token_ids), len(gen.token_ids))
                if reason is None:
                    keep.append(r)
                else:
                    gen.stopped_by = reason
                    decided.add(index)
            if not keep:
                return
            batch.advance(keep, tokens, cached)
    except KeyboardInterrupt:
        for index in batch.active:
            if index not in decided:
                gens[index].stopped_by = "interrupt"
        raise


def greedy(
    model: CausalLM,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    context: int = 0,
) -> list[int]:
    """Greedy continuation of one prompt: the new token ids (the loop above with one row)."""
    stop = StopRule(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, context=context)
    return generate(model, [prompt_ids], stop)[0].token_ids
