#!/usr/bin/env bash
# lowbit's --preset (llama.cpp's per-tensor type mixtures) against llama-quantize's (issue 12,
# "Mixed types per tensor"). For each preset: lowbit RTN --preset, llama-quantize's preset file,
# and lowbit GPTQ --preset (GPTQ on the 32-block types and on the k-quants' two-level grids;
# gptq.h, quant/ggml_grid.h), from the same F32 GGUF. Reports, per file: size, tensors whose
# (type, bytes) equal llama-quantize's (gguf-py), tensors bit-identical to llama-quantize's,
# llama-perplexity, and with --kld llama-perplexity's mean KL divergence from the F32 model's
# token distributions on the same windows (the measure that means something on the random d768).
# --imatrix adds llama-quantize with an importance matrix from llama-imatrix on the calibration
# text GPTQ uses (--nsamples chunks of --seqlen tokens from its start; GPTQ samples --nsamples
# windows of --seqlen tokens from the same text).
#
#   bench/presets_vs_llamacpp.sh --model smollm2 [--presets "q4_k_m q3_k_s"] [--chunks 20] [--ctx 512]
#                                [--nsamples 16] [--seqlen 512] [--methods "rtn gptq"] [--out DIR]
#                                [--imatrix] [--kld] [--apiq-args "--epochs 2 --clip-lr 1e-2 --clip-wd 0"]
# --methods may name apiq / sapr (learnable clipping on the block grids, --rank 0 for GGUF output);
# --apiq-args are passed to them (default: the reduced CPU budget of docs/results/gguf-export.md).
#   bench/presets_vs_llamacpp.sh --model d768 ...
#
# smollm2: SmolLM2-135M-Instruct's dequantized Q4_1 weights as F32 (lowbit convert), its 576-wide
#   rows make the k-quants fall back (q4_k -> q5_0, q6_k -> q8_0, q3_k -> q4_0) as in llama.cpp.
# d768: the random dim-768 model of bench/kquants_vs_llamacpp.sh (stories260K vocabulary, 12
#   layers; random weights: its perplexity only says whether two files compute the same thing).
# Evaluation: the first --chunks windows of --ctx tokens of the first 400 kB of WikiText-2 test
# (llama-perplexity scores the second half of each window). GPTQ calibration: linux-docs train
# text (never the evaluation text). Files go to --out (default ~/.cache/lowbit-llamacpp/presets),
# never into the repository. Results: DIR/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${LOWBIT_SHARED:-../shared}
lowbit=${LOWBIT:-build-rel/lowbit}
model=smollm2 presets="q4_k_m" chunks=20 ctx=512 nsamples=16 seqlen=512 methods="rtn gptq" imatrix=0 kld=0
apiq_args="--epochs 2 --clip-lr 1e-2 --clip-wd 0"
out=${LOWBIT_LLAMACPP_CACHE:-$HOME/.cache/lowbit-llamacpp}/presets
threads=${THREADS:-2}
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=$2; shift 2 ;; --presets) presets=$2; shift 2 ;; --chunks) chunks=$2; shift 2 ;;
    --ctx) ctx=$2; shift 2 ;; --nsamples) nsamples=$2; shift 2 ;; --seqlen) seqlen=$2; shift 2 ;;
    --methods) methods=$2; shift 2 ;; --out) out=$2; shift 2 ;;
    --imatrix) imatrix=1; shift ;; --kld) kld=1; shift ;; --apiq-args) apiq_args=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 1 ;;
  esac
done
bin=${LLAMA_BIN:-$(bash bench/llama_cpp.sh --avx2)}  # the native build dies on this shared host
dir=$out/$model
mkdir -p "$dir"
evaltext=$dir/wiki-eval.txt
[ -f "$evaltext" ] || head -c 400000 "$shared/data/wikitext-2-raw/wiki.test.raw" >"$evaltext"
calib=$dir/calib-linux-docs-2MB.txt
[ -f "$calib" ] || head -c 2000000 "$shared/data/linux-docs/train.txt" >"$calib"
case "$model" in
  smollm2)
    fp=$dir/fp32.gguf
    [ -f "$fp" ] || "$lowbit" -q convert --from "$shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf" \
      --to "$fp" --dtype f32 ;;
  d768)
    LOWBIT=$lowbit source bench/bench_lib.sh
    LLAMA_BIN=$bin random_model_settings kquants  # sets $dir to the kquants cache of the random model
    kq=$dir
    dir=$out/$model
    if [ ! -f "$kq/f32.gguf" ]; then
      [ -f "$kq/train/hf/config.json" ] || "$lowbit" -q train --out "$kq/train" --train-tokens "$ids" --vocab 512 \
        --dim "$DIM" --hidden-dim "$HIDDEN" --layers "$LAYERS" --heads "$HEADS" --max-seq-len 1024 --steps 0 >/dev/null
      "$lowbit" -q convert --from "$kq/train/hf" --to "$kq/f32.gguf" --tokenizer "$tok" >/dev/null
    fi
    fp=$kq/f32.gguf ;;
  *) echo "--model must be smollm2 or d768" >&2; exit 1 ;;
esac

kldbase=$dir/kld-base-c$ctx-n$chunks.bin
ppl() {  # file -> llama-perplexity's final estimate [and " | " mean KLD from the F32 model with --kld]
  if [ "$kld" = 1 ] && [ "$1" != "$fp" ]; then
    "$bin/llama-perplexity" -m "$1" -c "$ctx" --chunks "$chunks" -t "$threads" --kl-divergence-base "$kldbase" \
      --kl-divergence >"$1.kld.log" 2>&1
    echo "$(sed -n 's/^Mean PPL(Q) *: *\([0-9.]*\).*/\1/p' "$1.kld.log") | $(sed -n 's/^Mean *KLD: *\([0-9.]*\).*/\1/p' "$1.kld.log")"
    return
  fi
  local extra=()
  [ "$kld" = 1 ] && extra=(--kl-divergence-base "$kldbase")  # the F32 run saves the base distributions
  # The last running estimate "[N]ppl," is the final PPL (llama-perplexity prints no "Final
  # estimate" while it saves the base).
  "$bin/llama-perplexity" -m "$1" -f "$evaltext" -c "$ctx" --chunks "$chunks" -t "$threads" "${extra[@]}" 2>&1 |
    grep -o '\[[0-9]*\][0-9.]*' | tail -n 1 | sed 's/.*\]//' | tr -d '\n'
  echo
  [ "$kld" = 1 ] && echo " | 0" || true
}
compare() {  # lowbit file, llama file -> "same-type-and-bytes identical total"
  python3 - "$1" "$2" <<'EOF'
import sys
from gguf import GGUFReader
a, b = GGUFReader(sys.argv[1]), GGUFReader(sys.argv[2])
ta = {t.name: t for t in a.tensors}
same = ident = 0
for t in b.tensors:
    u = ta.get(t.name)
    if u is None: continue
    if int(u.tensor_type) == int(t.tensor_type) and int(u.n_bytes) == int(t.n_bytes):
        same += 1
        if bytes(u.data.tobytes()) == bytes(t.data.tobytes()): ident += 1
print(same, ident, len(b.tensors))
EOF
}

res=$dir/results.md
{
  echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%F)"
  echo "model: $model ($fp); llama.cpp: $bin; llama-perplexity -c $ctx --chunks $chunks -t $threads on $evaltext"
  echo
  if [ "$kld" = 1 ]; then
    echo "| file | bytes | tensors with llama-quantize's type and size | bit-identical to llama-quantize | llama-perplexity | mean KLD from F32 |"
    echo "|---|---:|---:|---:|---:|---:|"
  else
    echo "| file | bytes | tensors with llama-quantize's type and size | bit-identical to llama-quantize | llama-perplexity |"
    echo "|---|---:|---:|---:|---:|"
  fi
  echo "| F32 source | $(stat -L -c %s "$fp") | — | — | $(ppl "$fp" | tr -d '\n') |"
} >"$res"
imat=$dir/imatrix-${nsamples}x$seqlen.gguf
if [ "$imatrix" = 1 ] && [ ! -f "$imat" ]; then
  "$bin/llama-imatrix" -m "$fp" -f "$calib" -c "$seqlen" --chunks "$nsamples" -t "$threads" -o "$imat" \
    >"$imat.log" 2>&1
fi
for p in $presets; do
  ref=$dir/llamacpp-$p.gguf
  [ -f "$ref" ] || "$bin/llama-quantize" "$fp" "$ref" "$(echo "$p" | tr a-z A-Z)" "$threads" >"$ref.log" 2>&1
  echo "| llama-quantize $p | $(stat -L -c %s "$ref") | — | — | $(ppl "$ref") |" >>"$res"
  if [ "$imatrix" = 1 ]; then
    refi=$dir/llamacpp-imatrix-$p.gguf
    [ -f "$refi" ] || "$bin/llama-quantize" --imatrix "$imat" "$fp" "$refi" "$(echo "$p" | tr a-z A-Z)" "$threads" \
      >"$refi.log" 2>&1
    echo "| llama-quantize --imatrix $p | $(stat -L -c %s "$refi") | — | — | $(ppl "$refi") |" >>"$res"
  fi
  for m in $methods; do
    f=$dir/lowbit-$m-$p.gguf
    if [ ! -f "$f" ]; then
      extra=()
      [ "$m" != rtn ] && extra=(--calib "$calib" --nsamples "$nsamples" --seqlen "$seqlen")
      # shellcheck disable=SC2206  # ApiQ/SAPR's training settings, word-split on purpose
      case "$m" in apiq*|sapr*) extra+=($apiq_args) ;; esac
      /usr/bin/time -f "%e s wall" "$lowbit" quantize -m "$fp" --method "$m" --preset "$p" "${extra[@]}" -o "$f" \
        --threads "$threads" >"$f.log" 2>&1
    fi
    read -r same ident total < <(compare "$f" "$ref")
    echo "| lowbit $m --preset $p | $(stat -L -c %s "$f") | $same / $total | $ident / $total | $(ppl "$f") |" >>"$res"
  done
done
cat "$res"
