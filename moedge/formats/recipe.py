"""The recipe folder (``moedge calibrate`` output): its file names, format version, writer, reader and checks.

``recipe.json`` (method, settings, per-linear decisions and errors, smoothing strengths, layers kept
in FP, the model's fingerprint, versions), ``weights.safetensors`` (every tensor of every decoder
layer after calibration: int8 codes ``<linear>.qweight`` with per-row ``<linear>.weight_scale`` for
quantized linears, smoothed float32 tensors for the rest), ``report.md`` and, for MoE models,
``routing.json``. Written and checked with numpy and safetensors, without torch: the tensors are
int8 and float32, which numpy holds exactly, and the file is the same whichever framework wrote it.
Taking the tensors out of a calibrated model and putting them back into one (``save_recipe``,
``apply_recipe``) is torch work and stays in ``moedge.calibration``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moedge._errors import MoedgeError
from moedge.formats.routing import ROUTING_FILE

METHODS = ("rtn", "smoothquant", "gptq", "haq")
"""The calibration methods, as a recipe's ``config.method`` names them."""
RECIPE_FORMAT = 1
"""The ``format_version`` this moedge writes, and the only one it reads."""
RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "weights.safetensors"
REPORT_FILE = "report.md"
RECIPE_FILES = (RECIPE_FILE, WEIGHTS_FILE, ROUTING_FILE, REPORT_FILE)
"""Every file a recipe folder holds (``routing.json`` only for MoE models)."""


@dataclass(frozen=True)
class Recipe:
    """A loaded recipe folder."""

    path: Path
    meta: dict[str, Any]

    @property
    def method(self) -> str:
        """Calibration method that made it."""
        return str(self.meta["config"]["method"])


def write_recipe(
    folder: Path,
    meta: dict[str, Any],
    tensors: Mapping[str, np.ndarray],
    *,
    routing: dict[str, Any] | None,
    report: str,
) -> None:
    """Write a recipe's files into ``folder`` (the caller's temporary folder, renamed when complete).

    ``meta`` is ``recipe.json`` without ``format_version`` (added first); NaN and infinities in it
    become null so the file stays strict JSON. ``tensors`` are the int8 and float32 arrays of
    ``weights.safetensors``; ``routing`` is the ``routing.json`` document, when the model has experts.
    """
    from safetensors.numpy import save_file

    save_file(dict(tensors), str(folder / WEIGHTS_FILE))
    document = {"format_version": RECIPE_FORMAT, **meta}
    (folder / RECIPE_FILE).write_text(json.dumps(_finite(document), indent=1) + "\n")
    if routing is not None:
        (folder / ROUTING_FILE).write_text(json.dumps(routing, indent=1) + "\n")
    (folder / REPORT_FILE).write_text(report)


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
    check_recipe_meta(meta, str(meta_path))
    weights = folder / WEIGHTS_FILE
    check_input_file(weights, "recipe weights", limit=2**62)  # a regular file; its size is the model's
    check_recipe_weights(weights, meta["linears"])
    return Recipe(folder, meta)


_MODEL_FIELDS = {
    "model_type": str,
    "num_layers": int,
    "hidden_size": int,
    "vocab_size": int,
    "embedding_sha256": str,
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_recipe_meta(meta: Any, where: str) -> None:
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


_SCALE_DTYPES = ("F16", "F32", "F64")  # float types numpy reads; the writer stores F32


def check_recipe_weights(path: Path, linears: dict[str, Any]) -> None:
    """The safetensors header, the int8 linears' tensors (dtypes and shapes) and every weight scale."""
    from safetensors import SafetensorError, safe_open

    quantized = {name for name, rec in linears.items() if rec["quantized"]}
    try:
        with safe_open(str(path), framework="numpy") as f:
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
                if shapes[scale_key][0] not in _SCALE_DTYPES:
                    raise MoedgeError(
                        f"{path}: tensor {scale_key} is {shapes[scale_key][0]}, not float32: "
                        "the recipe is damaged; re-run `moedge calibrate`"
                    )
                bias = shapes.get(f"{name}.bias")
                if bias is not None and bias[1] != shape[:1]:
                    raise MoedgeError(
                        f"{path}: tensor {name}.bias has shape {bias[1]}, the weights {key} have "
                        f"{shape[0]} rows: it needs shape [{shape[0]}]"
                    )
                _check_scale(path, scale_key, np.asarray(f.get_tensor(scale_key), dtype=np.float32))
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


def _check_scale(path: Path, key: str, scale: np.ndarray) -> None:
    """Every row of a weight scale finite and > 0."""
    bad = ~(np.isfinite(scale) & (scale > 0))
    if bool(bad.any()):
        row = int(np.flatnonzero(bad)[0])
        raise MoedgeError(
            f"{path}: tensor {key} row {row} is {float(scale[row])}, not a finite scale > 0: "
            "the recipe is damaged; re-run `moedge calibrate`"
        )
