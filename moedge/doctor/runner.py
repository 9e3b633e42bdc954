"""Run the doctor: the machine's facts, then each item in its own process under a timeout, within one budget.

A child process per item keeps the doctor alive whatever an item does: a CUDA or TensorRT call that hangs
is killed at its timeout, one that crashes the interpreter ends only its process, and the report says so.
Only the standard library is imported here.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import moedge
from moedge.doctor.common import one_line

log = logging.getLogger("moedge")

BUDGET_S = 480.0  # the whole doctor, facts and items (8 minutes)
MIN_ITEM_S = 10.0  # an item is not started with less of the budget left


@dataclass(frozen=True)
class Item:
    """One line of the report: its name, timeout, whether ``--gpu`` selects it, and what it measures."""

    name: str
    timeout_s: float
    gpu: bool
    what: str


ITEMS = (
    Item("packages", 90, False, "imports each package the items use: its version, or why it does not import"),
    Item("providers", 60, False, "ONNX Runtime's execution providers: a CUDA one, a TensorRT one"),
    Item("ort-cpu", 90, False, "tiny W8A8 expert on ORT CPU: parity with numpy, ms per call, call overhead"),
    Item(
        "ort-cuda", 120, True, "tiny expert on ORT's CUDA provider: parity with ORT CPU, ms per call of both"
    ),
    Item(
        "torch-cuda",
        150,
        True,
        "torch CUDA: pinned H2D GB/s, device GB/s, FP16/INT8 TOPS, launch+sync us, expert FFN ms, CPU rates",
    ),
    Item(
        "tensorrt", 240, True, "TensorRT engine of the tiny expert: build s, INT8 layers, parity, ms per call"
    ),
)


def source_root() -> Path:
    """The folder that holds the ``moedge`` package being run (a source tree, or site-packages)."""
    return Path(moedge.__file__).resolve().parents[1]


def _installed() -> str | None:
    """The version pip installed moedge as, or None (run from a source tree: a ``moedge.egg-info`` folder
    there, which setuptools leaves in the tree, is not an install)."""
    from importlib import metadata

    for dist in metadata.distributions(name="moedge"):
        where = getattr(dist, "_path", None)  # the metadata folder (PathDistribution)
        if where is None or not Path(where).name.endswith(".egg-info"):
            return str(dist.version)
    return None


def _memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _nvidia_smi() -> dict[str, Any]:
    """nvidia-smi's view of the GPUs (name, driver, memory), or why there is none; 20 s at most."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {"status": "not available", "why": "nvidia-smi is not on PATH"}
    query = [smi, "--query-gpu=name,driver_version,memory.total,pci.bus_id", "--format=csv,noheader"]
    try:
        result = subprocess.run(query, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"status": "failed", "why": one_line(exc)}
    text = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        return {"status": "failed", "why": f"exit {result.returncode}: {one_line(text)}"}
    return {"status": "ran", "gpus": [line.strip() for line in text.splitlines() if line.strip()]}


def machine_facts() -> dict[str, Any]:
    """What the machine is: Python, platform, CPUs, memory, moedge itself, GPU device nodes, nvidia-smi."""
    nodes = ("/dev/nvidia0", "/dev/nvhost-ctrl-gpu")  # a PCIe GPU, a Jetson's GPU
    return {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "moedge": {"version": moedge.__version__, "path": str(source_root()), "pip_installed": _installed()},
        "gpu_device_nodes": [node for node in nodes if Path(node).exists()],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "nvidia_smi": _nvidia_smi(),
    }


def _child_env() -> dict[str, str]:
    """The item processes' environment: moedge importable as it is here (a source tree needs PYTHONPATH)."""
    env = dict(os.environ)
    root = source_root()
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root.name not in ("site-packages", "dist-packages"):
        paths.insert(0, str(root))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """End the item's process group (it runs in its own session) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()


def _tail(path: Path, limit: int = 600) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return one_line(text[-limit:], limit) or "(no output)"


def _how_it_ended(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit status {rc}"


def run_child(item: Item, work: Path, timeout: float) -> dict[str, Any]:
    """Run ``item`` in a child process (``python -m moedge.doctor``) with ``timeout`` seconds; its outcome."""
    out, output = work / f"{item.name}.json", work / f"{item.name}.log"
    cmd = [sys.executable, "-m", "moedge.doctor", item.name, str(work), str(out)]
    start = time.monotonic()
    with output.open("wb") as sink:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, cwd=work, env=_child_env(),
            start_new_session=True,
        )  # fmt: skip
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            why = f"timed out after {timeout:.0f} s (its process was killed); last output: {_tail(output)}"
            return {"status": "failed", "why": why, "seconds": round(time.monotonic() - start, 2)}
        except BaseException:  # Ctrl-C: the item's process is in its own session and would run on
            _kill(proc)
            raise
    result: dict[str, Any]
    try:
        result = json.loads(out.read_text())
    except (OSError, ValueError):
        why = f"its process ended with {_how_it_ended(rc)} before reporting; last output: {_tail(output)}"
        result = {"status": "failed", "why": why}
    result["seconds"] = round(time.monotonic() - start, 2)
    return result


def run_items(
    gpu: bool, deadline: float, progress: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Every selected item in ITEMS order, each under min(its timeout, what is left before ``deadline``)."""
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="moedge-doctor-") as tmp:
        for item in ITEMS:
            if item.gpu and not gpu:
                continue
            left = deadline - time.monotonic()
            if left < MIN_ITEM_S:
                why = f"not run: the doctor's {BUDGET_S:.0f} s budget was spent by the items before it"
                results.append({"name": item.name, "status": "not available", "why": why, "seconds": 0.0})
                continue
            timeout = min(item.timeout_s, left)
            if progress is not None:
                progress(f"doctor: {item.name} (up to {timeout:.0f} s): {item.what}")
            results.append({"name": item.name, **run_child(item, Path(tmp), timeout)})
    return results
