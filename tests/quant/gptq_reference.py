#!/usr/bin/env python3
"""An independent GPTQ (numpy, float64), the oracle of tests/quant/test_gptq.cpp (Gptq.MatchesNumpyReference).

Written from the paper (Frantar et al. 2022, Algorithm 1 with the lazy block updates and the Cholesky
form of the inverse Hessian) and the reference implementation's conventions (IST-DASLab/gptq,
gptq.py `fasterquant` and quant.py `Quantizer`): dead columns, dampening percdamp * mean(diag H),
U = chol(H^-1) upper, a group's min/max parameters fitted when the sweep reaches its first column on
the weights as updated so far (or, with act-order, on the original W: "static groups").
The quantizer is the reference's asymmetric min/max one with lowbit's storage rule: the scale is
rounded up to the next float16 value (lowbit stores f16 scales), the zero point is an integer.

usage: gptq_reference.py DIR   (DIR/meta.json, w.f32 [out, in], h.f32 [in, in] -> DIR/q.f32, DIR/codes.u8)
"""
import json
import sys

import numpy as np


def f16_up(s):
    h = np.float16(s)
    if float(h) < s:
        h = np.nextafter(h, np.float16(np.inf))
    return float(h)


def params(w, maxq):
    """Per-row (scale, zero) of the columns w [out, k]."""
    lo = np.minimum(w.min(axis=1), 0.0)
    hi = np.maximum(w.max(axis=1), 0.0)
    both0 = (lo == 0) & (hi == 0)
    lo[both0], hi[both0] = -1.0, 1.0
    scale = np.array([f16_up(float(np.float32((b - a) / maxq))) for a, b in zip(lo, hi)])
    zero = np.clip(np.rint(-lo / scale), 0, maxq)
    return scale, zero


def quantize(w, scale, zero, maxq):
    q = np.clip(np.rint(w / scale) + zero, 0, maxq)
    return q, scale * (q - zero)


def gptq(W, H, bits, group, percdamp, block, act_order):
    out, cols = W.shape
    assert group <= 0 or block % group == 0, "groups must tile the lazy-update blocks"
    maxq = 2**bits - 1
    W = W.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    gparams = None
    if group <= 0:
        fixed = params(W, maxq)
    elif act_order:  # static groups, on the original column order
        gparams = [params(W[:, g:g + group], maxq) for g in range(0, cols, group)]
    perm = np.arange(cols)
    if act_order:
        perm = np.argsort(-np.diag(H), kind="stable")
        W, H = W[:, perm], H[perm][:, perm]
    H[np.arange(cols), np.arange(cols)] += percdamp * np.mean(np.diag(H))
    L = np.linalg.cholesky(H)
    Linv = np.linalg.inv(L)
    Hinv = Linv.T @ Linv                      # H^-1
    U = np.linalg.cholesky(Hinv).T            # upper, U^T U = H^-1
    Q = np.zeros_like(W)
    codes = np.zeros(W.shape, dtype=np.uint8)
    cur = None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            orig = perm[col]
            if group <= 0:
                cur = fixed
            elif act_order:
                cur = gparams[orig // group]
            elif col % group == 0:
                # Fitted on the weights as updated so far (W1 holds this block's within-block
                # updates). gptq.py reads the outer W here, which lacks them for a group that starts
                # inside a block (group < block); lowbit and this oracle use the updated weights.
                cur = params(W1[:, i:i + group], maxq)
            w = W1[:, i]
            d = U[col, col]
            q, deq = quantize(w, cur[0], cur[1], maxq)
            Q[:, col] = deq
            codes[:, col] = q.astype(np.uint8)
            err = (w - deq) / d
            W1[:, i:] -= np.outer(err, U[col, i1 + i:i2])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    inv = np.argsort(perm)
    return Q[:, inv], codes[:, inv]


def main():
    d = sys.argv[1]
    meta = json.load(open(d + "/meta.json"))
    out, cols = meta["out"], meta["in"]
    W = np.fromfile(d + "/w.f32", dtype=np.float32).reshape(out, cols)
    H = np.fromfile(d + "/h.f32", dtype=np.float32).reshape(cols, cols)
    Q, codes = gptq(W, H, meta["bits"], meta["group"], meta["percdamp"], meta["block"], meta["act_order"])
    Q.astype(np.float32).tofile(d + "/q.f32")
    codes.tofile(d + "/codes.u8")
    print("ok")


if __name__ == "__main__":
    main()
