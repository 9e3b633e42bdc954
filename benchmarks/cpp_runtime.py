"""The C++ runner (`moedge-run`, cpp/) against the Python runtime on real bundles of smollm2-135m-moe.

Parity: 3 prompts x 16 greedy tokens through the FP32 and the W8A8 (QDQ) bundle, `moedge-run` vs
`moedge.runtime.BundleRunner` (both 1 thread): the same token ids, and the prompt's last-position logits
(max abs difference; argmax). Speed (BENCHMARKS.md: ORT CPU, 2 threads, one process-wide pool, 64 greedy
tokens after a 512-token WikiText-2 prompt): decode and prompt tokens/s of both runtimes on the same
bundle, repeats interleaved (each C++ repeat a fresh process: an untimed run, then the median of three),
medians. Needs `make cpp` and the bundles `benchmarks/runtime_bench.py` runs on.
Writes benchmarks/results/cpp_runtime.json.

    MOEDGE_DATA=../shared/data .venv/bin/python benchmarks/cpp_runtime.py \\
        --fp32-bundle ~/.cache/moedge/bench/runtime/moe-fp32-bundle-h \\
        --w8a8-bundle ~/.cache/moedge/bench/runtime/moe-w8a8-bundle-h
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from provenance import command_line, dataset_files, write_result

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BINARY = ROOT / "build" / "cpp" / "moedge-run"
PROMPTS = ["The capital of France is", "Once upon a time, there was a little girl who", "def fibonacci(n):"]


def _cpp(bundle: Path, args: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        result = subprocess.run(
            [str(BINARY), str(bundle), *args, "--json", str(out)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise SystemExit(f"moedge-run failed: {result.stderr.strip()}")
        doc: dict[str, Any] = json.loads(out.read_text())
        logits = Path(tmp) / "logits.bin"
        if logits.is_file():
            doc["logits"] = np.fromfile(logits, dtype=np.float32)
        return doc


def parity(bundle: Path, prompts: list[list[int]]) -> dict[str, Any]:
    """Same greedy ids and first-step logits, C++ vs Python, 1 thread."""
    from moedge.runtime.bundle_runner import BundleRunner
    from moedge.runtime.decoding import greedy

    with tempfile.TemporaryDirectory() as tmp:
        logits_file = Path(tmp) / "logits.bin"
        ids = [a for p in prompts for a in ("--ids", ",".join(map(str, p)))]
        doc = _cpp(bundle, [*ids, "-n", "16", "--threads", "1", "--logits-out", str(logits_file)])
        cpp_logits = np.fromfile(logits_file, dtype=np.float32).reshape(len(prompts), -1)
    runner = BundleRunner(bundle, intra_op_threads=1)
    eos = runner.manifest.model.get("eos_token_id")
    rows = []
    for prompt, gen, got in zip(prompts, doc["generations"], cpp_logits, strict=True):
        want_ids = greedy(runner, prompt, max_new_tokens=16, eos_token_id=eos)
        want = runner.forward(np.asarray([prompt]))[0][0, -1]
        rows.append(
            {
                "prompt_ids": prompt,
                "cpp_ids": gen["token_ids"],
                "python_ids": want_ids,
                "same_ids": gen["token_ids"] == want_ids,
                "max_abs_logit_diff": float(np.abs(got - want).max()),
                "same_argmax": int(got.argmax()) == int(want.argmax()),
            }
        )
        print(f"  {bundle.name}: {rows[-1]['same_ids']=} {rows[-1]['max_abs_logit_diff']=:.3g}", flush=True)
    return {
        "prompts": rows,
        "all_same_ids": all(r["same_ids"] for r in rows),
        "all_same_argmax": all(r["same_argmax"] for r in rows),
        "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows),
        "cpp_onnxruntime": doc.get("onnxruntime"),
    }


def speed(bundle: Path, prompt: list[int], new_tokens: int, threads: int, repeats: int) -> dict[str, Any]:
    """Medians of interleaved repeats: the Python BundleRunner and moedge-run, same threads and pool."""
    from runtime_speed import time_bundle  # the sibling module in benchmarks/

    python_once = time_bundle(bundle, prompt, new_tokens, threads)
    python_runs: list[tuple[float, float]] = []
    cpp_runs: list[tuple[float, float]] = []
    ids = ["--ids", ",".join(map(str, prompt))]
    for r in range(repeats):
        python_runs.append(python_once())
        args = [
            "-n",
            str(new_tokens + 1),
            "--threads",
            str(threads),
            "--shared-pool",
            "--warmup",
            "--repeats",
            "3",
        ]
        doc = _cpp(bundle, [*ids, *args])  # a fresh process: one untimed run, then the median of three
        cpp_runs.append((len(prompt) / doc["prompt_tokens_per_s"], new_tokens / doc["decode_tokens_per_s"]))
        print(
            f"  {bundle.name} repeat {r + 1}/{repeats}: python {python_runs[-1]}, c++ {cpp_runs[-1]}",
            flush=True,
        )
    out: dict[str, Any] = {}
    for name, runs in (("python", python_runs), ("cpp", cpp_runs)):
        out[name] = {
            "prompt_tokens_per_s": len(prompt) / statistics.median(r[0] for r in runs),
            "decode_tokens_per_s": new_tokens / statistics.median(r[1] for r in runs),
            "runs": runs,
        }
    out["decode_ratio_cpp_to_python"] = (
        out["cpp"]["decode_tokens_per_s"] / out["python"]["decode_tokens_per_s"]
    )
    out["prompt_ratio_cpp_to_python"] = (
        out["cpp"]["prompt_tokens_per_s"] / out["python"]["prompt_tokens_per_s"]
    )
    return out


def main() -> None:
    """Parity and speed for each bundle given; writes the JSON."""
    from moedge.runtime.profiling import text_token_ids
    from moedge.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fp32-bundle", type=Path, required=True)
    parser.add_argument("--w8a8-bundle", type=Path, required=True)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not BINARY.is_file():
        raise SystemExit(f"{BINARY} is not built: run `make cpp`")
    tok = load_tokenizer(args.w8a8_bundle / "tokenizer.json")
    prompts = [tok.encode(p).ids for p in PROMPTS]
    record: dict[str, Any] = {
        "protocol": f"parity: 3 prompts x 16 greedy tokens, 1 thread; speed: {args.new_tokens} greedy tokens "
        f"after a {args.prompt_tokens}-token WikiText-2 prompt, {args.threads} threads, shared pool, "
        f"{args.repeats} interleaved repeats, medians",
        "rows": {},
    }
    long_prompt = text_token_ids(args.w8a8_bundle, "wikitext2", args.prompt_tokens)
    bundles = (("fp32", args.fp32_bundle), ("w8a8", args.w8a8_bundle))
    runs: list[dict[str, Any]] = []
    flags: dict[str, Any] = {}
    for label, bundle in bundles:  # parity first: 1-thread sessions, before speed makes the shared pool
        checked = parity(bundle, prompts)
        flags["moedge-run"] = {"onnxruntime": checked.pop("cpp_onnxruntime")}
        runs += [{"bundle": label, "measure": "parity", **row} for row in checked.pop("prompts")]
        record["rows"][label] = {"bundle": str(bundle), "parity": checked}
    for label, bundle in bundles:
        start = time.perf_counter()
        timed = speed(bundle, long_prompt, args.new_tokens, args.threads, args.repeats)
        for runtime in ("python", "cpp"):
            runs += [
                {
                    "bundle": label,
                    "measure": "speed",
                    "runtime": runtime,
                    "repeat": i,
                    "prompt_s": p,
                    "decode_s": d,
                }
                for i, (p, d) in enumerate(timed[runtime].pop("runs"))
            ]
        record["rows"][label]["speed"] = timed
        record["rows"][label]["speed_seconds"] = time.perf_counter() - start
        write_result(
            RESULTS / "cpp_runtime.json",
            benchmark="cpp_runtime",
            command=command_line(),
            threads=args.threads,  # speed; parity runs 1 thread
            inputs=[BINARY, args.fp32_bundle, args.w8a8_bundle, *dataset_files("wikitext2")],
            runs=runs,
            statistic=f"parity: one greedy run of 16 tokens per prompt and runtime (runs: measure parity); "
            f"speed: median over {args.repeats} interleaved repeats of prompt and decode seconds (runs: "
            "measure speed; each C++ repeat is a fresh moedge-run process whose figure is already the median "
            "of three timed runs after an untimed one), tokens/s = tokens / median seconds",
            results=record,
            build_flags=flags,
            engines=("onnxruntime", "moedge-run"),
        )
    for label, row in record["rows"].items():
        s = row["speed"]
        print(
            f"{label}: same ids {row['parity']['all_same_ids']}; decode tok/s c++ "
            f"{s['cpp']['decode_tokens_per_s']:.1f} vs python {s['python']['decode_tokens_per_s']:.1f} "
            f"({s['decode_ratio_cpp_to_python']:.2f}x); prompt tok/s c++ {s['cpp']['prompt_tokens_per_s']:.0f} "
            f"vs python {s['python']['prompt_tokens_per_s']:.0f}"
        )
    print(f"wrote {RESULTS / 'cpp_runtime.json'}")


if __name__ == "__main__":
    main()
