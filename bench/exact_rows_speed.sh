#!/usr/bin/env bash
# Speed of two lowbit binaries side by side (issue 10: the Exact body's row-count-independent f32
# products against the OpenBLAS sgemm they replaced), on SmolLM2-135M-Instruct (the shared Q4_1
# GGUF), interleaved round by round so that both see the same load:
#
#   bench/exact_rows_speed.sh BASE_BIN NEW_BIN [ROUNDS] [THREADS]     (defaults: 5 rounds, 2 threads)
#
# Per round and binary (the order alternates), `lowbit bench --json`:
#   pp512         prefill of 512 tokens, default --matmul auto (the Exact body's tiled prefill)
#   tg64          64 decode steps, default (the Int8 body: unchanged)
#   tg64 exact    64 decode steps with --matmul exact (the Exact body's decode, M = 1)
#   pp64 exact    a 64-token prompt with --matmul exact
# Prints per test the median over rounds of tokens/s and of CPU ms per token for each binary and
# the median of the per-round ratios NEW / BASE (tokens/s: > 1 is faster; CPU: < 1 is cheaper).
set -euo pipefail
BASE=${1:?usage: exact_rows_speed.sh BASE_BIN NEW_BIN [ROUNDS] [THREADS]}
NEW=${2:?usage: exact_rows_speed.sh BASE_BIN NEW_BIN [ROUNDS] [THREADS]}
ROUNDS=${3:-5}
THREADS=${4:-2}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${LOWBIT_SHARED:-$ROOT/../shared}
MODEL=$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
[[ -f $MODEL ]] || { echo "exact_rows_speed.sh: $MODEL is missing (shared data); skipping" >&2; exit 0; }
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
echo "# $(lscpu | grep 'Model name' | sed 's/  */ /g'); $(date -u +%FT%TZ); load $(cut -d' ' -f1-3 /proc/loadavg)"
for ((r = 1; r <= ROUNDS; ++r)); do
  if ((r % 2)); then order=("base:$BASE" "new:$NEW"); else order=("new:$NEW" "base:$BASE"); fi
  for entry in "${order[@]}"; do
    name=${entry%%:*}
    bin=${entry#*:}
    for t in "pp512|-p 512 -n 0" "tg64|-p 0 -n 64" "tg64 exact|-p 0 -n 64 --matmul exact" "pp64 exact|-p 64 -n 0 --matmul exact"; do
      args=${t#*|}
      # shellcheck disable=SC2086
      json=$("$bin" bench -m "$MODEL" $args -r 3 --threads "$THREADS" --json 2>/dev/null)
      echo "$r|$name|${t%%|*}|$(cut -d' ' -f1 /proc/loadavg)|$json" >> "$OUT"
    done
  done
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    r, name, test, load, js = line.rstrip("\n").split("|", 4)
    j = json.loads(js)
    kind = "pp" if test.startswith("pp") else "tg"
    rows.setdefault(test, {}).setdefault(int(r), {})[name] = (j[f"{kind}_tokens_per_s"], j[f"{kind}_cpu_ms_per_token"], float(load))
print("| test | base t/s | new t/s | new / base t/s | base CPU ms/tok | new CPU ms/tok | new / base CPU | load (1 min) |")
print("|---|---:|---:|---:|---:|---:|---:|---|")
for test, by_round in rows.items():
    pairs = [v for v in by_round.values() if "base" in v and "new" in v]
    med = lambda xs: statistics.median(xs)
    bt, nt = med([p["base"][0] for p in pairs]), med([p["new"][0] for p in pairs])
    bc, nc = med([p["base"][1] for p in pairs]), med([p["new"][1] for p in pairs])
    rt = med([p["new"][0] / p["base"][0] for p in pairs])
    rc = med([p["new"][1] / p["base"][1] for p in pairs])
    loads = [p[k][2] for p in pairs for k in ("base", "new")]
    print(f"| {test} | {bt:.1f} | {nt:.1f} | {rt:.3f} | {bc:.2f} | {nc:.2f} | {rc:.3f} | {min(loads):.1f}-{max(loads):.1f} |")
PY
