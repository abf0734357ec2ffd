#!/usr/bin/env bash
# OneBit (qat --method onebit, quant/onebit.h) on stories260K, CPU (issue 15): the 1-bit sign +
# value-vector model against the same run's low-bit QAT baselines on the same data, and SVID alone.
# Data as bench/matquant_260k.sh: the 24 calibration sequences of sample-tokens.i32 (6,168 tokens,
# bench/split_stories260k_tokens.py) train every row; test perplexity on the 32 test sequences and
# validation on sequences 24-31, ctx 257 (one window per sequence).
#   bench/onebit_260k.sh [OUT_DIR] [PARALLEL]        (default /tmp/onebit-260k, 2)
#   OB_JOBS=REGEX bench/onebit_260k.sh ...   runs only the jobs whose name matches REGEX (grep -E)
#   SEED=N bench/onebit_260k.sh ...          qat --seed N (training windows and shuffles; default 0)
# Rows (name, what; end-to-end rows: 300 steps x 8 x 256 = 614,400 tokens, distilled: KL to the FP logits):
#   svid          quantize --method rtn --format onebit: SVID (rank-1 of |W|, power iteration), no training
#   onebit        qat --method onebit (SVID init, latent weights through the STE, h and g trained), the
#                 paper's loss: KL + 1 x the hidden-state MSE (--hidden-mse 1, the default since issue 15's
#                 follow-up; models trained before it were KL only = onebit-kl)
#   onebit-kl     the same with --hidden-mse 0: KL to the FP logits only
#   onebit-hmse0.1, onebit-hmse3  the same with --hidden-mse 0.1 / 3
#   onebit-nmf    the same with --svid nmf
#   onebit-lr1e-4 the same with --lr 1e-4 (latent weights; the default 1e-3 was chosen on validation)
#   paretoq-1-lr1e-3, paretoq-1pc-lr1e-3, b158-lr1e-3   paretoq-1 / paretoq-1pc / b158 with --lr 1e-3 (their
#                 default 1e-4): the same lr as onebit
#   paretoq-1     qat --method paretoq --bits 1 --format int2g64s --distill: sign with a learned α per group of
#                 64 (ParetoQ's 1-bit quantizer, stored in 2-bit codes)
#   paretoq-1pc   the same at int2pcs: one α per row (OneBit's h without g)
#   b158          qat --method paretoq --bits 1.58 --format int2g64s --distill: ternary (SEQ) weights
#   bap-2         qat --method efficientqat --steps 0 --format int2g64: Block-AP int2 (5 epochs x 128
#                 windows x 256 tokens per block), no E2E-QP (docs/results/matquant.md's baseline)
#   matquant-2    qat --method matquant --widths 8,4,2 (int8g64), the int2 slice (eval --slice 2)
# A rerun with the same OUT_DIR skips models that exist (and re-evaluates them).
# Results: OUT_DIR/results.jsonl (one object per evaluated row) and a markdown table on stdout.
set -euo pipefail
source "$(dirname "$0")/bench_lib.sh"  # stories260k_setup, _train, _ppl, _table
out=${1:-/tmp/onebit-260k} parallel=${2:-2} seed=${SEED:-0} nsamples=""
stories260k_setup "$out"
train() {  # NAME FORMAT ARGS...  -> OUT/models/NAME (svid: quantize, no training)
  if [ "$1" = svid ]; then stories260k_train quantize "$@"; else stories260k_train qat "$@"; fi
}
evaluate() {  # ROW MODEL_NAME SLICE(0: none)
  local row=$1 name=$2 slice=$3 log=$out/logs/$1
  stories260k_ppl "$row" "$name" "$slice"
  python3 - "$row" "$name" "$slice" "$log" "$out/logs/$name.run.json" "$seed" >> "$out/results.jsonl" <<'PY'
import json, math, sys
row, name, sl, log, runf, seed = sys.argv[1:7]
try:
    run = json.load(open(runf))
except Exception:
    run = {}
t, v = json.load(open(log + ".ppl.json"))["ppl"], json.load(open(log + ".valid.json"))["ppl"]
print(json.dumps({"row": row, "model": name, "slice": int(sl), "seed": int(seed), "test_ppl": t, "valid_ppl": v,
                  "valid_loss": math.log(v), "bits_per_weight": run.get("bits_per_weight"),
                  "seconds": run.get("seconds"), "stages": run.get("stages")}))
PY
}
job() {  # one model: train it, then evaluate its rows
  local name=$1
  case "$name" in
    svid) train svid onebit && evaluate svid svid 0 ;;
    onebit) train onebit onebit --method onebit && evaluate onebit onebit 0 ;;
    onebit-kl) train onebit-kl onebit --method onebit --hidden-mse 0 && evaluate onebit-kl onebit-kl 0 ;;
    onebit-hmse0.1) train onebit-hmse0.1 onebit --method onebit --hidden-mse 0.1 && evaluate onebit-hmse0.1 onebit-hmse0.1 0 ;;
    onebit-hmse3) train onebit-hmse3 onebit --method onebit --hidden-mse 3 && evaluate onebit-hmse3 onebit-hmse3 0 ;;
    onebit-nmf) train onebit-nmf onebit --method onebit --svid nmf && evaluate onebit-nmf onebit-nmf 0 ;;
    onebit-lr1e-4) train onebit-lr1e-4 onebit --method onebit --lr 1e-4 && evaluate onebit-lr1e-4 onebit-lr1e-4 0 ;;
    paretoq-1-lr1e-3) train paretoq-1-lr1e-3 int2g64s --method paretoq --bits 1 --distill --lr 1e-3 &&
                      evaluate paretoq-1-lr1e-3 paretoq-1-lr1e-3 0 ;;
    paretoq-1pc-lr1e-3) train paretoq-1pc-lr1e-3 int2pcs --method paretoq --bits 1 --distill --lr 1e-3 &&
                        evaluate paretoq-1pc-lr1e-3 paretoq-1pc-lr1e-3 0 ;;
    b158-lr1e-3) train b158-lr1e-3 int2g64s --method paretoq --bits 1.58 --distill --lr 1e-3 &&
                 evaluate b158-lr1e-3 b158-lr1e-3 0 ;;
    paretoq-1) train paretoq-1 int2g64s --method paretoq --bits 1 --distill && evaluate paretoq-1 paretoq-1 0 ;;
    paretoq-1pc) train paretoq-1pc int2pcs --method paretoq --bits 1 --distill && evaluate paretoq-1pc paretoq-1pc 0 ;;
    b158) train b158 int2g64s --method paretoq --bits 1.58 --distill && evaluate b158 b158 0 ;;
    bap-2) train bap-2 int2g64 --method efficientqat --steps 0 --nsamples 128 && evaluate bap-2 bap-2 0 ;;
    matquant-2) train matquant int8g64 --method matquant --widths 8,4,2 --nsamples 128 &&
                evaluate matquant-2 matquant 2 ;;
  esac
}
export -f train evaluate job stories260k_train stories260k_ppl
export out lowbit model seed nsamples
printf '%s\n' onebit onebit-kl onebit-hmse0.1 onebit-hmse3 paretoq-1 b158 bap-2 svid paretoq-1pc onebit-lr1e-4 paretoq-1-lr1e-3 paretoq-1pc-lr1e-3 b158-lr1e-3 onebit-nmf matquant-2 | grep -E "${OB_JOBS:-.}" |
  xargs -P "$parallel" -I{} bash -c 'job {}'
stories260k_table "$out/results.jsonl" "bits/weight=bits_per_weight:.2f" "test ppl=test_ppl:.3f" "valid ppl=valid_ppl:.3f" \
  "valid loss=valid_loss:.4f" "training seconds=seconds:.0f"
