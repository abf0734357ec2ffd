#!/usr/bin/env bash
# A plan of quantization jobs on stories260K with calibration seeds and a validation split, on the
# CPU: the SAPR study of issue 22 (bench/plans/sapr-stories260k.txt) and the issue 17 methods
# (bench/plans/ptq17-stories260k.txt).
#   bench/study_260k.sh PLAN [OUT_DIR] [PARALLEL]       (default /tmp/study-260k, 2)
#   bench/sapr_study_260k.sh / bench/ptq17_study_260k.sh run it with their plans.
# Data: shared/models/stories260K/sample-tokens.i32 (64 sequences of BOS + 256 tokens) split into
# calibration (sequences 0-23; windows drawn by --seed), validation (24-31) and test (32-63);
# perplexity with ctx 257 (one window per sequence). Runs a copy of the binary (LOWBIT, default
# build-rel/lowbit), so rebuilding does not replace it under running jobs. Then
# bench/method_report.py prints the tables.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
shared=${LOWBIT_SHARED:-$here/../../shared}
plan=${1:?usage: $0 PLAN [OUT_DIR] [PARALLEL]}
out=${2:-/tmp/study-260k} parallel=${3:-2}
lowbit=${LOWBIT:-$here/../build-rel/lowbit}
mkdir -p "$out"
cp "$lowbit" "$out/lowbit" && lowbit=$out/lowbit
python3 "$here/split_stories260k_tokens.py" "$shared/models/stories260K/sample-tokens.i32" "$out"
LOWBIT_SHARED=$shared "$here/method_runs.sh" --plan "$plan" --out "$out" --lowbit "$lowbit" \
  --model "$shared/models/stories260K/stories260K.bin" --calib-tokens "$out/calib.i32" --valid-tokens "$out/valid.i32" \
  --test-tokens "$out/test.i32" --nsamples 32 --seqlen 256 --ctx 257 --tasks none --device cpu --threads 1 --parallel "$parallel"
python3 "$here/method_report.py" "$out/results.jsonl"
