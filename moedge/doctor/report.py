"""The doctor's report: the readable table, and the JSON files (report, measured profile) written safely.

An output file is a new file unless ``force``: an existing one is refused before any item runs, and so is
a path that cannot be written (a folder, a parent that is a file, no permission). Files are written to a
temporary sibling and renamed into place (``moedge.paths.write_text_atomic``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from moedge._errors import MoedgeError
from moedge.paths import new_temp_file, write_text_atomic


def _nearest_existing(path: Path) -> Path:
    here = path
    while not here.exists() and here != here.parent:
        here = here.parent
    return here


def check_output(path: Path, flag: str, *, force: bool) -> Path:
    """``path`` (``~`` expanded) once it is known to be writable, or one clear error naming ``flag``."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise MoedgeError(f"{flag} {target} is a folder: give a file path, e.g. {target / 'doctor.json'}")
    if target.exists() and not force:
        raise MoedgeError(f"{flag} {target} exists: give a new path, or add --force to replace it")
    parent = _nearest_existing(target.parent)
    if not parent.is_dir():
        raise MoedgeError(f"{flag} {target}: {parent} is a file, not a folder: choose another path")
    if parent == target.parent:
        try:  # the real test (permissions, read-only file systems, root or not)
            new_temp_file(target).unlink()
        except OSError as exc:
            raise MoedgeError(
                f"{flag} {target}: cannot write in {parent} ({exc.strerror}): choose another path"
            ) from None
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise MoedgeError(
            f"{flag} {target}: cannot create folders in {parent} (permission denied): choose another path"
        )
    return target


def write_json(path: Path, flag: str, doc: dict[str, Any], *, force: bool) -> None:
    """Write ``doc`` as indented JSON to ``path`` (checked again: it may have appeared meanwhile)."""
    target = check_output(path, flag, force=force)
    try:
        write_text_atomic(target, json.dumps(doc, indent=1, default=str) + "\n")
    except OSError as exc:
        raise MoedgeError(
            f"{flag} {target}: cannot write it ({exc.strerror or exc}): choose another path"
        ) from None


def _gib(n: int | None) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "? GiB"


def _gpu_line(machine: dict[str, Any]) -> str:
    smi = machine["nvidia_smi"]
    if smi["status"] == "ran":
        return "GPU: " + "; ".join(smi["gpus"]) if smi["gpus"] else "GPU: nvidia-smi lists none"
    nodes = ", ".join(machine["gpu_device_nodes"]) or "no /dev/nvidia0 or /dev/nvhost-ctrl-gpu"
    return f"GPU: nvidia-smi {smi['status']}: {smi['why']}; {nodes}"


def format_table(report: dict[str, Any]) -> str:
    """The report as text: one line for the machine, one for its GPU, then one line per item."""
    m = report["machine"]
    where = f"pip-installed {m['moedge']['pip_installed']}" if m["moedge"]["pip_installed"] else "source tree"
    lines = [
        f"moedge doctor{' --gpu' if report['gpu'] else ''}: {len(report['items'])} items in "
        f"{report['seconds']:.1f} s (budget {report['budget_s']:.0f} s)",
        f"machine: {m['platform']}, {m['cpu_count']} CPUs, {_gib(m['memory_bytes'])}, Python {m['python']} "
        f"({m['executable']}), moedge {m['moedge']['version']} ({where}: {m['moedge']['path']})",
        _gpu_line(m),
    ]
    width = max(len(item["name"]) for item in report["items"]) if report["items"] else 8
    for item in report["items"]:
        text = item.get("summary") if item["status"] == "ran" else item.get("why")
        lines.append(f"  {item['name']:<{width}}  {item['status']:<13}  {item['seconds']:6.1f} s  {text}")
    return "\n".join(lines)
