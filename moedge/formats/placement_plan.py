"""The placement plan file (``moedge profile --plan``): its writer, reader and checks.

A plan names the experts a ``static`` or ``haq`` policy keeps on the GPU for good, as ``[layer,
expert]`` pairs, with the budget and the policy settings they were tuned with and where the routing
statistics came from. The plans themselves are made by ``moedge.runtime.placement``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from moedge._errors import MoedgeError
from moedge.formats.manifest import Manifest

PLAN_FORMAT = "moedge-placement"
PLAN_VERSION = 1


def write_plan(
    path: str | Path,
    experts: list[tuple[int, int]],
    *,
    budget: int,
    policy: str,
    settings: dict[str, Any],
    source: dict[str, Any],
) -> None:
    """Write a placement plan file: the pinned experts and the policy settings they were tuned with."""
    doc = {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "policy": policy,
        "budget_bytes": int(budget),
        "settings": settings,
        "experts": [list(k) for k in experts],
        "source": source,
    }
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


# settings a plan may carry, with a check of each value (what the haq tuner writes)
_SETTINGS: dict[str, tuple[str, Any]] = {
    "static_fraction": ("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1),
    "prefetch": ("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "prefetch_share": ("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1),
    "path_fraction": ("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1),
    "topup": ("balanced or popular", lambda v: v in ("balanced", "popular")),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def bundle_experts(manifest: Manifest) -> dict[int, int]:
    """Routed experts per MoE layer of a bundle manifest: {layer index: number of experts}."""
    return {layer.index: layer.moe.num_experts for layer in manifest.layers if layer.moe is not None}


def check_experts(
    experts: Iterable[tuple[int, int]], bundle: Mapping[int, int], where: str, *, what: str = "entry"
) -> None:
    """Raise one clear line for the first (layer, expert) that is not a routed expert of the bundle."""
    seen: set[tuple[int, int]] = set()
    for i, (layer, e) in enumerate(experts):
        if layer not in bundle:
            moe = ", ".join(map(str, sorted(bundle))) or "none"
            raise MoedgeError(
                f"{where}: {what} {i} names expert [{layer}, {e}], but layer {layer} is not an MoE layer "
                f"of the bundle (MoE layers: {moe}): was it made for another bundle?"
            )
        if not 0 <= e < bundle[layer]:
            raise MoedgeError(
                f"{where}: {what} {i} names expert [{layer}, {e}], but layer {layer} has experts "
                f"0-{bundle[layer] - 1}: was it made for another bundle?"
            )
        if (layer, e) in seen:
            raise MoedgeError(f"{where}: {what} {i} names expert [{layer}, {e}] a second time")
        seen.add((layer, e))


def read_plan_file(
    path: str | Path, *, experts: Mapping[int, int] | None = None
) -> tuple[list[tuple[int, int]], dict[str, Any]]:
    """The experts a plan file pins and its policy settings; one clear error for a file that is not a plan.

    The file is read only when it is a regular file of at most 64 MiB; its format, version, experts and
    settings are checked, and with ``experts`` (``bundle_experts`` of the bundle it is for) every pinned
    expert must be one of the bundle's.
    """
    from moedge.inputs import read_input_json

    file = Path(path)
    doc = read_input_json(file, "placement plan")
    where = f"placement plan {file}"
    if not isinstance(doc, dict) or doc.get("format") != PLAN_FORMAT:
        raise MoedgeError(f"{file} is not a moedge placement plan: write one with `moedge profile --plan`")
    version = doc.get("version", PLAN_VERSION)
    if version != PLAN_VERSION:
        raise MoedgeError(f"{where}: version {version!r} is not one this moedge reads ({PLAN_VERSION})")
    raw = doc.get("experts")
    if not isinstance(raw, list):
        raise MoedgeError(f"{where}: field experts must be a list of [layer, expert] pairs")
    pinned: list[tuple[int, int]] = []
    for i, pair in enumerate(raw):
        if not (isinstance(pair, list) and len(pair) == 2 and all(_is_index(x) for x in pair)):
            raise MoedgeError(
                f"{where}: experts entry {i} is {json.dumps(pair)[:60]}, not a [layer, expert] pair of "
                "integers >= 0"
            )
        pinned.append((int(pair[0]), int(pair[1])))
    budget = doc.get("budget_bytes")
    if budget is not None and not _is_index(budget):
        raise MoedgeError(f"{where}: field budget_bytes must be an integer >= 0, got {budget!r}")
    settings = doc.get("settings", {})
    if not isinstance(settings, dict):
        raise MoedgeError(f"{where}: field settings must be an object")
    for key, value in settings.items():
        if key not in _SETTINGS:
            raise MoedgeError(f"{where}: unknown setting {key!r} (known: {', '.join(_SETTINGS)})")
        want, ok = _SETTINGS[key]
        if not ok(value):
            raise MoedgeError(f"{where}: setting {key} must be {want}, got {json.dumps(value)[:40]}")
    if experts is not None:
        check_experts(pinned, experts, where, what="experts entry")
    return pinned, dict(settings)
