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
    """A timer of greedy generation from a bundle (``BundleRunner``, one process-wide ORT pool) through
    the runtime's one generation loop: the prompt's forward pass, then ``new_tokens`` decode steps
    (each with its argmax). Sessions are created before it returns."""
    from moedge.runtime.bundle_runner import BundleRunner
    from moedge.runtime.decoding import StopRule, generate

    runner = BundleRunner(bundle, intra_op_threads=threads, shared_pool=True)
    runner.forward(np.asarray([prompt[:8]], dtype=np.int64))  # create sessions before timing
    rule = StopRule(max_new_tokens=new_tokens + 1)  # no eos: always the full length

    def once() -> tuple[float, float]:
        spent = [0.0, 0.0]  # prompt, decode

        def on_step(decode: bool, _tokens: int, seconds: float) -> None:
            spent[int(decode)] += seconds

        generate(runner, [prompt], rule, on_step=on_step)
        return spent[0], spent[1]

    return once


class _TimedBackend:
    """A backend whose graph runs add their seconds to ``spent`` by kind (embedding, stages, experts, head)."""

    def __init__(self, backend: Any, kind_of: Callable[[Any], str], spent: dict[str, float]) -> None:
        self.backend, self.kind_of, self.spent = backend, kind_of, spent

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def runner(self, folder: Path, graph: Any) -> Any:
        inner, kind, spent = self.backend.runner(folder, graph), self.kind_of(graph), self.spent

        class Timed:
            def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                start = time.perf_counter()
                out = inner.infer(feeds)
                spent[kind] += time.perf_counter() - start
                return dict(out)

            def infer_in_place(self, feeds: dict[str, np.ndarray], in_place: Any) -> dict[str, np.ndarray]:
                start = time.perf_counter()
                out = inner.infer_in_place(feeds, in_place)
                spent[kind] += time.perf_counter() - start
                return dict(out)

        return Timed()


def decode_breakdown(bundle: Path, prompt: list[int], new_tokens: int, threads: int) -> dict[str, float]:
    """Where a decode step of a bundle goes: ms per token in embedding, layer stages, experts, head, and
    the rest (numpy gating and combine, sampling, Python), after ``prompt``.

    The runner's CPU backend (stages and the reference executor's experts) is wrapped in a timer.
    """
    from moedge.formats.manifest import read_manifest
    from moedge.runtime.backends.ort_cpu import OrtCpuBackend
    from moedge.runtime.bundle_runner import BundleRunner
    from moedge.runtime.decoding import StopRule, generate

    manifest = read_manifest(bundle)
    stages = {id(run.stage) for run in manifest.stage_runs()}

    def kind_of(graph: Any) -> str:
        if graph is manifest.embedding:
            return "embedding"
        if graph is manifest.head:
            return "head"
        return "stages" if id(graph) in stages else "experts"

    spent: dict[str, float] = {"embedding": 0.0, "stages": 0.0, "experts": 0.0, "head": 0.0}
    cpu = _TimedBackend(OrtCpuBackend(intra_op_threads=threads, shared_pool=True), kind_of, spent)
    runner = BundleRunner(bundle, manifest=manifest, cpu=cpu)  # type: ignore[arg-type]
    steps = [0.0]

    def on_step(decode: bool, _tokens: int, seconds: float) -> None:
        if decode:
            steps[0] += seconds
        else:  # the prompt's time is not a decode step's
            for k in spent:
                spent[k] = 0.0

    generate(runner, [prompt], StopRule(max_new_tokens=new_tokens + 1), on_step=on_step)
    out = {k: v / new_tokens * 1e3 for k, v in spent.items()}
    out["other"] = steps[0] / new_tokens * 1e3 - sum(out.values())
    out["total"] = steps[0] / new_tokens * 1e3
    return out


def time_torch(
    model_name: str,
    prompt: list[int],
    new_tokens: int,
    threads: int,
    cache_dir: Path | None = None,
    files: list[Path] | None = None,
) -> Timer:
    """A timer of greedy generation in PyTorch eager FP32 (the model loaded by ``load_model``); the files
    the model came from are appended to ``files``."""
    import torch
    from provenance import model_files

    from moedge.loading import load_model

    torch.set_num_threads(threads)
    loaded = load_model(model_name, cache_dir=cache_dir)
    if files is not None:
        files += model_files(loaded)
    model = loaded.model

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


def llama_last_logits(llm: Any) -> np.ndarray:
    """The logits of the last position a ``Llama`` evaluated (a view of llama.cpp's buffer). ``Llama.scores``
    is filled only with ``logits_all=True`` in llama-cpp-python 0.3.x: without it the array stays zero."""
    import llama_cpp

    pointer = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),))


def open_llama(gguf: Path, threads: int, context: int, *, logits_all: bool = False) -> Any:
    """A llama.cpp model (llama-cpp-python) from a GGUF file, ``threads`` for prompt and decode, a
    ``context``-token window evaluated in one batch (``logits_all``: keep every position's logits)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise MoedgeError("--gguf needs llama-cpp-python (see BENCHMARKS.md for the build flags)") from None
    return Llama(
        model_path=str(gguf),
        n_ctx=context,
        n_batch=context,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        verbose=False,
    )


def time_llama_cpp(gguf: Path, prompt: list[int], new_tokens: int, threads: int) -> Timer:
    """A timer of greedy generation in llama.cpp (llama-cpp-python) from a GGUF file."""
    llm = open_llama(gguf, threads, len(prompt) + new_tokens + 8)

    def once() -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prompt_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = int(np.argmax(llama_last_logits(llm)))
            llm.eval([token])
        return prompt_s, time.perf_counter() - start

    return once


def dense_labels(bundles: list[Path] | None) -> dict[str, Path]:
    """Variant names of the dense bundles: the first is "dense w8a8 bundle", the others add their folder."""
    out: dict[str, Path] = {}
    for i, bundle in enumerate(bundles or []):
        out["dense w8a8 bundle" if i == 0 else f"dense w8a8 bundle ({bundle.name})"] = bundle
    return out


def speed_table(args: argparse.Namespace, files: list[Path] | None = None) -> dict[str, Any]:
    """Part 2: ORT CPU wall clock, interleaved repeats, medians (measured, this machine); every variant's
    raw (prompt s, decode s) in its "runs". The bundles, GGUF and model files timed are appended to
    ``files``."""
    from moedge.runtime.profiling import text_token_ids

    if files is not None:
        files += [args.bundle, *([args.fp32_bundle] if args.fp32_bundle else []), *(args.dense_bundle or [])]
        files += [args.gguf] if args.gguf else []
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
            args.torch_model, prompt, args.new_tokens, args.threads, cache_dir=args.cache_dir, files=files
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
