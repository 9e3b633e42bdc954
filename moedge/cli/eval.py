"""``moedge eval``: perplexity of a model (PyTorch), an exported folder or a bundle (ONNX Runtime)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moedge import inputs
from moedge._errors import MoedgeError
from moedge.cli.common import (
    EXIT_OK,
    POSITIVE,
    SEQLEN,
    CommandOptions,
    add_environment_flags,
    model_help,
    set_handler,
    warn_no_effect,
)

BACKENDS = ("auto", "torch", "ort")


@dataclass(frozen=True)
class EvalOptions(CommandOptions):
    """The flags of ``moedge eval`` (and the global ``-q``)."""

    model: str
    data: str
    seqlen: int
    max_windows: int | None
    backend: str
    threads: int | None
    json: Path | None
    recipe: Path | None
    tie_input_scales: bool
    cache_dir: Path | None
    quiet: bool


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``eval`` and its flags."""
    ev = sub.add_parser(
        "eval", help="perplexity of MODEL (PyTorch), an exported folder or a bundle (ONNX Runtime)"
    )
    ev.add_argument("model", metavar="MODEL", help=model_help() + ", an exported folder, or a bundle")
    ev.add_argument(
        "--data", default="wikitext2", help="wikitext2, ptb, c4, demo, or a text file (default wikitext2)"
    )
    ev.add_argument(
        "--seqlen",
        type=SEQLEN,
        default=512,
        help="window length in tokens (default 512; 2048 is the published standard)",
    )
    ev.add_argument("--max-windows", type=POSITIVE, help="evaluate only the first N windows")
    ev.add_argument("--backend", choices=BACKENDS, default="auto", help="auto: ort for an exported folder")
    ev.add_argument("--threads", type=inputs.threads, help="CPU threads (default: the runtime's own choice)")
    ev.add_argument("--json", type=Path, help="also write the result as JSON")
    ev.add_argument(
        "--recipe", type=Path, help="evaluate the fake-quant model of this recipe folder (PyTorch)"
    )
    ev.add_argument(
        "--tie-input-scales",
        action="store_true",
        help="with --recipe: q/k/v's and gate/up's activation scales tied, as moedge export "
        "--tie-input-scales exports them",
    )
    add_environment_flags(ev)
    set_handler(ev, EvalOptions, execute)


def execute(opts: EvalOptions) -> int:
    """Perplexity of MODEL (PyTorch), of an exported folder or of a bundle (ONNX Runtime)."""
    from moedge.datasets import load_text
    from moedge.evaluation import perplexity
    from moedge.formats.export_folder import is_exported_folder
    from moedge.formats.manifest import MANIFEST_FILE
    from moedge.paths import refuse_inside_bundle, write_text_atomic

    if opts.json is not None:
        refuse_inside_bundle(opts.json, flag="--json")
    text = load_text(opts.data)
    backend = opts.backend
    is_bundle = Path(opts.model).is_dir() and (Path(opts.model) / MANIFEST_FILE).is_file()
    if backend == "auto":
        backend = "ort" if is_exported_folder(opts.model) or is_bundle else "torch"
    if backend == "ort" and opts.recipe is not None:
        raise MoedgeError("--recipe evaluates the fake-quant PyTorch model: drop --backend ort or the recipe")
    if opts.tie_input_scales and opts.recipe is None:
        warn_no_effect(["--tie-input-scales"], "without --recipe")
    if backend == "ort" and is_bundle:
        score, ids, label = _bundle_scorer(opts, text.text)
    elif backend == "ort":
        score, ids, label = _exported_scorer(opts, text.text)
    else:
        score, ids, label = _torch_scorer(opts, text.text)
    result = perplexity(
        score,
        ids,
        seqlen=opts.seqlen,
        max_windows=opts.max_windows,
        dataset=text.name,
        backend=label,
        progress=not opts.quiet,
    )
    print(result.summary())
    if opts.json:
        record = {"model": str(opts.model), "text_origin": text.origin, **result.to_dict()}
        write_text_atomic(opts.json, json.dumps(record, indent=2) + "\n")
    return EXIT_OK


def _bundle_scorer(opts: EvalOptions, text: str) -> tuple[Any, Any, str]:
    """(scorer, token ids, backend label) of a bundle on ONNX Runtime."""
    import numpy as np

    from moedge.evaluation import ort_logits
    from moedge.loading import check_seqlen
    from moedge.runtime.bundle_runner import BundleRunner
    from moedge.tokenizer import load_tokenizer

    runner = BundleRunner(opts.model, intra_op_threads=opts.threads)
    check_seqlen(opts.seqlen, runner.manifest.model.get("max_position_embeddings"), str(opts.model))
    if runner.manifest.tokenizer is None:
        raise MoedgeError(
            f"{opts.model} carries no tokenizer: re-split it from an export with tokenizer.json"
        )
    tokenizer = load_tokenizer(Path(opts.model) / runner.manifest.tokenizer)
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    return ort_logits(runner), ids, f"bundle, onnxruntime cpu {runner.manifest.precision}"


def _exported_scorer(opts: EvalOptions, text: str) -> tuple[Any, Any, str]:
    """(scorer, token ids, backend label) of an exported folder on ONNX Runtime."""
    import numpy as np

    from moedge.evaluation import ort_logits
    from moedge.formats.export_folder import is_exported_folder
    from moedge.runtime.ort_causal_lm import OrtCausalLM
    from moedge.tokenizer import load_tokenizer

    if not is_exported_folder(opts.model):
        raise MoedgeError(
            f"{opts.model} is neither an exported folder nor a bundle: run moedge export first, "
            "or use --backend torch"
        )
    lm = OrtCausalLM(opts.model, intra_op_threads=opts.threads)
    tokenizer = load_tokenizer(lm.info.tokenizer_file)
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    return ort_logits(lm), ids, f"onnxruntime cpu {lm.info.raw.get('precision', 'fp32')}"


def _torch_scorer(opts: EvalOptions, text: str) -> tuple[Any, Any, str]:
    """(scorer, token ids, backend label) of the PyTorch model (fake-quant with --recipe)."""
    import numpy as np

    from moedge.evaluation import torch_logits
    from moedge.loading import check_seqlen, load_model

    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    loaded = load_model(opts.model, cache_dir=opts.cache_dir)
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    check_seqlen(opts.seqlen, context, loaded.name)  # before a long evaluation
    label = "pytorch fp32"
    if opts.recipe is not None:
        from moedge.calibration.recipe import apply_recipe
        from moedge.formats.recipe import load_recipe

        recipe = load_recipe(opts.recipe)
        if opts.tie_input_scales:
            from moedge.calibration.tie import tie_recipe_scales

            recipe = tie_recipe_scales(recipe)
        apply_recipe(loaded, recipe)
        label = f"pytorch fake-quant W8A8 ({recipe.method} recipe{', tied input scales' if opts.tie_input_scales else ''})"
    ids = np.asarray(loaded.encode(text), dtype=np.int64)
    return torch_logits(loaded.model), ids, label
