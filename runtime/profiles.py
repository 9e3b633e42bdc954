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
from dataclasses import asdict, dataclass, field
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


def profile_from_dict(name: str, raw: dict[str, Any]) -> HardwareProfile:
    """A profile from its JSON form (fields with unit suffixes: ``_gbps``, ``_tops``, ``_gops``, ``_us``)."""
    fields: dict[str, Any] = {"name": name, "sources": list(raw.get("sources", []))}
    for key, value in raw.items():
        if key in ("sources", "estimates", "name"):
            continue
        for suffix, scale in _SCALE.items():
            if key.endswith(suffix):
                stem = key[: -len(suffix)]
                stem = {
                    "gpu_fp16": "gpu_fp16_ops",
                    "gpu_int8": "gpu_int8_ops",
                    "cpu_int8": "cpu_int8_ops",
                    "cpu_fp32": "cpu_fp32_ops",
                }.get(stem, stem)
                fields[stem] = None if value is None else float(value) * scale
                break
        else:
            fields[key] = value
    try:
        profile = HardwareProfile(**fields)
    except TypeError as exc:
        raise MoedgeError(
            f"hardware profile {name!r}: {exc}; see moedge/data/hardware_profiles.json"
        ) from None
    if profile.unified_memory and profile.resident_setup_bandwidth is None:
        raise MoedgeError(
            f"hardware profile {name!r}: a unified-memory device needs resident_setup_bandwidth_gbps"
        )
    if not profile.unified_memory and profile.h2d_bandwidth is None:
        raise MoedgeError(f"hardware profile {name!r}: a PCIe device needs h2d_bandwidth_gbps")
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
    path = Path(key)
    if not path.is_file():
        raise MoedgeError(
            f"unknown hardware profile {key!r}: use one of {', '.join(profile_names())} or a JSON file"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MoedgeError(
            f"{path} is not a hardware profile ({exc}); see moedge/data/hardware_profiles.json"
        ) from None
    return profile_from_dict(path.stem, raw)
