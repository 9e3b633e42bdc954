"""The runtime protocol of BENCHMARKS.md (formerly ``moedge bench runtime``).

Part 1 (modeled): real routing traces of an MoE bundle (statistics from one text, evaluation on
another) replayed through every cache policy at each budget on each hardware profile; every policy is
tuned per (profile, budget) cell over its own knobs on the statistics text only (``--untuned-baselines``:
``haq`` alone, the baselines at their defaults). Writes ``runtime_policies.json`` and
``runtime_policies.png``.
Part 2 (measured, ``--parts speed``; runtime_speed.py): ORT CPU wall clock of bundles (W8A8 against
FP32, a dense W8A8 bundle) against PyTorch eager FP32 and llama.cpp, prompt and decode separately,
interleaved repeats, medians. Writes ``runtime_speed.json``. Timing never gates a test.

    MOEDGE_DATA=../shared/data .venv/bin/python benchmarks/runtime_bench.py --bundle W8A8_MOE_BUNDLE \\
        [-o benchmarks/results/runtime] [--parts policies,speed --fp32-bundle B --dense-bundle B ...]

Exit codes as ``moedge``'s: 0 ok, 1 one ``runtime_bench.py: error: ...`` line, 2 one usage line,
130 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from provenance import command_line, dataset_files, write_result

from moedge import inputs
from moedge._errors import MoedgeError
from moedge.cli.common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    OneLineParser,
    add_environment_flags,
    one_line,
)

log = logging.getLogger("runtime_bench")

PROG = "runtime_bench.py"
POLICY_ORDER = ("cpu", "lru", "lfu", "static", "n-cpu-moe", "fate", "moe-infinity", "haq")

_POSITIVE = inputs.int_range(1)
_TOKENS = inputs.int_range(16, why=" (a routing trace needs 16 tokens or more)")


def fractions(text: str) -> list[float]:
    """Comma-separated budget fractions, each in (0, 1]; one ``MoedgeError`` otherwise."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise MoedgeError(f"budgets must be comma-separated fractions, got {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise MoedgeError(f"budgets must lie in (0, 1], got {text!r}")
    return values


def _fraction_list(text: str) -> str:
    """An argparse type: comma-separated fractions in (0, 1] (checked by ``fractions``), passed on as text."""
    try:
        fractions(text)
    except MoedgeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The bench's own flags (the ones ``moedge bench runtime`` had)."""
    p.add_argument("--bundle", type=Path, required=True, help="the W8A8 MoE bundle (smollm2-135m-moe)")
    p.add_argument(
        "-o", "--out", type=Path, default=Path("benchmarks/results/runtime"), help="results folder"
    )
    p.add_argument("--stats-text", default="c4", help="text the statistics and the tuning come from")
    p.add_argument("--eval-text", default="wikitext2", help="text the policies are evaluated on")
    p.add_argument("--stats-tokens", type=_TOKENS, default=4096)
    p.add_argument("--eval-tokens", type=_TOKENS, default=2048)
    p.add_argument("--budgets", type=_fraction_list, default="0.1,0.25,0.4,0.6", help="expert-byte fractions")
    p.add_argument(
        "--memory-budgets",
        type=_fraction_list,
        default="0.05,0.1,0.15,0.2,0.25,0.3,0.4,0.5,0.6",
        help="fractions swept for the smallest budget within 1.25x of all-on-GPU",
    )
    p.add_argument(
        "--profiles", default="all", help="comma-separated hardware profiles (default: every built-in)"
    )
    p.add_argument(
        "--tune-tokens", type=_POSITIVE, default=512, help="statistics-text tokens the policy tuner replays"
    )
    p.add_argument(
        "--untuned-baselines",
        action="store_true",
        help="tune haq alone and run the baselines at their defaults (the table before every policy was tuned)",
    )
    p.add_argument("--context", type=_POSITIVE, default=512, help="KV length when decode starts (the prompt)")
    p.add_argument(
        "--parts",
        default="policies",
        help="comma-separated: policies (modeled table), speed (ORT CPU wall clock)",
    )
    p.add_argument("--fp32-bundle", type=Path, help="FP32 twin of --bundle (speed)")
    p.add_argument(
        "--dense-bundle",
        type=Path,
        action="append",
        help="dense W8A8 bundle (speed; smollm2-135m); repeat to time variants in the same run",
    )
    p.add_argument("--torch-model", help="PyTorch eager FP32 baseline model (speed), e.g. smollm2-135m-moe")
    p.add_argument(
        "--gguf", type=Path, help="llama.cpp Q8_0 GGUF of the dense model (speed; llama-cpp-python)"
    )
    p.add_argument("--prompt-tokens", type=_POSITIVE, default=512)
    p.add_argument("--new-tokens", type=_POSITIVE, default=64)
    p.add_argument("--repeats", type=_POSITIVE, default=3)
    p.add_argument("--threads", type=inputs.threads, default=2)


def build_parser() -> argparse.ArgumentParser:
    """The bench's parser: its flags, ``-v``/``-q``, ``--data-dir`` and ``--cache-dir``."""
    parser = OneLineParser(
        prog=PROG,
        description="cache policies x budgets x hardware profiles on real routing traces, and ORT CPU speed "
        "(the runtime protocol of BENCHMARKS.md)",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    add_bench_arguments(parser)
    add_environment_flags(parser)
    return parser


def _trace(bundle: Path, text: str, tokens: int, cache: Path, threads: int) -> tuple[Any, Path]:
    """The routing trace of ``tokens`` tokens of ``text`` through ``bundle`` (cached), and its file."""
    from moedge.formats.manifest import MANIFEST_FILE
    from moedge.runtime.bundle_runner import BundleRunner
    from moedge.runtime.profiling import text_token_ids
    from moedge.runtime.simulate import DecodeTrace, record_trace

    key = hashlib.sha256((bundle / MANIFEST_FILE).read_bytes() + f"{text}:{tokens}".encode()).hexdigest()[:16]
    path = cache / f"trace-{text}-{tokens}-{key}.npz"
    if path.is_file():
        return DecodeTrace.load(path), path
    runner = BundleRunner(bundle, intra_op_threads=threads)
    start = time.perf_counter()
    trace = record_trace(runner, text_token_ids(bundle, text, tokens))
    log.info("traced %d tokens of %s in %.1f s", tokens, text, time.perf_counter() - start)
    cache.mkdir(parents=True, exist_ok=True)
    trace.save(path)
    return trace, path


def policy_table(args: argparse.Namespace) -> dict[str, Any]:
    """Part 1: every policy x budget x profile on the evaluation trace (modeled)."""
    from moedge.formats.manifest import read_manifest
    from moedge.paths import cache_dir
    from moedge.runtime.costs import ModelCosts, parse_budget
    from moedge.runtime.policies import POLICIES
    from moedge.runtime.profiles import BUILTIN, load_profile
    from moedge.runtime.simulate import TUNING_NOTES, replay

    manifest = read_manifest(args.bundle, verify=True)
    if not any(layer.moe for layer in manifest.layers):
        raise MoedgeError(f"{args.bundle} has no MoE layers: the policy bench needs an MoE bundle")
    costs = ModelCosts.from_manifest(manifest)
    names = list(BUILTIN) if args.profiles == "all" else [p.strip() for p in args.profiles.split(",")]
    profiles = [load_profile(n) for n in names]
    # derived data: regenerated, never committed
    cache = cache_dir(args.cache_dir) / "bench" / "runtime" / "traces"
    stats_trace, stats_file = _trace(args.bundle, args.stats_text, args.stats_tokens, cache, args.threads)
    eval_trace, eval_file = _trace(args.bundle, args.eval_text, args.eval_tokens, cache, args.threads)
    stats = stats_trace.stats()
    total = costs.expert_bytes()
    cells: list[dict[str, Any]] = []
    reference: dict[str, Any] = {}
    memory: dict[str, Any] = {}
    for hw in profiles:
        full = replay(eval_trace, costs, POLICIES["full-gpu"], total, hw, stats=stats, context=args.context)
        reference[hw.name] = full
        for fraction in fractions(args.budgets):
            budget = parse_budget(fraction, costs)
            for name in POLICY_ORDER:
                start = time.perf_counter()
                policy, plan, tuning = _tuned(args, name, costs, budget, hw, stats_trace, stats)
                tuned_s = time.perf_counter() - start
                start = time.perf_counter()
                summary = replay(
                    eval_trace, costs, policy, budget, hw, stats=stats, context=args.context, plan=plan
                )
                summary.update(budget_fraction=fraction, seconds=time.perf_counter() - start)
                if tuning is not None:
                    summary.update(tuning, tune_seconds=tuned_s)
                cells.append(summary)
            log.info("%s budget %.0f%% done", hw.name, fraction * 100)
        memory[hw.name] = _memory_sweep(args, costs, hw, stats_trace, eval_trace, stats, full)
    doc = {
        "bundle": str(args.bundle),
        "precision": manifest.precision,
        "expert_bytes": total,
        "stats_text": args.stats_text,
        "stats_tokens": args.stats_tokens,
        "eval_text": args.eval_text,
        "eval_tokens": args.eval_tokens,
        "trace_files": {"stats": str(stats_file), "eval": str(eval_file)},
        "context": args.context,
        "tune_tokens": args.tune_tokens,
        "tuning": (
            "haq tuned per (profile, budget) cell on the statistics trace's first "
            f"{args.tune_tokens} tokens; the baselines at their fixed defaults (--untuned-baselines)"
            if args.untuned_baselines
            else "every policy tuned per (profile, budget) cell on the statistics trace's first "
            f"{args.tune_tokens} tokens over its own knobs (grids in tuned_over)"
        ),
        "tuning_notes": {k: v for k, v in TUNING_NOTES.items() if k == "haq" or not args.untuned_baselines},
        "speculative_recall": {
            "top2_candidates": eval_trace.prefetch_recall(2),
            "top4_candidates": eval_trace.prefetch_recall(4),
        },
        "modeled": True,
        "profiles": {hw.name: hw.to_dict() for hw in profiles},
        "full_gpu": reference,
        "cells": cells,
        "memory": memory,
    }
    doc["checks"] = _checks(doc)
    return doc


HAQ_SETTINGS = ("static_fraction", "prefetch", "prefetch_share", "path_fraction", "topup")


def _tuned(
    args: argparse.Namespace, name: str, costs: Any, budget: int, hw: Any, stats_trace: Any, stats: Any
) -> tuple[Any, Any, dict[str, Any] | None]:
    """Policy ``name`` tuned for one cell on the statistics trace: the policy, the plan to pin (haq's
    balanced plan; None: the policy's own placement) and the cell's ``settings`` and ``tuned_over``
    (None for an untuned baseline)."""
    from moedge.runtime.policies import POLICIES
    from moedge.runtime.simulate import policy_grid, tune_haq, tune_policy

    base = POLICIES[name]
    grid = policy_grid(name, costs, budget)
    record = {"tuned_over": {k: list(v) for k, v in grid.items()}}
    if name == "haq":
        tuned, tuning = tune_haq(
            stats_trace, costs, budget, hw, base=base, stats=stats, tokens=args.tune_tokens
        )
        return tuned, tuning["plan"], {"settings": {k: getattr(tuned, k) for k in HAQ_SETTINGS}, **record}
    if args.untuned_baselines:
        return base, None, None
    if not grid:  # nothing to tune (cpu)
        return base, None, {"settings": {}, **record}
    tuned, _ = tune_policy(
        stats_trace, costs, budget, hw, base=base, grid=grid, stats=stats, tokens=args.tune_tokens
    )
    return tuned, None, {"settings": {k: getattr(tuned, k) for k in grid}, **record}


def _memory_sweep(
    args: argparse.Namespace,
    costs: Any,
    hw: Any,
    stats_trace: Any,
    eval_trace: Any,
    stats: Any,
    full: dict[str, Any],
) -> dict[str, Any]:
    """The --memory-budgets sweep of tuned haq on one profile: the smallest budget within 1.25x of
    all-on-GPU, and its device bytes against the FP16 footprint."""
    from moedge.runtime.costs import parse_budget
    from moedge.runtime.policies import POLICIES
    from moedge.runtime.simulate import replay, tune_haq

    target = 1.25 * full["modeled_decode_ms"]["mean"]
    context = args.context + eval_trace.chosen.shape[0]
    fp16 = costs.fp16_footprint(context)
    rows = []
    for fraction in fractions(args.memory_budgets):
        budget = parse_budget(fraction, costs)
        tuned, tuning = tune_haq(
            stats_trace, costs, budget, hw, base=POLICIES["haq"], tokens=args.tune_tokens
        )
        s = replay(
            eval_trace, costs, tuned, budget, hw, stats=stats, context=args.context, plan=tuning["plan"]
        )
        dev = s["device_bytes"]
        rows.append(
            {
                "budget_fraction": fraction,
                "modeled_decode_ms": s["modeled_decode_ms"]["mean"],
                "ratio_to_full_gpu": s["modeled_decode_ms"]["mean"] / full["modeled_decode_ms"]["mean"],
                "device_bytes": dev["total"],
                "fraction_of_fp16_footprint": dev["total"] / fp16,
            }
        )
    within = [r for r in rows if r["modeled_decode_ms"] <= target]
    return {
        "fp16_all_on_gpu_bytes": fp16,
        "full_gpu_w8a8_bytes": full["device_bytes"]["total"],
        "sweep": rows,
        "smallest_within_1.25x": within[0] if within else None,
    }


def _checks(doc: dict[str, Any]) -> dict[str, Any]:
    """The acceptance comparisons, computed from the table (never asserted on timing)."""
    out: dict[str, Any] = {"haq_fastest": [], "spread_vs_lru": []}
    by: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
    for c in doc["cells"]:
        by.setdefault((c["profile"], c["budget_fraction"]), {})[c["policy"]] = c
    for (profile, fraction), row in sorted(by.items()):
        haq = row["haq"]["modeled_decode_ms"]["mean"]
        best_other = min(v["modeled_decode_ms"]["mean"] for k, v in row.items() if k != "haq")
        out["haq_fastest"].append(
            {
                "profile": profile,
                "budget": fraction,
                "haq_ms": haq,
                "best_other_ms": best_other,
                "ok": haq <= best_other * 1.02,
            }
        )
        out["spread_vs_lru"].append(
            {
                "profile": profile,
                "budget": fraction,
                "haq_std": row["haq"]["hit_rate_layer_std"],
                "lru_std": row["lru"]["hit_rate_layer_std"],
                "lru_hit_rate": row["lru"]["hit_rate"],
                "ok": row["haq"]["hit_rate_layer_std"] <= row["lru"]["hit_rate_layer_std"],
            }
        )
    rtx = by.get(("rtx4090-pcie4", 0.25))
    if rtx:
        out["rtx4090_25pct"] = {
            "haq_hit_rate": rtx["haq"]["hit_rate"],
            "lru_hit_rate": rtx["lru"]["hit_rate"],
        }
    return out


def plot_policies(doc: dict[str, Any], path: Path) -> None:
    """Hit rate and modeled decode latency against budget, per policy and profile."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = list(doc["profiles"])
    fig, axes = plt.subplots(2, len(profiles), figsize=(5 * len(profiles), 8), squeeze=False)
    for j, profile in enumerate(profiles):
        for name in POLICY_ORDER:
            rows = sorted(
                (c for c in doc["cells"] if c["profile"] == profile and c["policy"] == name),
                key=lambda c: c["budget_fraction"],
            )
            x = [100 * c["budget_fraction"] for c in rows]
            axes[0][j].plot(x, [c["modeled_decode_ms"]["mean"] for c in rows], marker="o", label=name)
            axes[1][j].plot(x, [c["hit_rate"] for c in rows], marker="o", label=name)
        axes[0][j].axhline(
            doc["full_gpu"][profile]["modeled_decode_ms"]["mean"], color="k", ls="--", label="full GPU"
        )
        axes[0][j].set_title(f"{profile} (modeled)")
        axes[0][j].set_ylabel("decode ms/token (modeled)")
        axes[1][j].set_ylabel("GPU hit rate")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xlabel("expert budget, % of expert bytes")
            ax.grid(alpha=0.3)
        axes[0][j].legend(fontsize=7)
    fig.suptitle(f"{Path(doc['bundle']).name}: stats {doc['stats_text']}, eval {doc['eval_text']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_runtime_bench(args: argparse.Namespace) -> list[str]:
    """Run the bench, write its files, return a printable summary."""
    parts = {p.strip() for p in args.parts.split(",")}
    if not parts or parts - {"policies", "speed"}:
        raise MoedgeError(f"--parts takes policies and/or speed, got {args.parts!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    if "policies" in parts:
        lines += _policies_part(args)
    if "speed" in parts:
        lines += _speed_part(args)
    return lines


def _policies_part(args: argparse.Namespace) -> list[str]:
    doc = policy_table(args)
    write_result(
        args.out / "runtime_policies.json",
        benchmark="runtime_bench policies",
        command=getattr(args, "command", None) or command_line(),
        threads=args.threads,  # the tracing runs (when a trace is not cached yet); the replays are modeled
        inputs=[
            args.bundle,
            *map(Path, doc["trace_files"].values()),
            *dataset_files(args.stats_text, args.eval_text),
        ],
        runs=doc["cells"],
        statistic="modeled, deterministic: one replay of the evaluation trace per profile, budget and policy "
        "(runs: those cells); modeled decode ms per token as mean and percentiles over the trace's tokens, "
        "hit rates over every routed expert; "
        + ("haq" if args.untuned_baselines else "every policy")
        + " tuned on the statistics trace alone (settings and tuned_over in each cell)",
        results={k: v for k, v in doc.items() if k != "cells"},
    )
    try:
        plot_policies(doc, args.out / "runtime_policies.png")
    except ImportError:
        log.warning("matplotlib is missing: no plot (pip install 'moedge[plot]')")
    lines = [f"modeled policy table -> {args.out / 'runtime_policies.json'}"]
    for profile in doc["profiles"]:
        full = doc["full_gpu"][profile]["modeled_decode_ms"]["mean"]
        lines.append(f"{profile} (modeled; full GPU {full:.3f} ms/token)")
        for fraction in sorted({c["budget_fraction"] for c in doc["cells"]}):
            row = {
                c["policy"]: c
                for c in doc["cells"]
                if c["profile"] == profile and c["budget_fraction"] == fraction
            }
            cells = "  ".join(
                f"{n} {row[n]['modeled_decode_ms']['mean']:.3f}/{row[n]['hit_rate']:.2f}/{row[n]['hit_rate_layer_std']:.3f}"
                for n in POLICY_ORDER
            )
            lines.append(f"  {fraction:>4.0%}: {cells}   (ms/token, hit rate, per-layer std)")
        best = doc["memory"][profile]["smallest_within_1.25x"]
        if best:
            lines.append(
                f"  smallest budget within 1.25x of full GPU: {best['budget_fraction']:.0%} -> "
                f"{best['device_bytes'] / 2**20:.0f} MiB = {best['fraction_of_fp16_footprint']:.3f} of the FP16 footprint"
            )
    return lines


def _speed_part(args: argparse.Namespace) -> list[str]:
    from runtime_speed import speed_table  # the sibling module in benchmarks/

    files: list[Path] = []
    speed = speed_table(args, files)
    runs = [
        {"variant": name, "repeat": i, "prompt_s": prompt_s, "decode_s": decode_s}
        for name, row in speed["variants"].items()
        for i, (prompt_s, decode_s) in enumerate(row.pop("runs"))
    ]
    runs += [
        {"variant": name, "measure": "decode ms per token by graph", **parts}
        for name, parts in speed["decode_ms_per_token_by_graph"].items()
    ]
    engines = ["onnxruntime", *(["torch"] if args.torch_model else []), *(["llama.cpp"] if args.gguf else [])]
    write_result(
        args.out / "runtime_speed.json",
        benchmark="runtime_bench speed",
        command=getattr(args, "command", None) or command_line(),
        threads=args.threads,
        inputs=[*files, *dataset_files(args.eval_text)],
        runs=runs,
        statistic=f"median of {args.repeats} interleaved repeats (variants round-robin, sessions and models "
        "loaded before timing): prompt tokens/s = prompt tokens / median prompt seconds, decode tokens/s = "
        "new tokens / median decode seconds; the decode breakdown by graph is one timed decode per bundle",
        results=speed,
        engines=engines,
    )
    lines = [
        f"ORT CPU wall clock ({args.threads} threads, {speed['prompt_tokens']}-token prompt, "
        f"{speed['new_tokens']} new tokens, median of {args.repeats}) -> {args.out / 'runtime_speed.json'}"
    ]
    for name, row in speed["variants"].items():
        lines.append(
            f"  {name}: prompt {row['prompt_tokens_per_s']:.1f} tok/s, decode {row['decode_tokens_per_s']:.1f} tok/s"
        )
    for name, parts in speed["decode_ms_per_token_by_graph"].items():
        lines.append(f"  {name} decode ms/token: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run the bench, print its summary; the exit code as ``moedge``'s."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE if exc.code else EXIT_OK
    args.command = command_line(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format=f"{PROG}: %(message)s", stream=sys.stderr, force=True)
    try:
        from moedge.paths import DATA_ENV, data_dir, refuse_inside_bundle

        if args.data_dir is not None:
            os.environ[DATA_ENV] = str(data_dir(args.data_dir))
        refuse_inside_bundle(args.out, flag="-o")
        for line in run_runtime_bench(args):
            print(line)
    except MoedgeError as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
