#!/usr/bin/env bash
# System packages the test suite needs beyond PyPI: Debian's chromium and its chromedriver for the
# chat page's browser test (tests/serve/test_browser.py), and cmake + a C++ compiler to build llama.cpp
# (scripts/build_llama_cpp.sh). Idempotent: does nothing when all exist.
# Needs root (or sudo) and the Debian mirrors; the browser is never downloaded by a test tool.
set -euo pipefail
if [ -x /usr/bin/chromium ] && command -v chromedriver >/dev/null 2>&1 \
    && command -v cmake >/dev/null 2>&1 && command -v c++ >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium chromium-driver cmake g++
