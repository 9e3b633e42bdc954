#!/usr/bin/env bash
# Install what building cpp/ needs from Debian/Ubuntu packages, when missing: a C++17 compiler, CMake,
# nlohmann/json (nlohmann-json3-dev) and OpenSSL's libcrypto headers (libssl-dev). With --fuzz, also
# clang and its libFuzzer runtime (libclang-rt-N-dev, N clang's major version) for the manifest fuzzer.
set -euo pipefail
fuzz=0
for arg in "$@"; do
  case "$arg" in
    --fuzz) fuzz=1 ;;
    *) echo "usage: $0 [--fuzz]" >&2; exit 2 ;;
  esac
done

apt_install() {
  [ $# -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null; then
    echo "[install_deps] not a Debian/Ubuntu system: install $* (or their equivalents) yourself" >&2
    exit 1
  fi
  echo "[install_deps] installing $*" >&2
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "[install_deps] need root (or sudo) to apt-get install $*" >&2; exit 1; }
    sudo="sudo -n"  # never wait for a password inside make
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -qq "$@" >/dev/null 2>&1 || {
    $sudo apt-get update -qq >/dev/null
    $sudo apt-get install -y -qq "$@" >/dev/null
  }
}

missing=()
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
command -v cmake >/dev/null || missing+=(cmake)
if command -v dpkg >/dev/null; then
  dpkg -s nlohmann-json3-dev >/dev/null 2>&1 || missing+=(nlohmann-json3-dev)
  dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
fi
if [ "$fuzz" -eq 1 ]; then
  command -v clang++ >/dev/null || missing+=(clang)
fi
apt_install "${missing[@]+"${missing[@]}"}"

if [ "$fuzz" -eq 1 ]; then
  # libFuzzer ships apart from clang on Debian (bookworm: libclang-rt-14-dev).
  fuzzer_lib="$(clang++ -print-resource-dir)/lib/linux/libclang_rt.fuzzer-$(uname -m).a"
  if [ ! -f "$fuzzer_lib" ]; then
    major=$(clang++ -dumpversion | cut -d. -f1)
    apt_install "libclang-rt-${major}-dev"
  fi
fi
