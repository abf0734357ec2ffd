#!/usr/bin/env python3
"""Weight-space error of tp2g128 checkpoints against the source GGUF (docs/results/ptqtp.md).

    python3 bench/ptqtp_weight_error.py GGUF DIR [DIR ...]

For two SmolLM2 linears (layer 3 down_proj, layer 10 gate_proj) prints, per lowbit tp2g128
directory (from `lowbit quantize --format tp2g128`): the mean squared error of the dequantized
weight, the mean squared error on the weights above 4x the mean magnitude, and the largest error.
Needs numpy, gguf, safetensors (pip)."""
import sys

import gguf
import numpy as np
from safetensors.numpy import load_file

LAYERS = {"blk.3.ffn_down.weight": "model.layers.3.mlp.down_proj",
          "blk.10.ffn_gate.weight": "model.layers.10.mlp.gate_proj"}


def dequant_tp(st, name, out, inn):
    """tp2g128: two 2-bit planes per row (t1 + 1, then t2 + 1), a1 in scales, a2 in qzeros."""
    q = st[name + ".qweight"]
    half = q.shape[1] // 2
    def plane(b):
        c = np.stack([(b >> (2 * k)) & 3 for k in range(4)], axis=-1).reshape(out, -1)[:, :inn]
        return c.astype(np.float32) - 1
    t1, t2 = plane(q[:, :half]), plane(q[:, half:])
    g = np.arange(inn) // 128
    a1, a2 = st[name + ".scales"].astype(np.float32), st[name + ".qzeros"].astype(np.float32)
    return t1 * a1[:, g] + t2 * a2[:, g]


def main():
    reader = gguf.GGUFReader(sys.argv[1])
    fp = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors if t.name in LAYERS}
    for d in sys.argv[2:]:
        st = load_file(d + "/model.safetensors")
        for k, name in LAYERS.items():
            w = fp[k].astype(np.float32).reshape(fp[k].shape[0], -1)
            e = dequant_tp(st, name, w.shape[0], w.shape[1]) - w
            big = np.abs(w) > 4 * np.abs(w).mean()
            print(f"{d} {name}: mse {np.mean(e**2):.3g}, mse on |w| > 4 mean|w| ({big.mean()*100:.2f} % of weights) "
                  f"{np.mean(e[big]**2):.3g}, max |error| {np.abs(e).max():.3g}")


if __name__ == "__main__":
    main()
