"""``moedge demo``: the product on the default model, FP32 beside W8A8, one table and a timings JSON."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from moedge import inputs
from moedge.cli.common import (
    EXIT_OK,
    POSITIVE,
    SEQLEN,
    WINDOWS,
    CommandOptions,
    add_environment_flags,
    model_help,
    set_handler,
)

# The demo budget (moedge.demo.DemoConfig's defaults), spelled out here so `moedge --help` stays fast.
METHODS = ("rtn", "smoothquant", "gptq", "haq")
ROTATIONS = ("auto", "none", "online", "offline", "full")


@dataclass(frozen=True)
class DemoOptions(CommandOptions):
    """The flags of ``moedge demo``."""

    model: str
    output: Path | None
    json: Path | None
    method: str
    rotate: str
    calib_windows: int
    calib_seqlen: int
    windows: int
    seqlen: int
    prompt: str | None
    new_tokens: int
    gpu_budget: str
    profile: str
    threads: int | None
    rebuild: bool
    started_at: float | None
    cache_dir: Path | None


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``demo`` and its flags."""
    from moedge.demo import DemoConfig

    d = DemoConfig()
    demo = sub.add_parser(
        "demo",
        help="the product on smollm2-135m-moe: calibrate W8A8, export, split, run with the expert cache on a "
        "modeled Jetson and in C++; FP32 vs W8A8 in one table",
    )
    demo.add_argument("--model", default=d.model, help=model_help())
    demo.add_argument("-o", "--output", type=Path, help="demo folder (default: <cache>/demo/MODEL)")
    demo.add_argument("--json", type=Path, help="timings JSON (default: <demo folder>/demo.json)")
    demo.add_argument("--method", choices=METHODS, default=d.method, help=f"calibration (default {d.method})")
    demo.add_argument("--rotate", choices=ROTATIONS, default=d.rotate, help=f"rotation (default {d.rotate})")
    demo.add_argument(
        "--calib-windows", type=WINDOWS, default=d.calib_windows, help=f"default {d.calib_windows}"
    )
    demo.add_argument("--calib-seqlen", type=SEQLEN, default=d.calib_seqlen, help=f"default {d.calib_seqlen}")
    demo.add_argument(
        "--windows",
        type=WINDOWS,
        default=d.eval_windows,
        help=f"perplexity windows (default {d.eval_windows})",
    )
    demo.add_argument(
        "--seqlen", type=SEQLEN, default=d.eval_seqlen, help=f"perplexity window (default {d.eval_seqlen})"
    )
    demo.add_argument(
        "--prompt", help=f"generation prompt (default: the first {d.prompt_tokens} tokens of the demo text)"
    )
    demo.add_argument("--new-tokens", type=POSITIVE, default=d.new_tokens, help=f"default {d.new_tokens}")
    demo.add_argument(
        "--gpu-budget", type=inputs.gpu_budget, default=d.gpu_budget, help=f"default {d.gpu_budget}"
    )
    demo.add_argument("--profile", default=d.profile, help=f"modeled hardware (default {d.profile})")
    demo.add_argument("--threads", type=inputs.threads, help="ONNX Runtime threads (default: all cores)")
    demo.add_argument("--rebuild", action="store_true", help="redo every step, reusing no demo product")
    demo.add_argument("--started-at", type=float, help=argparse.SUPPRESS)  # `make demo`'s start (epoch s)
    add_environment_flags(demo)
    set_handler(demo, DemoOptions, execute)


def execute(opts: DemoOptions) -> int:
    """Run the demo, print its settings, the table and the timings, and write the JSON."""
    from moedge.demo import DemoConfig, run_demo

    config = DemoConfig(
        model=opts.model,
        out_dir=opts.output,
        cache_dir=opts.cache_dir,
        json_path=opts.json,
        method=opts.method,
        rotate=opts.rotate,
        calib_windows=opts.calib_windows,
        calib_seqlen=opts.calib_seqlen,
        eval_windows=opts.windows,
        eval_seqlen=opts.seqlen,
        prompt=opts.prompt,
        new_tokens=opts.new_tokens,
        gpu_budget=opts.gpu_budget,
        profile=opts.profile,
        threads=opts.threads,
        reuse=not opts.rebuild,
        started_at=opts.started_at,
    )
    print(
        f"moedge demo on {config.model}: W8A8 {config.method} (rotate {config.rotate}) calibrated on "
        f"{config.calib_windows} windows of {config.calib_seqlen} tokens; perplexity on {config.eval_windows} "
        f"windows of {config.eval_seqlen}; expert cache {config.gpu_budget} on a modeled {config.profile}",
        flush=True,
    )
    summary = run_demo(config)
    print("\n".join(summary.lines()))
    return EXIT_OK
