#!/usr/bin/env bash
# llama.cpp's speed on lowbit-written GGUF files against llama-quantize's files of the same types
# (issue 12: "same size and speed"). For each pair LOWBIT_FILE:LLAMA_FILE, llama-bench runs the two
# files alternately (A B A B ..., --rounds times, each a fresh llama-bench process of -r 1), so a
# load change on a shared box hits both about equally; the report is each file's median tokens/s
# over the rounds, the per-round ratios lowbit / llama-quantize (prompt processing and generation),
# and the ratio of each file's best round (the least disturbed by other jobs on a shared box).
#
#   bench/ggml_speed_pairs.sh [--rounds 5] [-p 128] [-n 32] LOWBIT.gguf:LLAMA.gguf ...
#
# llama.cpp: LLAMA_BIN, else bench/llama_cpp.sh --avx2 (the cached CPU build). THREADS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=5 p=128 n=32 threads=${THREADS:-2} pairs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;; -p) p=$2; shift 2 ;; -n) n=$2; shift 2 ;;
    -*) echo "unknown option $1" >&2; exit 1 ;;
    *) pairs+=("$1"); shift ;;
  esac
done
[ ${#pairs[@]} -gt 0 ] || { echo "usage: $0 [--rounds R] [-p P] [-n N] LOWBIT.gguf:LLAMA.gguf ..." >&2; exit 1; }
bin=${LLAMA_BIN:-$(bash bench/llama_cpp.sh --avx2)}
one() {  # file -> "pp_ts tg_ts"
  "$bin/llama-bench" -m "$1" -p "$p" -n "$n" -r 1 -t "$threads" -o json 2>/dev/null |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print([x["avg_ts"] for x in r if x["n_prompt"]>0][0], [x["avg_ts"] for x in r if x["n_gen"]>0][0])'
}
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores; $(date -u '+%F %T') UTC"
echo "llama-bench -p $p -n $n -r 1 -t $threads, $rounds alternating rounds per pair"
echo
echo "| lowbit file | llama-quantize file | bytes (lowbit / llama-quantize) | pp$p t/s (lowbit / llama-quantize, medians) | tg$n t/s | pp ratio (median, min-max) | tg ratio (median, min-max) | best-round ratio pp / tg | load before / after |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---|"
for pair in "${pairs[@]}"; do
  a=${pair%%:*} b=${pair#*:}
  l0=$(cut -d' ' -f1 /proc/loadavg) rows=""
  for _ in $(seq "$rounds"); do
    ra=$(one "$a") rb=$(one "$b")
    rows+="$ra $rb"$'\n'
  done
  python3 - "$a" "$b" "$(stat -L -c %s "$a")" "$(stat -L -c %s "$b")" "$l0" "$(cut -d' ' -f1 /proc/loadavg)" "$rows" <<'PY'
import os, statistics as st, sys
a, b, sa, sb, l0, l1, rows = sys.argv[1:]
r = [list(map(float, x.split())) for x in rows.strip().splitlines()]
med = lambda i: st.median(x[i] for x in r)
rat = lambda i, j: [x[i] / x[j] for x in r]
pp, tg = rat(0, 2), rat(1, 3)
f = lambda v: f"{st.median(v):.3f} ({min(v):.3f}-{max(v):.3f})"
print(f"| {os.path.basename(a)} | {os.path.basename(b)} | {int(sa):,} / {int(sb):,} | {med(0):.1f} / {med(2):.1f} | "
      f"{med(1):.2f} / {med(3):.2f} | {f(pp)} | {f(tg)} | "
      f"{max(x[0] for x in r) / max(x[2] for x in r):.3f} / {max(x[1] for x in r) / max(x[3] for x in r):.3f} | {l0} / {l1} |")
PY
done
