"""The demo's building blocks: product stamps, timed steps, export + split, the environment record."""

from __future__ import annotations

import json
import logging
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]


def environment() -> dict[str, Any]:
    """Versions and the machine: benchmarks/provenance.py's ``environment`` in a checkout, else the basics."""
    bench = ROOT / "benchmarks"
    if (bench / "provenance.py").is_file():
        sys.path.insert(0, str(bench))
        try:
            from provenance import environment as bench_environment  # type: ignore[import-not-found]

            return dict(bench_environment(threads=None))
        except Exception as exc:  # a broken helper must not lose the demo's figures
            log.warning("benchmarks/provenance.py failed (%s): recording the basics", exc)
        finally:
            sys.path.remove(str(bench))
    import importlib.metadata as md

    versions: dict[str, str | None] = {}
    for dist in ("onnxruntime", "torch", "transformers", "numpy", "onnx"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "versions": versions}


def stamp_ok(folder: Path, stamp: dict[str, Any], reuse: bool) -> bool:
    """Whether ``folder`` holds a finished product made with ``stamp`` (its sidecar ``folder.stamp.json``)."""
    sidecar = folder.with_name(folder.name + ".stamp.json")
    if not reuse or not sidecar.is_file() or not folder.is_dir():
        return False
    try:
        return bool(json.loads(sidecar.read_text()) == stamp)
    except json.JSONDecodeError:
        return False


def write_stamp(folder: Path, stamp: dict[str, Any]) -> None:
    """Record that ``folder`` was made with ``stamp`` (the sidecar ``stamp_ok`` reads)."""
    folder.with_name(folder.name + ".stamp.json").write_text(json.dumps(stamp, indent=1) + "\n")


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@contextmanager
def step(steps: dict[str, float], name: str) -> Iterator[None]:
    """Time one step into ``steps`` and print its start and its seconds."""
    print(f"[demo] {name} ...", flush=True)
    start = time.perf_counter()
    yield
    steps[name] = time.perf_counter() - start
    print(f"[demo] {name}: {steps[name]:.1f} s", flush=True)


def export_and_split(loaded: Any, recipe: Any, bundle: Path) -> None:
    """Export ``loaded`` (QDQ when ``recipe``) beside ``bundle``, split it ``--target ort-cpu`` into
    ``bundle``, and remove the export."""
    from moedge.export.exporter import export_model
    from moedge.graph_passes.bundle import split_bundle

    export = bundle.with_name(bundle.name + "-export")
    export_model(loaded, export, recipe=recipe, overwrite=export.exists())
    split_bundle(export, bundle, target="ort-cpu", overwrite=bundle.exists(), progress=False)
    shutil.rmtree(export)
