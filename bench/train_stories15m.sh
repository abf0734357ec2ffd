#!/usr/bin/env bash
# Issue 4: train a stories15M-shaped Llama (dim 288, 6 layers, 6 heads, hidden 768, seq 256, Llama 2
# tokenizer, 32000 vocab, tied embeddings) on linux-docs with `lowbit train --device cuda`, train the
# PyTorch reference (bench/torch_train_ref.py) on the identical data order, evaluate the test
# perplexity with `lowbit eval ppl`, and print both validation-loss curves and their ratio.
#
# Usage (repository root, on a machine with an NVIDIA GPU, CUDA 12+/13, PyTorch with CUDA):
#   bench/train_stories15m.sh
# Settings (environment variables; defaults in brackets):
#   DATA_DIR      folder with train.txt, valid.txt, test.txt          [../shared/data/linux-docs]
#   TOKENIZER     Llama 2 sentencepiece model                         [../shared/tokenizers/llama2/tokenizer.model]
#   TRAIN_TOKENS, VALID_TOKENS
#                 optional: train/valid already tokenized (raw int32, as `lowbit train --tokenizer T --train
#                 train.txt` writes them into its run directory); skips the tokenization of train.txt
#   LOWBIT        a lowbit binary built with CUDA; empty: build one in $BUILD_DIR
#   BUILD_DIR     [build-stories15m]   (cmake -DLOWBIT_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90)
#   RUN_DIR       [out/stories15m]
#   STEPS [1000]  "auto": time 30 steps first and take the multiple of 100 (300..2000) whose lowbit
#                 training fits TARGET_SECONDS [90]
#   BATCH [64]  SEQ [256]  LR [1e-3]  MIN_LR_RATIO [0.1]  WARMUP [100]  WEIGHT_DECAY [0.1]
#   EVAL_EVERY [100]  EVAL_BATCHES [8]  SEED [1]
#   TF32 [1]      1: f32 GEMMs on TF32 tensor cores in both lowbit (--tf32) and PyTorch (allow_tf32)
#   TORCH_RUNS    ["same indep"]  PyTorch runs: same = initial weights copied from lowbit's
#                 (`lowbit train --steps 0`), indep = PyTorch's own N(0, 0.02) initialisation
#   PYTHON        [python3]
#   DEVICE        [cuda]  (cpu with TF32=0 and a small MODEL_ARGS: a smoke test of this script)
#   MODEL_ARGS    ["--dim 288 --hidden-dim 768 --layers 6 --heads 6 --max-seq-len 256"]
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR=${DATA_DIR:-../shared/data/linux-docs}
TOKENIZER=${TOKENIZER:-../shared/tokenizers/llama2/tokenizer.model}
BUILD_DIR=${BUILD_DIR:-build-stories15m}
RUN_DIR=${RUN_DIR:-out/stories15m}
STEPS=${STEPS:-1000} BATCH=${BATCH:-64} SEQ=${SEQ:-256} LR=${LR:-1e-3} MIN_LR_RATIO=${MIN_LR_RATIO:-0.1}
WARMUP=${WARMUP:-100} WEIGHT_DECAY=${WEIGHT_DECAY:-0.1} EVAL_EVERY=${EVAL_EVERY:-100} EVAL_BATCHES=${EVAL_BATCHES:-8}
SEED=${SEED:-1} TF32=${TF32:-1} TORCH_RUNS=${TORCH_RUNS:-same indep} PYTHON=${PYTHON:-python3} DEVICE=${DEVICE:-cuda}
MODEL_ARGS=${MODEL_ARGS:---dim 288 --hidden-dim 768 --layers 6 --heads 6 --max-seq-len 256}

for f in "$DATA_DIR/test.txt" "$TOKENIZER"; do [[ -f $f ]] || { echo "missing $f" >&2; exit 2; }; done

if [[ -z ${LOWBIT:-} ]]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLOWBIT_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DLOWBIT_TESTS=OFF
  cmake --build "$BUILD_DIR" --target lowbit_cli
  LOWBIT=$BUILD_DIR/lowbit
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

mkdir -p "$RUN_DIR"
read -r -a SHAPE <<<"$MODEL_ARGS"
SHAPE+=(--tokenizer "$TOKENIZER")
tf32_flag=(); [[ $TF32 == 1 ]] && tf32_flag=(--tf32)

# 1. Initial weights (lowbit init_weights, --seed) and, unless given, the tokenized data.
rm -rf "$RUN_DIR/init"
if [[ -n ${TRAIN_TOKENS:-} ]]; then
  data=(--train-tokens "$TRAIN_TOKENS" --valid-tokens "$VALID_TOKENS")
  "$LOWBIT" train --out "$RUN_DIR/init" "${SHAPE[@]}" "${data[@]}" --steps 0 --seed "$SEED" --json >/dev/null
else
  "$LOWBIT" train --out "$RUN_DIR/init" "${SHAPE[@]}" --train "$DATA_DIR/train.txt" --valid "$DATA_DIR/valid.txt" \
    --steps 0 --seed "$SEED" --json >/dev/null
  TRAIN_TOKENS=$RUN_DIR/init/train.tokens VALID_TOKENS=$RUN_DIR/init/valid.tokens
  data=(--train-tokens "$TRAIN_TOKENS" --valid-tokens "$VALID_TOKENS")
fi

# 2. lowbit on the GPU, writing its data order for the reference.
if [[ $STEPS == auto ]]; then
  rm -rf "$RUN_DIR/calib"
  "$LOWBIT" train --out "$RUN_DIR/calib" "${SHAPE[@]}" "${data[@]}" --batch "$BATCH" --seq-len "$SEQ" --steps 30 \
    --warmup 10 --lr "$LR" --eval-every 0 --eval-batches 1 --checkpoint-every 0 --device "$DEVICE" "${tf32_flag[@]}" --json \
    > "$RUN_DIR/calib.json"
  STEPS=$("$PYTHON" - "$RUN_DIR/calib/log.jsonl" "${TARGET_SECONDS:-90}" "$BATCH" "$SEQ" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][10:]  # skip the warm-up steps
tps = statistics.median(r["tokens_per_second"] for r in rows)
steps = max(300, min(2000, int(float(sys.argv[2]) * tps / (int(sys.argv[3]) * int(sys.argv[4])) / 100) * 100))
print(f"calibration: {tps:.0f} tokens/s -> --steps {steps}", file=sys.stderr)
print(steps)
EOF
)
fi
HP=(--batch "$BATCH" --seq-len "$SEQ" --steps "$STEPS" --warmup "$WARMUP" --lr "$LR" --min-lr-ratio "$MIN_LR_RATIO"
    --weight-decay "$WEIGHT_DECAY" --eval-every "$EVAL_EVERY" --eval-batches "$EVAL_BATCHES" --seed "$SEED")
rm -rf "$RUN_DIR/lowbit"
echo "== lowbit train --device $DEVICE ${tf32_flag[*]} ${MODEL_ARGS} ${HP[*]}"
"$LOWBIT" train --out "$RUN_DIR/lowbit" "${SHAPE[@]}" "${data[@]}" "${HP[@]}" --checkpoint-every 0 \
  --device "$DEVICE" "${tf32_flag[@]}" --dump-order "$RUN_DIR/lowbit/order.i64" --json | tee "$RUN_DIR/lowbit_train.json"

# 3. Test perplexity of the trained model (non-overlapping windows of SEQ tokens: 256).
echo "== lowbit eval ppl"
"$LOWBIT" eval ppl --device "$DEVICE" -m "$RUN_DIR/lowbit/model.bin" --tokenizer "$TOKENIZER" --text "$DATA_DIR/test.txt" \
  --ctx "$SEQ" --json | tee "$RUN_DIR/ppl_test.json"

# 4. PyTorch reference(s) on the same order.
for kind in $TORCH_RUNS; do
  init=(); [[ $kind == same ]] && init=(--init-from "$RUN_DIR/init/model.bin")
  torch_tf32=(); [[ $TF32 == 1 ]] && torch_tf32=(--tf32)
  echo "== PyTorch reference ($kind init)"
  PYTHONUNBUFFERED=1 "$PYTHON" bench/torch_train_ref.py --run-dir "$RUN_DIR/lowbit" --order "$RUN_DIR/lowbit/order.i64" \
    --train-tokens "$TRAIN_TOKENS" --valid-tokens "$VALID_TOKENS" --out "$RUN_DIR/torch-$kind" --device "$DEVICE" \
    "${torch_tf32[@]}" --lr "$LR" --min-lr-ratio "$MIN_LR_RATIO" --warmup "$WARMUP" --weight-decay "$WEIGHT_DECAY" \
    --eval-every "$EVAL_EVERY" --seed "$SEED" "${init[@]}" --lowbit-log "$RUN_DIR/lowbit/log.jsonl" \
    > "$RUN_DIR/torch-$kind.json"
done

# 5. Both curves and the ratio.
"$PYTHON" - "$RUN_DIR" $TORCH_RUNS <<'EOF'
import json, os, sys
run, kinds = sys.argv[1], sys.argv[2:]
lb = json.load(open(os.path.join(run, "lowbit_train.json")))
ppl = json.load(open(os.path.join(run, "ppl_test.json")))
val = {}
for line in open(os.path.join(run, "lowbit", "log.jsonl")):
    j = json.loads(line)
    if "val_loss" in j:
        val[j["step"]] = j["val_loss"]
ts = {k: json.load(open(os.path.join(run, f"torch-{k}.json"))) for k in kinds}
curves = {k: dict(map(tuple, t["val_curve"])) for k, t in ts.items()}
hdr = f"{'step':>6} {'lowbit':>8}" + "".join(f" {'torch-' + k:>11} {'ratio':>8}" for k in kinds)
print(hdr)
for s in sorted(val):
    row = f"{s:>6} {val[s]:8.4f}"
    for k in kinds:
        v = curves[k].get(s)
        row += f" {v:11.4f} {val[s] / v:8.4f}" if v else " " * 21
    print(row)
print(f"lowbit: final val {lb['final_val_loss']:.4f}, {lb['tokens_per_second']:.0f} tokens/s ({lb.get('gpu')}, tf32={lb['tf32']})")
for k, t in ts.items():
    print(f"torch-{k}: final val {t['final_val_loss']:.4f}, {t['tokens_per_second']:.0f} tokens/s; "
          f"lowbit/torch - 1 at the end {t['final_rel_diff']:+.4%}, max over the curve {t['max_abs_rel_diff']:.4%}; "
          f"within {t['tolerance']:.0%}: {t['within_tolerance']}")
print(f"test perplexity (lowbit eval ppl, ctx {ppl['ctx']}): {ppl['ppl']:.4f} (NLL {ppl['nll']:.4f}, {ppl['tokens']} tokens)")
EOF
