#!/usr/bin/env bash
# Builds lowbit and runs the whole test suite under AddressSanitizer + UndefinedBehaviorSanitizer
# (host code; CUDA code is compiled when nvcc is present and its tests skip without a GPU).
# Usage: scripts/test.sh [extra ctest args]   (LOWBIT_TEST_BUILD=dir to choose the build folder)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
build=${LOWBIT_TEST_BUILD:-build-test}
# ccache shared by every clone of the repository on this machine (CI builds in a fresh clone).
export CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/lowbit-ccache} CCACHE_BASEDIR=$PWD CCACHE_NOHASHDIR=1
# -O1: sanitizer builds compile much faster than at -O3 and the suite still runs in minutes.
# LOWBIT_GLUE_OPT=-O0: the test executables and the CLI (no hot code) compile 2-3x faster still.
# Long accuracy checks are skipped here; bench/long_tests.sh runs them (LOWBIT_LONG_TESTS=1).
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE=-O1 -DLOWBIT_GLUE_OPT=-O0 \
      -DLOWBIT_SANITIZE=address,undefined -DLOWBIT_TESTS=ON ${LOWBIT_CMAKE_ARGS:-} >/dev/null
cmake --build "$build" -j "$(nproc)"
# protect_shadow_gap=0: the CUDA runtime maps memory where ASan keeps its shadow gap.
export ASAN_OPTIONS=${ASAN_OPTIONS:-protect_shadow_gap=0:detect_leaks=0:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export OMP_WAIT_POLICY=passive
ctest --test-dir "$build" --output-on-failure -j "$(nproc)" "$@"
