"""Checks on what a user hands moedge: argparse types for numeric flags, and bounded reads of input files.

Every check fails with one line that says what is wrong, where (the flag, file or field) and what to
do. The argparse types raise ``argparse.ArgumentTypeError`` (argparse prefixes ``argument --flag:``
and exits 2); the file readers raise ``MoedgeError`` (exit 1). A file is read only when ``stat`` says
it is a regular file of at most ``MAX_INPUT_BYTES``, so a FIFO, ``/dev/zero`` or a huge file ends at
once instead of blocking or filling memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moedge._errors import MoedgeError

MAX_INPUT_BYTES = 64 * 2**20

# What ``moedge export --opset`` writes faithfully with this torch/onnxscript: the exporter emits
# opset 18 and converts from there, so a request below 18 still writes 18, and above 25 the version
# converter drops the expert metadata the split needs.
EXPORT_OPSETS = range(18, 26)

_BUDGET_UNITS = {"gib": 2**30, "mib": 2**20, "kib": 2**10, "gb": 10**9, "mb": 10**6, "kb": 10**3, "b": 1}


# --- argparse types ------------------------------------------------------------------------------------


def _named(func: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    func.__name__ = name  # argparse names the type in its fallback message
    return func


def _parse_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _parse_float(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_range(low: int, high: int | None = None, *, why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer in ``[low, high]`` (``high`` None: no upper bound)."""

    def parse(text: str) -> int:
        value = _parse_int(text)
        if value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {bound}{why}, got {value}")
        return value

    return _named(parse, "integer")


def float_range(
    low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """An argparse type: a finite number between ``low`` and ``high``, each end open or closed."""
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    span = f"{lo}{low:g}, {high:g}{hi}" if high is not None else None

    def parse(text: str) -> float:
        value = _parse_float(text)
        bad_low = value <= low if low_open else value < low
        bad_high = high is not None and (value >= high if high_open else value > high)
        if bad_low or bad_high:
            want = f"in {span}" if span else f"{'above' if low_open else 'at least'} {low:g}"
            raise argparse.ArgumentTypeError(f"must be {want}, got {text.strip()}")
        return value

    return _named(parse, "number")


def max_threads() -> int:
    """The largest ``--threads`` accepted: four threads per CPU of this machine."""
    return 4 * (os.cpu_count() or 1)


def threads(text: str) -> int:
    """An argparse type for ``--threads``: 1 to four per CPU (more only oversubscribes, and ORT may hang)."""
    cpus = os.cpu_count() or 1
    return int_range(1, max_threads(), why=f" (4 x the {cpus} CPUs here)")(text)


def opset(text: str) -> int:
    """An argparse type for ``--opset``: an ONNX opset the exporter writes as asked (``EXPORT_OPSETS``)."""
    value = _parse_int(text)
    if value not in EXPORT_OPSETS:
        raise argparse.ArgumentTypeError(
            f"opset {value} is not supported: moedge exports opsets {EXPORT_OPSETS[0]} to "
            f"{EXPORT_OPSETS[-1]} (default 18)"
        )
    return value


def parse_budget_spec(spec: str) -> tuple[str, float]:
    """``--gpu-budget`` text as (kind, value): ("auto", 0), ("bytes", n), ("share", fraction of expert bytes).

    Accepts ``auto``; bytes with a unit (``1.5GiB``, ``800MB``, ``64KiB``, ``100b``); ``N%`` with
    0 <= N <= 100; a bare number, which is a share when it lies in [0, 1] and bytes above (the rule of
    ``moedge.runtime.costs.parse_budget``, which turns the text into bytes for a bundle).
    """
    text = spec.strip().lower()
    hint = "give auto, bytes (1.5GiB, 800MB, 4096) or a share of the expert bytes (25%)"
    if text == "auto":
        return "auto", 0.0
    try:
        if text.endswith("%"):
            value = float(text[:-1])
            if not math.isfinite(value) or not 0 <= value <= 100:
                raise MoedgeError(f"GPU budget {spec!r} is not a share between 0% and 100%: {hint}")
            return "share", value / 100
        unit = next((u for u in _BUDGET_UNITS if text.endswith(u)), None)
        number = text[: -len(unit)] if unit else text
        value = float(number)
    except ValueError:
        raise MoedgeError(f"cannot read GPU budget {spec!r}: {hint}") from None
    if not math.isfinite(value) or value < 0:
        raise MoedgeError(f"GPU budget {spec!r} must be a finite amount of at least 0: {hint}")
    if unit is not None:
        return "bytes", value * _BUDGET_UNITS[unit]
    return ("share", value) if value <= 1 else ("bytes", value)


def gpu_budget(text: str) -> str:
    """An argparse type for ``--gpu-budget``: checks the text (``parse_budget_spec``) and passes it on."""
    try:
        parse_budget_spec(text)
    except MoedgeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


# --- input files ----------------------------------------------------------------------------------------


def check_input_file(path: str | os.PathLike[str], what: str, *, limit: int = MAX_INPUT_BYTES) -> Path:
    """``path`` when it is a regular file of at most ``limit`` bytes; else one clear ``MoedgeError``.

    Only ``stat`` runs: nothing is opened, so a FIFO or a device never blocks.
    """
    file = Path(path).expanduser()
    try:
        info = file.stat()
    except FileNotFoundError:
        raise MoedgeError(f"{what} {file} does not exist") from None
    except OSError as exc:
        raise MoedgeError(f"cannot read {what} {file}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise MoedgeError(f"{what} {file} is a folder: give a file")
    if not stat.S_ISREG(info.st_mode):
        raise MoedgeError(f"{what} {file} is not a regular file (a device, FIFO or socket): give a file")
    if info.st_size > limit:
        raise MoedgeError(
            f"{what} {file} is {info.st_size / 2**20:.1f} MiB, more than the {limit / 2**20:.0f} MiB "
            "moedge reads for it: give a smaller file"
        )
    return file


def read_input_bytes(path: str | os.PathLike[str], what: str, *, limit: int = MAX_INPUT_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (checked by ``stat`` before it is opened)."""
    file = check_input_file(path, what, limit=limit)
    try:
        # O_NONBLOCK: should the path turn into a FIFO after the stat, the open still returns at once
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise MoedgeError(f"cannot read {what} {file}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MoedgeError(f"{what} {file} is not a regular file: give a file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise MoedgeError(f"cannot read {what} {file}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise MoedgeError(f"{what} {file} grew past {limit / 2**20:.0f} MiB while being read")
    return data


def read_input_text(path: str | os.PathLike[str], what: str, *, limit: int = MAX_INPUT_BYTES) -> str:
    """A UTF-8 text file, bounded like ``read_input_bytes``."""
    data = read_input_bytes(path, what, limit=limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MoedgeError(
            f"{what} {Path(path)} is not UTF-8 text (byte {exc.start}): give a UTF-8 text file"
        ) from None


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def read_input_json(
    path: str | os.PathLike[str], what: str, *, limit: int = MAX_INPUT_BYTES, allow_nan: bool = True
) -> Any:
    """A JSON file, bounded like ``read_input_bytes`` (``allow_nan=False`` refuses NaN and Infinity)."""
    data = read_input_bytes(path, what, limit=limit)
    try:
        if allow_nan:
            return json.loads(data)
        return json.loads(data, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise MoedgeError(f"{what} {Path(path)} is not valid JSON ({exc})") from None
