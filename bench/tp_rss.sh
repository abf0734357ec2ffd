#!/usr/bin/env bash
# Per-rank peak RSS of `lowbit generate --tp N` (issue 20): every rank loading only its piece of the
# block linears (rank-local loading, the default) against every rank reading the whole checkpoint
# and cutting it in memory (LOWBIT_TP_LOAD=whole, what --tp did before). The ranks are started as an
# external launcher starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), each under
# its own /usr/bin/time, so each rank's max RSS is its own. Rank 0's text must be the same both ways.
#
#   bench/tp_rss.sh        # SmolLM2-135M Q4_1 GGUF (3 ranks: 9 heads / 3 KV heads), a random dense
#                          # bf16 Hugging Face model and its RTN int4g128 lowbit checkpoint (2 ranks),
#                          # each also at 1 rank
# Settings: LOWBIT (build-rel/lowbit), LOWBIT_SHARED (../shared), THREADS (1 per rank), STEPS (8),
# DIM HIDDEN LAYERS HEADS KV_HEADS VOCAB (the random model: 2048 5632 8 16 8 32000), CACHE (where
# the random model is written once: ~/.cache/lowbit-tp-rss).
set -euo pipefail
LOWBIT=${LOWBIT:-build-rel/lowbit}
SHARED=${LOWBIT_SHARED:-../shared}
THREADS=${THREADS:-1} STEPS=${STEPS:-8}
DIM=${DIM:-2048} HIDDEN=${HIDDEN:-5632} LAYERS=${LAYERS:-8} HEADS=${HEADS:-16} KV_HEADS=${KV_HEADS:-8} VOCAB=${VOCAB:-32000}
CACHE=${CACHE:-$HOME/.cache/lowbit-tp-rss}
smol=$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
llama2_tok=$SHARED/tokenizers/llama2/tokenizer.model
for f in "$smol" "$llama2_tok" "$LOWBIT"; do [ -e "$f" ] || { echo "missing $f (set LOWBIT_SHARED / LOWBIT)" >&2; exit 1; }; done
rand=$CACHE/random-d$DIM-f$HIDDEN-l$LAYERS-h$HEADS-k$KV_HEADS-v$VOCAB
if [ ! -f "$rand/config.json" ]; then
  mkdir -p "$CACHE"
  "$LOWBIT" random-model -o "$rand" --dim "$DIM" --hidden-dim "$HIDDEN" --layers "$LAYERS" --heads "$HEADS" \
    --kv-heads "$KV_HEADS" --vocab "$VOCAB" --dtype bf16 >&2
fi
[ -f "$rand-rtn-int4g128/config.json" ] ||
  "$LOWBIT" quantize -m "$rand" --method rtn --format int4g128 -o "$rand-rtn-int4g128" > /dev/null 2>&1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# run N MODE ARGS...: N ranks of `generate ARGS` with LOWBIT_TP_LOAD=MODE; prints each rank's max
# RSS in MiB (space separated) and leaves rank 0's text in $tmp/out0.
run() {
  local n=$1 mode=$2
  shift 2
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  local pids=() r
  for ((r = 0; r < n; r++)); do
    local dist=()
    [ "$n" -gt 1 ] && dist=(RANK=$r WORLD_SIZE=$n LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port)
    env "${dist[@]}" LOWBIT_TP_LOAD="$mode" /usr/bin/time -f %M -o "$tmp/rss$r" \
      "$LOWBIT" generate "$@" -t 0 -n "$STEPS" --threads "$THREADS" > "$tmp/out$r" 2> "$tmp/err$r" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || { cat "$tmp"/err* >&2; exit 1; }; done
  local out=""
  for ((r = 0; r < n; r++)); do out+="$(($(tail -1 "$tmp/rss$r") / 1024)) "; done
  echo "$out"
}

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo); load: $(uptime | sed 's/.*load average: //'); $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "| model | ranks | per-rank max RSS, whole checkpoint then cut (MiB) | per-rank max RSS, rank-local (MiB) | rank 0 text |"
echo "|---|---:|---|---|---|"
row() {  # NAME N ARGS...
  local name=$1 n=$2
  shift 2
  local whole local_ same
  whole=$(run "$n" whole "$@")
  cp "$tmp/out0" "$tmp/text-whole"
  local_=$(run "$n" local "$@")
  cmp -s "$tmp/out0" "$tmp/text-whole" && same="equal" || same="DIFFERENT"
  echo "| $name | $n | $whole| $local_| $same |"
}
row "SmolLM2-135M Q4_1 GGUF" 1 -m "$smol" -p "The capital of France is"
row "SmolLM2-135M Q4_1 GGUF" 3 -m "$smol" -p "The capital of France is"
name="random dense bf16 HF (dim $DIM, hidden $HIDDEN, $LAYERS layers, $HEADS/$KV_HEADS heads, vocab $VOCAB)"
row "$name" 1 -m "$rand" --tokenizer "$llama2_tok" -p "Hello"
row "$name" 2 -m "$rand" --tokenizer "$llama2_tok" -p "Hello"
row "the same, RTN int4g128 lowbit checkpoint" 1 -m "$rand-rtn-int4g128" --tokenizer "$llama2_tok" -p "Hello"
row "the same, RTN int4g128 lowbit checkpoint" 2 -m "$rand-rtn-int4g128" --tokenizer "$llama2_tok" -p "Hello"
