"""``moedge split``: an exported folder cut into a bundle (stages, one graph per expert, manifest.json)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from moedge.cli.common import EXIT_OK, CommandOptions, set_handler


@dataclass(frozen=True)
class SplitOptions(CommandOptions):
    """The flags of ``moedge split``."""

    export_dir: Path
    output: Path
    overwrite: bool
    validate: bool


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``split`` and its flags."""
    split = sub.add_parser(
        "split", help="cut an exported folder into a bundle: per-layer stages, one graph per expert, manifest"
    )
    split.add_argument("export_dir", metavar="EXPORT", type=Path, help="a folder written by moedge export")
    split.add_argument(
        "-o", "--output", type=Path, required=True, help="bundle folder to write (missing or empty)"
    )
    split.add_argument(
        "--overwrite",
        action="store_true",
        help="replace -o when it is a previous bundle holding only the files its manifest lists",
    )
    split.add_argument("--validate", action="store_true", help="run the ONNX checker on every graph")
    set_handler(split, SplitOptions, execute)


def execute(opts: SplitOptions) -> int:
    """Cut an exported folder into a bundle (stages, one graph per expert, manifest.json)."""
    from moedge.graph_passes.bundle import split_bundle

    manifest = split_bundle(opts.export_dir, opts.output, validate=opts.validate, overwrite=opts.overwrite)
    moe = [layer for layer in manifest.layers if layer.moe is not None]
    experts = sum(len(layer.moe.experts) for layer in moe if layer.moe is not None)
    print(
        f"bundle {opts.output}: {len(manifest.layers)} layer stages, {experts} expert graphs "
        f"({manifest.expert_bytes() / 2**20:.1f} MiB of experts), precision {manifest.precision}"
    )
    return EXIT_OK
