#!/usr/bin/env bash
# MatQuant (qat --method matquant, quant/matryoshka.h) on stories260K, CPU (issue 15): the int8 /
# int4 / int2 slices of one Matryoshka model against the same block-wise training (Block-AP,
# `qat --method efficientqat --steps 0`) run at each width alone, against the slices of a Block-AP
# int8 model trained for int8 only (the paper's "sliced int8" baseline) and against RTN. Same data
# and same token budget for every trained row: Block-AP's 5 epochs x --nsamples windows of 256 tokens
# per block, on the 24 calibration sequences of sample-tokens.i32 (bench/split_stories260k_tokens.py;
# test perplexity on the 32 test sequences, ctx 257, one window each; validation on sequences 24-31).
#   bench/matquant_260k.sh [OUT_DIR] [NSAMPLES] [PARALLEL]    (default /tmp/matquant-260k, 128, 2)
#   MQ_JOBS=REGEX bench/matquant_260k.sh ...   runs only the jobs whose name matches REGEX (grep -E)
#   SEED=N bench/matquant_260k.sh ...           qat --seed N (calibration windows and shuffles; default 0)
# Rows (name, what):
#   rtn-W              round to nearest at intWg64 (W = 8, 4, 2)
#   bap-W              Block-AP trained at intWg64 alone (the single-width counterpart)
#   bap8-slice-W       the Block-AP int8g64 model, sliced to W bits (trained for int8 only)
#   matquant-slice-W   qat --method matquant --widths 8,4,2 (λ = 1,1,1), int8g64, sliced to W bits
#   matquant842w-slice-W   the same with --width-weights 1,1,2 (more weight on int2)
#   matquant221w-slice-W   the same with --width-weights 2,2,1 (more weight on int8 and int4)
#   matquant2-slice-W  --widths 2 only: the int8 codes trained for their int2 slice alone
# A rerun with the same OUT_DIR skips models that exist (and re-evaluates them).
# Results: OUT_DIR/results.jsonl (one object per evaluated row) and a markdown table on stdout.
set -euo pipefail
source "$(dirname "$0")/bench_lib.sh"  # stories260k_setup, _train, _ppl, _table
out=${1:-/tmp/matquant-260k} nsamples=${2:-128} parallel=${3:-2} seed=${SEED:-0}
stories260k_setup "$out"
train() {  # NAME FORMAT ARGS...  -> OUT/models/NAME (rtn-*: quantize, no training)
  if [ "${1%%-*}" = rtn ]; then stories260k_train quantize "$@"; else stories260k_train qat "$@"; fi
}
evaluate() {  # ROW MODEL_NAME SLICE(0: none)
  local row=$1 name=$2 slice=$3 log=$out/logs/$1
  stories260k_ppl "$row" "$name" "$slice"
  python3 - "$row" "$name" "$slice" "$log" "$out/logs/$name.run.json" >> "$out/results.jsonl" <<'PY'
import json, sys
row, name, sl, log, runf = sys.argv[1:6]
try:
    run = json.load(open(runf))
except Exception:
    run = {}
print(json.dumps({"row": row, "model": name, "slice": int(sl), "test_ppl": json.load(open(log + ".ppl.json"))["ppl"],
                  "valid_ppl": json.load(open(log + ".valid.json"))["ppl"], "seconds": run.get("seconds"),
                  "training_tokens": run.get("training_tokens"), "stages": run.get("stages")}))
PY
}
job() {  # one model: train it, then evaluate its rows
  local name=$1
  case "$name" in
    rtn-8) train rtn-8 int8g64 && evaluate rtn-8 rtn-8 0 ;;
    rtn-4) train rtn-4 int4g64 && evaluate rtn-4 rtn-4 0 ;;
    rtn-2) train rtn-2 int2g64 && evaluate rtn-2 rtn-2 0 ;;
    bap-8) train bap-8 int8g64 --method efficientqat --steps 0 && evaluate bap-8 bap-8 0 &&
           evaluate bap8-slice-4 bap-8 4 && evaluate bap8-slice-2 bap-8 2 ;;
    bap-4) train bap-4 int4g64 --method efficientqat --steps 0 && evaluate bap-4 bap-4 0 ;;
    bap-2) train bap-2 int2g64 --method efficientqat --steps 0 && evaluate bap-2 bap-2 0 ;;
    matquant) train matquant int8g64 --method matquant --widths 8,4,2 &&
              for w in 8 4 2; do evaluate matquant-slice-$w matquant $w; done ;;
    matquant842w) train matquant842w int8g64 --method matquant --widths 8,4,2 --width-weights 1,1,2 &&
              for w in 8 4 2; do evaluate matquant842w-slice-$w matquant842w $w; done ;;
    matquant221w) train matquant221w int8g64 --method matquant --widths 8,4,2 --width-weights 2,2,1 &&
              for w in 8 4 2; do evaluate matquant221w-slice-$w matquant221w $w; done ;;
    matquant2) train matquant2 int8g64 --method matquant --widths 2 &&
              for w in 8 4 2; do evaluate matquant2-slice-$w matquant2 $w; done ;;
  esac
}
export -f train evaluate job stories260k_train stories260k_ppl
export out lowbit model nsamples seed
printf '%s\n' matquant bap-2 bap-4 bap-8 matquant842w matquant221w matquant2 rtn-8 rtn-4 rtn-2 | grep -E "${MQ_JOBS:-.}" |
  xargs -P "$parallel" -I{} bash -c 'job {}'
stories260k_table "$out/results.jsonl" "test ppl=test_ppl:.3f" "valid ppl=valid_ppl:.3f" "training seconds=seconds:.0f"
