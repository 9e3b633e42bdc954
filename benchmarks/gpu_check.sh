#!/usr/bin/env bash
# The GPU check in one call, on a machine with an NVIDIA GPU: what the machine has, what can be installed,
# then the GPU tests with MOEDGE_REQUIRE_GPU=1 (a missing capability fails, it never skips).
#
#   bash benchmarks/gpu_check.sh [--report-only]
#
# --report-only   the report alone: nothing installed, built or run (what a machine without a GPU can do)
# Env:
#   OUT           folder for gpu_check.json (the report before and after the installs, every step's rc and
#                 seconds) and gpu_check.log (all output); default build/gpu_check
#   PYTHON        the Python to start from (default python3; on the lent H200 machines, the image's, with torch)
#   VENV          the GPU environment (default /tmp/moedge-gpu-venv): a venv that also sees $PYTHON's packages,
#                 after its own. onnxruntime-gpu goes into it: its `onnxruntime` module shadows a CPU
#                 onnxruntime of $PYTHON, which is left as it is (never both in one environment).
#   WHEELS        a folder of wheels to install from instead of the index (--no-index): onnxruntime-gpu and
#                 its nvidia-* libraries, tensorrt*, polygraphy. Without it pip asks its index, and a machine
#                 that reaches none fails those steps quickly; the report says what is missing then.
#   TRT_PACKAGE   what pip installs for TensorRT (default: tensorrt<11, the TensorRT 10 API that
#                 runtime/tensorrt_build.py and tensorrt-stubs 10.13 follow; e.g. tensorrt-cu13<11)
#   ORT_GPU_PACKAGE  what pip installs for ONNX Runtime (default: onnxruntime-gpu[cuda,cudnn]; where the
#                 CUDA 13 libraries are already installed, as with the H200 image's torch: onnxruntime-gpu)
# On the lent H200 machines nothing can be downloaded: carry build/cpp (moedge-run, from `make cpp`) and a
# WHEELS folder (polygraphy is small; onnxruntime-gpu 1.31's wheel is 244 MiB and TensorRT's libraries
# more, beyond one call's 64 MiB), or the report and the failing tests say which of them is missing.
#   STEP_TIMEOUT  seconds for each install or build step (default 600); TEST_TIMEOUT for each test step (900)
# Steps never stop the script; each one's rc is recorded. Exit status: 0 when both test steps passed
# (with --report-only: 0 when the report was written).
set -u

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 2
REPORT_ONLY=0
case "${1:-}" in
  --report-only) REPORT_ONLY=1 ;;
  "") ;;
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  *) echo "unknown argument: $1 (use --report-only or nothing)" >&2; exit 2 ;;
esac
OUT="${OUT:-$ROOT/build/gpu_check}"
mkdir -p "$OUT" || exit 2
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-/tmp/moedge-gpu-venv}"
TRT_PACKAGE="${TRT_PACKAGE:-tensorrt<11}"
ORT_GPU_PACKAGE="${ORT_GPU_PACKAGE:-onnxruntime-gpu[cuda,cudnn]}"
STEP_TIMEOUT="${STEP_TIMEOUT:-600}"
TEST_TIMEOUT="${TEST_TIMEOUT:-900}"
LOG="$OUT/gpu_check.log"
WORK="$(mktemp -d)" || exit 2  # scratch: $OUT keeps only gpu_check.json, gpu_check.log and the JUnit files
trap 'rm -rf "$WORK"' EXIT
STEPS="$WORK/steps.tsv"
: >"$LOG"
: >"$STEPS"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# step NAME TIMEOUT COMMAND...: run it, log its output, record "NAME<tab>rc<tab>seconds"; never aborts.
step() {
  local name="$1" limit="$2" start rc
  shift 2
  echo "=== $name: $*" | tee -a "$LOG"
  start=$(date +%s)
  timeout "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - start))" >>"$STEPS"
  echo "=== $name: rc=$rc" | tee -a "$LOG"
  return 0
}

# report.py FILE: versions and the tests' own capability lines (tests/gpu/capabilities.py), as JSON.
cat >"$WORK/report.py" <<'PY'
import importlib, json, platform, shutil, subprocess, sys

out = {"python": sys.version.split()[0], "executable": sys.executable, "machine": platform.machine()}
def run(*cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return (r.stdout + r.stderr).strip() if r.returncode == 0 else f"exit {r.returncode}: {(r.stdout + r.stderr).strip()[:300]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"failed: {exc}"
smi = shutil.which("nvidia-smi")
out["nvidia_smi"] = run(smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader") if smi else "not installed"
for name in ("onnxruntime", "tensorrt", "polygraphy", "torch", "onnx", "transformers", "pytest"):
    try:
        mod = importlib.import_module(name)
        out[name] = getattr(mod, "__version__", "no __version__ (stubs only?)")
    except Exception as exc:  # ImportError, or a library that fails to load
        out[name] = f"missing: {' '.join(str(exc).split())[:200]}"
try:
    import onnxruntime as ort
    out["onnxruntime_providers"] = ort.get_available_providers()
    out["onnxruntime_file"] = ort.__file__
except Exception:
    pass
try:
    import torch
    out["torch_cuda"] = torch.cuda.is_available() and torch.cuda.get_device_name(0)
except Exception:
    pass
try:
    from tests.gpu import capabilities as caps
    out["capabilities"] = {
        name: getattr(caps, f"{name}_missing")() or "ok" for name in ("gpu", "cuda_ep", "tensorrt", "cpp_cuda")
    }
except Exception as exc:
    out["capabilities"] = f"not checked: {' '.join(str(exc).split())[:200]}"
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps(out, indent=1))
PY
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

echo "=== machine" | tee -a "$LOG"
{ uname -a; nvidia-smi -L 2>&1 || echo "nvidia-smi: not found or failed"; ls -l /dev/nvidia0 2>&1
  ldconfig -p 2>/dev/null | grep -E 'libcudart|libcublas\.|libcudnn\.|libnvinfer\.' | head -20; } >>"$LOG" 2>&1
step report-before 300 "$PYTHON" "$WORK/report.py" "$WORK/report-before.json"

if [ "$REPORT_ONLY" = 0 ]; then
  PIP_SOURCE=(--timeout 20 --retries 1)
  [ -n "${WHEELS:-}" ] && PIP_SOURCE=(--no-index --find-links "$WHEELS")
  # The GPU environment: a venv whose own packages come first, then (a .pth file) every package of
  # $PYTHON, which may itself be a venv (the H200 image's python3 is /opt/torch/.venv's), so torch and
  # the rest stay usable without --system-site-packages, which would only reach the base interpreter's.
  cat >"$WORK/inherit.py" <<'PY'
import pathlib, subprocess, sys, sysconfig
code = "import site, sysconfig; p = sysconfig.get_paths(); print(*dict.fromkeys([p['purelib'], p['platlib'], *site.getsitepackages()]))"
base = subprocess.run([sys.argv[1], "-c", code], capture_output=True, text=True, check=True).stdout.split()
pth = pathlib.Path(sysconfig.get_paths()["purelib"]) / "_gpu_check_base_python.pth"
pth.write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in base))  # their .pth files count too
print(pth, base)
PY
  VPY="$VENV/bin/python"
  PIP=("$VPY" -m pip)
  if [ ! -x "$VPY" ]; then
    step venv "$STEP_TIMEOUT" "$PYTHON" -m venv "$VENV"
    [ -x "$VPY" ] || step venv-without-pip "$STEP_TIMEOUT" "$PYTHON" -m venv --without-pip "$VENV"
  fi
  if [ -x "$VPY" ]; then
    "$VPY" -m pip --version >/dev/null 2>&1 || PIP=("$PYTHON" -m pip --python "$VPY")
    step venv-inherit 60 "$VPY" "$WORK/inherit.py" "$PYTHON"
    step onnxruntime-gpu "$STEP_TIMEOUT" "${PIP[@]}" install -q "${PIP_SOURCE[@]}" "$ORT_GPU_PACKAGE"
  else  # no venv: the base Python, where onnxruntime-gpu is not installed beside its onnxruntime
    VPY="$PYTHON"
    PIP=("$PYTHON" -m pip)
  fi
  step tensorrt "$STEP_TIMEOUT" "${PIP[@]}" install -q "${PIP_SOURCE[@]}" "$TRT_PACKAGE" polygraphy
  # moedge itself, without touching what the environment already has (torch stays the image's CUDA build);
  # where pip cannot (no wheel package for --no-build-isolation), the tree `make typecheck` uses: moedge/
  # with calibration, export, graph_passes and runtime linked in, first on PYTHONPATH.
  step moedge "$STEP_TIMEOUT" "${PIP[@]}" install -q --no-deps --no-build-isolation -e .
  if [ "$(tail -n 1 "$STEPS" | cut -f 2)" != 0 ]; then
    # shellcheck disable=SC2016  # expanded by the inner bash
    step moedge-tree 60 bash -c 'mkdir -p "$1/moedge" && cp -rs "$PWD/moedge/." "$1/moedge/" &&
      for p in calibration export graph_passes runtime; do ln -sfn "$PWD/$p" "$1/moedge/$p"; done' _ "$WORK/pkg"
    export PYTHONPATH="$WORK/pkg:$PYTHONPATH"
  fi
  # the test dependencies the environment lacks, by import name (nothing is fetched when all import)
  cat >"$WORK/deps.py" <<'PY'
import importlib.util
wanted = {"pytest": "pytest", "hypothesis": "hypothesis", "onnx": "onnx", "onnx_ir": "onnx-ir",
          "onnxscript": "onnxscript", "torch": "torch", "transformers": "transformers<6",
          "tokenizers": "tokenizers", "safetensors": "safetensors", "gguf": "gguf", "tqdm": "tqdm",
          "accelerate": "accelerate", "sentencepiece": "sentencepiece", "numpy": "numpy"}
print(*[pkg for mod, pkg in wanted.items() if importlib.util.find_spec(mod) is None])
PY
  read -r -a MISSING <<<"$("$VPY" "$WORK/deps.py" 2>>"$LOG")"
  echo "=== test dependencies missing: ${MISSING[*]:-none}" | tee -a "$LOG"
  if [ "${#MISSING[@]}" -gt 0 ]; then
    step test-deps "$STEP_TIMEOUT" "${PIP[@]}" install -q "${PIP_SOURCE[@]}" "${MISSING[@]}"
  fi
  # moedge-run: carried from a machine that ran `make cpp`, else its release build alone (this needs CMake,
  # a compiler, nlohmann-json and the ORT SDK, which cpp/scripts/fetch_ort_sdk.sh downloads or finds cached)
  if [ ! -x build/cpp/moedge-run ]; then
    # shellcheck disable=SC2016  # expanded by the inner bash
    step build-moedge-run "$STEP_TIMEOUT" bash -c 'sdk=$(cpp/scripts/fetch_ort_sdk.sh) &&
      cmake -S cpp -B build/cpp -DONNXRUNTIME_ROOT="$sdk" -DCMAKE_BUILD_TYPE=Release &&
      cmake --build build/cpp -j "$(nproc)" --target moedge-run'
  fi
  step report-after 300 "$VPY" "$WORK/report.py" "$WORK/report-after.json"
  export MOEDGE_REQUIRE_GPU=1
  step pytest-gpu "$TEST_TIMEOUT" "$VPY" -m pytest -m gpu -q -rA -p no:cacheprovider tests/gpu \
    --ignore=tests/gpu/test_cpp_gpu.py --junitxml="$OUT/gpu_python.xml"
  step pytest-cpp-gpu "$TEST_TIMEOUT" "$VPY" -m pytest -m gpu -q -rA -p no:cacheprovider \
    tests/gpu/test_cpp_gpu.py --junitxml="$OUT/gpu_cpp.xml"
fi

# gpu_check.json: the reports and every step, through benchmarks/provenance.py (the writer of every
# benchmark JSON: commit, versions, CPU, build flags); written by whichever Python runs.
JSON_PY="$PYTHON"
command -v "$JSON_PY" >/dev/null 2>&1 || JSON_PY=python3
"$JSON_PY" - "$OUT" "$WORK" "$REPORT_ONLY" "$ROOT/benchmarks" <<'PY'
import json, pathlib, sys
out, work, report_only = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3] == "1"
sys.path.insert(0, sys.argv[4])
def load(name):
    try:
        return json.loads((work / name).read_text())
    except (OSError, ValueError):
        return None
steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    steps.append({"step": name, "rc": int(rc), "seconds": int(seconds)})
tests = [s for s in steps if s["step"].startswith("pytest")]
doc = {"report_before": load("report-before.json"), "report_after": load("report-after.json"),
       "steps": steps, "report_only": report_only,
       "tests_passed": None if report_only else bool(tests) and all(s["rc"] == 0 for s in tests)}
try:
    from provenance import write_result
    write_result(out / "gpu_check.json", benchmark="gpu_check",
                 command=["bash", "benchmarks/gpu_check.sh", *(["--report-only"] if report_only else [])],
                 threads=None, inputs=[], runs=steps, results=doc, engines=("onnxruntime",),
                 statistic="every step once (runs: its exit status and seconds); tests_passed: both pytest steps exit 0")
except Exception as exc:  # the report is written whatever happens (a Python too old for the writer)
    doc["provenance_error"] = f"{type(exc).__name__}: {exc}"
    (out / "gpu_check.json").write_text(json.dumps(doc, indent=1) + "\n")
print(json.dumps({"steps": steps, "tests_passed": doc["tests_passed"]}))
PY
echo "results: $OUT/gpu_check.json, log: $LOG"

if [ "$REPORT_ONLY" = 1 ]; then
  [ -s "$OUT/gpu_check.json" ]
  exit $?
fi
awk -F'\t' '$1 ~ /^pytest/ { n++; if ($2 != 0) bad = 1 } END { exit (n == 2 && !bad) ? 0 : 1 }' "$STEPS"
rc=$?
exit "$rc"
