#!/usr/bin/env bash
# Is GPTQ's loss to RTN on SmolLM2's WikiText-2 a calibration-domain effect or a defect? (issue 11)
# RTN and GPTQ int4g128 from the same model; GPTQ calibrated once on linux-docs train (the method
# table's calibration text) and once on WikiText-2 *valid* (the evaluation corpus, never its test
# text); each model evaluated on WikiText-2 test and linux-docs valid (ctx 512, first 40 windows).
# GPTQ should win in the domain it was calibrated on and may lose out of it.
#   bench/gptq_domain.sh OUT [FORMAT] [NSAMPLES] [SEQLEN]      (defaults int4g128 16 512; CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/gptq_domain.sh OUT [FORMAT] [NSAMPLES] [SEQLEN]}
fmt=${2:-int4g128} ns=${3:-16} sl=${4:-512}
shared=${LOWBIT_SHARED:-../shared}
lowbit=${LOWBIT:-build-rel/lowbit}
model=$shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
wiki=$shared/data/wikitext-2-raw/wiki.test.raw ld=$shared/data/linux-docs/valid.txt
mkdir -p "$out"
head -c 4000000 "$shared/data/linux-docs/train.txt" > "$out/calib-linux-docs.txt"
cp "$shared/data/wikitext-2/valid.txt" "$out/calib-wikitext2-valid.txt"
q() {  # name method calib
  [ -f "$out/$1.lbq/config.json" ] || [ -f "$out/$1.lbq" ] ||
    "$lowbit" -q quantize -m "$model" --method "$2" --format "$fmt" --calib "$3" --tokenizer "$model" \
      --nsamples "$ns" --seqlen "$sl" -o "$out/$1.lbq" > "$out/$1.log" 2>&1
}
q rtn rtn "$out/calib-linux-docs.txt"
q gptq-linux-docs gptq "$out/calib-linux-docs.txt"
q gptq-wikitext2-valid gptq "$out/calib-wikitext2-valid.txt"
ppl() { "$lowbit" -q eval ppl -m "$1" --tokenizer "$model" --text "$2" --ctx 512 --max-windows 40 --json |
  python3 -c "import json,sys; print(round(json.load(sys.stdin)['ppl'], 3))"; }
printf '| %s | calibration | WikiText-2 test | linux-docs valid |\n|---|---|---:|---:|\n' "$fmt" | tee "$out/table.md"
printf '| FP (dequantized Q4_1) | — | %s | %s |\n' "$(ppl "$model" "$wiki")" "$(ppl "$model" "$ld")" | tee -a "$out/table.md"
for m in rtn:none gptq-linux-docs:linux-docs-train gptq-wikitext2-valid:wikitext-2-valid; do
  printf '| %s | %s | %s | %s |\n' "${m%%:*}" "${m#*:}" "$(ppl "$out/${m%%:*}.lbq" "$wiki")" "$(ppl "$out/${m%%:*}.lbq" "$ld")" | tee -a "$out/table.md"
done
