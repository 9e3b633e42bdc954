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
from moedge.calibration.calibrator import CalibrationResult
from moedge.calibration.layers import decoder_layers, head_modules, untie_head
from moedge.calibration.quant import FakeQuantLinear
from moedge.model import LoadedModel
from moedge.paths import atomic_folder, check_new_output

RECIPE_FORMAT = 1
RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "weights.safetensors"
ROUTING_FILE = "routing.json"
REPORT_FILE = "report.md"


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
) -> Path:
    """Write the calibrated model's recipe folder atomically (a temporary sibling renamed at the end)."""
    from safetensors.torch import save_file

    import moedge

    out = check_new_output(out_dir)
    with atomic_folder(out) as tmp:
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


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read a recipe folder's ``recipe.json`` (checking it is one and its format is known)."""
    folder = Path(path)
    meta_path = folder / RECIPE_FILE
    if not meta_path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise MoedgeError(
            f"{folder} is not a recipe folder (needs {RECIPE_FILE} and {WEIGHTS_FILE}): run `moedge calibrate`"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise MoedgeError(f"{meta_path} is not valid JSON ({exc})") from None
    version = meta.get("format_version")
    if version != RECIPE_FORMAT:
        raise MoedgeError(
            f"{meta_path} has format version {version}; this moedge reads version {RECIPE_FORMAT}"
        )
    return Recipe(folder, meta)


def apply_recipe(loaded: LoadedModel, recipe: Recipe | str | os.PathLike[str]) -> LoadedModel:
    """Turn ``loaded`` (the FP model the recipe was made from) into the recipe's fake-quant model, in place."""
    from safetensors.torch import load_file

    from moedge.export.configs import get_config
    from moedge.export.patchers import split_experts

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
    tensors = load_file(str(rec.path / WEIGHTS_FILE))
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
                            f"recipe {rec.path}: {key} has shape {tuple(tensors[key].shape)}, model has {tuple(p.shape)}"
                        )
                    p.copy_(tensors[key])
                    used.add(key)
    unused = sorted(set(tensors) - used)
    if unused:
        raise MoedgeError(f"recipe {rec.path} holds tensors this model has no place for, e.g. {unused[0]}")
    loaded.provenance["recipe"] = str(rec.path)
    return loaded
