#!/usr/bin/env bash
# QAT against PTQ on stories260K, CPU (issue 14): RTN, ApiQ (`quantize --method apiq`), LSQ QAT and
# EfficientQAT (`lowbit qat`) at the given formats; test perplexity on held-out sampled tokens.
#   bench/qat_260k.sh [OUT_DIR] [FORMATS] [PARALLEL]     (default /tmp/qat-260k, "int2g64 int3g64", 2)
#   QAT_JOBS=REGEX bench/qat_260k.sh ...   runs only the jobs whose name matches REGEX (grep -E)
# Data as bench/study_260k.sh: shared/models/stories260K/sample-tokens.i32 (64 sequences of BOS +
# 256 sampled tokens) split into training/calibration (sequences 0-23, 6168 tokens: every method
# trains only on these), validation (24-31) and test (32-63); perplexity with ctx 257 (one window
# per sequence). Training-token budgets (tokens processed, counting repeats):
#   apiq           20 epochs x 32 windows x 256 = 163,840 per block
#   lsq            300 steps x 8 x 256 = 614,400 end to end (the default)
#   lsq-163k       80 steps x 8 x 256 = 163,840 end to end (ApiQ's per-block budget)
#   efficientqat   Block-AP 5 epochs x 128 windows x 256 = 163,840 per block, then E2E-QP 614,400
#   efficientqat-bap  Block-AP only (--steps 0)
#   paretoq        300 steps x 8 x 256 = 614,400 end to end (the default; int2 -> 2-bit SEQ, int3 -> LSQ)
#   lsq-ternary, paretoq-1.58   at int2g64s (symmetric int2 = the ternary grid {-1, 0, 1} x step):
#                  LSQ with a learned step against ParetoQ's ternary SEQ, 614,400 each
#   paretoq*-qlr1e-4, -qlr1e-2   the α learning rate (--quant-lr, default 1e-3) at 2 and 1.58 bits; 1e-4 =
#                  the weights' lr, as the reference code trains α
#   paretoq-distill, paretoq-gen   as lsq-distill, lsq-gen
#   paretoq-1      1-bit (sign) at int2g64s;  lsq / paretoq at int2pc: the paper's per-channel α
#   l4q            300 steps x 8 x 256 = 614,400 end to end (lsq's budget); l4q-* variants at int2g64
#   lr-qat         300 steps x 8 x 256 = 614,400 end to end (lsq's budget); lr-qat-* variants at int2g64 and
#                  int4g64: --lr 3e-3 (A/B), --quant-lr 1e-4 / 1e-3 (steps; default 1e-5), both, --downcast f32
#                  (W0/s0 not downcast), --init lp4, --lora-alpha 1 (the reference code's default), --lora-rank 32,
#                  --distill, -gen (and lsq-distill, lsq-gen, l4q-gen at int4g64):
#                  QAT_JOBS='rtn|lsq|l4q|lr-qat[a-z0-9-]*' bench/qat_260k.sh OUT "int4g64 int2g64" 2
#   *-gen rows: trained on the calibration tokens + 64,401 self-generated tokens (see below)
#   llm-qat        300 steps x 8 x 256 = 614,400 end to end (lsq's budget), KL to the FP model, symmetric
#                  formats only (int4g64s, int2g64s: the paper's symmetric MinMax); -a8: --act-bits 8,
#                  -a8kv4, -a8kv8: also --kv-bits 4 / 8; -a4: --act-bits 4 (int4g64s); -lr3e-4, -lr1e-3 (-lr3e-3, -lr1e-2, -lr3e-3-selfgen at int2g64s): weight lr (default 1e-4); -selfgen: trained only on
#                  llm-qat's own data (--self-generate 256: 256 x 257 = 65,792 tokens, made once up front,
#                  OUT_DIR/selfgen-256.i32) instead of the calibration tokens. The default lr is 1e-4, 3e-3 at
#                  2 bits (docs/results/llm-qat.md's int2g64s llm-qat/-a8/-selfgen rows ran at 1e-4 before that).
#                  At int4g64s / int2g64s the comparators are rtn, lsq and lsq-distill (same budget):
#                  QAT_JOBS='rtn|lsq|lsq-distill|llm-qat[a-z0-9-]*' bench/qat_260k.sh OUT "int4g64s int2g64s"
#   int2g64 variants: lsq-distill, efficientqat-distill (KL to the FP model), efficientqat-e2e-lr1e-3,
#   efficientqat-paper-lr (the paper's 7B learning rates and 2 Block-AP epochs)
# A rerun with the same OUT_DIR skips models that exist (and re-evaluates them).
# Results: OUT_DIR/results.jsonl (one object per run) and a markdown table on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
shared=${LOWBIT_SHARED:-$here/../../shared}
out=${1:-/tmp/qat-260k} formats=${2:-"int2g64 int3g64"} parallel=${3:-2}
lowbit=${LOWBIT:-$here/../build-rel/lowbit}
model=$shared/models/stories260K/stories260K.bin
mkdir -p "$out"
cp "$lowbit" "$out/lowbit" && lowbit=$out/lowbit
python3 "$here/split_stories260k_tokens.py" "$shared/models/stories260K/sample-tokens.i32" "$out"
# Self-generated training data (for the *-gen rows): 256 sequences of BOS + up to 256 tokens (a sampled
# BOS ends one early: 64,401 tokens in all) sampled from
# the FP model (temperature 1, top-p 1, seeds 1000..1255: new samples of the model whose other samples
# are the test sequences), appended to the 6168 calibration tokens: calib+gen.i32.
if [ ! -f "$out/calib+gen.i32" ]; then
  for s in $(seq 1000 1255); do
    "$lowbit" -q generate -m "$model" --tokenizer "$shared/models/stories260K/tok512.model" -n 256 --ignore-eos \
      --top-p 1 -t 1 -s "$s" --threads 1 --json
  done | python3 -c '
import array, json, sys
a = array.array("i")
a.frombytes(open(sys.argv[1], "rb").read())
for line in sys.stdin:
    a.extend(json.loads(line)["tokens"])
open(sys.argv[2], "wb").write(a.tobytes())
print(len(a), "training tokens in", sys.argv[2], file=sys.stderr)' "$out/calib.i32" "$out/calib+gen.i32"
fi
job() {  # NAME FORMAT KIND(quantize|qat) ARGS...
  local name=$1 fmt=$2 kind=$3; shift 3
  local dir=$out/models/$name-$fmt log=$out/logs/$name-$fmt
  mkdir -p "$out/models" "$out/logs"
  local t0=$(date +%s.%N)
  local data=$out/calib.i32
  case "$name" in *-gen) data=$out/calib+gen.i32 ;; *-selfgen) data=$out/selfgen-256.i32 ;; esac
  if [ ! -f "$dir/config.json" ]; then
    if [ "$kind" = qat-selfgen ]; then  # llm-qat's own data, generated up front (below)
      "$lowbit" -q qat -m "$model" --format "$fmt" --self-generate 256 --gen-tokens "$data" --threads 1 --json -o "$dir" "$@" \
        > "$log.run.json" 2> "$log.err"
    elif [ "$kind" = quantize ]; then
      "$lowbit" -q quantize -m "$model" --format "$fmt" --calib-tokens "$data" --nsamples 32 --seqlen 256 \
        --threads 1 --json -o "$dir" "$@" > "$log.run.json" 2> "$log.err"
    else
      "$lowbit" -q qat -m "$model" --format "$fmt" --train-tokens "$data" --threads 1 --json -o "$dir" "$@" \
        > "$log.run.json" 2> "$log.err"
    fi
  fi
  local t1=$(date +%s.%N)
  "$lowbit" -q eval ppl -m "$dir" --tokens "$out/test.i32" --ctx 257 --threads 1 --json > "$log.ppl.json"
  "$lowbit" -q eval ppl -m "$dir" --tokens "$out/valid.i32" --ctx 257 --threads 1 --json > "$log.valid.json"
  python3 - "$name" "$fmt" "$log" "$(echo "$t1 - $t0" | bc)" "$(( $(stat -c %s "$data") / 4 ))" >> "$out/results.jsonl" <<'PY'
import json, sys
name, fmt, log, secs, ntok = sys.argv[1:6]
run = json.load(open(log + ".run.json")) if open(log + ".run.json").read().strip() else {}
print(json.dumps({"name": name, "format": fmt, "test_ppl": json.load(open(log + ".ppl.json"))["ppl"],
                  "valid_ppl": json.load(open(log + ".valid.json"))["ppl"], "seconds": run.get("seconds", float(secs)),
                  "training_tokens": run.get("training_tokens"), "stages": run.get("stages"),
                  "peak_rss_bytes": run.get("peak_rss_bytes"),
                  "data_tokens": int(ntok)}))
PY
}
export -f job
export out lowbit model
: > "$out/jobs.txt"
for fmt in $formats; do
  cat >> "$out/jobs.txt" <<EOF
rtn $fmt quantize --method rtn
apiq $fmt quantize --method apiq
lsq $fmt qat --method lsq
lsq-163k $fmt qat --method lsq --steps 80
efficientqat $fmt qat --method efficientqat
efficientqat-bap $fmt qat --method efficientqat --steps 0
paretoq $fmt qat --method paretoq
l4q $fmt qat --method l4q
lr-qat $fmt qat --method lr-qat
EOF
done
for fmt in $formats; do case "$fmt" in int2g64|int4g64) cat >> "$out/jobs.txt" <<EOF
lr-qat-lr3e-3 $fmt qat --method lr-qat --lr 3e-3
lr-qat-qlr1e-4 $fmt qat --method lr-qat --quant-lr 1e-4
lr-qat-qlr1e-3 $fmt qat --method lr-qat --quant-lr 1e-3
lr-qat-lr3e-3-qlr1e-4 $fmt qat --method lr-qat --lr 3e-3 --quant-lr 1e-4
lr-qat-f32 $fmt qat --method lr-qat --downcast f32
lr-qat-init-lp4 $fmt qat --method lr-qat --init lp4
lr-qat-alpha1 $fmt qat --method lr-qat --lora-alpha 1
lr-qat-rank32 $fmt qat --method lr-qat --lora-rank 32
lr-qat-distill $fmt qat --method lr-qat --distill
lr-qat-gen $fmt qat --method lr-qat
EOF
esac; done
case " $formats " in *" int4g64 "*) printf '%s\n' "lsq-distill int4g64 qat --method lsq --distill" \
  "lsq-gen int4g64 qat --method lsq" "l4q-gen int4g64 qat --method l4q" >> "$out/jobs.txt" ;; esac
# Variants at int2g64 (chosen between on the validation split): distillation, and E2E-QP with a
# larger step-size learning rate (1e-3, the default before the validation split chose 1e-4); EfficientQAT with the paper's Llama-2-7B learning rates.
case " $formats " in *" int2g64 "*) cat >> "$out/jobs.txt" <<EOF
lsq-distill int2g64 qat --method lsq --distill
efficientqat-distill int2g64 qat --method efficientqat --distill
efficientqat-e2e-lr1e-3 int2g64 qat --method efficientqat --lr 1e-3
efficientqat-paper-lr int2g64 qat --method efficientqat --block-epochs 2 --block-lr 2e-5 --block-quant-lr 1e-4 --lr 2e-5
lsq-gen int2g64 qat --method lsq
efficientqat-gen int2g64 qat --method efficientqat
apiq-gen int2g64 quantize --method apiq
lsq-ternary int2g64s qat --method lsq
paretoq-1.58 int2g64s qat --method paretoq
paretoq-qlr1e-4 int2g64 qat --method paretoq --quant-lr 1e-4
paretoq-1.58-qlr1e-4 int2g64s qat --method paretoq --quant-lr 1e-4
paretoq-qlr1e-2 int2g64 qat --method paretoq --quant-lr 1e-2
paretoq-1.58-qlr1e-2 int2g64s qat --method paretoq --quant-lr 1e-2
paretoq-1 int2g64s qat --method paretoq --bits 1
paretoq-distill int2g64 qat --method paretoq --distill
paretoq-gen int2g64 qat --method paretoq
lsq int2pc qat --method lsq
paretoq int2pc qat --method paretoq
l4q-init-mse int2g64 qat --method l4q --init mse
l4q-lr2e-4 int2g64 qat --method l4q --lr 2e-4
l4q-lr3e-3 int2g64 qat --method l4q --lr 3e-3
l4q-rank32 int2g64 qat --method l4q --lora-rank 32 --lora-alpha 64
l4q-gen int2g64 qat --method l4q
EOF
esac
case " $formats " in *" int3g64 "*) cat >> "$out/jobs.txt" <<EOF
lsq-gen int3g64 qat --method lsq
efficientqat-gen int3g64 qat --method efficientqat
apiq-gen int3g64 quantize --method apiq
EOF
esac
for fmt in $formats; do case "$fmt" in int4g64s|int2g64s) cat >> "$out/jobs.txt" <<EOF
lsq-distill $fmt qat --method lsq --distill
llm-qat $fmt qat --method llm-qat
llm-qat-a8 $fmt qat --method llm-qat --act-bits 8
llm-qat-lr3e-4 $fmt qat --method llm-qat --lr 3e-4
llm-qat-lr1e-3 $fmt qat --method llm-qat --lr 1e-3
llm-qat-selfgen $fmt qat-selfgen --method llm-qat
EOF
esac; done
case " $formats " in *" int4g64s "*) cat >> "$out/jobs.txt" <<EOF
llm-qat-a8kv4 int4g64s qat --method llm-qat --act-bits 8 --kv-bits 4
llm-qat-a4 int4g64s qat --method llm-qat --act-bits 4
llm-qat-a8kv8 int4g64s qat --method llm-qat --act-bits 8 --kv-bits 8
EOF
esac
case " $formats " in *" int2g64s "*) cat >> "$out/jobs.txt" <<EOF
llm-qat-lr3e-3 int2g64s qat --method llm-qat --lr 3e-3
llm-qat-lr1e-2 int2g64s qat --method llm-qat --lr 1e-2
llm-qat-lr3e-3-selfgen int2g64s qat-selfgen --method llm-qat --lr 3e-3
EOF
esac
if [ -n "${QAT_JOBS:-}" ]; then
  grep -E "^(${QAT_JOBS}) " "$out/jobs.txt" > "$out/jobs.sel" || true
  mv "$out/jobs.sel" "$out/jobs.txt"
fi
"$lowbit" -q eval ppl -m "$model" --tokens "$out/test.i32" --ctx 257 --threads 1 --json > "$out/fp.ppl.json"
# llm-qat's self-generated data, once (a 0-step llm-qat run writes it; the parallel jobs then reuse it).
if grep -q -- "-selfgen " "$out/jobs.txt" && [ ! -f "$out/selfgen-256.i32" ]; then
  "$lowbit" -q qat -m "$model" --method llm-qat --format int4g64s --self-generate 256 --gen-tokens "$out/selfgen-256.i32" \
    --steps 0 --threads 1 --json -o "$out/selfgen-steps0" > /dev/null
fi
xargs -P "$parallel" -L 1 bash -c 'job "$@"' _ < "$out/jobs.txt"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
fp = json.load(open(f"{out}/fp.ppl.json"))["ppl"]
rows = {}
for l in open(f"{out}/results.jsonl"):  # a rerun appends: keep the last row of each (name, format)
    r = json.loads(l)
    rows[(r["name"], r["format"])] = r
rows = list(rows.values())
print(f"FP test perplexity {fp:.3f}\n")
print("| method | format | test ppl | valid ppl | training data (tokens) | training tokens processed | seconds | peak RSS MiB |")
print("|---|---|---:|---:|---:|---|---:|---:|")
budget = {"rtn": "none", "apiq": "163,840 per block", "apiq-gen": "163,840 per block"}
for r in rows:
    b = budget.get(r["name"])
    if b is None:
        st = r["stages"] or []
        b = " + ".join(f'{s["stage"]} {s["tokens"]:,}' + (" per block" if s["stage"] == "block-ap" else "") for s in st)
    d = "none" if r["name"] == "rtn" else f'{r.get("data_tokens") or 6168:,}'
    print(f'| {r["name"]} | {r["format"]} | {r["test_ppl"]:.3f} | {r["valid_ppl"]:.3f} | {d} | {b} | {r["seconds"]:.0f} | {(r.get("peak_rss_bytes") or 0) / 2**20:.0f} |')
PY
