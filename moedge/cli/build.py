"""``moedge build``: TensorRT engines for every graph of a bundle (needs TensorRT and a GPU)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from moedge.cli.common import EXIT_OK, POSITIVE, CommandOptions, set_handler


@dataclass(frozen=True)
class BuildOptions(CommandOptions):
    """The flags of ``moedge build``."""

    bundle: Path
    engines: Path | None
    max_tokens: int
    context: int | None


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``build`` and its flags."""
    build = sub.add_parser("build", help="build TensorRT engines for a bundle (needs TensorRT and a GPU)")
    build.add_argument("bundle", type=Path, help="a bundle folder")
    build.add_argument(
        "--engines",
        type=Path,
        help="engine folder, outside the bundle (default: BUNDLE.engines beside it, where --backend tensorrt "
        "reads them)",
    )
    build.add_argument(
        "--max-tokens", type=POSITIVE, default=512, help="largest token count per call (default 512)"
    )
    build.add_argument("--context", type=POSITIVE, help="largest KV length (default: the model's context)")
    set_handler(build, BuildOptions, execute)


def execute(opts: BuildOptions) -> int:
    """Build TensorRT engines for every graph of a bundle."""
    from moedge._errors import MoedgeError
    from moedge.formats.manifest import TARGET_ORT_CPU, read_manifest
    from moedge.runtime.backends.tensorrt import build_bundle_engines, default_engine_dir

    if read_manifest(opts.bundle).stage_target == TARGET_ORT_CPU:
        raise MoedgeError(
            f"{opts.bundle}: ort-cpu stages use ONNX Runtime contrib ops TensorRT cannot parse: "
            "split with --target tensorrt"
        )
    engine_dir = opts.engines if opts.engines is not None else default_engine_dir(opts.bundle)
    built = build_bundle_engines(
        opts.bundle, engine_dir=engine_dir, max_tokens=opts.max_tokens, context=opts.context
    )
    print(f"{len(built)} engines in {engine_dir}")
    return EXIT_OK
