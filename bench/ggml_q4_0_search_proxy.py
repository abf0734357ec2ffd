#!/usr/bin/env python3
# q4_0 weighted block-search variants on real weights (docs/results/gguf-export.md, "search variant"
# table): every 32nd row of each linear of fp32.gguf, importance from llama-imatrix, the block
# weights h_c sqrt(s2 + w_c^2) with s2 per argv[3] (2blockmean = lowbit, rowmean = llama.cpp, none);
# each variant picks d among the reference d and its trial grids, scored on the stored f16 grid;
# printed: sum h (w - q)^2 of the chosen blocks.
#   bench/ggml_q4_0_search_proxy.py imatrix.gguf fp32.gguf 2blockmean[,none,rowmean]
import sys, numpy as np
from gguf import GGUFReader
imat = GGUFReader(sys.argv[1]); fp = GGUFReader(sys.argv[2])
cnt = {t.name[:-7]: float(np.array(t.data).ravel()[0]) for t in imat.tensors if t.name.endswith('.counts')}
imp = {t.name[:-8]: np.array(t.data, dtype=np.float64).ravel() / cnt[t.name[:-8]] for t in imat.tensors if t.name.endswith('.in_sum2')}
W = {t.name: t for t in fp.tensors}
f16 = lambda a: a.astype(np.float16).astype(np.float32)
def err_for_d(x, wt, d):  # x [B,32] f32, d [B] f32 (already f16-rounded)
    idd = np.where(d != 0, 1.0 / np.where(d != 0, d, 1), 0).astype(np.float32)
    q = np.clip(np.trunc(x * idd[:, None] + np.float32(8.5)), 0, 15)
    y = d[:, None] * (q - 8)
    return (wt * (y.astype(np.float64) - x) ** 2).sum(1)
def search(x, wt, trials, refine):
    amax_i = np.abs(x).argmax(1); mx = x[np.arange(len(x)), amax_i]
    d0 = f16(mx / np.float32(-8)); best = err_for_d(x, wt, d0); bd = d0.copy()
    for t in trials:
        isc = np.where(mx != 0, -(8 + t) / np.where(mx != 0, mx, 1), 0).astype(np.float32)
        l = np.clip(np.rint(isc[:, None] * x), -8, 7)
        for it in range(1 + refine):
            slx = (wt * x * l).sum(1); sl2 = (wt * l * l).sum(1)
            d = f16(np.where(sl2 > 0, slx / np.where(sl2 > 0, sl2, 1), 0).astype(np.float32))
            e = err_for_d(x, wt, d)
            better = e < best; best = np.where(better, e, best); bd = np.where(better, d, bd)
            idd = np.where(d != 0, 1.0 / np.where(d != 0, d, 1), 0).astype(np.float32)
            l = np.clip(np.trunc(x * idd[:, None] + np.float32(8.5)), 0, 15) - 8
    return bd
variants = {
  'ref': ([], 0),
  'lowbit(21)': ([0.1 * i for i in range(-10, 11)], 0),
  '21+refine2': ([0.1 * i for i in range(-10, 11)], 2),
  '81 fine': ([0.05 * i for i in range(-40, 41)], 0),
  '81 fine+refine2': ([0.05 * i for i in range(-40, 41)], 2),
}
for sig in sys.argv[3].split(','):
    tot = {k: 0.0 for k in variants}
    for name in sorted(imp):
        if name not in W: continue
        h = imp[name]; w = np.array(W[name].data, dtype=np.float32).reshape(-1, h.size)[::32]
        x = w.reshape(-1, 32); hb = np.tile(h.reshape(-1, 32), (w.shape[0], 1))
        if sig == '2blockmean': s2 = 2 * (x.astype(np.float64) ** 2).mean(1, keepdims=True)
        elif sig == 'rowmean': s2 = np.repeat((w.astype(np.float64) ** 2).mean(1), h.size // 32)[:, None]
        else: s2 = None
        wt = hb * (np.sqrt(s2 + x.astype(np.float64) ** 2) if s2 is not None else 1.0)
        for k, (tr, rf) in variants.items():
            tot[k] += float(err_for_d(x, hb, search(x, wt, tr, rf)).sum())
    print(sig, ' '.join(f'{k}={v:.6g}' for k, v in tot.items()), flush=True)
