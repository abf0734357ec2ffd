#!/usr/bin/env bash
# Packed W4A8 vs W4A16 on the CPU (issue 16): prefill and decode speed of SmolLM2-135M-Instruct with
# RTN int4g128 weights (lowbit quantize, the W4 of bench/rotation_table.sh), one binary, one run,
# the modes interleaved round by round so the machine's load hits them alike.
#
#   bench/w4a8_cpu_speed.sh [--lowbit BIN] [--model GGUF] [--rounds N] [--pp N] [--tg N] [--threads N] [--out DIR]
#
# Modes (all read the same packed int4g128 weights; lm_head and the embedding stay f32, --f32-vocab):
#   w4a16        --matmul exact: f32 activations in every product (dequantized weight rows/tiles;
#                prefill through the BLAS sgemm) — weight-only W4A16
#   auto         lowbit's default: decode (<= 8 rows) on int8 activations per block of 32 (integer
#                dot products, llama.cpp's Q8_0 operand), prefill as w4a16
#   w4a8         --act int8: the activations of every block linear per token, symmetric int8 (the
#                accuracy tables' W4A8), products on the int8 codes for every row count
#                (ops::QuantActPerRowScope: the packed W4A8 kernel; equal to the simulation to f32 rounding)
#   w4a8-sim     --act int8 --matmul exact: the same numbers simulated (fake quantization, f32 products)
#   w4a4         --act int4: int4 codes per token in int8 lanes (same kernel; no int4 x int4 kernel)
# Output: DIR/results.jsonl (one `lowbit bench --json` line per mode and round, with "mode" and
# "round"), DIR/table.md (per mode: median over rounds of prefill / decode tokens/s and CPU ms per
# token, and the ratio of CPU ms per token to w4a16's).
set -uo pipefail
shared=${LOWBIT_SHARED:-$(cd "$(dirname "$0")/../.." && pwd)/shared}
lowbit=build-rel/lowbit
model=$shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
rounds=3 pp=256 tg=64 threads=2 out=w4a8-speed
while [ $# -gt 0 ]; do
  case "$1" in
    --lowbit) lowbit=$2; shift 2 ;; --model) model=$2; shift 2 ;; --rounds) rounds=$2; shift 2 ;;
    --pp) pp=$2; shift 2 ;; --tg) tg=$2; shift 2 ;; --threads) threads=$2; shift 2 ;; --out) out=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 1 ;;
  esac
done
mkdir -p "$out"
q=$out/w4-int4g128
[ -f "$q/config.json" ] || "$lowbit" -q quantize -m "$model" --method rtn --format int4g128 -o "$q" --json > "$q.quantize.json" ||
  { echo "quantize failed" >&2; exit 1; }
declare -A flags=([w4a16]="--matmul exact" [auto]="" [w4a8]="--act int8" [w4a8-sim]="--act int8 --matmul exact" [w4a4]="--act int4")
modes="w4a16 auto w4a8 w4a8-sim w4a4"
results=$out/results.jsonl
echo "# $(date -u '+%F %T UTC'); $(uptime)" >&2
for r in $(seq 1 "$rounds"); do
  for mode in $modes; do
    # shellcheck disable=SC2086
    j=$("$lowbit" -q bench -m "$q" -p "$pp" -n "$tg" -r 1 --threads "$threads" --f32-vocab ${flags[$mode]} --json) ||
      { echo "bench $mode failed" >&2; continue; }
    python3 -c 'import json,sys; j=json.loads(sys.argv[1]); j.update(mode=sys.argv[2], round=int(sys.argv[3]), load=sys.argv[4]); print(json.dumps(j))' \
      "$j" "$mode" "$r" "$(cut -d' ' -f1 /proc/loadavg)" >> "$results"
    tail -n 1 "$results" >&2
  done
done
python3 - "$results" "$modes" > "$out/table.md" <<'PY'
import json, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
modes = sys.argv[2].split()
med = lambda m, k: st.median(r[k] for r in rows if r["mode"] == m)
print("| mode | prefill tok/s | decode tok/s | prefill CPU ms/token | decode CPU ms/token | prefill CPU vs w4a16 | decode CPU vs w4a16 |")
print("|---|---:|---:|---:|---:|---:|---:|")
base_pp, base_tg = med("w4a16", "pp_cpu_ms_per_token"), med("w4a16", "tg_cpu_ms_per_token")
for m in modes:
    if not any(r["mode"] == m for r in rows): continue
    pp, tg = med(m, "pp_cpu_ms_per_token"), med(m, "tg_cpu_ms_per_token")
    print(f"| {m} | {med(m, 'pp_tokens_per_s'):.1f} | {med(m, 'tg_tokens_per_s'):.1f} | {pp:.2f} | {tg:.2f} | {pp / base_pp:.2f}x | {tg / base_tg:.2f}x |")
print(f"\n{len(rows)} runs; load average (1 min) {min(float(r['load']) for r in rows)}–{max(float(r['load']) for r in rows)}")
PY
cat "$out/table.md"
