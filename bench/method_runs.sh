#!/usr/bin/env bash
# Runs a plan of quantization jobs on one model, several at a time, and evaluates each result: the
# engine behind the SmolLM2 method table (issue 11) and the SAPR-vs-ApiQ study (issue 22).
#
#   bench/method_runs.sh --plan PLAN --out DIR [options]
#     --plan FILE         one job a line: NAME METHOD FORMAT SEED [extra `lowbit quantize` flags...]
#                         ('#' starts a comment; METHOD fp evaluates the source model itself; METHOD
#                         qat-NAME runs `lowbit qat --method NAME` on the calibration text instead)
#     --out DIR           results: DIR/results.jsonl (one JSON object per finished job, appended),
#                         DIR/logs/NAME.*; models in DIR/models/NAME (kept: a rerun skips done work)
#     --lowbit BIN        default build-rel/lowbit
#     --model GGUF        default $LOWBIT_SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
#     --calib TEXT        calibration text (default: first 4 MB of linux-docs train.txt; never an evaluation text)
#     --valid TEXT        validation text for choosing hyper-parameters (default linux-docs valid.txt:
#                         the same corpus as the calibration text, disjoint from it)
#     --wiki TEXT         test text (default WikiText-2 test)
#     --calib-tokens F --valid-tokens F --test-tokens F
#                         token files (raw int32) instead of the texts (models without a text tokenizer,
#                         e.g. stories260K and its sample-tokens.i32)
#     --tasks LIST        zero-shot tasks (default arc_easy,arc_challenge,piqa,winogrande,hellaswag_small,openbook_qa;
#                         'none' skips them)
#     --task-limit N      rows per task (default 300; 0 = all)
#     --parallel N        jobs at once (default 4; on one GPU several small-model jobs overlap well,
#                         since each is bound by kernel launches)
#     --threads N         CPU threads per job (default 2)
#     --device cpu|cuda   default cuda
#     --nsamples N --seqlen N   calibration windows (default 128 x 2048)
#     --ctx N             perplexity window (default 2048)
#     --max-windows N     perplexity windows per text (default 0 = all; small values for smoke tests)
# Every job: `lowbit quantize` (skipped when its model exists), then eval ppl on the test and the
# validation text, then eval tasks. ApiQ/SAPR on cuda get --tf32 --bf16 (as ApiQ's reference runs
# fp16 autocast). SAPR jobs of one seed share one saliency file (computed once, raw Fisher, normalised
# on load as each job asks): MODELS/saliency-sSEED.safetensors (saliency-qFORMAT-sSEED.safetensors
# for --saliency-model quantized, saliency-KIND-sSEED.safetensors for --saliency-kind KIND).
set -uo pipefail
shared=${LOWBIT_SHARED:-$(cd "$(dirname "$0")/../.." && pwd)/shared}
lowbit=build-rel/lowbit plan="" out=""
model=$shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
calib="" calib_tokens="" valid_tokens="" test_tokens="" valid=$shared/data/linux-docs/valid.txt wiki=$shared/data/wikitext-2-raw/wiki.test.raw
tasks=arc_easy,arc_challenge,piqa,winogrande,hellaswag_small,openbook_qa tasks_dir=$shared/tasks/llm-foundry
task_limit=300 parallel=4 threads=2 device=cuda nsamples=128 seqlen=2048 ctx=2048 max_windows=0
while [ $# -gt 0 ]; do
  case "$1" in
    --plan) plan=$2; shift 2 ;; --out) out=$2; shift 2 ;; --lowbit) lowbit=$2; shift 2 ;;
    --model) model=$2; shift 2 ;; --calib) calib=$2; shift 2 ;; --valid) valid=$2; shift 2 ;;
    --wiki) wiki=$2; shift 2 ;; --tasks) tasks=$2; shift 2 ;; --tasks-dir) tasks_dir=$2; shift 2 ;;
    --task-limit) task_limit=$2; shift 2 ;; --parallel) parallel=$2; shift 2 ;; --threads) threads=$2; shift 2 ;;
    --device) device=$2; shift 2 ;; --nsamples) nsamples=$2; shift 2 ;; --seqlen) seqlen=$2; shift 2 ;;
    --ctx) ctx=$2; shift 2 ;; --max-windows) max_windows=$2; shift 2 ;;
    --calib-tokens) calib_tokens=$2; shift 2 ;; --valid-tokens) valid_tokens=$2; shift 2 ;;
    --test-tokens) test_tokens=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 1 ;;
  esac
done
[ -n "$plan" ] && [ -n "$out" ] || { echo "usage: $0 --plan FILE --out DIR [options]" >&2; exit 1; }
mkdir -p "$out/logs" "$out/models"
if [ -z "$calib" ] && [ -z "$calib_tokens" ]; then
  calib=$out/calib-linux-docs-4MB.txt
  [ -f "$calib" ] || head -c 4000000 "$shared/data/linux-docs/train.txt" > "$calib"
fi
export lowbit model calib calib_tokens valid_tokens test_tokens valid wiki tasks tasks_dir task_limit threads device nsamples seqlen ctx max_windows out

run_job() {  # one plan line
  set -- $1
  local name=$1 method=$2 format=$3 seed=$4; shift 4
  local dir=$out/models/$name log=$out/logs/$name path t0 qsec=0
  # A job already in the results is done (a rerun after a kill continues with the rest).
  if [ -f "$out/results.jsonl" ] && grep -q "^{\"name\": \"$name\"," "$out/results.jsonl"; then return; fi
  if [ "$method" = fp ]; then
    path=$model
  else
    path=$dir
    local data=(--calib "$calib" --tokenizer "$model")
    [ -n "$calib_tokens" ] && data=(--calib-tokens "$calib_tokens")
    local args=(--method "$method" --format "$format" "${data[@]}" --nsamples "$nsamples"
                --seqlen "$seqlen" --seed "$seed" --device "$device" --threads "$threads" --checkpoint-seconds 600
                -o "$dir" --json "$@")
    case "$method" in
      apiq|sapr) [ "$device" = cuda ] && args+=(--tf32 --bf16); args+=(--apiq-verbose) ;;  # epoch losses and times in the .quantize.err log
    esac
    if [ "$method" = sapr ]; then
      # One raw-Fisher file per seed (per format and seed with --saliency-model quantized): the first
      # SAPR job of the seed computes it, the others wait for it.
      local key=s$seed qflag=()
      if [[ " $* " == *" --saliency-model quantized"* ]]; then key=q$format-s$seed qflag=(--saliency-model quantized); fi
      if [[ " $* " =~ " --saliency-kind "([a-z-]+) ]]; then key=${BASH_REMATCH[1]}-$key qflag+=(--saliency-kind "${BASH_REMATCH[1]}"); fi
      local sal=$out/models/saliency-$key.safetensors lock=$out/models/saliency-$key.lock
      if mkdir "$lock" 2>/dev/null; then
        [ -f "$sal" ] || "$lowbit" -q quantize -m "$model" --method sapr --format "$format" "${data[@]}" \
          --nsamples "$nsamples" --seqlen "$seqlen" --seed "$seed" --device "$device" "${qflag[@]}" \
          --threads "$threads" --saliency "$sal" --saliency-norm none --saliency-only --json -o "$out/models/saliency-$key.tmp" \
          > "$log.saliency.json" 2> "$log.saliency.err"
        touch "$lock/done"
      else
        while [ ! -f "$lock/done" ]; do sleep 2; done
      fi
      args+=(--saliency "$sal")
    fi
    if [[ "$method" == qat-* ]]; then
      # Quantization-aware training (issue 14): `lowbit qat --method ${method#qat-}` on the calibration
      # text (or tokens) as its training data; its own step/window defaults unless the line gives them.
      local tdata=(--train "$calib")
      [ -n "$calib_tokens" ] && tdata=(--train-tokens "$calib_tokens")
      args=(--method "${method#qat-}" --format "$format" "${tdata[@]}" --seed "$seed" --device "$device"
            --threads "$threads" --checkpoint-seconds 600 -o "$dir" --json "$@")
    fi
    local cmd=quantize
    [[ "$method" == qat-* ]] && cmd=qat
    t0=$(date +%s.%N)
    if [ ! -f "$dir/config.json" ]; then
      "$lowbit" -q "$cmd" -m "$model" "${args[@]}" > "$log.quantize.json" 2> "$log.quantize.err" ||
        { echo "{\"name\":\"$name\",\"error\":\"$cmd failed: $(tail -n 1 "$log.quantize.err" | tr -d '"\\')\"}" >> "$out/results.jsonl"; return; }
      qsec=$(python3 -c "import sys; print(round($(date +%s.%N) - $t0, 1))")
    fi
  fi
  local test_src=(--tokenizer "$model" --text "$wiki") valid_src=(--tokenizer "$model" --text "$valid")
  [ -n "$test_tokens" ] && test_src=(--tokens "$test_tokens")
  [ -n "$valid_tokens" ] && valid_src=(--tokens "$valid_tokens")
  "$lowbit" -q eval ppl -m "$path" "${test_src[@]}" --ctx "$ctx" --max-windows "$max_windows" --device "$device" --threads "$threads" --json > "$log.ppl.json" 2> "$log.ppl.err"
  "$lowbit" -q eval ppl -m "$path" "${valid_src[@]}" --ctx "$ctx" --max-windows "$max_windows" --device "$device" --threads "$threads" --json > "$log.valid.json" 2> "$log.valid.err"
  [ "$tasks" = none ] || "$lowbit" -q eval tasks -m "$path" --tokenizer "$model" --tasks "$tasks" --data-dir "$tasks_dir" --limit "$task_limit" \
    --device "$device" --threads "$threads" --json > "$log.tasks.json" 2> "$log.tasks.err"
  python3 - "$name" "$method" "$format" "$seed" "$qsec" "$log" "$*" >> "$out/results.jsonl" <<'EOF'
import json, sys
name, method, fmt, seed, qsec, log, extra = sys.argv[1:]
def load(suffix):
    try:
        return json.load(open(log + suffix))
    except Exception:
        return None
q = load(".quantize.json") or {}
print(json.dumps({"name": name, "method": method, "format": fmt, "seed": int(seed), "extra": extra,
                  "quantize_seconds": float(qsec), "bits_per_weight": q.get("bits_per_weight"),
                  "ppl": load(".ppl.json"), "valid": load(".valid.json"), "tasks": load(".tasks.json")}))
EOF
}
export -f run_job
grep -v '^\s*#' "$plan" | grep -v '^\s*$' | xargs -d '\n' -P "$parallel" -I{} bash -c 'run_job "$@"' _ {}
