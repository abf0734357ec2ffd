# Helpers shared by bench scripts (sourced, not run; each section names its scripts).
# --- bench/*_vs_llamacpp.sh: one measurement each of llama.cpp's llama-bench and `lowbit bench`. Needs
# BIN (llama.cpp binaries), LOWBIT, P, N, R, THREADS and LLAMA_ARGS set by the caller (random_model_settings SUBDIR sets them, with the random
# model's shape and cache folder, for the scripts that bench a random stories-vocabulary model).
llama() {  # model -> "pp_ts tg_ts"
  "$BIN/llama-bench" -m "$1" -p "$P" -n "$N" -r "$R" -t "$THREADS" $LLAMA_ARGS -o json 2>/dev/null |
    python3 -c 'import json,sys; r=json.load(sys.stdin); pp=[x["avg_ts"] for x in r if x["n_prompt"]>0]; tg=[x["avg_ts"] for x in r if x["n_gen"]>0]; print(pp[0], tg[0])'
}
lb() {  # model -> "pp_ts tg_ts bytes"
  "$LOWBIT" -q bench -m "$1" -p "$P" -n "$N" -r "$R" --threads "$THREADS" --json |
    python3 -c 'import json,sys; j=json.loads(sys.stdin.read()); print(j["pp_tokens_per_s"], j["tg_tokens_per_s"], j["model_bytes"])'
}
random_model_settings() {  # SUBDIR: the settings of the scripts that bench a random stories-vocabulary model
  LOWBIT=${LOWBIT:-build-rel/lowbit}
  SHARED=${LOWBIT_SHARED:-../shared}
  THREADS=${THREADS:-2} P=${P:-64} N=${N:-32} R=${R:-3}
  DIM=${DIM:-768} HIDDEN=${HIDDEN:-2048} LAYERS=${LAYERS:-12} HEADS=${HEADS:-12}
  BIN=${LLAMA_BIN:-$(bench/llama_cpp.sh)}
  LLAMA_ARGS=${LLAMA_ARGS:---repack 0}
  dir=${LOWBIT_LLAMACPP_CACHE:-$HOME/.cache/lowbit-llamacpp}/$1/d${DIM}-f${HIDDEN}-l${LAYERS}-h${HEADS}
  tok=$SHARED/models/stories260K/tok512.model
  ids=$SHARED/models/stories260K/sample-tokens.i32
  [ -f "$tok" ] || { echo "missing $tok (set LOWBIT_SHARED)" >&2; exit 1; }
  mkdir -p "$dir"
}

# --- stories260K studies (bench/onebit_260k.sh, bench/matquant_260k.sh) -------------------------------
# stories260k_setup OUT_DIR: sets here, shared, lowbit (copied to OUT_DIR/lowbit) and model; makes
# OUT_DIR/{models,logs} and the calib / valid / test token files (bench/split_stories260k_tokens.py).
stories260k_setup() {
  here=$(cd "$(dirname "$0")" && pwd)
  shared=${LOWBIT_SHARED:-$here/../../shared}
  lowbit=${LOWBIT:-$here/../build-rel/lowbit}
  model=$shared/models/stories260K/stories260K.bin
  mkdir -p "$1/models" "$1/logs"
  cp "$lowbit" "$1/lowbit" && lowbit=$1/lowbit
  python3 "$here/split_stories260k_tokens.py" "$shared/models/stories260K/sample-tokens.i32" "$1"
}
# stories260k_train quantize|qat NAME FORMAT [QAT ARGS...] -> $out/models/NAME, made once (logs:
# $out/logs/NAME.run.json and .err). quantize: RTN, no training; qat: on $out/calib.i32 with --seed $seed
# (and --nsamples $nsamples when set). Needs out, lowbit, model and seed (exported for xargs jobs).
stories260k_train() {
  local how=$1 name=$2 fmt=$3; shift 3
  local dir=$out/models/$name
  if [ ! -f "$dir/config.json" ]; then
    if [ "$how" = quantize ]; then
      "$lowbit" -q quantize -m "$model" --method rtn --format "$fmt" --threads 1 --json -o "$dir" \
        > "$out/logs/$name.run.json" 2> "$out/logs/$name.err"
    else
      "$lowbit" -q qat -m "$model" --format "$fmt" --train-tokens "$out/calib.i32" ${nsamples:+--nsamples "$nsamples"} \
        --seed "$seed" --threads 1 --json -o "$dir" "$@" > "$out/logs/$name.run.json" 2> "$out/logs/$name.err"
    fi
  fi
}
# stories260k_ppl ROW MODEL_NAME SLICE(0: none): test and validation perplexity, ctx 257, into
# $out/logs/ROW.ppl.json and ROW.valid.json.
stories260k_ppl() {
  local row=$1 name=$2 slice=$3 s=()
  [ "$slice" != 0 ] && s=(--slice "$slice")
  local log=$out/logs/$row
  "$lowbit" -q eval ppl -m "$out/models/$name" --tokens "$out/test.i32" --ctx 257 --threads 1 --json "${s[@]}" > "$log.ppl.json"
  "$lowbit" -q eval ppl -m "$out/models/$name" --tokens "$out/valid.i32" --ctx 257 --threads 1 --json "${s[@]}" > "$log.valid.json"
}

# stories260k_table RESULTS HEADER=KEY:FORMAT...: the markdown table of RESULTS (results.jsonl) on stdout, one
# line per row (its last evaluation wins), sorted by row; a column prints the row's KEY with FORMAT (a Python
# format spec), empty when the key is absent or null.
stories260k_table() {
  python3 - "$@" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows[r["row"]] = r  # the last evaluation of a row wins
cols = [(h, *spec.split(":", 1)) for h, spec in (c.split("=", 1) for c in sys.argv[2:])]
print("| row | " + " | ".join(h for h, _, _ in cols) + " |")
print("|---|" + "---|" * len(cols))
for name in sorted(rows):
    r = rows[name]
    print(f"| {name} | " + " | ".join("" if r.get(k) is None else format(r[k], f) for _, k, f in cols) + " |")
PY
}

# --- SmolLM2-135M WikiText-2 tables (bench/kv_cq_table.sh, bench/rotation_table.sh) -------------------
# smollm2_defaults: sets shared, lowbit, model and wiki to their defaults (the options below change them).
smollm2_defaults() {
  shared=${LOWBIT_SHARED:-$(cd "$(dirname "$0")/../.." && pwd)/shared}
  lowbit=build-rel/lowbit
  model=$shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
  wiki=$shared/data/wikitext-2-raw/wiki.test.raw
}
# smollm2_option OPTION VALUE: sets the variable of an option these tables share (--lowbit --model --wiki
# --calib --nsamples --seqlen --ctx --max-windows --threads --out); returns 1 for any other option.
smollm2_option() {
  case "$1" in
    --lowbit) lowbit=$2 ;; --model) model=$2 ;; --wiki) wiki=$2 ;;
    --calib) calib=$2 ;; --nsamples) nsamples=$2 ;; --seqlen) seqlen=$2 ;;
    --ctx) ctx=$2 ;; --max-windows) max_windows=$2 ;; --threads) threads=$2 ;; --out) out=$2 ;;
    *) return 1 ;;
  esac
}
# smollm2_prepare: makes $out/models; sets results ($out/results.jsonl) and thr (--threads N when given).
smollm2_prepare() {
  mkdir -p "$out/models"
  results=$out/results.jsonl
  thr=()
  if [ -n "$threads" ]; then thr=(--threads "$threads"); fi
}
# smollm2_default_calib: without --calib, calib = the first 4 MB of linux-docs' train.txt (written once to $out).
smollm2_default_calib() {
  if [ -z "$calib" ]; then
    calib=$out/calib-linux-docs-4MB.txt
    [ -f "$calib" ] || head -c 4000000 "$shared/data/linux-docs/train.txt" > "$calib"
  fi
}
# smollm2_ppl PATH ARGS...: `lowbit eval ppl` of PATH on the WikiText-2 windows (ctx, max_windows) -> JSON.
smollm2_ppl() {
  "$lowbit" -q eval ppl -m "$1" --tokenizer "$model" --text "$wiki" --ctx "$ctx" --max-windows "$max_windows" \
    "${@:2}" "${thr[@]}" --json
}
