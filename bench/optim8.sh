#!/usr/bin/env bash
# Issue 18, --optimizer-bits 8: `lowbit train` on the CPU with f32 AdamW state and with block-wise
# dynamic 8-bit state (Dettmers et al. 2022), same model, seed, data order and steps; prints final
# training and validation loss, optimizer-state bytes, mean and median step time, and the ratio.
#
#   bench/optim8.sh [OUT_DIR]        (default /tmp/optim8)
# Settings (environment variables; defaults in brackets):
#   LOWBIT      [build-rel/lowbit]
#   TEXT        [../shared/data/tinyshakespeare/input.txt]: the first 1,000,000 bytes train, the rest
#               validate
#   TOKENIZER   [../shared/models/stories260K/tok512.model]
#   MODEL_ARGS  ["--dim 64 --hidden-dim 172 --layers 5 --heads 8 --kv-heads 4 --max-seq-len 256 --vocab 512"]
#               (the stories260K shape, 512-token vocabulary, tied embeddings)
#   STEPS [1000]  BATCH [16]  SEQ [256]  LR [2e-3]  WARMUP [50]  EVAL_EVERY [100]  EVAL_BATCHES [8]
#   THREADS [2]  SEED [1]  BITS ["32 8"]
# Results: OUT_DIR/bits<N>/ (log.jsonl, summary.json) and a markdown table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${LOWBIT_SHARED:-../shared}
out=${1:-/tmp/optim8}
LOWBIT=${LOWBIT:-build-rel/lowbit}
TEXT=${TEXT:-$shared/data/tinyshakespeare/input.txt}
TOKENIZER=${TOKENIZER:-$shared/models/stories260K/tok512.model}
MODEL_ARGS=${MODEL_ARGS:---dim 64 --hidden-dim 172 --layers 5 --heads 8 --kv-heads 4 --max-seq-len 256 --vocab 512}
STEPS=${STEPS:-1000} BATCH=${BATCH:-16} SEQ=${SEQ:-256} LR=${LR:-2e-3} WARMUP=${WARMUP:-50}
EVAL_EVERY=${EVAL_EVERY:-100} EVAL_BATCHES=${EVAL_BATCHES:-8} THREADS=${THREADS:-2} SEED=${SEED:-1}
BITS=${BITS:-32 8}
for f in "$TEXT" "$TOKENIZER" "$LOWBIT"; do [[ -f $f ]] || { echo "missing $f" >&2; exit 2; }; done
mkdir -p "$out"
read -r -a shape <<<"$MODEL_ARGS"

# Tokenize once (a --steps 0 run writes train.tokens / valid.tokens); both runs read the same ids.
if [[ ! -f $out/tok/train.tokens ]]; then
  head -c 1000000 "$TEXT" >"$out/train.txt"
  tail -c +1000001 "$TEXT" >"$out/valid.txt"
  "$LOWBIT" train --out "$out/tok" "${shape[@]}" --tokenizer "$TOKENIZER" --train "$out/train.txt" \
    --valid "$out/valid.txt" --steps 0 --seq-len "$SEQ" --json >/dev/null
fi

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
for b in $BITS; do
  rm -rf "$out/bits$b"
  cmd=("$LOWBIT" train --out "$out/bits$b" "${shape[@]}" --train-tokens "$out/tok/train.tokens"
       --valid-tokens "$out/tok/valid.tokens" --steps "$STEPS" --batch "$BATCH" --seq-len "$SEQ" --lr "$LR"
       --warmup "$WARMUP" --eval-every "$EVAL_EVERY" --eval-batches "$EVAL_BATCHES" --seed "$SEED"
       --threads "$THREADS" --optimizer-bits "$b" --json)
  echo "+ ${cmd[*]}" >&2
  "${cmd[@]}" >"$out/bits$b.json" 2>"$out/bits$b.stderr" || { tail -3 "$out/bits$b.stderr" >&2; exit 1; }
  cp "$out/bits$b.json" "$out/bits$b/summary.json"
  echo "bits $b done; load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
done

python3 - "$out" $BITS <<'EOF'
import json, statistics, sys
out, bits = sys.argv[1], sys.argv[2:]
rows = []
for b in bits:
    s = json.load(open(f"{out}/bits{b}.json"))
    log = [json.loads(l) for l in open(f"{out}/bits{b}/log.jsonl")]
    tokens_per_step = s["tokens_per_second"] * s["train_seconds"] / max(len(log), 1)
    step_ms = [1000 * tokens_per_step / r["tokens_per_second"] for r in log]
    vals = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
    rows.append((b, s, step_ms, vals))
print("| optimizer state | final train loss | final val loss | optimizer-state bytes | tensors 8-bit | mean step (ms) | median step (ms) |")
print("|---|---|---|---|---|---|---|")
for b, s, ms, vals in rows:
    print(f"| {b}-bit | {s['final_train_loss']:.4f} | {s['final_val_loss']:.4f} | {s['optimizer_state_bytes']:,} | "
          f"{s['optimizer_params_8bit']} | {statistics.mean(ms):.1f} | {statistics.median(ms):.1f} |")
print()
print("validation loss by step:")
print("| step | " + " | ".join(f"{b}-bit" for b, *_ in rows) + " |")
print("|---|" + "---|" * len(rows))
for i, (step, _) in enumerate(rows[0][3]):
    print(f"| {step} | " + " | ".join(f"{r[3][i][1]:.4f}" for r in rows) + " |")
if len(rows) == 2:
    a, b = rows
    print(f"\nstate bytes {b[0]}-bit / {a[0]}-bit: {b[1]['optimizer_state_bytes'] / a[1]['optimizer_state_bytes']:.3f}; "
          f"final val loss {b[0]}-bit - {a[0]}-bit: {b[1]['final_val_loss'] - a[1]['final_val_loss']:+.4f} "
          f"({100 * (b[1]['final_val_loss'] / a[1]['final_val_loss'] - 1):+.2f} %)")
EOF
