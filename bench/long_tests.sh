#!/usr/bin/env bash
# The long accuracy checks that the CI suite runs only in a smaller configuration: the
# stories260K method comparisons with the full calibration set (32 windows of 256 tokens), and
# ApiQ/SAPR trained on every ggml block type (the suite trains q4_0, q3_k and q4_k).
#   bench/long_tests.sh [build-dir]     (default build-rel; any build with LOWBIT_TESTS=ON)
# Each *Full test prints its perplexities; on a 2-core machine they take a few minutes in a
# Release build (about 15 minutes under the sanitizers).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build-rel}
cmake --build "$build" -j "$(nproc)" --target test_methods
export LOWBIT_LONG_TESTS=1
"$build"/tests/test_methods --gtest_filter='*Full*:ApiqGgml.*'
