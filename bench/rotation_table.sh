#!/usr/bin/env bash
# Weight-activation and KV-cache quantization with and without rotation (issue 16) on
# SmolLM2-135M-Instruct: WikiText-2 test perplexity for W16A16, W8A8, W4A8, W4A4, W4A16KV4, W4A16KV2
# (and a few extra cells), each with and without the QuaRot-style Hadamard rotation.
#
#   bench/rotation_table.sh [options]
#     --lowbit BIN        lowbit binary (default build-rel/lowbit)
#     --model GGUF        default $LOWBIT_SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
#     --wiki TEXT         default $LOWBIT_SHARED/data/wikitext-2-raw/wiki.test.raw
#     --ctx N             window length (default 512)
#     --max-windows N     windows evaluated (default 20: the first 20 x 512 tokens of the test set)
#     --w4 rtn|gptq       method of the 4-bit weights (default rtn; gptq uses --calib)
#     --calib TEXT        GPTQ calibration text (default: first 4 MB of $LOWBIT_SHARED/data/linux-docs/train.txt)
#     --nsamples N --seqlen N   GPTQ calibration windows (default 32 x 512)
#     --act4 FMT          the A4 activation format (default int4: symmetric per token)
#     --act-clip R        clip ratio of the activation quantizers (default 1.0); 'search': the W8/W4 models
#                         are quantized with the cell's --act and `--act-clip search` (a ratio per block and
#                         activation point, methods/act_clip.h; calibration --calib), one model per activation
#                         format: <w>-<rot>[-smooth..]-clipsearch-a<ACT>; W16 cells keep clip 1
#     --kv-group N --kv-window N   KIVI settings (default 32 and 128, KIVI's)
#     --seed N            rotation seed (default 0)
#     --threads N         lowbit threads (default: lowbit's default)
#     --rotations LIST    only these rotations (default "none hadamard")
#     --cells LIST        only these cells (default: all; e.g. "W4A8 W4A4" for a --w4 gptq run)
#     --smooth ALPHA      SmoothQuant scale migration before quantizing the W8/W4 weights (calibration:
#                         --calib, default linux-docs; W16 cells are not smoothed); models go to
#                         <w>-<rot>-smooth<ALPHA>, result lines get "smooth": ALPHA; ALPHA 'auto' searches
#                         alpha per point for each cell's activation quantizer (--smooth-act; models
#                         <w>-<rot>-smoothauto-a<ACT>)
#     --lqer-rank K       LQER: a rank-K low-rank reconstruction of each linear's weight error after
#                         quantizing (W8/W4 cells; calibration --calib for --lqer-scale act); models go to
#                         <w>-<rot>[-smooth..]-lqer<K>[-none], result lines get "lqer_rank" and "lqer_scale"
#     --lqer-scale S      act (L2QER, default) or none
#     --act8 FMT          the A8 activation format (default int8; fp8 for E4M3)
#     --tasks LIST        also zero-shot accuracy per cell: `lowbit eval tasks` with the cell's weights and
#                         flags on these llm-foundry tasks (e.g. arc_easy,arc_challenge,piqa,winogrande,openbook_qa;
#                         default none); the line gets "tasks" (the JSON) and "zero_shot_avg" (mean acc)
#     --task-limit N      rows per task (default 100: the first 100 of each set)
#     --tasks-dir DIR     default $LOWBIT_SHARED/tasks/llm-foundry
#     --out DIR           results (default rotation-table): results.jsonl (one line a cell), table.md
#
# The FP model is the GGUF's dequantized Q4_1 weights (as in docs/results/smollm2.md). W8 = int8pc
# (RTN, per output channel); W4 = int4g128 (RTN or GPTQ). Activations: per-token dynamic fake
# quantization of the input of every block linear (lm_head stays full precision). KV: KIVI fake
# quantization (keys per channel, values per token, asymmetric, groups of --kv-group, at least
# --kv-window recent tokens in full precision). The vocabulary matrices stay f32 (--f32-vocab).
set -uo pipefail
source "$(dirname "$0")/bench_lib.sh"  # smollm2_defaults, smollm2_option, smollm2_prepare, smollm2_default_calib, smollm2_ppl
smollm2_defaults
ctx=512 max_windows=20 w4=rtn calib="" nsamples=32 seqlen=512 act4=int4 act_clip=1.0 kv_group=32 kv_window=128
seed=0 threads="" out=rotation-table cells="" smooth="" rotations="none hadamard" lqer_rank="" lqer_scale=act act8=int8
tasks=none task_limit=100 tasks_dir=$shared/tasks/llm-foundry
while [ $# -gt 0 ]; do
  case "$1" in
    --w4) w4=$2; shift 2 ;; --act4) act4=$2; shift 2 ;; --act-clip) act_clip=$2; shift 2 ;;
    --kv-group) kv_group=$2; shift 2 ;; --kv-window) kv_window=$2; shift 2 ;; --seed) seed=$2; shift 2 ;;
    --cells) cells=$2; shift 2 ;; --smooth) smooth=$2; shift 2 ;; --rotations) rotations=$2; shift 2 ;;
    --lqer-rank) lqer_rank=$2; shift 2 ;; --lqer-scale) lqer_scale=$2; shift 2 ;; --act8) act8=$2; shift 2 ;;
    --tasks) tasks=$2; shift 2 ;; --task-limit) task_limit=$2; shift 2 ;; --tasks-dir) tasks_dir=$2; shift 2 ;;
    *) smollm2_option "$@" || { echo "unknown option $1" >&2; exit 1; }; shift 2 ;;
  esac
done
smollm2_prepare
if [ "$w4" = gptq ] || [ -n "$smooth" ] || [ "$act_clip" = search ] || { [ -n "$lqer_rank" ] && [ "$lqer_scale" = act ]; }; then
  smollm2_default_calib
fi

# Quantized weights, once per (format, rotation): dir = $out/models/<w>-<rot>.
weights() {  # w (w8|w4) rot (none|hadamard) [act: the cell's, for --smooth auto] -> prints the model path
  local w=$1 rot=$2 act=${3:-} dir=$out/models/$1-$2${smooth:+-smooth$smooth} args
  # --smooth auto searches alpha for the cell's activation quantizer: one model per target.
  [ "$smooth" = auto ] && [ -n "$act" ] && dir=$dir-a$act
  [ -n "$lqer_rank" ] && dir=$dir-lqer$lqer_rank && [ "$lqer_scale" != act ] && dir=$dir-$lqer_scale
  local clipsearch=""
  [ "$act_clip" = search ] && [ -n "$act" ] && [ "$act" != none ] && clipsearch=1 && dir=$dir-clipsearch-a$act
  if [ "$w" = w8 ]; then args=(--method rtn --format int8pc)
  else args=(--method "$w4" --format int4g128)
  fi
  if [ "$w4" = gptq ] || [ -n "$smooth" ] || [ -n "$clipsearch" ] || { [ -n "$lqer_rank" ] && [ "$lqer_scale" = act ]; }; then
    args+=(--calib "$calib" --tokenizer "$model" --nsamples "$nsamples" --seqlen "$seqlen")
  fi
  [ -n "$smooth" ] && args+=(--smooth "$smooth")
  [ "$smooth" = auto ] && [ -n "$act" ] && args+=(--smooth-act "$act")
  [ -n "$lqer_rank" ] && args+=(--lqer-rank "$lqer_rank" --lqer-scale "$lqer_scale")
  [ -n "$clipsearch" ] && args+=(--act "$act" --act-clip search)
  if [ ! -f "$dir/config.json" ]; then
    "$lowbit" -q quantize -m "$model" "${args[@]}" --rotate "$rot" --rotate-seed "$seed" "${thr[@]}" -o "$dir" --json \
      > "$dir.quantize.json" 2> "$dir.quantize.err" || { echo "quantize $w $rot failed" >&2; return 1; }
  fi
  echo "$dir"
}

cell() {  # name w act kv rot
  local name=$1 w=$2 act=$3 kv=$4 rot=$5 path args t0
  if [ -n "$cells" ] && [[ " $cells " != *" $name "* ]]; then return; fi
  args=(--act "$act" --kv-quant "$kv")
  [ "$act" != none ] && [ "$act_clip" != search ] && args+=(--act-clip "$act_clip")  # search: recorded in the model
  [ "$kv" != none ] && args+=(--kv-group "$kv_group" --kv-window "$kv_window")
  if [ "$w" = w16 ]; then path=$model; args+=(--dequantize --rotate "$rot" --rotate-seed "$seed")
  else path=$(weights "$w" "$rot" "$act") || { echo "{\"cell\":\"$name\",\"rotation\":\"$rot\",\"error\":\"quantize failed\"}" >> "$results"; return; }
    args+=(--f32-vocab)
  fi
  t0=$(date +%s)
  if j=$(smollm2_ppl "$path" "${args[@]}"); then
    # Zero-shot: the same weights and transform flags (eval tasks keeps the vocabulary matrices as stored,
    # f32 here, as --f32-vocab does for eval ppl).
    jt=null
    if [ "$tasks" != none ]; then
      local targs=()
      for a in "${args[@]}"; do [ "$a" != --f32-vocab ] && targs+=("$a"); done
      jt=$("$lowbit" -q eval tasks -m "$path" --tokenizer "$model" --tasks "$tasks" --data-dir "$tasks_dir" \
             --limit "$task_limit" "${targs[@]}" "${thr[@]}" --json) || jt='{"error": "eval tasks failed"}'
    fi
    python3 -c 'import json,sys; j=json.loads(sys.argv[1]); j.update(cell=sys.argv[2], weights=sys.argv[3], w4_method=sys.argv[4], wall_seconds=int(sys.argv[5])); j.update({"smooth": (sys.argv[6] if sys.argv[6] == "auto" else float(sys.argv[6]))} if sys.argv[6] and sys.argv[3] != "w16" else {}); j.update({"lqer_rank": int(sys.argv[7]), "lqer_scale": sys.argv[8]} if sys.argv[7] and sys.argv[3] != "w16" else {}); t=json.loads(sys.argv[9]); j.update({"tasks": t} if t else {}); j.update({"zero_shot_avg": sum(r["acc"] for r in t["results"]) / len(t["results"])} if t and t.get("results") else {}); print(json.dumps(j))' \
      "$j" "$name" "$w" "$w4" "$(( $(date +%s) - t0 ))" "$smooth" "$lqer_rank" "$lqer_scale" "$jt" >> "$results"
  else
    echo "{\"cell\":\"$name\",\"rotation\":\"$rot\",\"error\":\"eval failed\"}" >> "$results"
  fi
  tail -n 1 "$results"
}

for rot in $rotations; do
  cell W16A16 w16 none none $rot
  cell W8A8 w8 "$act8" none $rot
  cell W4A8 w4 "$act8" none $rot
  cell W4A4 w4 "$act4" none $rot
  cell W4A16KV4 w4 none int4 $rot
  cell W4A16KV2 w4 none int2 $rot
  cell W4A16 w4 none none $rot
  cell W16A4 w16 "$act4" none $rot
  cell W16A16KV2 w16 none int2 $rot
done

python3 - "$results" > "$out/table.md" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cells, table = [], {}
for r in rows:
    c = r.get("cell")
    if c not in cells: cells.append(c)
    table[(c, r.get("rotation", "none"))] = r
zs = any("zero_shot_avg" in r for r in rows)
unit = " (ppl / zero-shot avg %)" if zs else ""
print(f"| cell | no rotation{unit} | Hadamard rotation{unit} |\n|---|---:|---:|")
for c in cells:
    def v(rot):
        r = table.get((c, rot))
        if r is None: return "—"
        if "error" in r: return "failed"
        return f"{r['ppl']:.3f}" + (f" / {100 * r['zero_shot_avg']:.1f}" if "zero_shot_avg" in r else "")
    print(f"| {c} | {v('none')} | {v('hadamard')} |")
EOF
cat "$out/table.md"
