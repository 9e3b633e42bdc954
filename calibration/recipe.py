"""A calibrated model to its recipe folder and back: what calibration decided, rebuilt exactly.

The folder's format (file names, ``recipe.json`` fields, the checks on ``weights.safetensors``) is
``moedge.formats.recipe``; this module takes the tensors out of a fake-quant model (``save_recipe``)
and puts them back into the FP model it was made from (``apply_recipe``), which needs torch.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moedge._errors import MoedgeError
from moedge.calibration.layers import decoder_layers, head_modules, untie_head
from moedge.calibration.quant import FakeQuantLinear
from moedge.calibration.residual_rotation import residual_rotation_of, restore_residual_rotation
from moedge.calibration.result import CalibrationResult
from moedge.calibration.rotation import RESIDUAL_ROTATIONS, as_rotated, rotation_for
from moedge.formats.recipe import RECIPE_FILE, RECIPE_FILES, WEIGHTS_FILE, Recipe, load_recipe, write_recipe
from moedge.model import LoadedModel
from moedge.paths import OutputKind, atomic_folder, check_output_folder


def _recipe_files(folder: Path) -> tuple[str, ...] | None:
    """The files of a previous recipe in ``folder`` (it holds recipe.json)."""
    if not (folder / RECIPE_FILE).is_file():
        return None
    return RECIPE_FILES


RECIPE_KIND = OutputKind("moedge recipe", _recipe_files)
"""A recipe folder: ``--overwrite`` replaces one that holds only the files ``save_recipe`` writes."""


def _recipe_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(module name, module) of everything a recipe stores: each decoder layer, the final norm, lm_head."""
    names = {id(m): n for n, m in model.named_modules()}
    units = [(names[id(layer)], layer) for layer in decoder_layers(model)]
    try:
        norm_name, norm = head_modules(model)
    except MoedgeError:
        return units
    head: Any = model.lm_head
    return [*units, (norm_name, norm), ("lm_head", head)]


def model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies the model a recipe belongs to: type, shape and a hash of its embedding weights."""
    cfg: Any = getattr(model, "config", None)
    emb = model.get_input_embeddings().weight.detach().to(torch.float32).contiguous()  # type: ignore[operator]
    digest = hashlib.sha256(emb.numpy().tobytes()).hexdigest()[:16]
    return {
        "model_type": str(cfg.model_type),
        "num_layers": len(decoder_layers(model)),
        "hidden_size": int(cfg.hidden_size),
        "vocab_size": int(cfg.vocab_size),
        "embedding_sha256": digest,
    }


def save_recipe(
    loaded: LoadedModel,
    result: CalibrationResult,
    out_dir: str | os.PathLike[str],
    *,
    calibration_data: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the calibrated model's recipe folder atomically (a temporary sibling renamed at the end).

    ``out_dir`` must be missing or empty; with ``overwrite`` it may also be a previous recipe holding
    nothing else, which the new one replaces in one swap.
    """
    import moedge

    out = check_output_folder(out_dir, kind=RECIPE_KIND, overwrite=overwrite)
    with atomic_folder(out, kind=RECIPE_KIND, replace=overwrite) as tmp:
        tensors: dict[str, np.ndarray] = {}
        model = loaded.model
        for prefix, unit in _recipe_units(model):
            if prefix == "lm_head" and not isinstance(unit, FakeQuantLinear):
                continue  # an FP head is the model's own weight (often the embedding's): not stored
            for rel, module in unit.named_modules():
                full = f"{prefix}.{rel}" if rel else prefix
                if isinstance(module, FakeQuantLinear):
                    tensors[f"{full}.qweight"] = _array(module.qweight)
                    tensors[f"{full}.weight_scale"] = _array(module.weight_scale)
                    if module.bias is not None:
                        tensors[f"{full}.bias"] = _array(module.bias)
                    continue
                for pname, p in module.named_parameters(recurse=False):
                    tensors[f"{full}.{pname}"] = _array(p.detach().to(torch.float32))
        fingerprint = model_fingerprint(model)
        rotation = residual_rotation_of(model)
        if rotation is not None:  # the embedding is E Q now: the recipe names the original table
            fingerprint["embedding_sha256"] = rotation.embedding_sha256
        meta = {
            "moedge_version": moedge.__version__,
            "model": {"name": loaded.name, "source": loaded.source, **fingerprint},
            "residual_rotation": None if rotation is None else rotation.to_dict(),
            "quantization": {
                "weights": "int8, symmetric, per output channel, codes in [-127, 127]",
                "activations": "int8, static, symmetric, per tensor, zero point 0 (QuantizeLinear semantics)",
            },
            "calibration_data": calibration_data,
            **result.to_dict(),
            "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
        }
        write_recipe(tmp, meta, tensors, routing=result.routing, report=report_markdown(result))
    return out


def _array(tensor: torch.Tensor) -> np.ndarray:
    """An int8 or float32 tensor as numpy (what the recipe's safetensors file stores), without a copy."""
    return tensor.detach().contiguous().numpy()


def report_markdown(result: CalibrationResult) -> str:
    """The per-linear report as a markdown table (smoothing strength, clip, error, outlier ratios)."""
    cfg = result.config
    lines = [
        f"# Calibration report: {cfg.method}",
        "",
        f"{result.samples} sequences, {result.tokens:,} tokens, {result.seconds:.0f} s, "
        f"peak RSS {result.peak_rss_mb:.0f} MB. Kept in FP: {', '.join(result.kept_fp) or 'none'}. "
        f"Never quantized: {', '.join(sorted(set(result.excluded)))}.",
        "",
        "| linear | W8A8 | smoothing a | clip (x absmax) | input scale | rel. output error "
        "| outlier ratio before -> after | tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None or not math.isfinite(v) else format(v, fmt)

    for name, r in result.linears.items():
        lines.append(
            f"| {name} | {'yes' if r.quantized else 'FP'} | {num(r.alpha, 'g')} | {num(r.clip_ratio, '.3f')} "
            f"| {num(r.input_scale, '.4g')} | {num(r.rel_error, '.2e')} "
            f"| {num(r.outlier_ratio_before, '.1f')} -> {num(r.outlier_ratio_after, '.1f')} | {r.tokens:,} |"
        )
    return "\n".join(lines) + "\n"


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _prepare_model(loaded: LoadedModel, rec: Recipe) -> None:
    """Refuse a model the recipe was not made for; split its experts and rebuild a rotated residual
    stream's embedding and head, as calibration left them before its first layer."""
    from moedge.arch import get_config
    from moedge.arch.per_expert import split_experts

    want = rec.meta["model"]
    have = model_fingerprint(loaded.model)
    mismatch = [k for k, v in have.items() if want.get(k) != v]
    if mismatch:
        raise MoedgeError(
            f"recipe {rec.path} was made for {want.get('name')} ({want.get('model_type')}, "
            f"{want.get('num_layers')} layers); this model ({loaded.name}) differs in {', '.join(mismatch)}"
        )
    split_experts(loaded.model, get_config(loaded.model_type))
    _restore_rotation(loaded.model, rec)


def _restore_rotation(model: nn.Module, rec: Recipe) -> None:
    """Rebuild a rotated residual stream's embedding and head (``--rotate offline``/``full``) from the
    recipe's seed; the decoder layers and the final norm's weights then come from the recipe's tensors."""
    record = rec.meta.get("residual_rotation")
    rotate = rec.meta["config"].get("rotate")
    if record is None and rotate not in RESIDUAL_ROTATIONS:
        return
    if not isinstance(record, dict):
        raise MoedgeError(
            f"recipe {rec.path}: config.rotate is {rotate!r} but field residual_rotation is {record!r}: "
            "the recipe is damaged; re-run `moedge calibrate`"
        )
    restore_residual_rotation(
        model, record, embedding_sha256=str(rec.meta["model"]["embedding_sha256"]), where=str(rec.path)
    )


def apply_recipe(loaded: LoadedModel, recipe: Recipe | str | os.PathLike[str]) -> LoadedModel:
    """Turn ``loaded`` (the FP model the recipe was made from) into the recipe's fake-quant model, in place."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    model = loaded.model
    _prepare_model(loaded, rec)
    try:
        tensors = load_file(str(rec.path / WEIGHTS_FILE))
    except SafetensorError as exc:
        raise MoedgeError(
            f"{rec.path / WEIGHTS_FILE} is truncated or corrupt ({exc}): re-run `moedge calibrate`"
        ) from None
    used: set[str] = set()
    scales = {n: r["input_scale"] for n, r in rec.meta["linears"].items() if r["quantized"]}
    rotations = {n: r["input_rotation"] for n, r in rec.meta["linears"].items() if r.get("input_rotation")}
    if "lm_head.qweight" in tensors:
        untie_head(model)
    with torch.no_grad():
        for prefix, unit in _recipe_units(model):
            for rel, module in list(unit.named_modules()):
                full = f"{prefix}.{rel}" if rel else prefix
                if f"{full}.qweight" in tensors:
                    if full not in scales:
                        raise MoedgeError(
                            f"recipe {rec.path}: {full} has int8 weights but no activation scale"
                        )
                    weight = getattr(module, "weight", None)
                    rows_cols = list(tensors[f"{full}.qweight"].shape)
                    if weight is None or list(weight.shape) != rows_cols:
                        raise MoedgeError(
                            f"recipe {rec.path / WEIGHTS_FILE}: tensor {full}.qweight has shape {rows_cols}, "
                            f"the model's linear {full} has weight shape "
                            f"{list(weight.shape) if weight is not None else 'none'}: the recipe is another model's"
                        )
                    bias = tensors.get(f"{full}.bias")
                    rotation = rotation_for(rotations[full], rows_cols[1]) if full in rotations else None
                    fq = FakeQuantLinear(
                        tensors[f"{full}.qweight"],
                        tensors[f"{full}.weight_scale"],
                        bias,
                        scales[full],
                        rotation=rotation,
                    )
                    if rel:
                        unit.set_submodule(rel, fq)
                    else:  # the LM head is a unit of its own
                        model.set_submodule(prefix, fq)
                    used.update({f"{full}.qweight", f"{full}.weight_scale", f"{full}.bias"})
                    continue
                for pname, p in module.named_parameters(recurse=False):
                    key = f"{full}.{pname}"
                    if key not in tensors:
                        continue
                    if tensors[key].shape != p.shape:
                        raise MoedgeError(
                            f"recipe {rec.path / WEIGHTS_FILE}: tensor {key} has shape {list(tensors[key].shape)}, "
                            f"the model's has {list(p.shape)}: the recipe is another model's"
                        )
                    if tensors[key].is_floating_point() and not bool(torch.isfinite(tensors[key]).all()):
                        raise MoedgeError(
                            f"recipe {rec.path / WEIGHTS_FILE}: tensor {key} holds NaN or infinite values: "
                            "the recipe is damaged; re-run `moedge calibrate`"
                        )
                    p.copy_(tensors[key])
                    used.add(key)
                if full in rotations and full not in scales:  # an FP linear kept with its rotated weight
                    if not isinstance(module, nn.Linear):
                        raise MoedgeError(
                            f"recipe {rec.path}: {full} has an input rotation but is not a linear"
                        )
                    as_rotated(module, rotation_for(rotations[full], int(module.in_features)))
    unused = sorted(set(tensors) - used)
    if unused:
        raise MoedgeError(f"recipe {rec.path} holds tensors this model has no place for, e.g. {unused[0]}")
    loaded.provenance["recipe"] = str(rec.path)
    return loaded
