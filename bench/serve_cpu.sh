#!/usr/bin/env bash
# Server CPU time per generated token at each client count, for lowbit serve (and an older lowbit
# binary in the same run): a load-robust companion of serve_vs_llamacpp.sh. On a machine shared
# with other jobs the throughput (wall time) of a round swings with the others' load; the CPU time
# the server process spends per token (all its threads: scheduler, pool workers, HTTP) swings much
# less. "x 1 client" = CPU per token with one client / CPU per token with N: how many times more
# tokens the same CPU time makes when N clients are batched (the issue's 8-client goal, >= 4x,
# in CPU terms; spinning pool workers count as CPU, so on an idle machine the wall-time ratio
# is close to it). Same client script, model and server flags as serve_vs_llamacpp.sh.
#
#   bench/serve_cpu.sh [MODEL.gguf]
#   CLIENTS=1,8 REQUESTS=4 BASE_LOWBIT=/path/to/old/lowbit bench/serve_cpu.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${LOWBIT_SHARED:-$ROOT/../shared}
MODEL=${1:-$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}
THREADS=${THREADS:-2}
CLIENTS=${CLIENTS:-1,4,8,16}
MAX_TOKENS=${MAX_TOKENS:-64}
REQUESTS=${REQUESTS:-4}
LOWBIT=${LOWBIT:-$ROOT/build-rel/lowbit}
BASE_LOWBIT=${BASE_LOWBIT:-}
[ -f "$MODEL" ] || { echo "model $MODEL not found" >&2; exit 1; }
[ -x "$LOWBIT" ] || { echo "$LOWBIT not built" >&2; exit 1; }
TICK=$(getconf CLK_TCK)

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

cpu_seconds() {  # pid: user + system CPU seconds of the whole process
  awk -v t="$TICK" '{ print ($14 + $15) / t }' "/proc/$1/stat"
}

run() {  # label binary port
  "$2" -q serve -m "$MODEL" --port "$3" --threads "$THREADS" --parallel 16 --ctx 512 2>"/tmp/lowbit-serve-cpu-$3.log" &
  local pid=$!
  pids+=($pid)
  for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$3/health" >/dev/null 2>&1 && break; sleep 0.2; done
  python3 "$ROOT/bench/serve_clients.py" --url "http://127.0.0.1:$3" --clients 1 --requests 1 --max-tokens 8 >/dev/null
  echo "== $1: $(uptime)"
  echo "| $1 | clients | tok/s | server CPU ms / token | x 1 client (CPU) |"
  echo "|---|---:|---:|---:|---:|"
  local base=""
  for n in ${CLIENTS//,/ }; do
    local c0 c1 out
    c0=$(cpu_seconds "$pid")
    out=$(python3 "$ROOT/bench/serve_clients.py" --url "http://127.0.0.1:$3" --clients "$n" --requests "$REQUESTS" \
      --max-tokens "$MAX_TOKENS" --warmup 0 | grep '^{')
    c1=$(cpu_seconds "$pid")
    read -r tokens tps < <(python3 -c 'import json,sys; j=json.loads(sys.argv[1]); print(j["tokens"], j["throughput_tps"])' "$out")
    local ms
    ms=$(awk -v a="$c0" -v b="$c1" -v t="$tokens" 'BEGIN { printf "%.3f", 1e3 * (b - a) / t }')
    [ -n "$base" ] || base=$ms
    awk -v l="$1" -v n="$n" -v tps="$tps" -v ms="$ms" -v b="$base" 'BEGIN { printf "| %s | %d | %.1f | %s | %.2f |\n", l, n, tps, ms, b / ms }'
  done
  kill "$pid"; wait "$pid" || true
}

echo "machine: $(lscpu | grep 'Model name' | sed 's/ *Model name: *//'), $(nproc) CPUs; threads $THREADS"
run "lowbit serve" "$LOWBIT" 18441
if [ -n "$BASE_LOWBIT" ]; then run "lowbit (base)" "$BASE_LOWBIT" 18443; fi
