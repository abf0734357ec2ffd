#!/usr/bin/env bash
# Serving throughput and latency, lowbit serve vs llama.cpp's llama-server, on the same GGUF model
# (default SmolLM2-135M-Instruct Q4_1 from ../shared), driven by the same client script
# (bench/serve_clients.py): 1, 4, 8, 16 concurrent clients, greedy, 64 tokens per answer
# (ignore_eos), 2 requests per client. Reports per client count: throughput, time to first token
# (mean / p50 / p90) and inter-token latency (mean / p50 / p90 / max).
#
#   bench/serve_vs_llamacpp.sh [MODEL.gguf]
#   THREADS=2 CLIENTS=1,4,8,16 MAX_TOKENS=64 REQUESTS=2 bench/serve_vs_llamacpp.sh
#   LONG_CLIENTS=1 LONG_WORDS=400 CLIENTS=4,8 bench/serve_vs_llamacpp.sh   # one client sends a long prompt
#   LOWBIT_ARGS="--prefill-chunk 64" SERVERS=lowbit bench/serve_vs_llamacpp.sh
#   BASE_LOWBIT=/path/to/old/lowbit bench/serve_vs_llamacpp.sh   # also an older lowbit, same run
#
# Both servers: $THREADS threads, 16 slots of 512 tokens (llama-server: -np 16 -c 8192, continuous
# batching, its default -b 2048 -ub 512). llama-server comes from bench/llama_cpp.sh --avx2 --server
# (built outside the repository; LLAMA_BIN overrides). SERVERS picks which run (lowbit, base,
# llama; default all that are available). Prints the machine load before each run: measure when
# quiet, and compare servers within one run.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${LOWBIT_SHARED:-$ROOT/../shared}
MODEL=${1:-$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}
THREADS=${THREADS:-2}
CLIENTS=${CLIENTS:-1,4,8,16}
MAX_TOKENS=${MAX_TOKENS:-64}
REQUESTS=${REQUESTS:-2}
LOWBIT=${LOWBIT:-$ROOT/build-rel/lowbit}
LOWBIT_ARGS=${LOWBIT_ARGS:-}
BASE_LOWBIT=${BASE_LOWBIT:-}
LONG_CLIENTS=${LONG_CLIENTS:-0}
LONG_WORDS=${LONG_WORDS:-400}
SERVERS=${SERVERS:-lowbit,base,llama}
LLAMA_BIN=${LLAMA_BIN:-}
if [[ ",$SERVERS," == *",llama,"* && -z "$LLAMA_BIN" ]]; then
  LLAMA_BIN=$(bash "$ROOT/bench/llama_cpp.sh" --avx2 --server | tail -n 1)
fi
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
    --max-tokens "$MAX_TOKENS" --label "$1" --long-clients "$LONG_CLIENTS" --long-words "$LONG_WORDS"
}

run_lowbit() {  # label binary port
  # shellcheck disable=SC2086
  "$2" -q serve -m "$MODEL" --port "$3" --threads "$THREADS" --parallel 16 --ctx 512 $4 2>"/tmp/lowbit-serve-bench-$3.log" &
  pids+=($!)
  wait_ready "http://127.0.0.1:$3"
  run_clients "$1" "http://127.0.0.1:$3"
  kill "${pids[-1]}"; wait "${pids[-1]}" || true
}

echo "machine: $(lscpu | grep 'Model name' | sed 's/ *Model name: *//'), $(nproc) CPUs; threads $THREADS"
if [[ ",$SERVERS," == *",lowbit,"* ]]; then
  run_lowbit "lowbit serve${LOWBIT_ARGS:+ $LOWBIT_ARGS}" "$LOWBIT" 18431 "$LOWBIT_ARGS"
fi
if [[ ",$SERVERS," == *",base,"* && -n "$BASE_LOWBIT" ]]; then
  run_lowbit "lowbit (base)" "$BASE_LOWBIT" 18433 ""
fi
if [[ ",$SERVERS," == *",llama,"* ]]; then
  PORT=18432
  "$LLAMA_BIN/llama-server" -m "$MODEL" --port $PORT -t "$THREADS" -tb "$THREADS" -np 16 -c 8192 -cb \
    --no-webui >/tmp/llama-server-bench.log 2>&1 &
  pids+=($!)
  wait_ready "http://127.0.0.1:$PORT"
  run_clients "llama-server" "http://127.0.0.1:$PORT"
fi
