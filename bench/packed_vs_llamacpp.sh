#!/usr/bin/env bash
# lowbit's packed CPU inference side by side with llama.cpp on SmolLM2-135M-Instruct: the same
# GGUF files (Q4_1 as shipped, Q4_0 and Q8_0 made by llama-quantize), plus lowbit's own int4g32
# (5.0 bits/weight, RTN) against Q4_1 (5.0). Same machine, same thread count, one run each.
#
#   bench/packed_vs_llamacpp.sh            # THREADS=2 P=128 N=64 R=3 by default
#
# Prints a markdown table: tokens/s of both, and the ratios lowbit / llama.cpp (goals: decode
# >= 1.0, prefill >= 0.8). Converted models go to $LOWBIT_LLAMACPP_CACHE/models (default
# ~/.cache/lowbit-llamacpp/models), never into the repository. Needs bench/llama_cpp.sh (or
# LLAMA_BIN=<folder with llama-bench, llama-quantize>) and a built build-rel/lowbit.
set -euo pipefail
cd "$(dirname "$0")/.."
LOWBIT=${LOWBIT:-build-rel/lowbit}
SHARED=${LOWBIT_SHARED:-../shared}
THREADS=${THREADS:-2}
P=${P:-128}
N=${N:-64}
R=${R:-3}
BIN=${LLAMA_BIN:-$(bench/llama_cpp.sh)}
# --repack 0: on the 2-core dev VM the CPU advertises AMX but llama.cpp's AMX buffer type dies with
# SIGILL (the VM does not grant the tile state); repack 0 keeps llama.cpp off it (it also turns off
# llama.cpp's AVX2 q4_0 repacking, which lowbit's comparison should note). Override with LLAMA_ARGS.
LLAMA_ARGS=${LLAMA_ARGS:---repack 0}
cache=${LOWBIT_LLAMACPP_CACHE:-$HOME/.cache/lowbit-llamacpp}/models
mkdir -p "$cache"
src=$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$src" ] || { echo "missing $src (set LOWBIT_SHARED)" >&2; exit 1; }
for t in Q4_0 Q8_0; do
  [ -f "$cache/smollm2-135m-$t.gguf" ] ||
    "$BIN/llama-quantize" --allow-requantize "$src" "$cache/smollm2-135m-$t.gguf" "$t" >/dev/null 2>&1
done
# lowbit's own int4g32 (RTN) of the same model, loaded through the exact f32 path of the GGUF.
own=$cache/smollm2-135m-lowbit-int4g32
[ -f "$own/config.json" ] ||
  "$LOWBIT" -q quantize -m "$src" --method rtn --format int4g32 -o "$own" >/dev/null

source "$(dirname "$0")/bench_lib.sh"  # llama(), lb()
echo "llama.cpp: $BIN ($LLAMA_ARGS)"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores; threads $THREADS; pp$P tg$N, $R runs"
echo
echo "| lowbit model | llama.cpp model | lowbit MiB | lowbit pp t/s | llama.cpp pp t/s | pp ratio | lowbit tg t/s | llama.cpp tg t/s | tg ratio |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
row() {  # lowbit-model llama-model label-lowbit label-llama
  read -r lpp ltg lbytes < <(lb "$1")
  read -r cpp ctg < <(llama "$2")
  python3 - "$3" "$4" "$lpp" "$ltg" "$lbytes" "$cpp" "$ctg" <<'EOF'
import sys
a, b, lpp, ltg, lbytes, cpp, ctg = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
print(f"| {a} | {b} | {lbytes/2**20:.1f} | {lpp:.1f} | {cpp:.1f} | {lpp/cpp:.2f} | {ltg:.1f} | {ctg:.1f} | {ltg/ctg:.2f} |")
EOF
}
row "$src" "$src" "Q4_1 gguf" "Q4_1"
row "$cache/smollm2-135m-Q4_0.gguf" "$cache/smollm2-135m-Q4_0.gguf" "Q4_0 gguf" "Q4_0"
row "$cache/smollm2-135m-Q8_0.gguf" "$cache/smollm2-135m-Q8_0.gguf" "Q8_0 gguf" "Q8_0"
row "$own" "$src" "int4g32 (own dir)" "Q4_1"
