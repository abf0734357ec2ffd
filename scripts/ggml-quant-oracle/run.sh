#!/usr/bin/env bash
# Compares lowbit's reference ggml quantizers (src/lowbit/quant/ggml_quants.cpp) byte for byte with
# ggml's own quantize_row_*_ref (ggml/src/ggml-quants.c), both compiled here without FMA
# contraction, on 400 super-blocks of 8 weight distributions (zeros, one-signed, outliers, ...).
#   scripts/ggml-quant-oracle/run.sh /path/to/ggml-checkout   (github.com/ggml-org/ggml, or llama.cpp/ggml)
# Needs gcc, g++, python3 + numpy. Not part of the test suite (it needs ggml's sources).
set -euo pipefail
GGML=${1:?usage: run.sh /path/to/ggml}
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/../.." && pwd)
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
gcc -O2 -std=c11 -ffp-contract=off -I"$GGML/src" -I"$GGML/include" -I"$GGML/src/ggml-cpu" -c "$GGML/src/ggml-quants.c" -o "$W/q.o"
# ggml-quants.o references functions of the rest of ggml that the reference quantizers never call.
{ echo '#include <stdlib.h>'
  for s in $(nm -u "$W/q.o" | awk '{print $2}' | grep '^ggml_'); do echo "void $s(void) { abort(); }"; done; } > "$W/stubs.c"
gcc -O2 -ffp-contract=off -I"$GGML/src" -I"$GGML/include" "$HERE/ggml_side.c" "$W/q.o" "$W/stubs.c" -o "$W/ggml_side" -lm
g++ -O2 -std=c++20 -ffp-contract=off -I"$ROOT/src" "$HERE/lowbit_side.cpp" "$ROOT/src/lowbit/quant/ggml_quants.cpp" -o "$W/lowbit_side"
cd "$W" && python3 - <<'PY'
import numpy as np, subprocess, sys
rng = np.random.default_rng(5)
blocks = []
for i in range(400):
    kind = i % 8
    if kind == 0: b = rng.standard_normal(256) * 0.05
    elif kind == 1: b = np.zeros(256)
    elif kind == 2: b = np.abs(rng.standard_normal(256)) * 0.02
    elif kind == 3: b = -np.abs(rng.standard_normal(256)) * 3
    elif kind == 4: b = rng.standard_normal(256) * 1e-3; b[rng.integers(256)] = 0.5
    elif kind == 5: b = rng.uniform(-1, 1, 256)
    elif kind == 6: b = rng.standard_t(2, 256) * 0.1
    else: b = np.round(rng.standard_normal(256) * 4) / 8; b[:16] = 0
    blocks.append(b)
np.concatenate(blocks).astype(np.float32).tofile('x.f32')
bad = 0
for t in ['q4_0', 'q2_k', 'q3_k', 'q4_k', 'q5_k', 'q6_k', 'iq4_nl', 'iq4_xs']:
    subprocess.run(['./ggml_side', t, 'x.f32', f'ref.{t}'], check=True)
    subprocess.run(['./lowbit_side', t, 'x.f32', f'lb.{t}'], check=True)
    a, b = np.fromfile(f'ref.{t}', np.uint8), np.fromfile(f'lb.{t}', np.uint8)
    nd = int((a != b).sum()) if a.size == b.size else -1
    print(f'{t}: {a.size} bytes, differing bytes: {nd}')
    bad += nd != 0
sys.exit(1 if bad else 0)
PY
