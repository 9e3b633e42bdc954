"""``moedge demo``: the whole pipeline that exists, on an embedded default, offline after setup."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moedge.paths import cache_dir as default_cache_dir
from moedge.paths import data_dir as configured_data_dir

if TYPE_CHECKING:
    from moedge.evaluation import PerplexityResult

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-moe"
DEFAULT_PROMPT = "The capital of France is"


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """What the demo runs on and how much work it does."""

    model: str = DEFAULT_MODEL
    out_dir: Path | None = None
    cache_dir: Path | None = None
    windows: int = 4
    seqlen: int = 512
    prompt: str = DEFAULT_PROMPT
    new_tokens: int = 16


@dataclass
class DemoSummary:
    """The figures the demo measured, each with its setting."""

    model: str
    model_source: str
    export_dir: str
    export_seconds: float
    eval_text: str
    eval_text_note: str
    torch_ppl: PerplexityResult
    ort_ppl: PerplexityResult
    prompt: str
    continuation: str
    steps: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """A printable summary."""
        rel = abs(self.ort_ppl.perplexity - self.torch_ppl.perplexity) / self.torch_ppl.perplexity
        return [
            "== moedge demo summary ==",
            f"model            {self.model} ({self.model_source})",
            f"export           {self.export_dir} ({self.export_seconds:.0f} s)",
            f"eval text        {self.eval_text_note}",
            f"PyTorch FP32     {self.torch_ppl.summary()}",
            f"ORT CPU FP32     {self.ort_ppl.summary()}",
            f"ORT vs PyTorch   relative perplexity difference {rel:.2e}",
            f"generation       {self.prompt!r} -> {self.continuation!r}",
            "steps (s)        " + ", ".join(f"{k} {v:.0f}" for k, v in self.steps.items()),
        ]


def run_demo(config: DemoConfig, *, on_token: Callable[[str], None] | None = None) -> DemoSummary:
    """Load the default model, export it, evaluate it in PyTorch and ORT, and generate from the export."""
    from moedge.datasets import demo_text, load_text
    from moedge.evaluation import ort_logits, perplexity, torch_logits
    from moedge.export.exporter import export_model
    from moedge.loading import load_model
    from moedge.runtime.decoding import StopRule, generate
    from moedge.runtime.ort_causal_lm import OrtCausalLM

    steps: dict[str, float] = {}
    t0 = time.perf_counter()
    loaded = load_model(config.model, cache_dir=config.cache_dir)
    steps["load"] = time.perf_counter() - t0

    out_dir = config.out_dir or default_cache_dir(config.cache_dir) / "demo" / f"{loaded.name}-onnx"
    result = export_model(loaded, out_dir, overwrite=True)  # a previous demo export only (same-kind rule)
    steps["export"] = result.seconds

    if configured_data_dir() is not None:
        text = load_text("wikitext2")
        note = f"WikiText-2 raw test ({text.origin}), first {config.windows} windows"
        seqlen = config.seqlen
    else:
        text = demo_text()
        note = "the short sample shipped with moedge (no data folder configured; not a published figure)"
        seqlen = min(config.seqlen, 256)
    ids = np.asarray(loaded.encode(text.text), dtype=np.int64)

    ort_lm = OrtCausalLM(out_dir)
    scores: dict[str, PerplexityResult] = {}
    for step, scorer, label in (
        ("eval pytorch", torch_logits(loaded.model), "pytorch fp32"),
        ("eval ort", ort_logits(ort_lm), "onnxruntime cpu fp32"),
    ):
        t0 = time.perf_counter()
        scores[step] = perplexity(
            scorer, ids, seqlen=seqlen, max_windows=config.windows, dataset=text.name, backend=label
        )
        steps[step] = time.perf_counter() - t0

    t0 = time.perf_counter()
    prompt_ids = loaded.encode(config.prompt)
    emitted: list[int] = []

    def stream(_row: int, token: int) -> None:
        emitted.append(token)
        if on_token is not None:  # print only the new text so multi-byte pieces come out whole
            before = loaded.decode(emitted[:-1])
            on_token(loaded.decode(emitted)[len(before) :])

    stop = StopRule(max_new_tokens=config.new_tokens, eos_token_id=loaded.eos_token_id)
    new = generate(ort_lm, [prompt_ids], stop, on_token=stream)[0].token_ids
    steps["generate"] = time.perf_counter() - t0
    return DemoSummary(
        model=loaded.name,
        model_source=loaded.source,
        export_dir=str(out_dir),
        export_seconds=result.seconds,
        eval_text=text.name,
        eval_text_note=note,
        torch_ppl=scores["eval pytorch"],
        ort_ppl=scores["eval ort"],
        prompt=config.prompt,
        continuation=loaded.decode(new),
        steps=steps,
    )
