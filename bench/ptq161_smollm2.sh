#!/usr/bin/env bash
# PTQ1.61 (ptq161) on SmolLM2-135M: calibration on the first 4 MB of the linux-docs text (16 windows
# of 512 tokens), WikiText-2 test perplexity at ctx 512 over 40 windows — the command of the RTN
# int2g64 (484,688) and PTQTP (175.0) rows of docs/results/ptqtp.md.
#   bench/ptq161_smollm2.sh [OUT_DIR]      (default /tmp/ptq161-smol); results: docs/results/ptq161.md
# Runs a copy of the binary (LOWBIT, default build-rel/lowbit) with 2 threads, one job at a time.
set -u
here=$(cd "$(dirname "$0")" && pwd)
shared=${LOWBIT_SHARED:-$here/../../shared}
out=${1:-/tmp/ptq161-smol}
mkdir -p "$out"
cp "${LOWBIT:-$here/../build-rel/lowbit}" "$out/lowbit"
L=$out/lowbit
M=$shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
T=$shared/models/smollm2-135m-instruct/tokenizer-llamacpp-smollm.json  # the GGUF's own tokenizer, as a file
W=$shared/data/wikitext-2-raw/wiki.test.raw
head -c 4000000 "$shared/data/linux-docs/train.txt" > "$out/calib.txt"
# NAME METHOD FORMAT [flags]: ptq161 (defaults), its closed-form scales only, plain binarization
# (no salient channel) with the scale fit, ptq161 with 2 passes of the block-wise step, and RTN
# int2g64 (data-free) as the reference row.
while read -r name method fmt flags; do
  d=$out/$name
  calib=(--calib "$out/calib.txt" --nsamples 16 --seqlen 512)
  [ "$method" = rtn ] && calib=()
  [ -d "$d" ] || /usr/bin/time -f "%e s wall, %M KB max RSS" "$L" quantize -m "$M" --method "$method" --format "$fmt" $flags \
    "${calib[@]}" --threads 2 -o "$d" --json > "$d.quantize.json" 2> "$d.quantize.err"
  "$L" eval ppl -m "$d" --tokenizer "$T" --text "$W" --ctx 512 --max-windows 40 --threads 2 --json > "$d.ppl.json" 2> "$d.ppl.err"
done <<'JOBS'
ptq161 ptq161 ptq161
ptq161-closed ptq161 ptq161 --ptq161-iters 0
binary-fit ptq161 ptq161 --ptq161-ratio 0
ptq161-block2 ptq161 ptq161 --ptq161-block-epochs 2
rtn-int2g64 rtn int2g64
JOBS
[ -f "$out/fp.ppl.json" ] || "$L" eval ppl -m "$M" --text "$W" --ctx 512 --max-windows 40 --threads 2 --json > "$out/fp.ppl.json" 2> "$out/fp.ppl.err"
python3 - "$out" <<'PY'
import json, sys, os
out = sys.argv[1]
print("| model | method | bits/weight | WikiText-2 ppl | quantize s | eval tokens/s |")
print("|---|---|---:|---:|---:|---:|")
fp = json.load(open(f"{out}/fp.ppl.json"))
print(f"| SmolLM2-135M Q4_1 (FP reference) | - | - | {fp['ppl']:.3f} | - | {fp['tokens_per_second']:.0f} |")
for n in ["ptq161", "ptq161-closed", "binary-fit", "ptq161-block2", "rtn-int2g64"]:
    if not os.path.exists(f"{out}/{n}.ppl.json"): continue
    q, p = json.load(open(f"{out}/{n}.quantize.json")), json.load(open(f"{out}/{n}.ppl.json"))
    print(f"| SmolLM2-135M | {n} | {q['bits_per_weight']:.3f} | {p['ppl']:.3f} | {q['seconds']:.1f} | {p['tokens_per_second']:.0f} |")
PY
