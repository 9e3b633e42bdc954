"""``moedge doctor``: what this machine can run, item by item, and what it measured.

Each item ends as ``ran`` (figures and a one-line summary), ``not available`` (why: a package that is not
installed, a CPU-only wheel, no CUDA device) or ``failed`` (it broke, timed out, or its parity check did
not hold). The items (``moedge.doctor.runner.ITEMS``): ``packages``, ``providers`` and ``ort-cpu`` always;
with ``gpu``: ``ort-cuda``, ``torch-cuda`` and ``tensorrt``, then ``hardware-profile``, the torch-cuda
figures as a profile of ``moedge/data/hardware_profiles.json`` (``moedge.doctor.profile``).

Everything imports only the standard library until an item runs, and each item runs in its own process
(``python -m moedge.doctor ITEM WORK OUT``), so the doctor reports on a machine that has none of moedge's
dependencies, with moedge run from its source tree (``python -m moedge doctor --gpu``).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any

from moedge.doctor.common import one_line
from moedge.doctor.profile import profile_item
from moedge.doctor.report import check_output, format_table, write_json
from moedge.doctor.runner import BUDGET_S, ITEMS, machine_facts, run_items

__all__ = ["BUDGET_S", "ITEMS", "check_output", "format_table", "run_doctor", "write_json"]

REPORT_VERSION = 1


def run_doctor(
    *, gpu: bool, budget_s: float = BUDGET_S, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the doctor: the machine's facts and every selected item, within ``budget_s`` seconds in all.

    Returns the report: ``machine`` (facts), ``items`` (``name``, ``status``, ``why`` or ``figures`` and
    ``summary``, ``seconds`` each), ``gpu``, ``budget_s``, ``seconds``, ``started`` (UTC, ISO 8601).
    ``progress`` gets one line as each item starts.
    """
    start = time.monotonic()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    machine = machine_facts()
    deadline = start + budget_s - 5.0  # the profile and the report's files after the items
    items = run_items(gpu, deadline, progress)
    if gpu:
        t0 = time.monotonic()
        try:
            line = profile_item({item["name"]: item for item in items})
        except Exception as exc:  # the report is written whatever the profile's assembly does
            line = {"status": "failed", "why": f"{type(exc).__name__}: {one_line(exc)}"}
        items.append({"name": "hardware-profile", **line, "seconds": round(time.monotonic() - t0, 2)})
    return {
        "moedge_doctor": REPORT_VERSION,
        "started": started,
        "gpu": gpu,
        "budget_s": budget_s,
        "seconds": round(time.monotonic() - start, 2),
        "machine": machine,
        "items": items,
    }
