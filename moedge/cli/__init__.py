"""The ``moedge`` command: one subcommand per pipeline step, each a thin call into the public API.

One module per subcommand (``moedge.cli.demo``, ``export``, ``eval``, ``calibrate``, ``split``,
``inspect``, ``run``, ``profile``, ``build``, ``doctor``): its ``add_parser(sub)`` registers the flags, its
frozen options dataclass (``RunOptions``, ...) holds them once parsed, and its ``execute(options)`` runs
the command. ``main`` turns every outcome into an exit code; ``build_parser`` returns the whole parser, for
anything that renders the CLI's help. Benchmarks are not subcommands: they live in ``benchmarks/`` of the
repository (``python benchmarks/runtime_bench.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from moedge._errors import MoedgeError
from moedge.cli import build as _build
from moedge.cli import calibrate as _calibrate
from moedge.cli import demo as _demo
from moedge.cli import doctor as _doctor
from moedge.cli import eval as _eval
from moedge.cli import export as _export
from moedge.cli import inspect as _inspect
from moedge.cli import profile as _profile
from moedge.cli import run as _run_command
from moedge.cli import split as _split
from moedge.cli.common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Handler,
    OneLineParser,
    one_line,
)
from moedge.paths import DATA_ENV

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "build_parser", "main"]

# The subcommands in the order `moedge --help` lists them.
COMMANDS = (_demo, _export, _eval, _calibrate, _split, _inspect, _run_command, _profile, _build, _doctor)


def build_parser(commands: Sequence[ModuleType] = COMMANDS) -> argparse.ArgumentParser:
    """The argument parser of ``moedge`` with ``commands`` registered (default: every subcommand, in
    ``COMMANDS`` order)."""
    parser = OneLineParser(
        prog="moedge",
        description="Take a Hugging Face LLM (dense or MoE) to deployable ONNX / TensorRT engines for NVIDIA edge hardware.",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging (and tracebacks)")
    verbosity.add_argument(
        "-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in commands:
        command.add_parser(sub)
    return parser


def _apply_data_dir(args: argparse.Namespace) -> None:
    # The CLI is the one place that turns a flag into the process default the library reads.
    if getattr(args, "data_dir", None) is not None:
        from moedge.paths import data_dir

        os.environ[DATA_ENV] = str(data_dir(args.data_dir))


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="moedge: %(message)s", stream=sys.stderr, force=True)
    for noisy in ("torch", "transformers", "onnxscript", "onnx_ir", "urllib3", "filelock", "huggingface_hub"):
        # dependencies' own warnings (e.g. "torchvision is not installed") are noise to a moedge user
        logging.getLogger(noisy).setLevel(logging.INFO if args.verbose else logging.ERROR)
    if args.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")


def _interrupted() -> int:
    try:
        print("moedge: interrupted", file=sys.stderr, flush=True)
    except BaseException:  # a second Ctrl-C while printing: still quiet
        pass
    return EXIT_INTERRUPTED


def _quiet_exit_on_interrupt() -> None:
    """After main: a Ctrl-C while the interpreter shuts down exits 130 at once, without a traceback."""
    import signal

    def handler(signum: int, frame: object) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(EXIT_INTERRUPTED)

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        pass


def _run(argv: Sequence[str] | None) -> int:
    # doctor alone when it runs: the other commands' help texts import packages a bare machine lacks
    doctor = _doctor.wants_doctor(sys.argv[1:] if argv is None else argv)
    parser = build_parser((_doctor,)) if doctor else build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help (0) return like every other outcome
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE if exc.code else EXIT_OK
    _configure_logging(args)
    handler: Handler = args.handler
    try:
        _apply_data_dir(args)
        return handler(args)
    except MoedgeError as exc:
        print(f"moedge: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:
        if args.verbose:
            raise
        print(
            f"moedge: error: {type(exc).__name__}: {one_line(exc)} (run with -v for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (also the console script): 0 ok, 1 failure (one clear line), 2 usage error (one line),
    130 interrupted (Ctrl-C at any moment, parser construction included: ``moedge: interrupted``)."""
    try:
        return _run(argv)
    except KeyboardInterrupt:
        return _interrupted()
    finally:
        if argv is None:  # the console script: the process ends next
            _quiet_exit_on_interrupt()
