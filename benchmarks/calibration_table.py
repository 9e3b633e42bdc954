"""W8A8 accuracy table: FP32 vs rtn / smoothquant / gptq / haq (and haq with automatic mixed precision).

Protocol (BENCHMARKS.md): calibration = 128 windows of 512 tokens drawn with seed 0 from C4 sample
documents 0-999; evaluation at seqlen 512 on WikiText-2 raw test (first 128 windows; the full test
set for the headline rows), PTB test (first 64 windows) and C4 sample documents 1000-1999 (first 64
windows). All linears of every decoder block W8A8; lm_head and routers stay FP. stories260K is
calibrated on 64 stories sampled from the FP model (temperature 1, seed 0, up to 256 tokens) and
evaluated on 64 others (seed 1).

Every configuration runs in its own process (peak memory is per configuration) and is appended to
``benchmarks/results/calibration_<model>.json``; rerunning skips rows already there (resume).

    MOEDGE_DATA=../shared/data .venv/bin/python benchmarks/calibration_table.py --model smollm2-135m
    MOEDGE_DATA=../shared/data .venv/bin/python benchmarks/calibration_table.py --model smollm2-135m-moe
    MOEDGE_DATA=../shared/data .venv/bin/python benchmarks/calibration_table.py --model stories260k
    .venv/bin/python benchmarks/calibration_table.py --table   # the README table from the JSON files
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from provenance import (
    carry_over,
    command_line,
    dataset_files,
    model_files,
    read_result,
    results_of,
    run_stamp,
    write_result,
)

RESULTS = Path(__file__).parent / "results"
AUTO_FP = 0.02
EVALS = {"wikitext2": 128, "ptb": 64, "c4": 64}
CONFIGS: dict[str, dict[str, Any]] = {
    "fp32": {},
    # the published methods and HAQ as first built: unrotated (CalibrationConfig's default is "auto")
    "rtn": {"method": "rtn", "rotate": "none"},
    "smoothquant": {"method": "smoothquant", "rotate": "none"},
    "gptq": {"method": "gptq", "rotate": "none"},
    # issue 18: each baseline with HAQ's range search (output error), so smoothing and range effects separate
    "rtn+range": {"method": "rtn", "act_clip": "output", "rotate": "none"},
    "smoothquant+range": {"method": "smoothquant", "act_clip": "output", "rotate": "none"},
    "gptq+range": {"method": "gptq", "act_clip": "output", "rotate": "none"},
    # "haq" also yields "haq+auto-fp" (same calibration, then 2% kept FP)
    "haq": {"method": "haq", "rotate": "none"},
    "haq+auto-fp": {"method": "haq", "auto_keep_fp": AUTO_FP, "rotate": "none"},  # that row alone
    # experiment: 83 of 120 smollm2 groups chose the grid's top strength (0.9); does the optimum lie above?
    "haq-a1": {"method": "haq", "alpha_grid": (0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.95, 1.0), "rotate": "none"},
    # issue 17: rotations (calibration/rotation.py, calibration/residual_rotation.py)
    "haq+rot-online": {"method": "haq", "rotate": "online"},
    "haq+rot-offline": {"method": "haq", "rotate": "offline"},
    "haq+rot-full": {"method": "haq", "rotate": "full"},
    "haq+rot-full+head": {"method": "haq", "rotate": "full", "quantize_head": True},
    "haq+rot-online+head": {"method": "haq", "rotate": "online", "quantize_head": True},
}
PLANS = {
    "smollm2-135m": ["fp32", "rtn", "smoothquant", "gptq", "haq"],
    "smollm2-135m-moe": ["fp32", "rtn", "haq"],
    "stories260k": ["fp32", "rtn", "smoothquant", "gptq", "haq", "haq+rot-full"],
}


def _results_path(model: str) -> Path:
    return RESULTS / f"calibration_{model}.json"


def _load(model: str) -> dict[str, Any]:
    """The table's results so far: {"model", "rows"} (a file written before the provenance schema too)."""
    doc: dict[str, Any] | None = results_of(_results_path(model))
    return doc if doc is not None else {"model": model, "rows": {}}


def _save(model: str, name: str, row: dict[str, Any], inputs: list[Path]) -> None:
    """Add (or replace) one row, its run and its inputs, keeping the other rows' runs and inputs."""
    previous = read_result(_results_path(model))
    doc = _load(model)
    doc.pop("machine", None)  # pre-schema files: platform and Python now live in "environment"
    doc["rows"][name] = row
    kept, earlier = carry_over(previous, lambda r: r.get("row") != name, inputs)
    write_result(
        _results_path(model),
        benchmark="calibration_table",
        command=command_line(),
        threads=row["settings"]["threads"],
        inputs=[*inputs, *earlier],
        runs=[*kept, {"row": name, **run_stamp(), "command": command_line(), **row}],
        statistic="one run per configuration, each in its own process (runs: every row as measured, "
        "stamped with when and by which command): perplexities are one deterministic evaluation pooled over "
        "every predicted token of the windows, calibration seconds and peak RSS one measurement",
        results=doc,
        engines=("torch",),
    )


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _story_perplexity(model: Any, stories: list[np.ndarray]) -> dict[str, Any]:
    import torch

    from moedge.evaluation import window_nll

    total, tokens = 0.0, 0
    start = time.perf_counter()
    with torch.no_grad():
        for ids in stories:
            logits = model(input_ids=torch.from_numpy(ids)[None], use_cache=False).logits[0].float().numpy()
            total += window_nll(logits, ids)
            tokens += len(ids) - 1
    return {
        "perplexity": math.exp(total / tokens),
        "dataset": "64 stories sampled from the FP model (seed 1)",
        "sequences": len(stories),
        "tokens": tokens,
        "seconds": time.perf_counter() - start,
    }


def _bundle_scorer(loaded: Any, result: Any, model_name: str, config: str) -> tuple[Any, str]:
    """The calibrated model as its ort-cpu bundle (recipe -> export -> split, in the cache), scored by
    ONNX Runtime's int8 kernels: (scorer, what it is). The recipe stays in ``recipes/<model>-<config>``."""
    from moedge.calibration import apply_recipe, save_recipe
    from moedge.evaluation import ort_logits
    from moedge.export.exporter import export_model
    from moedge.graph_passes.bundle import split_bundle
    from moedge.loading import load_model
    from moedge.paths import cache_dir
    from moedge.runtime.bundle_runner import BundleRunner

    tag = f"{model_name}-{config}".replace("+", "-")
    recipe, export, bundle = (cache_dir() / d / tag for d in ("recipes", "bundles", "bundles"))
    export = export.with_name(f"{tag}-export")
    bundle = bundle.with_name(f"{tag}-cpu")
    save_recipe(loaded, result, recipe, calibration_data="c4", overwrite=True)
    export_model(apply_recipe(load_model(model_name), recipe), export, overwrite=True)
    split_bundle(export, bundle, target="ort-cpu", progress=False, overwrite=True)
    return ort_logits(BundleRunner(bundle)), f"ort-cpu bundle {bundle} (int8 kernels, ONNX Runtime)"


def run_one(model_name: str, config: str, full: bool, bundle: bool = False) -> dict[str, dict[str, Any]]:
    """One configuration in this process: calibrate (unless FP32), evaluate; returns rows by name.

    ``bundle``: evaluate the calibrated model's ort-cpu bundle instead of the PyTorch fake-quant model
    (its perplexity equals the fake-quant model's within 0.1% in side_by_side.json)."""
    import torch

    from moedge.calibration import (
        CalibrationConfig,
        calibrate,
        calibration_windows,
        keep_most_sensitive,
        sample_stories,
        save_recipe,
    )
    from moedge.datasets import c4_documents, load_text
    from moedge.evaluation import perplexity, torch_logits
    from moedge.loading import load_model
    from moedge.paths import cache_dir

    loaded = load_model(model_name)
    stories = model_name == "stories260k"
    if stories:
        calib = sample_stories(loaded, count=64, seed=0)
        eval_stories = sample_stories(loaded, count=64, seed=1)
    else:
        calib = list(calibration_windows(loaded, dataset="c4", count=128, seqlen=512, seed=0))
        texts = {
            "wikitext2": load_text("wikitext2").text,
            "ptb": load_text("ptb").text,
            "c4": "\n\n".join(c4_documents(1000, 2000)),
        }
        token_ids = {k: np.asarray(loaded.encode(t), dtype=np.int64) for k, t in texts.items()}

    scorer: Any = None  # the PyTorch model unless replaced by its bundle
    evaluated = "pytorch fake-quant model"

    def evaluate(full_wikitext: bool) -> dict[str, Any]:
        score = scorer if scorer is not None else torch_logits(loaded.model)
        if stories:
            return {"stories": _story_perplexity(loaded.model, eval_stories)}
        out = {}
        for name, windows in EVALS.items():
            if name != "wikitext2" and not _all_datasets(model_name, config):
                continue
            r = perplexity(
                score,
                token_ids[name],
                seqlen=512,
                max_windows=windows,
                dataset=name,
                backend="pytorch",
                progress=False,
            )
            out[name] = r.to_dict()
            print(f"  {config} {name}: {r.perplexity:.4f}", flush=True)
        if full_wikitext:
            r = perplexity(
                score,
                token_ids["wikitext2"],
                seqlen=512,
                dataset="wikitext2",
                backend="pytorch",
                progress=False,
            )
            out["wikitext2_full"] = r.to_dict()
            print(f"  {config} wikitext2 full: {r.perplexity:.4f}", flush=True)
        return out

    settings = {
        "calibration": "64 sampled stories (seed 0)" if stories else "c4 docs 0-999, 128 x 512, seed 0",
        "threads": torch.get_num_threads(),
    }
    rows: dict[str, dict[str, Any]] = {}
    inputs = model_files(loaded) + ([] if stories else dataset_files("c4", "wikitext2", "ptb"))

    def emit(name: str, row: dict[str, Any]) -> None:
        # saved as soon as measured: a stopped run keeps what it finished
        rows[name] = row
        _save(model_name, name, row, inputs)

    if config == "fp32":
        emit("fp32", {"settings": settings, "eval": evaluate(full)})
        return rows
    auto_only = config == "haq+auto-fp"
    cfg = CalibrationConfig(**CONFIGS["haq" if auto_only else config])
    with_auto = config == "haq" or auto_only
    result = calibrate(loaded, calib, cfg, progress=False, retain_fp=with_auto)
    calib_info = {
        "seconds": result.seconds,
        "peak_rss_mb": _peak_mb(),
        "phase_seconds": result.phase_seconds,
        "samples": result.samples,
        "tokens": result.tokens,
        "smoothing_strengths": _histogram([v for v in result.smoothing.values()]),
        "worst_linears": sorted(
            ((r.rel_error, n) for n, r in result.linears.items() if r.quantized), reverse=True
        )[:5],
        "excluded": sorted({n.split(".", 3)[-1] if n.startswith("model.") else n for n in result.excluded}),
    }
    print(f"  {config}: calibrated in {result.seconds:.0f} s, peak RSS {_peak_mb():.0f} MB", flush=True)
    if bundle and not stories:
        scorer, evaluated = _bundle_scorer(loaded, result, model_name, config)
        calib_info["evaluated"] = evaluated
    if config == "haq" and not stories:
        recipe_dir = cache_dir() / "recipes" / f"{model_name}-haq"
        if not recipe_dir.exists():
            save_recipe(loaded, result, recipe_dir, calibration_data="c4")
        calib_info["recipe"] = str(recipe_dir)
    if not auto_only:
        emit(
            config,
            {"settings": {**settings, **cfg.__dict__}, "calibration": calib_info, "eval": evaluate(full)},
        )
    if with_auto:
        start = time.perf_counter()
        kept = keep_most_sensitive(loaded, result, AUTO_FP, calib[: cfg.probe_sequences])
        params = sum(r.params for r in result.linears.values())
        kept_params = sum(result.linears[n].params for n in kept)
        auto = {
            **calib_info,
            "seconds": calib_info["seconds"] + time.perf_counter() - start,
            "kept_fp": kept,
            "kept_fraction_of_linear_params": kept_params / params,
        }
        print(
            f"  {config}: kept in FP {kept} ({100 * kept_params / params:.2f}% of linear params)", flush=True
        )
        emit(
            "haq+auto-fp",
            {
                "settings": {**settings, **cfg.__dict__, "auto_keep_fp": AUTO_FP},
                "calibration": auto,
                "eval": evaluate(full and auto_only),
            },
        )
    return rows


def _all_datasets(model: str, config: str) -> bool:
    """PTB and C4 columns too (2-core time budget: the FP32 and HAQ rows of the dense model)."""
    return model == "smollm2-135m" and (config in ("fp32", "haq") or config.startswith("haq+rot"))


def _histogram(values: list[float | None]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        key = "none" if v is None else f"{v:g}"
        out[key] = out.get(key, 0) + 1
    return out


def _fp32_full(model: str) -> dict[str, Any] | None:
    """The full-WikiText-2 FP32 figure measured earlier with the same evaluation function, if any."""
    if model == "smollm2-135m":
        path = RESULTS / "smollm2_wikitext2_pytorch.json"  # moedge eval smollm2-135m --data wikitext2
        return json.loads(path.read_text()) if path.is_file() else None
    if model == "smollm2-135m-moe":
        report = results_of(RESULTS / "testbed_report.json")  # benchmarks/testbed_report.py
        return report[model]["perplexity"] if report is not None else None
    return None


def table(models: list[str]) -> str:
    """The README table (markdown) from the saved JSON."""
    lines = [
        "| model | configuration | WikiText-2 (128 w) | x FP32 | PTB (64 w) | C4 (64 w) | WikiText-2 full | calibration |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model in models:
        doc = _load(model)
        rows = doc["rows"]
        if "fp32" not in rows:
            continue
        key = "stories" if model == "stories260k" else "wikitext2"
        fp = rows["fp32"]["eval"][key]["perplexity"]
        fp_full = rows["fp32"]["eval"].get("wikitext2_full") or _fp32_full(model)
        for name, row in rows.items():
            ev = dict(row["eval"])
            if name == "fp32" and fp_full is not None:
                ev["wikitext2_full"] = fp_full
            ppl = ev[key]["perplexity"]

            def cell(k: str, ev: dict[str, Any] = ev) -> str:
                return f"{ev[k]['perplexity']:.3f}" if k in ev else "-"

            cal = row.get("calibration")
            cal_cell = f"{cal['seconds']:.0f} s, {cal['peak_rss_mb'] / 1024:.1f} GB" if cal else "-"
            full = cell("wikitext2_full")
            if name != "fp32" and "wikitext2_full" in ev and fp_full is not None:
                full += f" (x{ev['wikitext2_full']['perplexity'] / fp_full['perplexity']:.3f})"
            lines.append(
                f"| {model} | {name} | {ppl:.3f} | {ppl / fp:.3f} | {cell('ptb')} | {cell('c4')} | "
                f"{full} | {cal_cell} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(PLANS))
    parser.add_argument("--configs", help="comma-separated subset of the model's plan")
    parser.add_argument("--full", default="fp32,haq", help="configurations that also get the full WikiText-2")
    parser.add_argument("--threads", type=int, help="PyTorch threads per configuration (default: all cores)")
    parser.add_argument(
        "--bundle-eval",
        action="store_true",
        help="evaluate each calibrated model as its ort-cpu bundle (ONNX Runtime int8 kernels) instead of "
        "the PyTorch fake-quant model (the same perplexity within 0.1%% in side_by_side.json)",
    )
    parser.add_argument(
        "--redo",
        action="store_true",
        help="re-measure configurations the JSON already holds (default: skip them)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration in this process
    parser.add_argument("--table", action="store_true", help="print the markdown table from the JSON files")
    args = parser.parse_args()
    if args.table:
        text = table(list(PLANS))
        (RESULTS / "calibration_table.md").write_text(text + "\n")
        print(text)
        return
    if args.model is None:
        parser.error("--model is required")
    full = set(args.full.split(","))
    if args.one:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        run_one(args.model, args.one, args.one in full and args.model != "stories260k", args.bundle_eval)
        return
    plan = args.configs.split(",") if args.configs else PLANS[args.model]
    for config in plan:
        if config in _load(args.model)["rows"] and not args.redo:
            print(f"{args.model} {config}: already measured, skipped", flush=True)
            continue
        print(f"{args.model} {config}:", flush=True)
        cmd = [sys.executable, __file__, "--model", args.model, "--one", config, "--full", args.full]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.bundle_eval:
            cmd.append("--bundle-eval")
        subprocess.run(cmd, check=True)
    print(table([args.model]))


if __name__ == "__main__":
    main()
