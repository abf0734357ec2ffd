#!/usr/bin/env bash
# Issue 15: ternary (BitNet b1.58) decode and prefill speed, lowbit against llama.cpp's TQ2_0 and
# TQ1_0, on a model whose widths are multiples of 256 (TQ blocks are 256 values). The model is random
# (`lowbit train --arch bitnet-b1.58 --steps 0`: the initial weights ternarized; speed does not
# depend on the values), by default dim 768, SwiGLU 2048, 12 layers, 12 heads, the 512-token
# stories260K vocabulary (so the comparison is about the ternary linears).
#
#   bench/bitnet_speed_vs_llamacpp.sh      # THREADS=2 P=64 N=32 R=3 DIM=768 HIDDEN=2048 LAYERS=12 HEADS=12
#   LOWBIT_BEFORE=/path/to/older/lowbit bench/bitnet_speed_vs_llamacpp.sh   # also rows of that binary
#
# Rows (same threads, back to back), each against llama-bench on the GGUF file named in the row:
#   train/ternary   OUT/ternary as `lowbit train` writes it: lowbit's `ternary` format (2-bit codes, one
#                   f32 scale per matrix), against llama.cpp on tq2_0.gguf
#   tq2_0.gguf      `lowbit quantize -m OUT/hf --method rtn --format tq2_0 -o tq2_0.gguf` (the same codes,
#                   scale rounded to f16), run by lowbit and by llama.cpp
#   tq1_0.gguf      the same with --format tq1_0 (base-3 digits, 1.69 bits per weight)
# lowbit decodes and prefills all three with the int8-activation ternary kernels of quant_matmul (activation
# blocks of 256, as llama.cpp's q8_K). With LOWBIT_BEFORE set, its rows follow, marked "(before)".
# BEST_OF=K repeats the tokens/s measurements K times, interleaved, and keeps each cell's best run.
# The load average is printed before and after: llama.cpp's spinning threads lose far more than
# lowbit on a busy machine, so only ratios measured at a low load mean anything. A second table is
# steadier on a shared machine: CPU seconds (user + sys) per decoded token on 1 thread, of
# `lowbit bench -p 0 -n CN -r CR --threads 1` and `llama-bench -p 0 -n CN -r CR -t 1` less the same
# commands with -n 1 -r 1 (load and warm-up), CN=64 CR=10 by default (the "before" binary gets the
# ternary row only there: older binaries decode the GGUF files row by row, very slowly). A third
# table: CPU seconds per prompt token on 1 thread, `-p CP -n 0 -r CPR` less the same with -r 1
# (CP=256 CPR=4), every row for the "before" binary too. CPU=0 skips both CPU tables, CPU_TG=0 /
# CPU_PP=0 one of them.
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
for f in tq2_0 tq1_0; do
  [ -f "$dir/$f.gguf" ] ||
    "$LOWBIT" -q quantize -m "$dir/train/hf" --method rtn --format "$f" -o "$dir/$f.gguf" >/dev/null
done

echo "llama.cpp: $BIN ($LLAMA_ARGS)"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); threads $THREADS; pp$P tg$N, $R runs; best of ${BEST_OF:-1}"
echo "model: random ternary, dim $DIM, hidden $HIDDEN, $LAYERS layers, $HEADS heads, vocab 512"
echo
bins=("$LOWBIT")
[ -n "${LOWBIT_BEFORE:-}" ] && bins+=("$LOWBIT_BEFORE")
vmax() {  # "a b c" "d e f" -> the larger of each pair ("" counts as nothing)
  python3 -c 'import sys; r=[list(map(float, a.split())) for a in sys.argv[1:] if a.strip()]; print(*[max(c) for c in zip(*r)])' "$@"
}
# BEST_OF rounds (default 1), each running every measurement once, interleaved; each cell keeps its
# best round (on a busy machine the least disturbed run of each program).
declare -A cres lres
for ((round = 0; round < ${BEST_OF:-1}; round++)); do
  for f in tq2_0 tq1_0; do cres[$f]=$(vmax "${cres[$f]:-}" "$(llama "$dir/$f.gguf")"); done
  for bin in "${bins[@]}"; do
    for m in train/ternary tq2_0.gguf tq1_0.gguf; do
      lres[$bin:$m]=$(vmax "${lres[$bin:$m]:-}" "$(LOWBIT="$bin" lb "$dir/$m")")
    done
  done
done
echo "| lowbit model | lowbit MiB | lowbit pp t/s | lowbit tg t/s | llama.cpp file (MiB) | llama.cpp pp t/s | llama.cpp tg t/s | pp ratio | tg ratio |"
echo "|---|---:|---:|---:|---|---:|---:|---:|---:|"
for bin in "${bins[@]}"; do
  tag=""
  [ "$bin" != "$LOWBIT" ] && tag=" (before)"
  for m in train/ternary tq2_0.gguf tq1_0.gguf; do
    f=tq2_0
    [ "$m" = tq1_0.gguf ] && f=tq1_0
    read -r lpp ltg lbytes <<<"${lres[$bin:$m]}"
    read -r cpp ctg <<<"${cres[$f]}"
    cbytes=$(stat -c %s "$dir/$f.gguf")
    python3 - "$m$tag" "$f.gguf" "$cbytes" "$lpp" "$ltg" "$lbytes" "$cpp" "$ctg" <<'PY'
import sys
name, cfile, cbytes = sys.argv[1], sys.argv[2], float(sys.argv[3])
lpp, ltg, lbytes, cpp, ctg = map(float, sys.argv[4:])
print(f"| {name} | {lbytes/2**20:.1f} | {lpp:.1f} | {ltg:.1f} | {cfile} ({cbytes/2**20:.1f}) | {cpp:.1f} | {ctg:.1f} | {lpp/cpp:.2f} | {ltg/ctg:.2f} |")
PY
  done
done
echo
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
[ "${CPU:-1}" = 0 ] && exit 0

CN=${CN:-64} CR=${CR:-10} CP=${CP:-256} CPR=${CPR:-4}
cpu_s() {  # command... -> CPU seconds (user + sys)
  /usr/bin/time -f "%U %S" "$@" 2>&1 >/dev/null | tail -1 | awk '{print $1 + $2}'
}
per_token() {  # full_s base_s tokens -> ms per token
  python3 -c "import sys; print(f'{(float(sys.argv[1]) - float(sys.argv[2])) * 1000 / float(sys.argv[3]):.3f}')" "$@"
}
# One CPU table. $1 = tg: decode, -p 0 -n CN -r CR less -n 1 -r 1 (CN x CR tokens); pp: prefill,
# -p CP -n 0 -r CPR less -r 1 (CP x (CPR - 1) tokens; the same load and warm-up in both).
cpu_table() {
  local full_args base_args tokens what
  if [ "$1" = tg ]; then
    full_args=(-p 0 -n "$CN"); base_args=(-p 0 -n 1); tokens=$((CN * CR)); what="decoded token, 1 thread (tg$CN x $CR less tg1 x 1)"
  else
    full_args=(-p "$CP" -n 0); base_args=(-p "$CP" -n 0); tokens=$((CP * (CPR - 1))); what="prompt token, 1 thread (pp$CP x $CPR less pp$CP x 1)"
  fi
  local fr=$CR
  [ "$1" = pp ] && fr=$CPR
  echo
  echo "CPU time per $what, load $(cut -d' ' -f1-3 /proc/loadavg):"
  echo
  declare -A cms
  for f in tq2_0 tq1_0; do
    full=$(cpu_s "$BIN/llama-bench" -m "$dir/$f.gguf" "${full_args[@]}" -r "$fr" -t 1 $LLAMA_ARGS)
    base=$(cpu_s "$BIN/llama-bench" -m "$dir/$f.gguf" "${base_args[@]}" -r 1 -t 1 $LLAMA_ARGS)
    cms[$f]=$(per_token "$full" "$base" "$tokens")
  done
  echo "| lowbit model | lowbit CPU ms/token | llama.cpp file | llama.cpp CPU ms/token | llama.cpp / lowbit |"
  echo "|---|---:|---|---:|---:|"
  for bin in "${bins[@]}"; do
    tag=""
    models=(train/ternary tq2_0.gguf tq1_0.gguf)
    [ "$bin" != "$LOWBIT" ] && tag=" (before)" && [ "$1" = tg ] && models=(train/ternary)
    for m in "${models[@]}"; do
      f=tq2_0
      [ "$m" = tq1_0.gguf ] && f=tq1_0
      full=$(cpu_s "$bin" -q bench -m "$dir/$m" "${full_args[@]}" -r "$fr" --threads 1)
      base=$(cpu_s "$bin" -q bench -m "$dir/$m" "${base_args[@]}" -r 1 --threads 1)
      l=$(per_token "$full" "$base" "$tokens")
      python3 -c "import sys; print(f'| {sys.argv[1]} | {sys.argv[2]} | {sys.argv[3]}.gguf | {sys.argv[4]} | {float(sys.argv[4]) / float(sys.argv[2]):.2f} |')" \
        "$m$tag" "$l" "$f" "${cms[$f]}"
    done
  done
}
[ "${CPU_TG:-1}" = 0 ] || cpu_table tg
[ "${CPU_PP:-1}" = 0 ] || cpu_table pp
echo
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
