#!/usr/bin/env bash
# Decode and prefill CPU time of the SmolLM2 ptq161 model against RTN int2g64 (the goal: ptq161 <= 1.0x),
# several binaries, alternating runs (every round runs each binary x model pair once, in turn, so the
# noise of the shared machine falls on all of them alike). Models: bench/ptq161_smollm2.sh's ptq161 and
# rtn-int2g64 folders. Results: docs/results/ptq161.md.
#   ROUNDS=3 [BENCH_ARGS="-b 8"] [PROMPT=32] bench/ptq161_decode_speed.sh OUT_DIR PTQ161_DIR INT2G64_DIR NAME=BINARY [NAME=BINARY ...]
# Each run: lowbit bench -m DIR -p $PROMPT -n 32 -r 3 --threads 2 --json $BENCH_ARGS (tg_cpu_ms_per_token =
# process CPU time of both threads per decoded token; with -b 8, per token of the 8-token steps;
# pp_cpu_ms_per_token = the same per token of the one PROMPT-token prefill forward). Prints one table
# for decode and one for prefill: one row per binary x model, the rounds' CPU ms, their mean, and the
# mean of the per-round ratios ptq161 / int2g64 of the same binary.
set -u
out=$1 p161=$2 i2=$3
shift 3
mkdir -p "$out"
rounds=${ROUNDS:-3}
for r in $(seq 1 "$rounds"); do
  echo "round $r: $(uptime)" >> "$out/load.txt"
  for nb in "$@"; do
    name=${nb%%=*} bin=${nb#*=}
    for m in ptq161 int2g64; do
      d=$p161
      [ $m = int2g64 ] && d=$i2
      "$bin" bench -m "$d" -p "${PROMPT:-32}" -n 32 -r 3 --threads 2 --json ${BENCH_ARGS:-} > "$out/$name.$m.$r.json" 2> "$out/$name.$m.$r.err"
    done
  done
done
echo "end: $(uptime)" >> "$out/load.txt"
python3 - "$out" "$rounds" "$@" <<'PY'
import json, sys
out, rounds, names = sys.argv[1], int(sys.argv[2]), [a.split("=", 1)[0] for a in sys.argv[3:]]
def ms(n, m, r, key): return json.load(open(f"{out}/{n}.{m}.{r}.json"))[key]
for key, what in [("tg_cpu_ms_per_token", "decode"), ("pp_cpu_ms_per_token", "prefill")]:
    print(f"| binary | model | {what} CPU ms/token (rounds) | mean | ptq161 / int2g64 (mean of rounds) |")
    print("|---|---|---|---:|---:|")
    for n in names:
        for m in ["ptq161", "int2g64"]:
            v = [ms(n, m, r, key) for r in range(1, rounds + 1)]
            ratio = ""
            if m == "ptq161":
                rs = [ms(n, "ptq161", r, key) / ms(n, "int2g64", r, key) for r in range(1, rounds + 1)]
                ratio = f"{sum(rs) / len(rs):.3f} ({', '.join(f'{x:.2f}' for x in rs)})"
            print(f"| {n} | {m} | {', '.join(f'{x:.2f}' for x in v)} | {sum(v) / len(v):.2f} | {ratio} |")
    print()
PY
