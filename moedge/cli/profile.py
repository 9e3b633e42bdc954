"""``moedge profile``: a bundle's routing statistics over text, and optionally a tuned placement plan."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from moedge import inputs
from moedge.cli.common import (
    DEFAULT_PROFILE,
    EXIT_OK,
    CommandOptions,
    add_environment_flags,
    given,
    set_handler,
    warn_no_effect,
)


@dataclass(frozen=True)
class ProfileOptions(CommandOptions):
    """The flags of ``moedge profile``."""

    bundle: Path
    text: str
    tokens: int
    output: Path | None
    update_bundle: bool
    merge: tuple[Path, ...] | None
    plan: Path | None
    gpu_budget: str | None
    profile: str | None
    trace: Path | None
    threads: int | None


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``profile`` and its flags."""
    prof = sub.add_parser(
        "profile", help="record a bundle's routing statistics over text and plan expert placement"
    )
    prof.add_argument("bundle", type=Path, help="a bundle folder")
    prof.add_argument("--text", default="c4", help="wikitext2, ptb, c4, demo or a text file (default c4)")
    prof.add_argument(
        "--tokens",
        type=inputs.int_range(16, why=" (routing statistics need 16 tokens or more)"),
        default=4096,
        help="tokens of the text to run (default 4096)",
    )
    prof.add_argument(
        "-o", "--output", type=Path, help="routing.json to write (outside any bundle; or --update-bundle)"
    )
    prof.add_argument(
        "--update-bundle",
        action="store_true",
        help="write routing.json (and a --plan path inside the bundle) into BUNDLE and list them in its "
        "manifest.json, replaced last; no other command writes inside a bundle",
    )
    prof.add_argument(
        "--merge", type=Path, action="append", help="routing.json of another workload to merge in"
    )
    prof.add_argument(
        "--plan", type=Path, help="also write a haq placement plan tuned for --gpu-budget on --profile"
    )
    prof.add_argument(
        "--gpu-budget",
        type=inputs.gpu_budget,
        help="budget of the --plan (default 25%% of expert bytes)",
    )
    prof.add_argument(
        "--profile", help=f"hardware profile the --plan is tuned for (default {DEFAULT_PROFILE})"
    )
    prof.add_argument("--trace", type=Path, help="also save the per-token routing trace (.npz)")
    prof.add_argument("--threads", type=inputs.threads, help="ONNX Runtime intra-op threads")
    add_environment_flags(prof)
    set_handler(prof, ProfileOptions, execute)


def _check_inputs(opts: ProfileOptions) -> None:
    """Before minutes of profiling: the --merge files against the bundle, the --plan's profile, and one
    warning line for plan flags given without --plan."""
    if opts.merge or opts.plan is not None:
        from moedge.formats.manifest import read_manifest
        from moedge.formats.placement_plan import bundle_experts
        from moedge.formats.routing import read_routing
        from moedge.runtime.profiles import load_profile

        experts = bundle_experts(read_manifest(opts.bundle))
        for other in opts.merge or ():
            read_routing(other, experts=experts)
        if opts.plan is not None:
            load_profile(opts.profile or DEFAULT_PROFILE)
    if opts.plan is None:
        flags = given([("--gpu-budget", opts.gpu_budget), ("--profile", opts.profile)])
        warn_no_effect(flags, "without --plan (they tune the placement plan)")


def execute(opts: ProfileOptions) -> int:
    """Record routing statistics (and optionally a tuned placement plan) from a bundle run over text."""
    from moedge.runtime.profiling import profile_bundle

    _check_inputs(opts)
    report = profile_bundle(
        opts.bundle,
        text=opts.text,
        tokens=opts.tokens,
        output=opts.output,
        update_bundle=opts.update_bundle,
        merge=list(opts.merge) if opts.merge is not None else None,
        plan=opts.plan,
        gpu_budget=opts.gpu_budget or "25%",
        profile=opts.profile or DEFAULT_PROFILE,
        trace=opts.trace,
        threads=opts.threads,
    )
    for line in report:
        print(line)
    return EXIT_OK
