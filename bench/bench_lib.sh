# Shared by the bench/*_vs_llamacpp.sh scripts (sourced, not run): one measurement each of
# llama.cpp's llama-bench and `lowbit bench`. Needs BIN (llama.cpp binaries), LOWBIT, P, N, R,
# THREADS and LLAMA_ARGS set by the caller (random_model_settings SUBDIR sets them, with the random
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
