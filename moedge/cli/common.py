"""What every ``moedge`` subcommand shares: the one-line-error parser, exit codes, flag types, the
environment flags, the options base class and the "has no effect" warning.

A command module (``moedge.cli.run``, ...) registers its flags in ``add_parser(sub)`` and ties the
subparser to a ``Handler``: a frozen options dataclass (``RunOptions``) built from the parsed flags, and
the function that runs the command on it (``execute``). ``moedge.cli.main`` calls the handler.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from moedge import inputs
from moedge.paths import DATA_ENV

log = logging.getLogger("moedge")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

# The hardware profile `run` and `profile` model when --profile is not given.
DEFAULT_PROFILE = "rtx4090-pcie4"


class OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors as one line: ``TOOL: error: <message> (usage: PROG --help)``.

    TOOL is the first word of ``prog`` (``moedge`` for ``moedge run``). ``add_subparsers`` makes every
    subcommand's parser of this class too.
    """

    def error(self, message: str) -> Any:  # argparse declares NoReturn
        """Print the one line and exit 2."""
        text = " ".join(message.split())
        tool = (self.prog.split() or ["moedge"])[0]
        self.exit(EXIT_USAGE, f"{tool}: error: {text} (usage: {self.prog} --help)\n")


# argparse types shared by several commands (each checks its range at parse time: exit 2)
POSITIVE = inputs.int_range(1)
NONNEG = inputs.int_range(0)
SEED = inputs.int_range(0, 2**63 - 1)
SEQLEN = inputs.int_range(2, 2**20, why=" (a window needs 2 tokens or more)")
WINDOWS = inputs.int_range(1, 65536)
BATCH = inputs.int_range(1, 4096)


def add_environment_flags(parser: argparse.ArgumentParser) -> None:
    """The ``environment`` group: ``--data-dir`` and ``--cache-dir``."""
    group = parser.add_argument_group("environment")
    group.add_argument(
        "--data-dir", type=Path, help=f"data folder laid out like shared/data (default: ${DATA_ENV})"
    )
    group.add_argument(
        "--cache-dir", type=Path, help="where built test beds are cached (default: ~/.cache/moedge)"
    )


@functools.cache
def model_help() -> str:
    """Help text of a MODEL argument: the sources ``load_model`` reads, with the test bed names."""
    from moedge.loading import SOURCES_HELP
    from moedge.testbeds import testbed_names

    return "model: " + SOURCES_HELP.format(beds=", ".join(testbed_names()))


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its non-blank lines joined by spaces)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def warn_no_effect(flags: Sequence[str], why: str) -> None:
    """One warning line naming the given flags that ``why`` makes pointless (nothing when none)."""
    if flags:
        verb = "has" if len(flags) == 1 else "have"
        log.warning("warning: %s %s no effect %s", ", ".join(flags), verb, why)


def given(pairs: Sequence[tuple[str, object]]) -> list[str]:
    """The flags of ``(flag, value)`` pairs whose value is not None (the ones the user gave)."""
    return [flag for flag, value in pairs if value is not None]


_O = TypeVar("_O", bound="CommandOptions")


@dataclass(frozen=True)
class CommandOptions:
    """Base of the per-command options: every field is named after its argparse dest."""

    @classmethod
    def from_args(cls: type[_O], args: argparse.Namespace) -> _O:
        """The options from parsed flags; a repeatable flag's list becomes a tuple (None stays None)."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclass(frozen=True)
class Handler(Generic[_O]):
    """What a subparser runs: build ``options`` from the parsed flags, then ``execute`` them."""

    options: type[_O]
    execute: Callable[[_O], int]

    def __call__(self, args: argparse.Namespace) -> int:
        """Run the command; returns its exit code."""
        return self.execute(self.options.from_args(args))


def set_handler(parser: argparse.ArgumentParser, options: type[_O], execute: Callable[[_O], int]) -> None:
    """Tie a subparser to its options class and command function."""
    parser.set_defaults(handler=Handler(options, execute))
