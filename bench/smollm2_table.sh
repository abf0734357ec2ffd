#!/usr/bin/env bash
# The method table on a real model (issue 11): SmolLM2-135M-Instruct, WikiText-2 test perplexity
# (ctx 2048, all windows) and zero-shot accuracy for FP (the dequantized Q4_1 weights), RTN, GPTQ,
# GPTQ + act-order, AWQ, ApiQ and SAPR at int4g128, int3g128 and int2g64.
#
#   bench/smollm2_table.sh [options]
#     --lowbit BIN        lowbit binary (default build-rel/lowbit)
#     --model GGUF        default $LOWBIT_SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
#     --calib TEXT        calibration text (default: first 4 MB of $LOWBIT_SHARED/data/linux-docs/train.txt,
#                         never the evaluation text)
#     --wiki TEXT         evaluation text (default $LOWBIT_SHARED/data/wikitext-2-raw/wiki.test.raw)
#     --tasks-dir DIR     llm-foundry task files (default $LOWBIT_SHARED/tasks/llm-foundry)
#     --methods LIST      default "fp rtn gptq gptq-act awq apiq sapr"
#     --formats LIST      default "int4g128 int3g128 int2g64"
#     --task-limit N      rows per zero-shot task for quantized models (0 = all)
#     --fp-task-limit N   the same for FP (default 0 = all)
#     --device cpu|cuda   default cuda
#     --out DIR           results (results.jsonl, one object a line, appended as each row finishes)
#     --work DIR          quantized models (default OUT/models)
#     --nsamples N --seqlen N   calibration windows (default 128 x 2048)
#     --ctx N --max-windows N   perplexity windows (default 2048, all)
# Calibration: 128 windows x 2048 tokens by default. ApiQ/SAPR use the CLI defaults (see `lowbit quantize --help`;
# SAPR's lambda is the CLI default, tuned on stories260K earlier, never on WikiText-2).
set -uo pipefail
shared=${LOWBIT_SHARED:-$(cd "$(dirname "$0")/../.." && pwd)/shared}
lowbit=build-rel/lowbit
model=$shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
calib="" wiki=$shared/data/wikitext-2-raw/wiki.test.raw tasks_dir=$shared/tasks/llm-foundry
methods="fp rtn gptq gptq-act awq apiq sapr" formats="int4g128 int3g128 int2g64"
task_limit=0 device=cuda out=smollm2-table work="" nsamples=128 seqlen=2048 fp_task_limit=0 ctx=2048 max_windows=0
tasks=arc_easy,arc_challenge,piqa,winogrande,openbook_qa
while [ $# -gt 0 ]; do
  case "$1" in
    --lowbit) lowbit=$2; shift 2 ;; --model) model=$2; shift 2 ;; --calib) calib=$2; shift 2 ;;
    --wiki) wiki=$2; shift 2 ;; --tasks-dir) tasks_dir=$2; shift 2 ;; --methods) methods=$2; shift 2 ;;
    --formats) formats=$2; shift 2 ;; --task-limit) task_limit=$2; shift 2 ;;
    --fp-task-limit) fp_task_limit=$2; shift 2 ;; --device) device=$2; shift 2 ;;
    --out) out=$2; shift 2 ;; --work) work=$2; shift 2 ;; --nsamples) nsamples=$2; shift 2 ;;
    --seqlen) seqlen=$2; shift 2 ;; --ctx) ctx=$2; shift 2 ;; --max-windows) max_windows=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 1 ;;
  esac
done
mkdir -p "$out"
work=${work:-$out/models}
mkdir -p "$work"
if [ -z "$calib" ]; then
  calib=$out/calib-linux-docs-4MB.txt
  [ -f "$calib" ] || head -c 4000000 "$shared/data/linux-docs/train.txt" > "$calib"
fi
results=$out/results.jsonl

# One evaluation row: perplexity at ctx 2048 over all windows, then the zero-shot tasks.
evaluate() {  # name method format model_path limit
  local name=$1 method=$2 format=$3 path=$4 limit=$5 t0 ppl tasks_json
  t0=$(date +%s)
  ppl=$("$lowbit" -q eval ppl -m "$path" --tokenizer "$model" --text "$wiki" --ctx "$ctx" --max-windows "$max_windows" --device "$device" --json) ||
    { echo "{\"name\":\"$name\",\"error\":\"eval ppl failed\"}" >> "$results"; return; }
  tasks_json=$("$lowbit" -q eval tasks -m "$path" --tokenizer "$model" --tasks "$tasks" --data-dir "$tasks_dir" \
                 --limit "$limit" --device "$device" --json) || tasks_json=null
  python3 - "$name" "$method" "$format" "$limit" "$(( $(date +%s) - t0 ))" "$ppl" "$tasks_json" >> "$results" <<'EOF'
import json, sys
name, method, fmt, limit, secs, ppl, tasks = sys.argv[1:]
print(json.dumps({"name": name, "method": method, "format": fmt, "task_limit": int(limit),
                  "eval_seconds": int(secs), "ppl": json.loads(ppl), "tasks": json.loads(tasks)}))
EOF
  tail -n 1 "$results"
}

for m in $methods; do
  if [ "$m" = fp ]; then evaluate fp fp - "$model" "$fp_task_limit"; continue; fi
  for f in $formats; do
    name=$m-$f dir=$work/$m-$f
    args=(--method "${m%-act}" --format "$f" --calib "$calib" --tokenizer "$model" --nsamples "$nsamples" --seqlen "$seqlen"
          --device "$device" -o "$dir" --json)
    [ "$m" = gptq-act ] && args+=(--act-order)
    case "$m" in apiq|sapr) [ "$device" = cuda ] && args+=(--tf32 --bf16) ;; esac
    t0=$(date +%s)
    if [ ! -f "$dir/config.json" ]; then
      "$lowbit" -q quantize -m "$model" "${args[@]}" > "$out/$name.quantize.json" 2> "$out/$name.quantize.err" ||
        { echo "{\"name\":\"$name\",\"error\":\"quantize failed\"}" >> "$results"; tail -n 3 "$out/$name.quantize.err"; continue; }
    fi
    echo "{\"name\":\"$name\",\"quantize_seconds\":$(( $(date +%s) - t0 ))}" >> "$results"
    evaluate "$name" "$m" "$f" "$dir" "$task_limit"
  done
done
