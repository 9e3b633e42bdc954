"""``moedge run``: generate from a bundle on CPU+GPU with a byte-budgeted expert cache; print the tokens
as they come, then the metrics."""

from __future__ import annotations

import argparse
import functools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moedge import inputs
from moedge._errors import MoedgeError
from moedge.cli.common import (
    DEFAULT_PROFILE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    NONNEG,
    POSITIVE,
    SEED,
    CommandOptions,
    given,
    set_handler,
    warn_no_effect,
)

Prompt = str | list[int]


@dataclass(frozen=True)
class RunOptions(CommandOptions):
    """The flags of ``moedge run``."""

    bundle: Path
    prompt: tuple[str, ...] | None
    prompt_file: Path | None
    ids: tuple[str, ...] | None
    batch: bool
    max_new_tokens: int
    backend: str
    policy: str | None
    gpu_budget: str | None
    profile: str | None
    plan: Path | None
    engines: Path | None
    routing: Path | None
    no_cache: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None
    stop: tuple[int, ...] | None
    no_stream: bool
    metrics_json: Path | None
    threads: int | None


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``run`` and its flags."""
    run = sub.add_parser(
        "run",
        help="generate from a bundle on CPU+GPU with a byte-budgeted expert cache; print tokens and metrics",
    )
    run.add_argument("bundle", type=Path, help="a bundle folder (moedge split)")
    run.add_argument("-p", "--prompt", action="append", help="prompt text (repeat for several prompts)")
    run.add_argument("--prompt-file", type=Path, help="a text file, one prompt per line")
    run.add_argument("--ids", action="append", help="a prompt as token ids: 1,2,3 (repeatable)")
    run.add_argument(
        "--batch",
        action="store_true",
        help="run all prompts as one batch (one forward pass per step; completions print at the end)",
    )
    run.add_argument(
        "-n",
        "--max-new-tokens",
        type=POSITIVE,
        default=64,
        help="tokens to generate per prompt (default 64)",
    )
    _add_cache_flags(run)
    _add_sampling_flags(run)
    run.add_argument(
        "--no-stream", action="store_true", help="print each result at the end instead of streaming"
    )
    run.add_argument("--metrics-json", type=Path, help="write the metrics (and the generations) as JSON")
    run.add_argument(
        "--threads", type=inputs.threads, help="ONNX Runtime intra-op threads (default: all cores)"
    )
    set_handler(run, RunOptions, execute)


def _add_cache_flags(run: argparse.ArgumentParser) -> None:
    """The backend and the expert cache: choices and profile names come from the runtime's registries."""
    from moedge.runtime.backends import BACKENDS
    from moedge.runtime.policies import POLICIES
    from moedge.runtime.profiles import BUILTIN

    run.add_argument(
        "--backend",
        default="auto",
        choices=["auto", *BACKENDS],
        help="GPU backend: auto (ort-cuda when onnxruntime-gpu sees a GPU, else ort-cpu), or a modeled GPU (simulated)",
    )
    run.add_argument("--policy", choices=list(POLICIES), help="expert cache policy (default haq)")
    run.add_argument(
        "--gpu-budget",
        type=inputs.gpu_budget,
        help="GPU bytes for experts: 1.5GiB, 800MB, 25%% of the expert bytes, or auto (free device memory minus "
        "stages and KV cache; default)",
    )
    run.add_argument(
        "--profile",
        help=f"hardware profile ({', '.join(BUILTIN)}, or a JSON file): the modeled GPU of --backend "
        "simulated, and transfer costs for the latency predictor",
    )
    run.add_argument("--plan", type=Path, help="placement plan from `moedge profile --plan`")
    run.add_argument(
        "--engines",
        type=Path,
        help="TensorRT engine folder for --backend tensorrt (default: BUNDLE.engines, where moedge build writes)",
    )
    run.add_argument("--routing", type=Path, help="routing statistics (default: the bundle's routing.json)")
    run.add_argument(
        "--no-cache", action="store_true", help="every expert on the CPU (the exactness reference)"
    )


def _add_sampling_flags(run: argparse.ArgumentParser) -> None:
    """--temperature, --top-k, --top-p, --seed and --stop."""
    run.add_argument(
        "--temperature", type=inputs.float_range(0), default=0.0, help="0 = greedy (default); >0 samples"
    )
    run.add_argument("--top-k", type=NONNEG, help="sample from the k most likely tokens (default 0 = all)")
    run.add_argument(
        "--top-p",
        type=inputs.float_range(0, 1, low_open=True),
        help="nucleus sampling mass in (0, 1] (default 1.0)",
    )
    run.add_argument("--seed", type=SEED, help="sampling seed")
    run.add_argument(
        "--stop", type=NONNEG, action="append", help="stop token id (repeatable; EOS always stops)"
    )


def prompts_of(opts: RunOptions) -> list[Prompt]:
    """The prompts in order: each --prompt, the lines of --prompt-file, then each --ids as token ids."""
    prompts: list[Prompt] = list(opts.prompt or [])
    if opts.prompt_file is not None:  # read only when a regular file of at most 64 MiB
        lines = inputs.read_input_text(opts.prompt_file, "--prompt-file").splitlines()
        prompts += [line for line in lines if line.strip()]
    for spec in opts.ids or ():
        try:
            ids = [int(t) for t in spec.replace(",", " ").split()]
        except ValueError:
            raise MoedgeError(f"--ids takes comma-separated integers, got {spec!r}") from None
        if not ids or min(ids) < 0:
            raise MoedgeError(f"--ids takes one or more token ids >= 0, got {spec!r}")
        prompts.append(ids)
    if not prompts:
        raise MoedgeError("give a prompt: --prompt TEXT, --prompt-file FILE or --ids 1,2,3")
    return prompts


def default_backend() -> str:
    """What ``--backend auto`` picks: ort-cuda when onnxruntime-gpu sees a GPU, else ort-cpu."""
    import onnxruntime as ort

    return "ort-cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "ort-cpu"


def check_inputs(opts: RunOptions, prompts: Sequence[Prompt], backend: str) -> None:
    """Before any session starts: the plan, routing and profile files against the bundle, token ids
    against its vocabulary, and one warning line for flags the chosen backend ignores."""
    from moedge.formats.manifest import read_manifest
    from moedge.formats.placement_plan import bundle_experts, read_plan_file
    from moedge.formats.routing import read_routing
    from moedge.runtime.profiles import load_profile

    manifest = read_manifest(opts.bundle)  # the Generator verifies every file's hash next
    experts = bundle_experts(manifest)
    if opts.plan is not None:
        read_plan_file(opts.plan, experts=experts)
    if opts.routing is not None:
        read_routing(opts.routing, experts=experts)
    if opts.profile is not None:
        load_profile(opts.profile)
    vocab = manifest.model.get("vocab_size")
    for ids in (p for p in prompts if isinstance(p, list)):
        if isinstance(vocab, int) and max(ids) >= vocab:
            raise MoedgeError(
                f"--ids: token id {max(ids)} is outside the vocabulary of {opts.bundle} (ids 0-{vocab - 1})"
            )
    _warn_unused_flags(opts, backend, has_experts=bool(experts))


def _warn_unused_flags(opts: RunOptions, backend: str, *, has_experts: bool) -> None:
    """One warning line for the cache flags the backend or bundle ignores, one for sampling when greedy."""
    from moedge.runtime.policies import get_policy

    cache_flags = given(
        [
            ("--policy", opts.policy),
            ("--gpu-budget", opts.gpu_budget),
            ("--plan", opts.plan),
            ("--routing", opts.routing),
        ]
    )
    if opts.no_cache:
        warn_no_effect(cache_flags, "with --no-cache (every expert runs on the CPU)")
    elif backend == "ort-cpu":
        picked = " (what --backend auto picks without a GPU)" if opts.backend == "auto" else ""
        warn_no_effect(
            [*cache_flags, *given([("--profile", opts.profile)])],
            f"with --backend ort-cpu{picked}: every expert runs on the CPU; --backend simulated models a GPU",
        )
    elif not has_experts:
        warn_no_effect(cache_flags, f"on {opts.bundle}: a dense bundle has no experts to place")
    elif opts.plan is not None and opts.policy is not None:
        if get_policy(opts.policy).placement in ("none", "all", "last-layers"):
            warn_no_effect(["--plan"], f"with --policy {opts.policy}, which places experts by its own rule")
    if not opts.temperature:
        sampling = given([("--top-k", opts.top_k), ("--top-p", opts.top_p), ("--seed", opts.seed)])
        warn_no_effect(sampling, "with --temperature 0 (greedy decoding)")


def execute(opts: RunOptions) -> int:
    """Generate from a bundle with the CPU+GPU expert cache; stream tokens, then print the metrics."""
    from moedge.paths import refuse_inside_bundle, write_text_atomic
    from moedge.runtime.generator import Generator

    if opts.metrics_json is not None:
        refuse_inside_bundle(opts.metrics_json, flag="--metrics-json")
    prompts = prompts_of(opts)
    backend = opts.backend if opts.backend != "auto" else default_backend()
    check_inputs(opts, prompts, backend)
    gen = Generator(
        opts.bundle,
        backend=backend,
        policy=opts.policy or "haq",
        gpu_budget=opts.gpu_budget or "auto",
        profile=opts.profile or DEFAULT_PROFILE,
        plan=opts.plan,
        routing=opts.routing,
        intra_op_threads=opts.threads,
        cache=not opts.no_cache,
        # this process runs only the bundle's sessions; MOEDGE_ORT_SHARED_POOL=0 keeps per-session pools
        # for a process that also creates ONNX Runtime sessions of its own (main() called in-process)
        shared_pool=os.environ.get("MOEDGE_ORT_SHARED_POOL", "1") != "0",
        engines=opts.engines,
    )
    results = _generate(gen, opts, prompts)
    print()
    metrics = gen.summary()
    gen.close()
    for line in format_metrics(metrics):
        print(line)
    if opts.metrics_json is not None:
        metrics["generations"] = [
            {"prompt_ids": r.prompt_ids, "token_ids": r.token_ids, "text": r.text, "stopped_by": r.stopped_by}
            for r in results
        ]
        write_text_atomic(opts.metrics_json, json.dumps(metrics, indent=1) + "\n")
    return EXIT_INTERRUPTED if metrics["interrupted"] else EXIT_OK


def _generate(gen: Any, opts: RunOptions, prompts: list[Prompt]) -> list[Any]:
    """Run the prompts (one batch with --batch, else one by one, streamed unless --no-stream); print the
    completions; stop after an interrupted prompt. Returns the generations."""
    sampling: dict[str, Any] = {
        "max_new_tokens": opts.max_new_tokens,
        "temperature": opts.temperature,
        "top_k": opts.top_k or 0,
        "top_p": 1.0 if opts.top_p is None else opts.top_p,
        "seed": opts.seed,
        "stop": opts.stop or (),
    }
    results: list[Any] = []
    if opts.batch and len(prompts) > 1:  # one batch: the completions print when it ends
        results = gen.generate(prompts, **sampling)
        for prompt, r in zip(prompts, results, strict=False):
            head = prompt if isinstance(prompt, str) else " ".join(map(str, prompt)) + " |"
            print(head + (r.text if r.text is not None else " " + " ".join(map(str, r.token_ids))))
        return results
    on_token = _printer(gen) if not opts.no_stream else None
    for i, prompt in enumerate(prompts):
        if on_token is not None:
            head = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
            print(("\n" if i else "") + head, end="" if isinstance(prompt, str) else " | ", flush=True)
        stream = functools.partial(_stream_one, on_token, i) if on_token is not None else None
        out = gen.generate([prompt], on_token=stream, **sampling)
        results += out
        if on_token is None:
            print(out[0].text if out[0].text is not None else " ".join(map(str, out[0].token_ids)))
        if gen.metrics.interrupted:
            break
    return results


def _printer(gen: Any) -> Callable[[int, int], None]:
    """A token callback that prints the new text of prompt ``index`` (token ids for a bundle without a
    tokenizer) as it grows."""
    shown: dict[int, str] = {}
    ids: dict[int, list[int]] = {}

    def on_token(index: int, token: int) -> None:
        ids.setdefault(index, []).append(token)
        text = gen.decode(ids[index]) if gen.tokenizer is not None else " ".join(map(str, ids[index]))
        new = text[len(shown.get(index, "")) :]
        shown[index] = text
        print(new, end="", flush=True)

    return on_token


def _stream_one(callback: Callable[[int, int], None], index: int, _batch_index: int, token: int) -> None:
    callback(index, token)


def format_metrics(m: dict[str, object]) -> list[str]:
    """The metrics of a run as printed lines: speed, latency, and for a GPU backend the expert cache."""

    def num(x: object, fmt: str = ".1f") -> str:
        return "-" if x is None else format(x, fmt)

    lat = m["token_latency_ms"]
    assert isinstance(lat, dict)
    lines = [
        f"backend {m['backend']}: loaded in {num(m.get('load_seconds'), '.2f')} s; "
        f"prompt {m['prompt_tokens']} tokens at {num(m['prompt_tokens_per_s'])} tok/s, "
        f"decode {m['decode_tokens']} tokens at {num(m['decode_tokens_per_s'])} tok/s",
        f"per-token latency (wall) ms: p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}  std {lat['std']:.2f}",
    ]
    gpu = m.get("gpu")
    if isinstance(gpu, dict):
        modeled = gpu["modeled_decode_ms"]
        dev = gpu["device_bytes"]
        rates = list(gpu["hit_rate_per_layer"].values())
        lines += [
            f"expert cache ({gpu['policy']}, budget {gpu['budget_bytes'] / 2**20:.1f} MiB): hit rate {gpu['hit_rate']:.3f} "
            f"(per layer {min(rates, default=0):.2f}-{max(rates, default=0):.2f}, std {gpu['hit_rate_layer_std']:.3f}), "
            f"prefetch recall {num(gpu['prefetch_recall'], '.3f')}, moved {gpu['bytes_moved_per_token'] / 2**20:.2f} MiB/token",
            f"modeled on {gpu['profile']}: decode ms/token p50 {modeled['p50']:.3f}  p90 {modeled['p90']:.3f}  "
            f"p99 {modeled['p99']:.3f}  std {modeled['std']:.3f}; peak device bytes {dev['total'] / 2**20:.1f} MiB "
            f"(graphs {dev['graphs'] / 2**20:.1f}, experts {dev['experts_peak'] / 2**20:.1f}, KV {dev['kv_cache'] / 2**20:.1f})",
        ]
    if m.get("interrupted"):
        lines.append("interrupted: metrics cover the tokens generated so far")
    return lines
