#!/usr/bin/env bash
# Layer-wise mixed precision (`lowbit quantize --bits-budget`, issue 17) on SmolLM2-135M: for each
# budget, the plan chosen by the LIM score, by the ZD score, and the LIM plan reversed (the least
# important layers get the high format: the paper's "no specific ordering" ablation at the same
# size), next to the uniform formats. Every row is the same method (--method, default gptq) with
# the same calibration (linux-docs train, never an evaluation text); evaluation: lowbit eval ppl on
# WikiText-2 test, --ctx tokens per window, the first --windows windows.
#
#   bench/layer_budget_smollm2.sh [--method gptq] [--nsamples 16] [--seqlen 512] [--ctx 512]
#                                 [--windows 40] [--out DIR]
# Models go to --out (default ~/.cache/lowbit-bench/layer-budget), never into the repository;
# the table is printed and written to DIR/results.md. A row already in DIR/rows.jsonl is not rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${LOWBIT_SHARED:-../shared}
lowbit=${LOWBIT:-build-rel/lowbit}
method=gptq nsamples=16 seqlen=512 ctx=512 windows=40
out=${LOWBIT_BENCH_CACHE:-$HOME/.cache/lowbit-bench}/layer-budget
threads=${THREADS:-2}
while [ $# -gt 0 ]; do
  case "$1" in
    --method) method=$2; shift 2 ;; --nsamples) nsamples=$2; shift 2 ;; --seqlen) seqlen=$2; shift 2 ;;
    --ctx) ctx=$2; shift 2 ;; --windows) windows=$2; shift 2 ;; --out) out=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 1 ;;
  esac
done
model=$shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$model" ] || { echo "SmolLM2 not found at $model" >&2; exit 1; }
mkdir -p "$out"
calib=$out/calib-linux-docs-2MB.txt
[ -f "$calib" ] || head -c 2000000 "$shared/data/linux-docs/train.txt" >"$calib"
wiki=$shared/data/wikitext-2-raw/wiki.test.raw
rows=$out/rows.jsonl
touch "$rows"

# run NAME [quantize flags...]: quantize, evaluate, append {"name", "bits", "ppl", "seconds", "plan"} to rows.jsonl
run() {
  local name=$1; shift
  grep -q "^{\"name\": \"$name\"" "$rows" && return 0
  local dir=$out/$name t0
  rm -rf "$dir"
  t0=$(date +%s.%N)
  "$lowbit" -q quantize -m "$model" --method "$method" --calib "$calib" --nsamples "$nsamples" --seqlen "$seqlen" \
    --threads "$threads" --json -o "$dir" "$@" >"$dir.quantize.json"
  local qs
  qs=$(python3 -c "print(round($(date +%s.%N) - $t0, 1))")
  "$lowbit" -q eval ppl -m "$dir" --tokenizer "$model" --text "$wiki" --ctx "$ctx" --max-windows "$windows" \
    --threads "$threads" --json >"$dir.ppl.json"
  python3 - "$name" "$dir.quantize.json" "$dir.ppl.json" "$qs" >>"$rows" <<'EOF'
import json, sys
name, qj, pj, qs = sys.argv[1:5]
q, p = json.load(open(qj)), json.load(open(pj))
fp = q.get("format_plan", {})
bb = fp.get("bits_budget")
plan = " ".join(l["format"].replace("int", "").split("g")[0] for l in bb["layers"]) if bb else fp.get("summary", q.get("format", ""))
print(json.dumps({"name": name, "bits": q.get("bits_per_weight"), "ppl": p["ppl"], "quantize_seconds": float(qs),
                  "plan": plan, "importance": [l["importance"] for l in bb["layers"]] if bb else None}))
EOF
  rm -rf "$dir"  # the numbers are kept; the models are not needed again
}

# The LIM plan reversed: layer i gets the level of the layer at the mirrored importance rank.
reversed_map() {  # NAME_OF_LIM_ROW LEVELS -> a --format-map file
  python3 - "$rows" "$1" "$2" "$out/$1.reversed.map" <<'EOF'
import json, sys
rows, name, levels, path = sys.argv[1:5]
row = next(json.loads(l) for l in open(rows) if json.loads(l)["name"] == name)
imp = row["importance"]
bits = row["plan"].split()
order = sorted(range(len(imp)), key=lambda i: -imp[i])          # most important first
lv = {b: f for f in levels.split(",") for b in [f.replace("int", "").split("g")[0]]}
new = [None] * len(imp)
for r, i in enumerate(order):
    new[order[len(order) - 1 - r]] = bits[i]                     # mirrored rank gets this layer's level
with open(path, "w") as f:
    for b in sorted(set(new)):
        layers = ",".join(str(i) for i in range(len(new)) if new[i] == b)
        f.write(f"* layers={layers} {lv[b]}\n")
print(path)
EOF
}

for f in int2g64 int3g64 int4g64; do run "uniform-$f" --format "$f"; done
for spec in "3.0 int2g64,int3g64" "3.5 int2g64,int4g64" "4.0 int3g64,int4g64"; do
  set -- $spec
  b=$1 lv=$2
  run "budget$b-$lv-lim" --bits-budget "$b" --mp-formats "$lv" --mp-score lim
  run "budget$b-$lv-zd" --bits-budget "$b" --mp-formats "$lv" --mp-score zd
  run "budget$b-$lv-lim-reversed" --format-map "$(reversed_map "budget$b-$lv-lim" "$lv")"
done

python3 - "$rows" "$method" "$nsamples" "$seqlen" "$ctx" "$windows" <<'EOF' | tee "$out/results.md"
import json, sys
rows, method, ns, sl, ctx, win = sys.argv[1:7]
print(f"SmolLM2-135M, --method {method}, calibration linux-docs train {ns} x {sl}; WikiText-2 test ppl, ctx {ctx}, {win} windows")
print()
print("| row | bits/weight (linears) | plan (bits per layer 0..29) | wiki ppl | quantize s |")
print("|---|---:|---|---:|---:|")
for l in open(rows):
    r = json.loads(l)
    print(f"| {r['name']} | {r['bits']:.3f} | {r['plan']} | {r['ppl']:.2f} | {r['quantize_seconds']:.0f} |")
EOF
