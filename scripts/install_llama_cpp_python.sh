#!/usr/bin/env bash
# Install llama-cpp-python (llama.cpp's Python bindings) into a Python environment, built once from its
# source distribution on PyPI into a cached wheel, so that the tests which run this project's GGUF files
# in llama.cpp itself (tests/convert/test_gguf_llama_cpp.py) run in CI instead of skipping. The build
# compiles llama.cpp (~5 minutes on 2 cores); later calls reuse the wheel. Idempotent.
#
#   bash scripts/install_llama_cpp_python.sh .venv/bin/python
#
# The same as `pip install ".[peer]"` (which builds from the sdist every time), with the wheel cached.
set -euo pipefail
PYTHON="${1:-python3}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
WHEELS="${MOBILLAMA_CACHE:-$HOME/.cache/mobillama}/llama.cpp/$VERSION/wheels"
if "$PYTHON" -c "import importlib.metadata as m, sys; sys.exit(m.version('llama-cpp-python') != '$VERSION')" 2>/dev/null; then
    echo "llama-cpp-python $VERSION already installed for $PYTHON"
    exit 0
fi
command -v cmake >/dev/null || { echo "install_llama_cpp_python: cmake not found (apt-get install cmake)" >&2; exit 1; }
wheel() { ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1; }
if [ -z "$(wheel)" ]; then
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK" >&2
    # The library only: no multimodal (llava) library, no examples or tools; tuned for this CPU, as the
    # command-line tools of scripts/build_llama_cpp.sh are, so both measure the same llama.cpp.
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$PYTHON" -m pip wheel -q --no-deps "$WORK"/llama_cpp_python-"$VERSION".tar.gz -w "$WORK/wheels" >&2
    mkdir -p "$WHEELS"
    cp "$WORK"/wheels/llama_cpp_python-"$VERSION"-*.whl "$WHEELS/"
fi
"$PYTHON" -m pip install -q "$(wheel)"
echo "llama-cpp-python $VERSION installed for $PYTHON from $(wheel)"
