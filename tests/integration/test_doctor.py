"""``moedge doctor``: the report on this machine, item by item, with and without torch / onnxruntime / anything.

The doctor runs as ``python -m moedge doctor --gpu`` in a subprocess, as on a lent GPU machine. Packages
are made missing by a ``sitecustomize.py`` on PYTHONPATH (inherited by the doctor's item processes) whose
import hook raises ModuleNotFoundError for them. What a GPU item must say is derived from what this
machine has (a CPU-only torch, onnxruntime's CPU wheel, tensorrt-stubs only), so the checks hold here and
name the cause; on a machine with a GPU those items may run instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CPU_ITEMS = ["packages", "providers", "ort-cpu"]
GPU_ITEMS = ["ort-cuda", "torch-cuda", "tensorrt", "hardware-profile"]
THIRD_PARTY = [
    "numpy",
    "onnxruntime",
    "onnx",
    "torch",
    "tensorrt",
    "polygraphy",
    "transformers",
    "tokenizers",
    "tqdm",
]

BLOCKER = """
import importlib.abc, os, sys

BLOCKED = [b for b in os.environ.get("DOCTOR_TEST_BLOCK", "").split(",") if b]


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Block())
"""


def _doctor(tmp_path: Path, *args: str, block: list[str] = (), cwd: Path | None = None, timeout: int = 300):
    """Run ``python -m moedge doctor ARGS`` with ``block`` made missing; (exit code, stdout, stderr)."""
    hook = tmp_path / "blocker"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(hook), *filter(None, [env.get("PYTHONPATH")])])
    env["DOCTOR_TEST_BLOCK"] = ",".join(block)
    result = subprocess.run(
        [sys.executable, "-m", "moedge", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or tmp_path,
        env=env,
    )
    return result.returncode, result.stdout, result.stderr


def _items(report_file: Path) -> dict[str, dict]:
    report = json.loads(report_file.read_text())
    return {item["name"]: item for item in report["items"]}


def _expected_whys() -> dict[str, str]:
    """What each GPU item must name on this machine, from what it has (empty where it may run)."""
    import onnxruntime as ort
    import torch

    want: dict[str, str] = {}
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        want["ort-cuda"] = "CUDAExecutionProvider is not in onnxruntime"
    if torch.version.cuda is None:
        want["torch-cuda"] = "CPU-only build (torch.version.cuda is None)"
    elif not torch.cuda.is_available():
        want["torch-cuda"] = "sees no CUDA device"
    try:
        import tensorrt

        if not hasattr(tensorrt, "Builder"):
            want["tensorrt"] = "tensorrt is not installed: only its type stubs"
    except ImportError:
        want["tensorrt"] = "tensorrt is not installed"
    if "torch-cuda" in want:
        want["hardware-profile"] = "needs the torch-cuda item's figures"
    return want


def test_doctor_gpu_names_what_is_not_available_and_why(tmp_path):
    report_file = tmp_path / "r.json"
    code, out, err = _doctor(tmp_path, "--gpu", "--json", str(report_file))
    assert code == 0, err
    report = json.loads(report_file.read_text())
    items = _items(report_file)
    assert list(items) == CPU_ITEMS + GPU_ITEMS
    machine = report["machine"]
    assert machine["cpu_count"] == os.cpu_count() and machine["python"] == sys.version.split()[0]
    assert machine["nvidia_smi"]["status"] in ("ran", "not available", "failed")
    assert items["packages"]["figures"]["numpy"]["version"]
    cpu = items["ort-cpu"]
    assert cpu["status"] == "ran" and cpu["figures"]["relative_diff_vs_numpy"] < 0.02
    assert cpu["figures"]["tokens_1_ms"] > 0 and cpu["figures"]["call_overhead_us"] > 0
    expected = _expected_whys()
    assert expected, "this machine has a GPU stack: the not-available checks below do not apply"
    for name, why in expected.items():
        assert items[name]["status"] == "not available", items[name]
        assert why in items[name]["why"], items[name]["why"]
    for item in items.values():
        assert item["status"] in ("ran", "not available", "failed") and item["seconds"] >= 0
        assert item["status"] == "ran" or item["why"], item
        line = next(line for line in out.splitlines() if line.strip().startswith(item["name"] + " "))
        assert item["status"] in line
    assert report["seconds"] < 480


def test_doctor_without_torch_says_torch_is_not_installed(tmp_path):
    report_file = tmp_path / "r.json"
    code, _, err = _doctor(tmp_path, "--gpu", "--json", str(report_file), block=["torch"])
    assert code == 0, err
    items = _items(report_file)
    assert items["torch-cuda"]["status"] == "not available"
    assert items["torch-cuda"]["why"].startswith("torch is not installed")
    assert "torch is not installed" in items["hardware-profile"]["why"]
    assert "torch is not installed" in items["packages"]["figures"]["torch"]["missing"]
    assert items["ort-cpu"]["status"] == "ran"  # the ONNX items need no torch


def test_doctor_without_onnxruntime_says_onnxruntime_is_not_installed(tmp_path):
    report_file = tmp_path / "r.json"
    code, _, err = _doctor(tmp_path, "--gpu", "--json", str(report_file), block=["onnxruntime"])
    assert code == 0, err
    items = _items(report_file)
    for name in ("providers", "ort-cpu", "ort-cuda"):
        assert items[name]["status"] == "not available", items[name]
        assert items[name]["why"].startswith("onnxruntime is not installed"), items[name]["why"]


def test_doctor_reports_from_a_source_tree_with_nothing_installed(tmp_path):
    # no third-party package and no moedge.runtime (the package-dir mapping of an install): the source tree
    report_file = tmp_path / "r.json"
    block = [*THIRD_PARTY, "moedge.runtime"]
    code, out, err = _doctor(tmp_path, "--gpu", "--json", str(report_file), block=block, cwd=ROOT)
    assert code == 0, err
    items = _items(report_file)
    assert list(items) == CPU_ITEMS + GPU_ITEMS
    assert items["packages"]["status"] == "ran"
    assert all(items[n]["status"] == "not available" for n in items if n != "packages"), items
    assert items["ort-cpu"]["why"].startswith(("numpy is not installed", "onnxruntime is not installed"))
    assert items["tensorrt"]["why"].startswith("tensorrt is not installed")
    assert "ort-cuda" in out and "not available" in out


def test_doctor_refuses_to_overwrite_a_report_before_running_anything(tmp_path):
    report_file = tmp_path / "r.json"
    report_file.write_text("keep me")
    code, out, err = _doctor(tmp_path, "--gpu", "--json", str(report_file))
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [
        f"moedge: error: --json {report_file} exists: give a new path, or add --force to replace it"
    ]
    assert report_file.read_text() == "keep me"
    code, _, err = _doctor(tmp_path, "--json", str(report_file), "--force")
    assert code == 0, err
    assert [item["name"] for item in json.loads(report_file.read_text())["items"]] == CPU_ITEMS
    assert not [p for p in tmp_path.iterdir() if "moedge-tmp" in p.name]  # written through a renamed temp


def test_doctor_unwritable_report_path_is_one_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, out, err = _doctor(tmp_path, "--json", str(blocker / "r.json"))
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [
        f"moedge: error: --json {blocker / 'r.json'}: {blocker} is a file, not a folder: choose another path"
    ]
    code, _, err = _doctor(tmp_path, "--json", str(tmp_path))
    assert code == 1 and "is a folder: give a file path" in err


def test_help_lists_doctor_and_its_flags(capsys):
    from moedge.cli import main

    assert main(["--help"]) == 0
    assert "doctor" in capsys.readouterr().out
    assert main(["doctor", "--help"]) == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in ("--gpu", "--json", "--force", "--profile-out"))


def _torch_figures(integrated: bool) -> dict:
    return {
        "device": "NVIDIA Test GPU",
        "compute_capability": "9.0",
        "total_memory_bytes": 8 << 30,
        "integrated": integrated,
        "torch": "2.13.0",
        "cuda": "13.0",
        "h2d_pinned_gbps": 50.0,
        "h2d_pageable_gbps": 20.0,
        "d2h_pinned_gbps": 50.0,
        "copy_4kib_us": 9.0,
        "device_copy_gbps": 3000.0,
        "fp16_matmul_tops": 600.0,
        "int8_matmul_tops": None,
        "int8_matmul_tops_error": "not supported",
        "cpu_int8_gops": 300.0,
        "cpu_fp32_gops": 900.0,
        "cpu_copy_gbps": 40.0,
        "launch_sync_us": 12.0,
        "expert_ffn": {"fp16_tokens_1_ms": 0.05, "fp16_tokens_128_ms": 0.06},
    }


@pytest.mark.parametrize("integrated", [False, True])
def test_measured_profile_loads_with_the_runtime_loader(tmp_path, integrated):
    from moedge.doctor.profile import builtin_profiles, profile_item
    from moedge.runtime.profiles import load_profile

    ort_cpu = {"status": "ran", "figures": {"w8a8_gops": 80.0, "call_overhead_us": 6.0}}
    torch_cuda = {"status": "ran", "figures": _torch_figures(integrated)}
    line = profile_item({"torch-cuda": torch_cuda, "ort-cpu": ort_cpu})
    assert line["status"] == "ran", line
    figures = line["figures"]
    raw = figures["profile"]
    path = tmp_path / "measured.json"
    path.write_text(json.dumps(raw))
    profile = load_profile(path)
    assert profile.gpu_mem_bandwidth == 3000e9 and profile.gpu_fp16_ops == 600e12
    assert profile.cpu_int8_ops == 80e9 and profile.cpu_call_overhead == pytest.approx(6e-6)
    assert profile.unified_memory is integrated and profile.device_memory_bytes == 8 << 30
    if integrated:
        assert profile.h2d_bandwidth is None and profile.resident_setup_bandwidth == 50e9
    else:
        assert profile.h2d_bandwidth == 50e9 and profile.resident_setup_bandwidth is None
    nearest = builtin_profiles()[figures["nearest_builtin"]]
    assert nearest["unified_memory"] is integrated
    assert raw["estimates"] == ["gpu_int8_tops"] and raw["gpu_int8_tops"] == nearest["gpu_int8_tops"]
    assert set(raw) - {"estimates", "sources"} == set(nearest) - {"estimates", "sources"}
    predicted = figures["expert_fp16"]["predicted_ms"]
    assert set(predicted) == {figures["name"], *builtin_profiles()}
    assert figures["expert_fp16"]["measured_ms"] == {"tokens_1": 0.05, "tokens_128": 0.06}


def test_tiny_expert_is_valid_onnx_and_matches_numpy():
    import onnx
    import onnxruntime as ort

    from moedge.doctor.tiny_onnx import expert_onnx, expert_parts, inputs, numpy_reference, parity

    parts = expert_parts()
    model = expert_onnx(parts)
    onnx.checker.check_model(onnx.load_from_string(model), full_check=True)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    for x in inputs().values():
        _, rel = parity(session.run(None, {"x": x})[0], numpy_reference(parts, x))
        assert rel < 1e-4


def test_an_item_past_its_timeout_or_dying_is_reported_failed(tmp_path):
    from moedge.doctor.runner import Item, run_child

    slow = run_child(Item("packages", 0.001, False, ""), tmp_path, 0.001)
    assert slow["status"] == "failed" and slow["why"].startswith(
        "timed out after 0 s (its process was killed)"
    )
    broken = run_child(Item("no-such-item", 60, False, ""), tmp_path, 60)
    assert broken["status"] == "failed"
    assert broken["why"].startswith(
        "its process ended with exit status 2 before reporting; last output: usage"
    )
