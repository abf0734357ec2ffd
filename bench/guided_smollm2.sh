#!/usr/bin/env bash
# guided (GuidedQuant's gradient-weighted Hessians, issue 17) next to GPTQ and RSQ on SmolLM2-135M,
# on the CPU: the same calibration as bench/layer_budget_smollm2.sh (linux-docs train, 16 x 512
# tokens, seed 0 — never an evaluation text) and its evaluation (lowbit eval ppl on WikiText-2 test,
# ctx 512, the first 40 windows).
#
#   bench/guided_smollm2.sh [--nsamples 16] [--seqlen 512] [--ctx 512] [--windows 40] [--out DIR]
#                           [--seed N] [--ptq17 | --quip] [ROW ...]   (ROW = a row name below, e.g. guided-int3g128;
#                                                   default: all; rows of seed N > 0 are named ...-sN)
# --ptq17: instead, issue 17's other post-training methods on the same protocol (RTN, AWQ, COMQ,
# AdaQuant (~25 min a format on 2 loaded cores), Norm Tweaking on GPTQ, CLE at int4g128/int3g128/int2g64; PTQTP in tp2g128;
# AdaRound only when its rows are named, e.g. adaround-int3g128: ~40 h a format on the CPU, meant for
# QUANT_DEVICE=cuda, the loop on the GPU — bench/cuda/gpu_session.sh adaround). Copy
# docs/results/guided-smollm2.jsonl to DIR/rows.jsonl first to have the GPTQ/RSQ/guided rows in the table.
# --quip: QuIP's incoherence processing + GPTQ (--method quip, issue 16) next to plain GPTQ at int2g64
# and int3g128 (both rerun with the same binary; docs/results/quip.md).
# Models go to --out (default ~/.cache/lowbit-bench/guided), never into the repository; the table
# is printed and written to DIR/results.md. A row already in DIR/rows.jsonl is not rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${LOWBIT_SHARED:-../shared}
lowbit=${LOWBIT:-build-rel/lowbit}
nsamples=16 seqlen=512 ctx=512 windows=40 seed=0 ptq17=0 quip=0
out=${LOWBIT_BENCH_CACHE:-$HOME/.cache/lowbit-bench}/guided
threads=${THREADS:-2}
device=${QUANT_DEVICE:-cpu}  # the quantize runs' --device (the evaluation stays on the CPU)
rows_wanted=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nsamples) nsamples=$2; shift 2 ;; --seqlen) seqlen=$2; shift 2 ;; --ctx) ctx=$2; shift 2 ;;
    --windows) windows=$2; shift 2 ;; --out) out=$2; shift 2 ;; --seed) seed=$2; shift 2 ;;
    --ptq17) ptq17=1; shift ;;
    --quip) quip=1; shift ;;
    -*) echo "unknown option $1" >&2; exit 1 ;;
    *) rows_wanted+=("$1"); shift ;;
  esac
done
model=$shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$model" ] || { echo "SmolLM2 not found at $model" >&2; exit 1; }
mkdir -p "$out"
calib=$out/calib-linux-docs-2MB.txt
[ -f "$calib" ] || head -c 2000000 "$shared/data/linux-docs/train.txt" >"$calib"
wiki=$shared/data/wikitext-2-raw/wiki.test.raw
rows=$out/rows.jsonl
touch "$rows"

# run METHOD[:VARIANT] FORMAT [quantize flags...]: quantize, evaluate, append a row to rows.jsonl
# (row name METHOD[-VARIANT]-FORMAT)
run() {
  local method=${1%%:*} variant="" format=$2
  [[ "$1" == *:* ]] && variant=${1#*:}
  shift 2
  local name=$method${variant:+-$variant}-$format
  [ "$seed" != 0 ] && name=$name-s$seed
  if [ ${#rows_wanted[@]} -gt 0 ] && [[ ! " ${rows_wanted[*]} " == *" $name "* ]]; then return 0; fi
  grep -q "^{\"name\": \"$name\"" "$rows" && return 0
  local dir=$out/$name t0
  rm -rf "$dir"
  t0=$(date +%s.%N)
  "$lowbit" -q quantize -m "$model" --method "$method" --format "$format" --calib "$calib" --nsamples "$nsamples" \
    --seqlen "$seqlen" --seed "$seed" --threads "$threads" --device "$device" --json -o "$dir" "$@" >"$dir.quantize.json"
  local qs
  qs=$(python3 -c "print(round($(date +%s.%N) - $t0, 1))")
  "$lowbit" -q eval ppl -m "$dir" --tokenizer "$model" --text "$wiki" --ctx "$ctx" --max-windows "$windows" \
    --threads "$threads" --json >"$dir.ppl.json"
  python3 - "$name" "$method" "$format" "$seed" "$dir.quantize.json" "$dir.ppl.json" "$qs" "$@" >>"$rows" <<'PY'
import json, sys
name, method, fmt, seed, qj, pj, qs = sys.argv[1:8]
q, p = json.load(open(qj)), json.load(open(pj))
print(json.dumps({"name": name, "method": method, "flags": " ".join(sys.argv[8:]), "format": fmt, "seed": int(seed), "bits": q.get("bits_per_weight"), "ppl": p["ppl"],
                  "quantize_seconds": float(qs), "gradient_seconds": q.get("guided", {}).get("gradient_seconds")}))
PY
  rm -rf "$dir"  # the numbers are kept; the models are not needed again
}

if [ "$quip" = 1 ]; then
  for f in int2g64 int3g128; do
    run quip "$f"
    run gptq "$f"
  done
  for f in int2g64 int3g128; do run quip:input "$f" --quip-sides input; done
elif [ "$ptq17" = 1 ]; then
  for f in int4g128 int3g128 int2g64; do
    for m in rtn awq comq cle adaquant; do run "$m" "$f"; done
    run norm-tweak:gptq "$f" --base gptq
    # AdaRound: only when named (the paper's 10k iterations a layer; the loop runs on QUANT_DEVICE)
    if [[ " ${rows_wanted[*]:-} " == *" adaround-$f "* ]]; then run adaround "$f"; fi
  done
  run ptqtp tp2g128
else
  for f in int3g128 int2g64 int4g128; do
    for m in gptq guided rsq; do run "$m" "$f"; done
  done
  # guided with one group (the reference's GPTQ/SpinQuant setting) and with 8
  for f in int3g128 int4g128; do
    run guided:g1 "$f" --guided-groups 1
    run guided:g8 "$f" --guided-groups 8
  done
fi

python3 - "$rows" "$nsamples" "$seqlen" "$ctx" "$windows" <<'PY' | tee "$out/results.md"
import json, sys
rows, ns, sl, ctx, win = sys.argv[1:6]
print(f"SmolLM2-135M, calibration linux-docs train {ns} x {sl}; WikiText-2 test ppl, ctx {ctx}, {win} windows")
print()
print("| method | flags | format | seed | bits/weight (linears) | wiki ppl | quantize s (of which gradients) |")
print("|---|---|---|---:|---:|---:|---:|")
for l in open(rows):
    r = json.loads(l)
    g = f" ({r['gradient_seconds']:.0f})" if r.get("gradient_seconds") else ""
    print(f"| {r['method']} | {r.get('flags', '')} | {r['format']} | {r.get('seed', 0)} | {r['bits']:.3f} | {r['ppl']:.2f} | {r['quantize_seconds']:.0f}{g} |")
PY
