#!/usr/bin/env bash
# Packs what bench/cuda/packed_gpu.sh needs on a GPU machine without a toolchain into one file,
# .devcarry/packed-gpu.tar.xz (git-ignored; the device tool's carry limit is 64 MiB): the CUDA
# build's lowbit, test_quant, test_methods, quant_gemv_bench and the shared libraries the GPU
# machine lacks (Debian 12 paths). Build first:
#   cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DLOWBIT_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLOWBIT_TESTS=ON
#   cmake --build build-cuda --target lowbit_cli test_quant test_methods
# Then, on the GPU machine (carry [".devcarry/packed-gpu.tar.xz"]):
#   P=/tmp/pg; mkdir -p $P && tar -xJf .devcarry/packed-gpu.tar.xz -C $P
#   LD_LIBRARY_PATH=$P/lib:/usr/local/cuda/lib64 LOWBIT=$P/bin/lowbit BIN_DIR=$P/bin GEMV_BENCH=$P/bin/quant_gemv_bench \
#     bench/cuda/packed_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
B=${BUILD_DIR:-build-cuda}
S=$(mktemp -d)
mkdir -p "$S/bin" "$S/lib" .devcarry
nvcc -O3 -std=c++17 -arch=sm_90 -I src bench/cuda/quant_gemv_bench.cu -lcublas -o "$S/bin/quant_gemv_bench"
cp "$B/lowbit" "$B/tests/test_quant" "$B/tests/test_methods" "$S/bin/"
for l in libsentencepiece.so.0 libgomp.so.1 libopenblas.so.0 libgfortran.so.5 libquadmath.so.0; do
  cp -L "/lib/x86_64-linux-gnu/$l" "$S/lib/"
done
tar -C "$S" -cf - bin lib | xz -T2 -6 > .devcarry/packed-gpu.tar.xz
rm -rf "$S"
ls -la .devcarry/packed-gpu.tar.xz
