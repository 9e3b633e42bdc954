"""What this machine has for the GPU tests, each capability with the reason it is missing (tests/gpu/conftest.py).

Each ``*_missing()`` returns None when the capability is there, else one line: the capability's name and
why it is missing (what was looked at, what to install). ``require`` turns those lines into a skip, or
into a failure under ``MOEDGE_REQUIRE_GPU=1``.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MOEDGE_RUN = ROOT / "build" / "cpp" / "moedge-run"
REQUIRE = os.environ.get("MOEDGE_REQUIRE_GPU", "") == "1"


def _one_line(text: object, limit: int = 160) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


@functools.cache
def gpu_missing() -> str | None:
    """Why there is no NVIDIA GPU here, or None."""
    if Path("/dev/nvidia0").exists() or Path("/dev/nvhost-ctrl-gpu").exists():
        return None
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "NVIDIA GPU (no /dev/nvidia0, no Jetson /dev/nvhost-ctrl-gpu, no nvidia-smi)"
    try:
        result = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"NVIDIA GPU (nvidia-smi -L failed: {_one_line(exc)})"
    if result.returncode != 0 or "GPU" not in result.stdout:
        return f"NVIDIA GPU (nvidia-smi -L: {_one_line(result.stdout + result.stderr) or f'exit {result.returncode}'})"
    return None


@functools.cache
def cuda_ep_missing() -> str | None:
    """Why ONNX Runtime's CUDA provider cannot run a session here, or None (a tiny Relu graph is the probe)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "CUDA EP (onnxruntime is not installed)"
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        return (
            f"CUDA EP (onnxruntime {ort.__version__} is the CPU wheel, providers: {', '.join(available)}; "
            "pip uninstall onnxruntime && pip install 'onnxruntime-gpu[cuda,cudnn]')"
        )
    if gpu_missing() is not None:
        return None  # the GPU line says it; the provider itself is installed
    import onnx
    from onnx import TensorProto, helper

    try:
        from moedge.runtime.backends.ort_cuda import preload_cuda_libraries
    except ImportError:  # moedge not installed (benchmarks/gpu_check.sh reports before installing it)
        pass
    else:
        preload_cuda_libraries()  # as the ort-cuda backend does

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    try:  # enable_fallback=0: an EP error raises instead of quietly making a CPU session
        session = ort.InferenceSession(
            onnx.ModelProto.SerializeToString(model), providers=["CUDAExecutionProvider"], enable_fallback=0
        )
    except Exception as exc:  # ORT raises several types
        return f"CUDA EP (onnxruntime {ort.__version__} cannot start it: {_one_line(exc)})"
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return f"CUDA EP (onnxruntime {ort.__version__} started {session.get_providers()} instead)"
    return None


@functools.cache
def tensorrt_missing() -> str | None:
    """Why TensorRT cannot build engines here, or None."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        return f"TensorRT (import tensorrt fails: {_one_line(exc)}; pip install 'moedge[trt]', on Jetson JetPack's python3-libnvinfer)"
    if not hasattr(trt, "Builder"):
        return "TensorRT (only tensorrt-stubs is installed, not TensorRT: pip install 'moedge[trt]')"
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        return "TensorRT (polygraphy is not installed: pip install polygraphy)"
    if gpu_missing() is not None:
        return None
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as exc:  # no CUDA device or driver
        return f"TensorRT ({trt.__version__} cannot create a builder: {_one_line(exc)})"
    if builder is None:
        return f"TensorRT ({trt.__version__} cannot create a builder: no CUDA device or driver?)"
    return None


def gpu_ort_library() -> Path | None:
    """libonnxruntime.so.1* of the installed onnxruntime-gpu, when its CUDA provider library is beside it."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    capi = Path(ort.__file__).parent / "capi"
    lib = next(iter(sorted(capi.glob("libonnxruntime.so.1*"))), None)
    return lib if lib is not None and (capi / "libonnxruntime_providers_cuda.so").is_file() else None


@functools.cache
def cpp_cuda_missing() -> str | None:
    """Why moedge-run cannot be run on the CUDA provider here (beyond the CUDA EP itself), or None."""
    if gpu_ort_library() is None:
        try:
            import onnxruntime as ort

            where = f"{Path(ort.__file__).parent / 'capi'} has no libonnxruntime.so.1* with libonnxruntime_providers_cuda.so"
        except ImportError:
            where = "onnxruntime is not installed"
        return f"ORT CUDA library for moedge-run ({where}: install onnxruntime-gpu)"
    if not MOEDGE_RUN.is_file():
        return f"moedge-run ({MOEDGE_RUN.relative_to(ROOT)} is not built: make cpp)"
    return None


def require(*missing: str | None) -> None:
    """Skip (or, under MOEDGE_REQUIRE_GPU=1, fail) naming every missing capability on one line."""
    reasons = [m for m in missing if m]
    if not reasons:
        return
    line = "missing " + "; ".join(reasons)
    if REQUIRE:
        pytest.fail(f"MOEDGE_REQUIRE_GPU=1: {line}", pytrace=False)
    pytest.skip(line)


def nvidia_library_path() -> str:
    """LD_LIBRARY_PATH for a child process that loads ORT's CUDA provider: the lib folders of the nvidia-*
    pip packages (CUDA runtime, cuBLAS, cuDNN) that onnxruntime-gpu[cuda,cudnn] installs, then the
    current value: moedge-run dlopens ORT, whose CUDA provider finds those libraries through the loader."""
    dirs = []
    for entry in sys.path:
        root = Path(entry) / "nvidia"
        if root.is_dir():
            dirs += [str(p) for p in sorted(root.glob("*/lib")) if p.is_dir()]
    current = os.environ.get("LD_LIBRARY_PATH", "")
    return os.pathsep.join([*dict.fromkeys(dirs), *([current] if current else [])])
