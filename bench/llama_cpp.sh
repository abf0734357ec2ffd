#!/usr/bin/env bash
# Builds the peer runtime llama.cpp OUTSIDE the repository, from the source that PyPI's
# llama-cpp-python sdist vendors (folder vendor/llama.cpp), and prints the folder of its binaries.
# The download and the builds are cached: a second call only prints the path.
#
#   bench/llama_cpp.sh            CPU build (GGML_NATIVE: this machine's instruction sets)
#   bench/llama_cpp.sh --cuda     CUDA build for sm_90 (H100), to carry to the GPU machine
#   bench/llama_cpp.sh --avx2     CPU build for AVX2/FMA/F16C only (no GGML_NATIVE): the native build
#                                 dies with "Illegal instruction" on hosts whose CPU lists AMX/AVX-512
#                                 features the container may not run (seen 2026-12-05 on the shared box)
#   ... --server                  also build llama-server (bench/serve_vs_llamacpp.sh); added to an
#                                 existing build folder without rebuilding the rest
#
# Cache: $LOWBIT_LLAMACPP_CACHE (default ~/.cache/lowbit-llamacpp). Nothing of llama.cpp is committed.
# Targets: llama-perplexity llama-quantize llama-bench llama-simple llama-completion.
set -euo pipefail
cache=${LOWBIT_LLAMACPP_CACHE:-$HOME/.cache/lowbit-llamacpp}
variant=cpu
server=0
for arg in "$@"; do
  case "$arg" in
    --cuda) variant=cuda ;;
    --avx2) variant=cpu-avx2 ;;
    --server) server=1 ;;
    *) echo "llama_cpp.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
mkdir -p "$cache/src"
log="$cache/build-$variant.log"

sdist=$(ls "$cache"/src/llama_cpp_python-*.tar.gz 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$sdist" ]; then
  # --no-build-isolation needs scikit-build-core to read the sdist's metadata; with isolation pip
  # would install a whole build environment just to download.
  python3 -m pip install --quiet scikit-build-core >&2
  python3 -m pip download --no-deps --no-binary :all: --no-build-isolation llama-cpp-python -d "$cache/src" >&2
  sdist=$(ls "$cache"/src/llama_cpp_python-*.tar.gz | sort -V | tail -n 1)
fi
version=$(basename "$sdist" .tar.gz)
srcdir="$cache/$version"
if [ ! -f "$srcdir/vendor/llama.cpp/CMakeLists.txt" ]; then
  tar -xzf "$sdist" -C "$cache"
fi

build="$cache/build-$version-$variant"
targets=(llama-perplexity llama-quantize llama-bench llama-simple llama-completion llama-imatrix)
if [ ! -x "$build/bin/llama-bench" ]; then
  args=(-DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
        -DBUILD_SHARED_LIBS=OFF)
  if [ "$variant" = cuda ]; then
    args+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF
           -DCMAKE_CUDA_COMPILER=${CUDACXX:-/usr/local/cuda/bin/nvcc})
  elif [ "$variant" = cpu-avx2 ]; then
    args+=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
  else
    args+=(-DGGML_NATIVE=ON)
  fi
  echo "building llama.cpp ($version, $variant) in $build; log: $log" >&2
  cmake -S "$srcdir/vendor/llama.cpp" -B "$build" -G Ninja "${args[@]}" >"$log" 2>&1
  cmake --build "$build" -j "$(nproc)" --target "${targets[@]}" >>"$log" 2>&1 ||
    { tail -n 30 "$log" >&2; exit 1; }
fi
if [ ! -x "$build/bin/llama-imatrix" ]; then  # builds made before llama-imatrix was in the list
  cmake --build "$build" -j "$(nproc)" --target llama-imatrix >>"$log" 2>&1 || { tail -n 30 "$log" >&2; exit 1; }
fi
if [ "$server" = 1 ] && [ ! -x "$build/bin/llama-server" ]; then
  echo "building llama-server in $build; log: $log" >&2
  cmake -S "$srcdir/vendor/llama.cpp" -B "$build" -DLLAMA_BUILD_SERVER=ON >>"$log" 2>&1
  cmake --build "$build" -j "$(nproc)" --target llama-server >>"$log" 2>&1 ||
    { tail -n 30 "$log" >&2; exit 1; }
fi
echo "$build/bin"
