#!/usr/bin/env bash
# Issue 10 / docs/results/kv-cq.md: does a window read whole or in pieces (`eval ppl --kv-chunk`)
# give the same perplexity on the packed Exact path? stories260K with int8pc (RTN) weights and a
# 2-bit KV cache quantizer (WKVQuant wkv2, smoothing calibrated by `quantize --calib`), the same
# weights with KIVI int2 / int4 and WKVQuant wkv4, and no KV quantization; `--kv-cache f32
# --kv-window 0`, 8 windows of 512 tokens of sample-tokens.i32; the whole window in one call, then
# `--kv-chunk 7` and `--kv-chunk 1`; `--matmul exact` (and `reference` for wkv2, 2 windows: the
# row-by-row oracle). --kv-window 0 with every KV quantizer (no full-precision window). Run for one or two binaries (BIN... ; default build-rel/lowbit):
#
#   bench/exact_rows_kv_260k.sh [BIN...]
#
# Prints one line per (binary, kv rule, matmul path): the perplexities whole / chunk 7 / chunk 1.
# PROBE=1: instead, per kv rule, the whole window on 2 windows with --matmul exact and reference: how
# much a ulp-level change of every product (another summation order) moves each rule's perplexity.
# PER_WINDOW=1: instead, wkv2 only, the summed NLL of each of the 8 windows (runs with --max-windows
# k and k - 1 subtracted), whole and --kv-chunk 7, per binary: where the gap between two orders sits.
# The quantized checkpoints and the calibration text go to ${LOWBIT_ROWS_CACHE:-~/.cache/lowbit-rows10}.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${LOWBIT_SHARED:-$ROOT/../shared}
S=$SHARED/models/stories260K
TOK=$S/sample-tokens.i32
for f in "$S/stories260K.bin" "$S/tok512.bin" "$TOK" "$SHARED/data/tinyshakespeare/input.txt"; do
  [[ -f $f ]] || { echo "exact_rows_kv_260k.sh: $f is missing (shared data); skipping" >&2; exit 0; }
done
BINS=("$@")
((${#BINS[@]})) || BINS=("$ROOT/build-rel/lowbit")
CACHE=${LOWBIT_ROWS_CACHE:-$HOME/.cache/lowbit-rows10}
mkdir -p "$CACHE"
head -c 200000 "$SHARED/data/tinyshakespeare/input.txt" > "$CACHE/ts.txt"
echo "# $(lscpu | grep 'Model name' | sed 's/  */ /g'); $(date -u +%FT%TZ); load $(cut -d' ' -f1-3 /proc/loadavg)"
# Checkpoints: made once with the first binary (quantization does not go through the packed path).
for kv in wkv2 wkv4 none; do
  [[ -f $CACHE/w8-$kv/config.json ]] && continue
  "${BINS[0]}" -q quantize -m "$S/stories260K.bin" --method rtn --format int8pc --kv-quant "$kv" \
    --calib "$CACHE/ts.txt" --tokenizer "$S/tok512.bin" --nsamples 2 --seqlen 128 -o "$CACHE/w8-$kv" > /dev/null
done
ppl() {  # BIN DIR WINDOWS MATMUL [ARGS...] -> perplexity
  local bin=$1 dir=$2 win=$3 mm=$4
  shift 4
  "$bin" -q eval ppl -m "$dir" --tokens "$TOK" --max-windows "$win" --kv-cache f32 --matmul "$mm" \
    --json "$@" 2>/dev/null | python3 -c 'import json,sys; print("%.6f" % json.load(sys.stdin)["ppl"])'
}
CELLS=("wkv2|w8-wkv2|--kv-window 0" "wkv4|w8-wkv4|--kv-window 0" "kivi-int2|w8-none|--kv-quant int2 --kv-window 0"
       "kivi-int4|w8-none|--kv-quant int4 --kv-window 0" "none|w8-none|")
if [[ ${PER_WINDOW:-0} == 1 ]]; then
  nll() {  # BIN WINDOWS [ARGS...] -> summed NLL of the first WINDOWS windows
    local bin=$1 win=$2
    shift 2
    "$bin" -q eval ppl -m "$CACHE/w8-wkv2" --tokens "$TOK" --max-windows "$win" --kv-cache f32 --kv-window 0 \
      --matmul exact --json "$@" 2>/dev/null | python3 -c 'import json,sys; j=json.load(sys.stdin); print("%.6f" % (j["nll"] * j["tokens"]))'
  }
  for bin in "${BINS[@]}"; do
    for chunk in whole 7; do
      prev=0
      line="$bin | wkv2 | $chunk |"
      for k in 1 2 3 4 5 6 7 8; do
        if [[ $chunk == whole ]]; then t=$(nll "$bin" $k); else t=$(nll "$bin" $k --kv-chunk 7); fi
        line="$line $(python3 -c "print('%.4f' % ($t - $prev))")"
        prev=$t
      done
      echo "$line"
    done
  done
  exit 0
fi
if [[ ${PROBE:-0} == 1 ]]; then
  for bin in "${BINS[@]}"; do
    for cell in "${CELLS[@]}"; do
      IFS='|' read -r name dir extra <<< "$cell"
      # shellcheck disable=SC2086
      e=$(ppl "$bin" "$CACHE/$dir" 2 exact $extra)
      # shellcheck disable=SC2086
      r=$(ppl "$bin" "$CACHE/$dir" 2 reference $extra)
      echo "$bin | $name | 2 windows whole | exact $e | reference $r | rel $(python3 -c "print('%.2e' % (abs($e - $r) / $r))") | load $(cut -d' ' -f1 /proc/loadavg)"
    done
  done
  exit 0
fi
for bin in "${BINS[@]}"; do
  for cell in "${CELLS[@]}"; do
    IFS='|' read -r name dir extra <<< "$cell"
    for mm in exact reference; do
      win=8
      if [[ $mm == reference ]]; then
        [[ $name == wkv2 ]] || continue
        win=2
      fi
      # shellcheck disable=SC2086
      whole=$(ppl "$bin" "$CACHE/$dir" $win $mm $extra)
      # shellcheck disable=SC2086
      c7=$(ppl "$bin" "$CACHE/$dir" $win $mm $extra --kv-chunk 7)
      c1=-
      # shellcheck disable=SC2086
      [[ $mm == exact ]] && c1=$(ppl "$bin" "$CACHE/$dir" $win $mm $extra --kv-chunk 1)
      echo "$bin | $name | $mm | $win windows | whole $whole | chunk7 $c7 | chunk1 $c1 | load $(cut -d' ' -f1 /proc/loadavg)"
    done
  done
done
