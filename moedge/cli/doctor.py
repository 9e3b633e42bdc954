"""``moedge doctor``: report, item by item, what this machine can run and what it measured.

``moedge.cli.main`` builds a parser with this command alone when ``doctor`` is the command
(``wants_doctor``): the other commands' help texts import optional packages, and the doctor must report on
a machine that lacks them (``python -m moedge doctor`` from a source tree, nothing installed).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moedge.cli.common import EXIT_OK, CommandOptions, set_handler, warn_no_effect

log = logging.getLogger("moedge")

_DESCRIPTION = (
    "Report, item by item, what this machine can run and what it measured; each item is 'ran' with its "
    "figures, 'not available' with why, or 'failed' with why. Always: packages (versions), providers (ONNX "
    "Runtime's execution providers), ort-cpu (a tiny W8A8 expert FFN on ORT CPU: parity, ms per call). With "
    "--gpu also: ort-cuda (parity with ORT CPU and speed on the CUDA provider), torch-cuda (pinned H2D and "
    "device GB/s, FP16/INT8 TOPS, launch cost, expert FFN ms), tensorrt (engine build, parity, speed) and "
    "hardware-profile (the measurements as a hardware profile, unmeasured fields from the nearest built-in "
    "one). Each item runs in its own process under a timeout; the whole run takes 8 minutes at most. Exit "
    "status 0 once the report is printed and written, even when no item could run."
)


@dataclass(frozen=True)
class DoctorOptions(CommandOptions):
    """The flags of ``moedge doctor``."""

    gpu: bool
    json_path: Path | None
    force: bool
    profile_out: Path | None


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``doctor`` and its flags."""
    doctor = sub.add_parser(
        "doctor",
        help="report what this machine can run (ORT CUDA, TensorRT, torch CUDA) and what it measured",
        description=_DESCRIPTION,
    )
    doctor.add_argument(
        "--gpu",
        action="store_true",
        help="also the GPU items: ort-cuda, torch-cuda, tensorrt and hardware-profile (without it: the "
        "machine, packages, providers and ort-cpu)",
    )
    doctor.add_argument(
        "--json",
        dest="json_path",
        type=Path,
        metavar="PATH",
        help="also write the report as JSON (a new file)",
    )
    doctor.add_argument(
        "--profile-out",
        type=Path,
        metavar="PATH",
        help="write the measured hardware profile (with --gpu, when torch-cuda ran) as a profile JSON file "
        "that --profile PATH of moedge run and moedge profile loads (a new file)",
    )
    doctor.add_argument("--force", action="store_true", help="replace existing --json / --profile-out files")
    set_handler(doctor, DoctorOptions, execute)


def wants_doctor(argv: Sequence[str]) -> bool:
    """Whether ``argv`` (the command line after ``moedge``) runs ``doctor``: its first word that is not a flag."""
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    return command == "doctor"


def _write_profile(opts: DoctorOptions, report: dict) -> None:
    assert opts.profile_out is not None
    from moedge.doctor import write_json

    line = next(item for item in report["items"] if item["name"] == "hardware-profile")
    if line["status"] != "ran":
        log.warning(
            "warning: --profile-out %s not written: hardware-profile is %s: %s",
            opts.profile_out,
            line["status"],
            line["why"],
        )
        return
    write_json(opts.profile_out, "--profile-out", line["figures"]["profile"], force=opts.force)
    print(f"measured hardware profile: {opts.profile_out} (moedge run --profile {opts.profile_out})")


def execute(opts: DoctorOptions) -> int:
    """Run the doctor, print its table, write the JSON report (and the measured profile) when asked."""
    from moedge.doctor import check_output, format_table, run_doctor, write_json

    if opts.profile_out is not None and not opts.gpu:
        warn_no_effect(["--profile-out"], "without --gpu (the profile comes from the GPU items)")
    if opts.force and opts.json_path is None and opts.profile_out is None:
        warn_no_effect(["--force"], "without --json or --profile-out")
    for flag, path in (("--json", opts.json_path), ("--profile-out", opts.profile_out)):
        if path is not None:  # before minutes of measuring
            check_output(path, flag, force=opts.force)
    report = run_doctor(gpu=opts.gpu, progress=log.info)
    print(format_table(report), flush=True)
    if opts.json_path is not None:
        write_json(opts.json_path, "--json", report, force=opts.force)
        print(f"report: {opts.json_path}")
    if opts.profile_out is not None and opts.gpu:
        _write_profile(opts, report)
    return EXIT_OK
