"""`make demo`'s wall time, measured the two ways issue 18 bounds it, written with its provenance.

Scenarios (each run as a subprocess, timed from outside, nothing else running):

- ``cached``: `make demo` with the test bed, the FP32 bundle and ``build/cpp`` already made, and the W8A8
  steps (calibration, export, split, the C++ check) done fresh: the demo writes into a new folder that
  holds only a copy of the cached FP32 bundle (bar: 6 minutes).
- ``fresh``: ``git clone`` of this checkout's HEAD into a temporary folder, then `make demo` there with
  an empty moedge cache, so the environment, the C++ runner, the test bed, both bundles and every step
  are made from nothing (bar: 30 minutes). pip's own download cache is left as it is, and so is the
  ONNX Runtime SDK that ``make cpp`` keeps under ``~/.cache/moedge/ort-sdk`` unless ``--cold-sdk``.

Writes ``benchmarks/results/demo_timing.json`` (scenarios merged with an earlier file): per scenario the
wall seconds, the demo's own per-step seconds and cache hits, and the W8A8 bundle's token parity with
the C++ runner, read from the demo's JSON.

    MOEDGE_DATA=../shared/data .venv/bin/python benchmarks/demo_timing.py --scenarios cached
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import carry_over, command_line, read_result, write_result

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "demo_timing.json"
MODEL = "smollm2-135m-moe"
BARS_S = {"cached": 6 * 60, "fresh": 30 * 60}


def _cache_root() -> Path:
    """The moedge cache this checkout's demo uses (MOEDGE_CACHE or ~/.cache/moedge)."""
    return Path(os.environ.get("MOEDGE_CACHE") or Path.home() / ".cache" / "moedge")


def _run_make_demo(cwd: Path, env: dict[str, str], demo_args: str, json_path: Path) -> dict[str, Any]:
    """Run `make demo` in ``cwd``; its wall seconds and the demo's JSON."""
    start = time.perf_counter()
    proc = subprocess.run(
        ["make", "demo", f"DEMO_ARGS={demo_args}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"make demo failed in {cwd} (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    demo = json.loads(json_path.read_text())
    return {"wall_seconds": wall, "demo": demo}


def cached(env: dict[str, str]) -> dict[str, Any]:
    """The cached scenario: a new demo folder seeded with the cached FP32 bundle."""
    fp32 = _cache_root() / "demo" / MODEL / "fp32-cpu"
    if not fp32.is_dir() or not (ROOT / "build" / "cpp" / "moedge-run").is_file():
        raise SystemExit(
            f"the cached scenario needs {fp32} and build/cpp/moedge-run: run `make demo` once first"
        )
    with tempfile.TemporaryDirectory(prefix="moedge-demo-timing-") as tmp:
        folder = Path(tmp) / "demo"
        folder.mkdir()
        shutil.copytree(fp32, folder / "fp32-cpu")
        stamp = fp32.parent / "fp32-cpu.stamp.json"  # the demo's cache stamp sits beside the bundle
        if stamp.is_file():
            shutil.copy2(stamp, folder / stamp.name)
        json_path = Path(tmp) / "demo.json"
        out = _run_make_demo(ROOT, env, f"-o {folder} --json {json_path}", json_path)
    return out


def fresh(env: dict[str, str], cold_sdk: bool) -> dict[str, Any]:
    """The fresh-clone scenario: a clone of HEAD, an empty moedge cache, nothing built."""
    with tempfile.TemporaryDirectory(prefix="moedge-demo-fresh-") as tmp:
        clone = Path(tmp) / "moedge"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        cache = Path(tmp) / "cache"
        run_env = {**env, "MOEDGE_CACHE": str(cache)}
        if not cold_sdk:
            sdk = Path.home() / ".cache" / "moedge" / "ort-sdk"
            if sdk.is_dir():
                cache.mkdir()
                (cache / "ort-sdk").symlink_to(sdk, target_is_directory=True)
        json_path = Path(tmp) / "demo.json"
        out = _run_make_demo(clone, run_env, f"--json {json_path}", json_path)
        out["clone_of"] = subprocess.run(
            ["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        out["cold_sdk"] = cold_sdk
    return out


def main(argv: list[str] | None = None) -> int:
    """Time the chosen scenarios in order and write the JSON after each."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", default="cached", help="comma-separated: cached, fresh")
    parser.add_argument("--cold-sdk", action="store_true", help="fresh: download the ONNX Runtime SDK too")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    chosen = [s for s in args.scenarios.split(",") if s]
    unknown = [s for s in chosen if s not in BARS_S]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(BARS_S)}")
    if not os.environ.get("MOEDGE_DATA"):
        parser.error("set MOEDGE_DATA to the data folder (the demo's texts come from it)")
    env = dict(os.environ)
    previous = read_result(args.out)
    results: dict[str, Any] = dict(previous["results"]) if previous else {}
    runs, _ = carry_over(previous, lambda r: r.get("scenario") not in chosen, [])
    for scenario in chosen:
        load_before = os.getloadavg()
        print(f"[{scenario}] make demo ...", flush=True)
        out = cached(env) if scenario == "cached" else fresh(env, args.cold_sdk)
        demo = out.pop("demo")
        record = {
            **out,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "demo_total_seconds": demo.get("total_seconds"),
            "since_make_seconds": demo.get("since_make_seconds"),
            "steps_seconds": demo.get("steps_seconds"),
            "cache_hits": demo.get("cache_hits"),
            "cpp_tokens_match": demo.get("tokens_match"),
            "sides": demo.get("sides"),
            "config": demo.get("config"),
        }
        results[scenario] = {
            "wall_seconds": out["wall_seconds"],
            "bar_seconds": BARS_S[scenario],
            "met": out["wall_seconds"] <= BARS_S[scenario],
            "cpp_tokens_match": record["cpp_tokens_match"],
            "table": demo.get("table"),
        }
        runs.append({"scenario": scenario, **record})
        print(f"[{scenario}] {out['wall_seconds']:.0f} s (bar {BARS_S[scenario]} s)", flush=True)
        write_result(
            args.out,
            benchmark="demo_timing",
            command=command_line(),
            threads=os.cpu_count(),
            inputs=[],
            runs=runs,
            statistic="one timed `make demo` per scenario, wall seconds of the whole command from outside "
            "(environment check and C++ build step included), nothing else running (load averages recorded)",
            results=results,
            engines=("torch",),
        )
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
