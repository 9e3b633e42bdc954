"""``moedge demo``: the product end to end on the default model, FP32 beside W8A8, in one table.

Steps: load the test bed (smollm2-135m-moe, built in seconds from the shipped router centroids), export
and split it FP32 (``--target ort-cpu``), calibrate it W8A8 (HAQ) on a small demo budget, export the
QDQ graph and split it the same way, score perplexity of both bundles on the demo windows, generate
greedily from both with the expert cache on a modeled Jetson (``--backend simulated``: every graph runs
on this CPU, the GPU side is modeled on the profile), and run the C++ runner ``moedge-run`` on the W8A8
bundle to check that it gives the Python runtime's tokens. Products are kept in the demo folder (in the
cache by default) with a stamp of their settings: a later run with the same settings reuses them, and
the JSON says which steps were cache hits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moedge._errors import MoedgeError
from moedge.demo_steps import environment, export_and_split, folder_bytes, stamp_ok, step, write_stamp
from moedge.paths import cache_dir as default_cache_dir
from moedge.paths import data_dir as configured_data_dir

if TYPE_CHECKING:  # numpy is imported where used: `moedge --help` reads DemoConfig's defaults
    import numpy as np

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-moe"
ROOT = Path(__file__).resolve().parents[1]
CPP_RUNNER = ROOT / "build" / "cpp" / "moedge-run"
SIDES = ("fp32", "w8a8")


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """What the demo runs on and how much work it does (the defaults are the demo budget)."""

    model: str = DEFAULT_MODEL
    out_dir: Path | None = None  # default: <cache>/demo/<model>
    cache_dir: Path | None = None
    json_path: Path | None = None  # default: <out_dir>/demo.json
    method: str = "rtn"  # haq with rotate full: ~270 s a layer here (30 layers): far past the budget
    rotate: str = "full"
    calib_windows: int = 8
    calib_seqlen: int = 256
    eval_windows: int = 8
    eval_seqlen: int = 256
    prompt: str | None = None  # None: the first prompt_tokens tokens of the shipped demo text
    prompt_tokens: int = 64
    new_tokens: int = 32
    profile: str = "jetson-orin-nano-8gb"
    gpu_budget: str = "256MiB"
    policy: str = "haq"
    threads: int | None = None
    cpp_runner: Path = CPP_RUNNER
    reuse: bool = True  # reuse the demo folder's products made with the same settings
    started_at: float | None = None  # epoch seconds when `make demo` started (env and C++ build included)

    def calibration_settings(self) -> dict[str, Any]:
        """The settings the W8A8 recipe depends on (its cache stamp)."""
        return {
            "method": self.method,
            "rotate": self.rotate,
            "tie_input_scales": True,
            "quantize_head": True,
            "calib_windows": self.calib_windows,
            "calib_seqlen": self.calib_seqlen,
            "seed": 0,
        }


@dataclass
class Side:
    """One column of the table: a bundle and what was measured on it."""

    name: str
    bundle: str = ""
    bundle_bytes: int = 0
    perplexity: float | None = None
    prompt_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    hit_rate: float | None = None
    modeled_decode_ms: float | None = None
    expert_bytes: int = 0
    tokens: list[int] = field(default_factory=list)
    text: str = ""


@dataclass
class DemoSummary:
    """Everything the demo measured: the table's figures, per-step seconds, cache hits, the C++ check."""

    config: dict[str, Any]
    model: str
    model_source: str
    calib_text: str
    eval_text: str
    prompt_ids: list[int]
    sides: dict[str, Side]
    cpp: dict[str, Any]
    steps: dict[str, float] = field(default_factory=dict)
    cache_hits: dict[str, bool] = field(default_factory=dict)
    total_seconds: float = 0.0
    since_make_seconds: float | None = None
    json_path: str = ""

    @property
    def tokens_match(self) -> bool | None:
        """Whether moedge-run gave the Python runtime's W8A8 tokens (None: it did not run)."""
        got = self.cpp.get("tokens")
        return None if got is None else got == self.sides["w8a8"].tokens

    def table(self) -> list[str]:
        """The side-by-side table, FP32 beside W8A8."""
        fp, q = self.sides["fp32"], self.sides["w8a8"]
        budget, profile = self.config["gpu_budget"], self.config["profile"]

        def num(x: float | None, spec: str) -> str:
            return "-" if x is None else format(x, spec)

        rows = [
            ("perplexity (demo windows)", num(fp.perplexity, ".3f"), num(q.perplexity, ".3f")),
            ("bundle MB", num(fp.bundle_bytes / 1e6, ".1f"), num(q.bundle_bytes / 1e6, ".1f")),
            ("expert MB", num(fp.expert_bytes / 1e6, ".1f"), num(q.expert_bytes / 1e6, ".1f")),
            (
                "prompt tok/s (Python, this CPU)",
                num(fp.prompt_tokens_per_s, ".1f"),
                num(q.prompt_tokens_per_s, ".1f"),
            ),
            (
                "decode tok/s (Python, this CPU)",
                num(fp.decode_tokens_per_s, ".1f"),
                num(q.decode_tokens_per_s, ".1f"),
            ),
            (
                f"GPU hit rate ({budget}, {self.config['policy']})",
                num(fp.hit_rate, ".3f"),
                num(q.hit_rate, ".3f"),
            ),
            (
                f"modeled decode ms/token ({profile})",
                num(fp.modeled_decode_ms, ".2f"),
                num(q.modeled_decode_ms, ".2f"),
            ),
            ("decode tok/s (C++ moedge-run, this CPU)", "-", num(self.cpp.get("decode_tokens_per_s"), ".1f")),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [f"{'':{width}s}  {'FP32':>10s}  {'W8A8':>10s}", "-" * (width + 24)]
        lines += [f"{a:{width}s}  {b:>10s}  {c:>10s}" for a, b, c in rows]
        match = self.tokens_match
        answer = "yes" if match else ("no" if match is False else f"not run ({self.cpp.get('note', '')})")
        lines.append(f"C++ runner tokens == Python tokens (W8A8, {len(q.tokens)} tokens): {answer}")
        return lines

    def lines(self) -> list[str]:
        """The printed summary: settings, table, generations, timings."""
        cfg = self.config
        hits = [k for k, v in self.cache_hits.items() if v]
        out = [
            "== moedge demo ==",
            f"model       {self.model} ({self.model_source})",
            f"W8A8        {cfg['method']}, rotate {cfg['rotate']}, input scales tied, head quantized; "
            f"calibrated on {cfg['calib_windows']} windows of {cfg['calib_seqlen']} tokens of {self.calib_text}",
            f"eval        {cfg['eval_windows']} windows of {cfg['eval_seqlen']} tokens of {self.eval_text}",
            f"run         expert cache ({cfg['policy']}, GPU budget {cfg['gpu_budget']}) on a modeled "
            f"{cfg['profile']} (--backend simulated), {len(self.prompt_ids)}-token prompt, greedy",
            "",
            *self.table(),
            "",
            *(f"{s.name:5s} -> {s.text!r}" for s in self.sides.values()),
            "",
            "steps (s)   " + ", ".join(f"{k} {v:.0f}" for k, v in self.steps.items()),
            f"cache hits  {', '.join(hits) if hits else 'none'}",
            f"total       {self.total_seconds:.0f} s"
            + (
                f" ({self.since_make_seconds:.0f} s since `make demo` started)"
                if self.since_make_seconds
                else ""
            ),
            f"wrote       {self.json_path}",
        ]
        return out

    def to_json(self) -> dict[str, Any]:
        """The JSON document the demo writes."""
        return {
            "schema": "moedge.demo/1",
            "config": self.config,
            "model": self.model,
            "model_source": self.model_source,
            "calib_text": self.calib_text,
            "eval_text": self.eval_text,
            "prompt_ids": self.prompt_ids,
            "sides": {k: asdict(v) for k, v in self.sides.items()},
            "cpp": self.cpp,
            "tokens_match": self.tokens_match,
            "steps_seconds": self.steps,
            "cache_hits": self.cache_hits,
            "total_seconds": self.total_seconds,
            "since_make_seconds": self.since_make_seconds,
            "table": self.table(),
            "environment": environment(),
        }


# --- steps --------------------------------------------------------------------------------------------


def _model_key(model: str) -> str:
    """What the model's products depend on: its name, and for the MoE test bed the shipped centroids."""
    if model != DEFAULT_MODEL:
        return model
    from moedge.upcycle import CENTROIDS_PROVENANCE, SHIPPED_DIR

    meta = SHIPPED_DIR / CENTROIDS_PROVENANCE
    digest = json.loads(meta.read_text())["centroids_sha256"] if meta.is_file() else "computed"
    return f"{model}:{digest}"


def _testbed_cached(config: DemoConfig) -> bool:
    """Whether the test bed is already in the cache (so loading it is a cache hit)."""
    if config.model != DEFAULT_MODEL:
        return not config.model.startswith("smollm2-135m")  # tiny test beds are built in code
    from moedge.upcycle import MOE_TESTBED, UpcycleConfig

    folder = default_cache_dir(config.cache_dir) / f"{MOE_TESTBED}-{UpcycleConfig().key()}"
    return (folder / "moedge_build.json").is_file()


def demo_texts(
    encode: Callable[[str], list[int]], config: DemoConfig
) -> tuple[np.ndarray, str, np.ndarray, str]:
    """(calibration windows, their origin, evaluation token ids, their origin).

    With a data folder: C4 sample documents 0-999 (seeded windows) and WikiText-2 test. Without one: the
    shipped demo text, calibrating on its first half and evaluating on its second half.
    """
    import numpy as np

    from moedge.datasets import C4_BUILD_DOCS, c4_documents, demo_text, load_text, sample_windows

    if configured_data_dir() is not None:
        c4 = np.asarray(encode("\n\n".join(c4_documents(*C4_BUILD_DOCS))), dtype=np.int64)
        calib = sample_windows(c4, config.calib_windows, config.calib_seqlen, seed=0)
        text = load_text("wikitext2")
        return (
            calib,
            "the C4 sample (documents 0-999)",
            np.asarray(encode(text.text), np.int64),
            "WikiText-2 test",
        )
    ids = np.asarray(encode(demo_text().text), dtype=np.int64)
    half = len(ids) // 2
    calib = sample_windows(ids[:half], config.calib_windows, min(config.calib_seqlen, half - 1), seed=0)
    note = "the shipped demo text's second half (no data folder: not a published figure)"
    return calib, "the shipped demo text's first half", ids[half:], note


def run_demo(config: DemoConfig) -> DemoSummary:
    """Run every step of the demo (reusing the demo folder's products made with the same settings)."""
    from moedge.loading import load_model
    from moedge.tokenizer import load_tokenizer

    t_start = time.perf_counter()
    if config.calib_windows < 1 or config.eval_windows < 1 or config.new_tokens < 1:
        raise MoedgeError(
            "the demo needs at least one calibration window, one evaluation window and one token"
        )
    out = config.out_dir or default_cache_dir(config.cache_dir) / "demo" / config.model
    out.mkdir(parents=True, exist_ok=True)
    steps: dict[str, float] = {}
    hits: dict[str, bool] = {"test bed": _testbed_cached(config)}
    key = _model_key(config.model)
    bundles = {side: out / f"{side}-cpu" for side in SIDES}
    recipe_dir = out / "recipe"
    stamps = {
        "fp32": {"model": key},
        "recipe": {"model": key, **config.calibration_settings()},
    }
    stamps["w8a8"] = stamps["recipe"]
    hits["fp32 bundle"] = stamp_ok(bundles["fp32"], stamps["fp32"], config.reuse)
    hits["w8a8 recipe"] = stamp_ok(recipe_dir, stamps["recipe"], config.reuse)
    hits["w8a8 bundle"] = hits["w8a8 recipe"] and stamp_ok(bundles["w8a8"], stamps["w8a8"], config.reuse)

    loaded = None
    if not (hits["fp32 bundle"] and hits["w8a8 recipe"] and hits["w8a8 bundle"]):
        with step(steps, "load test bed"):
            loaded = load_model(config.model, cache_dir=config.cache_dir)
    if not hits["fp32 bundle"]:
        assert loaded is not None
        with step(steps, "export+split fp32"):
            export_and_split(loaded, None, bundles["fp32"])
        write_stamp(bundles["fp32"], stamps["fp32"])
    tokenizer = load_tokenizer(bundles["fp32"] / "tokenizer.json")

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False).ids)

    calib, calib_text, eval_ids, eval_text = demo_texts(encode, config)
    _make_w8a8(config, loaded, calib, calib_text, recipe_dir, bundles["w8a8"], stamps, hits, steps)
    loaded = None  # the bundles are made: free the model before the runs

    prompt_ids = encode(config.prompt) if config.prompt else _default_prompt(encode, config.prompt_tokens)
    sides = {
        side: Side(side, bundle=str(bundles[side]), bundle_bytes=folder_bytes(bundles[side]))
        for side in SIDES
    }
    for side in SIDES:
        with step(steps, f"perplexity {side}"):
            _perplexity(sides[side], eval_ids, config)
        with step(steps, f"run {side}"):
            _generate(sides[side], prompt_ids, config)
    with step(steps, "moedge-run w8a8"):
        cpp = run_cpp(config, bundles["w8a8"], prompt_ids)
    summary = DemoSummary(
        config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        model=config.model,
        model_source=_model_source(config.model),
        calib_text=calib_text,
        eval_text=eval_text,
        prompt_ids=prompt_ids,
        sides=sides,
        cpp=cpp,
        steps=steps,
        cache_hits=hits,
    )
    summary.total_seconds = time.perf_counter() - t_start
    if config.started_at is not None:
        summary.since_make_seconds = time.time() - config.started_at
    path = config.json_path or out / "demo.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    summary.json_path = str(path)
    path.write_text(json.dumps(summary.to_json(), indent=1, default=str) + "\n")
    return summary


def _make_w8a8(
    config: DemoConfig,
    loaded: Any,
    calib: np.ndarray,
    calib_text: str,
    recipe_dir: Path,
    bundle: Path,
    stamps: dict[str, dict[str, Any]],
    hits: dict[str, bool],
    steps: dict[str, float],
) -> None:
    """Calibrate the W8A8 recipe and make its bundle, each unless a cache hit."""
    from moedge.calibration import CalibrationConfig, apply_recipe, calibrate, save_recipe
    from moedge.formats.recipe import load_recipe
    from moedge.loading import load_model

    if not hits["w8a8 recipe"]:
        assert loaded is not None
        settings = config.calibration_settings()
        cal = CalibrationConfig(
            method=config.method, rotate=config.rotate, tie_input_scales=True, quantize_head=True, seed=0
        )
        with step(steps, "calibrate w8a8"):
            result = calibrate(loaded, list(calib), cal, progress=True)
        save_recipe(loaded, result, recipe_dir, calibration_data=calib_text, overwrite=recipe_dir.exists())
        write_stamp(recipe_dir, stamps["recipe"])
        log.info("calibrated with %s", settings)
    if not hits["w8a8 bundle"]:
        recipe = load_recipe(recipe_dir)
        with step(steps, "reload test bed"):  # calibrate changed the first copy in place
            fresh = load_model(config.model, cache_dir=config.cache_dir)
        apply_recipe(fresh, recipe)
        with step(steps, "export+split w8a8"):
            export_and_split(fresh, recipe, bundle)
        write_stamp(bundle, stamps["w8a8"])
        del fresh


def _model_source(model: str) -> str:
    if model == DEFAULT_MODEL:
        return "upcycled from smollm2-135m, routers from the shipped centroids"
    return model


def _default_prompt(encode: Callable[[str], list[int]], count: int) -> list[int]:
    from moedge.datasets import demo_text

    return encode(demo_text().text)[:count]


def _perplexity(side: Side, ids: np.ndarray, config: DemoConfig) -> None:
    from moedge.evaluation import ort_logits, perplexity
    from moedge.runtime.bundle_runner import BundleRunner

    runner = BundleRunner(side.bundle, intra_op_threads=config.threads)
    result = perplexity(
        ort_logits(runner), ids, seqlen=config.eval_seqlen, max_windows=config.eval_windows, backend=side.name
    )
    side.perplexity = result.perplexity


def _generate(side: Side, prompt_ids: list[int], config: DemoConfig) -> None:
    """Greedy tokens with the expert cache on the modeled profile; the speed and cache figures."""
    from moedge.runtime.generator import Generator

    gen = Generator(
        side.bundle,
        backend="simulated",
        policy=config.policy,
        gpu_budget=config.gpu_budget,
        profile=config.profile,
        intra_op_threads=config.threads,
    )
    try:
        result = gen.generate([prompt_ids], max_new_tokens=config.new_tokens)[0]
        metrics = gen.summary()
    finally:
        gen.close()
    side.tokens = [int(t) for t in result.token_ids]
    side.text = result.text or ""
    side.prompt_tokens_per_s = metrics["prompt_tokens_per_s"]
    side.decode_tokens_per_s = metrics["decode_tokens_per_s"]
    side.expert_bytes = int(gen.costs.expert_bytes())
    gpu = metrics.get("gpu")
    if isinstance(gpu, dict):
        side.hit_rate = float(gpu["hit_rate"])
        side.modeled_decode_ms = float(gpu["modeled_decode_ms"]["p50"])


def run_cpp(config: DemoConfig, bundle: Path, prompt_ids: list[int]) -> dict[str, Any]:
    """``moedge-run`` on ``bundle``: greedy tokens from ``prompt_ids``, its speed; a note when not built."""
    binary = config.cpp_runner
    if not binary.is_file():
        return {"binary": str(binary), "note": f"{binary} is not built: run `make cpp`", "tokens": None}
    with tempfile.TemporaryDirectory() as tmp:
        doc_path = Path(tmp) / "run.json"
        cmd = [
            str(binary),
            str(bundle),
            "--ids",
            ",".join(map(str, prompt_ids)),
            "-n",
            str(config.new_tokens),
        ]
        cmd += ["--threads", str(config.threads or os.cpu_count() or 1), "--json", str(doc_path)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise MoedgeError(f"moedge-run failed ({done.returncode}): {done.stderr.strip()}")
        doc = json.loads(doc_path.read_text())
    return {
        "binary": str(binary),
        "binary_sha256": hashlib.sha256(binary.read_bytes()).hexdigest(),
        "command": cmd[:1] + [a if len(a) < 200 else a[:200] + "..." for a in cmd[1:]],
        "tokens": [int(t) for t in doc["generations"][0]["token_ids"]],
        "prompt_tokens_per_s": doc.get("prompt_tokens_per_s"),
        "decode_tokens_per_s": doc.get("decode_tokens_per_s"),
        "onnxruntime": doc.get("onnxruntime"),
    }
