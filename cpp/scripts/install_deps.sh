#!/usr/bin/env bash
# Install what building cpp/ needs from Debian/Ubuntu packages, when missing: a C++17 compiler, CMake,
# nlohmann/json (nlohmann-json3-dev) and OpenSSL's libcrypto headers (libssl-dev).
set -euo pipefail
missing=()
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
command -v cmake >/dev/null || missing+=(cmake)
if command -v dpkg >/dev/null; then
  dpkg -s nlohmann-json3-dev >/dev/null 2>&1 || missing+=(nlohmann-json3-dev)
  dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
fi
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "[install_deps] not a Debian/Ubuntu system: install ${missing[*]} (or their equivalents) yourself" >&2
  exit 1
fi
echo "[install_deps] installing ${missing[*]}" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "[install_deps] need root (or sudo) to apt-get install ${missing[*]}" >&2; exit 1; }
  sudo="sudo -n"  # never wait for a password inside make
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 || {
  $sudo apt-get update -qq >/dev/null
  $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}
