#!/usr/bin/env python3
# The diagonal proxy of the layer output error that docs/results/gguf-export.md reports: for GGUF
# files of one model, sum over the linears of sum_c h_c (w - q)^2, h = llama-imatrix's importance
# (in_sum2 / counts), w the F32 weights, q the file's dequantized weights (gguf-py).
#   bench/ggml_importance_proxy.py imatrix.gguf fp32.gguf FILE.gguf [FILE.gguf ...]
# Prints one line per tensor kind, then the totals, one column per file.
import sys, numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
imat = GGUFReader(sys.argv[1]); fp = GGUFReader(sys.argv[2]); files = sys.argv[3:]
imp = {}
cnt = {t.name[:-len('.counts')]: np.array(t.data).ravel()[0] for t in imat.tensors if t.name.endswith('.counts')}
for t in imat.tensors:
    if t.name.endswith('.in_sum2'):
        n = t.name[:-len('.in_sum2')]
        imp[n] = np.array(t.data, dtype=np.float64).ravel() / cnt[n]
W = {t.name: t for t in fp.tensors}
readers = [GGUFReader(f) for f in files]
tot = np.zeros(len(files)); per = {}
for name in sorted(imp):
    if name not in W: continue
    w = np.array(W[name].data, dtype=np.float64).reshape(-1, imp[name].size)
    row = []
    for k, r in enumerate(readers):
        t = next(t for t in r.tensors if t.name == name)
        q = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(w.shape)
        e = float((((w - q) ** 2) * imp[name][None, :]).sum())
        tot[k] += e; row.append(e)
    kind = name.split('.')[-2]
    per.setdefault(kind, np.zeros(len(files)))
    per[kind] += np.array(row)
for k, v in per.items(): print(k, ' '.join(f'{x:.4g}' for x in v))
print('total', ' '.join(f'{x:.6g}' for x in tot))
