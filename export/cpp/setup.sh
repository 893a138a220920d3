#!/usr/bin/env bash
# Gets ONNX Runtime's and OpenVINO's C++ headers and libraries from registry packages and builds
# export/cpp/build/prtool-embed. Changes nothing outside the build folder (no package sources, no
# system install).
#
#   export/cpp/setup.sh            # fetch what is missing, configure, build; prints the binary's path
#   export/cpp/setup.sh --check    # only check the toolchain; exit 3 with the install command if short
#
# Where each piece comes from:
# - ONNX Runtime library: the PyPI onnxruntime wheel (onnxruntime/capi/libonnxruntime.so.1.*), taken
#   from $PYTHON's installed onnxruntime (the library prtool's Python side runs), else downloaded.
# - ONNX Runtime headers: Debian's libonnxruntime-dev of the trixie release (1.21; the bookworm release
#   has none), downloaded with apt-get into a private state folder (its own source list, lists and
#   cache under build/deps/apt; the machine's sources stay as they are) and unpacked, not installed.
#   The C API is versioned and forward compatible: 1.21 headers drive the 1.32 library.
# - OpenVINO: the PyPI openvino wheel, a full C++ SDK (include/, cmake/OpenVINOConfig.cmake, libs/).
# - libpng, libjpeg-turbo, OpenSSL (sha256), nlohmann-json: Debian dev packages.
#
# Environment: PYTHON (default: the repository's .venv/bin/python, else python3), OPENVINO_VERSION,
# ORT_HEADERS_SUITE (default trixie), PRTOOL_EMBED_BUILD (default export/cpp/build).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BUILD=${PRTOOL_EMBED_BUILD:-$HERE/build}
DEPS=$BUILD/deps
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
OPENVINO_VERSION=${OPENVINO_VERSION:-2026.4.1}
ORT_HEADERS_SUITE=${ORT_HEADERS_SUITE:-trixie}
APT_PACKAGES="cmake g++ libpng-dev libjpeg-dev libssl-dev nlohmann-json3-dev"

log() { echo "setup.sh: $*" >&2; }

check_toolchain() {
  local missing=()
  for tool in cmake c++ apt-get dpkg-deb; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  for header in png.h jpeglib.h openssl/evp.h nlohmann/json.hpp; do
    command -v c++ >/dev/null && echo "#include <$header>" | c++ -std=c++17 -E -x c++ - >/dev/null 2>&1 \
      || missing+=("<$header>")
  done
  "$PYTHON" -m pip --version >/dev/null 2>&1 || missing+=("pip for $PYTHON")
  if [ ${#missing[@]} -gt 0 ]; then
    echo "missing: ${missing[*]}; install with: apt-get install -y $APT_PACKAGES" \
         "(a Debian or Ubuntu machine; set PYTHON to a Python with pip)" >&2
    return 3
  fi
}

# extract_wheel WHEEL DEST PREFIX: the wheel's members under PREFIX, written under DEST without it.
extract_wheel() {
  "$PYTHON" - "$1" "$2" "$3" <<'PY'
import pathlib, sys, zipfile
wheel, dest, prefix = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = dest / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(name))
PY
}

pip_download() {  # pip_download SPEC: prints the downloaded wheel's path
  mkdir -p "$DEPS/wheels"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d "$DEPS/wheels" "$1" >&2
  ls -t "$DEPS/wheels/${1%%==*}"-*.whl | head -1
}

ort_library() {  # re-taken when $PYTHON's onnxruntime changes version
  local lib=$DEPS/onnxruntime/lib capi so
  if capi=$("$PYTHON" -c 'import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__) + "/capi")' 2>/dev/null); then
    so=$(ls "$capi"/libonnxruntime.so.1.* | head -1)
    [ -e "$lib/$(basename "$so")" ] && return
    log "ONNX Runtime library from $capi"
  else
    [ -e "$lib/libonnxruntime.so" ] && return
    capi=$DEPS/onnxruntime/wheel
    extract_wheel "$(pip_download onnxruntime)" "$capi" onnxruntime/capi/
    so=$(ls "$capi"/libonnxruntime.so.1.* | head -1)
  fi
  rm -rf "$lib" && mkdir -p "$lib"
  cp "$so" "$lib/"
  ln -sf "$(basename "$so")" "$lib/libonnxruntime.so.1"  # the soname; the wheel has no file of that name
  ln -sf libonnxruntime.so.1 "$lib/libonnxruntime.so"
}

debian_mirror() {  # the machine's own Debian archive, as apt is configured to reach it
  apt-get indextargets --format '$(REPO_URI) $(SUITE) $(COMPONENT)' 'Identifier: Packages' 2>/dev/null \
    | awk '$3 == "main" && $2 !~ /security/ {print $1; exit}'
}

ort_headers() {
  local inc=$DEPS/onnxruntime/include apt=$DEPS/apt mirror
  [ -f "$inc/onnxruntime_cxx_api.h" ] && return
  mirror=$(debian_mirror)
  [ -n "$mirror" ] || { log "no Debian archive configured for apt: cannot fetch libonnxruntime-dev"; exit 1; }
  rm -rf "$apt" && mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$inc"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $ORT_HEADERS_SUITE main" \
    > "$apt/sources.list"
  local opts=(-q -o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
              -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o Debug::NoLocking=1)
  apt-get "${opts[@]}" update >/dev/null
  (cd "$apt" && apt-get "${opts[@]}" download libonnxruntime-dev 2>&1 | grep -v unsandboxed >&2 || true)
  dpkg-deb -x "$apt"/libonnxruntime-dev_*.deb "$apt/root"
  cp "$apt"/root/usr/include/onnxruntime/*.h "$inc/"
  log "ONNX Runtime headers from $(basename "$apt"/libonnxruntime-dev_*.deb) ($ORT_HEADERS_SUITE)"
  rm -rf "$apt/lists" "$apt/cache" "$apt/root"
}

openvino_sdk() {
  local dir=$DEPS/openvino
  [ -f "$dir/cmake/OpenVINOConfig.cmake" ] && return
  rm -rf "$dir"
  local wheel
  wheel=$(pip_download "openvino==$OPENVINO_VERSION")
  for part in include cmake libs; do extract_wheel "$wheel" "$dir/$part" "openvino/$part/"; done
  rm -f "$wheel"  # 59 MB; pip keeps its own cache
  log "OpenVINO SDK from $(basename "$wheel")"
}

check_toolchain || exit 3
mkdir -p "$BUILD"
[ "${1:-}" = "--check" ] && exit 0
ort_library
ort_headers
openvino_sdk
cmake -S "$HERE" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DONNXRUNTIME_INCLUDE_DIR="$DEPS/onnxruntime/include" \
  -DONNXRUNTIME_LIB_DIR="$DEPS/onnxruntime/lib" -DOpenVINO_DIR="$DEPS/openvino/cmake" >"$BUILD/cmake.log" 2>&1 \
  || { cat "$BUILD/cmake.log" >&2; exit 1; }
cmake --build "$BUILD" -j "$(nproc)" >"$BUILD/build.log" 2>&1 || { cat "$BUILD/build.log" >&2; exit 1; }
echo "$BUILD/prtool-embed"
