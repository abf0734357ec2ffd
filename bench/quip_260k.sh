#!/usr/bin/env bash
# QuIP's incoherence processing (--method quip, both sides and --quip-sides input) next to plain GPTQ
# on stories260K (docs/results/quip.md): calibration on the first 32 sampled sequences of
# ../shared/models/stories260K/sample-tokens.i32 (32 x 256 tokens), perplexity on the other 32
# (ctx 257). Seconds per run; prints one line per (format, method).
#
#   bench/quip_260k.sh [FORMAT ...]   (default: int2g32 int2g64 int3g32 int4g32 int2pc int3pc int4pc)
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${LOWBIT_SHARED:-../shared}
lowbit=${LOWBIT:-build-rel/lowbit}
S=$shared/models/stories260K
[ -f "$S/stories260K.bin" ] || { echo "stories260K not found under $S" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$S/sample-tokens.i32" "$tmp" <<'PY'
import sys
d = open(sys.argv[1], 'rb').read()
open(sys.argv[2] + '/calib.i32', 'wb').write(d[:32 * 257 * 4])
open(sys.argv[2] + '/eval.i32', 'wb').write(d[32 * 257 * 4:])
PY
formats=("$@")
[ ${#formats[@]} -gt 0 ] || formats=(int2g32 int2g64 int3g32 int4g32 int2pc int3pc int4pc)
for f in "${formats[@]}"; do
  for m in "gptq" "quip" "quip --quip-sides input"; do
    # shellcheck disable=SC2086
    "$lowbit" -q quantize -m "$S/stories260K.bin" --method $m --format "$f" --calib-tokens "$tmp/calib.i32" \
      --nsamples 32 --seqlen 256 --threads "${THREADS:-1}" -o "$tmp/q" --json >/dev/null
    p=$("$lowbit" -q eval ppl -m "$tmp/q" --tokenizer "$S/tok512.model" --tokens "$tmp/eval.i32" --ctx 257 \
      --threads "${THREADS:-1}" --json | python3 -c "import json,sys; print(round(json.load(sys.stdin)['ppl'], 3))")
    echo "$f | $m | $p"
    rm -rf "$tmp/q"
  done
done
