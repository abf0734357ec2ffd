#!/usr/bin/env bash
# Issue 15: FP vs BitNet b1.58 for the same small shape and token budget, on linux-docs with the
# 512-piece stories260K tokenizer, all on the CPU:
#   fp         --arch llama
#   b158       --arch bitnet-b1.58 from scratch
#   b158-t25   --arch bitnet-b1.58 --transition-at 0.25   (16-bit for the first 25 % of the steps)
#   b158-t50   --arch bitnet-b1.58 --transition-at 0.50
# (and any of EXTRA_RUNS: b158-median = --ternary-scale median, b158-2stage = --schedule bitnet-two-stage,
#  fp-2stage; BitNet v2 = H-BitLinear o_proj/down_proj: v2a4 = --arch bitnet-v2 --act-bits 4 --act4-at 0.8
#  (A8 for 80 % of the steps, then A4, the paper's recipe), v2a4-scratch = A4 from the first step,
#  v2a8 = --act-bits 8, v2a4-noh = v2a4-scratch without the Hadamard transforms: an ablation;
#  v2a4-absmean / v2a4-scratch-absmean = v2a4 / v2a4-scratch with --act-quant absmean, the papers'
#  INT4 quantizer s = mean|x| / sqrt(7) instead of absmax). Every run sees the same windows (same seed); validation loss every EVAL_EVERY
# steps on fixed windows of valid.txt (the training forward: b1.58 int8 activations, v2 its
# activation bits); at the end `lowbit eval ppl` on test.txt (ctx SEQ) of OUT/<run>/hf (FP) or
# OUT/<run>/ternary (the packed ternary checkpoint, --matmul exact, dense vocabulary: b1.58 with
# f32 activations; v2 with the checkpoint's own online Hadamard transforms and A4/A8 per-token
# activations, which `eval ppl` applies whatever --matmul says). Prints a markdown table and writes
# OUT/curves.tsv (step, val loss per run). REUSE=1 skips the training of runs whose OUT/<run>.json
# is already there (to add runs to a table made earlier with the same settings).
#
# Usage (repository root): bench/bitnet_linux_docs.sh
# Settings (environment; defaults in brackets):
#   LOWBIT [build-rel/lowbit]  OUT [out/bitnet]  DATA_DIR [../shared/data/linux-docs]
#   TOKENIZER [../shared/models/stories260K/tok512.model]
#   TRAIN_BYTES [0] (0: all of train.txt; else only this prefix is tokenized)
#   MODEL_ARGS ["--dim 128 --hidden-dim 384 --layers 4 --heads 4 --max-seq-len 128"]
#   SEQ [128] BATCH [16] STEPS [800] WARMUP [100] LR [2e-3] EVAL_EVERY [100] EVAL_BATCHES [32] SEED [1]
#   JOBS [2] runs at a time, THREADS [1] threads each
#   RUNS ["fp b158 b158-t25 b158-t50"] (RUNS="" runs only EXTRA_RUNS)  EXTRA_RUNS [""]  REUSE [0]
set -euo pipefail
cd "$(dirname "$0")/.."
LOWBIT=${LOWBIT:-build-rel/lowbit} OUT=${OUT:-out/bitnet} DATA_DIR=${DATA_DIR:-../shared/data/linux-docs}
TOKENIZER=${TOKENIZER:-../shared/models/stories260K/tok512.model} TRAIN_BYTES=${TRAIN_BYTES:-0}
MODEL_ARGS=${MODEL_ARGS:---dim 128 --hidden-dim 384 --layers 4 --heads 4 --max-seq-len 128}
SEQ=${SEQ:-128} BATCH=${BATCH:-16} STEPS=${STEPS:-800} WARMUP=${WARMUP:-100} LR=${LR:-2e-3}
EVAL_EVERY=${EVAL_EVERY:-100} EVAL_BATCHES=${EVAL_BATCHES:-32} SEED=${SEED:-1} JOBS=${JOBS:-2} THREADS=${THREADS:-1}
RUNS=${RUNS-fp b158 b158-t25 b158-t50} EXTRA_RUNS=${EXTRA_RUNS:-} REUSE=${REUSE:-0}

for f in "$DATA_DIR/train.txt" "$DATA_DIR/valid.txt" "$DATA_DIR/test.txt" "$TOKENIZER" "$LOWBIT"; do
  [[ -e $f ]] || { echo "missing $f" >&2; exit 2; }
done
mkdir -p "$OUT/data"
if [[ ! -s $OUT/data/train.i32 ]]; then
  train_txt=$DATA_DIR/train.txt
  if (( TRAIN_BYTES > 0 )); then head -c "$TRAIN_BYTES" "$DATA_DIR/train.txt" > "$OUT/data/train.txt"; train_txt=$OUT/data/train.txt; fi
  "$LOWBIT" tokenize -t "$TOKENIZER" --file "$train_txt" --out "$OUT/data/train.i32" > /dev/null
  "$LOWBIT" tokenize -t "$TOKENIZER" --file "$DATA_DIR/valid.txt" --out "$OUT/data/valid.i32" > /dev/null
  "$LOWBIT" tokenize -t "$TOKENIZER" --file "$DATA_DIR/test.txt" --out "$OUT/data/test.i32" > /dev/null
fi

run_args() {  # run name -> its extra flags
  case $1 in
    fp) echo "--arch llama" ;;
    fp-2stage) echo "--arch llama --schedule bitnet-two-stage" ;;
    b158) echo "--arch bitnet-b1.58" ;;
    b158-t25) echo "--arch bitnet-b1.58 --transition-at 0.25" ;;
    b158-t50) echo "--arch bitnet-b1.58 --transition-at 0.5" ;;
    b158-median) echo "--arch bitnet-b1.58 --ternary-scale median" ;;
    b158-2stage) echo "--arch bitnet-b1.58 --schedule bitnet-two-stage" ;;
    v2a4) echo "--arch bitnet-v2 --act-bits 4 --act4-at 0.8" ;;
    v2a4-scratch) echo "--arch bitnet-v2 --act-bits 4" ;;
    v2a8) echo "--arch bitnet-v2 --act-bits 8" ;;
    v2a4-noh) echo "--arch bitnet-v2 --act-bits 4 --hadamard off" ;;
    v2a4-absmean) echo "--arch bitnet-v2 --act-bits 4 --act4-at 0.8 --act-quant absmean" ;;
    v2a4-scratch-absmean) echo "--arch bitnet-v2 --act-bits 4 --act-quant absmean" ;;
    *) echo "unknown run $1" >&2; exit 2 ;;
  esac
}

train_one() {
  local name=$1
  # shellcheck disable=SC2046,SC2086
  "$LOWBIT" train --out "$OUT/$name" --train-tokens "$OUT/data/train.i32" --valid-tokens "$OUT/data/valid.i32" \
    --vocab 512 $MODEL_ARGS --seq-len "$SEQ" --batch "$BATCH" --steps "$STEPS" --warmup "$WARMUP" --lr "$LR" \
    --eval-every "$EVAL_EVERY" --eval-batches "$EVAL_BATCHES" --checkpoint-every 200 --seed "$SEED" \
    --threads "$THREADS" --json $(run_args "$name") > "$OUT/$name.json" 2> "$OUT/$name.log"
}

all_runs="$RUNS $EXTRA_RUNS"
running=0
for name in $all_runs; do
  if [[ $REUSE == 1 && -s $OUT/$name.json ]]; then echo "reusing $OUT/$name.json" >&2; continue; fi
  train_one "$name" &
  running=$((running + 1))
  if (( running >= JOBS )); then wait -n; running=$((running - 1)); fi
done
wait

echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; $THREADS thread(s) per run, $JOBS runs at a time"
echo "shape: $MODEL_ARGS, vocab 512, seq $SEQ, batch $BATCH, $STEPS steps ($((STEPS * BATCH * SEQ)) tokens), lr $LR"
echo
echo "| run | flags | final val loss (training forward) | test ppl (lowbit eval ppl) | train s |"
echo "|---|---|---|---|---|"
for name in $all_runs; do
  model="$OUT/$name/hf" extra=""
  if [[ $name == b158* || $name == v2* ]]; then model="$OUT/$name/ternary" extra="--f32-vocab --matmul exact"; fi
  # shellcheck disable=SC2086
  ppl=$("$LOWBIT" eval ppl -m "$model" --tokens "$OUT/data/test.i32" --ctx "$SEQ" --batch 8 --threads 2 --json $extra |
        python3 -c 'import json,sys; print("%.3f" % json.load(sys.stdin)["ppl"])')
  python3 - "$OUT/$name.json" "$name" "$(run_args "$name")" "$ppl" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
print(f"| {sys.argv[2]} | `{sys.argv[3]}` | {j['final_val_loss']:.4f} | {sys.argv[4]} | {j['train_seconds']:.0f} |")
PY
done
python3 - "$OUT" $all_runs <<'PY' > "$OUT/curves.tsv"
import json, sys
out, runs = sys.argv[1], sys.argv[2:]
curves = {}
for r in runs:
    for line in open(f"{out}/{r}/log.jsonl"):
        j = json.loads(line)
        if "val_loss" in j:
            curves.setdefault(j["step"], {})[r] = j["val_loss"]
print("step\t" + "\t".join(runs))
for s in sorted(curves):
    print(f"{s}\t" + "\t".join("%.4f" % curves[s][r] if r in curves[s] else "" for r in runs))
PY
echo
echo "validation-loss curves: $OUT/curves.tsv"
column -t "$OUT/curves.tsv"
