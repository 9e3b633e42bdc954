"""One item of the doctor in this process: ``python -m moedge.doctor ITEM WORK OUT`` writes its outcome to OUT.

The outcome is ``{"status": "ran", "figures", "summary"}``, ``{"status": "not available", "why"}`` or
``{"status": "failed", "why", "figures"?, "traceback"?}``. The parent (``moedge.doctor.runner``) adds the
seconds, and says what happened when the process ended without writing OUT (a crash, a timeout).
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moedge.doctor import gpu, items
from moedge.doctor.common import Failed, Figures, NotAvailable, one_line

FUNCTIONS: dict[str, Callable[[Path], tuple[Figures, str]]] = {
    "packages": items.packages,
    "providers": items.providers,
    "ort-cpu": items.ort_cpu,
    "ort-cuda": items.ort_cuda,
    "torch-cuda": gpu.torch_cuda,
    "tensorrt": gpu.tensorrt,
}


def run_item(name: str, work: Path) -> dict[str, Any]:
    """Run the item ``name`` with ``work`` as its shared folder; its outcome (never raises for the item's errors)."""
    try:
        figures, summary = FUNCTIONS[name](work)
    except NotAvailable as exc:
        return {"status": "not available", "why": str(exc)}
    except Failed as exc:
        return {"status": "failed", "why": str(exc), "figures": exc.figures}
    except Exception as exc:  # the item broke: say how, with the end of the traceback
        return {
            "status": "failed",
            "why": f"{type(exc).__name__}: {one_line(exc, 600)}",
            "traceback": traceback.format_exc(limit=-6)[-3000:],
        }
    return {"status": "ran", "figures": figures, "summary": summary}


def main(argv: Sequence[str]) -> int:
    """``ITEM WORK OUT``: run the item, write its outcome to OUT; 0 when written, 2 for bad arguments."""
    if len(argv) != 3 or argv[0] not in FUNCTIONS:
        print(f"usage: python -m moedge.doctor ITEM WORK OUT (ITEM: {', '.join(FUNCTIONS)})")
        return 2
    name, work, out = argv[0], Path(argv[1]), Path(argv[2])
    result = run_item(name, work)
    out.write_text(json.dumps(result, default=str))
    return 0
