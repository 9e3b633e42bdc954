"""The measured hardware profile: the torch-cuda (and ort-cpu) figures as one profile of
``moedge/data/hardware_profiles.json``, checked by the loader the runtime uses.

The profile has every field of a built-in profile, in the same units. A field nothing here measures takes
the value of the nearest built-in profile (same memory kind, closest device memory bandwidth) and is listed
under ``estimates``, as the built-in profiles list their unmeasured fields; ``sources`` says how each field
was measured or where it came from. The report also compares one expert's measured GPU time with what each
profile's cost model predicts for it, so a simulated profile can be checked against the real device.
"""

from __future__ import annotations

import json
import math
import re
from importlib.resources import files
from typing import Any

from moedge.doctor.common import HIDDEN, INTER, PROMPT, one_line, source_module

DOCTOR = "moedge doctor --gpu"
# JSON field -> (torch-cuda figure, how it is measured), for either kind of memory
_GPU = {
    "gpu_mem_bandwidth_gbps": (
        "device_copy_gbps",
        "torch device-to-device copy of 256 MiB, bytes read + written",
    ),
    "gpu_fp16_tops": ("fp16_matmul_tops", "torch FP16 matmul 4096 x 4096 x 4096"),
    "gpu_int8_tops": ("int8_matmul_tops", "torch._int_mm INT8 4096 x 4096 x 4096"),
    "gpu_call_overhead_us": ("launch_sync_us", "one tiny kernel launch + torch.cuda.synchronize"),
    "cpu_mem_bandwidth_gbps": ("cpu_copy_gbps", "torch CPU copy of 128 MiB, bytes read + written"),
    "cpu_fp32_gops": ("cpu_fp32_gops", "torch CPU FP32 matmul 1024 x 1024 x 1024, all cores"),
    "cpu_int8_gops": ("cpu_int8_gops", "torch._int_mm on the CPU, 1024 x 1024 x 1024"),
}
_PCIE = {
    "h2d_bandwidth_gbps": ("h2d_pinned_gbps", "torch pinned host-to-device copy of 64 MiB"),
    "transfer_latency_us": ("copy_4kib_us", "torch pinned host-to-device copy of 4 KiB"),
}
_UNIFIED = {
    "resident_setup_bandwidth_gbps": ("h2d_pinned_gbps", "torch copy of 64 MiB into GPU-allocated memory"),
    "resident_setup_fixed_us": ("copy_4kib_us", "torch copy of 4 KiB into GPU-allocated memory"),
    "shared_memory_bandwidth_gbps": ("device_copy_gbps", "torch device-to-device copy of 256 MiB"),
}
# the other memory kind's fields: not applicable to this device
_OTHER: dict[bool, dict[str, float | None]] = {
    True: {"h2d_bandwidth_gbps": None, "transfer_latency_us": 0.0},
    False: {
        "resident_setup_bandwidth_gbps": None,
        "resident_setup_fixed_us": 0.0,
        "shared_memory_bandwidth_gbps": None,
    },
}
_ORT = {  # from the ort-cpu item, when it ran: what the runtime's CPU calls really cost
    "cpu_int8_gops": (
        "w8a8_gops",
        f"ONNX Runtime CPU, the W8A8 expert at {PROMPT} tokens, call overhead taken off",
    ),
    "cpu_call_overhead_us": ("call_overhead_us", "ONNX Runtime CPU, one call of an Identity graph"),
}


def builtin_profiles() -> dict[str, dict[str, Any]]:
    """The built-in profiles as JSON (fields with their unit suffixes)."""
    raw = json.loads(files("moedge").joinpath("data/hardware_profiles.json").read_text())
    return dict(raw["profiles"])


def nearest_builtin(unified: bool, gbps: float, builtin: dict[str, dict[str, Any]]) -> str:
    """The built-in profile with the same memory kind and the closest device memory bandwidth (log scale)."""
    same = [n for n, p in builtin.items() if bool(p["unified_memory"]) == unified] or list(builtin)
    return min(same, key=lambda n: abs(math.log(float(builtin[n]["gpu_mem_bandwidth_gbps"]) / gbps)))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def _measured(torch_f: dict[str, Any], cpu_f: dict[str, Any] | None) -> dict[str, tuple[float, str]]:
    """JSON field -> (value, how it was measured), for the fields the figures give."""
    unified = bool(torch_f["integrated"])
    table = {**_GPU, **(_UNIFIED if unified else _PCIE)}
    out = {k: (torch_f[f], how) for k, (f, how) in table.items() if torch_f.get(f) is not None}
    for key, (f, how) in _ORT.items():
        if cpu_f is not None and cpu_f.get(f) is not None:
            out[key] = (cpu_f[f], how)
    return out


def assemble(torch_f: dict[str, Any], cpu_f: dict[str, Any] | None) -> dict[str, Any]:
    """The profile (JSON form) from the torch-cuda figures and, when it ran, the ort-cpu figures."""
    builtin = builtin_profiles()
    unified = bool(torch_f["integrated"])
    measured = _measured(torch_f, cpu_f)
    nearest = nearest_builtin(unified, float(torch_f["device_copy_gbps"]), builtin)
    base = builtin[nearest]
    profile: dict[str, Any] = {
        "description": f"{torch_f['device']} (compute capability {torch_f['compute_capability']}), measured "
        f"by {DOCTOR} with torch {torch_f['torch']} (CUDA {torch_f['cuda']}); fields under 'estimates' are "
        f"the built-in profile {nearest}'s",
        "unified_memory": unified,
        "device_memory_bytes": int(torch_f["total_memory_bytes"]),
    }
    estimates: list[str] = []
    sources = []
    for key, value in base.items():
        if key in profile or key in ("estimates", "sources") or key.startswith("_"):
            continue
        if key in measured:
            profile[key], how = measured[key]
            sources.append({"field": key, "url": DOCTOR, "note": f"measured: {how}"})
        elif key in _OTHER[unified]:
            profile[key] = _OTHER[unified][key]
        else:
            profile[key] = value
            estimates.append(key)
            note = f"not measured here: the value of the built-in profile {nearest}"
            sources.append({"field": key, "url": "moedge/data/hardware_profiles.json", "note": note})
    return {**profile, "estimates": estimates, "sources": sources, "_nearest_builtin": nearest}


def _expert_check(checked: dict[str, Any], torch_f: dict[str, Any]) -> dict[str, Any]:
    """One FP16 expert call: measured ms vs each profile's cost model (weights 2 bytes each)."""
    params = 3 * HIDDEN * INTER
    measured = {f"tokens_{n}": torch_f["expert_ffn"][f"fp16_tokens_{n}_ms"] for n in (1, PROMPT)}
    predicted = {
        name: {
            f"tokens_{n}": round(1e3 * p.gpu_time(2 * params, params, n, int8=False), 4) for n in (1, PROMPT)
        }
        for name, p in checked.items()
    }
    return {"measured_ms": measured, "predicted_ms": predicted}


def profile_item(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The hardware-profile line of the report, from the items' outcomes (by name)."""
    torch_r = results.get("torch-cuda")
    if torch_r is None:
        return {"status": "not available", "why": "needs the torch-cuda item, which runs with --gpu"}
    if torch_r["status"] != "ran":
        return {
            "status": "not available",
            "why": f"needs the torch-cuda item's figures (torch-cuda: {torch_r['why']})",
        }
    torch_f = torch_r["figures"]
    cpu_r = results.get("ort-cpu")
    raw = assemble(torch_f, cpu_r["figures"] if cpu_r is not None and cpu_r["status"] == "ran" else None)
    nearest = raw.pop("_nearest_builtin")
    name = f"measured-{_slug(str(torch_f['device']))}"
    profiles = source_module("runtime", "profiles")
    try:
        mine = profiles.profile_from_dict(name, raw)
    except Exception as exc:  # MoedgeError: a figure the loader refuses (zero, not finite)
        return {
            "status": "failed",
            "why": f"the loader refuses the measured profile: {one_line(exc)}",
            "figures": {"profile": raw},
        }
    checked = {name: mine, **profiles.BUILTIN}
    figures = {
        "name": name,
        "profile": raw,
        "measured": [s["field"] for s in raw["sources"] if s["url"] == DOCTOR],
        "not_measured": raw["estimates"],
        "nearest_builtin": nearest,
        "loaded_by": "moedge.runtime.profiles.profile_from_dict",
        "expert_fp16": _expert_check(checked, torch_f),
    }
    e = figures["expert_fp16"]
    summary = (
        f"{name}: {len(figures['measured'])} fields measured, {len(raw['estimates'])} from {nearest} "
        f"({', '.join(raw['estimates']) or 'none'}); expert FP16 at 1 token: measured {e['measured_ms']['tokens_1']} ms, "
        f"modeled {e['predicted_ms'][name]['tokens_1']} ms by it, {e['predicted_ms'][nearest]['tokens_1']} ms by {nearest}"
    )
    return {"status": "ran", "figures": figures, "summary": summary}
