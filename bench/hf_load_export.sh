#!/usr/bin/env bash
# End-to-end check of `lowbit export --layout gptq|awq` (issue 12): quantize SmolLM2-135M-Instruct with
# lowbit (RTN and GPTQ, several integer formats), export each to the GPTQ (AutoGPTQ / GPT-QModel) and
# AWQ (GEMM) safetensors layouts, load every exported directory in Hugging Face transformers
# (AutoModelForCausalLM.from_pretrained; the GPTQ/AWQ kernels come from GPT-QModel, its CPU torch
# backend) and compare its logits with lowbit's on the same token windows.
#
# Two lowbit references per case (both `lowbit eval ppl --logits-out`, f32 [windows, ctx, vocab]):
#   lowbit      the lowbit quantized directory itself, weights dequantized exactly in f32 (--dequantize)
#   lowbit_f16  `lowbit convert --dtype f16` of the same directory: the same codes, scales and zero
#               points dequantized and rounded to f16, embeddings and norms in f16 -- the weights the
#               exported file and GPT-QModel's torch kernel (which dequantizes in f16) actually hold.
#               Each packed layer's weight as GPT-QModel's kernel dequantizes it is also compared
#               with this directory's bit for bit: equality shows that transformers reads every
#               code, zero point and scale as lowbit meant it (GPTQ's torch kernel then also
#               agrees in logits to f32 noise; the AWQ torch kernel runs its matmul in f16).
#
# usage: bench/hf_load_export.sh [--quick] [--cases "LIST"]
#   --quick       RTN int4g128 -> gptq and RTN int4g64 -> awq only
#   --cases LIST  space-separated METHOD:FORMAT:LAYOUTS items (LAYOUTS = gptq, awq or gptq+awq;
#                 METHOD rtn, gptq or gptq-ao = GPTQ with --act-order); default: all of DEFAULT_CASES
# env: LOWBIT (lowbit binary, default build-rel/lowbit), LOWBIT_SHARED (default ../shared),
#      HF_VENV (the virtual environment, created when missing; default ../venv-hf beside the repository),
#      WORK (scratch folder, default /tmp/lowbit-hf-load; quantized directories there are reused),
#      CTX (default 128), WINDOWS (default 4), NSAMPLES / SEQLEN (GPTQ calibration, default 16 x 512),
#      HF_BACKEND / HF_AWQ_BACKEND (GPT-QModel backends, default torch / torch_awq; "default" = no override,
#      GPT-QModel picks), HF_DTYPE (default float32; "auto" = the checkpoint's float16). The plain
#      from_pretrained(DIR) a user writes: HF_BACKEND=default HF_AWQ_BACKEND=default HF_DTYPE=auto.
# Not run by CI (PyTorch is too heavy for it): run by hand. Needs PyPI for the first run (~6 GB venv:
# PyPI's torch wheel pulls the CUDA libraries even when only the CPU is used).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
LOWBIT=${LOWBIT:-$REPO/build-rel/lowbit}
SHARED=${LOWBIT_SHARED:-$REPO/../shared}
HF_VENV=${HF_VENV:-$(dirname "$REPO")/venv-hf}
WORK=${WORK:-/tmp/lowbit-hf-load}
CTX=${CTX:-128}
WINDOWS=${WINDOWS:-4}
NSAMPLES=${NSAMPLES:-16}
SEQLEN=${SEQLEN:-512}
HF_BACKEND=${HF_BACKEND:-torch}
HF_AWQ_BACKEND=${HF_AWQ_BACKEND:-torch_awq}
HF_DTYPE=${HF_DTYPE:-float32}
# Tested versions (2026-12-06); override with HF_PIP="torch transformers ..." to try others.
HF_PIP=${HF_PIP:-"torch==2.15.0 transformers==5.25.0 accelerate==1.16.0 optimum==2.3.0 gptqmodel==7.7.0 numpy safetensors"}
DEFAULT_CASES="rtn:int4g128:gptq rtn:int4g128s:gptq rtn:int4g64:gptq+awq rtn:int3g128:gptq rtn:int2g64:gptq rtn:int8pc:gptq \
gptq:int4g128:gptq gptq-ao:int4g128:gptq gptq:int4g64:awq"
CASES=$DEFAULT_CASES
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) CASES="rtn:int4g128:gptq rtn:int4g64:awq"; shift ;;
    --cases) CASES="$2"; shift 2 ;;
    *) echo "usage: $0 [--quick] [--cases \"METHOD:FORMAT:LAYOUTS ...\"]" >&2; exit 2 ;;
  esac
done

MODEL=$SHARED/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
TEXT=$SHARED/data/wikitext-2-raw/wiki.test.raw
CALIB=$SHARED/data/linux-docs/train.txt
for f in "$LOWBIT" "$MODEL" "$TEXT" "$CALIB"; do
  [ -e "$f" ] || { echo "missing $f (build lowbit_cli; LOWBIT_SHARED)" >&2; exit 1; }
done

if [ ! -x "$HF_VENV/bin/python" ] || ! "$HF_VENV/bin/python" -c "import torch, transformers, gptqmodel, optimum" > /dev/null 2>&1; then
  echo "== creating $HF_VENV (PyPI: $HF_PIP)"
  python3 -m venv "$HF_VENV"
  "$HF_VENV/bin/pip" install --quiet --upgrade pip
  "$HF_VENV/bin/pip" install --quiet $HF_PIP
fi
PY=$HF_VENV/bin/python
"$PY" - <<'EOF'
import importlib.metadata as md
print("== versions: " + ", ".join(f"{p} {md.version(p)}" for p in ("torch", "transformers", "gptqmodel", "optimum", "accelerate")))
EOF

mkdir -p "$WORK"
cd "$WORK"
[ -s calib.txt ] || head -c 2000000 "$CALIB" > calib.txt
# The first 30 kB of WikiText-2 test, tokenized by lowbit (the GGUF's embedded tokenizer); both tools
# read these exact ids.
head -c 30000 "$TEXT" > wiki30k.txt
"$LOWBIT" tokenize -m "$MODEL" --file wiki30k.txt --out wiki.i32 > /dev/null

py_cases=()
for c in $CASES; do
  IFS=: read -r method fmt layouts <<< "$c"
  qdir=$method-$fmt
  qargs=(--method "${method%-ao}" --format "$fmt")
  [ "$method" = gptq-ao ] && qargs+=(--act-order)
  [ "${method%-ao}" = gptq ] && qargs+=(--calib calib.txt --nsamples "$NSAMPLES" --seqlen "$SEQLEN")
  if [ ! -f "$qdir/config.json" ]; then
    echo "== lowbit quantize -m SmolLM2 ${qargs[*]} -o $qdir"
    "$LOWBIT" quantize -m "$MODEL" "${qargs[@]}" -o "$qdir" > "$qdir.log" 2>&1 || { tail -5 "$qdir.log"; exit 1; }
  fi
  "$LOWBIT" eval ppl -m "$qdir" --tokens wiki.i32 --ctx "$CTX" --max-windows "$WINDOWS" --dequantize --f32-vocab \
    --logits-out "lb-$qdir.f32" > /dev/null 2>&1
  rm -rf "$qdir-dense16"
  "$LOWBIT" convert --from "$qdir" --to "$qdir-dense16" --dtype f16 > /dev/null 2>&1
  "$LOWBIT" eval ppl -m "$qdir-dense16" --tokens wiki.i32 --ctx "$CTX" --max-windows "$WINDOWS" --f32-vocab \
    --logits-out "lb16-$qdir.f32" > /dev/null 2>&1
  for layout in ${layouts//+/ }; do
    rm -rf "$qdir-$layout"
    if "$LOWBIT" export -m "$qdir" --to "$qdir-$layout" --layout "$layout" > "$qdir-$layout.log" 2>&1; then
      echo "== $(tail -1 "$qdir-$layout.log" | cut -d';' -f1)"
      py_cases+=(--case "$method $fmt -> $layout" "$qdir-$layout" "lb-$qdir.f32" "lb16-$qdir.f32" "$qdir-dense16")
    else
      echo "== lowbit export $qdir --layout $layout refused: $(tail -1 "$qdir-$layout.log")"
    fi
  done
done

echo "== transformers $HF_DTYPE, GPT-QModel backend $HF_BACKEND, $WINDOWS windows x $CTX tokens of WikiText-2 test"
rm -f results.jsonl
# TORCHDYNAMO_DISABLE: GPT-QModel's torch kernel wraps its dequantization in torch.compile, which
# recompiles per layer shape (minutes on a small CPU) without changing the numbers.
TORCHDYNAMO_DISABLE=${TORCHDYNAMO_DISABLE:-1} "$PY" "$REPO/bench/hf_load_export.py" --tokens wiki.i32 --ctx "$CTX" \
  --windows "$WINDOWS" --dtype "$HF_DTYPE" --backend "$HF_BACKEND" --awq-backend "$HF_AWQ_BACKEND" --json results.jsonl "${py_cases[@]}" \
  2> transformers.log | tee summary.txt || status=$?
rm -rf ./*-dense16
echo "== per-case JSON: $WORK/results.jsonl; transformers' log: $WORK/transformers.log"
exit "${status:-0}"
