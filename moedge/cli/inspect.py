"""``moedge inspect``: an exported model's or a bundle's summary."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from moedge.cli.common import EXIT_OK, CommandOptions, set_handler


@dataclass(frozen=True)
class InspectOptions(CommandOptions):
    """The flags of ``moedge inspect``."""

    path: Path
    no_ort: bool


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``inspect`` and its flags."""
    insp = sub.add_parser(
        "inspect",
        help="print an exported model or a bundle: graphs, op census (and the kernels ORT picks), Q/DQ coverage, sizes, TensorRT lint",
    )
    insp.add_argument("path", type=Path, help="an exported folder, a bundle folder or an .onnx file")
    insp.add_argument(
        "--no-ort", action="store_true", help="skip the census after ONNX Runtime's optimizations (faster)"
    )
    set_handler(insp, InspectOptions, execute)


def execute(opts: InspectOptions) -> int:
    """Print a model's or a bundle's summary."""
    from moedge.graph_passes.inspect import inspect_path

    print("\n".join(inspect_path(opts.path, ort_census=not opts.no_ort)))
    return EXIT_OK
