#!/usr/bin/env bash
# Issue 14's speed question: one EfficientQAT E2E-QP step (codes frozen, step sizes trained, LM loss)
# and one distillation step (the same with KL to the FP teacher's logits, teacher forward included)
# of a Llama-2-7B-shaped stack (dim 4096, hidden 11008, 32 heads, vocab 32000, LAYERS blocks),
# int2g64, BATCH x SEQ tokens, lowbit (bench/bench_e2eqp.cpp) against the same computation in PyTorch
# eager and torch.compile (bench/torch_e2eqp_ref.py), in one run, alternating: ROUNDS rounds of
# lowbit, eager, compile. Prints one table (mean ms/step over the rounds, peak memory held by tensors)
# and writes the raw output to $OUT (or /tmp/e2eqp-out). docs/results/qat-7b-step.md.
#
# On the GPU machine, after `bench/cuda/gpu_session.sh setup` (its stage must include
# build-cuda/bench/bench_e2eqp: configure build-cuda with -DLOWBIT_BENCH=ON):
#   bench/cuda/e2eqp_7b.sh
# Settings: LAYERS [2]  BATCH [1]  SEQ [4096]  STEPS [8]  WARMUP [3]  ROUNDS [2]  PREC [bf16: lowbit
# --bf16 --tf32, PyTorch autocast bf16 + TF32; f32: TF32 only on both sides]  BENCH [/tmp/w/bin/bench_e2eqp]
#   DEADLINE [270: seconds for all rounds; each command is cut to what is left, none starts with < 20 s]
#   SMOKE [1: then `lowbit qat --method efficientqat --bf16 --tf32` on a small random model, a few seconds]
# Local smoke test on the CPU (tiny shape):
#   DEVICE=cpu DIM=64 HIDDEN=128 HEADS=4 VOCAB=256 SEQ=64 BENCH=build-rel/bench/bench_e2eqp bench/cuda/e2eqp_7b.sh
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
W=/tmp/w
export LD_LIBRARY_PATH=$W/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
DEVICE=${DEVICE:-cuda} LAYERS=${LAYERS:-2} BATCH=${BATCH:-1} SEQ=${SEQ:-4096} STEPS=${STEPS:-8} WARMUP=${WARMUP:-3}
ROUNDS=${ROUNDS:-2} PREC=${PREC:-bf16} BENCH=${BENCH:-$W/bin/bench_e2eqp} DEADLINE=${DEADLINE:-270}
shape="--layers $LAYERS --dim ${DIM:-4096} --hidden ${HIDDEN:-11008} --heads ${HEADS:-32} --vocab ${VOCAB:-32000}"
shape="$shape --batch $BATCH --seq $SEQ --steps $STEPS --warmup $WARMUP --format int2g64"
O=${OUT:-/tmp/e2eqp-out}
mkdir -p "$O"
raw=$O/e2eqp_7b.txt
: > "$raw"
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$raw"
  [ -x "$BENCH" ] || { echo "no $BENCH: stage build-cuda/bench/bench_e2eqp (LOWBIT_BENCH=ON)" | tee -a "$raw"; exit 1; }
fi
case "$PREC" in
bf16) lflags="--tf32 --bf16"; tflags="--tf32 --amp bf16" ;;
f32) lflags="--tf32"; tflags="--tf32 --amp off" ;;
*) echo "PREC must be bf16 or f32" >&2; exit 2 ;;
esac
[ "$DEVICE" = cpu ] && { lflags=""; tflags="--amp off"; }
echo "shape: $shape; PREC=$PREC; lowbit $lflags; torch $tflags; $(date -u +%FT%TZ)" | tee -a "$raw"
t0=$(date +%s)
# Every command gets at most its cap and what is left of DEADLINE seconds (the whole script stays
# under the device call's limit); a command that would get under 20 s is skipped.
left() { echo $(( DEADLINE - ($(date +%s) - t0) )); }
cap() { local l; l=$(left); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
for r in $(seq 1 "$ROUNDS"); do
  echo "## round $r ($(( $(date +%s) - t0 )) s)" | tee -a "$raw"
  if [ "$(left)" -lt 20 ]; then echo "skipped: ${DEADLINE}s deadline" | tee -a "$raw"; break; fi
  prof=""
  [ "$r" = 1 ] && [ "$DEVICE" = cuda ] && prof="--profile"  # round 1: GPU time per op of one more step
  # shellcheck disable=SC2086
  timeout "$(cap 120)" "$BENCH" --device "$DEVICE" $shape $lflags $prof 2>&1 | sed "s/^RESULT /RESULT round=$r /" | tee -a "$raw"
  for mode in eager compile; do
    [ "$(left)" -lt 20 ] && { echo "torch $mode skipped: ${DEADLINE}s deadline" | tee -a "$raw"; continue; }
    # shellcheck disable=SC2086
    timeout "$(cap 200)" python3 bench/torch_e2eqp_ref.py --device "$DEVICE" $shape $tflags --modes $mode 2>&1 |
      grep -v "^W[0-9]" | sed "s/^RESULT /RESULT round=$r /" | tee -a "$raw"
  done
done
# The method's own path on the GPU, small and quick: `lowbit qat --method efficientqat --bf16 --tf32`
# (the E2E stage under the guard, the int8 frozen codes) on a random 2-block model; its report's
# E2E-QP loss before/after. LOWBIT [/tmp/w/bin/lowbit]; SMOKE=0 skips it.
LOWBIT=${LOWBIT:-$W/bin/lowbit}
if [ "${SMOKE:-1}" = 1 ] && [ -x "$LOWBIT" ] && [ "$(left)" -gt 30 ]; then
  S=$(mktemp -d)
  python3 -c "import numpy as np; np.random.default_rng(1).integers(0, 512, 64 * 257, dtype=np.int32).tofile('$S/tok.i32')"
  qf="--device $DEVICE"
  [ "$DEVICE" = cuda ] && qf="$qf --bf16 --tf32"
  # shellcheck disable=SC2086
  "$LOWBIT" -q random-model -o "$S/m" --dim 256 --hidden-dim 688 --layers 2 --heads 4 --vocab 512 --max-seq-len 256 \
    --dtype f32 > /dev/null &&
    timeout "$(cap 60)" "$LOWBIT" -q qat -m "$S/m" --method efficientqat --format int2g64 --train-tokens "$S/tok.i32" \
      --nsamples 8 --block-epochs 1 --steps 20 --batch 4 --seqlen 256 --lr 1e-3 $qf -o "$S/q" > /dev/null 2> "$S/err"
  echo "lowbit qat efficientqat $qf (smoke, rc $?): $(python3 -c "import json; s = json.load(open('$S/q/qat_report.json'))['stages'][-1]; print(s['stage'], 'loss', round(s['loss_before'], 4), '->', round(s['loss_after'], 4), 'hyper bf16', s['hyper'].get('bf16'))" 2>&1 | tail -1)" | tee -a "$raw"
  tail -2 "$S/err" >> "$raw"
  rm -rf "$S"
fi
echo "total $(( $(date +%s) - t0 )) s" | tee -a "$raw"
python3 - "$raw" <<'PY' | tee "$O/e2eqp_7b_table.md"
import re, statistics as st, sys
rows = {}
for line in open(sys.argv[1]):
    if not line.startswith("RESULT "):
        continue
    kv = dict(re.findall(r"(\w+)=(\S+)", line))
    impl = line.split()[2]
    rows.setdefault((kv["step"], impl), []).append((float(kv["ms_per_step"]), float(kv["peak_gib"]),
                                                    float(kv["loss_first"]), float(kv["loss_last"])))
print("| step | implementation | ms/step (mean of rounds; each) | peak GiB | loss first -> last | time / lowbit's |")
print("|---|---|---|---|---|---|")
for step in ("lm", "distill"):
    base = rows.get((step, "lowbit"))
    for impl in ("lowbit", "torch-eager", "torch-compile"):
        r = rows.get((step, impl))
        if not r:
            print(f"| {step} | {impl} | not run | | | |")
            continue
        ms = st.mean(x[0] for x in r)
        ratio = f"{ms / st.mean(x[0] for x in base):.2f}" if base and impl != "lowbit" else ""
        each = ", ".join(f"{x[0]:.1f}" for x in r)
        print(f"| {step} | {impl} | {ms:.1f} ({each}) | {max(x[1] for x in r):.2f} | {r[0][2]:.4f} -> {r[0][3]:.4f} | {ratio} |")
PY
