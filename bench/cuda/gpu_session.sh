#!/usr/bin/env bash
# One device session for the GPU halves of issues 10, 11 and 22, in a few `run` calls of the device
# tool (a GPU machine without a toolchain, a 64 MiB carry limit and no ../shared).
#
# Here (the build machine):
#   bench/cuda/gpu_session.sh stage
#     builds .devcarry/tools.tar.xz (the CUDA build's lowbit, quant_gemv_bench, bench_e2eqp, the
#     shared libraries the GPU machine lacks, and the shared data the method runs read: WikiText-2
#     test, linux-docs valid and the first 4 MB of train, the task sets; ~17 MB), .devcarry/tests.tar.xz
#     (the GPU test binaries, ~12 MB: carried by a later call, e.g. collect, and unpacked by any mode
#     that finds it) and splits the SmolLM2 GGUF (98 MB, over the carry limit) into
#     .devcarry/gguf.part1 (carried with the tools) and .devcarry/gguf.part2 (carried by launch).
#     Build build-cuda first:
#       cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DLOWBIT_CUDA=ON \
#         -DCMAKE_CUDA_ARCHITECTURES=90 -DLOWBIT_TESTS=ON
#       cmake --build build-cuda --target lowbit_cli test_quant test_methods test_ops test_model
# On the GPU machine (each line one `run` call, back to back so that the machine stays warm):
#   bench/cuda/gpu_session.sh setup     carry .devcarry/tools.tar.xz .devcarry/gguf.part1: unpacks
#                                       into /tmp/w, runs bench/cuda/packed_gpu.sh (issue 10) and
#                                       the GPU cells of test_ops' parity table
#   bench/cuda/gpu_session.sh launch    carry .devcarry/gguf.part2: joins the GGUF, checks its
#                                       sha256, starts bench/method_runs.sh on the PLAN in the
#                                       background (setsid: it outlives the call) and waits WAIT s
#   bench/cuda/gpu_session.sh collect   (carry .devcarry/ref-logits.bin: runs the SmolLM2 GPU logits
#                                       test; STEPS=decode: packed_gpu.sh's decode rows) waits WAIT s,
#                                       then copies results and logs to $OUT
#   bench/cuda/gpu_session.sh check     carry .devcarry/tools.tar.xz: GPU tests + fused-AdamW timing (short)
#   bench/cuda/gpu_session.sh unverified  carry tools.tar.xz tests.tar.xz: the GPU tests of code written
#                                       without a GPU (int4 training, AdaRound, BitNet / rotation on CUDA)
#   bench/cuda/gpu_session.sh lp        carry .devcarry/tools.tar.xz .devcarry/tests.tar.xz
#                                       .devcarry/lp-tokens.tar.xz (stage it with `lp-stage`): issue 18 on
#                                       the GPU: the op parity table (Parity.LpQuantize among it), then
#                                       bench/low_precision_train.sh's stories15M-shape line (LP_STEPS,
#                                       LP_RUNS; the nine runs likely exceed one 10-minute call: int4 alone with
#                                       LP_RUNS="bf16 int4 int4-naive") and a packed-GGUF decode on cuda
#                                       when gguf.part* ride along
#   bench/cuda/gpu_session.sh fp8       carry as lp: Parity.Fp8Gemm, bench_fp8_gemm against
#                                       bench/torch_fp8_gemm_ref.py (torch._scaled_mm), ~110M-shape step
#                                       speed native vs emulated, the 15M curves with native GEMMs
#   bench/cuda/gpu_session.sh lp110     carry tools.tar.xz lp-tokens.tar.xz: issue 18's ~110M-shape curves,
#                                       native GEMMs (LP110_STEPS [1000], LP110_RUNS ["bf16 fp8"])
#   bench/cuda/gpu_session.sh sanitize  carry tools.tar.xz tests.tar.xz: compute-sanitizer racecheck /
#                                       memcheck / synccheck over the FA2 attention tests (issue 19)
#   bench/cuda/gpu_session.sh eqat-probe  carry tools.tar.xz: issue 14, Block-AP and E2E-QP timings of
#                                       efficientqat on a random SmolLM2-shaped model (~4 min)
#   bench/cuda/gpu_session.sh lp-stage  (here) tokenizes linux-docs train/valid with the Llama 2
#                                       tokenizer into .devcarry/lp-tokens.tar.xz (~10 MB)
#   bench/cuda/gpu_session.sh saliency7b  (after setup, or carry .devcarry/tools.tar.xz): SAPR's saliency
#                                       pass and ApiQ/SAPR per-block training at the Llama-2-7B shape
#                                       (SKIP_TRAIN=1: the pass alone)
#   bench/cuda/gpu_session.sh stream70b   (after setup): GPTQ and ApiQ with --stream on a 70B-shaped
#                                       model of LAYERS blocks (issue 20)
#   bench/cuda/gpu_session.sh adaround  carry tools.tar.xz + tests (after join-gguf): issue 17, AdaRound's
#                                       GPU tests, then its SmolLM2 rows with the loop on the GPU
#                                       (ADAROUND_ROWS, ADAROUND_TIMEOUT [520 s]; not measured yet)
# Settings: STEPS [setup: "gemv tests"]  PARITY_SECONDS [150]  PLAN [bench/plans/smollm2-methods.txt]  MATCH [.]  FIRST [all jobs]  PARALLEL [8]  WAIT [500]  RESULTS [none]  TASK_LIMIT [300]
set -uo pipefail
cd "$(dirname "$0")/../.."
W=/tmp/w
mode=${1:-}
# Waits WAIT seconds, or less when the plan's runs have all ended or RESULTS result lines are in
# (device time is the budget).
wait_runs() {
  local t=0 limit=${WAIT:-500} n
  while [ "$t" -lt "$limit" ]; do
    [ -f "$W/runs.pid" ] && ! kill -0 "$(cat "$W/runs.pid")" 2>/dev/null && { echo "runs ended after ${t}s of waiting"; return; }
    n=$(grep -c '"name"' "$W/runs/results.jsonl" 2>/dev/null) || n=0
    [ -n "${RESULTS:-}" ] && [ "$n" -ge "$RESULTS" ] && { echo "$n results after ${t}s of waiting"; return; }
    # A call cut off at its limit still returns $OUT: keep the result lines there as they come.
    [ -n "${OUT:-}" ] && cp "$W/runs/results.jsonl" "$OUT/" 2>/dev/null
    sleep 10
    t=$((t + 10))
  done
}
# The GPU test binaries ride in their own archive (.devcarry/tests.tar.xz), on whichever call has room.
# .devcarry/extra.tar.xz (w/bin/...: binaries rebuilt since the last stage) is unpacked over them.
unpack_tests() {
  [ -f .devcarry/tests.tar.xz ] && tar -xJf .devcarry/tests.tar.xz -C /tmp
  [ -f .devcarry/extra.tar.xz ] && tar -xJf .devcarry/extra.tar.xz -C /tmp
  return 0
}
# The tools, the test binaries and the tokenized linux-docs of the lp / fp8 modes into $W; sets O.
unpack_lp() {
  rm -rf "$W" && mkdir -p "$W" && tar -xJf .devcarry/tools.tar.xz -C /tmp || exit 1
  unpack_tests
  tar -xJf .devcarry/lp-tokens.tar.xz -C /tmp || exit 1
  export LD_LIBRARY_PATH=$W/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
  O=${OUT:-/tmp/out}
  mkdir -p "$O"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
}
case "$mode" in
stage)
  set -e
  shared=${LOWBIT_SHARED:-$(pwd)/../shared}
  B=${BUILD_DIR:-build-cuda}
  S=$(mktemp -d)
  mkdir -p "$S/w/bin" "$S/w/lib" "$S/w/shared/data/linux-docs" "$S/w/shared/data/wikitext-2-raw" \
    "$S/w/shared/tasks" "$S/w/shared/models/smollm2-135m-instruct" .devcarry
  nvcc -O3 -std=c++17 -arch=sm_90 -I src bench/cuda/quant_gemv_bench.cu -lcublas -o "$S/w/bin/quant_gemv_bench"
  cp "$B/lowbit" "$S/w/bin/"
  # The GPU test binaries, when built (NO_TESTS=1 or a build without them: no tests.tar.xz).
  rm -f .devcarry/tests.tar.xz
  if [ -z "${NO_TESTS:-}" ] && [ -x "$B/tests/test_quant" ]; then
    mkdir -p "$S/t/w/bin"
    cp "$B/tests/test_quant" "$B/tests/test_methods" "$B/tests/test_ops" "$B/tests/test_model" "$S/t/w/bin/"
    [ -x "$B/tests/test_train" ] && cp "$B/tests/test_train" "$S/t/w/bin/"  # the unverified mode's training tests
    # stories260K for the GPU tests that read it (QatCli.*; LOWBIT_SHARED=$W/shared)
    mkdir -p "$S/t/w/shared/models/stories260K"
    cp "$shared/models/stories260K/stories260K.bin" "$shared/models/stories260K/sample-tokens.i32" \
      "$shared/models/stories260K/tok512.model" "$S/t/w/shared/models/stories260K/"
    tar -C "$S/t" -cf - w | xz -T2 -6 > .devcarry/tests.tar.xz
    rm -rf "$S/t"
  fi
  # Issue 14's E2E-QP step bench (bench/cuda/e2eqp_7b.sh), when build-cuda has -DLOWBIT_BENCH=ON.
  for b in bench_e2eqp bench_fp8_gemm bench_gpu_block bench_apiq_block; do
    if [ -x "$B/bench/$b" ]; then cp "$B/bench/$b" "$S/w/bin/"; fi
  done
  for l in libsentencepiece.so.0 libgomp.so.1 libopenblas.so.0 libgfortran.so.5 libquadmath.so.0 \
      libcpp-httplib.so.0.11 libbrotlidec.so.1 libbrotlienc.so.1 libbrotlicommon.so.1; do
    cp -L "/lib/x86_64-linux-gnu/$l" "$S/w/lib/"
  done
  head -c 4000000 "$shared/data/linux-docs/train.txt" > "$S/w/shared/data/linux-docs/train.txt"
  cp "$shared/data/linux-docs/valid.txt" "$S/w/shared/data/linux-docs/"
  cp "$shared/data/wikitext-2-raw/wiki.test.raw" "$S/w/shared/data/wikitext-2-raw/"
  cp -r "$shared/tasks/llm-foundry" "$S/w/shared/tasks/"
  m=$shared/models/smollm2-135m-instruct
  cp "$m"/*.json "$m"/*.txt "$m"/*.jinja "$S/w/shared/models/smollm2-135m-instruct/"
  rm -f "$S/w/shared/models/smollm2-135m-instruct/tokenizer"*.json  # the GGUF embeds its tokenizer
  tar -C "$S" -cf - w | xz -T2 -6 > .devcarry/tools.tar.xz
  rm -rf "$S"
  # The GGUF in pieces that fit beside what each call carries (64 MiB in all, the working tree
  # ~5 MB included): part1 with tools.tar.xz (setup), the rest in pieces of at most 60 MB (part2
  # with launch; a third piece only if the tools outgrow ~20 MB: part2 then rides on a call between
  # setup and launch and part3 on launch). Every call copies the pieces it carries into $W.
  g=$m/SmolLM2-135M-Instruct.Q4_1.gguf
  rm -f .devcarry/gguf.part*
  tree=$(git ls-files -z | xargs -0 du -cb | tail -n 1 | cut -f1)
  p1=$(( 67108864 - $(stat -c %s .devcarry/tools.tar.xz) - tree - 1500000 ))
  head -c "$p1" "$g" > .devcarry/gguf.part1
  tail -c +$((p1 + 1)) "$g" | split -b 60000000 -d -a 1 - .devcarry/gguf.rest
  n=2
  for f in .devcarry/gguf.rest*; do mv "$f" ".devcarry/gguf.part$n"; n=$((n + 1)); done
  sha256sum < "$m/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -d' ' -f1 > .devcarry/gguf.sha
  ls -la .devcarry
  ;;
setup)
  rm -rf "$W" && mkdir -p "$W" && tar -xJf .devcarry/tools.tar.xz -C /tmp || exit 1
  unpack_tests
  cp .devcarry/gguf.part* .devcarry/gguf.sha "$W/"
  export LD_LIBRARY_PATH=$W/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  STEPS=${STEPS:-gemv tests} LOWBIT=$W/bin/lowbit BIN_DIR=$W/bin GEMV_BENCH=$W/bin/quant_gemv_bench bench/cuda/packed_gpu.sh 2>&1 |
    tee "${OUT:-/tmp}/packed_gpu.log"
  echo "## GPU cells of the op parity table"
  timeout "${PARITY_SECONDS:-150}" "$W/bin/test_ops" --gtest_filter='Parity*' > "${OUT:-/tmp}/parity.log" 2>&1
  echo "test_ops exit $?"; grep -E "FAILED|PASSED|SKIPPED \[|tests ran" "${OUT:-/tmp}/parity.log" | tail -n 30
  ;;
launch)
  "$0" join-gguf || exit 1
  export LD_LIBRARY_PATH=$W/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-} LOWBIT_SHARED=$W/shared
  # A library the machine lacks would fail every run of the plan: stop here instead.
  ldd "$W/bin/lowbit" | grep "not found" && { echo "lowbit cannot start on this machine"; exit 1; }
  mkdir -p "$W/runs"
  # MATCH=REGEX: only the jobs whose line matches; FIRST=N: only the first N of those (what fits the
  # device time left).
  grep -v '^\s*#' "${PLAN:-bench/plans/smollm2-methods.txt}" | grep -v '^\s*$' | grep -E -- "${MATCH:-.}" |
    head -n "${FIRST:-1000}" > "$W/plan.txt"
  setsid nohup bench/method_runs.sh --plan "$W/plan.txt" --out "$W/runs" --lowbit "$W/bin/lowbit" \
    --device cuda --parallel "${PARALLEL:-8}" --task-limit "${TASK_LIMIT:-300}" > "$W/runs.log" 2>&1 < /dev/null &
  echo $! > "$W/runs.pid"
  wait_runs
  "$0" collect-now
  ;;
collect)
  unpack_tests
  # With .devcarry/ref-logits.bin carried: the SmolLM2 GPU logits test, while the runs go on.
  if [ -f .devcarry/ref-logits.bin ]; then
    cp .devcarry/ref-logits.bin "$W/shared/models/smollm2-135m-instruct/"
    LD_LIBRARY_PATH=$W/lib:/usr/local/cuda/lib64 LOWBIT_SHARED=$W/shared \
      "$W/bin/test_model" --gtest_filter='SmolLM2Gguf.Cuda*' 2>&1 | tail -n 15
  fi
  # SAPR diagnostics (issue 22: saliency stability across seeds, where the weight error goes), in the
  # background while the runs go on, when the three seeds' saliency files are there.
  M=$W/runs/models
  if [ -f "$M/saliency-s0.safetensors" ] && [ -f "$M/saliency-s1.safetensors" ] && [ -f "$M/saliency-s2.safetensors" ]; then
    (
      export LD_LIBRARY_PATH=$W/lib:/usr/local/cuda/lib64
      m=$W/shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
      "$W/bin/lowbit" -q convert --from "$m" --to "$W/hf-fp" > /dev/null
      models=()
      for n in sapr-int2g64-s0 apiq-e5-int2g64-s0 sapr-paper-int2g64-s0; do
        [ -f "$M/$n/config.json" ] && "$W/bin/lowbit" -q convert --from "$M/$n" --to "$W/hf-$n" > /dev/null && models+=(--model "$n=$W/hf-$n")
      done
      timeout 400 python3 bench/sapr_diagnostics.py --saliency "$M"/saliency-s{0,1,2}.safetensors --fp "$W/hf-fp" \
        "${models[@]}" --json "$W/runs/diagnostics.json" > "$W/runs/diagnostics.txt" 2>&1
    ) &
  fi
  # The whole-model decode rows of packed_gpu.sh, when asked (STEPS=decode).
  if [ -n "${STEPS:-}" ]; then
    LD_LIBRARY_PATH=$W/lib:/usr/local/cuda/lib64 STEPS=$STEPS LOWBIT=$W/bin/lowbit BIN_DIR=$W/bin \
      GEMV_BENCH=$W/bin/quant_gemv_bench bench/cuda/packed_gpu.sh 2>&1 | tee "${OUT:-/tmp}/packed_decode.log"
  fi
  wait_runs
  "$0" collect-now
  ;;
saliency7b)
  # Issue 22's cost question: SAPR's saliency pass and one block of ApiQ / SAPR training at the
  # Llama-2-7B shape (dim 4096, hidden 11008, 32 heads, vocab 32000), on random models of LAYERS_A and
  # LAYERS_B blocks (default 1 and 2; the difference is one block's cost, the whole 32-block model is
  # extrapolated linearly), 128 x 2048 calibration tokens (NSAMPLES x SEQLEN), --tf32 --bf16 as the
  # method runs use. Peak GPU memory sampled by nvidia-smi every 0.5 s. Carry .devcarry/tools.tar.xz
  # (after setup, the unpacked /tmp/w is reused). Local smoke test: DEVICE=cpu DIM=64 HIDDEN=128
  # HEADS=4 VOCAB=512 NSAMPLES=2 SEQLEN=64 LOWBIT=build-rel/lowbit bash bench/cuda/gpu_session.sh saliency7b
  set -e
  DEVICE=${DEVICE:-cuda} DIM=${DIM:-4096} HIDDEN=${HIDDEN:-11008} HEADS=${HEADS:-32} VOCAB=${VOCAB:-32000}
  NSAMPLES=${NSAMPLES:-128} SEQLEN=${SEQLEN:-2048} LA=${LAYERS_A:-1} LB=${LAYERS_B:-2} EPOCHS=${EPOCHS:-2}
  if [ -z "${LOWBIT:-}" ]; then
    [ -x "$W/bin/lowbit" ] || { rm -rf "$W" && mkdir -p "$W" && tar -xJf .devcarry/tools.tar.xz -C /tmp; }
    export LD_LIBRARY_PATH=$W/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
    LOWBIT=$W/bin/lowbit
  fi
  O=${OUT:-/tmp/out}
  T=$(mktemp -d)
  mkdir -p "$O"
  python3 -c "import numpy as np; np.random.default_rng(1).integers(0, $VOCAB, ($NSAMPLES + 1) * ($SEQLEN + 1), dtype=np.int32).tofile('$T/tok.i32')"
  peak_start() {
    [ "$DEVICE" = cuda ] || return 0
    (m=0; while :; do u=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
       [ "$u" -gt "$m" ] && m=$u && echo "$m" > "$T/peak"; sleep 0.5; done) & PEAK_PID=$!
  }
  peak_stop() { [ "$DEVICE" = cuda ] || { echo -; return 0; }; kill "$PEAK_PID" 2>/dev/null; wait "$PEAK_PID" 2>/dev/null || true; cat "$T/peak" 2>/dev/null || echo -; rm -f "$T/peak"; }
  flags="--device $DEVICE"
  [ "$DEVICE" = cuda ] && flags="$flags --tf32 --bf16"
  for L in $LA $LB; do
    "$LOWBIT" -q train --out "$T/m$L" --dim "$DIM" --hidden-dim "$HIDDEN" --layers "$L" --heads "$HEADS" \
      --vocab "$VOCAB" --max-seq-len "$SEQLEN" --seq-len "$SEQLEN" --batch 1 --train-tokens "$T/tok.i32" --steps 0 --seed 1 > /dev/null
    peak_start; t0=$(date +%s.%N)
    "$LOWBIT" -q quantize -m "$T/m$L/model.bin" --method sapr --format int2g64 --calib-tokens "$T/tok.i32" \
      --nsamples "$NSAMPLES" --seqlen "$SEQLEN" $flags --saliency "$T/sal$L.safetensors" --saliency-only -o "$T/unused" \
      > /dev/null 2> "$O/saliency-L$L.err"
    t1=$(date +%s.%N); mem=$(peak_stop)
    echo "layers=$L saliency_pass_s=$(python3 -c "print(round($t1 - $t0, 1))") peak_gpu_mib=$mem" | tee -a "$O/saliency7b.txt"
    for method in apiq sapr; do
      [ -n "${SKIP_TRAIN:-}" ] && continue  # SKIP_TRAIN=1: the saliency pass alone
      peak_start
      "$LOWBIT" -q quantize -m "$T/m$L/model.bin" --method $method --format int2g64 --calib-tokens "$T/tok.i32" \
        --nsamples "$NSAMPLES" --seqlen "$SEQLEN" $flags --epochs "$EPOCHS" --apiq-verbose \
        $( [ $method = sapr ] && echo "--saliency $T/sal$L.safetensors --sapr-weight-epochs 1 --sapr-output-epochs 1" ) \
        -o "$T/q-$method-$L" > /dev/null 2> "$O/$method-L$L.err"
      mem=$(peak_stop)
      echo "layers=$L method=$method epochs=$EPOCHS peak_gpu_mib=$mem $(grep -o 'times: .*' "$O/$method-L$L.err" | tail -1)" | tee -a "$O/saliency7b.txt"
      rm -rf "$T/q-$method-$L"
    done
    rm -rf "$T/m$L"
  done
  rm -rf "$T"
  ;;
stream70b)
  # Issue 20's single-GPU half: a Llama-2-70B-shaped model (dim 8192, hidden 28672, 64 heads, 8 kv
  # heads, vocab 32000, bf16) of LAYERS blocks (default 2: x1's 64 GiB disk cannot hold all 80,
  # 138 GB) written by `lowbit random-model`, quantized with `--stream on` by GPTQ int4g128 and by
  # ApiQ int2g64 (EPOCHS, default 2, --bf16), NSAMPLES x SEQLEN calibration tokens (128 x 2048). The
  # JSON reports give seconds per block, peak host RSS and peak GPU bytes; peak GPU memory is also
  # sampled by nvidia-smi. Carry .devcarry/tools.tar.xz (after setup, /tmp/w is reused).
  set -e
  L=${LAYERS:-2} NSAMPLES=${NSAMPLES:-128} SEQLEN=${SEQLEN:-2048} EPOCHS=${EPOCHS:-2}
  if [ -z "${LOWBIT:-}" ]; then
    [ -x "$W/bin/lowbit" ] || { rm -rf "$W" && mkdir -p "$W" && tar -xJf .devcarry/tools.tar.xz -C /tmp; }
    export LD_LIBRARY_PATH=$W/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
    LOWBIT=$W/bin/lowbit
  fi
  O=${OUT:-/tmp/out}
  T=${TMP70:-/tmp/l70w}
  rm -rf "$T" && mkdir -p "$T" "$O"
  df -h /tmp | tail -1
  python3 -c "import numpy as np; np.random.default_rng(1).integers(0, 32000, ($NSAMPLES + 1) * ($SEQLEN + 1), dtype=np.int32).tofile('$T/tok.i32')"
  t0=$(date +%s.%N)
  "$LOWBIT" -q random-model -o "$T/m" --dim 8192 --hidden-dim 28672 --layers "$L" --heads 64 --kv-heads 8 \
    --vocab 32000 --max-seq-len 4096 --json > "$O/random70.json"
  echo "random-model layers=$L seconds=$(python3 -c "print(round($(date +%s.%N) - $t0, 1))") $(du -sh "$T/m" | cut -f1)" | tee "$O/stream70b.txt"
  for method in gptq apiq; do
    fmt=int4g128; extra="--tf32"  # 3.4x faster than FP32 products at 70B, errors within 0.3 % (streaming.md)
    [ $method = apiq ] && fmt=int2g64 && extra="--bf16 --tf32 --epochs $EPOCHS --apiq-verbose"
    (m=0; while :; do u=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
       [ "$u" -gt "$m" ] && m=$u && echo "$m" > "$T/peak"; sleep 0.5; done) & P=$!
    rc=0
    timeout "${METHOD_TIMEOUT:-240}" /usr/bin/time -v "$LOWBIT" -q quantize -m "$T/m" --method $method --format $fmt \
      --calib-tokens "$T/tok.i32" --nsamples "$NSAMPLES" --seqlen "$SEQLEN" --device cuda --stream on \
      --checkpoint-seconds 3600 --json $extra -o "$T/q-$method" > "$O/q70-$method.json" 2> "$O/q70-$method.err" || rc=$?
    kill $P 2>/dev/null; wait $P 2>/dev/null || true
    echo "method=$method format=$fmt rc=$rc nvidia_smi_peak_mib=$(cat "$T/peak" 2>/dev/null) max_rss_kb=$(grep -o 'Maximum resident set size (kbytes): [0-9]*' "$O/q70-$method.err" | grep -o '[0-9]*$') wall=$(grep -o 'Elapsed (wall clock) time.*' "$O/q70-$method.err")" | tee -a "$O/stream70b.txt"
    python3 - "$O/q70-$method.json" <<'PY' | tee -a "$O/stream70b.txt" || true
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    print("no JSON report:", e); sys.exit(0)
keep = {k: v for k, v in d.items() if any(s in k for s in ("second", "peak", "bits", "block"))}
print(json.dumps(keep)[:1500])
PY
    rm -rf "$T/q-$method" "$T/state"* 2>/dev/null
    tail -3 "$O/q70-$method.err"
  done
  rm -rf "$T"
  ;;
lp-stage)
  set -e
  shared=${LOWBIT_SHARED:-$(pwd)/../shared}
  B=${BUILD_DIR:-build-cuda}
  S=$(mktemp -d)
  "$B/lowbit" -q train --out "$S/tok" --dim 288 --hidden-dim 768 --layers 6 --heads 6 --max-seq-len 256 \
    --tokenizer "$shared/tokenizers/llama2/tokenizer.model" --train "$shared/data/linux-docs/train.txt" \
    --valid "$shared/data/linux-docs/valid.txt" --steps 0 --seed 1 > /dev/null
  mkdir -p "$S/w/lp" .devcarry
  mv "$S/tok/train.tokens" "$S/tok/valid.tokens" "$S/w/lp/"
  tar -C "$S" -cf - w/lp | xz -T2 -6 > .devcarry/lp-tokens.tar.xz
  rm -rf "$S"
  ls -la .devcarry/lp-tokens.tar.xz
  ;;
fp8)
  unpack_lp
  if [ -x "$W/bin/test_ops" ]; then
    timeout 120 "$W/bin/test_ops" --gtest_filter='Parity.Fp8Gemm:Parity.LpQuantize:Parity.Gemm:Parity.Bf16' > "$O/parity-fp8.log" 2>&1
    echo "test_ops exit $?"; grep -E "^\[  (PASSED|FAILED|SKIPPED) |Failure|error|fp8_gemm|lp_quantize" "$O/parity-fp8.log" | head -30
  fi
  "$W/bin/bench_fp8_gemm" --tf32 2>&1 | tee "$O/fp8-gemm.md"
  python3 bench/torch_fp8_gemm_ref.py --tf32 2>&1 | tee "$O/fp8-gemm-torch.md"
  # ~110M shape: step speed (tokens/s) per precision, native against emulated GEMMs, same call
  for g in native emulated; do
    runs="bf16 fp8"; [ "$g" = native ] && runs="f32 bf16 fp8"
    DEVICE=cuda LOWBIT=$W/bin/lowbit TRAIN_TOKENS=$W/lp/train.tokens VALID_TOKENS=$W/lp/valid.tokens LP_GEMM=$g \
      MODEL_ARGS="--dim 768 --hidden-dim 2048 --layers 12 --heads 12 --max-seq-len 512 --vocab 32000" \
      STEPS=${SPEED_STEPS:-60} BATCH=32 SEQ=512 LR=6e-4 WARMUP=20 EVAL_EVERY=1000 EVAL_BATCHES=2 \
      RUNS="$runs" bench/low_precision_train.sh "$O/lp-110m-$g" 2>&1 | grep -E "^\|" | tee "$O/lp-110m-$g.md"
  done
  # the stories15M curves with native GEMMs (the emulated ones: docs/results/low-precision-training.md); LP_STEPS=0 skips
  [ "${LP_STEPS:-1000}" != 0 ] && DEVICE=cuda LOWBIT=$W/bin/lowbit TRAIN_TOKENS=$W/lp/train.tokens VALID_TOKENS=$W/lp/valid.tokens LP_GEMM=native \
    MODEL_ARGS="--dim 288 --hidden-dim 768 --layers 6 --heads 6 --max-seq-len 256 --vocab 32000" \
    STEPS=${LP_STEPS:-1000} BATCH=64 SEQ=256 LR=1e-3 WARMUP=100 EVAL_EVERY=100 \
    RUNS="${LP_RUNS:-f32 bf16 fp8 fp8-current}" bench/low_precision_train.sh "$O/lp-15m-native" 2>&1 | tee "$O/lp-15m-native.md"
  rm -f "$O"/lp-*/*/*.bin "$O"/lp-*/*/*.safetensors; rm -rf "$O"/lp-*/*/hf
  ;;
sanitize)
  # Issue 19: compute-sanitizer (racecheck, memcheck, synccheck) over the FA2 attention tests. Carry
  # tools.tar.xz and tests.tar.xz (or after setup plus tests.tar.xz).
  [ -x "$W/bin/lowbit" ] || { rm -rf "$W" && mkdir -p "$W" && tar -xJf .devcarry/tools.tar.xz -C /tmp; }
  unpack_tests
  export LD_LIBRARY_PATH=$W/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
  CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
  [ -n "$CS" ] || { echo "no compute-sanitizer on this machine"; exit 1; }
  for tool in racecheck memcheck synccheck; do
    timeout "${SANITIZE_SECONDS:-150}" "$CS" --tool $tool --error-exitcode 9 "$W/bin/test_ops" \
      --gtest_filter="${SANITIZE_FILTER:-Parity.AttentionFa2Bf16:Parity.AttentionFa2Deterministic}" > "$W/cs-$tool.log" 2>&1
    echo "compute-sanitizer $tool exit $?"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED" "$W/cs-$tool.log" | head -n 4
    grep -m 3 -A 2 "Warning: Race\|Error:" "$W/cs-$tool.log"
  done
  ;;
lp110)
  # Issue 18: the ~110M-shape curves with native GEMMs (bf16 against fp8 by default), same seed, data
  # and steps; docs/results/low-precision-training.md. Carry tools.tar.xz and lp-tokens.tar.xz.
  unpack_lp
  DEVICE=cuda LOWBIT=$W/bin/lowbit TRAIN_TOKENS=$W/lp/train.tokens VALID_TOKENS=$W/lp/valid.tokens LP_GEMM=native \
    MODEL_ARGS="--dim 768 --hidden-dim 2048 --layers 12 --heads 12 --max-seq-len 512 --vocab 32000" \
    STEPS=${LP110_STEPS:-1000} BATCH=32 SEQ=512 LR=6e-4 WARMUP=100 EVAL_EVERY=100 EVAL_BATCHES=8 \
    RUNS="${LP110_RUNS:-bf16 fp8}" bench/low_precision_train.sh "$W/lp-110m" > "$O/lp-110m.md" 2>&1
  echo "lp-110m exit $?"; grep -E "^\|" "$O/lp-110m.md" | head -40
  ;;
eqat-probe)
  # Issue 14: where EfficientQAT's time goes on the GPU (two SmolLM2 jobs ran > 830 s without
  # finishing, twice). A random SmolLM2-shaped model (dim 576, SwiGLU 1536, 30 layers, 9 heads, 3 kv
  # heads, vocab 49152, tied), random tokens: Block-AP on PROBE_BLOCKS blocks (--verbose), then
  # E2E-QP alone (--block-epochs 0) for PROBE_STEPS steps, each with its wall time and the mean GPU
  # utilisation (nvidia-smi every second). Carry tools.tar.xz (or after setup). Local smoke test:
  # LOWBIT=build-rel/lowbit PROBE_DEVICE=cpu PROBE_MODEL="--dim 64 --hidden-dim 128 --layers 2 --heads 4
  # --kv-heads 2 --vocab 512" PROBE_VOCAB=512 bash bench/cuda/gpu_session.sh eqat-probe
  if [ -z "${LOWBIT:-}" ]; then
    [ -x "$W/bin/lowbit" ] || { rm -rf "$W" && mkdir -p "$W" && tar -xJf .devcarry/tools.tar.xz -C /tmp; }
    export LD_LIBRARY_PATH=$W/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
    LOWBIT=$W/bin/lowbit
  fi
  D=${PROBE_DEVICE:-cuda} T=$(mktemp -d) V=${PROBE_VOCAB:-49152}
  "$LOWBIT" -q random-model -o "$T/rm" ${PROBE_MODEL:---dim 576 --hidden-dim 1536 --layers 30 --heads 9 --kv-heads 3 --vocab 49152} \
    --max-seq-len 2048 --tied > /dev/null || exit 1
  python3 -c "import numpy as np; np.random.default_rng(1).integers(0, $V, 600000, dtype=np.int32).tofile('$T/tok.i32')"
  util() { [ "$D" = cuda ] && awk -F', ' '{u += $1; n++} END {if (n) printf "mean GPU utilisation %.0f %% over %d s\n", u / n, n}' "$T/smi.log"; : > "$T/smi.log"; }
  [ "$D" = cuda ] && { (while :; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits; sleep 1; done) > "$T/smi.log" & SMI=$!; }
  t0=$(date +%s.%N)
  timeout "${PROBE_T1:-150}" "$LOWBIT" qat -m "$T/rm" --method efficientqat --format int2g64 --train-tokens "$T/tok.i32" \
    --device "$D" --verbose --stop-after-blocks "${PROBE_BLOCKS:-2}" -o "$T/q1" > "$T/q1.log" 2>&1
  echo "block-ap ${PROBE_BLOCKS:-2} blocks: exit $?, $(python3 -c "import time; print(round(time.time() - $t0, 1))") s"; tail -n 12 "$T/q1.log"; util
  t0=$(date +%s.%N)
  timeout "${PROBE_T2:-120}" "$LOWBIT" qat -m "$T/rm" --method efficientqat --format int2g64 --train-tokens "$T/tok.i32" \
    --device "$D" --block-epochs 0 --steps "${PROBE_STEPS:-20}" -o "$T/q2" > "$T/q2.log" 2>&1
  echo "e2e-qp ${PROBE_STEPS:-20} steps: exit $?, $(python3 -c "import time; print(round(time.time() - $t0, 1))") s"; tail -n 6 "$T/q2.log"; util
  [ -n "${SMI:-}" ] && kill "$SMI"
  rm -rf "$T"
  ;;
lp)
  unpack_lp
  timeout "${PARITY_SECONDS:-150}" "$W/bin/test_ops" --gtest_filter='Parity*' > "$O/parity.log" 2>&1
  echo "test_ops exit $?"; grep -E "^\[  (PASSED|FAILED|SKIPPED) |Failure|tests ran" "$O/parity.log" | head -30
  # A packed GGUF on cuda (the CPU panel layout is CPU-only; this is the check that cuda loads it unchanged).
  if ls .devcarry/gguf.part* > /dev/null 2>&1 && [ "$(ls .devcarry/gguf.part* | wc -l)" -ge 2 ]; then
    cat .devcarry/gguf.part* > "$W/model.gguf"
    [ "$(sha256sum < "$W/model.gguf" | cut -d' ' -f1)" = "$(cat .devcarry/gguf.sha)" ] && \
      "$W/bin/lowbit" generate -m "$W/model.gguf" --device cuda -p "The capital of France is" -n 16 -t 0 2>&1 | tail -n 3
  fi
  DEVICE=cuda LOWBIT=$W/bin/lowbit TRAIN_TOKENS=$W/lp/train.tokens VALID_TOKENS=$W/lp/valid.tokens \
    MODEL_ARGS="--dim 288 --hidden-dim 768 --layers 6 --heads 6 --max-seq-len 256 --vocab 32000" \
    STEPS=${LP_STEPS:-1000} BATCH=64 SEQ=256 LR=1e-3 WARMUP=100 EVAL_EVERY=100 \
    RUNS="${LP_RUNS:-f32 bf16 fp8 fp8-current mxfp4 nvfp4 nvfp4-naive int4 int4-naive}" bench/low_precision_train.sh "$O/lp-15m" \
    2>&1 | tee "$O/lp-15m.md"
  rm -f "$O"/lp-15m/*/*.bin "$O"/lp-15m/*/*.safetensors
  ;;
unverified)
  # The GPU tests of code written without a GPU (sessions of 2026-12-07/08), in one short call (carry
  # .devcarry/tools.tar.xz and tests.tar.xz): int4 training's CUDA bodies (issue 18), AdaRound's loop
  # (17), BitLinear's quantizers / fake_quant / the Hadamard transform and BitNet + rotated models on
  # CUDA (15, 16), the one-step nvfp4 / int4 precision test.
  rm -rf "$W" && mkdir -p "$W" && tar -xJf .devcarry/tools.tar.xz -C /tmp || exit 1
  unpack_tests
  export LD_LIBRARY_PATH=$W/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  for t in "test_ops Parity.LpInt4:Parity.AdaRound:Parity.ActQuant:Parity.LpQuantize*:ParityCoverage*" \
           "test_methods AdaRound.CudaSolveMatchesCpu:QatCli.CudaPrecisionTracksCpuOnStories260K" \
           "test_train LowPrecisionTrain.Int4CudaTracksCpu:BitNet.CudaTrainingTracksCpu" \
           "test_model Rotation.CudaRotatedActQuantModelFollowsTheCpu"; do
    set -- $t
    if [ -x "$W/bin/$1" ]; then
      LOWBIT_SHARED=$W/shared timeout 240 "$W/bin/$1" --gtest_filter="$2" 2>&1 | grep -E "^\[  (PASSED|FAILED|SKIPPED) |Failure|error|normalised" | head -n 30
    else
      echo "$1: not carried"
    fi
  done
  ;;
check)
  # A short call on its own (carry .devcarry/tools.tar.xz only): the GPU tests of the op parity table,
  # DeviceFill and the packed-model tests, then SAPR's training time with the fused group AdamW
  # against one launch per tensor (LOWBIT_ADAMW_FUSED=0), alternating runs, on a random
  # SmolLM2-shaped model (32 x 512 calibration tokens, int2g64): mean training time per block and
  # mean epoch time per stage, from --apiq-verbose.
  rm -rf "$W" && mkdir -p "$W" && tar -xJf .devcarry/tools.tar.xz -C /tmp || exit 1
  unpack_tests
  export LD_LIBRARY_PATH=$W/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
  O=${OUT:-/tmp/out}
  mkdir -p "$O"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  "$W/bin/test_ops" --gtest_filter='Parity*:DeviceFill*:CastParity*:QatQuantOps*' > "$O/check-ops.log" 2>&1
  echo "test_ops exit $?"; grep -E "^\[  (PASSED|FAILED|SKIPPED) " "$O/check-ops.log" | head -20
  "$W/bin/test_quant" --gtest_filter='ParetoQ.HalfInteger*:QuantMatmul*:LwcCuda*:QatCuda*' > "$O/check-quant.log" 2>&1
  echo "test_quant exit $?"; grep -E "^\[  (PASSED|FAILED) |Failure|exception" "$O/check-quant.log" | head -20
  "$W/bin/test_methods" --gtest_filter='*Gpu*:*Cuda*:QatCli*' > "$O/check-methods.log" 2>&1
  echo "test_methods exit $?"; grep -E "^\[  (PASSED|FAILED) |Failure|exception" "$O/check-methods.log" | head -20
  python3 -c "import numpy as np; np.random.default_rng(1).integers(0, 49152, 8 * 513 * 4, dtype=np.int32).tofile('$W/tok.i32')"
  "$W/bin/lowbit" -q train --out "$W/init" --dim 576 --hidden-dim 1536 --layers 30 --heads 9 --kv-heads 3 \
    --vocab 49152 --max-seq-len 512 --train-tokens "$W/tok.i32" --steps 0 --seed 1 > /dev/null || exit 1
  run=0
  for fused in 0 1 0 1; do
    run=$((run + 1))
    LOWBIT_ADAMW_FUSED=$fused "$W/bin/lowbit" -q quantize -m "$W/init/model.bin" --method sapr --format int2g64 \
      --calib-tokens "$W/tok.i32" --nsamples 32 --seqlen 512 --device cuda --tf32 --bf16 --apiq-verbose \
      --saliency "$W/sal.safetensors" -o "$W/q" > /dev/null 2> "$O/sapr-run$run-fused$fused.err"
    rm -rf "$W/q"
    python3 - "$O/sapr-run$run-fused$fused.err" "$fused" <<'PY'
import re, statistics as st, sys
train, ep = [], {}
for l in open(sys.argv[1]):
    m = re.search(r"times: train ([\d.]+) s", l)
    if m:
        train.append(float(m.group(1)))
    m = re.search(r"([\d.]+) s \((\w+)\)$", l.strip())
    if m:
        ep.setdefault(m.group(2), []).append(float(m.group(1)))
print(f"LOWBIT_ADAMW_FUSED={sys.argv[2]}: train/block {st.mean(train):.3f} s over {len(train)} blocks;",
      ", ".join(f"{k} epoch {st.mean(v) * 1e3:.1f} ms" for k, v in ep.items()))
PY
  done
  ;;
join-gguf)
  # The GGUF's pieces (carried by this and earlier calls, copied into $W) joined and checked.
  m=$W/shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
  cp .devcarry/gguf.part* "$W/" 2>/dev/null
  cat "$W"/gguf.part? > "$m" || exit 1
  [ "$(sha256sum < "$m" | cut -d' ' -f1)" = "$(cat "$W/gguf.sha")" ] || { echo "GGUF sha256 mismatch"; exit 1; }
  echo "GGUF joined"
  ;;
eqat-gguf)
  # Issue 14: the qat device fix (model_device reads a norm weight). E2E-QP alone from the Q4_1 GGUF
  # on cuda, EQAT_STEPS steps: before the fix it trained on the CPU (7.4 s for 6 steps, peak 4.9 GiB;
  # from an f32 conversion 0.4 s, 1.7 GiB). After join-gguf.
  export LD_LIBRARY_PATH=$W/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
  m=$W/shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
  T=$(mktemp -d)
  (while :; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits; sleep 1; done) > "$T/smi.log" & SMI=$!
  t0=$(date +%s.%N)
  timeout 200 "$W/bin/lowbit" qat -m "$m" --method efficientqat --format int2g64 --train "$W/shared/data/linux-docs/valid.txt" \
    --device cuda --block-epochs 0 --steps "${EQAT_STEPS:-6}" --verbose -o "$T/q" > "$T/q.log" 2>&1
  echo "efficientqat from the GGUF, E2E-QP ${EQAT_STEPS:-6} steps: exit $?, $(python3 -c "import time; print(round(time.time() - $t0, 1))") s"
  tail -n 8 "$T/q.log"
  kill "$SMI"
  awk -F', ' '{u += $1; if ($2 > m) m = $2; n++} END {if (n) printf "mean GPU utilisation %.0f %%, peak memory %d MiB over %d s\n", u / n, m, n}' "$T/smi.log"
  rm -rf "$T"
  ;;
adaround)
  # Issue 17: AdaRound on SmolLM2 with its loop on the GPU (methods/adaround.cpp: f64 soft error ->
  # cuBLAS f64 E H -> Adam step, 10k iterations a layer), then its tests. After join-gguf. The rows
  # (ADAROUND_ROWS, default the three formats) append to $W/guided/rows.jsonl; the evaluation runs on
  # the CPU. First: the GPU tests of the loop (Parity.AdaRound, AdaRound.CudaSolveMatchesCpu).
  export LD_LIBRARY_PATH=$W/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
  "$W/bin/test_ops" --gtest_filter='Parity.AdaRound' 2>&1 | tail -n 3
  "$W/bin/test_methods" --gtest_filter='AdaRound.CudaSolveMatchesCpu' 2>&1 | tail -n 3
  LOWBIT=$W/bin/lowbit LOWBIT_SHARED=$W/shared QUANT_DEVICE=cuda THREADS=16 timeout "${ADAROUND_TIMEOUT:-520}" \
    bash bench/guided_smollm2.sh --ptq17 --out "$W/guided" ${ADAROUND_ROWS:-adaround-int3g128 adaround-int4g128 adaround-int2g64} || true
  cat "$W/guided/rows.jsonl" 2>/dev/null
  ;;
matquant-bg)
  # Issue 15: MatQuant on SmolLM2 for the seeds MQ_SEEDS (docs/results/matquant.md's command), in the
  # background (setsid) into $W/mq: qat int8g64 --widths 8,4,2, then WikiText-2 ppl of each slice.
  # After join-gguf; `collect-mq` copies $W/mq/*.log and the result lines.
  mkdir -p "$W/mq"
  cat > "$W/mq/run.sh" <<'EOS'
#!/usr/bin/env bash
W=/tmp/w
export LD_LIBRARY_PATH=$W/lib:/usr/local/cuda/lib64
m=$W/shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
s=$1 d=$W/mq/mq-s$1
t0=$(date +%s)
"$W/bin/lowbit" -q qat -m "$m" --method matquant --format int8g64 --widths 8,4,2 --train "$W/shared/data/linux-docs/train.txt" \
  --device cuda --seed "$s" --threads 4 -o "$d" --json > "$W/mq/s$s.qat.json" 2> "$W/mq/s$s.qat.log" || exit 1
echo "seed $s qat $(( $(date +%s) - t0 )) s" >> "$W/mq/times.txt"
for r in 8 4 2; do
  "$W/bin/lowbit" -q eval ppl -m "$d" --slice "$r" --tokenizer "$m" --text "$W/shared/data/wikitext-2-raw/wiki.test.raw" \
    --ctx 2048 --device cuda --json > "$W/mq/s$s.ppl$r.json" 2> "$W/mq/s$s.ppl$r.log"
done
echo "seed $s done $(( $(date +%s) - t0 )) s" >> "$W/mq/times.txt"
EOS
  chmod +x "$W/mq/run.sh"
  for s in ${MQ_SEEDS:-1 2}; do setsid nohup "$W/mq/run.sh" "$s" > "$W/mq/run-s$s.log" 2>&1 < /dev/null & done
  echo "matquant seeds ${MQ_SEEDS:-1 2} started"
  ;;
collect-mq)
  O=${OUT:-/tmp/out}
  mkdir -p "$O/mq"
  cp "$W"/mq/*.json "$W"/mq/*.log "$W"/mq/times.txt "$O/mq/" 2>/dev/null
  cat "$W/mq/times.txt" 2>/dev/null
  for f in "$W"/mq/s*.ppl*.json; do [ -f "$f" ] && echo "$(basename "$f") $(python3 -c "import json,sys; print(json.load(open(sys.argv[1])).get('ppl'))" "$f")"; done
  ;;
collect-now)
  O=${OUT:-/tmp/out}
  mkdir -p "$O"
  cp "$W/runs/results.jsonl" "$O/" 2>/dev/null
  cp "$W/runs/diagnostics.json" "$W/runs/diagnostics.txt" "$O/" 2>/dev/null
  tar -C "$W/runs" -czf "$O/logs.tar.gz" logs 2>/dev/null
  wc -l "$W/runs/results.jsonl" 2>/dev/null
  ls "$W/runs/models" 2>/dev/null | tr '\n' ' '
  echo
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
  tail -5 "$W/runs.log"
  ;;
*)
  echo "usage: $0 stage|setup|launch|collect" >&2
  exit 1
  ;;
esac
