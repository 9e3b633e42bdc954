"""The ``moedge`` command: one subcommand per pipeline step, each a thin call into the public API."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moedge import inputs
from moedge._errors import MoedgeError
from moedge.paths import DATA_ENV

log = logging.getLogger("moedge")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line: ``moedge: error: <message> (usage: moedge CMD --help)``.

    ``add_subparsers`` makes every subcommand's parser of this class too.
    """

    def error(self, message: str) -> Any:  # argparse declares NoReturn
        """Print the one line and exit 2."""
        text = " ".join(message.split())
        self.exit(EXIT_USAGE, f"moedge: error: {text} (usage: {self.prog} --help)\n")


_POSITIVE = inputs.int_range(1)
_NONNEG = inputs.int_range(0)
_SEED = inputs.int_range(0, 2**63 - 1)
_SEQLEN = inputs.int_range(2, 2**20, why=" (a window needs 2 tokens or more)")
_WINDOWS = inputs.int_range(1, 65536)
_BATCH = inputs.int_range(1, 4096)
MAX_CALIB_TOKENS = 2**26  # --calib-windows x --seqlen: the token windows are held in memory


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("environment")
    group.add_argument(
        "--data-dir", type=Path, help=f"data folder laid out like shared/data (default: ${DATA_ENV})"
    )
    group.add_argument(
        "--cache-dir", type=Path, help="where built test beds are cached (default: ~/.cache/moedge)"
    )


def _apply_data_dir(args: argparse.Namespace) -> None:
    # The CLI is the one place that turns a flag into the process default the library reads.
    if getattr(args, "data_dir", None) is not None:
        from moedge.paths import data_dir

        os.environ[DATA_ENV] = str(data_dir(args.data_dir))


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the whole pipeline on the default model and print a summary."""
    from moedge.demo import DemoConfig, run_demo

    config = DemoConfig(
        model=args.model,
        out_dir=args.output,
        cache_dir=args.cache_dir,
        windows=args.windows,
        seqlen=args.seqlen,
        prompt=args.prompt,
        new_tokens=args.new_tokens,
    )
    started: list[bool] = []

    def show(piece: str) -> None:
        if not started:
            started.append(True)
            print(f"generating from {config.prompt!r}:", flush=True)
        print(piece, end="", flush=True)

    summary = run_demo(config, on_token=show)
    print()
    print("\n".join(summary.lines()))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """Export MODEL to an ONNX folder."""
    from moedge.export.exporter import check_export_output, export_model
    from moedge.loading import load_model

    # fail before minutes of loading (a bundle, a non-empty folder, not writable); export_model checks again
    out = check_export_output(args.output, overwrite=args.overwrite)
    recipe = None
    if args.recipe is not None:
        from moedge.calibration.recipe import load_recipe

        recipe = load_recipe(args.recipe)  # a bad recipe fails before the model loads
    loaded = load_model(args.model, cache_dir=args.cache_dir)
    if recipe is not None:
        from moedge.calibration.recipe import apply_recipe

        apply_recipe(loaded, recipe)
    result = export_model(
        loaded,
        out,
        with_cache=not args.no_cache,
        opset=args.opset,
        validate=args.validate,
        overwrite=args.overwrite,
    )
    experts = (
        f", experts per layer {sorted(set(result.experts_per_layer.values()))}"
        if result.experts_per_layer
        else ""
    )
    print(
        f"exported {loaded.name} to {result.out_dir} ({result.num_nodes} nodes{experts}, {result.seconds:.0f} s)"
    )
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity of MODEL (PyTorch), of an exported folder or of a bundle (ONNX Runtime)."""
    import numpy as np

    from moedge.datasets import load_text
    from moedge.evaluation import ort_logits, perplexity, torch_logits
    from moedge.loading import check_seqlen
    from moedge.manifest import MANIFEST_FILE
    from moedge.paths import refuse_inside_bundle, write_text_atomic
    from moedge.runtime.exported import is_exported_folder

    if args.json is not None:
        refuse_inside_bundle(args.json, flag="--json")
    text = load_text(args.data)
    backend = args.backend
    is_bundle = Path(args.model).is_dir() and (Path(args.model) / MANIFEST_FILE).is_file()
    if backend == "auto":
        backend = "ort" if is_exported_folder(args.model) or is_bundle else "torch"
    if backend == "ort" and args.recipe is not None:
        raise MoedgeError("--recipe evaluates the fake-quant PyTorch model: drop --backend ort or the recipe")
    if backend == "ort" and is_bundle:
        from moedge.runtime.bundle_runner import BundleRunner
        from moedge.tokenizer import load_tokenizer

        runner = BundleRunner(args.model, intra_op_threads=args.threads)
        check_seqlen(args.seqlen, runner.manifest.model.get("max_position_embeddings"), str(args.model))
        if runner.manifest.tokenizer is None:
            raise MoedgeError(
                f"{args.model} carries no tokenizer: re-split it from an export with tokenizer.json"
            )
        tokenizer = load_tokenizer(Path(args.model) / runner.manifest.tokenizer)
        ids = np.asarray(tokenizer.encode(text.text, add_special_tokens=False).ids, dtype=np.int64)
        score, label = ort_logits(runner), f"bundle, onnxruntime cpu {runner.manifest.precision}"
    elif backend == "ort":
        from moedge.runtime.ort_causal_lm import OrtCausalLM
        from moedge.tokenizer import load_tokenizer

        if not is_exported_folder(args.model):
            raise MoedgeError(
                f"{args.model} is neither an exported folder nor a bundle: run moedge export first, "
                "or use --backend torch"
            )
        lm = OrtCausalLM(args.model, intra_op_threads=args.threads)
        tokenizer = load_tokenizer(lm.info.tokenizer_file)
        ids = np.asarray(tokenizer.encode(text.text, add_special_tokens=False).ids, dtype=np.int64)
        score, label = ort_logits(lm), f"onnxruntime cpu {lm.info.raw.get('precision', 'fp32')}"
    else:
        from moedge.loading import load_model

        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        loaded = load_model(args.model, cache_dir=args.cache_dir)
        context = getattr(loaded.model.config, "max_position_embeddings", None)
        check_seqlen(args.seqlen, context, loaded.name)  # before a long evaluation
        label = "pytorch fp32"
        if args.recipe is not None:
            from moedge.calibration.recipe import apply_recipe, load_recipe

            recipe = load_recipe(args.recipe)
            apply_recipe(loaded, recipe)
            label = f"pytorch fake-quant W8A8 ({recipe.method} recipe)"
        ids = np.asarray(loaded.encode(text.text), dtype=np.int64)
        score = torch_logits(loaded.model)
    result = perplexity(
        score,
        ids,
        seqlen=args.seqlen,
        max_windows=args.max_windows,
        dataset=text.name,
        backend=label,
        progress=not args.quiet,
    )
    print(result.summary())
    if args.json:
        record = {"model": str(args.model), "text_origin": text.origin, **result.to_dict()}
        write_text_atomic(args.json, json.dumps(record, indent=2) + "\n")
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Calibrate MODEL to W8A8 and write the recipe folder."""
    import torch

    from moedge.calibration import CalibrationConfig, calibrate, calibration_windows, save_recipe
    from moedge.calibration.recipe import RECIPE_KIND
    from moedge.loading import check_seqlen, load_model
    from moedge.paths import check_output_folder

    check_output_folder(args.output, kind=RECIPE_KIND, overwrite=args.overwrite)  # before calibrating
    if args.calib_windows * args.seqlen > MAX_CALIB_TOKENS:
        raise MoedgeError(
            f"--calib-windows {args.calib_windows} x --seqlen {args.seqlen} is "
            f"{args.calib_windows * args.seqlen:,} tokens, more than the {MAX_CALIB_TOKENS:,} calibration "
            "holds in memory: lower either"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    config = CalibrationConfig(
        method=args.method,
        act_clip=args.act_clip,
        percentile=args.percentile,
        alpha=args.alpha,
        keep_fp=tuple(args.keep_fp or ()),
        auto_keep_fp=args.auto_keep_fp,
        quantize_head=args.quantize_head,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    loaded = load_model(args.model, cache_dir=args.cache_dir)
    check_seqlen(args.seqlen, getattr(loaded.model.config, "max_position_embeddings", None), loaded.name)
    samples = calibration_windows(
        loaded, dataset=args.calib_data, count=args.calib_windows, seqlen=args.seqlen, seed=args.seed
    )
    log.info(
        "calibrating %s with %s on %d x %d tokens of %s",
        loaded.name,
        args.method,
        *samples.shape,
        args.calib_data,
    )
    result = calibrate(loaded, list(samples), config, progress=not args.quiet)
    out = save_recipe(loaded, result, args.output, calibration_data=args.calib_data, overwrite=args.overwrite)
    worst = sorted(((r.rel_error, n) for n, r in result.linears.items() if r.quantized), reverse=True)[:3]
    print(
        f"wrote {out} ({args.method}; {len(result.linears)} linears, {len(result.kept_fp)} kept in FP; "
        f"{result.seconds:.0f} s, peak RSS {result.peak_rss_mb:.0f} MB)"
    )
    for name in result.kept_fp:
        print(f"  kept in FP: {name}")
    for err, name in worst:
        print(f"  largest relative output error: {name} {err:.2e}")
    return EXIT_OK


def cmd_split(args: argparse.Namespace) -> int:
    """Cut an exported folder into a bundle (stages, one graph per expert, manifest.json)."""
    from moedge.graph_passes.bundle import split_bundle

    manifest = split_bundle(args.export_dir, args.output, validate=args.validate, overwrite=args.overwrite)
    moe = [layer for layer in manifest.layers if layer.moe is not None]
    experts = sum(len(layer.moe.experts) for layer in moe if layer.moe is not None)
    print(
        f"bundle {args.output}: {len(manifest.layers)} layer stages, {experts} expert graphs "
        f"({manifest.expert_bytes() / 2**20:.1f} MiB of experts), precision {manifest.precision}"
    )
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print a model's or a bundle's summary."""
    from moedge.graph_passes.inspect import inspect_path

    print("\n".join(inspect_path(args.path, ort_census=not args.no_ort)))
    return EXIT_OK


def _prompts(args: argparse.Namespace) -> list[str | list[int]]:
    prompts: list[str | list[int]] = list(args.prompt or [])
    if args.prompt_file is not None:  # read only when a regular file of at most 64 MiB
        lines = inputs.read_input_text(args.prompt_file, "--prompt-file").splitlines()
        prompts += [line for line in lines if line.strip()]
    for spec in args.ids or []:
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


def _default_backend() -> str:
    import onnxruntime as ort

    return "ort-cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "ort-cpu"


def _format_metrics(m: dict[str, object]) -> list[str]:
    def num(x: object, fmt: str = ".1f") -> str:
        return "-" if x is None else format(x, fmt)

    lat = m["token_latency_ms"]
    assert isinstance(lat, dict)
    lines = [
        f"backend {m['backend']}: prompt {m['prompt_tokens']} tokens at {num(m['prompt_tokens_per_s'])} tok/s, "
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


def _stream_one(callback: Callable[[int, int], None], index: int, _batch_index: int, token: int) -> None:
    callback(index, token)


def _warn_no_effect(flags: list[str], why: str) -> None:
    if flags:
        verb = "has" if len(flags) == 1 else "have"
        log.warning("warning: %s %s no effect %s", ", ".join(flags), verb, why)


def _check_run_inputs(args: argparse.Namespace, prompts: list[str | list[int]], backend: str) -> None:
    """Before any session starts: the plan, routing and profile files against the bundle, token ids
    against its vocabulary, and one warning line for flags the chosen backend ignores."""
    from moedge.manifest import read_manifest
    from moedge.runtime.placement import bundle_experts, read_plan_file
    from moedge.runtime.profiles import load_profile
    from moedge.runtime.routing import read_routing

    manifest = read_manifest(args.bundle)  # the Generator verifies every file's hash next
    experts = bundle_experts(manifest)
    if args.plan is not None:
        read_plan_file(args.plan, experts=experts)
    if args.routing is not None:
        read_routing(args.routing, experts=experts)
    if args.profile is not None:
        load_profile(args.profile)
    vocab = manifest.model.get("vocab_size")
    for ids in (p for p in prompts if isinstance(p, list)):
        if isinstance(vocab, int) and max(ids) >= vocab:
            raise MoedgeError(
                f"--ids: token id {max(ids)} is outside the vocabulary of {args.bundle} (ids 0-{vocab - 1})"
            )
    cache_flags = [
        flag
        for flag, value in (
            ("--policy", args.policy),
            ("--gpu-budget", args.gpu_budget),
            ("--plan", args.plan),
            ("--routing", args.routing),
        )
        if value is not None
    ]
    if args.no_cache:
        _warn_no_effect(cache_flags, "with --no-cache (every expert runs on the CPU)")
    elif backend == "ort-cpu":
        picked = " (what --backend auto picks without a GPU)" if args.backend == "auto" else ""
        _warn_no_effect(
            [*cache_flags, *(["--profile"] if args.profile is not None else [])],
            f"with --backend ort-cpu{picked}: every expert runs on the CPU; --backend simulated models a GPU",
        )
    elif not experts:
        _warn_no_effect(cache_flags, f"on {args.bundle}: a dense bundle has no experts to place")
    elif args.plan is not None and args.policy is not None:
        from moedge.runtime.scheduler import POLICIES

        if POLICIES[args.policy].placement in ("none", "all", "last-layers"):
            _warn_no_effect(["--plan"], f"with --policy {args.policy}, which places experts by its own rule")
    if not args.temperature:
        sampling = [
            flag
            for flag, value in (("--top-k", args.top_k), ("--top-p", args.top_p), ("--seed", args.seed))
            if value is not None
        ]
        _warn_no_effect(sampling, "with --temperature 0 (greedy decoding)")


def cmd_run(args: argparse.Namespace) -> int:
    """Generate from a bundle with the CPU+GPU expert cache; stream tokens, then print the metrics."""
    from moedge.paths import refuse_inside_bundle, write_text_atomic
    from moedge.runtime.generator import Generator

    if args.metrics_json is not None:
        refuse_inside_bundle(args.metrics_json, flag="--metrics-json")
    prompts = _prompts(args)
    backend = args.backend if args.backend != "auto" else _default_backend()
    _check_run_inputs(args, prompts, backend)
    gen = Generator(
        args.bundle,
        backend=backend,
        policy=args.policy or "haq",
        gpu_budget=args.gpu_budget or "auto",
        profile=args.profile or "rtx4090-pcie4",
        plan=args.plan,
        routing=args.routing,
        intra_op_threads=args.threads,
        cache=not args.no_cache,
        # this process runs only the bundle's sessions; MOEDGE_ORT_SHARED_POOL=0 keeps per-session pools
        # for a process that also creates ONNX Runtime sessions of its own (main() called in-process)
        shared_pool=os.environ.get("MOEDGE_ORT_SHARED_POOL", "1") != "0",
        engines=args.engines,
    )
    shown: dict[int, str] = {}
    ids: dict[int, list[int]] = {}

    def on_token(index: int, token: int) -> None:
        if args.no_stream:
            return
        ids.setdefault(index, []).append(token)
        text = gen.decode(ids[index]) if gen.tokenizer is not None else " ".join(map(str, ids[index]))
        new = text[len(shown.get(index, "")) :]
        shown[index] = text
        print(new, end="", flush=True)

    results = []
    sampling: dict[str, Any] = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k or 0,
        "top_p": 1.0 if args.top_p is None else args.top_p,
        "seed": args.seed,
        "stop": args.stop or (),
    }
    if args.batch and len(prompts) > 1:  # one batch: the completions print when it ends
        results = gen.generate(prompts, **sampling)
        for prompt, r in zip(prompts, results, strict=False):
            head = prompt if isinstance(prompt, str) else " ".join(map(str, prompt)) + " |"
            print(head + (r.text if r.text is not None else " " + " ".join(map(str, r.token_ids))))
        prompts = []
    for i, prompt in enumerate(prompts):
        if not args.no_stream:
            head = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
            print(("\n" if i else "") + head, end="" if isinstance(prompt, str) else " | ", flush=True)
        out = gen.generate([prompt], on_token=functools.partial(_stream_one, on_token, i), **sampling)
        results += out
        if args.no_stream:
            print(out[0].text if out[0].text is not None else " ".join(map(str, out[0].token_ids)))
        if gen.metrics.interrupted:
            break
    print()
    metrics = gen.summary()
    gen.close()
    for line in _format_metrics(metrics):
        print(line)
    if args.metrics_json is not None:
        metrics["generations"] = [
            {"prompt_ids": r.prompt_ids, "token_ids": r.token_ids, "text": r.text, "stopped_by": r.stopped_by}
            for r in results
        ]
        write_text_atomic(args.metrics_json, json.dumps(metrics, indent=1) + "\n")
    return 130 if metrics["interrupted"] else EXIT_OK


def cmd_profile(args: argparse.Namespace) -> int:
    """Record routing statistics (and optionally a tuned placement plan) from a bundle run over text."""
    from moedge.runtime.profiling import profile_bundle

    if args.merge or args.plan is not None:  # the inputs, before minutes of profiling
        from moedge.manifest import read_manifest
        from moedge.runtime.placement import bundle_experts
        from moedge.runtime.profiles import load_profile
        from moedge.runtime.routing import read_routing

        experts = bundle_experts(read_manifest(args.bundle))
        for other in args.merge or []:
            read_routing(other, experts=experts)
        if args.plan is not None:
            load_profile(args.profile or "rtx4090-pcie4")
    if args.plan is None:
        flags = [
            f for f, v in (("--gpu-budget", args.gpu_budget), ("--profile", args.profile)) if v is not None
        ]
        _warn_no_effect(flags, "without --plan (they tune the placement plan)")
    report = profile_bundle(
        args.bundle,
        text=args.text,
        tokens=args.tokens,
        output=args.output,
        update_bundle=args.update_bundle,
        merge=args.merge,
        plan=args.plan,
        gpu_budget=args.gpu_budget or "25%",
        profile=args.profile or "rtx4090-pcie4",
        trace=args.trace,
        threads=args.threads,
    )
    for line in report:
        print(line)
    return EXIT_OK


def cmd_build(args: argparse.Namespace) -> int:
    """Build TensorRT engines for every graph of a bundle."""
    from moedge.runtime.backends.tensorrt import build_bundle_engines, default_engine_dir

    engine_dir = args.engines if args.engines is not None else default_engine_dir(args.bundle)
    built = build_bundle_engines(
        args.bundle, engine_dir=engine_dir, max_tokens=args.max_tokens, context=args.context
    )
    print(f"{len(built)} engines in {engine_dir}")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmarks; ``moedge bench runtime`` compares cache policies on real routing traces."""
    from moedge.bench import run_runtime_bench
    from moedge.paths import refuse_inside_bundle

    refuse_inside_bundle(args.out, flag="-o")
    for line in run_runtime_bench(args):
        print(line)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render the README's CLI section)."""
    from moedge.loading import SOURCES_HELP
    from moedge.testbeds import testbed_names

    model_help = "model: " + SOURCES_HELP.format(beds=", ".join(testbed_names()))
    parser = _Parser(
        prog="moedge",
        description="Take a Hugging Face LLM (dense or MoE) to deployable ONNX / TensorRT engines for NVIDIA edge hardware.",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging (and tracebacks)")
    verbosity.add_argument(
        "-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser("demo", help="run the whole pipeline on the default model (smollm2-135m-moe)")
    demo.add_argument("--model", default="smollm2-135m-moe", help=model_help)
    demo.add_argument("-o", "--output", type=Path, help="export folder (default: in the cache)")
    demo.add_argument("--windows", type=_WINDOWS, default=4, help="evaluation windows (default 4)")
    demo.add_argument("--seqlen", type=_SEQLEN, default=512, help="evaluation window length (default 512)")
    demo.add_argument("--prompt", default="The capital of France is", help="generation prompt")
    demo.add_argument("--new-tokens", type=_POSITIVE, default=16, help="tokens to generate (default 16)")
    _common(demo)
    demo.set_defaults(func=cmd_demo)

    export = sub.add_parser(
        "export", help="export MODEL to ONNX (model.onnx + data, config.json, tokenizer.json)"
    )
    export.add_argument("model", metavar="MODEL", help=model_help)
    export.add_argument("-o", "--output", type=Path, required=True, help="output folder (missing or empty)")
    export.add_argument(
        "--overwrite",
        action="store_true",
        help="replace -o when it is a previous moedge export holding nothing else (swapped in at the end)",
    )
    export.add_argument("--no-cache", action="store_true", help="export without KV-cache inputs/outputs")
    export.add_argument(
        "--opset",
        type=inputs.opset,
        default=18,
        help=f"ONNX opset ({inputs.EXPORT_OPSETS[0]}-{inputs.EXPORT_OPSETS[-1]}, default 18)",
    )
    export.add_argument(
        "--recipe", type=Path, help="a calibration recipe folder: export the W8A8 QDQ graph it describes"
    )
    _common(export)
    export.add_argument("--validate", action="store_true", help="run the ONNX checker after every graph pass")
    export.set_defaults(func=cmd_export)

    ev = sub.add_parser(
        "eval", help="perplexity of MODEL (PyTorch), an exported folder or a bundle (ONNX Runtime)"
    )
    ev.add_argument("model", metavar="MODEL", help=model_help + ", an exported folder, or a bundle")
    ev.add_argument(
        "--data", default="wikitext2", help="wikitext2, ptb, c4, demo, or a text file (default wikitext2)"
    )
    ev.add_argument(
        "--seqlen",
        type=_SEQLEN,
        default=512,
        help="window length in tokens (default 512; 2048 is the published standard)",
    )
    ev.add_argument("--max-windows", type=_POSITIVE, help="evaluate only the first N windows")
    ev.add_argument(
        "--backend", choices=("auto", "torch", "ort"), default="auto", help="auto: ort for an exported folder"
    )
    ev.add_argument("--threads", type=inputs.threads, help="CPU threads (default: the runtime's own choice)")
    ev.add_argument("--json", type=Path, help="also write the result as JSON")
    ev.add_argument(
        "--recipe", type=Path, help="evaluate the fake-quant model of this recipe folder (PyTorch)"
    )
    _common(ev)
    ev.set_defaults(func=cmd_eval)

    cal = sub.add_parser(
        "calibrate", help="calibrate MODEL to W8A8 (int8 weights and activations): a recipe folder"
    )
    cal.add_argument("model", metavar="MODEL", help=model_help)
    cal.add_argument(
        "-o", "--output", type=Path, required=True, help="recipe folder to write (missing or empty)"
    )
    cal.add_argument(
        "--overwrite",
        action="store_true",
        help="replace -o when it is a previous recipe folder holding nothing else (swapped in at the end)",
    )
    cal.add_argument(
        "--method",
        choices=("rtn", "smoothquant", "gptq", "haq"),
        default="haq",
        help="haq (default): searched smoothing + GPTQ + searched ranges; rtn, smoothquant, gptq for comparison",
    )
    cal.add_argument(
        "--calib-data",
        default="c4",
        help="c4 (documents 0-999, default), wikitext2, ptb, demo, or a text file",
    )
    cal.add_argument("--calib-windows", type=_WINDOWS, default=128, help="calibration windows (default 128)")
    cal.add_argument("--seqlen", type=_SEQLEN, default=512, help="calibration window length (default 512)")
    cal.add_argument(
        "--seed", type=_SEED, default=0, help="seed for window sampling and searches (default 0)"
    )
    cal.add_argument(
        "--act-clip",
        choices=("absmax", "percentile", "mse", "output"),
        help="activation range: output error (haq default), input MSE, percentile, or absmax (other methods)",
    )
    cal.add_argument(
        "--percentile",
        type=inputs.float_range(0, 100, low_open=True),
        default=99.99,
        help="for --act-clip percentile, in (0, 100] (default 99.99)",
    )
    cal.add_argument(
        "--alpha",
        type=inputs.float_range(0, 1),
        help="fixed smoothing strength in [0, 1] (default: searched per group for haq)",
    )
    cal.add_argument(
        "--keep-fp",
        action="append",
        metavar="PATTERN",
        help="keep linears matching this glob in FP, e.g. 'model.layers.*.mlp.down_proj' (repeatable)",
    )
    cal.add_argument(
        "--auto-keep-fp",
        type=inputs.float_range(0, 1, high_open=True),
        default=0.0,
        metavar="FRACTION",
        help="also keep the most sensitive linears in FP, up to this fraction of linear parameters (e.g. 0.02)",
    )
    cal.add_argument(
        "--quantize-head",
        action="store_true",
        help="quantize lm_head too (W8A8, final norm smoothed into it; a tied head gets its own int8 copy): "
        "a quarter of an FP32 head's bytes and time, as llama.cpp's Q8_0 does",
    )
    cal.add_argument("--batch-size", type=_BATCH, default=8, help="windows per forward pass (default 8)")
    cal.add_argument("--threads", type=inputs.threads, help="CPU threads for PyTorch")
    _common(cal)
    cal.set_defaults(func=cmd_calibrate)

    split = sub.add_parser(
        "split", help="cut an exported folder into a bundle: per-layer stages, one graph per expert, manifest"
    )
    split.add_argument("export_dir", metavar="EXPORT", type=Path, help="a folder written by moedge export")
    split.add_argument(
        "-o", "--output", type=Path, required=True, help="bundle folder to write (missing or empty)"
    )
    split.add_argument(
        "--overwrite",
        action="store_true",
        help="replace -o when it is a previous bundle holding only the files its manifest lists",
    )
    split.add_argument("--validate", action="store_true", help="run the ONNX checker on every graph")
    split.set_defaults(func=cmd_split)

    insp = sub.add_parser(
        "inspect",
        help="print an exported model or a bundle: graphs, op census (and the kernels ORT picks), Q/DQ coverage, sizes, TensorRT lint",
    )
    insp.add_argument("path", type=Path, help="an exported folder, a bundle folder or an .onnx file")
    insp.add_argument(
        "--no-ort", action="store_true", help="skip the census after ONNX Runtime's optimizations (faster)"
    )
    insp.set_defaults(func=cmd_inspect)

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
        type=_POSITIVE,
        default=64,
        help="tokens to generate per prompt (default 64)",
    )
    run.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "ort-cpu", "simulated", "ort-cuda", "tensorrt"],
        help="GPU backend: auto (ort-cuda when onnxruntime-gpu sees a GPU, else ort-cpu), or a modeled GPU (simulated)",
    )
    run.add_argument(
        "--policy",
        choices=["haq", "lru", "lfu", "static", "n-cpu-moe", "fate", "moe-infinity", "cpu", "full-gpu"],
        help="expert cache policy (default haq)",
    )
    run.add_argument(
        "--gpu-budget",
        type=inputs.gpu_budget,
        help="GPU bytes for experts: 1.5GiB, 800MB, 25%% of the expert bytes, or auto (free device memory minus "
        "stages and KV cache; default)",
    )
    run.add_argument(
        "--profile",
        help="hardware profile (jetson-orin-nano-8gb, jetson-agx-orin-64gb, rtx4090-pcie4, or a JSON file): the "
        "modeled GPU of --backend simulated, and transfer costs for the latency predictor",
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
    run.add_argument(
        "--temperature", type=inputs.float_range(0), default=0.0, help="0 = greedy (default); >0 samples"
    )
    run.add_argument("--top-k", type=_NONNEG, help="sample from the k most likely tokens (default 0 = all)")
    run.add_argument(
        "--top-p",
        type=inputs.float_range(0, 1, low_open=True),
        help="nucleus sampling mass in (0, 1] (default 1.0)",
    )
    run.add_argument("--seed", type=_SEED, help="sampling seed")
    run.add_argument(
        "--stop", type=_NONNEG, action="append", help="stop token id (repeatable; EOS always stops)"
    )
    run.add_argument(
        "--no-stream", action="store_true", help="print each result at the end instead of streaming"
    )
    run.add_argument("--metrics-json", type=Path, help="write the metrics (and the generations) as JSON")
    run.add_argument(
        "--threads", type=inputs.threads, help="ONNX Runtime intra-op threads (default: all cores)"
    )
    run.set_defaults(func=cmd_run)

    prof = sub.add_parser(
        "profile", help="record a bundle's routing statistics over text and plan expert placement"
    )
    prof.add_argument("bundle", type=Path, help="a bundle folder")
    prof.add_argument("--text", default="c4", help="wikitext2, ptb, c4, demo or a text file (default c4)")
    prof.add_argument(
        "--tokens",
        type=inputs.int_range(16, why=" (routing statistics need 16 tokens or more)"),
        default=4096,
        help="tokens of the text to run (default 4096)",
    )
    prof.add_argument(
        "-o", "--output", type=Path, help="routing.json to write (outside any bundle; or --update-bundle)"
    )
    prof.add_argument(
        "--update-bundle",
        action="store_true",
        help="write routing.json (and a --plan path inside the bundle) into BUNDLE and list them in its "
        "manifest.json, replaced last; no other command writes inside a bundle",
    )
    prof.add_argument(
        "--merge", type=Path, action="append", help="routing.json of another workload to merge in"
    )
    prof.add_argument(
        "--plan", type=Path, help="also write a haq placement plan tuned for --gpu-budget on --profile"
    )
    prof.add_argument(
        "--gpu-budget",
        type=inputs.gpu_budget,
        help="budget of the --plan (default 25%% of expert bytes)",
    )
    prof.add_argument("--profile", help="hardware profile the --plan is tuned for (default rtx4090-pcie4)")
    prof.add_argument("--trace", type=Path, help="also save the per-token routing trace (.npz)")
    prof.add_argument("--threads", type=inputs.threads, help="ONNX Runtime intra-op threads")
    _common(prof)
    prof.set_defaults(func=cmd_profile)

    build = sub.add_parser("build", help="build TensorRT engines for a bundle (needs TensorRT and a GPU)")
    build.add_argument("bundle", type=Path, help="a bundle folder")
    build.add_argument(
        "--engines",
        type=Path,
        help="engine folder, outside the bundle (default: BUNDLE.engines beside it, where --backend tensorrt "
        "reads them)",
    )
    build.add_argument(
        "--max-tokens", type=_POSITIVE, default=512, help="largest token count per call (default 512)"
    )
    build.add_argument("--context", type=_POSITIVE, help="largest KV length (default: the model's context)")
    build.set_defaults(func=cmd_build)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    rb = bench_sub.add_parser(
        "runtime",
        help="cache policies x budgets x hardware profiles on real routing traces, and ORT CPU speed",
    )
    from moedge.bench import add_bench_arguments

    add_bench_arguments(rb)
    _common(rb)
    rb.set_defaults(func=cmd_bench)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="moedge: %(message)s", stream=sys.stderr, force=True)
    for noisy in ("torch", "transformers", "onnxscript", "onnx_ir", "urllib3", "filelock", "huggingface_hub"):
        # dependencies' own warnings (e.g. "torchvision is not installed") are noise to a moedge user
        logging.getLogger(noisy).setLevel(logging.INFO if args.verbose else logging.ERROR)
    if args.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")


def _interrupted() -> int:
    try:
        print("moedge: interrupted", file=sys.stderr, flush=True)
    except BaseException:  # a second Ctrl-C while printing: still quiet
        pass
    return EXIT_INTERRUPTED


def _quiet_exit_on_interrupt() -> None:
    """After main: a Ctrl-C while the interpreter shuts down exits 130 at once, without a traceback."""
    import signal

    def handler(signum: int, frame: object) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(EXIT_INTERRUPTED)

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        pass


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help (0) return like every other outcome
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE if exc.code else EXIT_OK
    _configure_logging(args)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        _apply_data_dir(args)
        return func(args)
    except MoedgeError as exc:
        print(f"moedge: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:
        if args.verbose:
            raise
        print(
            f"moedge: error: {type(exc).__name__}: {_one_line(exc)} (run with -v for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (also the console script): 0 ok, 1 failure (one clear line), 2 usage error (one line),
    130 interrupted (Ctrl-C at any moment, parser construction included: ``moedge: interrupted``)."""
    try:
        return _run(argv)
    except KeyboardInterrupt:
        return _interrupted()
    finally:
        if argv is None:  # the console script: the process ends next
            _quiet_exit_on_interrupt()


if __name__ == "__main__":
    sys.exit(main())
