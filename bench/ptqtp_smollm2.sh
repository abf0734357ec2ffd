#!/usr/bin/env bash
# PTQTP (tp2g128) next to RTN tp2g128 / int4g128 / int3g128 / int2g64 on SmolLM2-135M, all data-free,
# WikiText-2 test perplexity at ctx 512 over 40 windows (the FP GGUF evaluated the same way).
#   bench/ptqtp_smollm2.sh [OUT_DIR]       (default /tmp/ptqtp-smol); results: docs/results/ptqtp.md
# Runs a copy of the binary (LOWBIT, default build-rel/lowbit) with 2 threads, one job at a time.
set -u
here=$(cd "$(dirname "$0")" && pwd)
shared=${LOWBIT_SHARED:-$here/../../shared}
out=${1:-/tmp/ptqtp-smol}
mkdir -p "$out"
cp "${LOWBIT:-$here/../build-rel/lowbit}" "$out/lowbit"
L=$out/lowbit
M=$shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
T=$shared/models/smollm2-135m-instruct/tokenizer-llamacpp-smollm.json  # the GGUF's own tokenizer, as a file
W=$shared/data/wikitext-2-raw/wiki.test.raw
for job in "ptqtp tp2g128" "rtn tp2g128" "rtn int2g64" "rtn int3g128" "rtn int4g128"; do
  set -- $job
  d=$out/$1-$2
  [ -d "$d" ] || /usr/bin/time -f "%e s wall, %M KB max RSS" "$L" quantize -m "$M" --method "$1" --format "$2" \
    --threads 2 -o "$d" --json > "$d.quantize.json" 2> "$d.quantize.err"
  "$L" eval ppl -m "$d" --tokenizer "$T" --text "$W" --ctx 512 --max-windows 40 --threads 2 --json > "$d.ppl.json" 2> "$d.ppl.err"
done
"$L" eval ppl -m "$M" --text "$W" --ctx 512 --max-windows 40 --threads 2 --json > "$out/fp.ppl.json" 2> "$out/fp.ppl.err"
python3 - "$out" <<'PY'
import json, sys, os
out = sys.argv[1]
print("| model | method | format | bits/weight | WikiText-2 ppl | quantize s | eval tokens/s |")
print("|---|---|---|---:|---:|---:|---:|")
fp = json.load(open(f"{out}/fp.ppl.json"))
print(f"| SmolLM2-135M Q4_1 (FP reference) | - | - | - | {fp['ppl']:.3f} | - | {fp['tokens_per_second']:.0f} |")
for n in ["ptqtp-tp2g128", "rtn-tp2g128", "rtn-int2g64", "rtn-int3g128", "rtn-int4g128"]:
    if not os.path.exists(f"{out}/{n}.ppl.json"): continue
    q, p = json.load(open(f"{out}/{n}.quantize.json")), json.load(open(f"{out}/{n}.ppl.json"))
    print(f"| SmolLM2-135M | {q['method']} | {q['format']} | {q['bits_per_weight']:.3f} | {p['ppl']:.3f} | {q['seconds']:.1f} | {p['tokens_per_second']:.0f} |")
PY
