#!/usr/bin/env bash
# CPU time per decode step at 1 and 8 sequences (`lowbit bench -b N`, serve's batched path without
# HTTP) for the weight layouts of the Int8 body, alternated per row so that a noisy machine's load
# falls on all of them alike (docs/results/packed-inference.md, "Panel layout at load"):
#   base    BASE_LOWBIT (an older binary, e.g. main's), if given
#   rows    this binary with LOWBIT_PANEL_LAYOUT=0 (the storage layout: rows one after another)
#   tile    the panel layout, 16-row kernels through the tile decode (LOWBIT_PANEL_DIRECT=0)
#   direct  the panel layout, ggml blocks read straight by the 16-row products (the default)
#   widen   direct, with the one-row attention widening the f16 KV cache to f32 for BLAS products
#           (LOWBIT_KV_DIRECT=0) instead of the fused kernel that reads it in place (the default)
# Prints one line per run: round, threads, batch, layout, CPU ms per step (all threads), the calling
# thread's CPU ms per step, decode tokens/s (wall), and the load average.
#
#   BASE_LOWBIT=/path/to/main/lowbit ROUNDS=3 THREADS="1 2" bench/panel_layout_steps.sh [MODEL.gguf]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${LOWBIT_SHARED:-$ROOT/../shared}
MODEL=${1:-$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}
LOWBIT=${LOWBIT:-$ROOT/build-rel/lowbit}
BASE_LOWBIT=${BASE_LOWBIT:-}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-"1 2"}
BATCHES=${BATCHES:-"1 8"}
LAYOUTS=${LAYOUTS:-"base rows tile direct"}
CTX=${CTX:-10}
[ -e "$MODEL" ] || { echo "model $MODEL not found" >&2; exit 1; }
echo "machine: $(lscpu | grep 'Model name' | sed 's/ *Model name: *//'), $(nproc) CPUs; $(date -u '+%F %T') UTC"
echo "round threads batch layout cpu_ms_step main_ms_step tok_s load1"
for r in $(seq 1 "$ROUNDS"); do
  for t in $THREADS; do
    for b in $BATCHES; do
      for l in $LAYOUTS; do
        bin=$LOWBIT pl=1 pd=1 kd=1
        case $l in
          base) [ -n "$BASE_LOWBIT" ] || continue; bin=$BASE_LOWBIT ;;
          rows) pl=0 ;;
          tile) pd=0 ;;
          direct) ;;
          widen) kd=0 ;;
          *) echo "unknown layout $l" >&2; exit 1 ;;
        esac
        out=$(LOWBIT_PANEL_LAYOUT=$pl LOWBIT_PANEL_DIRECT=$pd LOWBIT_KV_DIRECT=$kd "$bin" -q bench -m "$MODEL" -p 0 -n 64 -d "$CTX" -r 4 \
          --threads "$t" -b "$b" --json)
        python3 -c 'import json,sys; j=json.loads(sys.argv[1]); print(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5],
  "%.2f" % j["tg_cpu_ms_per_step"], "%.2f" % j.get("tg_main_thread_cpu_ms_per_step", 0), "%.1f" % j["tg_tokens_per_s"], sys.argv[6])' \
          "$out" "$r" "$t" "$b" "$l" "$(cut -d' ' -f1 /proc/loadavg)"
      done
    done
  done
done
