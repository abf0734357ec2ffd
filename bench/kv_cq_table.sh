#!/usr/bin/env bash
# Coupled Quantization (CQ, arXiv 2405.03917) and WKVQuant (arXiv 2402.12065) of the KV cache next to
# KIVI int4/int2 (issue 16) on
# SmolLM2-135M-Instruct: WikiText-2 test perplexity with the protocol of docs/results/wa-smollm2.md's
# KV rows (ctx 512, the first 20 windows, W4 = RTN int4g128 without rotation, lm_head/embedding f32).
#
#   bench/kv_cq_table.sh [options]
#     --lowbit BIN        lowbit binary (default build-rel/lowbit)
#     --model GGUF        default $LOWBIT_SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
#     --wiki TEXT         default $LOWBIT_SHARED/data/wikitext-2-raw/wiki.test.raw
#     --calib TEXT        codebook calibration text (default: first 4 MB of $LOWBIT_SHARED/data/linux-docs/train.txt)
#     --nsamples N --seqlen N   calibration windows (default 16 x 512)
#     --ctx N --max-windows N   perplexity windows (default 512 and 20)
#     --layouts LIST      "GROUP/WINDOW" pairs of the quantized-token rule (default "32/128 32/0"; CQ also
#                         runs every "1/0" given: every token quantized)
#     --weights LIST      w4 (RTN int4g128 checkpoint with the codebooks) and/or w16 (the GGUF's dequantized
#                         weights; codebooks learned at load: eval ppl --kv-calib) (default "w4")
#     --kv LIST           KV quantizers (default "int4 int2 cq2 cq1"; int*: KIVI on the same weights; wkv4 / wkv2:
#                         WKVQuant, its smoothing calibrated on --wkv-nsamples x --wkv-seqlen tokens of the
#                         calibration text with groups of the layout's GROUP channels)
#     --wkv-nsamples N --wkv-seqlen N   WKVQuant calibration windows (default 8 x 256)
#     --threads N         lowbit threads (default: lowbit's default)
#     --out DIR           results (default kv-cq-table): results.jsonl (one line an eval), table.md
#
# The w4 models: `lowbit quantize --method rtn --format int4g128 --kv-quant cqB --calib ...` (the weights
# are the same for cq1 and cq2; KIVI cells evaluate the cq1 checkpoint with --kv-quant int4|int2, which
# replaces the recorded quantizer). WKVQuant cells evaluate `quantize ... --kv-quant wkvB --kv-group G` checkpoints
# (W4) or calibrate at load with --kv-calib (W16).
set -uo pipefail
source "$(dirname "$0")/bench_lib.sh"  # smollm2_defaults, smollm2_option, smollm2_prepare, smollm2_default_calib, smollm2_ppl
smollm2_defaults
calib="" nsamples=16 seqlen=512 ctx=512 max_windows=20 layouts="32/128 32/0" weights=w4 kvs="int4 int2 cq2 cq1"
threads="" out=kv-cq-table wkv_nsamples=8 wkv_seqlen=256
while [ $# -gt 0 ]; do
  case "$1" in
    --layouts) layouts=$2; shift 2 ;; --weights) weights=$2; shift 2 ;; --kv) kvs=$2; shift 2 ;;
    --wkv-nsamples) wkv_nsamples=$2; shift 2 ;; --wkv-seqlen) wkv_seqlen=$2; shift 2 ;;
    *) smollm2_option "$@" || { echo "unknown option $1" >&2; exit 1; }; shift 2 ;;
  esac
done
smollm2_prepare
smollm2_default_calib
meta() {  # machine, load, date for each line
  python3 -c 'import json,os,sys,subprocess; m=subprocess.run("lscpu | grep \"Model name\"", shell=True, capture_output=True, text=True).stdout.split(":",1)[-1].strip(); print(json.dumps({"cpu": m, "load1": os.getloadavg()[0], "date": sys.argv[1]}))' "$(date -u +%FT%TZ)"
}

w4_model() {  # cq1|cq2 [| wkv4|wkv2 GROUP] -> prints the checkpoint directory (made once)
  local kv=$1 dir=$out/models/w4-$1 extra=() ns=$nsamples sl=$seqlen
  case "$kv" in wkv*) dir=$dir-g$2 extra=(--kv-group "$2") ns=$wkv_nsamples sl=$wkv_seqlen ;; esac
  if [ ! -f "$dir/config.json" ]; then
    "$lowbit" -q quantize -m "$model" --method rtn --format int4g128 --kv-quant "$kv" "${extra[@]}" --calib "$calib" \
      --tokenizer "$model" --nsamples "$ns" --seqlen "$sl" "${thr[@]}" -o "$dir" --json \
      > "$dir.quantize.json" 2> "$dir.quantize.err" || { echo "quantize $kv failed" >&2; return 1; }
  fi
  echo "$dir"
}

run() {  # weights kv group window
  local w=$1 kv=$2 g=$3 win=$4 path args t0 j
  args=(--kv-quant "$kv" --kv-group "$g" --kv-window "$win")
  if [ "$w" = w16 ]; then
    path=$model
    args+=(--dequantize)
    case "$kv" in
      cq*) args+=(--kv-calib "$calib" --kv-calib-windows "$nsamples" --kv-calib-seqlen "$seqlen") ;;
      wkv*) args+=(--kv-calib "$calib" --kv-calib-windows "$wkv_nsamples" --kv-calib-seqlen "$wkv_seqlen") ;;
    esac
  else
    case "$kv" in
      cq*) path=$(w4_model "$kv") || return ;;
      wkv*) path=$(w4_model "$kv" "$g") || return ;;
      *) path=$(w4_model cq1) || return ;;
    esac
    args+=(--f32-vocab)
  fi
  t0=$(date +%s)
  if j=$(smollm2_ppl "$path" "${args[@]}"); then
    python3 -c 'import json,sys; j=json.loads(sys.argv[1]); j.update(json.loads(sys.argv[5])); j.update(weights=sys.argv[2], layout=sys.argv[3], wall_seconds=int(sys.argv[4])); print(json.dumps(j))' \
      "$j" "$w" "$g/$win" "$(( $(date +%s) - t0 ))" "$(meta)" >> "$results"
  else
    echo "{\"weights\":\"$w\",\"kv_quant\":\"$kv\",\"layout\":\"$g/$win\",\"error\":\"eval failed\"}" >> "$results"
  fi
  tail -n 1 "$results"
}

for w in $weights; do
  for lay in $layouts; do
    g=${lay%/*} win=${lay#*/}
    for kv in $kvs; do
      case "$kv" in int*|wkv*) [ "$g" = 1 ] && continue ;; esac  # KIVI / WKVQuant with groups of one: no quantizer
      run "$w" "$kv" "$g" "$win"
    done
  done
done

python3 - "$results" > "$out/table.md" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| weights | KV | group / window | ppl | KV bits / value (asymptotic) |\n|---|---|---|---:|---:|")
bits = {"int4": "5.25", "int2": "3.25", "cq1": "1 (+ codebooks)", "cq2": "2 (+ codebooks)", "wkv4": "5.25", "wkv2": "3.25"}
for r in rows:
    p = "failed" if "error" in r else f"{r['ppl']:.3f}"
    print(f"| {r.get('weights')} | {r.get('kv_quant')} | {r.get('layout')} | {p} | {bits.get(r.get('kv_quant'), '')} |")
EOF
cat "$out/table.md"
