#!/usr/bin/env bash
# `lowbit qat --precision` and `lowbit finetune --precision` on stories260K, CPU (issue 18): the same
# run at bf16, fp8 and one FP4 recipe (nvfp4, the NVFP4 paper's: 16x16 weight blocks, Hadamard on
# the wgrad inputs, stochastic rounding, the last block kept in f32), same seed, one or more seeds.
#   bench/lp_qat_finetune_260k.sh [OUT_DIR] [SEEDS] [PRECISIONS] [PARALLEL]
#     defaults: /tmp/lp-qf-260k, "1 2", "bf16 fp8 nvfp4", 2 (add f32 for the unquantized products)
# Data as bench/qat_260k.sh: shared/models/stories260K/sample-tokens.i32 split into training
# (sequences 0-23, 6,168 tokens), validation (24-31) and test (32-63).
#   qat:      --method lsq --format int3g64, 100 steps x 8 x 256 tokens (the products x Q(W)^T of the
#             latent layers in the precision; Q's backward unchanged). Validation / test loss: ln of
#             `lowbit eval ppl --ctx 257` of the packed checkpoint (inference in f32, the same kind of
#             model at every precision: what the precision changed is the trained weights).
#   finetune: `quantize --method rtn --format int2g64` of stories260K, then LoRA rank 16 (new
#             adapters), 100 steps x 8 x 256, lr 2e-3, validation on the validation split: the
#             low-precision forward's loss (val_loss_after) and the saved model's (f32 adapter
#             products: val_loss_after_f32), plus `eval ppl` of the written checkpoint.
# Each run uses --threads 1; PARALLEL runs at a time. A rerun with the same OUT_DIR keeps finished runs.
# Results: OUT_DIR/results.jsonl and a markdown table (ratios to bf16 of the same seed) on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
shared=${LOWBIT_SHARED:-$here/../../shared}
out=${1:-/tmp/lp-qf-260k} seeds=${2:-"1 2"} precisions=${3:-"bf16 fp8 nvfp4"} parallel=${4:-2}
lowbit=${LOWBIT:-$here/../build-rel/lowbit}
model=$shared/models/stories260K/stories260K.bin
mkdir -p "$out/runs" "$out/logs"
cp "$lowbit" "$out/lowbit" && lowbit=$out/lowbit
python3 "$here/split_stories260k_tokens.py" "$shared/models/stories260K/sample-tokens.i32" "$out"
if [ ! -f "$out/q-int2g64/config.json" ]; then
  "$lowbit" -q quantize -m "$model" --format int2g64 --method rtn --threads 1 -o "$out/q-int2g64" > /dev/null
fi
job() {  # KIND SEED PRECISION
  local kind=$1 seed=$2 prec=$3 name=$1-$3-s$2
  local dir=$out/runs/$name log=$out/logs/$name
  if [ ! -f "$log.done" ]; then
    rm -rf "$dir"
    local t0=$(date +%s)
    if [ "$kind" = qat ]; then
      "$lowbit" -q qat -m "$model" --method lsq --format int3g64 --train-tokens "$out/calib.i32" --steps 100 --batch 8 \
        --seqlen 256 --seed "$seed" --precision "$prec" --threads 1 --json -o "$dir" > "$log.run.json" 2> "$log.err"
      "$lowbit" -q eval ppl -m "$dir" --tokens "$out/valid.i32" --ctx 257 --threads 1 --json > "$log.valid.json"
      "$lowbit" -q eval ppl -m "$dir" --tokens "$out/test.i32" --ctx 257 --threads 1 --json > "$log.test.json"
    else
      "$lowbit" -q finetune -m "$out/q-int2g64" --train-tokens "$out/calib.i32" --valid-tokens "$out/valid.i32" \
        --steps 100 --warmup 10 --batch 8 --seq-len 256 --eval-every 0 --eval-batches 8 --rank 16 --lr 2e-3 \
        --seed "$seed" --precision "$prec" --threads 1 --json --out "$dir" > "$log.run.json" 2> "$log.err"
      "$lowbit" -q eval ppl -m "$dir/model" --tokens "$out/valid.i32" --ctx 257 --threads 1 --json > "$log.valid.json"
      "$lowbit" -q eval ppl -m "$dir/model" --tokens "$out/test.i32" --ctx 257 --threads 1 --json > "$log.test.json"
    fi
    echo $(( $(date +%s) - t0 )) > "$log.done"
  fi
  python3 - "$kind" "$seed" "$prec" "$log" <<'PY' >> "$out/results.jsonl"
import json, math, sys
kind, seed, prec, log = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
run = json.load(open(log + ".run.json"))
r = {"kind": kind, "seed": seed, "precision": prec, "seconds": int(open(log + ".done").read()),
     "valid_loss": math.log(json.load(open(log + ".valid.json"))["ppl"]),
     "test_loss": math.log(json.load(open(log + ".test.json"))["ppl"])}
if kind == "qat":
    r["settings"] = run["precision"]
    st = run["stages"][0]
    r["train_objective_after"] = st["loss_after"]
else:
    r["settings"] = run["precision"]
    r["val_loss_before"] = run["val_loss_before"]
    r["val_loss_after_lp"] = run["val_loss_after"]
    r["val_loss_after_f32"] = run.get("val_loss_after_f32", run["val_loss_after"])
print(json.dumps(r))
PY
}
export -f job
export out lowbit model
rm -f "$out/results.jsonl"
for seed in $seeds; do
  for kind in qat finetune; do
    for prec in $precisions; do echo "$kind $seed $prec"; done
  done
done | xargs -P "$parallel" -L 1 bash -c 'job "$0" "$1" "$2"'
{
  echo "# $(lscpu | grep 'Model name' | sed 's/ \+/ /g'); load average: $(cut -d' ' -f1-3 /proc/loadavg); $(date -u '+%Y-%m-%d %H:%M UTC')"
  python3 - "$out/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
key = lambda r: (r["kind"], r["seed"])
base = {key(r): r for r in rows if r["precision"] == "bf16"}
order = {"f32": -1, "bf16": 0, "fp8": 1}
print("| command | seed | precision (settings) | valid loss (packed model) | vs bf16 | test loss | vs bf16 | low-precision forward's val loss | seconds |")
print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
for r in sorted(rows, key=lambda r: (r["kind"] != "qat", r["seed"], order.get(r["precision"], 2))):
    b = base.get(key(r))
    rel = lambda k: f"{100 * (r[k] / b[k] - 1):+.2f} %" if b else "n/a"
    lp = r.get("val_loss_after_lp")
    print(f"| {r['kind']} | {r['seed']} | {r['precision']} ({r['settings']}) | {r['valid_loss']:.4f} | {rel('valid_loss')} | "
          f"{r['test_loss']:.4f} | {rel('test_loss')} | {'' if lp is None else f'{lp:.4f}'} | {r['seconds']} |")
PY
} | tee "$out/table.md"
