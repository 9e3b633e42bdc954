"""Issue 16's side-by-side benchmark: moedge (Python, both stage targets, and C++ ``moedge-run``) against
llama.cpp Q8_0 and ONNX Runtime GenAI's model builder int8/int4/fp32, all of the same smollm2-135m weights.

One process (run it with the peer venv, ``.venv-peers``: moedge, onnxruntime, onnxruntime-genai and
llama-cpp-python side by side on the same ORT build) times every engine interleaved: each round runs
every engine once, in an order rotated by one each round, after one untimed warm-up round. The workload:
the first ``--prompt-tokens`` (512) WikiText-2 test tokens through the moedge bundle's tokenizer (every
engine gets the same token ids), then ``--new-tokens`` (64) greedy tokens; the same again after a
``--short-prompt-tokens`` (16) prompt, so decode cost growth with the context shows. Prompt time is
the prompt's forward pass and its first token (GenAI: ``append_tokens`` and the first
``generate_next_token``); decode time the ``--new-tokens`` steps after it. Figures are medians of
``--repeats`` rounds; every run is kept in the JSON.

Parts (``--parts``): ``speed`` (above; greedy-token agreement between engines), ``rss`` (peak resident
memory of each engine in a process of its own at the long workload, loading included: a fresh Python
child that imports only its engine, its VmHWM; for moedge-cpp that child's ``moedge-run``, its
``ru_maxrss``), ``bytes`` (model files on disk),
``ppl`` (perplexity on the first ``--ppl-windows`` non-overlapping 512-token windows of WikiText-2 test:
moedge ``BundleRunner.forward`` logits, llama.cpp ``logits_all``, GenAI's ``model.onnx`` run directly in
an ORT session with empty past tensors; moedge-run has no full-logits output, and its graphs are the
Python engines'). A run of some parts keeps the other parts' runs and results from the file it extends.

    MOEDGE_DATA=../shared/data .venv-peers/bin/python benchmarks/side_by_side.py \\
        --parts speed,bytes,rss --repeats 5

Engines: moedge-py-trt, moedge-py-cpu (``BundleRunner``, one shared ORT pool, through the runtime's
generation loop), moedge-cpp and moedge-cpp-trt (``build/cpp/moedge-run`` on the cpu and the trt
bundle, ``--shared-pool``, a fresh process per run with ``--warmup``), llama.cpp (Q8_0), genai-int8,
genai-int4, genai-fp32, and, when their folders exist, moedge-py-untied-trt (the same HAQ recipe
exported without ``--tie-input-scales``: what the tie costs), the FP32 bundles moedge-py-fp32-trt /
moedge-py-fp32-cpu, and smollm2-135m-moe's W8A8 and FP32 ort-cpu bundles moedge-py-moe-cpu /
moedge-py-moe-fp32-cpu (speed only, every expert on the CPU; ``moe_bar`` in the speed results compares
the W8A8 one with 0.85 x the dense bundle's decode scaled by their weight bytes read per token, and with
its FP32 twin), the same two exports split with ``--experts-in-graph`` moedge-py-moe-graph-cpu /
moedge-py-moe-graph-fp32-cpu (speed only; ``moe_bar``'s ``in_graph_*`` figures), moedge-run on the W8A8 MoE
bundles moedge-cpp-moe-cpu / moedge-cpp-moe-graph-cpu (``moe_bar``'s ``cpp*`` figures), and moedge-fake-quant (perplexity only: ``--recipe``'s PyTorch fake-quant model with
its input scales tied, the reference both W8A8 bundles must match). Writes ``benchmarks/results/side_by_side.json`` through ``provenance.write_result``.

The moedge bundles (``~/.cache/moedge/bundles``), from the HAQ ``--quantize-head`` recipe of
docs/RESULTS.md (``R``)::

    moedge export smollm2-135m --recipe R --tie-input-scales -o smollm2-w8a8tied-export
    moedge split smollm2-w8a8tied-export -o smollm2-w8a8tied-trt
    moedge split smollm2-w8a8tied-export -o smollm2-w8a8tied-cpu --target ort-cpu
    moedge export smollm2-135m --recipe R -o smollm2-w8a8-export      # untied: -o smollm2-w8a8-trt
    moedge export smollm2-135m -o smollm2-fp32-export                # FP32: -trt and -cpu likewise
    moedge calibrate smollm2-135m-moe --method rtn --quantize-head --tie-input-scales --calib-windows 32 \
        -o M   # then export with --recipe M and split --target ort-cpu: smollm2-moe-w8a8-cpu (and FP32)
    moedge split smollm2-moe-w8a8-export -o smollm2-moe-w8a8-cpu-graph --target ort-cpu --experts-in-graph
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from provenance import carry_over, command_line, dataset_files, read_result, run_stamp, write_result

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BINARY = ROOT / "build" / "cpp" / "moedge-run"
CACHE = Path.home() / ".cache" / "moedge"
PEERS = CACHE / "peers"
BUNDLES = CACHE / "bundles"
PEER_BUILD = ROOT / ".venv-peers" / "peer_build.json"
PARTS = ("speed", "rss", "bytes", "ppl")
ENGINES = (
    "moedge-py-trt",
    "moedge-py-cpu",
    "moedge-cpp",
    "moedge-cpp-trt",
    "moedge-py-untied-trt",
    "llama.cpp",
    "genai-int8",
    "genai-int4",
    "genai-fp32",
    "moedge-py-fp32-trt",
    "moedge-py-fp32-cpu",
    "moedge-py-moe-cpu",
    "moedge-py-moe-fp32-cpu",
    "moedge-py-moe-graph-cpu",
    "moedge-py-moe-graph-fp32-cpu",
    "moedge-cpp-moe-cpu",
    "moedge-cpp-moe-graph-cpu",
    "moedge-fake-quant",
)
# moedge-run processes: no full logits, no load time
CPP_ENGINES = ("moedge-cpp", "moedge-cpp-trt", "moedge-cpp-moe-cpu", "moedge-cpp-moe-graph-cpu")
MOE_ENGINES = (  # smollm2-135m-moe: speed only
    "moedge-py-moe-cpu",
    "moedge-py-moe-fp32-cpu",
    "moedge-py-moe-graph-cpu",
    "moedge-py-moe-graph-fp32-cpu",
    "moedge-cpp-moe-cpu",
    "moedge-cpp-moe-graph-cpu",
)
PPL_ONLY = ("moedge-fake-quant",)
# run by default only where the bundle (recipe) exists
OPTIONAL = (
    "moedge-py-untied-trt",
    "moedge-py-fp32-trt",
    "moedge-py-fp32-cpu",
    *MOE_ENGINES,
    *PPL_ONLY,
)  # the recipe's PyTorch fake-quant model: the accuracy reference
LABELS = {
    "moedge-py-trt": "moedge W8A8 bundle, tensorrt-target stages (Python)",
    "moedge-py-cpu": "moedge W8A8 bundle, ort-cpu target (Python)",
    "moedge-cpp": "moedge W8A8 bundle, ort-cpu target, C++ moedge-run",
    "moedge-cpp-trt": "moedge W8A8 bundle, tensorrt target, C++ moedge-run",
    "moedge-py-untied-trt": "moedge W8A8 bundle without --tie-input-scales, tensorrt target (Python)",
    "llama.cpp": "llama.cpp Q8_0 (llama-cpp-python)",
    "genai-int8": "ORT GenAI model builder int8",
    "genai-int4": "ORT GenAI model builder int4",
    "genai-fp32": "ORT GenAI model builder fp32",
    "moedge-py-fp32-trt": "moedge FP32 bundle, tensorrt-target stages (Python)",
    "moedge-py-fp32-cpu": "moedge FP32 bundle, ort-cpu target (Python)",
    "moedge-py-moe-cpu": "smollm2-135m-moe W8A8 bundle, ort-cpu target, every expert on the CPU (Python)",
    "moedge-py-moe-fp32-cpu": "smollm2-135m-moe FP32 bundle, ort-cpu target, every expert on the CPU (Python)",
    "moedge-py-moe-graph-cpu": "smollm2-135m-moe W8A8 bundle, ort-cpu target, --experts-in-graph (Python)",
    "moedge-py-moe-graph-fp32-cpu": "smollm2-135m-moe FP32 bundle, ort-cpu target, --experts-in-graph (Python)",
    "moedge-cpp-moe-cpu": "smollm2-135m-moe W8A8 bundle, ort-cpu target, every expert on the CPU, C++ moedge-run",
    "moedge-cpp-moe-graph-cpu": "smollm2-135m-moe W8A8 bundle, ort-cpu target, --experts-in-graph, C++ moedge-run",
    "moedge-fake-quant": "the recipe's PyTorch fake-quant model, input scales tied (the bundles' reference)",
}
AGREE = ("moedge-py-trt", "moedge-py-cpu", "moedge-cpp", "moedge-cpp-trt")  # greedy tokens, identical
# Files of a model folder that are not the model: tokenizer and chat template (a GGUF carries its own).
TOKENIZER_FILES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
}
RSS_MARK = "SIDE_BY_SIDE_RSS "

# One run: (token ids, new tokens) -> (prompt seconds, decode seconds, greedy tokens incl. the first).
Run = Callable[[list[int], int], tuple[float, float, list[int]]]


@dataclass
class Engine:
    """An engine under test: its name, the files it reads, and (once loaded) its run function."""

    name: str
    files: list[Path]
    run: Run | None = None
    load_s: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- engines


def _bundle(args: argparse.Namespace, name: str) -> Path:
    return {
        "moedge-py-trt": args.trt_bundle,
        "moedge-py-cpu": args.cpu_bundle,
        "moedge-cpp": args.cpu_bundle,
        "moedge-cpp-trt": args.trt_bundle,
        "moedge-py-untied-trt": args.untied_trt_bundle,
        "moedge-py-fp32-trt": args.fp32_trt_bundle,
        "moedge-py-fp32-cpu": args.fp32_cpu_bundle,
        "moedge-py-moe-cpu": args.moe_cpu_bundle,
        "moedge-py-moe-fp32-cpu": args.moe_fp32_cpu_bundle,
        "moedge-py-moe-graph-cpu": args.moe_graph_cpu_bundle,
        "moedge-py-moe-graph-fp32-cpu": args.moe_graph_fp32_cpu_bundle,
        "moedge-cpp-moe-cpu": args.moe_cpu_bundle,
        "moedge-cpp-moe-graph-cpu": args.moe_graph_cpu_bundle,
    }[name]


def engine_files(args: argparse.Namespace, name: str) -> list[Path]:
    """The model files (a folder or a file) an engine reads."""
    if name == "moedge-fake-quant":
        return [args.recipe]
    if name.startswith("moedge-"):
        return [_bundle(args, name)]
    if name == "llama.cpp":
        return [args.gguf]
    return [args.peers / name]  # genai-int8 / genai-int4 / genai-fp32


def load_bundle(bundle: Path, threads: int) -> Run:
    """Greedy generation through the runtime's one loop (``runtime_speed.time_bundle``'s pattern, with
    the tokens kept): ``BundleRunner``, one process-wide ORT pool, sessions created before it returns."""
    from moedge.runtime.bundle_runner import BundleRunner
    from moedge.runtime.decoding import StopRule, generate

    runner = BundleRunner(bundle, intra_op_threads=threads, shared_pool=True)
    runner.forward(np.asarray([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=np.int64))  # create every session

    def run(ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        spent = [0.0, 0.0]  # prompt, decode

        def on_step(decode: bool, _tokens: int, seconds: float) -> None:
            spent[int(decode)] += seconds

        gens = generate(runner, [ids], StopRule(max_new_tokens=new_tokens + 1), on_step=on_step)
        return spent[0], spent[1], [int(t) for t in gens[0].token_ids]

    return run


def _run_cpp(
    bundle: Path, ids: list[int], new_tokens: int, threads: int, ort_lib: Path | None, warmup: bool
) -> dict[str, Any]:
    """One ``moedge-run`` process: greedy ``new_tokens + 1`` tokens (the first from the prompt), its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        cmd = [str(BINARY), str(bundle), "--ids", ",".join(map(str, ids)), "-n", str(new_tokens + 1)]
        cmd += ["--threads", str(threads), "--shared-pool", "--json", str(out)]
        cmd += ["--warmup", "--repeats", "1"] if warmup else []
        cmd += ["--ort-lib", str(ort_lib)] if ort_lib else []
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"moedge-run failed ({done.returncode}): {done.stderr.strip()}")
        doc: dict[str, Any] = json.loads(out.read_text())
        doc["process_s"] = time.perf_counter() - start
        return doc


def load_cpp(bundle: Path, threads: int, ort_lib: Path | None, info: dict[str, Any]) -> Run:
    """``moedge-run`` on the bundle: a fresh process per run (an untimed ``--warmup`` generation first),
    prompt and decode seconds from its ``--json`` (tokens / tokens per second of the one timed run)."""
    if not BINARY.is_file():
        raise SystemExit(f"{BINARY} is not built: run `make cpp`")

    def run(ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        doc = _run_cpp(bundle, ids, new_tokens, threads, ort_lib, warmup=True)
        info["onnxruntime"] = doc.get("onnxruntime")
        info.setdefault("process_s", []).append(round(doc["process_s"], 3))
        prompt_s = doc["prompt_tokens"] / doc["prompt_tokens_per_s"]
        decode_s = doc["decode_tokens"] / doc["decode_tokens_per_s"]
        return prompt_s, decode_s, [int(t) for t in doc["generations"][0]["token_ids"]]

    return run


def load_llama(gguf: Path, threads: int, context: int) -> Run:
    """llama.cpp (llama-cpp-python) greedy generation: ``eval`` of the prompt, then one token a step,
    each the argmax of the last position's logits (as ``runtime_speed.time_llama_cpp`` times it)."""
    from runtime_speed import llama_last_logits, open_llama

    llm = open_llama(gguf, threads, context)

    def run(ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        tokens = [int(np.argmax(llama_last_logits(llm)))]
        prompt_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([tokens[-1]])
            tokens.append(int(np.argmax(llama_last_logits(llm))))
        return prompt_s, time.perf_counter() - start, tokens

    return run


def load_genai(folder: Path, threads: int) -> Run:
    """ORT GenAI: ``og.Model`` (decoder intra-op threads set to ``threads`` by a config overlay), a
    greedy ``og.Generator`` per run (search max_length = prompt + new tokens + 1, created off the clock);
    prompt = ``append_tokens`` + the first ``generate_next_token``, decode = the ``new_tokens`` after."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)

    def run(ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + new_tokens + 1)
        gen = og.Generator(model, params)
        start = time.perf_counter()
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        gen.generate_next_token()
        tokens = [int(gen.get_next_tokens()[0])]
        prompt_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens):
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
        decode_s = time.perf_counter() - start
        del gen
        return prompt_s, decode_s, tokens

    return run


def load_engine(args: argparse.Namespace, engine: Engine, context: int) -> None:
    """Create the engine's sessions or model (timed as ``load_s``) and set its run function."""
    start = time.perf_counter()
    name = engine.name
    if name in CPP_ENGINES:
        engine.run = load_cpp(_bundle(args, name), args.threads, args.cpp_ort_lib, engine.info)
    elif name.startswith("moedge-py"):
        engine.run = load_bundle(_bundle(args, name), args.threads)
    elif name == "llama.cpp":
        engine.run = load_llama(args.gguf, args.threads, context)
    else:
        engine.run = load_genai(args.peers / name, args.threads)
    engine.load_s = None if name in CPP_ENGINES else time.perf_counter() - start  # cpp: per run


# ------------------------------------------------------------------------------------------------ speed


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_seconds() -> float:
    """CPU seconds of this process and its waited-for children (moedge-run): user + system."""
    mine, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return mine.ru_utime + mine.ru_stime + children.ru_utime + children.ru_stime


def _machine_seconds() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine so far, all CPUs (/proc/stat's first line)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (the shorter length when one is a prefix); None when equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def speed(
    args: argparse.Namespace, engines: list[Engine], long_ids: list[int], short_ids: list[int], stamp: dict
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Interleaved rounds (round 0 an untimed warm-up), medians, greedy agreement."""
    context = len(long_ids) + args.new_tokens + 8
    for e in engines:
        print(f"  loading {e.name}", flush=True)
        load_engine(args, e, context)
    runs: list[dict[str, Any]] = []
    for r in range(args.repeats + 1):
        order = engines[r % len(engines) :] + engines[: r % len(engines)]
        before = _loadavg()
        for position, e in enumerate(order):
            assert e.run is not None
            for context_name, ids in (("long", long_ids), ("short", short_ids)):
                time.sleep(args.settle)  # let the previous engine's idle threads stop spinning
                cpu_before, busy_before, steal_before = _cpu_seconds(), *_machine_seconds()
                prompt_s, decode_s, tokens = e.run(ids, args.new_tokens)
                busy, steal = _machine_seconds()
                cpu_s, busy, steal = _cpu_seconds() - cpu_before, busy - busy_before, steal - steal_before
                runs.append(
                    {
                        "part": "speed",
                        "engine": e.name,
                        "context": context_name,
                        "round": r,
                        "warmup": r == 0,
                        "position": position,
                        "prompt_tokens": len(ids),
                        "new_tokens": args.new_tokens,
                        "prompt_s": prompt_s,
                        "decode_s": decode_s,
                        "tokens": tokens,
                        "cpu_s": cpu_s,
                        "system_busy_s": busy,
                        "steal_s": steal,
                        "others_cpu_s": busy - cpu_s,
                        "loadavg": _loadavg(),
                        **stamp,
                    }
                )
        timed = [x for x in runs if x["round"] == r and x["context"] == "long"]
        shown = ", ".join(f"{x['engine']} {x['new_tokens'] / x['decode_s']:.0f}" for x in timed)
        label = "warm-up" if r == 0 else f"round {r}/{args.repeats}"
        print(f"  {label} (load {before} -> {_loadavg()}): decode tok/s {shown}", flush=True)
    rows: dict[str, Any] = {}
    for e in engines:
        row: dict[str, Any] = {"label": LABELS[e.name], "load_s": e.load_s, **e.info}
        for context_name in ("long", "short"):
            mine = [
                x for x in runs if x["engine"] == e.name and x["context"] == context_name and not x["warmup"]
            ]
            prompt_s = statistics.median(x["prompt_s"] for x in mine)
            decode_s = statistics.median(x["decode_s"] for x in mine)
            suffix = "" if context_name == "long" else "_short"
            row[f"prompt_tokens_per_s{suffix}"] = mine[0]["prompt_tokens"] / prompt_s
            row[f"decode_tokens_per_s{suffix}"] = args.new_tokens / decode_s
            row[f"decode_ms_per_token{suffix}"] = decode_s / args.new_tokens * 1e3
        row["decode_short_over_long"] = row["decode_tokens_per_s_short"] / row["decode_tokens_per_s"]
        rows[e.name] = row
    for row in rows.values():
        for peer in ("genai-int8", "llama.cpp"):
            if peer in rows:
                for what in ("prompt", "decode"):
                    key = f"{what}_tokens_per_s"
                    row[f"{what}_vs_{peer}"] = row[key] / rows[peer][key]
    moe = moe_bar(args, rows)
    result = {
        "workload": {
            "prompt_tokens": len(long_ids),
            "short_prompt_tokens": len(short_ids),
            "new_tokens": args.new_tokens,
            "threads": args.threads,
            "repeats": args.repeats,
            "order": "round r runs engines[r:] + engines[:r] (each engine: the long prompt, then the short)",
            "engines": [e.name for e in engines],
            "prompt_ids": long_ids,
        },
        "engines": rows,
        "agreement": agreement(runs, [e.name for e in engines]),
    }
    if moe:
        result["moe_bar"] = moe
    return result, runs


def weight_bytes_per_token(bundle: Path) -> int:
    """Weight bytes a decode step reads: every stage graph, the head, and per MoE layer top_k experts of
    the layer's mean expert bytes (the embedding reads one row: left out)."""
    from moedge.formats.manifest import read_manifest

    manifest = read_manifest(bundle)
    total = sum(run.stage.bytes for run in manifest.stage_runs()) + manifest.head.bytes
    for layer in manifest.layers:
        if layer.moe is not None:
            mean = sum(g.bytes for g in layer.moe.experts) / len(layer.moe.experts)
            total += int(layer.moe.gating.top_k * mean)
    return total


def moe_bar(args: argparse.Namespace, rows: dict[str, Any]) -> dict[str, Any] | None:
    """Issue 16's MoE line: the W8A8 MoE bundle's decode against 0.85 x (dense bytes per token / MoE
    bytes per token) x the dense W8A8 bundle's decode, and against its FP32 twin's (bar 1.6x)."""
    if "moedge-py-moe-cpu" not in rows or "moedge-py-cpu" not in rows:
        return None
    dense_bytes = weight_bytes_per_token(args.cpu_bundle)
    moe_bytes = weight_bytes_per_token(args.moe_cpu_bundle)
    dense, moe = (
        rows["moedge-py-cpu"]["decode_tokens_per_s"],
        rows["moedge-py-moe-cpu"]["decode_tokens_per_s"],
    )
    bar = 0.85 * dense_bytes / moe_bytes * dense
    out: dict[str, Any] = {
        "dense_weight_bytes_per_token": dense_bytes,
        "moe_weight_bytes_per_token": moe_bytes,
        "moe_decode_tokens_per_s": moe,
        "bar_tokens_per_s": bar,
        "moe_over_bar": moe / bar,
    }
    if "moedge-py-moe-fp32-cpu" in rows:
        out["moe_over_fp32_twin"] = moe / rows["moedge-py-moe-fp32-cpu"]["decode_tokens_per_s"]
    if "moedge-py-moe-graph-cpu" in rows:  # the same model, experts dispatched inside the graph
        graph = rows["moedge-py-moe-graph-cpu"]["decode_tokens_per_s"]
        out["in_graph_decode_tokens_per_s"] = graph
        out["in_graph_over_bar"] = graph / bar
        out["in_graph_over_runtime_dispatch"] = graph / moe
        if "moedge-py-moe-graph-fp32-cpu" in rows:
            out["in_graph_over_fp32_twin"] = (
                graph / rows["moedge-py-moe-graph-fp32-cpu"]["decode_tokens_per_s"]
            )
    for name, key in (("moedge-cpp-moe-cpu", "cpp"), ("moedge-cpp-moe-graph-cpu", "cpp_in_graph")):
        if name in rows:  # moedge-run on the same bundles
            out[f"{key}_decode_tokens_per_s"] = rows[name]["decode_tokens_per_s"]
            out[f"{key}_over_bar"] = rows[name]["decode_tokens_per_s"] / bar
    return out


def agreement(runs: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Greedy tokens: stable across rounds per engine, and each engine against moedge-py-trt."""
    out: dict[str, Any] = {
        "reference": "moedge-py-trt",
        "required_identical": [n for n in AGREE if n in names],
    }
    for context_name in ("long", "short"):
        tokens: dict[str, list[int]] = {}
        stable: dict[str, bool] = {}
        for n in names:
            seqs = [x["tokens"] for x in runs if x["engine"] == n and x["context"] == context_name]
            tokens[n] = seqs[0]
            stable[n] = all(s == seqs[0] for s in seqs)
        ref = tokens.get("moedge-py-trt")
        versus = {
            n: {"identical": t == ref, "first_difference": first_difference(t, ref)}
            for n, t in tokens.items()
            if ref is not None
        }
        required = [n for n in AGREE if n in tokens]
        out[context_name] = {
            "stable_across_rounds": stable,
            "vs_reference": versus,
            "required_all_identical": None
            if len(required) < 2
            else all(tokens[n] == tokens[required[0]] and stable[n] for n in required),
            "tokens": tokens,
        }
    return out


# -------------------------------------------------------------------------------------------------- rss


def _hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_child(args: argparse.Namespace) -> None:
    """In a process of its own (a fresh exec: VmHWM counts only this process), import only this engine's
    library, load it, run the long workload once, print the peak RSS (VmHWM) after the imports, after
    loading and at the end. moedge-cpp: run ``moedge-run`` from here (a small process, so the fork it
    starts from does not inflate the figure) and take its peak from ``getrusage(RUSAGE_CHILDREN)``."""
    name = args.rss_child
    ids = [int(t) for t in Path(args.ids_file).read_text().split()]
    if name in CPP_ENGINES:
        before = _hwm_bytes()
        start = time.perf_counter()
        bundle = _bundle(args, name)
        doc = _run_cpp(bundle, ids, args.new_tokens, args.threads, args.cpp_ort_lib, warmup=False)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        out = {"hwm_after_imports": None, "hwm_after_load": None, "hwm": peak, "wrapper_hwm": before}
        out.update(process_s=time.perf_counter() - start, tokens=doc["generations"][0]["token_ids"])
        print(RSS_MARK + json.dumps(out), flush=True)
        return
    if name.startswith("moedge-py"):
        import moedge.runtime.bundle_runner  # noqa: F401
    elif name == "llama.cpp":
        import llama_cpp  # noqa: F401
        import runtime_speed  # noqa: F401
    else:
        import onnxruntime_genai  # noqa: F401
    before = _hwm_bytes()
    engine = Engine(name, engine_files(args, name))
    load_engine(args, engine, len(ids) + args.new_tokens + 8)
    loaded = _hwm_bytes()
    assert engine.run is not None
    prompt_s, decode_s, tokens = engine.run(ids, args.new_tokens)
    out = {"hwm_after_imports": before, "hwm_after_load": loaded, "hwm": _hwm_bytes()}
    out.update(prompt_s=prompt_s, decode_s=decode_s, load_s=engine.load_s, tokens=tokens)
    print(RSS_MARK + json.dumps(out), flush=True)


def _child_argv(args: argparse.Namespace) -> list[str]:
    """The flags a child process needs to build the same engines."""
    out = ["--threads", str(args.threads), "--new-tokens", str(args.new_tokens)]
    out += ["--trt-bundle", str(args.trt_bundle), "--cpu-bundle", str(args.cpu_bundle)]
    out += ["--untied-trt-bundle", str(args.untied_trt_bundle)]
    out += ["--fp32-trt-bundle", str(args.fp32_trt_bundle), "--fp32-cpu-bundle", str(args.fp32_cpu_bundle)]
    out += [
        "--moe-cpu-bundle",
        str(args.moe_cpu_bundle),
        "--moe-fp32-cpu-bundle",
        str(args.moe_fp32_cpu_bundle),
        "--moe-graph-cpu-bundle",
        str(args.moe_graph_cpu_bundle),
        "--moe-graph-fp32-cpu-bundle",
        str(args.moe_graph_fp32_cpu_bundle),
    ]
    out += ["--peers", str(args.peers), "--gguf", str(args.gguf)]
    out += ["--cpp-ort-lib", str(args.cpp_ort_lib)] if args.cpp_ort_lib else []
    return out


def rss(
    args: argparse.Namespace, names: list[str], long_ids: list[int], stamp: dict
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Peak RSS of each engine in its own process at the long workload (prompt + new tokens)."""
    rows: dict[str, Any] = {}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "ids.txt"  # the child's token ids, one per line
        ids_file.write_text("\n".join(str(t) for t in long_ids))
        for name in [n for n in names if n not in (*MOE_ENGINES, *PPL_ONLY)]:  # the dense bars' engines
            time.sleep(args.settle)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", name]
            cmd += ["--ids-file", str(ids_file), *_child_argv(args)]
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(
                    f"rss run of {name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
                )
            mark = [line for line in done.stdout.splitlines() if line.startswith(RSS_MARK)]
            if not mark:
                raise SystemExit(f"rss run of {name} printed no figure: {done.stderr.strip()[-2000:]}")
            child = json.loads(mark[-1][len(RSS_MARK) :])
            row: dict[str, Any] = {
                "peak_rss_bytes": child["hwm"],
                "peak_rss_after_imports_bytes": child["hwm_after_imports"],
                "peak_rss_after_load_bytes": child["hwm_after_load"],
                "process_s": time.perf_counter() - start,
                "process": "moedge-run (started by a small python child; its ru_maxrss)"
                if name in CPP_ENGINES
                else "python child importing only this engine (VmHWM)",
                "tokens": child["tokens"],
            }
            rows[name] = row
            runs.append({"part": "rss", "engine": name, "loadavg": _loadavg(), **row, **stamp})
            print(f"  rss {name}: {row['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    if "llama.cpp" in rows:
        for row in rows.values():
            row["peak_rss_vs_llama.cpp"] = row["peak_rss_bytes"] / rows["llama.cpp"]["peak_rss_bytes"]
    return {"prompt_tokens": len(long_ids), "new_tokens": args.new_tokens, "engines": rows}, runs


# ------------------------------------------------------------------------------------------------ bytes


def disk_bytes(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """Bytes on disk of each engine's model files: everything, and without tokenizer/template files."""
    rows: dict[str, Any] = {}
    for name in names:
        files: list[Path] = []
        for path in engine_files(args, name):
            files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        total = sum(p.stat().st_size for p in files)
        model = sum(p.stat().st_size for p in files if p.name not in TOKENIZER_FILES)
        rows[name] = {"bytes": total, "bytes_without_tokenizer": model, "files": len(files)}
    if "llama.cpp" in rows:
        for row in rows.values():
            row["bytes_vs_llama.cpp"] = row["bytes"] / rows["llama.cpp"]["bytes"]
    return {"engines": rows, "moedge-run_binary_bytes": BINARY.stat().st_size if BINARY.is_file() else None}


# -------------------------------------------------------------------------------------------------- ppl


def ppl_ids(bundle: Path) -> np.ndarray:
    """WikiText-2 test as ``moedge eval`` tokenizes it: the whole text, no special tokens."""
    from moedge.datasets import load_text
    from moedge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(bundle / "tokenizer.json")
    return np.asarray(tokenizer.encode(load_text("wikitext2").text, add_special_tokens=False).ids, np.int64)


def window_scorer(args: argparse.Namespace, name: str, seqlen: int) -> Callable[[np.ndarray], np.ndarray]:
    """(seqlen,) ids -> (seqlen, vocab) logits of one engine."""
    if name.startswith("moedge-py"):
        from moedge.runtime.bundle_runner import BundleRunner

        runner = BundleRunner(_bundle(args, name), intra_op_threads=args.threads, shared_pool=True)
        return lambda ids: runner.forward(ids[None])[0][0]
    if name == "moedge-fake-quant":
        import torch

        from moedge.calibration.recipe import apply_recipe
        from moedge.calibration.tie import tie_recipe_scales
        from moedge.evaluation import torch_logits
        from moedge.formats.recipe import load_recipe
        from moedge.loading import load_model

        torch.set_num_threads(args.threads)
        loaded = apply_recipe(load_model("smollm2-135m"), tie_recipe_scales(load_recipe(args.recipe)))
        return torch_logits(loaded.model)
    if name == "llama.cpp":
        from runtime_speed import open_llama

        llm = open_llama(args.gguf, args.threads, seqlen, logits_all=True)

        def llama(ids: np.ndarray) -> np.ndarray:
            llm.reset()
            llm.eval(ids.tolist())
            return np.array(llm.scores[: len(ids)])

        return llama
    # GenAI: its model.onnx in an ORT session, empty past tensors (the moedge process's ORT and pool).
    from moedge.ort_sessions import load_session, session_options, shared_thread_pool

    folder = args.peers / name
    shared_thread_pool(args.threads)
    session = load_session(
        folder / "model.onnx",
        session_options(intra_op_threads=args.threads, quiet=True),
        ["CPUExecutionProvider"],
    )
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    kv_heads, head = decoder["num_key_value_heads"], decoder["head_size"]
    empty = np.zeros((1, kv_heads, 0, head), np.float32)
    past = {i.name: empty for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    wanted = [o.name for o in session.get_outputs()][:1]  # logits

    def genai(ids: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int64), **past}
        return session.run(wanted, feeds)[0][0]

    return genai


def perplexity_part(
    args: argparse.Namespace, names: list[str], stamp: dict
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Perplexity of each engine on the same windows (moedge-cpp: none, see the module docstring)."""
    from moedge.datasets import windows
    from moedge.evaluation import window_nll

    rows_ids = windows(ppl_ids(args.trt_bundle), args.seqlen, max_windows=args.ppl_windows)
    rows: dict[str, Any] = {}
    runs: list[dict[str, Any]] = []
    for name in names:
        if name in CPP_ENGINES or name in MOE_ENGINES:
            continue
        score = window_scorer(args, name, args.seqlen)
        start = time.perf_counter()
        nlls = [window_nll(score(w), w) for w in rows_ids]
        seconds = time.perf_counter() - start
        tokens = rows_ids.shape[0] * (args.seqlen - 1)
        rows[name] = {"perplexity": float(np.exp(sum(nlls) / tokens)), "mean_nll": sum(nlls) / tokens}
        rows[name]["seconds"] = seconds
        runs += [
            {"part": "ppl", "engine": name, "window": i, "nll_sum": v, "tokens": args.seqlen - 1, **stamp}
            for i, v in enumerate(nlls)
        ]
        print(f"  ppl {name}: {rows[name]['perplexity']:.4f} ({seconds:.0f} s)", flush=True)
        del score
    ref = next((n for n in ("moedge-py-fp32-trt", "moedge-py-fp32-cpu", "genai-fp32") if n in rows), None)
    for row in rows.values():
        row["vs_fp32"] = row["perplexity"] / rows[ref]["perplexity"] if ref else None
    return {
        "dataset": "wikitext2 (raw test), tokenized whole by the trt bundle's tokenizer, no special tokens",
        "seqlen": args.seqlen,
        "windows": int(rows_ids.shape[0]),
        "fp32_reference": ref,
        "engines": rows,
    }, runs


# ---------------------------------------------------------------------------------------------- results


def tokenizer_check(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """Whether the peers' own tokenizers give the moedge bundle's ids on a sample (they are fed the
    bundle's ids regardless; this says the vocabularies are the same)."""
    from moedge.tokenizer import load_tokenizer

    sample = " The capital of France is Paris. = Valkyria Chronicles III = \n Senjō no Valkyria 3 : 1,024"
    want = load_tokenizer(args.trt_bundle / "tokenizer.json").encode(sample, add_special_tokens=False).ids
    out: dict[str, Any] = {"sample": sample, "bundle_ids": want}
    if "llama.cpp" in names:
        from llama_cpp import Llama

        llm = Llama(model_path=str(args.gguf), vocab_only=True, verbose=False)
        out["llama.cpp_same"] = llm.tokenize(sample.encode(), add_bos=False, special=False) == want
    genai = [n for n in names if n.startswith("genai-")]
    if genai:
        import onnxruntime_genai as og

        tok = og.Tokenizer(og.Model(str(args.peers / genai[0])))
        out["genai_same"] = [int(t) for t in tok.encode(sample)] == want
    return out


def table(results: dict[str, Any]) -> str:
    """The compact table of medians and ratios."""
    sp = results.get("speed", {}).get("engines", {})
    pp = results.get("ppl", {}).get("engines", {})
    rs = results.get("rss", {}).get("engines", {})
    by = results.get("bytes", {}).get("engines", {})
    names = [n for n in ENGINES if n in sp or n in pp or n in rs or n in by]

    def fmt(value: Any, spec: str) -> str:
        return format("-", f">{spec.split('.')[0]}") if value is None else format(value, spec)

    head = (
        f"{'engine':20s} {'ppl':>8s} {'xFP32':>6s} {'prompt/s':>9s} {'decode/s':>9s} {'dec@16':>7s} "
        f"{'dec x int8':>10s} {'dec x llama':>11s} {'pr x int8':>9s} {'pr x llama':>10s} {'MB disk':>8s} "
        f"{'RSS MiB':>8s}"
    )
    lines = [head, "-" * len(head)]
    for n in names:
        s, p, r, b = sp.get(n, {}), pp.get(n, {}), rs.get(n, {}), by.get(n, {})
        lines.append(
            f"{n:20s} {fmt(p.get('perplexity'), '8.3f')} {fmt(p.get('vs_fp32'), '6.3f')} "
            f"{fmt(s.get('prompt_tokens_per_s'), '9.0f')} {fmt(s.get('decode_tokens_per_s'), '9.1f')} "
            f"{fmt(s.get('decode_tokens_per_s_short'), '7.1f')} {fmt(s.get('decode_vs_genai-int8'), '10.2f')} "
            f"{fmt(s.get('decode_vs_llama.cpp'), '11.2f')} {fmt(s.get('prompt_vs_genai-int8'), '9.2f')} "
            f"{fmt(s.get('prompt_vs_llama.cpp'), '10.2f')} "
            f"{fmt(b['bytes'] / 1e6 if b else None, '8.1f')} "
            f"{fmt(r['peak_rss_bytes'] / 2**20 if r else None, '8.0f')}"
        )
    agree = results.get("speed", {}).get("agreement")
    if agree:
        lines.append(
            f"greedy tokens identical ({', '.join(AGREE)}): long "
            f"{agree['long']['required_all_identical']}, short {agree['short']['required_all_identical']}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="speed,rss,bytes,ppl", help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--engines", help=f"comma list (default: all present) of {', '.join(ENGINES)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--short-prompt-tokens", type=int, default=16)
    parser.add_argument("--ppl-windows", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512, help="perplexity window")
    parser.add_argument("--settle", type=float, default=0.2, help="seconds of idle before each run")
    parser.add_argument("--trt-bundle", type=Path, default=BUNDLES / "smollm2-w8a8tied-trt")
    parser.add_argument("--cpu-bundle", type=Path, default=BUNDLES / "smollm2-w8a8tied-cpu")
    parser.add_argument("--untied-trt-bundle", type=Path, default=BUNDLES / "smollm2-w8a8-trt")
    parser.add_argument("--fp32-trt-bundle", type=Path, default=BUNDLES / "smollm2-fp32-trt")
    parser.add_argument("--fp32-cpu-bundle", type=Path, default=BUNDLES / "smollm2-fp32-cpu")
    parser.add_argument("--moe-cpu-bundle", type=Path, default=BUNDLES / "smollm2-moe-w8a8-cpu")
    parser.add_argument(
        "--recipe",
        type=Path,
        default=CACHE / "recipes" / "smollm2-135m-haq-head",
        help="the W8A8 bundles' recipe (its fake-quant model, scales tied, scores perplexity)",
    )
    parser.add_argument("--moe-fp32-cpu-bundle", type=Path, default=BUNDLES / "smollm2-moe-fp32-cpu")
    parser.add_argument(
        "--moe-graph-cpu-bundle",
        type=Path,
        default=BUNDLES / "smollm2-moe-w8a8-cpu-graph",
        help="the W8A8 MoE export split with --target ort-cpu --experts-in-graph",
    )
    parser.add_argument(
        "--moe-graph-fp32-cpu-bundle", type=Path, default=BUNDLES / "smollm2-moe-fp32-cpu-graph"
    )
    parser.add_argument("--peers", type=Path, default=PEERS, help="genai-int8/int4/fp32 folders")
    parser.add_argument("--gguf", type=Path, default=PEERS / "smollm2-135m.Q8_0.gguf")
    parser.add_argument("--cpp-ort-lib", type=Path, help="moedge-run --ort-lib (default: its SDK's)")
    parser.add_argument("--out", type=Path, default=RESULTS / "side_by_side.json")
    parser.add_argument("--rss-child", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--ids-file", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def select(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(parts, engines) asked for; a missing required model file stops the run in one line."""
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise SystemExit(f"unknown --parts {bad}: choose from {', '.join(PARTS)}")
    if args.engines:
        names = [n.strip() for n in args.engines.split(",") if n.strip()]
        bad = [n for n in names if n not in ENGINES]
        if bad:
            raise SystemExit(f"unknown --engines {bad}: choose from {', '.join(ENGINES)}")
    else:
        names = [n for n in ENGINES if n not in OPTIONAL or all(p.exists() for p in engine_files(args, n))]
    missing = [str(p) for n in names for p in engine_files(args, n) if not p.exists()]
    if missing:
        raise SystemExit(f"missing model files: {', '.join(missing)} (see the module docstring)")
    return parts, [n for n in ENGINES if n in names]


def main() -> None:
    args = parse_args()
    if args.rss_child:
        rss_child(args)
        return
    from moedge.runtime.profiling import text_token_ids

    parts, names = select(args)
    stamp = {"measured": run_stamp()["created"]}
    load_start = _loadavg()
    long_ids = text_token_ids(args.trt_bundle, "wikitext2", args.prompt_tokens)
    short_ids = long_ids[: args.short_prompt_tokens]
    previous = read_result(args.out)
    inputs = [*(p for n in names for p in engine_files(args, n)), *dataset_files("wikitext2")]
    cpp_names = [n for n in names if n in CPP_ENGINES]
    inputs += [BINARY] if cpp_names else []
    inputs = list(dict.fromkeys(inputs))
    runs, earlier_inputs = carry_over(previous, lambda r: r.get("part") not in parts, inputs)
    results: dict[str, Any] = {}
    if previous is not None and runs:
        results = {k: v for k, v in (previous.get("results") or {}).items() if k in PARTS and k not in parts}
    flags: dict[str, Any] = {}
    if PEER_BUILD.is_file():
        flags["peer_build"] = json.loads(PEER_BUILD.read_text())
    if cpp_names:
        flags["moedge-run"] = {
            "binary": BINARY,
            "ort_lib": args.cpp_ort_lib or "the ORT SDK it was built with",
        }
    for part in parts:
        start, part_load = time.perf_counter(), _loadavg()
        print(f"{part}:", flush=True)
        if part == "speed":
            engines = [Engine(n, engine_files(args, n)) for n in names if n not in PPL_ONLY]
            out, new_runs = speed(args, engines, long_ids, short_ids, stamp)
            cpp = next((e for e in engines if e.name in CPP_ENGINES), None)
            if cpp is not None:
                flags.setdefault("moedge-run", {})["onnxruntime"] = cpp.info.get("onnxruntime")
        elif part == "rss":
            out, new_runs = rss(args, names, long_ids, stamp)
        elif part == "bytes":
            out, new_runs = disk_bytes(args, [n for n in names if n not in PPL_ONLY]), []
        else:
            out, new_runs = perplexity_part(args, names, stamp)
        out["command"] = command_line()
        out["measured"] = stamp["measured"]
        out["seconds"] = time.perf_counter() - start
        out["loadavg"] = {"start": part_load, "end": _loadavg()}
        results[part] = out
        runs += new_runs
    results["tokenizer_check"] = tokenizer_check(args, names)
    results["loadavg"] = {"start": load_start, "end": _loadavg(), "cpus": os.cpu_count()}
    results["labels"] = {n: LABELS[n] for n in names}
    write_result(
        args.out,
        benchmark="side_by_side",
        command=command_line(),
        threads=args.threads,
        inputs=[*inputs, *earlier_inputs],
        runs=runs,
        statistic=(
            "speed: median over the timed rounds (round 0, a warm-up, is in runs with warmup true and left "
            "out) of each engine's prompt and decode seconds; tokens/s = tokens / median seconds; ratios "
            "are of those medians. Each run's cpu_s is this process's and its children's CPU seconds "
            "during it (moedge-run: its whole process, loading and warm-up included), loadavg "
            "os.getloadavg() after it, system_busy_s and steal_s the whole machine's busy and stolen CPU "
            "seconds during it (/proc/stat), others_cpu_s = system_busy_s - cpu_s (contention). rss: one "
            "run per engine in its own process (see the module docstring). bytes: file sizes. ppl: exp(sum "
            "of window NLLs / predicted tokens) over the same windows. Parts not run by this command keep "
            "the runs and results of the file it extended (each run and part says when it was measured)."
        ),
        results=results,
        build_flags=flags,
        engines=("onnxruntime", "moedge-run", "llama.cpp", "onnxruntime-genai"),
    )
    print(table(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
