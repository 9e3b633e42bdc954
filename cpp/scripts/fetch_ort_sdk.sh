#!/usr/bin/env bash
# Assemble a minimal ONNX Runtime C/C++ SDK (include/ + lib/) from sources that
# are reachable through PyPI and npm only:
#   * headers : npm com.github.asus4.onnxruntime@0.4.9 (MIT) -> Plugins/Android/onnxruntime.aar -> headers/
#               (ORT 1.29 header set, ORT_API_VERSION 29)
#   * library : PyPI onnxruntime==1.32.0 wheel -> onnxruntime/capi/libonnxruntime.so.1.32.0
# Every download (and the extracted .so) is checked against a sha256 pinned below.
#
# The SDK is what cpp/CMakeLists.txt takes as -DONNXRUNTIME_ROOT=; the binaries load the library at run
# time (dlopen), so a device's own ONNX Runtime >= 1.29 can replace the one fetched here.
#
# Usage: fetch_ort_sdk.sh [--out DIR] [--cache DIR] [--arch x86_64|aarch64]
# Env:   ORT_SDK_OUT, ORT_SDK_CACHE, ORT_SDK_ARCH (same meaning)
# Default: ${MOEDGE_CACHE:-~/.cache/moedge}/ort-sdk/onnxruntime-1.32.0-<arch> (downloads cached beside it);
# an SDK already there with the pinned library is kept as is. Prints the SDK folder on stdout.
set -euo pipefail

ROOT_CACHE="${MOEDGE_CACHE:-${HOME:?set HOME or MOEDGE_CACHE}/.cache/moedge}/ort-sdk"
ARCH="${ORT_SDK_ARCH:-$(uname -m)}"
OUT="${ORT_SDK_OUT:-}"
CACHE="${ORT_SDK_CACHE:-$ROOT_CACHE/downloads}"
while [ $# -gt 0 ]; do
  case "$1" in
    --out)   OUT="$2"; shift 2 ;;
    --cache) CACHE="$2"; shift 2 ;;
    --arch)  ARCH="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

# ---------------------------------------------------------------- pins
ORT_VERSION=1.32.0
HDR_API_VERSION=29
NPM_NAME=com.github.asus4.onnxruntime
NPM_VERSION=0.4.9
NPM_URL="https://registry.npmjs.org/${NPM_NAME}/-/${NPM_NAME}-${NPM_VERSION}.tgz"
NPM_SHA256=e59788788818fdde1b2e522e766a21ba0f7d8391de55737abf81e32cc801785d
# npm dist.integrity: sha512-BkzxduSZ9IkeDP6Q8lz2TFU2ie7hSSvS7ZIfzMooExoq0CNzJnuuGaUJ7IsojBgqO4ouD1jXah8OYyJbCN29Fg==
NPM_AAR_PATH=package/Plugins/Android/onnxruntime.aar
HDR_C_API_SHA256=acc0cf4b3f28d39339c76770d76164bb7a0637dc89f5fde764b4017b632f6743

# The wheel only carries the native lib; python tag is irrelevant to it, cp311 is pinned.
case "$ARCH" in
  x86_64|amd64)
    WHEEL=onnxruntime-${ORT_VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl
    WHEEL_URL=https://files.pythonhosted.org/packages/1d/46/e6f356c9539d2eed44126de3421a81e217da2ad91b22dc11b379cb1e384f/$WHEEL
    WHEEL_SHA256=5a34fc4dfeb5a7b4a74c95dcba1e773d722abda720b474edf1b0c419dc6d163d
    SO_SHA256=6c1585d1bbf45b0712ea4a21b705c5fcb4ba04ff2e30f1fbf81a49faf658638f
    PIP_PLATFORM=manylinux_2_28_x86_64 ;;
  aarch64|arm64)
    WHEEL=onnxruntime-${ORT_VERSION}-cp311-cp311-manylinux_2_28_aarch64.whl
    WHEEL_URL=https://files.pythonhosted.org/packages/b7/30/103820b32e9dc1d1fcfc5b519fd2de5bd699d25a25895caf5d726350d1b5/$WHEEL
    WHEEL_SHA256=2303372a85299b6757b0e11e1cbf13e410ddf7e10c37f4b37e99d1c90e7daf7c
    SO_SHA256=49852228a93995158b2a813d4df487d47a1b76b0eaa894507ef49e91b6d7954a
    PIP_PLATFORM=manylinux_2_28_aarch64 ;;
  *) echo "unsupported arch: $ARCH" >&2; exit 2 ;;
esac
SO_NAME=libonnxruntime.so.${ORT_VERSION}
OUT="${OUT:-$ROOT_CACHE/onnxruntime-${ORT_VERSION}-${ARCH}}"

# ---------------------------------------------------------------- helpers
log() { echo "[fetch_ort_sdk] $*" >&2; }
die() { echo "[fetch_ort_sdk] ERROR: $*" >&2; exit 1; }
verify() {  # verify FILE SHA256
  local got; got=$(sha256sum "$1" | cut -d' ' -f1)
  [ "$got" = "$2" ] || { echo "[fetch_ort_sdk] sha256 mismatch for $1: got $got want $2" >&2; return 1; }
}

for t in sha256sum tar python3; do command -v "$t" >/dev/null || die "missing tool: $t"; done

# unzip_members ZIP DEST MEMBER...: extract members (a trailing / takes a folder) flat into DEST
unzip_members() {
  python3 - "$@" <<'PY'
import sys, zipfile, os
archive, dest, *members = sys.argv[1:]
with zipfile.ZipFile(archive) as z:
    for info in z.infolist():
        if info.is_dir() or not any(info.filename == m or (m.endswith("/") and info.filename.startswith(m)) for m in members):
            continue
        with z.open(info) as src, open(os.path.join(dest, os.path.basename(info.filename)), "wb") as out:
            out.write(src.read())
PY
}

if [ -f "$OUT/SDK_INFO" ] && [ -f "$OUT/lib/$SO_NAME" ] && verify "$OUT/lib/$SO_NAME" "$SO_SHA256" 2>/dev/null \
  && [ -f "$OUT/include/onnxruntime_c_api.h" ] && verify "$OUT/include/onnxruntime_c_api.h" "$HDR_C_API_SHA256" 2>/dev/null; then
  log "SDK present: $OUT"
  echo "$OUT"
  exit 0
fi


# fetch DEST SHA256 URL FALLBACK_CMD...  (cached; verified; fallback runs in a temp dir
# and must leave exactly the expected basename there)
fetch() {
  local dest="$1" sha="$2" url="$3"; shift 3
  if [ -f "$dest" ] && verify "$dest" "$sha" 2>/dev/null; then log "cached: $dest"; return 0; fi
  rm -f "$dest" "$dest.part"
  log "downloading $url"
  if command -v curl >/dev/null && curl -fsSL --retry 3 -o "$dest.part" "$url"; then
    mv "$dest.part" "$dest"
  elif [ $# -gt 0 ]; then
    log "direct download failed; trying: $*"
    local tmp; tmp=$(mktemp -d "$CACHE/fb.XXXXXX")
    if ! (cd "$tmp" && "$@" >&2 && mv "$tmp/$(basename "$dest")" "$dest"); then
      rm -rf "$tmp" "$dest.part"; die "cannot download $url (nor with: $*)"
    fi
    rm -rf "$tmp"
  else
    die "cannot download $url"
  fi
  verify "$dest" "$sha" || { rm -f "$dest"; die "refusing unverified download $dest"; }
}

# ---------------------------------------------------------------- download
mkdir -p "$CACHE"
NPM_TGZ="$CACHE/${NPM_NAME}-${NPM_VERSION}.tgz"
fetch "$NPM_TGZ" "$NPM_SHA256" "$NPM_URL" npm pack --silent "${NPM_NAME}@${NPM_VERSION}"
fetch "$CACHE/$WHEEL" "$WHEEL_SHA256" "$WHEEL_URL" \
  python3 -m pip download --no-deps --only-binary=:all: --platform "$PIP_PLATFORM" \
    --python-version 3.11 --implementation cp -d . "onnxruntime==${ORT_VERSION}"

# ---------------------------------------------------------------- assemble
mkdir -p "$(dirname "$OUT")"
STAGE=$(mktemp -d "${OUT%/}.stage.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/sdk/include" "$STAGE/sdk/lib" "$STAGE/sdk/licenses" "$STAGE/x"

log "extracting headers from $NPM_AAR_PATH"
tar -xzf "$NPM_TGZ" -C "$STAGE/x" "$NPM_AAR_PATH" package/LICENSE
unzip_members "$STAGE/x/$NPM_AAR_PATH" "$STAGE/sdk/include" headers/
verify "$STAGE/sdk/include/onnxruntime_c_api.h" "$HDR_C_API_SHA256" || die "unexpected header content"
grep -q "^#define ORT_API_VERSION ${HDR_API_VERSION}\$" "$STAGE/sdk/include/onnxruntime_c_api.h" \
  || die "ORT_API_VERSION is not ${HDR_API_VERSION}"
cp "$STAGE/x/package/LICENSE" "$STAGE/sdk/licenses/LICENSE.${NPM_NAME}"

log "extracting $SO_NAME from $WHEEL"
mkdir -p "$STAGE/x/whl"
unzip_members "$CACHE/$WHEEL" "$STAGE/x/whl" "onnxruntime/capi/$SO_NAME" onnxruntime/LICENSE \
  onnxruntime/ThirdPartyNotices.txt
verify "$STAGE/x/whl/$SO_NAME" "$SO_SHA256" || die "unexpected library content"
install -m 0755 "$STAGE/x/whl/$SO_NAME" "$STAGE/sdk/lib/$SO_NAME"
ln -s "$SO_NAME" "$STAGE/sdk/lib/libonnxruntime.so.1"
ln -s libonnxruntime.so.1 "$STAGE/sdk/lib/libonnxruntime.so"
cp "$STAGE/x/whl/LICENSE" "$STAGE/sdk/licenses/LICENSE.onnxruntime"
cp "$STAGE/x/whl/ThirdPartyNotices.txt" "$STAGE/sdk/licenses/ThirdPartyNotices.onnxruntime.txt"

cat > "$STAGE/sdk/SDK_INFO" <<EOF
onnxruntime_library_version=${ORT_VERSION}
headers_ort_api_version=${HDR_API_VERSION}
arch=${ARCH}
headers_source=${NPM_URL}
headers_source_sha256=${NPM_SHA256}
library_source=${WHEEL_URL}
library_source_sha256=${WHEEL_SHA256}
${SO_NAME}_sha256=${SO_SHA256}
EOF

if [ -e "$OUT" ] && [ ! -f "$OUT/SDK_INFO" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  die "$OUT exists and is not an SDK this script made: choose another --out"
fi
rm -rf "${OUT:?}"
mv "$STAGE/sdk" "$OUT"
log "SDK ready at $OUT"
echo "$OUT"
