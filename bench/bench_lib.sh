# Shared by the bench/*_vs_llamacpp.sh scripts (sourced, not run): one measurement each of
# llama.cpp's llama-bench and `lowbit bench`. Needs BIN (llama.cpp binaries), LOWBIT, P, N, R,
# THREADS and LLAMA_ARGS set by the caller.
llama() {  # model -> "pp_ts tg_ts"
  "$BIN/llama-bench" -m "$1" -p "$P" -n "$N" -r "$R" -t "$THREADS" $LLAMA_ARGS -o json 2>/dev/null |
    python3 -c 'import json,sys; r=json.load(sys.stdin); pp=[x["avg_ts"] for x in r if x["n_prompt"]>0]; tg=[x["avg_ts"] for x in r if x["n_gen"]>0]; print(pp[0], tg[0])'
}
lb() {  # model -> "pp_ts tg_ts bytes"
  "$LOWBIT" -q bench -m "$1" -p "$P" -n "$N" -r "$R" --threads "$THREADS" --json |
    python3 -c 'import json,sys; j=json.loads(sys.stdin.read()); print(j["pp_tokens_per_s"], j["tg_tokens_per_s"], j["model_bytes"])'
}
