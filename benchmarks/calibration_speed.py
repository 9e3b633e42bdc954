"""Calibration time, baseline against today, in one run: issue 17's speed bars.

For each model, in order and each in its own process at the same thread count, nothing else running:

1. the baseline: HAQ (no rotation) as the code stood at ``--baseline`` (default 81521b8, the last
   commit before issue 17's work), extracted with ``git archive`` into a temporary folder and imported
   from there (the run records the module path it imported, to show it was not this checkout);
2. today's HAQ with ``--rotate full``, through ``benchmarks/calibration_table.py --configs haq+rot-full
   --bundle-eval`` (the MoE: its fake-quant model, whose bundle parity is 0.5%) so the same calibration's
   accuracy row lands in calibration_<model>.json; its
   calibration seconds, peak RSS and per-phase seconds are read back from that row.

Both calibrate on the same data (128 C4 windows of 512, seed 0). Writes
benchmarks/results/calibration_speed.json: per model, both runs (seconds, peak RSS, phases, load average
before and after) and today's time over the baseline's, against the bars (<= 0.8x dense, <= 0.5x MoE).

    MOEDGE_DATA=../shared/data .venv/bin/python benchmarks/calibration_speed.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import tomllib

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import command_line, dataset_files, read_result, write_result

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "calibration_speed.json"
BASELINE = "81521b8"  # the last commit before issue 17 (rotations) touched the calibrator
BARS = {"smollm2-135m": 0.8, "smollm2-135m-moe": 0.5}
MODELS = tuple(BARS)

# The baseline's calibration, run by the baseline's own code (its API: calibrate, CalibrationConfig).
_RUNNER = """
import json, os, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
import moedge
from moedge.calibration import CalibrationConfig, calibrate, calibration_windows
from moedge.loading import load_model
loaded = load_model(sys.argv[1])
calib = list(calibration_windows(loaded, dataset="c4", count=int(sys.argv[3]), seqlen=512, seed=0))
load_before = os.getloadavg()
extra = {"rotate": sys.argv[4]} if len(sys.argv) > 4 else {}
result = calibrate(loaded, calib, CalibrationConfig(method="haq", **extra), progress=False)
print("RESULT " + json.dumps({
    "seconds": result.seconds,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    "tokens": result.tokens,
    "samples": result.samples,
    "threads": torch.get_num_threads(),
    "moedge_imported_from": moedge.__file__,
    "load_average_before": load_before,
    "load_average_after": os.getloadavg(),
    "phase_seconds": getattr(result, "phase_seconds", None),
}))
"""


def baseline_tree(commit: str, dest: Path) -> Path:
    """The baseline commit's sources under ``dest``, laid out as its package-dir mapping says, so that
    ``PYTHONPATH=<returned path>`` imports that commit's moedge."""
    archive = dest / "src.tar"
    with archive.open("wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", commit], stdout=f, check=True)
    src = dest / "src"
    with tarfile.open(archive) as tar:
        tar.extractall(src, filter="data")
    mapping = tomllib.loads((src / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in sorted(mapping.items()):
        link = src / Path(*package.split("."))
        if link.resolve() != (src / folder).resolve():
            link.symlink_to(os.path.relpath(src / folder, link.parent), target_is_directory=True)
    return src


def _run_calibration(args: list[str], cwd: str | Path, env: dict[str, str], what: str) -> dict[str, Any]:
    """Run ``_RUNNER`` with ``args`` in its own process; its RESULT record, with the process's wall time."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-4000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    out: dict[str, Any] = json.loads(line[len("RESULT ") :])
    out["process_seconds"] = wall
    return out


def run_baseline(model: str, commit: str, threads: int, windows: int) -> dict[str, Any]:
    """The baseline's HAQ calibration of ``model`` in its own process, from an archive of ``commit``."""
    with tempfile.TemporaryDirectory(prefix="moedge-baseline-") as tmp:
        src = baseline_tree(commit, Path(tmp))
        env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads)}
        out = _run_calibration(
            [model, str(threads), str(windows)], tmp, env, f"the baseline calibration of {model}"
        )
    if not out["moedge_imported_from"].startswith(str(src)):
        raise SystemExit(f"the baseline imported moedge from {out['moedge_imported_from']}, not the archive")
    out["moedge_imported_from"] = f"git archive {commit} (temporary folder)"
    return {"commit": commit, "config": {"method": "haq", "rotate": "none"}, **out}


def run_current_speed_only(model: str, threads: int, windows: int) -> dict[str, Any]:
    """Today's HAQ + full rotation of ``model`` in its own process, timed only (no accuracy row)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = _run_calibration(
        [model, str(threads), str(windows), "full"], ROOT, env, f"today's calibration of {model}"
    )
    out["moedge_imported_from"] = "this checkout"
    return {"config": {"method": "haq", "rotate": "full"}, **out}


def run_current(model: str, threads: int) -> dict[str, Any]:
    """Today's HAQ + full rotation of ``model`` through calibration_table.py (bundle-evaluated row)."""
    before = os.getloadavg()
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "calibration_table.py"),
        "--model",
        model,
        "--configs",
        "haq+rot-full",
        "--redo",
        "--threads",
        str(threads),
    ]
    if model == "smollm2-135m":  # the dense rows are bundle-evaluated, on the full WikiText-2 too
        cmd += ["--bundle-eval", "--full", "haq+rot-full"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - start
    doc = read_result(ROOT / "benchmarks" / "results" / f"calibration_{model}.json")
    assert doc is not None
    row = doc["results"]["rows"]["haq+rot-full"]
    calib = row["calibration"]
    return {
        "config": {"method": "haq", "rotate": "full"},
        "seconds": calib["seconds"],
        "peak_rss_mb": calib["peak_rss_mb"],
        "phase_seconds": calib.get("phase_seconds"),
        "tokens": calib["tokens"],
        "samples": calib["samples"],
        "threads": row["settings"]["threads"],
        "row": f"benchmarks/results/calibration_{model}.json rows.haq+rot-full",
        "eval": row["eval"],
        "process_seconds_with_eval": wall,
        "load_average_before": before,
        "load_average_after": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure the baseline and today's calibration per model, writing the JSON after each model."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated models")
    parser.add_argument("--baseline", default=BASELINE, help="the commit whose HAQ is the baseline")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=128, help="C4 calibration windows of 512")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--speed-only",
        action="store_true",
        help="time today's calibration alone (no calibration_table.py row, no accuracy figures)",
    )
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in BARS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    previous = read_result(args.out)
    results: dict[str, Any] = dict(previous["results"]) if previous else {}
    runs: list[dict[str, Any]] = list(previous["runs"]) if previous else []
    for model in models:
        print(f"[{model}] baseline HAQ at {args.baseline} ...", flush=True)
        base = run_baseline(model, args.baseline, args.threads, args.windows)
        print(f"[{model}] baseline: {base['seconds']:.0f} s", flush=True)
        print(f"[{model}] today's HAQ + rotate full ...", flush=True)
        now = (
            run_current_speed_only(model, args.threads, args.windows)
            if args.speed_only
            else run_current(model, args.threads)
        )
        ratio = now["seconds"] / base["seconds"]
        print(f"[{model}] today: {now['seconds']:.0f} s = {ratio:.3f}x the baseline", flush=True)
        results[model] = {
            "baseline": base,
            "current": now,
            "ratio": ratio,
            "bar": BARS[model],
            "met": ratio <= BARS[model],
        }
        runs = [r for r in runs if r.get("model") != model] + [
            {"model": model, "baseline": base, "current": {k: v for k, v in now.items() if k != "eval"}}
        ]
        write_result(
            args.out,
            benchmark="calibration_speed",
            command=command_line(),
            threads=args.threads,
            inputs=dataset_files("c4"),
            runs=runs,
            statistic="one calibration per model and variant, baseline first then today's, each in its own "
            "process at the same thread count with nothing else running (load averages recorded); seconds are "
            "calibrate()'s own wall time (model loading and evaluation excluded)",
            results=results,
            engines=("torch",),
        )
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
