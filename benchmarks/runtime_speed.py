"""Part 2 of the runtime bench (``runtime_bench.py --parts speed``): ORT CPU wall clock of bundles (W8A8
against FP32, dense W8A8 bundles) against PyTorch eager FP32 and llama.cpp, prompt and decode separately,
interleaved repeats, medians. Measured on this machine; timing never gates a test.

``time_bundle`` is also what ``cpp_runtime.py`` times the Python runtime with. Run as a sibling module of
the scripts in benchmarks/ (``python benchmarks/runtime_bench.py``, ``python benchmarks/cpp_runtime.py``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moedge._errors import MoedgeError

# One timed run: () -> (prompt seconds, decode seconds).
Timer = Callable[[], tuple[float, float]]


def time_bundle(bundle: Path, prompt: list[int], new_tokens: int, threads: int) -> Timer:
    """A timer of greedy generation from a bundle (``BundleRunner``, one process-wide ORT pool): the
    prompt's forward pass, then ``new_tokens`` decode steps. Sessions are created before it returns."""
    from moedge.runtime.bundle_runner import BundleRunner

    runner = BundleRunner(bundle, intra_op_threads=threads, shared_pool=True)
    runner.forward(np.asarray([prompt[:8]], dtype=np.int64))  # create sessions before timing

    def once() -> tuple[float, float]:
        start = time.perf_counter()
        logits, past = runner.forward(np.asarray([prompt], dtype=np.int64))
        prompt_s = time.perf_counter() - start
        token = int(np.argmax(logits[0, -1]))
        start = time.perf_counter()
        for _ in range(new_tokens):
            logits, past = runner.forward(np.asarray([[token]], dtype=np.int64), past=past)
            token = int(np.argmax(logits[0, -1]))
        return prompt_s, time.perf_counter() - start

    return once


def decode_breakdown(bundle: Path, prompt: list[int], new_tokens: int, threads: int) -> dict[str, float]:
    """Where a decode step of a bundle goes: ms per token in embedding, layer stages, experts, head, and
    the rest (numpy gating and combine, Python), after ``prompt``.

    It wraps the runner's private ``_run`` and its ``run_expert`` with timers: benchmark code, tied to
    ``BundleRunner``'s internals as they are now.
    """
    from moedge.runtime.bundle_runner import BundleRunner

    runner = BundleRunner(bundle, intra_op_threads=threads, shared_pool=True)
    logits, past = runner.forward(np.asarray([prompt], dtype=np.int64))
    spent: dict[str, float] = {"embedding": 0.0, "stages": 0.0, "experts": 0.0, "head": 0.0}
    run_graph = runner._run

    def timed(graph: Any, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        out = run_graph(graph, values)
        kind = (
            "embedding"
            if graph is runner.manifest.embedding
            else "head"
            if graph is runner.manifest.head
            else "stages"
        )
        spent[kind] += time.perf_counter() - start
        return out

    def timed_expert(layer: int, expert: int, x: np.ndarray, backend: Any = None) -> np.ndarray:
        start = time.perf_counter()
        out = BundleRunner.run_expert(runner, layer, expert, x, backend)
        spent["experts"] += time.perf_counter() - start
        return out

    runner._run = timed  # type: ignore[method-assign]
    runner.run_expert = timed_expert  # type: ignore[method-assign]
    token = int(np.argmax(logits[0, -1]))
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits, past = runner.forward(np.asarray([[token]], dtype=np.int64), past=past)
        token = int(np.argmax(logits[0, -1]))
    total = time.perf_counter() - start
    out = {k: v / new_tokens * 1e3 for k, v in spent.items()}
    out["other"] = total / new_tokens * 1e3 - sum(out.values())
    out["total"] = total / new_tokens * 1e3
    return out


def time_torch(
    model_name: str, prompt: list[int], new_tokens: int, threads: int, cache_dir: Path | None = None
) -> Timer:
    """A timer of greedy generation in PyTorch eager FP32 (the model loaded by ``load_model``)."""
    import torch

    from moedge.loading import load_model

    torch.set_num_threads(threads)
    model = load_model(model_name, cache_dir=cache_dir).model

    def once() -> tuple[float, float]:
        with torch.inference_mode():
            start = time.perf_counter()
            out = model(torch.tensor([prompt]), use_cache=True)
            prompt_s = time.perf_counter() - start
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
            start = time.perf_counter()
            for _ in range(new_tokens):
                out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past, token = out.past_key_values, int(out.logits[0, -1].argmax())
            return prompt_s, time.perf_counter() - start

    return once


def time_llama_cpp(gguf: Path, prompt: list[int], new_tokens: int, threads: int) -> Timer:
    """A timer of greedy generation in llama.cpp (llama-cpp-python) from a GGUF file."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise MoedgeError("--gguf needs llama-cpp-python (see BENCHMARKS.md for the build flags)") from None
    n_ctx = len(prompt) + new_tokens + 8  # n_batch = n_ctx: llama-cpp-python keeps n_batch rows of scores
    llm = Llama(
        model_path=str(gguf),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def once() -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prompt_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([token])
        return prompt_s, time.perf_counter() - start

    return once


def dense_labels(bundles: list[Path] | None) -> dict[str, Path]:
    """Variant names of the dense bundles: the first is "dense w8a8 bundle", the others add their folder."""
    out: dict[str, Path] = {}
    for i, bundle in enumerate(bundles or []):
        out["dense w8a8 bundle" if i == 0 else f"dense w8a8 bundle ({bundle.name})"] = bundle
    return out


def speed_table(args: argparse.Namespace) -> dict[str, Any]:
    """Part 2: ORT CPU wall clock, interleaved repeats, medians (measured, this machine)."""
    from moedge.runtime.profiling import text_token_ids

    prompt = text_token_ids(args.bundle, args.eval_text, args.prompt_tokens)
    variants: dict[str, Timer] = {
        "w8a8 bundle": time_bundle(args.bundle, prompt, args.new_tokens, args.threads)
    }
    if args.fp32_bundle:
        variants["fp32 bundle"] = time_bundle(args.fp32_bundle, prompt, args.new_tokens, args.threads)
    dense = dense_labels(args.dense_bundle)
    for label, bundle in dense.items():
        variants[label] = time_bundle(bundle, prompt, args.new_tokens, args.threads)
    if args.torch_model:
        variants["pytorch eager fp32"] = time_torch(
            args.torch_model, prompt, args.new_tokens, args.threads, cache_dir=args.cache_dir
        )
    if args.gguf:
        variants["llama.cpp"] = time_llama_cpp(args.gguf, prompt, args.new_tokens, args.threads)
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, once in variants.items():
            runs[name].append(once())
    rows = {}
    for name, values in runs.items():
        prompt_s = statistics.median(v[0] for v in values)
        decode_s = statistics.median(v[1] for v in values)
        rows[name] = {
            "prompt_tokens_per_s": len(prompt) / prompt_s,
            "decode_tokens_per_s": args.new_tokens / decode_s,
            "runs": values,
        }
    breakdown = {"w8a8 bundle": decode_breakdown(args.bundle, prompt, args.new_tokens, args.threads)}
    for label, bundle in dense.items():
        breakdown[label] = decode_breakdown(bundle, prompt, args.new_tokens, args.threads)
    return {
        "measured": True,
        "decode_ms_per_token_by_graph": breakdown,
        "threads": args.threads,
        "prompt_tokens": len(prompt),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "variants": rows,
    }
