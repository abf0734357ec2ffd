#!/usr/bin/env bash
# lowbit's GGUF export checked by llama.cpp (issue 12): SmolLM2-135M-Instruct, its dequantized Q4_1
# weights as the FP baseline (written as an F32 GGUF by lowbit convert), lowbit RTN and GPTQ at the
# ggml block types (q4_0 by default) exported straight to GGUF, and llama-quantize's own file of the
# same type and the same size (--pure, token embedding and output f32, as lowbit's export). Every
# file is scored by llama-perplexity AND by lowbit eval ppl.
#
#   bench/llama_cpp_export.sh [--formats "q4_0 q4_1 q8_0"] [--nsamples 32] [--seqlen 512]
#                             [--chunks 20] [--ctx 512] [--out DIR] [--lowbit BIN]
#
# Calibration (GPTQ): the first 2 MB of $LOWBIT_SHARED/data/linux-docs/train.txt, N windows of
# --seqlen tokens (default 32 x 512: minutes on 2 busy cores), never the evaluation text.
# Evaluation: the first --chunks windows of --ctx tokens of $LOWBIT_SHARED/data/wikitext-2-raw/wiki.test.raw.
# Same protocol in both tools: llama-perplexity scores the second half of each window, and lowbit
# eval ppl runs with --score-second-half (the same windows of the same tokens), so the two
# numbers of a file should agree (issue 12: within 0.1 %; llama.cpp quantizes activations to 8 bits
# in its block-type matmuls, lowbit's reference path does not, so block-type files differ by that).
# Results: DIR/results.tsv (file, bytes, llama.cpp ppl, lowbit ppl).
set -euo pipefail
shared=${LOWBIT_SHARED:-$(cd "$(dirname "$0")/../.." && pwd)/shared}
lowbit=build-rel/lowbit
formats="q4_0" nsamples=32 seqlen=512 chunks=20 ctx=512 out=llama-cpp-export
while [ $# -gt 0 ]; do
  case "$1" in
    --formats) formats=$2; shift 2 ;; --nsamples) nsamples=$2; shift 2 ;; --seqlen) seqlen=$2; shift 2 ;;
    --chunks) chunks=$2; shift 2 ;; --ctx) ctx=$2; shift 2 ;; --out) out=$2; shift 2 ;;
    --lowbit) lowbit=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 1 ;;
  esac
done
# The AVX2 build: the native one stops with "Illegal instruction" on this shared host (llama_cpp.sh).
bin=$(bash "$(dirname "$0")/llama_cpp.sh" --avx2)
model=$shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
wiki=$shared/data/wikitext-2-raw/wiki.test.raw
mkdir -p "$out"
calib=$out/calib-linux-docs-2MB.txt
[ -f "$calib" ] || head -c 2000000 "$shared/data/linux-docs/train.txt" >"$calib"
# Evaluation text: the windows both tools read (llama-perplexity tokenizes the whole file).
evaltext=$out/wiki-eval.txt
[ -f "$evaltext" ] || head -c 400000 "$wiki" >"$evaltext"

fp=$out/smollm2-fp32.gguf
[ -f "$fp" ] || "$lowbit" convert --from "$model" --to "$fp" --dtype f32
files=("$fp")
for fmt in $formats; do
  ggml_name=$(echo "$fmt" | tr a-z A-Z)
  for method in rtn gptq; do
    f=$out/lowbit-$method-$fmt.gguf
    if [ ! -f "$f" ]; then
      extra=()
      [ "$method" = gptq ] && extra=(--calib "$calib" --nsamples "$nsamples" --seqlen "$seqlen")
      "$lowbit" quantize -m "$fp" --method "$method" --format "$fmt" "${extra[@]}" -o "$f" >"$f.log" 2>&1
    fi
    files+=("$f")
  done
  f=$out/llamacpp-$fmt.gguf
  [ -f "$f" ] || "$bin/llama-quantize" --pure --token-embedding-type f32 --output-tensor-type f32 "$fp" "$f" "$ggml_name" \
    >"$f.log" 2>&1
  files+=("$f")
done

# lowbit's RTN file and llama-quantize's (both from the same f32 weights, llama.cpp's reference
# rounding) must be byte-identical tensor for tensor (q/k row permutation included).
for fmt in $formats; do
  python3 - "$out/lowbit-rtn-$fmt.gguf" "$out/llamacpp-$fmt.gguf" <<'PY'
import sys, gguf
a, b = ({t.name: t for t in gguf.GGUFReader(p).tensors} for p in sys.argv[1:3])
diff = [n for n in a if n not in b or a[n].tensor_type != b[n].tensor_type or a[n].data.tobytes() != b[n].data.tobytes()]
print(f"{sys.argv[1]} vs {sys.argv[2]}: {len(a)} tensors, {len(diff)} differ {diff[:3]}")
PY
done

printf "file\tbytes\tllama.cpp_ppl\tlowbit_ppl\n" >"$out/results.tsv"
for f in "${files[@]}"; do
  lp=$("$bin/llama-perplexity" -m "$f" -f "$evaltext" -c "$ctx" --chunks "$chunks" -t "$(nproc)" 2>&1 |
       sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p')
  bp=$("$lowbit" eval ppl -m "$f" --text "$evaltext" --ctx "$ctx" --max-windows "$chunks" --score-second-half --json 2>/dev/null |
       python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["ppl"])' || echo "?")
  printf "%s\t%s\t%s\t%s\n" "$(basename "$f")" "$(stat -c %s "$f")" "$lp" "$bp" | tee -a "$out/results.tsv"
done
