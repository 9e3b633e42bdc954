"""The doctor's CPU-side items and its ONNX Runtime items (each run in its own process by ``moedge.doctor``).

An item is ``fn(work) -> (figures, summary)``: ``work`` is the folder the items of one doctor run share
(the tiny model is written there once); it raises ``NotAvailable`` or ``Failed`` instead of returning.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from moedge.doctor.common import (
    PARAMS,
    PARITY_TOLERANCE,
    PROMPT,
    Failed,
    Figures,
    NotAvailable,
    fig,
    median_s,
    need,
    one_line,
)
from moedge.doctor.tiny_onnx import identity_onnx, inputs, numpy_reference, parity, tiny_model

# import name -> the distributions that install it (the first one found gives the version)
PACKAGES = {
    "numpy": ("numpy",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "onnx": ("onnx",),
    "torch": ("torch",),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11"),
    "polygraphy": ("polygraphy",),
    "transformers": ("transformers",),
    "tokenizers": ("tokenizers",),
    "tqdm": ("tqdm",),
}


def _package(name: str, distributions: tuple[str, ...]) -> Figures:
    """Where ``name`` is and its version, from the package metadata, without importing it."""
    from importlib import metadata

    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        spec = None
    except Exception as exc:  # a broken install
        return {"missing": f"{name} cannot be found: {type(exc).__name__}: {one_line(exc)}"}
    if spec is None:
        return {"missing": f"{name} is not installed"}
    if spec.origin in (None, "namespace"):  # a folder without __init__.py: e.g. tensorrt-stubs alone
        where = ", ".join(spec.submodule_search_locations or [])
        return {"missing": f"{name} is only a folder without its library ({where}): type stubs alone?"}
    for dist in distributions:
        try:
            return {"version": metadata.version(dist), "distribution": dist, "path": spec.origin}
        except metadata.PackageNotFoundError:
            continue
    return {"version": "unknown (no package metadata)", "path": spec.origin}


def packages(work: Path) -> tuple[Figures, str]:
    """The packages moedge and the items use: version and place, or why missing (nothing is imported: the
    items import what they need and say when an import fails)."""
    found = {name: _package(name, dists) for name, dists in PACKAGES.items()}
    have = [f"{n} {v['version']}" for n, v in found.items() if "version" in v]
    missing = [n for n, v in found.items() if "missing" in v]
    return found, ", ".join(have) + (f"; missing: {', '.join(missing)}" if missing else "")


def providers(work: Path) -> tuple[Figures, str]:
    """ONNX Runtime's execution providers: is there a CUDA or a TensorRT one."""
    ort = need("onnxruntime")
    available = list(ort.get_available_providers())
    figures = {
        "onnxruntime": ort.__version__,
        "providers": available,
        "cuda_ep": "CUDAExecutionProvider" in available,
        "tensorrt_ep": "TensorrtExecutionProvider" in available,
    }
    gpu = [p for p in available if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
    return figures, f"onnxruntime {ort.__version__}: {', '.join(available)}" + (
        "" if gpu else " (no CUDA or TensorRT provider: the CPU wheel)"
    )


def _ort_times(session: Any, xs: dict[int, Any]) -> dict[str, float]:
    """ms per call of ``session`` for each token count of ``xs``."""
    out = {}
    for n, x in xs.items():
        feed = {"x": x}

        def call(feed: dict[str, Any] = feed) -> object:
            return session.run(None, feed)

        out[f"tokens_{n}_ms"] = fig(1e3 * median_s(call, 30))
    return out


def ort_cpu(work: Path) -> tuple[Figures, str]:
    """The tiny expert on ONNX Runtime's CPU provider: parity with numpy, call time, the fixed cost of a call."""
    need("numpy")
    ort = need("onnxruntime")
    path, parts = tiny_model(work)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xs = inputs()
    diff, rel = parity(session.run(None, {"x": xs[PROMPT]})[0], numpy_reference(parts, xs[PROMPT]))
    times = _ort_times(session, xs)
    ident = ort.InferenceSession(identity_onnx(), providers=["CPUExecutionProvider"])
    one = {"a": need("numpy").zeros(1, "float32")}
    overhead = median_s(lambda: ident.run(None, one), 200)
    prompt_s = times[f"tokens_{PROMPT}_ms"] / 1e3
    figures: Figures = {
        "model_bytes": path.stat().st_size,
        "params": PARAMS,
        "max_abs_diff_vs_numpy": diff,
        "relative_diff_vs_numpy": rel,
        **times,
        "call_overhead_us": fig(1e6 * overhead),
        "w8a8_gops": fig(2 * PARAMS * PROMPT / max(prompt_s - overhead, 1e-9) / 1e9),
    }
    summary = (
        f"expert {times['tokens_1_ms']} ms (1 token), {times[f'tokens_{PROMPT}_ms']} ms ({PROMPT} tokens)"
    )
    if rel > PARITY_TOLERANCE:
        raise Failed(f"parity: ORT CPU vs numpy relative diff {rel} > {PARITY_TOLERANCE}", figures)
    return figures, f"{summary}; call overhead {figures['call_overhead_us']} us; parity vs numpy {rel}"


def _cuda_session(ort: Any, path: Path) -> Any:
    available = list(ort.get_available_providers())
    if "CUDAExecutionProvider" not in available:
        raise NotAvailable(
            f"CUDAExecutionProvider is not in onnxruntime {ort.__version__}'s providers ({', '.join(available)}): "
            "this is the CPU wheel; onnxruntime-gpu has the CUDA provider"
        )
    preload = getattr(ort, "preload_dlls", None)  # CUDA/cuDNN of torch or the nvidia-* wheels (ORT >= 1.21)
    if preload is not None:
        try:
            preload()
        except Exception:  # what still fails shows in the session's error below
            pass
    try:  # enable_fallback=0: an EP that cannot start raises instead of quietly running on the CPU
        session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"], enable_fallback=0)
    except Exception as exc:
        raise NotAvailable(f"CUDAExecutionProvider cannot start: {one_line(exc)}") from None
    if session.get_providers()[0] != "CUDAExecutionProvider":
        raise NotAvailable(f"onnxruntime started {session.get_providers()} instead of CUDAExecutionProvider")
    return session


def ort_cuda(work: Path) -> tuple[Figures, str]:
    """The tiny expert on ONNX Runtime's CUDA provider: parity with its CPU provider, and both call times."""
    need("numpy")
    ort = need("onnxruntime")
    path, _ = tiny_model(work)
    cuda = _cuda_session(ort, path)
    cpu = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xs = inputs()
    diff, rel = parity(cuda.run(None, {"x": xs[PROMPT]})[0], cpu.run(None, {"x": xs[PROMPT]})[0])
    cuda_t, cpu_t = _ort_times(cuda, xs), _ort_times(cpu, xs)
    figures: Figures = {
        "max_abs_diff_vs_cpu": diff,
        "relative_diff_vs_cpu": rel,
        "cuda": cuda_t,
        "cpu": cpu_t,
        "note": "times include the copies of x and y between host and device (numpy inputs)",
    }
    if rel > PARITY_TOLERANCE:
        raise Failed(f"parity: CUDA vs CPU relative diff {rel} > {PARITY_TOLERANCE}", figures)
    key = f"tokens_{PROMPT}_ms"
    return (
        figures,
        f"CUDA {cuda_t['tokens_1_ms']} / {cuda_t[key]} ms vs CPU {cpu_t['tokens_1_ms']} / {cpu_t[key]} ms (1 / {PROMPT} tokens); parity {rel}",
    )
