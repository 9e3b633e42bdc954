"""``moedge export``: a model to an ONNX folder (model.onnx + data, config.json, tokenizer.json)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from moedge import inputs
from moedge.cli.common import (
    EXIT_OK,
    CommandOptions,
    add_environment_flags,
    model_help,
    set_handler,
    warn_no_effect,
)


@dataclass(frozen=True)
class ExportOptions(CommandOptions):
    """The flags of ``moedge export``."""

    model: str
    output: Path
    overwrite: bool
    no_cache: bool
    opset: int
    recipe: Path | None
    tie_input_scales: bool
    validate: bool
    cache_dir: Path | None


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``export`` and its flags."""
    export = sub.add_parser(
        "export", help="export MODEL to ONNX (model.onnx + data, config.json, tokenizer.json)"
    )
    export.add_argument("model", metavar="MODEL", help=model_help())
    export.add_argument("-o", "--output", type=Path, required=True, help="output folder (missing or empty)")
    export.add_argument(
        "--overwrite",
        action="store_true",
        help="replace -o when it is a previous moedge export holding nothing else (swapped in at the end)",
    )
    export.add_argument("--no-cache", action="store_true", help="export without KV-cache inputs/outputs")
    export.add_argument(
        "--opset",
        type=inputs.opset,
        default=18,
        help=f"ONNX opset ({inputs.EXPORT_OPSETS[0]}-{inputs.EXPORT_OPSETS[-1]}, default 18)",
    )
    export.add_argument(
        "--recipe", type=Path, help="a calibration recipe folder: export the W8A8 QDQ graph it describes"
    )
    export.add_argument(
        "--tie-input-scales",
        action="store_true",
        help="with --recipe: tie q/k/v's and gate/up's activation scales as moedge calibrate "
        "--tie-input-scales does, for a recipe made without it (the recipe folder is not changed)",
    )
    add_environment_flags(export)
    export.add_argument("--validate", action="store_true", help="run the ONNX checker after every graph pass")
    set_handler(export, ExportOptions, execute)


def execute(opts: ExportOptions) -> int:
    """Export MODEL to an ONNX folder."""
    from moedge.export.exporter import check_export_output, export_model
    from moedge.loading import load_model

    # fail before minutes of loading (a bundle, a non-empty folder, not writable); export_model checks again
    out = check_export_output(opts.output, overwrite=opts.overwrite)
    recipe = None
    if opts.recipe is not None:
        from moedge.formats.recipe import load_recipe

        recipe = load_recipe(opts.recipe)  # a bad recipe fails before the model loads
        if opts.tie_input_scales:
            from moedge.calibration.tie import tie_recipe_scales

            recipe = tie_recipe_scales(recipe)
    else:
        warn_no_effect(["--tie-input-scales"] if opts.tie_input_scales else [], "without --recipe")
    loaded = load_model(opts.model, cache_dir=opts.cache_dir)
    if recipe is not None:
        from moedge.calibration.recipe import apply_recipe

        apply_recipe(loaded, recipe)
    result = export_model(
        loaded,
        out,
        recipe=recipe,
        with_cache=not opts.no_cache,
        opset=opts.opset,
        validate=opts.validate,
        overwrite=opts.overwrite,
    )
    experts = (
        f", experts per layer {sorted(set(result.experts_per_layer.values()))}"
        if result.experts_per_layer
        else ""
    )
    print(
        f"exported {loaded.name} to {result.out_dir} ({result.num_nodes} nodes{experts}, {result.seconds:.0f} s)"
    )
    return EXIT_OK
