#!/usr/bin/env bash
# LQER and FP8/FP4 activations on stories260K (issue 16), a seconds-long smoke run:
# RTN int4g32 / int8pc weights, per-token activations, perplexity on sample-tokens.i32 (ctx 64).
# NOTE: the LQER activation scales are taken from the first 8 x 64 windows of the same tokens the
# perplexity reads (stories260K ships no other token file): a smoke test, not a held-out measurement.
#
#   bench/lqer_fp_stories.sh [--lowbit BIN] [--out DIR]
set -euo pipefail
shared=${LOWBIT_SHARED:-$(cd "$(dirname "$0")/../.." && pwd)/shared}
lowbit=build-rel/lowbit out=lqer-fp-stories
while [ $# -gt 0 ]; do
  case "$1" in
    --lowbit) lowbit=$2; shift 2 ;; --out) out=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 1 ;;
  esac
done
S=$shared/models/stories260K
M=$S/stories260K-gguf-v1-f32.gguf
T=$S/sample-tokens.i32
mkdir -p "$out"
q() { local o=$1; shift; [ -f "$out/$o/config.json" ] || "$lowbit" -q quantize -m "$M" --method rtn --calib-tokens "$T" \
        --nsamples 8 --seqlen 64 "$@" -o "$out/$o" > /dev/null; }
e() { "$lowbit" -q eval ppl -m "$1" --tokens "$T" --ctx 64 --json "${@:2}" |
        python3 -c 'import json,sys; print("%.4f" % json.load(sys.stdin)["ppl"])'; }
q w4 --format int4g32
q w8 --format int8pc
for r in 4 8 16; do q w4r$r --format int4g32 --lqer-rank $r; done
q w4r8n --format int4g32 --lqer-rank 8 --lqer-scale none
echo "| model | activations | perplexity |"
echo "|---|---|---:|"
echo "| FP | none | $(e "$M" --dequantize) |"
for a in none int8 fp8 int4 fp4-mx fp4-nv; do echo "| W4 int4g32 RTN | $a | $(e "$out/w4" --act $a) |"; done
for a in none int8 fp8; do echo "| W8 int8pc RTN | $a | $(e "$out/w8" --act $a) |"; done
for m in w4r4 w4r8 w4r16 w4r8n; do
  for a in none int8; do echo "| W4 + LQER ${m#w4} | $a | $(e "$out/$m" --act $a) |"; done
done
