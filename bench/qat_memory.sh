#!/usr/bin/env bash
# Peak memory (RSS) of `lowbit qat` per method on SmolLM2-135M (CPU): a few end-to-end steps of each
# method with the same settings, so the difference is what each method keeps per weight (lsq: latent
# f32 weight + gradient + two AdamW moments; l4q: frozen W0 + LoRA factors, the merged and quantized
# weight during a step; lr-qat: W0/s0 downcast to int8 + the low-rank factors).
#   bench/qat_memory.sh [OUT_DIR] [METHODS]     (default /tmp/qat-memory, "lsq l4q")
# A METHODS entry may carry extra flags after a colon, commas for spaces:
#   bench/qat_memory.sh /tmp/qat-memory "lsq l4q lr-qat lr-qat:--downcast,f32 lr-qat:--grad-checkpointing,off"
# --init minmax for every method (LSQ+'s MSE search over 107M weights would dominate the run time);
# --steps 2 --batch 1 --seqlen 128, single-threaded, and the same with --steps 0 (load, layer set-up
# and export only: the part that is not the training step). Prints one line per run: peak RSS (the
# command's own report, getrusage), seconds, the loss on the fixed windows before -> after.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
shared=${LOWBIT_SHARED:-$here/../../shared}
out=${1:-/tmp/qat-memory} methods=${2:-"lsq l4q"}
lowbit=${LOWBIT:-$here/../build-rel/lowbit}
model=$shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$out"
for entry in $methods; do
  m=${entry%%:*} extra=""
  [ "$entry" != "$m" ] && extra=${entry#*:} && extra=${extra//,/ }
  tag=$(echo -n "$entry" | tr -c 'A-Za-z0-9.-' '_')
  for steps in 2 0; do
    rm -rf "$out/$tag-$steps"
    # shellcheck disable=SC2086
    "$lowbit" -q qat -m "$model" --method "$m" --format int2g64 --init minmax $extra \
      --train "$shared/data/tinyshakespeare/input.txt" --steps $steps --batch 1 --seqlen 128 --threads 1 --json \
      -o "$out/$tag-$steps" > "$out/$tag-$steps.json"
    python3 - "$out/$tag-$steps.json" "$m $extra --steps $steps" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
st = r["stages"][0]
after = "" if st["loss_after"] is None else f", loss {st['loss_before']:.3f} -> {st['loss_after']:.3f}"
print(f"{sys.argv[2]}: peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB, {r['seconds']:.0f} s{after}")
PY
  done
done
