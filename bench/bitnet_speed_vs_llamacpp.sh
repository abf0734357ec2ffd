#!/usr/bin/env bash
# Issue 15: ternary (BitNet b1.58) decode and prefill speed, lowbit against llama.cpp's TQ2_0, on a
# model whose widths are multiples of 256 (TQ2_0 blocks are 256 values). The model is random
# (`lowbit train --arch bitnet-b1.58 --steps 0`: the initial weights ternarized; speed does not
# depend on the values), by default dim 768, SwiGLU 2048, 12 layers, 12 heads, the 512-token
# stories260K vocabulary (so the comparison is about the ternary linears).
#
#   bench/bitnet_speed_vs_llamacpp.sh      # THREADS=2 P=64 N=32 R=3 DIM=768 HIDDEN=2048 LAYERS=12 HEADS=12
#
# Rows (same threads, back to back):
#   lowbit ternary dir   OUT/ternary as `lowbit train` writes it: lowbit's `ternary` format (2-bit codes,
#                        one f32 scale per matrix), the IntGroups int8-activation kernels
#   lowbit TQ2_0 GGUF    `lowbit quantize -m OUT/hf --method rtn --format tq2_0 -o tq2_0.gguf` (the same
#                        codes, scale rounded to f16), run by lowbit (ggml TQ2_0 blocks: generic row decode)
#   llama.cpp TQ2_0      that same GGUF in llama-bench
# Files go to $LOWBIT_LLAMACPP_CACHE/bitnet (default ~/.cache/lowbit-llamacpp/bitnet), never into the
# repository. LLAMA_BIN, LLAMA_ARGS and OMP_WAIT_POLICY as in bench/packed_vs_llamacpp.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source "$(dirname "$0")/bench_lib.sh"  # llama(), lb(), random_model_settings
random_model_settings bitnet
if [ ! -f "$dir/train/ternary/config.json" ]; then
  rm -rf "$dir/train"
  "$LOWBIT" -q train --out "$dir/train" --arch bitnet-b1.58 --tokenizer "$tok" --train-tokens "$ids" --vocab 512 \
    --dim "$DIM" --hidden-dim "$HIDDEN" --layers "$LAYERS" --heads "$HEADS" --max-seq-len 1024 --steps 0 >/dev/null
fi
[ -f "$dir/tq2_0.gguf" ] ||
  "$LOWBIT" -q quantize -m "$dir/train/hf" --method rtn --format tq2_0 -o "$dir/tq2_0.gguf" >/dev/null

echo "llama.cpp: $BIN ($LLAMA_ARGS)"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); threads $THREADS; pp$P tg$N, $R runs"
echo "model: random ternary, dim $DIM, hidden $HIDDEN, $LAYERS layers, $HEADS heads, vocab 512"
echo
read -r cpp ctg < <(llama "$dir/tq2_0.gguf")
cbytes=$(stat -c %s "$dir/tq2_0.gguf")
echo "| lowbit model | lowbit MiB | lowbit pp t/s | lowbit tg t/s | llama.cpp TQ2_0 pp t/s | llama.cpp TQ2_0 tg t/s (file $((cbytes / 1048576)) MiB) | pp ratio | tg ratio |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for m in train/ternary tq2_0.gguf; do
  read -r lpp ltg lbytes < <(lb "$dir/$m")
  python3 - "$m" "$lpp" "$ltg" "$lbytes" "$cpp" "$ctg" <<'PY'
import sys
name, lpp, ltg, lbytes, cpp, ctg = sys.argv[1], *map(float, sys.argv[2:])
print(f"| {name} | {lbytes/2**20:.1f} | {lpp:.1f} | {ltg:.1f} | {cpp:.1f} | {ctg:.1f} | {lpp/cpp:.2f} | {ltg/ctg:.2f} |")
PY
done
