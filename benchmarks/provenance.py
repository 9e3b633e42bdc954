"""One writer for every benchmark JSON: what ran, where, on which inputs, every run, and the statistic.

Each file in ``benchmarks/results/`` is one document (schema ``moedge.benchmark/1``)::

    {"schema", "benchmark", "command", "created", "environment", "inputs", "statistic", "runs", "results"}

``environment`` holds the moedge commit (and whether the tree was dirty), Python, the platform, the CPU
model, logical CPUs and the thread count the benchmark used, the versions of onnxruntime (and
onnxruntime-gpu), torch, transformers, numpy, onnx, llama-cpp-python and onnxruntime-genai (None when
absent), the ORT module actually imported, and build flags where used (ORT's build info; llama.cpp's system
info when it ran; torch's build configuration when it ran; anything the benchmark adds). ``inputs`` has
the sha256 of every input file; a folder's digest is the sha256 of its ``sha256sum``-style listing (one
"<sha256>  <relative path>" line per file, paths sorted bytewise), so
``cd DIR && find . -type f | sed 's|^./||' | LC_ALL=C sort | xargs -d '\\n' sha256sum | sha256sum``
reproduces it. ``runs`` is every individual measurement, raw; ``results`` the figures a reader quotes;
``statistic`` the sentence saying how the one became the other.

Benchmarks import it as a sibling module (``from provenance import write_result``), as ``cpp_runtime.py``
imports ``runtime_speed``. It needs nothing but the standard library (``benchmarks/gpu_check.sh`` writes
through it before moedge is installed); moedge is imported lazily by the input helpers alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA = "moedge.benchmark/1"
ROOT = Path(__file__).resolve().parents[1]
DATA_ENV = "MOEDGE_DATA"  # moedge.paths.DATA_ENV (not imported: see the module docstring)
DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "torch",
    "transformers",
    "numpy",
    "onnx",
    "llama-cpp-python",
    "onnxruntime-genai",
)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_CHUNK = 1 << 20


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def moedge_commit() -> dict[str, Any]:
    """{"commit": full sha or "unknown", "dirty": tracked or untracked changes (None when unknown)}."""
    sha = _git("rev-parse", "--verify", "HEAD")
    if not sha:
        return {"commit": "unknown", "dirty": None}
    status = _git("status", "--porcelain")
    return {"commit": sha, "dirty": None if status is None else bool(status)}


def run_stamp() -> dict[str, Any]:
    """When and at which commit a run was measured: for runs a benchmark keeps from an earlier invocation
    (files it extends rather than rewrites), whose top-level ``environment`` describes the latest one."""
    commit = moedge_commit()
    return {"created": _now(), "moedge_commit": commit["commit"], "dirty": commit["dirty"]}


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _onnxruntime(flags: dict[str, Any]) -> dict[str, Any] | None:
    """The onnxruntime module this process imports (either wheel installs the same module)."""
    try:
        import onnxruntime as ort
    except Exception:  # ImportError, or a wheel whose libraries fail to load
        return None
    build_info = getattr(ort, "get_build_info", None)
    if callable(build_info):
        flags["onnxruntime"] = str(build_info())
    return {
        "version": getattr(ort, "__version__", None),
        "file": str(getattr(ort, "__file__", None)),
        "providers": list(ort.get_available_providers()),
    }


def _engine_flags(engines: Sequence[str], flags: dict[str, Any]) -> None:
    """Build flags of the engines a benchmark ran: llama.cpp's system info, torch's build configuration."""
    if "llama.cpp" in engines:
        try:
            import llama_cpp

            info = llama_cpp.llama_print_system_info()
            flags["llama.cpp"] = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
        except Exception as exc:  # not installed, or a build without the call
            flags["llama.cpp"] = f"unavailable: {type(exc).__name__}: {exc}"
    if "torch" in engines:
        try:
            import torch

            flags["torch"] = torch.__config__.show()
            flags["torch_parallel"] = torch.__config__.parallel_info()
        except Exception as exc:
            flags["torch"] = f"unavailable: {type(exc).__name__}: {exc}"
    if "onnxruntime-genai" in engines:
        try:
            import onnxruntime_genai as og

            flags["onnxruntime-genai"] = {"version": getattr(og, "__version__", None), "file": og.__file__}
        except Exception as exc:
            flags["onnxruntime-genai"] = f"unavailable: {type(exc).__name__}: {exc}"


def environment(*, threads: int | None, engines: Sequence[str] = ()) -> dict[str, Any]:
    """Where a benchmark ran: moedge commit, Python, platform, CPU, threads, package versions, build flags.

    ``engines`` names what the benchmark ran ("onnxruntime", "torch", "llama.cpp", "onnxruntime-genai",
    "moedge-run", ...): the build flags of the ones that have any are recorded.
    """
    flags: dict[str, Any] = {}
    affinity = getattr(os, "sched_getaffinity", None)
    env: dict[str, Any] = {
        "moedge": {**moedge_commit(), "version": _version("moedge")},
        "python": platform.python_version(),
        "python_executable": _shown(Path(sys.executable)),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(affinity(0)) if affinity else None,
        "threads": threads,
        "thread_variables": {k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ},
        "data_folder": os.environ.get(DATA_ENV),
        "engines": list(engines),
        "packages": {dist: _version(dist) for dist in DISTRIBUTIONS},
        "onnxruntime_imported": _onnxruntime(flags),
    }
    _engine_flags(engines, flags)
    env["build_flags"] = flags
    return env


def _shown(path: Path) -> str:
    """A path relative to the repository, else to the data folder ($MOEDGE_DATA/...), else home (~/...)."""
    absolute = Path(os.path.abspath(path))
    data = os.environ.get(DATA_ENV)
    bases: list[tuple[Path, str]] = [(ROOT, "")]
    if data:
        bases.append((Path(os.path.abspath(data)), f"${DATA_ENV}/"))
    bases.append((Path.home(), "~/"))
    for candidate in (absolute, absolute.resolve()):
        for base, prefix in bases:
            for b in (base, base.resolve()):
                if candidate.is_relative_to(b) and candidate != b:
                    return prefix + candidate.relative_to(b).as_posix()
    return str(absolute)


def _sha256(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def file_digest(path: Path) -> dict[str, Any]:
    """{"path", "bytes", "sha256"} of a file, streamed; a folder adds "files" and digests its listing of
    every file inside, sorted (see the module docstring). A missing path raises ``FileNotFoundError``."""
    path = Path(path)
    if not path.is_dir():
        sha, size = _sha256(path)
        return {"path": _shown(path), "bytes": size, "sha256": sha}
    files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
    listing, total = hashlib.sha256(), 0
    for rel, file in files:
        sha, size = _sha256(file)
        listing.update(f"{sha}  {rel}\n".encode())
        total += size
    return {"path": _shown(path), "bytes": total, "sha256": listing.hexdigest(), "files": len(files)}


def _input(item: Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(item, dict):  # a digest recorded earlier, kept for runs carried over from that invocation
        return item
    try:
        return file_digest(Path(item))
    except OSError as exc:  # recorded, not fatal: the measurement already ran
        return {"path": _shown(Path(item)), "bytes": None, "sha256": None, "error": str(exc)}


def _jsonable(value: Any) -> Any:
    """Paths as text and numpy scalars as Python numbers; anything else fails serialisation."""
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) == ():
        return item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def command_line(argv: Sequence[str] | None = None) -> list[str]:
    """The command as run: the interpreter and the script (repository-relative where possible), then
    ``argv`` (default: this process's arguments)."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("-")
    rest = list(sys.argv[1:] if argv is None else argv)
    return [_shown(Path(sys.executable)), _shown(script), *map(str, rest)]


def write_result(
    path: Path,
    *,
    benchmark: str,
    command: Sequence[str],
    threads: int | None,
    inputs: Sequence[Path | dict[str, Any]],
    runs: list[dict[str, Any]],
    statistic: str,
    results: Any,
    build_flags: dict[str, Any] | None = None,
    engines: Sequence[str] = (),
) -> dict[str, Any]:
    """Assemble the document and write it atomically (a temporary file beside it, then ``os.replace``):
    a failure leaves the previous file as it was and no temporary file. Returns the document."""
    path = Path(path)
    env = environment(threads=threads, engines=engines)
    env["build_flags"].update(build_flags or {})
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "benchmark": benchmark,
        "command": [str(c) for c in command],
        "created": _now(),
        "environment": env,
        "inputs": [_input(i) for i in inputs],
        "statistic": statistic,
        "runs": runs,
        "results": results,
    }
    text = json.dumps(doc, indent=1, default=_jsonable) + "\n"  # fails before any file exists
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o666 & ~umask)  # mkstemp's file is private (0600); a result is not
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return doc


def read_result(path: Path) -> dict[str, Any] | None:
    """The document at ``path`` (None when there is none). A file written before this schema comes back
    wrapped: {"schema": None, "results": <its content>, "runs": [], "inputs": []}."""
    path = Path(path)
    if not path.is_file():
        return None
    doc = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(doc, dict) and doc.get("schema") == SCHEMA:
        return doc
    return {"schema": None, "results": doc, "runs": [], "inputs": []}


def results_of(path: Path) -> Any:
    """The ``results`` of the document at ``path`` (a pre-schema file's whole content); None when absent."""
    doc = read_result(path)
    return None if doc is None else doc["results"]


def dataset_files(*names: str) -> list[Path]:
    """The files behind dataset names as ``moedge.datasets.load_text`` resolves them (wikitext2, ptb, c4
    in the data folder; demo; a text file's own path); names it cannot place (the hub) are left out."""
    from importlib import resources

    from moedge.datasets import _FILES
    from moedge.paths import data_dir

    root = data_dir()
    out: list[Path] = []
    for name in names:
        if name == "demo":
            out.append(Path(str(resources.files("moedge").joinpath("data/demo_text.txt"))))
        elif name in _FILES:
            if root is not None and (root / _FILES[name]).is_file():
                out.append(root / _FILES[name])
        elif Path(name).expanduser().is_file():
            out.append(Path(name).expanduser())
    return list(dict.fromkeys(out))


def model_files(loaded: Any) -> list[Path]:
    """The files or folder a loaded model came from (``LoadedModel.source`` and its provenance), those
    that exist: a built test bed's cached folder, a GGUF, a llama2.c checkpoint and its tokenizer."""
    prov = getattr(loaded, "provenance", None) or {}
    names = [
        getattr(loaded, "source", None),
        prov.get("source"),
        prov.get("tokenizer"),
        prov.get("cached_at"),
    ]
    out = [Path(n) for n in names if isinstance(n, str) and n and Path(n).exists()]
    return list(dict.fromkeys(out))


def carry_over(
    previous: dict[str, Any] | None, keep: Callable[[dict[str, Any]], bool], inputs: Sequence[Path]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """For a benchmark that extends its file: the earlier runs it keeps (``keep(run)``), and, when it
    keeps any, the earlier input digests whose path is not among this invocation's ``inputs``."""
    if previous is None:
        return [], []
    runs = [r for r in previous.get("runs", []) if keep(r)]
    shown = {_shown(Path(p)) for p in inputs}
    earlier = [d for d in previous.get("inputs", []) if d.get("path") not in shown] if runs else []
    return runs, earlier
