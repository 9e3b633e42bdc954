"""The doctor's GPU items beyond ONNX Runtime: torch's CUDA (copies, compute rates, one expert's time) and
a TensorRT engine of the tiny expert (build, parity, speed).

torch's CUDA measures what a hardware profile models (``moedge/data/hardware_profiles.json``):
host-to-device bandwidth, device memory bandwidth, FP16 and INT8 product rates, the launch-and-sync cost
of a call, and the CPU's rates. TensorRT's Python package allocates no device memory, so running the
engine uses torch's CUDA tensors as its buffers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from moedge.doctor.common import (
    HIDDEN,
    INTER,
    PARITY_TOLERANCE,
    PROMPT,
    Failed,
    Figures,
    NotAvailable,
    fig,
    median_s,
    need,
    one_line,
    source_module,
)
from moedge.doctor.tiny_onnx import MODEL_FILE, inputs, numpy_reference, parity, tiny_model


def cuda_torch() -> Any:
    """torch with a usable CUDA device, or NotAvailable saying which part is missing."""
    torch = need("torch")
    if torch.version.cuda is None:
        raise NotAvailable(f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)")
    if not torch.cuda.is_available():
        raise NotAvailable(
            f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device: "
            f"torch.cuda.is_available() is False, {torch.cuda.device_count()} devices"
        )
    return torch


def _copies(torch: Any) -> Figures:
    """Copy bandwidths (pinned and pageable host to device, device to host, device to device) and the time
    of a 4 KiB host-to-device copy (a transfer's fixed cost)."""
    sync, n, small = torch.cuda.synchronize, 64 << 20, 4096
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(n, dtype=torch.uint8)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    h2d = median_s(lambda: dev.copy_(pinned, non_blocking=True), 10, sync=sync)
    d2h = median_s(lambda: pinned.copy_(dev, non_blocking=True), 10, sync=sync)
    paged = median_s(lambda: dev.copy_(pageable), 5, sync=sync)
    tiny_h, tiny_d = pinned[:small], dev[:small]
    latency = median_s(lambda: tiny_d.copy_(tiny_h, non_blocking=True), 100, sync=sync)
    big = 256 << 20
    a, b = (
        torch.empty(big, dtype=torch.uint8, device="cuda"),
        torch.empty(big, dtype=torch.uint8, device="cuda"),
    )
    d2d = median_s(lambda: b.copy_(a), 10, sync=sync)
    return {
        "h2d_pinned_gbps": fig(n / h2d / 1e9),
        "h2d_pageable_gbps": fig(n / paged / 1e9),
        "d2h_pinned_gbps": fig(n / d2h / 1e9),
        "copy_4kib_us": fig(1e6 * latency),
        "device_copy_gbps": fig(2 * big / d2d / 1e9),
    }


def _matmul_rate(torch: Any, dtype: Any, size: int, device: str, runs: int) -> float:
    """Ops/s of one size x size x size product (int8: torch._int_mm, int32 results)."""
    sync = torch.cuda.synchronize if device == "cuda" else None
    if dtype == torch.int8:
        a = torch.randint(-127, 127, (size, size), dtype=torch.int8, device=device)
        b = torch.randint(-127, 127, (size, size), dtype=torch.int8, device=device)
        t = median_s(lambda: torch._int_mm(a, b), runs, sync=sync)
    else:
        a = torch.randn(size, size, dtype=dtype, device=device)
        b = torch.randn(size, size, dtype=dtype, device=device)
        t = median_s(lambda: a @ b, runs, sync=sync)
    return 2.0 * size**3 / t


def _rates(torch: Any) -> Figures:
    """Product rates (GPU FP16 and INT8, CPU FP32 and INT8), CPU copy bandwidth and the GPU's launch + sync."""
    out: Figures = {"fp16_matmul_tops": fig(_matmul_rate(torch, torch.float16, 4096, "cuda", 10) / 1e12)}
    for key, device, size, scale in (
        ("int8_matmul_tops", "cuda", 4096, 1e12),
        ("cpu_int8_gops", "cpu", 1024, 1e9),
    ):
        try:
            out[key] = fig(_matmul_rate(torch, torch.int8, size, device, 5) / scale)
        except Exception as exc:  # torch._int_mm missing or unsupported here
            out[key] = None
            out[f"{key}_error"] = one_line(exc, 160)
    out["cpu_fp32_gops"] = fig(_matmul_rate(torch, torch.float32, 1024, "cpu", 5) / 1e9)
    a, b = torch.empty(128 << 20, dtype=torch.uint8), torch.empty(128 << 20, dtype=torch.uint8)
    out["cpu_copy_gbps"] = fig(2 * (128 << 20) / median_s(lambda: b.copy_(a), 5) / 1e9)
    flag = torch.zeros(1, device="cuda")
    out["launch_sync_us"] = fig(1e6 * median_s(lambda: flag.add_(1), 200, sync=torch.cuda.synchronize))
    return out


def _expert_times(torch: Any) -> Figures:
    """ms of one SwiGLU expert call (576 -> 1536 -> 576) on the GPU, per dtype and token count."""
    out: Figures = {}
    for name, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
        gen = torch.Generator(device="cuda").manual_seed(0)
        wg, wu = (
            torch.randn(HIDDEN, INTER, dtype=dtype, device="cuda", generator=gen) * 0.02 for _ in range(2)
        )
        wd = torch.randn(INTER, HIDDEN, dtype=dtype, device="cuda", generator=gen) * 0.02
        for n in (1, PROMPT):
            x = torch.randn(n, HIDDEN, dtype=dtype, device="cuda", generator=gen)

            def call(x: Any = x, wg: Any = wg, wu: Any = wu, wd: Any = wd) -> Any:
                return (torch.nn.functional.silu(x @ wg) * (x @ wu)) @ wd

            out[f"{name}_tokens_{n}_ms"] = fig(1e3 * median_s(call, 50, sync=torch.cuda.synchronize))
    return out


def torch_cuda(work: Path) -> tuple[Figures, str]:
    """torch's CUDA: copy bandwidths, compute rates, launch cost and one expert's time (and the CPU's rates)."""
    torch = cuda_torch()
    props = torch.cuda.get_device_properties(0)
    figures: Figures = {
        "device": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "total_memory_bytes": int(props.total_memory),
        "integrated": bool(getattr(props, "is_integrated", False)),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **_copies(torch),
        **_rates(torch),
        "expert_ffn": _expert_times(torch),
    }
    e = figures["expert_ffn"]
    return figures, (
        f"{props.name}: H2D {figures['h2d_pinned_gbps']} GB/s pinned, device copy {figures['device_copy_gbps']} GB/s, "
        f"FP16 {figures['fp16_matmul_tops']} TOPS, expert FP16 {e['fp16_tokens_1_ms']} / {e[f'fp16_tokens_{PROMPT}_ms']} ms"
    )


def _trt_builder(trt: Any) -> None:
    """NotAvailable unless TensorRT can create a builder (it needs a CUDA device and driver)."""
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as exc:
        raise NotAvailable(f"TensorRT {trt.__version__} cannot create a builder: {one_line(exc)}") from None
    if builder is None:
        raise NotAvailable(f"TensorRT {trt.__version__} cannot create a builder (no CUDA device or driver?)")


def _reference(work: Path, x: Any, parts: dict[str, Any]) -> tuple[Any, str]:
    """The expert's output on ONNX Runtime's CPU provider, or numpy's where onnxruntime is missing."""
    try:
        ort = need("onnxruntime")
    except NotAvailable:
        return numpy_reference(parts, x), "numpy"
    session = ort.InferenceSession(str(work / MODEL_FILE), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0], "onnxruntime CPU"


def _run_engine(trt: Any, torch: Any, engine_file: Path, xs: dict[int, Any]) -> tuple[Any, dict[str, float]]:
    """(the engine's output for the prompt batch, ms per call for each token count)."""
    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(engine_file.read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT {trt.__version__} cannot deserialize the engine it just built")
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    out: Any = None
    times: dict[str, float] = {}
    for n, x_host in xs.items():
        x = torch.from_numpy(x_host).cuda()
        y = torch.empty((n, HIDDEN), dtype=torch.float32, device="cuda")
        context.set_input_shape("x", (n, HIDDEN))
        context.set_tensor_address("x", x.data_ptr())
        context.set_tensor_address("y", y.data_ptr())
        torch.cuda.synchronize()  # x's copy ran on torch's current stream, the engine runs on `stream`

        def call() -> None:
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 returned False")

        times[f"tokens_{n}_ms"] = fig(1e3 * median_s(call, 50, sync=stream.synchronize))
        out = y.cpu().numpy() if n == PROMPT else out
    return out, times


def tensorrt(work: Path) -> tuple[Figures, str]:
    """A TensorRT engine of the tiny expert: build time, INT8 layers, parity with ORT CPU, call times."""
    trt = need("tensorrt")
    if not hasattr(trt, "Builder"):
        raise NotAvailable(
            "tensorrt is not installed: only its type stubs (tensorrt-stubs) are; "
            "pip install 'moedge[trt]' (on Jetson: JetPack's python3-libnvinfer)"
        )
    need("numpy")
    _trt_builder(trt)
    build = source_module("runtime", "tensorrt_build")
    path, parts = tiny_model(work)
    engine_file = work / "expert_w8a8.engine"
    shapes = {"x": ((1, HIDDEN), (PROMPT, HIDDEN), (PROMPT, HIDDEN))}
    start = time.perf_counter()
    build.build_engine(path, engine_file, profiles=shapes, workspace_bytes=1 << 30, detailed=True)
    int8 = build.int8_compute_layers(build.engine_layers(engine_file))
    figures: Figures = {
        "tensorrt": trt.__version__,
        "build_s": fig(time.perf_counter() - start),
        "engine_bytes": engine_file.stat().st_size,
        "int8_product_layers": len(int8),
        "int8_product_layer_names": int8[:6],
    }
    summary = f"TensorRT {trt.__version__}: built in {figures['build_s']} s, {len(int8)} INT8 product layers"
    try:
        torch = cuda_torch()
    except NotAvailable as exc:
        figures["run"] = f"not available: the engine's device buffers come from torch's CUDA ({exc})"
        return figures, f"{summary}; not run: {exc}"
    xs = inputs()
    got, figures["trt"] = _run_engine(trt, torch, engine_file, xs)
    want, figures["reference"] = _reference(work, xs[PROMPT], parts)
    figures["max_abs_diff"], figures["relative_diff"] = parity(got, want)
    if figures["relative_diff"] > PARITY_TOLERANCE:
        raise Failed(
            f"parity: TensorRT vs {figures['reference']} relative diff {figures['relative_diff']}", figures
        )
    key = f"tokens_{PROMPT}_ms"
    return figures, (
        f"{summary}; {figures['trt']['tokens_1_ms']} / {figures['trt'][key]} ms (1 / {PROMPT} tokens); "
        f"parity vs {figures['reference']} {figures['relative_diff']}"
    )
