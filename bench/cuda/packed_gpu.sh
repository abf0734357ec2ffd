#!/usr/bin/env bash
# Issue 10, GPU half: everything the packed CUDA path claims, in one run on a GPU machine.
#   1. bench/cuda/quant_gemv_bench (decode GEMV: share of copy bandwidth and ratio to a bf16
#      cuBLAS GEMV at 7B shapes, int4g128 / int2g64, M = 1, 4, 8; checked against CPU references);
#   2. the GPU cells of the quant_matmul parity table and the GPU tests of QuantLinear,
#      quant_embedding and the packed model (test_quant, test_methods);
#   3. whole-model decode on the GPU: a random model of SmolLM2-135M's shapes (`lowbit train
#      --steps 0`), quantized with RTN to int4g128 (lowbit directory) and to q4_0 / q8_0 (GGUF), run
#      by `lowbit bench --device cuda` packed and with --dequantize (the f32 path), and the f32 model.
#
# Usage (repository root):  bench/cuda/packed_gpu.sh
# Settings (environment): LOWBIT [build-cuda/lowbit]  BIN_DIR [build-cuda/tests] (test_quant, test_methods)
#   GEMV_BENCH [build-cuda/bench/quant_gemv_bench]  GEMV_ARGS [""] (e.g. "--variant v1 --variant v2pdl --no-prefill")
#   WORK [/tmp/packed-gpu]  PP [128]  TG [128]  REPS [3]
#   SHAPE ["--dim 576 --hidden-dim 1536 --layers 30 --heads 9 --kv-heads 3 --vocab 49152 --max-seq-len 512"]
#   STEPS ["gemv tests decode"]: which parts run
set -uo pipefail
LOWBIT=${LOWBIT:-build-cuda/lowbit}
BIN_DIR=${BIN_DIR:-build-cuda/tests}
GEMV_BENCH=${GEMV_BENCH:-build-cuda/bench/quant_gemv_bench}
W=${WORK:-/tmp/packed-gpu}
PP=${PP:-128} TG=${TG:-128} REPS=${REPS:-3}
SHAPE=${SHAPE:---dim 576 --hidden-dim 1536 --layers 30 --heads 9 --kv-heads 3 --vocab 49152 --max-seq-len 512}
STEPS=${STEPS:-gemv tests decode}
# The packed CUDA path is the default since this script passed on an H100 (ops/quant_matmul.h); said
# again here so that the rows measure it whatever the caller's environment holds.
export LOWBIT_CUDA_PACKED=1
mkdir -p "$W"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
rc=0

if [[ $STEPS == *gemv* ]]; then
  echo "## quant_gemv_bench"
  # shellcheck disable=SC2086
  "$GEMV_BENCH" ${GEMV_ARGS:-} || rc=1
fi

if [[ $STEPS == *tests* ]]; then
  echo "## GPU tests"
  "$BIN_DIR/test_quant" --gtest_filter='QuantMatmul*:QuantLinear*:QuantEmbedding*' || rc=1
  "$BIN_DIR/test_methods" --gtest_filter='*Gpu*:*Cuda*' || rc=1
  "$BIN_DIR/test_ops" --gtest_filter='DeviceFill*:CastParity*' || rc=1
fi

if [[ $STEPS == *decode* ]]; then
  echo "## whole-model decode, random model: $SHAPE"
  head -c 262144 /dev/zero > "$W/tokens.i32"  # 65,536 tokens of id 0: --steps 0 trains nothing
  "$LOWBIT" -q train --out "$W/init" $SHAPE --train-tokens "$W/tokens.i32" --steps 0 --seed 1 > /dev/null || rc=1
  for fmt in int4g128 q4_0 q8_0; do
    out="$W/$fmt"
    [[ $fmt == q* ]] && out="$W/$fmt.gguf"
    "$LOWBIT" -q quantize -m "$W/init/model.bin" --method rtn --format "$fmt" --calib-tokens "$W/tokens.i32" \
      --nsamples 1 --seqlen 64 -o "$out" > /dev/null || rc=1
  done
  echo "| model | path | pp$PP t/s | tg$TG t/s |"
  echo "|---|---|---:|---:|"
  row() {  # name, path label, args... (GEMV=v1|v2|v2pdl in the environment: LOWBIT_CUDA_GEMV for this row; default v2pdl)
    local name=$1 label=$2
    shift 2
    local j
    j=$(LOWBIT_CUDA_GEMV=${GEMV:-} "$LOWBIT" -q bench "$@" --device cuda -p "$PP" -n "$TG" -r "$REPS" --json) || { rc=1; return; }
    echo "| $name | $label | $(echo "$j" | sed -n 's/.*"pp_tokens_per_s":\([0-9.]*\).*/\1/p') | $(echo "$j" | sed -n 's/.*"tg_tokens_per_s":\([0-9.]*\).*/\1/p') |"
  }
  row "random f32" "f32" -m "$W/init/model.bin"
  row "int4g128 dir" "packed" -m "$W/int4g128"
  GEMV=v1 row "int4g128 dir" "packed, v1 GEMV" -m "$W/int4g128"
  row "int4g128 dir" "dequantized f32" -m "$W/int4g128" --dequantize
  row "q4_0 gguf" "packed" -m "$W/q4_0.gguf"
  row "q8_0 gguf" "packed" -m "$W/q8_0.gguf"
  row "q8_0 gguf" "dequantized f32" -m "$W/q8_0.gguf" --dequantize
fi
exit $rc
