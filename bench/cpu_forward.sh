#!/usr/bin/env bash
# CPU forward speed of lowbit against llama.cpp on the same model files and the same tokens.
#
#   bench/cpu_forward.sh [THREADS] [WINDOWS]        (defaults: 2 threads, 40 windows of 512 tokens)
#
# 1. Builds llama.cpp (bench/llama_cpp.sh when present; else $LLAMA_BIN names a folder with
#    llama-perplexity and llama-quantize, or the newest ~/.cache/lowbit-llamacpp/build-*/bin).
# 2. Makes F32 and F16 GGUFs of SmolLM2-135M-Instruct from the shared Q4_1 file with
#    `llama-quantize --allow-requantize` (cached in ~/.cache/lowbit-cpufwd, never in the repo).
# 3. Tokenizes wiki.test.raw with Python `tokenizers` and tokenizer-llamacpp-smollm.json (the ids
#    llama.cpp produces for this model) and keeps the first WINDOWS*512 ids as raw int32.
# 4. Runs, per file: llama-perplexity (-c 512, --chunks WINDOWS, -b 512, -t THREADS, on the text)
#    and `lowbit eval ppl --tokens ... --ctx 512 --max-windows WINDOWS --threads THREADS`: both
#    run WINDOWS forward passes of 512 tokens with full logits. Prints wall and CPU (user+sys)
#    seconds of each whole process (model load included) and the ratios lowbit / llama.cpp.
# 5. GPTQ calibration forward: `lowbit quantize --method gptq --nsamples 16 --seqlen 512` on the
#    F32 file reports the full-precision forward of each block over its 16 x 512 calibration
#    tokens (windows drawn from the same token file); compared with llama-perplexity's forward
#    over 16 windows of 512 tokens (its log timestamps) divided by the 30 blocks (llama.cpp's time also holds the embedding and the 49152-wide output head,
#    about 21 % of its arithmetic, so the comparison favours lowbit by up to that much).
# The perplexities differ by protocol (llama-perplexity scores the second half of each window,
# lowbit all 511 predictions); they are printed as a check that both ran the same model.
set -euo pipefail
THREADS=${1:-2}
WINDOWS=${2:-40}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${LOWBIT_SHARED:-$ROOT/../shared}
LOWBIT=${LOWBIT:-$ROOT/build-rel/lowbit}
CACHE=${LOWBIT_CPUFWD_CACHE:-$HOME/.cache/lowbit-cpufwd}
SRC_GGUF=$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
TOKJSON=$SHARED/models/smollm2-135m-instruct/tokenizer-llamacpp-smollm.json
TEXT=$SHARED/data/wikitext-2-raw/wiki.test.raw
for f in "$SRC_GGUF" "$TOKJSON" "$TEXT"; do
  [[ -f $f ]] || { echo "cpu_forward.sh: $f is missing (shared data); skipping" >&2; exit 0; }
done
[[ -x $LOWBIT ]] || { echo "cpu_forward.sh: build lowbit first ($LOWBIT)" >&2; exit 1; }
mkdir -p "$CACHE"

if [[ -z ${LLAMA_BIN:-} ]]; then
  if [[ -x $ROOT/bench/llama_cpp.sh ]]; then
    LLAMA_BIN=$("$ROOT/bench/llama_cpp.sh" | tail -n 1)
  else
    LLAMA_BIN=$(ls -dt "$HOME"/.cache/lowbit-llamacpp/build-*/bin 2>/dev/null | head -n 1 || true)
  fi
fi
[[ -x ${LLAMA_BIN:-}/llama-perplexity && -x $LLAMA_BIN/llama-quantize ]] ||
  { echo "cpu_forward.sh: no llama.cpp build (set LLAMA_BIN to a folder with llama-perplexity, llama-quantize)" >&2; exit 1; }

for t in F32 F16; do
  out=$CACHE/smollm2-135m-${t,,}.gguf
  [[ -s $out ]] || "$LLAMA_BIN/llama-quantize" --allow-requantize "$SRC_GGUF" "$out" "$t" > "$CACHE/quantize-$t.log" 2>&1
done
TOKENS=$CACHE/wiki-test-${WINDOWS}x512.i32
if [[ ! -s $TOKENS ]]; then
  python3 - "$TOKJSON" "$TEXT" "$TOKENS" "$WINDOWS" <<'EOF'
import sys, array, tokenizers
tok = tokenizers.Tokenizer.from_file(sys.argv[1])
ids = tok.encode(open(sys.argv[2], encoding="utf-8").read(), add_special_tokens=False).ids
n = int(sys.argv[4]) * 512
assert len(ids) >= n, f"{len(ids)} tokens < {n}"
array.array("i", ids[:n]).tofile(open(sys.argv[3], "wb"))
EOF
fi

# run NAME CMD...: wall and CPU seconds of one process (GNU time), its output kept in $CACHE/NAME.log
run() {
  local name=$1; shift
  /usr/bin/time -f "%e %U %S" -o "$CACHE/$name.time" "$@" > "$CACHE/$name.log" 2>&1 ||
    { echo "cpu_forward.sh: $name failed, see $CACHE/$name.log" >&2; tail -n 5 "$CACHE/$name.log" >&2; exit 1; }
  read -r wall user sys < "$CACHE/$name.time"
  echo "$wall $(echo "$user + $sys" | bc)"
}

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "llama.cpp: $LLAMA_BIN; lowbit: $LOWBIT; $THREADS threads, $WINDOWS windows x 512 tokens"
printf "%-6s %-10s %9s %9s %10s\n" file tool wall_s cpu_s ppl
declare -A WALL CPU
for t in f32 f16; do
  model=$CACHE/smollm2-135m-$t.gguf
  read -r w c < <(run "llama-$t" "$LLAMA_BIN/llama-perplexity" -m "$model" -f "$TEXT" -c 512 -b 512 --chunks "$WINDOWS" -t "$THREADS")
  WALL[llama-$t]=$w; CPU[llama-$t]=$c
  ppl=$(grep -o 'Final estimate: PPL = [0-9.]*' "$CACHE/llama-$t.log" | awk '{print $NF}')
  printf "%-6s %-10s %9.2f %9.2f %10s\n" "$t" llama.cpp "$w" "$c" "$ppl"
  read -r w c < <(run "lowbit-$t" "$LOWBIT" eval ppl -m "$model" --tokens "$TOKENS" --ctx 512 --max-windows "$WINDOWS" --threads "$THREADS")
  WALL[lowbit-$t]=$w; CPU[lowbit-$t]=$c
  ppl=$(awk '/^perplexity/ {print $2}' "$CACHE/lowbit-$t.log")
  printf "%-6s %-10s %9.2f %9.2f %10s\n" "$t" lowbit "$w" "$c" "$ppl"
done
for t in f32 f16; do
  echo "ratio lowbit/llama.cpp $t: wall $(echo "scale=2; ${WALL[lowbit-$t]} / ${WALL[llama-$t]}" | bc)x, cpu $(echo "scale=2; ${CPU[lowbit-$t]} / ${CPU[llama-$t]}" | bc)x (goal <= 1.25x)"
done
grep -m1 '^threads' "$CACHE/lowbit-f32.log" || true

# GPTQ calibration forward, 16 windows of 512 tokens.
model=$CACHE/smollm2-135m-f32.gguf
rm -rf "$CACHE/gptq-out"
run gptq "$LOWBIT" quantize -m "$model" --method gptq --calib-tokens "$TOKENS" --nsamples 16 --seqlen 512 \
  --batch 16 --threads "$THREADS" -o "$CACHE/gptq-out" --json > /dev/null
fwd=$(python3 -c "
import json, sys
r = [json.loads(l) for l in open(sys.argv[1]) if l.startswith('{')][-1]
print(r['fp_forward_seconds'] / r['blocks_run'])" "$CACHE/gptq.log")
run llama-16 "$LLAMA_BIN/llama-perplexity" -m "$model" -f "$TEXT" -c 512 -b 512 --chunks 16 -t "$THREADS" > /dev/null
# llama.cpp's forward time: from its "calculating perplexity" line to its "Final estimate" line
# (log timestamps are minutes.seconds.milliseconds.microseconds).
lsec=$(awk '/calculating perplexity/ {split($1, a, "."); t0 = a[1] * 60 + a[2] + a[3] / 1e3 + a[4] / 1e6}
            /Final estimate/ {split($1, a, "."); t1 = a[1] * 60 + a[2] + a[3] / 1e3 + a[4] / 1e6}
            END {printf "%.3f", t1 - t0}' "$CACHE/llama-16.log")
lblock=$(echo "$lsec / 30" | bc -l)
echo "gptq calibration forward (f32, 16 x 512 tokens): lowbit $(printf %.3f "$fwd") s per block;" \
  "llama.cpp $(printf %.3f "$lblock") s per block ($lsec s for 16 passes / 30 blocks);" \
  "ratio $(echo "scale=2; $fwd / $lblock" | bc)x"
rm -rf "$CACHE/gptq-out"
