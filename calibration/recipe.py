"""The recipe folder: what calibration decided, in a form that rebuilds the fake-quant model exactly.

``recipe.json`` (method, settings, per-linear decisions and errors, smoothing strengths, layers kept
in FP, the model's fingerprint, versions), ``weights.safetensors`` (every tensor of every decoder
layer after calibration: int8 codes ``<linear>.qweight`` with per-row ``<linear>.weight_scale`` for
quantized linears, smoothed float tensors for the rest) and, for MoE models, ``routing.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moedge._errors import MoedgeError
from moedge.calibration.config import METHODS
from moedge.calibration.layers import decoder_layers, head_modules, untie_head
from moedge.calibration.quant import FakeQuantLinear
from moedge.calibration.result import CalibrationResult
from moedge.model import LoadedModel
from moedge.paths import OutputKind, atomic_folder, check_output_folder

RECIPE_FORMAT = 1
RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "weights.safetensors"
ROUTING_FILE = "routing.json"
REPORT_FILE = "report.md"


def _recipe_files(folder: Path) -> tuple[str, ...] | None:
    """The files of a previous recipe in ``folder`` (it holds recipe.json)."""
    if not (folder / RECIPE_FILE).is_file():
        return None
    return (RECIPE_FILE, WEIGHTS_FILE, ROUTING_FILE, REPORT_FILE)


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


@dataclass(frozen=True)
class Recipe:
    """A loaded recipe folder."""

    path: Path
    meta: dict[str, Any]

    @property
    def method(self) -> str:
        """Calibration method that made it."""
        return str(self.meta["config"]["method"])


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
    from safetensors.torch import save_file

    import moedge

    out = check_output_folder(out_dir, kind=RECIPE_KIND, overwrite=overwrite)
    with atomic_folder(out, kind=RECIPE_KIND, replace=overwrite) as tmp:
        tensors: dict[str, torch.Tensor] = {}
        model = loaded.model
        for prefix, unit in _recipe_units(model):
            if prefix == "lm_head" and not isinstance(unit, FakeQuantLinear):
                continue  # an FP head is the model's own weight (often the embedding's): not stored
            for rel, module in unit.named_modules():
                full = f"{prefix}.{rel}" if rel else prefix
                if isinstance(module, FakeQuantLinear):
                    tensors[f"{full}.qweight"] = module.qweight.contiguous().clone()
                    tensors[f"{full}.weight_scale"] = module.weight_scale.contiguous().clone()
                    if module.bias is not None:
                        tensors[f"{full}.bias"] = module.bias.contiguous().clone()
                    continue
                for pname, p in module.named_parameters(recurse=False):
                    tensors[f"{full}.{pname}"] = p.detach().to(torch.float32).contiguous().clone()
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        meta = {
            "format_version": RECIPE_FORMAT,
            "moedge_version": moedge.__version__,
            "model": {"name": loaded.name, "source": loaded.source, **model_fingerprint(model)},
            "quantization": {
                "weights": "int8, symmetric, per output channel, codes in [-127, 127]",
                "activations": "int8, static, symmetric, per tensor, zero point 0 (QuantizeLinear semantics)",
            },
            "calibration_data": calibration_data,
            **result.to_dict(),
            "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
        }
        (tmp / RECIPE_FILE).write_text(json.dumps(_finite(meta), indent=1) + "\n")
        if result.routing is not None:
            (tmp / ROUTING_FILE).write_text(json.dumps(result.routing, indent=1) + "\n")
        (tmp / REPORT_FILE).write_text(report_markdown(result))
    return out


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


def _finite(obj: Any) -> Any:
    """NaN/Inf become null so the file stays strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


_MODEL_FIELDS = {
    "model_type": str,
    "num_layers": int,
    "hidden_size": int,
    "vocab_size": int,
    "embedding_sha256": str,
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_meta(meta: Any, where: str) -> None:
    """One clear line naming ``where`` and the field for a recipe.json that is not a recipe's."""
    if not isinstance(meta, dict):
        raise MoedgeError(f"{where} is not a recipe (a JSON object): run `moedge calibrate`")
    version = meta.get("format_version")
    if version != RECIPE_FORMAT:
        raise MoedgeError(f"{where} has format version {version}; this moedge reads version {RECIPE_FORMAT}")
    model = meta.get("model")
    if not isinstance(model, dict):
        raise MoedgeError(f"{where}: field model is missing or not an object: re-run `moedge calibrate`")
    for key, kind in _MODEL_FIELDS.items():
        value: Any = model.get(key)
        if kind is str:
            ok = isinstance(value, str)
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        if not ok:
            want = "a positive integer" if kind is int else "a string"
            raise MoedgeError(f"{where}: field model.{key} must be {want}, got {value!r}")
    config = meta.get("config")
    if not isinstance(config, dict) or config.get("method") not in METHODS:
        got = config.get("method") if isinstance(config, dict) else config
        raise MoedgeError(f"{where}: field config.method must be one of {', '.join(METHODS)}, got {got!r}")
    linears = meta.get("linears")
    if not isinstance(linears, dict):
        raise MoedgeError(f"{where}: field linears is missing or not an object: re-run `moedge calibrate`")
    for name, rec in linears.items():
        field = f"linears[{name!r}]"
        if not isinstance(rec, dict) or not isinstance(rec.get("quantized"), bool):
            raise MoedgeError(f"{where}: field {field}.quantized must be true or false")
        if not rec["quantized"]:
            continue
        scale: Any = rec.get("input_scale")
        if not _is_number(scale) or not math.isfinite(scale) or scale <= 0:
            raise MoedgeError(
                f"{where}: field {field}.input_scale must be a finite number > 0, got {scale!r}: "
                "the recipe is damaged; re-run `moedge calibrate`"
            )
    kept = meta.get("kept_fp", [])
    if not isinstance(kept, list) or not all(isinstance(k, str) for k in kept):
        raise MoedgeError(f"{where}: field kept_fp must be a list of linear names")


def _check_weights(path: Path, linears: dict[str, Any]) -> None:
    """The safetensors header, the int8 linears' tensors (dtypes and shapes) and every weight scale."""
    from safetensors import SafetensorError, safe_open

    quantized = {name for name, rec in linears.items() if rec["quantized"]}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            shapes = {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in keys}
            for key in sorted(keys):
                if not key.endswith(".qweight"):
                    continue
                name = key[: -len(".qweight")]
                dtype, shape = shapes[key]
                if dtype != "I8" or len(shape) != 2:
                    raise MoedgeError(f"{path}: tensor {key} must be 2-D int8, is {dtype} {shape}")
                if name not in quantized:
                    raise MoedgeError(
                        f"{path}: tensor {key} has int8 weights, but recipe.json does not list {name} as "
                        "quantized (field linears): the two files are from different recipes"
                    )
                scale_key = f"{name}.weight_scale"
                if scale_key not in keys:
                    raise MoedgeError(f"{path}: tensor {scale_key} is missing for the int8 weights {key}")
                if shapes[scale_key][1] != shape[:1]:
                    raise MoedgeError(
                        f"{path}: tensor {scale_key} has shape {shapes[scale_key][1]}, the weights {key} "
                        f"have {shape[0]} rows: it needs shape [{shape[0]}]"
                    )
                bias = shapes.get(f"{name}.bias")
                if bias is not None and bias[1] != shape[:1]:
                    raise MoedgeError(
                        f"{path}: tensor {name}.bias has shape {bias[1]}, the weights {key} have "
                        f"{shape[0]} rows: it needs shape [{shape[0]}]"
                    )
                scale = f.get_tensor(scale_key).to(torch.float32)
                bad = ~(torch.isfinite(scale) & (scale > 0))
                if bool(bad.any()):
                    row = int(bad.nonzero()[0, 0])
                    raise MoedgeError(
                        f"{path}: tensor {scale_key} row {row} is {float(scale[row])}, not a finite scale > 0: "
                        "the recipe is damaged; re-run `moedge calibrate`"
                    )
    except SafetensorError as exc:
        raise MoedgeError(
            f"{path} is truncated or corrupt ({exc}): re-run `moedge calibrate` to write the recipe again"
        ) from None
    missing = sorted(n for n in quantized if f"{n}.qweight" not in keys)
    if missing:
        raise MoedgeError(
            f"{path}: recipe.json lists {missing[0]} as quantized (field linears) but its int8 weights "
            f"{missing[0]}.qweight are missing"
        )


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and check a recipe folder: ``recipe.json``'s fields and the int8 tensors of ``weights.safetensors``.

    Refused with one line naming the file and the field: a wrong format version, a missing or mistyped
    field, an activation or weight scale that is not finite and positive (NaN, 0, negative, inf), int8
    weights without their scale or with a scale of the wrong shape, and a truncated or corrupt weights file.
    """
    from moedge.inputs import check_input_file, read_input_json

    folder = Path(path).expanduser()
    meta_path = folder / RECIPE_FILE
    if not folder.is_dir() or not meta_path.exists() or not (folder / WEIGHTS_FILE).exists():
        raise MoedgeError(
            f"{folder} is not a recipe folder (needs {RECIPE_FILE} and {WEIGHTS_FILE}): run `moedge calibrate`"
        )
    meta = read_input_json(meta_path, "recipe")
    _check_meta(meta, str(meta_path))
    weights = folder / WEIGHTS_FILE
    check_input_file(weights, "recipe weights", limit=2**62)  # a regular file; its size is the model's
    _check_weights(weights, meta["linears"])
    return Recipe(folder, meta)


def apply_recipe(loaded: LoadedModel, recipe: Recipe | str | os.PathLike[str]) -> LoadedModel:
    """Turn ``loaded`` (the FP model the recipe was made from) into the recipe's fake-quant model, in place."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from moedge.arch import get_config
    from moedge.arch.per_expert import split_experts

    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    model = loaded.model
    want = rec.meta["model"]
    have = model_fingerprint(model)
    mismatch = [k for k, v in have.items() if want.get(k) != v]
    if mismatch:
        raise MoedgeError(
            f"recipe {rec.path} was made for {want.get('name')} ({want.get('model_type')}, "
            f"{want.get('num_layers')} layers); this model ({loaded.name}) differs in {', '.join(mismatch)}"
        )
    split_experts(model, get_config(loaded.model_type))
    try:
        tensors = load_file(str(rec.path / WEIGHTS_FILE))
    except SafetensorError as exc:
        raise MoedgeError(
            f"{rec.path / WEIGHTS_FILE} is truncated or corrupt ({exc}): re-run `moedge calibrate`"
        ) from None
    used: set[str] = set()
    scales = {n: r["input_scale"] for n, r in rec.meta["linears"].items() if r["quantized"]}
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
                    fq = FakeQuantLinear(
                        tensors[f"{full}.qweight"], tensors[f"{full}.weight_scale"], bias, scales[full]
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
    unused = sorted(set(tensors) - used)
    if unused:
        raise MoedgeError(f"recipe {rec.path} holds tensors this model has no place for, e.g. {unused[0]}")
    loaded.provenance["recipe"] = str(rec.path)
    return loaded
