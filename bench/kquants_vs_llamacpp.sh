#!/usr/bin/env bash
# lowbit's 2- and 3-bit formats against llama.cpp's Q2_K / Q3_K on a model whose widths are
# multiples of 256 (SmolLM2's 576 are not, so llama.cpp's k-quants fall back to q4_0 there).
# The model is random (`lowbit train --steps 0`; speed does not depend on the values), by default
# dim 768, SwiGLU 2048, 12 layers, 12 heads, the 512-token stories260K vocabulary (so the
# vocabulary matrix is negligible and the comparison is about the quantized linears).
#
#   bench/kquants_vs_llamacpp.sh      # THREADS=2 P=64 N=32 R=3 DIM=768 HIDDEN=2048 LAYERS=12 HEADS=12
#
# Rows: lowbit int2g64 (2.5 bits/weight) and int2g32 (3.0) vs Q2_K (2.625, --pure), lowbit int3g64
# (3.5) and int3g128 (3.25) vs Q3_K (3.4375, --pure: every linear Q3_K, as lowbit's directory is
# one format). Both sides run the files from the same f32 model, same threads, back to back; the
# ratios are lowbit / llama.cpp. Files go to $LOWBIT_LLAMACPP_CACHE/kquants (default
# ~/.cache/lowbit-llamacpp/kquants), never into the repository. LLAMA_BIN, LLAMA_ARGS and
# OMP_WAIT_POLICY as in bench/packed_vs_llamacpp.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source "$(dirname "$0")/bench_lib.sh"  # llama(), lb(), random_model_settings
random_model_settings kquants
if [ ! -f "$dir/train/hf/config.json" ]; then
  rm -rf "$dir/train"
  "$LOWBIT" -q train --out "$dir/train" --train-tokens "$ids" --vocab 512 --dim "$DIM" --hidden-dim "$HIDDEN" \
    --layers "$LAYERS" --heads "$HEADS" --max-seq-len 1024 --steps 0 >/dev/null
fi
hf=$dir/train/hf
[ -f "$dir/f32.gguf" ] || "$LOWBIT" -q convert --from "$hf" --to "$dir/f32.gguf" --tokenizer "$tok" >/dev/null
for t in Q2_K Q3_K; do
  [ -f "$dir/$t.gguf" ] || "$BIN/llama-quantize" --pure "$dir/f32.gguf" "$dir/$t.gguf" "$t" >/dev/null 2>&1
done
for f in int2g64 int2g32 int3g64 int3g128; do
  [ -f "$dir/$f/config.json" ] || "$LOWBIT" -q quantize -m "$hf" --method rtn --format "$f" -o "$dir/$f" >/dev/null
done

echo "llama.cpp: $BIN ($LLAMA_ARGS)"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); threads $THREADS; pp$P tg$N, $R runs"
echo "model: random, dim $DIM, hidden $HIDDEN, $LAYERS layers, $HEADS heads, vocab 512"
echo
echo "| lowbit model | llama.cpp model | lowbit MiB | llama.cpp file MiB | lowbit pp t/s | llama.cpp pp t/s | pp ratio | lowbit tg t/s | llama.cpp tg t/s | tg ratio |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
row() {  # lowbit-dir llama-type
  read -r lpp ltg lbytes < <(lb "$dir/$1")
  read -r cpp ctg < <(llama "$dir/$2.gguf")
  python3 - "$1" "$2" "$lpp" "$ltg" "$lbytes" "$cpp" "$ctg" "$(stat -c %s "$dir/$2.gguf")" <<'EOF'
import sys
a, b, lpp, ltg, lbytes, cpp, ctg, cbytes = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
print(f"| {a} | {b} | {lbytes/2**20:.1f} | {cbytes/2**20:.1f} | {lpp:.1f} | {cpp:.1f} | {lpp/cpp:.2f} | {ltg:.1f} | {ctg:.1f} | {ltg/ctg:.2f} |")
EOF
}
row int2g64 Q2_K
row int2g32 Q2_K
row int3g64 Q3_K
row int3g128 Q3_K
