"""What the doctor's items share: the outcomes besides "ran", lazy imports that say what is missing, timing.

Only the standard library is imported here: an item imports numpy, onnxruntime, torch or tensorrt inside
its function through ``need``, which turns a missing package into ``NotAvailable``.
"""

from __future__ import annotations

import importlib
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

HIDDEN, INTER = 576, 1536  # one expert FFN of smollm2-135m-moe (SwiGLU)
PROMPT = 128  # tokens of the prompt batch
PARAMS = 3 * HIDDEN * INTER
# A backend vs the reference on the W8A8 expert: max |diff| / max |reference|. An activation rounded to
# the neighbouring int8 step moves a few outputs by about one step of its scale.
PARITY_TOLERANCE = 0.02

Figures = dict[str, Any]


class NotAvailable(Exception):
    """The item cannot run on this machine; the message says why (what is missing, what was looked at)."""


class Failed(Exception):
    """The item ran but its result is wrong (a parity check); ``figures`` keeps what it measured."""

    def __init__(self, why: str, figures: Figures) -> None:
        super().__init__(why)
        self.figures = figures


def one_line(text: object, limit: int = 300) -> str:
    """``text`` on one line, cut to ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def need(module: str) -> Any:
    """Import ``module``, or NotAvailable saying it is not installed (or why it does not import)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] == module.split(".")[0]:
            raise NotAvailable(f"{module} is not installed (import {module}: {one_line(exc)})") from None
        raise NotAvailable(f"{module} cannot be imported: {type(exc).__name__}: {one_line(exc)}") from None
    except Exception as exc:  # installed but fails to load (a missing shared library, a broken install)
        raise NotAvailable(f"{module} cannot be imported: {type(exc).__name__}: {one_line(exc)}") from None


def fig(value: float) -> float:
    """A figure rounded to 4 significant digits, for a readable report."""
    return float(f"{value:.4g}")


def median_s(
    fn: Callable[[], object], runs: int, warmup: int = 3, sync: Callable[[], object] | None = None
) -> float:
    """Median seconds of one call of ``fn`` over ``runs`` calls, after ``warmup`` calls; ``sync`` (a GPU's
    synchronize) ends every timed call, so queued work counts."""
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def source_module(folder: str, name: str) -> ModuleType:
    """``moedge.<folder>.<name>`` loaded from its file, without the package's ``__init__`` (which, for
    ``moedge.runtime``, imports numpy, onnxruntime and tokenizers). Works installed and from a source tree
    where ``runtime/`` sits beside ``moedge/`` (package-dir in pyproject.toml) and nothing is installed."""
    key = f"_moedge_doctor_{folder}_{name}"
    if key in sys.modules:
        return sys.modules[key]
    import moedge

    try:  # installed (or editable): where the package-dir mapping puts moedge.<folder>
        spec = importlib.util.find_spec(f"moedge.{folder}")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    base = Path(locations[0]) if locations else Path(moedge.__file__).resolve().parents[1] / folder
    path = base / f"{name}.py"
    if not path.is_file():
        raise NotAvailable(f"moedge.{folder}.{name} is not found ({path} is missing): an incomplete moedge")
    file_spec = importlib.util.spec_from_file_location(key, path)
    assert file_spec is not None and file_spec.loader is not None
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[key] = module  # dataclasses look their module up while the file runs
    try:
        file_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[key]
        raise
    return module
