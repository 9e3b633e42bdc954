"""The ``moedge`` command: one subcommand per pipeline step, each a thin call into the public API."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from moedge._errors import MoedgeError
from moedge.paths import DATA_ENV

log = logging.getLogger("moedge")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


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
    from moedge.export.exporter import export_model
    from moedge.loading import load_model
    from moedge.paths import ensure_writable_dir

    out = args.output.expanduser().resolve()
    ensure_writable_dir(out.parent)  # fail before minutes of loading; export_model checks again for API users
    recipe = None
    if args.recipe is not None:
        from moedge.calibration.recipe import load_recipe

        recipe = load_recipe(args.recipe)  # a bad recipe fails before the model loads
    loaded = load_model(args.model, cache_dir=args.cache_dir)
    if recipe is not None:
        from moedge.calibration.recipe import apply_recipe

        apply_recipe(loaded, recipe)
    result = export_model(loaded, out, with_cache=not args.no_cache, opset=args.opset, validate=args.validate)
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
    from moedge.manifest import MANIFEST_FILE
    from moedge.runtime.exported import is_exported_folder

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
        tokenizer = load_tokenizer(Path(args.model) / "tokenizer.json")
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
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Calibrate MODEL to W8A8 and write the recipe folder."""
    import torch

    from moedge.calibration import CalibrationConfig, calibrate, calibration_windows, save_recipe
    from moedge.loading import load_model
    from moedge.paths import check_new_output

    check_new_output(args.output)  # before a long calibration, not after
    if args.threads:
        torch.set_num_threads(args.threads)
    config = CalibrationConfig(
        method=args.method,
        act_clip=args.act_clip,
        percentile=args.percentile,
        alpha=args.alpha,
        keep_fp=tuple(args.keep_fp or ()),
        auto_keep_fp=args.auto_keep_fp,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    loaded = load_model(args.model, cache_dir=args.cache_dir)
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
    out = save_recipe(loaded, result, args.output, calibration_data=args.calib_data)
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

    manifest = split_bundle(args.export_dir, args.output, validate=args.validate)
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render the README's CLI section)."""
    from moedge.loading import SOURCES_HELP
    from moedge.testbeds import testbed_names

    model_help = "model: " + SOURCES_HELP.format(beds=", ".join(testbed_names()))
    parser = argparse.ArgumentParser(
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
    demo.add_argument("--windows", type=int, default=4, help="evaluation windows (default 4)")
    demo.add_argument("--seqlen", type=int, default=512, help="evaluation window length (default 512)")
    demo.add_argument("--prompt", default="The capital of France is", help="generation prompt")
    demo.add_argument("--new-tokens", type=int, default=16, help="tokens to generate (default 16)")
    _common(demo)
    demo.set_defaults(func=cmd_demo)

    export = sub.add_parser(
        "export", help="export MODEL to ONNX (model.onnx + data, config.json, tokenizer.json)"
    )
    export.add_argument("model", metavar="MODEL", help=model_help)
    export.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    export.add_argument("--no-cache", action="store_true", help="export without KV-cache inputs/outputs")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17, default 18)")
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
        type=int,
        default=512,
        help="window length in tokens (default 512; 2048 is the published standard)",
    )
    ev.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    ev.add_argument(
        "--backend", choices=("auto", "torch", "ort"), default="auto", help="auto: ort for an exported folder"
    )
    ev.add_argument("--threads", type=int, help="CPU threads (default: the runtime's own choice)")
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
        "-o", "--output", type=Path, required=True, help="recipe folder to write (must not exist)"
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
    cal.add_argument("--calib-windows", type=int, default=128, help="calibration windows (default 128)")
    cal.add_argument("--seqlen", type=int, default=512, help="calibration window length (default 512)")
    cal.add_argument("--seed", type=int, default=0, help="seed for window sampling and searches (default 0)")
    cal.add_argument(
        "--act-clip",
        choices=("absmax", "percentile", "mse", "output"),
        help="activation range: output error (haq default), input MSE, percentile, or absmax (other methods)",
    )
    cal.add_argument(
        "--percentile", type=float, default=99.99, help="for --act-clip percentile (default 99.99)"
    )
    cal.add_argument(
        "--alpha", type=float, help="fixed smoothing strength in [0, 1] (default: searched per group for haq)"
    )
    cal.add_argument(
        "--keep-fp",
        action="append",
        metavar="PATTERN",
        help="keep linears matching this glob in FP, e.g. 'model.layers.*.mlp.down_proj' (repeatable)",
    )
    cal.add_argument(
        "--auto-keep-fp",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="also keep the most sensitive linears in FP, up to this fraction of linear parameters (e.g. 0.02)",
    )
    cal.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    cal.add_argument("--threads", type=int, help="CPU threads for PyTorch")
    _common(cal)
    cal.set_defaults(func=cmd_calibrate)

    split = sub.add_parser(
        "split", help="cut an exported folder into a bundle: per-layer stages, one graph per expert, manifest"
    )
    split.add_argument("export_dir", metavar="EXPORT", type=Path, help="a folder written by moedge export")
    split.add_argument(
        "-o", "--output", type=Path, required=True, help="bundle folder to write (must not exist)"
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
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="moedge: %(message)s", stream=sys.stderr)
    for noisy in ("torch", "transformers", "onnxscript", "onnx_ir", "urllib3", "filelock", "huggingface_hub"):
        # dependencies' own warnings (e.g. "torchvision is not installed") are noise to a moedge user
        logging.getLogger(noisy).setLevel(logging.INFO if args.verbose else logging.ERROR)
    if args.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 ok, 1 failure (one clear line), 2 usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        _apply_data_dir(args)
        return func(args)
    except MoedgeError as exc:
        print(f"moedge: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("moedge: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            raise
        print(f"moedge: error: {type(exc).__name__}: {exc} (run with -v for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
