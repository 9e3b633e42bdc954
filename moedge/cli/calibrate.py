"""``moedge calibrate``: a model to W8A8 (int8 weights and activations), written as a recipe folder."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from moedge import inputs
from moedge._errors import MoedgeError
from moedge.cli.common import (
    BATCH,
    EXIT_OK,
    SEED,
    SEQLEN,
    WINDOWS,
    CommandOptions,
    add_environment_flags,
    model_help,
    set_handler,
)

log = logging.getLogger("moedge")

MAX_CALIB_TOKENS = 2**26  # --calib-windows x --seqlen: the token windows are held in memory
# moedge.formats.recipe's METHODS, moedge.calibration.config's ACT_CLIPS and moedge.calibration.rotation's
# ROTATIONS, spelled out here: importing
# them imports numpy and torch, which `moedge --help` must not wait for (tests/integration/test_cli.py
# checks they agree).
METHODS = ("rtn", "smoothquant", "gptq", "haq")
ACT_CLIPS = ("absmax", "percentile", "mse", "output")
ROTATIONS = ("auto", "none", "online", "offline", "full")


@dataclass(frozen=True)
class CalibrateOptions(CommandOptions):
    """The flags of ``moedge calibrate`` (and the global ``-q``)."""

    model: str
    output: Path
    overwrite: bool
    method: str
    calib_data: str
    calib_windows: int
    seqlen: int
    seed: int
    act_clip: str | None
    percentile: float
    alpha: float | None
    keep_fp: tuple[str, ...] | None
    auto_keep_fp: float
    quantize_head: bool
    tie_input_scales: bool
    rotate: str
    batch_size: int
    threads: int | None
    cache_dir: Path | None
    quiet: bool


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``calibrate`` and its flags."""
    cal = sub.add_parser(
        "calibrate", help="calibrate MODEL to W8A8 (int8 weights and activations): a recipe folder"
    )
    cal.add_argument("model", metavar="MODEL", help=model_help())
    cal.add_argument(
        "-o", "--output", type=Path, required=True, help="recipe folder to write (missing or empty)"
    )
    cal.add_argument(
        "--overwrite",
        action="store_true",
        help="replace -o when it is a previous recipe folder holding nothing else (swapped in at the end)",
    )
    cal.add_argument(
        "--method",
        choices=METHODS,
        default="haq",
        help="haq (default): searched smoothing + GPTQ + searched ranges; rtn, smoothquant, gptq for comparison",
    )
    cal.add_argument(
        "--calib-data",
        default="c4",
        help="c4 (documents 0-999, default), wikitext2, ptb, demo, or a text file",
    )
    cal.add_argument("--calib-windows", type=WINDOWS, default=128, help="calibration windows (default 128)")
    cal.add_argument("--seqlen", type=SEQLEN, default=512, help="calibration window length (default 512)")
    cal.add_argument("--seed", type=SEED, default=0, help="seed for window sampling and searches (default 0)")
    _add_quantization_flags(cal)
    cal.add_argument("--batch-size", type=BATCH, default=8, help="windows per forward pass (default 8)")
    cal.add_argument("--threads", type=inputs.threads, help="CPU threads for PyTorch")
    add_environment_flags(cal)
    set_handler(cal, CalibrateOptions, execute)


def _add_quantization_flags(cal: argparse.ArgumentParser) -> None:
    """--act-clip, --percentile, --alpha, --keep-fp, --auto-keep-fp and --quantize-head."""
    cal.add_argument(
        "--act-clip",
        choices=ACT_CLIPS,
        help="activation range: output error (haq default), input MSE, percentile, or absmax (other methods)",
    )
    cal.add_argument(
        "--percentile",
        type=inputs.float_range(0, 100, low_open=True),
        default=99.99,
        help="for --act-clip percentile, in (0, 100] (default 99.99)",
    )
    cal.add_argument(
        "--alpha",
        type=inputs.float_range(0, 1),
        help="fixed smoothing strength in [0, 1] (default: searched per group for haq)",
    )
    cal.add_argument(
        "--keep-fp",
        action="append",
        metavar="PATTERN",
        help="keep linears matching this glob in FP, e.g. 'model.layers.*.mlp.down_proj' (repeatable)",
    )
    cal.add_argument(
        "--auto-keep-fp",
        type=inputs.float_range(0, 1, high_open=True),
        default=0.0,
        metavar="FRACTION",
        help="also keep the most sensitive linears in FP, up to this fraction of linear parameters (e.g. 0.02)",
    )
    cal.add_argument(
        "--quantize-head",
        action="store_true",
        help="quantize lm_head too (W8A8, final norm smoothed into it; a tied head gets its own int8 copy): "
        "a quarter of an FP32 head's bytes and time, as llama.cpp's Q8_0 does",
    )
    cal.add_argument(
        "--tie-input-scales",
        action="store_true",
        help="one activation scale for q/k/v and one for gate/up (the largest calibrated): the input is "
        "quantized once and moedge split --target ort-cpu packs them into one int8 matmul",
    )
    cal.add_argument(
        "--rotate",
        choices=ROTATIONS,
        default="auto",
        help="online: rotate the input of every MLP's last linear (down_proj, each expert's too) by a "
        "Hadamard matrix in the graph, after smoothing, so its static int8 scale fits; offline: rotate the "
        "residual stream by a random Hadamard matrix (seeded by --seed) folded into the weights, norm "
        "weights folded first, the final norm's weight applied in the graph before the head (RMSNorm "
        "models; OPT is refused); full: both; auto: full where the model's widths and norms allow it, "
        "else the part that applies (offline or online), else none; the recipe records the choice "
        "(default auto)",
    )


def execute(opts: CalibrateOptions) -> int:
    """Calibrate MODEL to W8A8 and write the recipe folder."""
    import torch

    from moedge.calibration import CalibrationConfig, calibrate, calibration_windows, save_recipe
    from moedge.calibration.recipe import RECIPE_KIND
    from moedge.loading import check_seqlen, load_model
    from moedge.paths import check_output_folder

    check_output_folder(opts.output, kind=RECIPE_KIND, overwrite=opts.overwrite)  # before calibrating
    if opts.calib_windows * opts.seqlen > MAX_CALIB_TOKENS:
        raise MoedgeError(
            f"--calib-windows {opts.calib_windows} x --seqlen {opts.seqlen} is "
            f"{opts.calib_windows * opts.seqlen:,} tokens, more than the {MAX_CALIB_TOKENS:,} calibration "
            "holds in memory: lower either"
        )
    if opts.threads:
        torch.set_num_threads(opts.threads)
    config = CalibrationConfig(
        method=opts.method,
        act_clip=opts.act_clip,
        percentile=opts.percentile,
        alpha=opts.alpha,
        keep_fp=opts.keep_fp or (),
        auto_keep_fp=opts.auto_keep_fp,
        quantize_head=opts.quantize_head,
        tie_input_scales=opts.tie_input_scales,
        rotate=opts.rotate,
        seed=opts.seed,
        batch_size=opts.batch_size,
    )
    loaded = load_model(opts.model, cache_dir=opts.cache_dir)
    check_seqlen(opts.seqlen, getattr(loaded.model.config, "max_position_embeddings", None), loaded.name)
    samples = calibration_windows(
        loaded, dataset=opts.calib_data, count=opts.calib_windows, seqlen=opts.seqlen, seed=opts.seed
    )
    log.info(
        "calibrating %s with %s on %d x %d tokens of %s",
        loaded.name,
        opts.method,
        *samples.shape,
        opts.calib_data,
    )
    result = calibrate(loaded, list(samples), config, progress=not opts.quiet)
    out = save_recipe(loaded, result, opts.output, calibration_data=opts.calib_data, overwrite=opts.overwrite)
    worst = sorted(((r.rel_error, n) for n, r in result.linears.items() if r.quantized), reverse=True)[:3]
    print(
        f"wrote {out} ({opts.method}; {len(result.linears)} linears, {len(result.kept_fp)} kept in FP; "
        f"{result.seconds:.0f} s, peak RSS {result.peak_rss_mb:.0f} MB)"
    )
    for name in result.kept_fp:
        print(f"  kept in FP: {name}")
    for err, name in worst:
        print(f"  largest relative output error: {name} {err:.2e}")
    return EXIT_OK
