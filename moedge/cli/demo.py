"""``moedge demo``: the whole pipeline on the default model, then a summary."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class DemoOptions(CommandOptions):
    """The flags of ``moedge demo``."""

    model: str
    output: Path | None
    windows: int
    seqlen: int
    prompt: str
    new_tokens: int
    cache_dir: Path | None


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``demo`` and its flags."""
    demo = sub.add_parser("demo", help="run the whole pipeline on the default model (smollm2-135m-moe)")
    demo.add_argument("--model", default="smollm2-135m-moe", help=model_help())
    demo.add_argument("-o", "--output", type=Path, help="export folder (default: in the cache)")
    demo.add_argument("--windows", type=WINDOWS, default=4, help="evaluation windows (default 4)")
    demo.add_argument("--seqlen", type=SEQLEN, default=512, help="evaluation window length (default 512)")
    demo.add_argument("--prompt", default="The capital of France is", help="generation prompt")
    demo.add_argument("--new-tokens", type=POSITIVE, default=16, help="tokens to generate (default 16)")
    add_environment_flags(demo)
    set_handler(demo, DemoOptions, execute)


def execute(opts: DemoOptions) -> int:
    """Run the whole pipeline on the default model and print a summary."""
    from moedge.demo import DemoConfig, run_demo

    config = DemoConfig(
        model=opts.model,
        out_dir=opts.output,
        cache_dir=opts.cache_dir,
        windows=opts.windows,
        seqlen=opts.seqlen,
        prompt=opts.prompt,
        new_tokens=opts.new_tokens,
    )
    started: list[bool] = []

    def show(piece: str) -> None:
        if not started:
            started.append(True)
            print(f"generating from {config.prompt!r}:", flush=True)
        print(piece, end="", flush=True)

    summary = run_demo(config, on_token=show)
    print()
    print("\n".join(summary.lines()))
    return EXIT_OK
