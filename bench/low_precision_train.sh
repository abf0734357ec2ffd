#!/usr/bin/env bash
# Issue 18, `lowbit train --precision`: validation-loss curves of the same model, seed, data order
# and steps trained with f32 GEMMs and with emulated low-precision GEMMs (bf16, fp8 delayed and
# current scaling, mxfp4, nvfp4 with the NVFP4 paper's recipe, and the naive fp4 recipes; fp4-dge:
# Wang et al. 2025's DGE + OCC, its direct-cast baseline fp4-direct and the two one-part ablations;
# int4: Xi et al. 2023's Hadamard quantizer + bit splitting + leverage-score sampling, and int4-naive); prints
# the curves, the final validation loss of each run (the low-precision forward's, and the f32
# master weights' with f32 GEMMs) and the gap to the f32 and bf16 runs.
#
#   bench/low_precision_train.sh [OUT_DIR]        (default /tmp/lp-train)
# Settings (environment variables; defaults in brackets):
#   LOWBIT      [build-rel/lowbit]
#   TEXT        [../shared/data/tinyshakespeare/input.txt]: the first 1,000,000 bytes train, the rest
#               validate (as bench/optim8.sh)
#   TOKENIZER   [../shared/models/stories260K/tok512.model]
#   MODEL_ARGS  ["--dim 64 --hidden-dim 172 --layers 5 --heads 8 --kv-heads 4 --max-seq-len 256 --vocab 512"]
#               (the stories260K shape)
#   STEPS [600]  BATCH [16]  SEQ [256]  LR [2e-3]  WARMUP [50]  EVAL_EVERY [50]  EVAL_BATCHES [8]
#   THREADS [2]  SEED [1]  DEVICE [cpu]
#   RUNS  ["f32 bf16 fp8 fp8-current mxfp4 nvfp4 nvfp4-naive mxfp4-naive"]: names from the table below
#   JOBS  [1]: runs at a time (each with THREADS threads)
#   LP_GEMM [auto]: --lp-gemm of every run (auto: native FP8/bf16 GEMMs on cuda, emulated on the CPU)
#   SUMMARY_ONLY [0]: 1 = run nothing, print the tables of the RUNS already in OUT_DIR
#   TRAIN_TOKENS / VALID_TOKENS: already tokenized data (raw int32) instead of TEXT (e.g. linux-docs
#               with the Llama 2 tokenizer for the stories15M shape: see the GPU lines at the end)
# Results: OUT_DIR/<run>/ (log.jsonl, summary.json) and markdown tables on stdout.
#
# GPU lines for the H100 (not run here; the same numerics through the CUDA op dispatch, still
# emulated — f32 GEMMs on dequantized operands; run from the repository root with a CUDA build):
#   stories15M shape on linux-docs (bench/train_stories15m.sh's setup: tokenize once with its step 1):
#     DEVICE=cuda TRAIN_TOKENS=out/stories15m/init/train.tokens VALID_TOKENS=out/stories15m/init/valid.tokens \
#     MODEL_ARGS="--dim 288 --hidden-dim 768 --layers 6 --heads 6 --max-seq-len 256 --vocab 32000" \
#     STEPS=1000 BATCH=64 SEQ=256 LR=1e-3 WARMUP=100 EVAL_EVERY=100 \
#     RUNS="f32 bf16 fp8 fp8-current mxfp4 nvfp4 nvfp4-naive" bench/low_precision_train.sh out/lp-15m
#   ~110M shape (dim 768, 12 layers, 12 heads, SwiGLU 2048, as bench/bench_train_step.cpp's 110M):
#     DEVICE=cuda TRAIN_TOKENS=... VALID_TOKENS=... \
#     MODEL_ARGS="--dim 768 --hidden-dim 2048 --layers 12 --heads 12 --max-seq-len 512 --vocab 32000" \
#     STEPS=2000 BATCH=32 SEQ=512 LR=6e-4 WARMUP=200 EVAL_EVERY=200 \
#     RUNS="f32 bf16 fp8 nvfp4 nvfp4-naive" bench/low_precision_train.sh out/lp-110m
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${LOWBIT_SHARED:-../shared}
out=${1:-/tmp/lp-train}
LOWBIT=${LOWBIT:-build-rel/lowbit}
TEXT=${TEXT:-$shared/data/tinyshakespeare/input.txt}
TOKENIZER=${TOKENIZER:-$shared/models/stories260K/tok512.model}
MODEL_ARGS=${MODEL_ARGS:---dim 64 --hidden-dim 172 --layers 5 --heads 8 --kv-heads 4 --max-seq-len 256 --vocab 512}
STEPS=${STEPS:-600} BATCH=${BATCH:-16} SEQ=${SEQ:-256} LR=${LR:-2e-3} WARMUP=${WARMUP:-50}
EVAL_EVERY=${EVAL_EVERY:-50} EVAL_BATCHES=${EVAL_BATCHES:-8} THREADS=${THREADS:-2} SEED=${SEED:-1} DEVICE=${DEVICE:-cpu}
RUNS=${RUNS:-f32 bf16 fp8 fp8-current mxfp4 nvfp4 nvfp4-naive mxfp4-naive} JOBS=${JOBS:-1}

run_args() {  # the --precision flags of a run name
  case $1 in
    f32) echo "--precision f32" ;;
    bf16) echo "--precision bf16" ;;
    fp8) echo "--precision fp8 --fp8-scaling delayed --amax-history 16" ;;
    fp8-current) echo "--precision fp8 --fp8-scaling current" ;;
    mxfp4) echo "--precision mxfp4" ;;
    nvfp4) echo "--precision nvfp4" ;;
    nvfp4-naive) echo "--precision nvfp4 --lp-recipe naive" ;;
    mxfp4-naive) echo "--precision mxfp4 --lp-recipe naive" ;;
    nvfp4-keep0) echo "--precision nvfp4 --lp-keep-last 0" ;;
    fp4-dge) echo "--precision fp4-dge" ;;                                  # DGE k 5 clip 3 + OCC 0.999
    fp4-direct) echo "--precision fp4-dge --lp-recipe naive" ;;             # direct E2M1 cast, STE, no OCC
    fp4-dge-only) echo "--precision fp4-dge --occ-quantile 1" ;;            # ablation: DGE, no OCC
    fp4-occ-only) echo "--precision fp4-dge --dge-k 1" ;;                   # ablation: OCC, STE
    fp4-dge-q99) echo "--precision fp4-dge --occ-quantile 0.99" ;;          # the paper's other alpha
    int4) echo "--precision int4" ;;                                        # HQ (block 32) + bit splitting + LSS
    int4-naive) echo "--precision int4 --lp-recipe naive" ;;                # plain per-tensor INT4, round to nearest
    int4-bs) echo "--precision int4 --lp-int4-grad bs" ;;                   # ablation: bit splitting, no LSS
    int4-bs-dgrad) echo "--precision int4 --lp-int4-grad bs-lss-dgrad" ;;   # ablation: LSS on dgrad only (released code)
    int4-row) echo "--precision int4 --lp-int4-scale row" ;;                # ablation: per-token / per-channel scales
    *) echo "unknown run '$1'" >&2; return 1 ;;
  esac
}

if [[ ${SUMMARY_ONLY:-0} != 1 ]]; then
[[ -f $LOWBIT ]] || { echo "missing $LOWBIT" >&2; exit 2; }
mkdir -p "$out"
read -r -a shape <<<"$MODEL_ARGS"
if [[ -n ${TRAIN_TOKENS:-} ]]; then
  data=(--train-tokens "$TRAIN_TOKENS" --valid-tokens "$VALID_TOKENS")
else
  for f in "$TEXT" "$TOKENIZER"; do [[ -f $f ]] || { echo "missing $f" >&2; exit 2; }; done
  if [[ ! -f $out/tok/train.tokens ]]; then  # tokenize once; every run reads the same ids
    head -c 1000000 "$TEXT" >"$out/train.txt"
    tail -c +1000001 "$TEXT" >"$out/valid.txt"
    "$LOWBIT" train --out "$out/tok" "${shape[@]}" --tokenizer "$TOKENIZER" --train "$out/train.txt" \
      --valid "$out/valid.txt" --steps 0 --seq-len "$SEQ" --json >/dev/null
  fi
  data=(--train-tokens "$out/tok/train.tokens" --valid-tokens "$out/tok/valid.tokens")
fi

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); load before: $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%FT%TZ)"
one_run() {
  local name=$1 flags
  flags=$(run_args "$name")
  read -r -a extra <<<"$flags"
  rm -rf "${out:?}/$name"
  local cmd=("$LOWBIT" train --out "$out/$name" "${shape[@]}" "${data[@]}" --steps "$STEPS" --batch "$BATCH"
             --seq-len "$SEQ" --lr "$LR" --warmup "$WARMUP" --eval-every "$EVAL_EVERY" --eval-batches "$EVAL_BATCHES"
             --seed "$SEED" --threads "$THREADS" --device "$DEVICE" --checkpoint-every 0 --lp-gemm "${LP_GEMM:-auto}"
             "${extra[@]}" --json)
  echo "+ ${cmd[*]}" >&2
  "${cmd[@]}" >"$out/$name.json" 2>"$out/$name.stderr" || { tail -3 "$out/$name.stderr" >&2; return 1; }
  cp "$out/$name.json" "$out/$name/summary.json"
  echo "$name done; load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
}
running=0
for r in $RUNS; do
  one_run "$r" &
  running=$((running + 1))
  if ((running >= JOBS)); then wait -n; running=$((running - 1)); fi
done
wait
fi

python3 - "$out" $RUNS <<'EOF'
import json, statistics, sys
out, runs = sys.argv[1], sys.argv[2:]
rows = {}
for r in runs:
    s = json.load(open(f"{out}/{r}.json"))
    log = [json.loads(l) for l in open(f"{out}/{r}/log.jsonl")]
    tokens_per_step = s["tokens_per_second"] * s["train_seconds"] / max(len(log), 1)
    step_ms = [1000 * tokens_per_step / x["tokens_per_second"] for x in log]
    rows[r] = (s, dict((x["step"], x["val_loss"]) for x in log if "val_loss" in x), step_ms)
base = rows.get("f32", rows[runs[0]])[0]["final_val_loss"]
bf16 = rows["bf16"][0]["final_val_loss"] if "bf16" in rows else None
print("| run | settings | final train loss | final val loss | vs f32 | vs bf16 | master weights, f32 GEMMs | median step (ms) |")
print("|---|---|---|---|---|---|---|---|")
for r, (s, vals, ms) in rows.items():
    v = s["final_val_loss"]
    f32v = s.get("final_val_loss_f32")
    vs_bf16 = f"{100 * (v / bf16 - 1):+.2f} %" if bf16 else ""
    print(f"| {r} | {s.get('precision_settings', s['precision'])} | {s['final_train_loss']:.4f} | {v:.4f} | "
          f"{100 * (v / base - 1):+.2f} % | {vs_bf16} | {f'{f32v:.4f}' if f32v else ''} | {statistics.median(ms):.0f} |")
# The curves as an SVG (no plotting library needed): OUT_DIR/curves.svg
W, H, L, B = 640, 400, 60, 40
steps = sorted({st for r in runs for st in rows[r][1]})
vals = [v for r in runs for v in rows[r][1].values()]
lo, hi = min(vals), min(max(vals), 2 * min(vals))  # clip the early, high part
sx = lambda st: L + (W - L - 150) * (st - steps[0]) / max(1, steps[-1] - steps[0])
sy = lambda v: 20 + (H - 20 - B) * (hi - min(v, hi)) / max(1e-9, hi - lo)
colors = ["#000000", "#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<line x1="{L}" y1="{H - B}" x2="{W - 150}" y2="{H - B}" stroke="black"/>',
       f'<line x1="{L}" y1="20" x2="{L}" y2="{H - B}" stroke="black"/>',
       f'<text x="{(W - 150 + L) / 2}" y="{H - 8}" text-anchor="middle">step</text>',
       f'<text x="12" y="{H / 2}" transform="rotate(-90 12 {H / 2})" text-anchor="middle">validation loss</text>']
for k in range(6):
    v = lo + (hi - lo) * k / 5
    svg.append(f'<text x="{L - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    svg.append(f'<line x1="{L}" y1="{sy(v):.1f}" x2="{W - 150}" y2="{sy(v):.1f}" stroke="#ddd"/>')
for st in steps[:: max(1, len(steps) // 8)]:
    svg.append(f'<text x="{sx(st):.1f}" y="{H - B + 14}" text-anchor="middle">{st}</text>')
for i, r in enumerate(runs):
    pts = " ".join(f"{sx(st):.1f},{sy(v):.1f}" for st, v in sorted(rows[r][1].items()))
    c = colors[i % len(colors)]
    svg.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{pts}"/>')
    svg.append(f'<text x="{W - 140}" y="{30 + 16 * i}" fill="{c}">{r}: {rows[r][0]["final_val_loss"]:.4f}</text>')
svg.append("</svg>")
open(f"{out}/curves.svg", "w").write("\n".join(svg) + "\n")

print()
print("validation loss by step:")
print("| step | " + " | ".join(runs) + " |")
print("|---|" + "---|" * len(runs))
for step in sorted(next(iter(rows.values()))[1]):
    print(f"| {step} | " + " | ".join(f"{rows[r][1].get(step, float('nan')):.4f}" for r in runs) + " |")
EOF
