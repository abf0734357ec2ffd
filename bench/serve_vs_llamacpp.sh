#!/usr/bin/env bash
# Serving throughput and latency, lowbit serve vs llama.cpp's llama-server, on the same GGUF model
# (default SmolLM2-135M-Instruct Q4_1 from ../shared), driven by the same client script
# (bench/serve_clients.py): 1, 4, 8, 16 concurrent clients, greedy, 64 tokens per answer
# (ignore_eos), 2 requests per client.
#
#   bench/serve_vs_llamacpp.sh [MODEL.gguf]
#   THREADS=2 CLIENTS=1,4,8,16 MAX_TOKENS=64 REQUESTS=2 bench/serve_vs_llamacpp.sh
#
# Both servers: $THREADS threads, 16 slots of 512 tokens (llama-server: -np 16 -c 8192, continuous
# batching). llama-server comes from bench/llama_cpp.sh --avx2 --server (built outside the
# repository; LLAMA_BIN overrides). Prints the machine load before each run: measure when quiet.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${LOWBIT_SHARED:-$ROOT/../shared}
MODEL=${1:-$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}
THREADS=${THREADS:-2}
CLIENTS=${CLIENTS:-1,4,8,16}
MAX_TOKENS=${MAX_TOKENS:-64}
REQUESTS=${REQUESTS:-2}
LOWBIT=${LOWBIT:-$ROOT/build-rel/lowbit}
LLAMA_BIN=${LLAMA_BIN:-$(bash "$ROOT/bench/llama_cpp.sh" --avx2 --server | tail -n 1)}
[ -f "$MODEL" ] || { echo "model $MODEL not found" >&2; exit 1; }
[ -x "$LOWBIT" ] || { echo "$LOWBIT not built" >&2; exit 1; }

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

wait_ready() {  # url
  for _ in $(seq 1 600); do
    curl -sf "$1/health" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "server at $1 did not become ready" >&2
  return 1
}

run_clients() {  # label url
  echo "== $1: $(uptime)"
  python3 "$ROOT/bench/serve_clients.py" --url "$2" --clients "$CLIENTS" --requests "$REQUESTS" \
    --max-tokens "$MAX_TOKENS" --label "$1"
}

echo "machine: $(lscpu | grep 'Model name' | sed 's/ *Model name: *//'), $(nproc) CPUs; threads $THREADS"
PORT=18431
"$LOWBIT" -q serve -m "$MODEL" --port $PORT --threads "$THREADS" --parallel 16 --ctx 512 2>/tmp/lowbit-serve-bench.log &
pids+=($!)
wait_ready "http://127.0.0.1:$PORT"
run_clients "lowbit serve" "http://127.0.0.1:$PORT"
kill "${pids[-1]}"; wait "${pids[-1]}" || true

PORT=18432
"$LLAMA_BIN/llama-server" -m "$MODEL" --port $PORT -t "$THREADS" -tb "$THREADS" -np 16 -c 8192 -cb \
  --no-webui >/tmp/llama-server-bench.log 2>&1 &
pids+=($!)
wait_ready "http://127.0.0.1:$PORT"
run_clients "llama-server" "http://127.0.0.1:$PORT"
