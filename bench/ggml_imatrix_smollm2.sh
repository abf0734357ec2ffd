#!/usr/bin/env bash
# lowbit's calibrated methods on llama.cpp's own types against llama-quantize WITH an importance
# matrix (issue 12, "Proof, side by side"). SmolLM2-135M-Instruct (its dequantized Q4_1 weights as
# F32 GGUF = the FP model), per preset: llama-quantize without and with --imatrix (llama-imatrix on
# the same calibration text and token count lowbit uses), lowbit RTN / GPTQ / AWQ / AWQ
# --weighted-round / RTN --weighted-round (the "method" list; a method is NAME or NAME:FLAG,FLAG),
# all through `--preset P`: the same ggml type per tensor as llama-quantize, so the same bytes —
# lowbit's calibrated methods get llama-quantize's --imatrix plan (Q4_0: the first n/8 ffn_down in
# q4_1; IQ4_NL: those stay iq4_nl instead of q5_k), plain RTN the plan without.
# Scored by llama-perplexity (ctx 512, --chunks windows) on two texts neither was calibrated on:
# the first 400 kB of WikiText-2 test and PTB test; perplexity and the mean KL divergence from the
# F32 model's token distributions on the same windows (--kl-divergence).
#
#   bench/ggml_imatrix_smollm2.sh [--presets "q4_0 q4_1 iq4_nl q8_0 q4_k_m q3_k_s"] [--chunks 10]
#       [--nsamples 16] [--seqlen 512] [--methods "awq:--weighted-round rtn:--weighted-round gptq:--hessian-shrink,0.5 awq gptq rtn"]
#       [--texts "wiki ptb"] [--kmaps "q4_k q3_k q2_k"] [--out DIR] [--lowbit-ppl int8|exact|auto]
#
# --lowbit-ppl M: also score every lowbit file with lowbit's own `eval ppl --score-second-half
# --matmul M` on the same windows and tokens (the issue's check that llama-perplexity on lowbit's
# file equals lowbit's own perplexity within 0.1 %); each text's cell then ends in
# "lowbit P (±D %)", D = lowbit / llama-perplexity − 1. int8 quantizes the activations per 32 values
# as llama.cpp's q8_0 does; exact keeps them f32 (llama.cpp's block products never do).
#
# A method's flags are comma-separated after the colon: "gptq:--hessian-shrink,0.5".
# --texts: any of wiki, ptb, ldocs (the first 400 kB of linux-docs test: the calibration text's
# domain, to tell a method that fits the calibration domain from one that generalises). NICE=
# (empty) runs every tool at normal priority (default: nice; niced jobs starve on a loaded box).
#
# --kmaps T...: also one cell per k-quant T with SmolLM2's 30 ffn_down (1536 wide: whole 256-value
# super-blocks) in T and every other matrix q8_0 — lowbit `--format-map` (ffn_down T, token_embd
# q8_0, default q8_0), llama-quantize `--tensor-type ffn_down=T --token-embedding-type q8_0 ... Q8_0`:
# the k-quants on a trained model's tensors (its other widths, 576, fall back from every k-quant).
# Calibration: the first 2 MB of linux-docs train (neither evaluation text; lowbit samples
# --nsamples windows of --seqlen tokens, llama-imatrix takes its first --nsamples chunks of
# --seqlen). Files go to --out (default ~/.cache/lowbit-llamacpp/ggmlq), never into the repository;
# finished files are reused. A lowbit file whose tensors are bit-identical to llama-quantize's
# (RTN) is not scored again: it gets llama-quantize's numbers. Results: DIR/results.md (one row per
# file: bytes, then PPL / KLD per text).
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${LOWBIT_SHARED:-../shared}
lowbit=${LOWBIT:-build-rel/lowbit}
presets="q4_0 q4_1 iq4_nl q8_0 q4_k_m q3_k_s" kmaps="" chunks=10 nsamples=16 seqlen=512 texts="wiki ptb"
methods="awq:--weighted-round rtn:--weighted-round gptq:--hessian-shrink,0.5 awq gptq rtn"
out=${LOWBIT_LLAMACPP_CACHE:-$HOME/.cache/lowbit-llamacpp}/ggmlq
threads=${THREADS:-2}
lowbit_ppl=""
NICE=${NICE-nice}  # NICE= (empty): run at normal priority (on a box shared with other jobs, niced runs starve)
while [ $# -gt 0 ]; do
  case "$1" in
    --presets) presets=$2; shift 2 ;; --chunks) chunks=$2; shift 2 ;; --nsamples) nsamples=$2; shift 2 ;;
    --seqlen) seqlen=$2; shift 2 ;; --methods) methods=$2; shift 2 ;; --texts) texts=$2; shift 2 ;;
    --out) out=$2; shift 2 ;; --kmaps) kmaps=$2; shift 2 ;; --lowbit-ppl) lowbit_ppl=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 1 ;;
  esac
done
bin=${LLAMA_BIN:-$(bash bench/llama_cpp.sh --avx2)}  # the native build dies on this shared host
dir=$out
mkdir -p "$dir"
declare -A text
text[wiki]=$dir/wiki-eval.txt
text[ptb]=$dir/ptb-eval.txt
[ -f "${text[wiki]}" ] || head -c 400000 "$shared/data/wikitext-2-raw/wiki.test.raw" >"${text[wiki]}"
[ -f "${text[ptb]}" ] || head -c 400000 "$shared/data/ptb/ptb.test.txt" >"${text[ptb]}"
text[ldocs]=$dir/ldocs-eval.txt  # the calibration text's domain (linux-docs test, not its train split)
[ -f "${text[ldocs]}" ] || head -c 400000 "$shared/data/linux-docs/test.txt" >"${text[ldocs]}"
calib=$dir/calib-linux-docs-2MB.txt
[ -f "$calib" ] || head -c 2000000 "$shared/data/linux-docs/train.txt" >"$calib"
fp=$dir/fp32.gguf
[ -f "$fp" ] || "$lowbit" -q convert --from "$shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf" \
  --to "$fp" --dtype f32

# The F32 model's distributions on each text (llama-perplexity --kl-divergence-base). A base of
# more chunks already made for the same text is cut to the first --chunks windows instead (the
# file is a header, the chunks' tokens, then each chunk's log-probabilities in order; the F32
# perplexity is then the running estimate after --chunks windows in that run's log).
for t in $texts; do
  base=$dir/kld-base-$t-c512-n$chunks.bin
  [ -f "$base" ] && continue
  bigger=$(ls "$dir"/kld-base-$t-c512-n*.bin 2>/dev/null | sed 's/.*-n\([0-9]*\)\.bin$/\1/' | sort -n |
    awk -v c="$chunks" '$1 > c { print; exit }' || true)  # no base yet: ls fails (pipefail)
  if [ -n "$bigger" ]; then
    python3 - "$dir/kld-base-$t-c512-n$bigger.bin" "$base" "$chunks" <<'PY'
import struct, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(src, 'rb') as f:
    magic = f.read(8); n_ctx, n_vocab, n_chunk = struct.unpack('<iii', f.read(12))
    assert magic == b'_logits_' and n <= n_chunk
    tokens = f.read(4 * n_ctx * n_chunk)
    per_chunk = (n_ctx - 1 - n_ctx // 2) * (2 * ((n_vocab + 1) // 2) + 4) * 2
    data = f.read(per_chunk * n)
with open(dst, 'wb') as g:
    g.write(magic + struct.pack('<iii', n_ctx, n_vocab, n) + tokens[:4 * n_ctx * n] + data)
PY
    grep -o '\[[0-9]*\][0-9.]*' "$dir/kld-base-$t-c512-n$bigger.bin.log" | sed -n "${chunks}p" >"$base.log"
  else
    $NICE "$bin/llama-perplexity" -m "$fp" -f "${text[$t]}" -c 512 --chunks "$chunks" -t "$threads" \
      --kl-divergence-base "$base" >"$base.log" 2>&1
  fi
done
score() {  # file [lowbit] -> " PPL / KLD |" per text (cached in FILE.T.kld.log); with a second
  # argument and --lowbit-ppl, also lowbit's own perplexity of the file on the same windows
  local row=""
  for t in $texts; do
    local log=$1.$t.n$chunks.kld.log
    [ -s "$log" ] && grep -q '^Mean *KLD' "$log" || $NICE "$bin/llama-perplexity" -m "$1" -c 512 --chunks "$chunks" \
      -t "$threads" --kl-divergence-base "$dir/kld-base-$t-c512-n$chunks.bin" --kl-divergence >"$log" 2>&1
    local lp
    lp=$(sed -n 's/^Mean PPL(Q) *: *\([0-9.]*\).*/\1/p' "$log")
    row+=" $lp / $(sed -n 's/^Mean *KLD: *\([0-9.]*\).*/\1/p' "$log")"
    if [ -n "$lowbit_ppl" ] && [ $# -gt 1 ]; then
      local own=$1.$t.n$chunks.lowbit-$lowbit_ppl.json
      [ -s "$own" ] || $NICE "$lowbit" -q eval ppl -m "$1" --text "${text[$t]}" --ctx 512 --max-windows "$chunks" \
        --score-second-half --matmul "$lowbit_ppl" --threads "$threads" --json >"$own"
      row+=" — lowbit $(python3 -c 'import json,sys; p=json.load(open(sys.argv[1]))["ppl"]; print(f"{p:.4f} ({100 * (p / float(sys.argv[2]) - 1):+.3f} %)")' "$own" "$lp")"
    fi
    row+=" |"
  done
  echo "$row"
}
identical() {  # lowbit file, llama file -> 1 when every tensor is bit-identical
  python3 - "$1" "$2" <<'EOF'
import sys
from gguf import GGUFReader
a, b = GGUFReader(sys.argv[1]), GGUFReader(sys.argv[2])
ta = {t.name: t for t in a.tensors}
ok = all(t.name in ta and bytes(ta[t.name].data.tobytes()) == bytes(t.data.tobytes()) for t in b.tensors)
print(1 if ok else 0)
EOF
}

imat=$dir/imatrix-${nsamples}x$seqlen.gguf
[ -f "$imat" ] || $NICE "$bin/llama-imatrix" -m "$fp" -f "$calib" -c "$seqlen" --chunks "$nsamples" -t "$threads" \
  -o "$imat" >"$imat.log" 2>&1
res=$dir/results.md
{
  echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $(date -u +%F)"
  echo "llama.cpp: $bin; llama-perplexity -c 512 --chunks $chunks -t $threads; calibration $calib ($nsamples x $seqlen)"
  echo
  hdr="| file | bytes |" sep="|---|---:|"
  for t in $texts; do hdr+=" $t PPL / KLD |"; sep+="---:|"; done
  echo "$hdr"; echo "$sep"
  echo "| F32 | $(stat -L -c %s "$fp") |$(for t in $texts; do
    echo -n " $(grep -o '\[[0-9]*\][0-9.]*' "$dir/kld-base-$t-c512-n$chunks.bin.log" | tail -n 1 | sed 's/.*\]//') / 0 |"; done)"
} >"$res"
cells="$presets"
for k in $kmaps; do cells+=" ffn_down-$k"; done
for p in $cells; do
  P=$(echo "$p" | tr a-z A-Z) plan=(--preset "$p") lq=()
  if [ "${p#ffn_down-}" != "$p" ]; then  # --kmaps T: ffn_down in T, every other matrix q8_0
    k=${p#ffn_down-} P="ffn_down=$k, rest Q8_0"
    printf 'ffn_down %s\ntoken_embd q8_0\ndefault q8_0\n' "$k" >"$dir/map-$p.txt"
    plan=(--format-map "$dir/map-$p.txt") lq=(--tensor-type "ffn_down=$k" --token-embedding-type q8_0)
  fi
  ref=$dir/llamacpp-$p.gguf refi=$dir/llamacpp-imatrix-$p.gguf
  q=${lq:+Q8_0}
  [ -f "$ref" ] || $NICE "$bin/llama-quantize" "${lq[@]}" "$fp" "$ref" "${q:-$P}" "$threads" >"$ref.log" 2>&1
  [ -f "$refi" ] || $NICE "$bin/llama-quantize" --imatrix "$imat" "${lq[@]}" "$fp" "$refi" "${q:-$P}" "$threads" \
    >"$refi.log" 2>&1
  echo "| llama-quantize $P + imatrix | $(stat -L -c %s "$refi") |$(score "$refi")" >>"$res"
  for m in $methods; do
    name=${m%%:*} flags=()
    [ "$m" != "$name" ] && IFS=, read -r -a flags <<<"${m#*:}"
    tag=$(echo "$m" | tr -d ' ' | sed 's/:--/-/; s/,--/-/g; s/[^A-Za-z0-9_.=-]/_/g')
    f=$dir/lowbit-$tag-$p.gguf
    if [ ! -f "$f" ]; then
      cal=()
      [ "$m" != rtn ] && cal=(--calib "$calib" --nsamples "$nsamples" --seqlen "$seqlen")
      /usr/bin/time -f "%e s wall %U+%S s CPU" $NICE "$lowbit" quantize -m "$fp" --method "$name" "${flags[@]}" \
        "${plan[@]}" "${cal[@]}" -o "$f" --threads "$threads" >"$f.log" 2>&1
    fi
    if [ "$(identical "$f" "$ref")" = 1 ]; then
      echo "| lowbit $m ${plan[*]##*/} (= llama-quantize, bit-identical) | $(stat -L -c %s "$f") |$(score "$ref")" >>"$res"
    else
      echo "| lowbit $m ${plan[*]##*/} | $(stat -L -c %s "$f") |$(score "$f" lowbit)" >>"$res"
    fi
  done
  echo "| llama-quantize $P | $(stat -L -c %s "$ref") |$(score "$ref")" >>"$res"
done
cat "$res"
