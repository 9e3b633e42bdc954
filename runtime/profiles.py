"""Hardware profiles: what a device's memory, links and compute cost, for the modeled GPU and the predictor.

Every figure a profile gives is a modeled input, labelled as such wherever it is reported. The
built-in profiles (``moedge/data/hardware_profiles.json``) cite a source or state an estimate for
every figure; a user's own profile is a JSON file with the same fields (``--profile my_board.json``).

Cost model (a roofline per call): a graph of ``params`` weights stored in ``weight_bytes`` runs on a
processor in ``call_overhead + max(weight_bytes / memory_bandwidth, 2 * params * tokens / ops_rate)``.
A transfer to the GPU costs ``latency + bytes / host_to_device_bandwidth``; on a unified-memory device
nothing crosses PCIe: making an expert resident costs its setup (a device-side copy into GPU-allocated
memory plus a fixed cost), and CPU and GPU share one memory bandwidth.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from importlib.resources import files
from pathlib import Path
from typing import Any

from moedge._errors import MoedgeError


@dataclass(frozen=True)
class HardwareProfile:
    """One device: memory, link and compute figures (SI units: bytes/s, ops/s, seconds)."""

    name: str
    description: str
    unified_memory: bool
    device_memory_bytes: int
    gpu_mem_bandwidth: float
    gpu_int8_ops: float
    gpu_fp16_ops: float
    gpu_call_overhead: float
    cpu_mem_bandwidth: float
    cpu_int8_ops: float
    cpu_fp32_ops: float
    cpu_call_overhead: float
    h2d_bandwidth: float | None = None  # PCIe devices
    transfer_latency: float = 0.0
    resident_setup_bandwidth: float | None = None  # unified-memory devices
    resident_setup_fixed: float = 0.0
    shared_memory_bandwidth: float | None = None  # unified: what CPU and GPU share
    sources: list[dict[str, str]] = field(default_factory=list)

    def gpu_time(self, weight_bytes: float, params: float, tokens: int, *, int8: bool = True) -> float:
        """Seconds for one GPU call of a graph with these weights over ``tokens`` tokens."""
        rate = self.gpu_int8_ops if int8 else self.gpu_fp16_ops
        return self.gpu_call_overhead + max(
            weight_bytes / self.gpu_mem_bandwidth, 2.0 * params * tokens / rate
        )

    def cpu_time(self, weight_bytes: float, params: float, tokens: int, *, int8: bool = True) -> float:
        """Seconds for one CPU call (ORT) of a graph with these weights over ``tokens`` tokens."""
        rate = self.cpu_int8_ops if int8 else self.cpu_fp32_ops
        return self.cpu_call_overhead + max(
            weight_bytes / self.cpu_mem_bandwidth, 2.0 * params * tokens / rate
        )

    def transfer_time(self, nbytes: float) -> float:
        """Seconds to make ``nbytes`` of weights resident for the GPU (PCIe copy or unified-memory setup)."""
        if self.unified_memory:
            assert self.resident_setup_bandwidth is not None
            return self.resident_setup_fixed + nbytes / self.resident_setup_bandwidth
        assert self.h2d_bandwidth is not None
        return self.transfer_latency + nbytes / self.h2d_bandwidth

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return asdict(self)


_SCALE = {"_gbps": 1e9, "_tops": 1e12, "_gops": 1e9, "_us": 1e-6}
_STEMS = {
    "gpu_fp16": "gpu_fp16_ops",
    "gpu_int8": "gpu_int8_ops",
    "cpu_int8": "cpu_int8_ops",
    "cpu_fp32": "cpu_fp32_ops",
}
# field -> (must be > 0 rather than >= 0, may be null)
_NUMBERS: dict[str, tuple[bool, bool]] = {
    "gpu_mem_bandwidth": (True, False),
    "gpu_int8_ops": (True, False),
    "gpu_fp16_ops": (True, False),
    "cpu_mem_bandwidth": (True, False),
    "cpu_int8_ops": (True, False),
    "cpu_fp32_ops": (True, False),
    "gpu_call_overhead": (False, False),
    "cpu_call_overhead": (False, False),
    "transfer_latency": (False, False),
    "resident_setup_fixed": (False, False),
    "h2d_bandwidth": (True, True),
    "resident_setup_bandwidth": (True, True),
    "shared_memory_bandwidth": (True, True),
}


# how the built-in profiles spell the fields that carry a unit
_JSON_NAMES = {
    "gpu_mem_bandwidth": "gpu_mem_bandwidth_gbps",
    "gpu_int8_ops": "gpu_int8_tops",
    "gpu_fp16_ops": "gpu_fp16_tops",
    "gpu_call_overhead": "gpu_call_overhead_us",
    "cpu_mem_bandwidth": "cpu_mem_bandwidth_gbps",
    "cpu_int8_ops": "cpu_int8_gops",
    "cpu_fp32_ops": "cpu_fp32_gops",
    "cpu_call_overhead": "cpu_call_overhead_us",
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def profile_from_dict(name: str, raw: dict[str, Any], *, where: str | None = None) -> HardwareProfile:
    """A profile from its JSON form (fields with unit suffixes: ``_gbps``, ``_tops``, ``_gops``, ``_us``).

    Every field is checked (types, finite and positive figures); an error names ``where`` (the file, or
    the profile's name) and the JSON field.
    """
    where = where or f"hardware profile {name!r}"
    hint = "see moedge/data/hardware_profiles.json"
    if not isinstance(raw, dict):
        raise MoedgeError(f"{where}: not a JSON object of profile fields; {hint}")
    sources = raw.get("sources", [])
    if not isinstance(sources, list):
        raise MoedgeError(f"{where}: field sources must be a list")
    fields: dict[str, Any] = {"name": name, "sources": list(sources)}
    keys: dict[str, str] = {}  # dataclass field -> the JSON key it came from
    known = {f.name for f in dataclass_fields(HardwareProfile)}
    for key, value in raw.items():
        if key in ("sources", "estimates", "name") or key.startswith("_"):
            continue
        stem = key
        suffix = next((s for s in _SCALE if key.endswith(s)), None)
        if suffix is not None:
            stem = _STEMS.get(key[: -len(suffix)], key[: -len(suffix)])
        if stem not in known or stem in ("name", "sources"):
            raise MoedgeError(f"{where}: unknown field {key!r}; {hint}")
        keys[stem] = key
        if stem in _NUMBERS:
            positive, nullable = _NUMBERS[stem]
            if value is None and nullable:
                fields[stem] = None
                continue
            if not _is_number(value) or value < 0 or (positive and value == 0):
                want = "a finite number > 0" if positive else "a finite number >= 0"
                raise MoedgeError(f"{where}: field {key} must be {want}, got {json.dumps(value)[:40]}")
            fields[stem] = float(value) * (_SCALE[suffix] if suffix else 1.0)
        else:
            fields[stem] = value
    missing = [
        f.name
        for f in dataclass_fields(HardwareProfile)
        if f.name not in fields and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        raise MoedgeError(f"{where}: field {_JSON_NAMES.get(missing[0], missing[0])} is missing; {hint}")
    if not isinstance(fields["description"], str):
        raise MoedgeError(f"{where}: field description must be a string")
    if not isinstance(fields["unified_memory"], bool):
        raise MoedgeError(f"{where}: field unified_memory must be true or false")
    memory = fields["device_memory_bytes"]
    if not isinstance(memory, int) or isinstance(memory, bool) or memory <= 0:
        raise MoedgeError(f"{where}: field device_memory_bytes must be an integer > 0, got {memory!r}")
    profile = HardwareProfile(**fields)
    if profile.unified_memory and profile.resident_setup_bandwidth is None:
        raise MoedgeError(f"{where}: a unified-memory device needs resident_setup_bandwidth_gbps")
    if not profile.unified_memory and profile.h2d_bandwidth is None:
        raise MoedgeError(f"{where}: a PCIe device needs h2d_bandwidth_gbps")
    return profile


def _builtin() -> dict[str, HardwareProfile]:
    raw = json.loads(files("moedge").joinpath("data/hardware_profiles.json").read_text())
    return {name: profile_from_dict(name, p) for name, p in raw["profiles"].items()}


BUILTIN: dict[str, HardwareProfile] = _builtin()


def profile_names() -> list[str]:
    """Names of the built-in profiles."""
    return sorted(BUILTIN)


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """A built-in profile by name, or one from a JSON file with the same fields."""
    key = str(name_or_path)
    if key in BUILTIN:
        return BUILTIN[key]
    from moedge.inputs import read_input_json

    path = Path(key).expanduser()
    if not path.exists():
        raise MoedgeError(
            f"unknown hardware profile {key!r}: use one of {', '.join(profile_names())} or a JSON file"
        )
    raw = read_input_json(path, "hardware profile")
    return profile_from_dict(path.stem, raw, where=f"hardware profile {path}")
