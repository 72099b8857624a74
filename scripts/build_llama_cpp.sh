#!/usr/bin/env bash
# Build llama.cpp, the peer this project measures itself against, from the source distribution of
# llama-cpp-python on PyPI (it vendors llama.cpp). Builds the command-line tools the tests and
# benchmarks call (llama-tokenize, llama-perplexity, llama-bench, llama-quantize, llama-simple) into a
# cache keyed by the version, so CI pays for the ~5-minute build once. Idempotent.
#
#   bash scripts/build_llama_cpp.sh            # prints the bin directory on its last line
#   MOBILLAMA_LLAMA_CPP=/path/to/bin pytest    # tests and benchmarks find the tools there
#   LLAMA_CPP_ISA=avx2 bash scripts/build_llama_cpp.sh   # AVX2/FMA only (no AVX-512), in its own cache
#                                                        # folder: the peer of the project's AVX2 kernels
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
ISA="${LLAMA_CPP_ISA:-native}"
case "$ISA" in
    native) ISA_FLAGS=(-DGGML_NATIVE=ON); SUFFIX="" ;;
    avx2) ISA_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
                     -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_BF16=OFF
                     -DGGML_AVX_VNNI=OFF); SUFFIX="-avx2" ;;
    *) echo "build_llama_cpp: LLAMA_CPP_ISA must be native or avx2, not '$ISA'" >&2; exit 1 ;;
esac
CACHE="${MOBILLAMA_CACHE:-$HOME/.cache/mobillama}/llama.cpp/$VERSION$SUFFIX"
BIN="$CACHE/bin"
TOOLS=(llama-tokenize llama-perplexity llama-bench llama-quantize llama-simple)
have_all() { for t in "${TOOLS[@]}"; do [ -x "$BIN/$t" ] || return 1; done; }
if have_all; then echo "$BIN"; exit 0; fi
command -v cmake >/dev/null || { echo "build_llama_cpp: cmake not found (apt-get install cmake)" >&2; exit 1; }
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
PIP="${PIP:-python3 -m pip}"
$PIP download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK" >&2
tar -xzf "$WORK"/llama_cpp_python-"$VERSION".tar.gz -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
# Static libraries: the tools then run from the cache with no library path to set.
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release "${ISA_FLAGS[@]}" -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON >&2
cmake --build "$WORK/build" -j "$(nproc)" --target "${TOOLS[@]}" >&2
mkdir -p "$CACHE.tmp/bin"
for t in "${TOOLS[@]}"; do cp "$WORK/build/bin/$t" "$CACHE.tmp/bin/"; done
rm -rf "$CACHE"
mv "$CACHE.tmp" "$CACHE"
echo "$BIN"
