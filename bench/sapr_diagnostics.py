#!/usr/bin/env python3
"""Why does (or doesn't) SAPR help? Diagnostics for issue 22, from files lowbit writes.

  bench/sapr_diagnostics.py --saliency s0.safetensors s1.safetensors [s2 ...] \
      --fp FP_HF_DIR --model apiq=APIQ_HF_DIR --model sapr=SAPR_HF_DIR [--top 0.01] [--json OUT]

--saliency: lowbit saliency files (`lowbit quantize --method sapr --saliency F --saliency-only`), one
per calibration seed. --fp / --model: dense Hugging Face directories (`lowbit convert --from MODEL --to
DIR`; a lowbit quantized directory converts dequantized with its LoRA adapters added). Saliency and
weights must share the layout (lowbit writes saliency in the model's own layout, 'half' RoPE style
for Hugging Face-layout models, as the converted directories are).

Prints, per linear-layer kind (q, k, v, o, gate, up, down; mean over blocks):
  1. Stability of the saliency estimate across seeds: Pearson correlation of log(saliency), Spearman
     rank correlation, and the overlap (|A ∩ B| / |A|) of the top --top fraction of weights.
  2. Where the weight error goes: for each model, mean (W - Ŵ)² over the top --top salient weights
     (by the mean saliency over the seeds) and over the rest, their ratio, and the saliency-weighted
     error  sum S (W - Ŵ)² / sum S  — the quantity SAPR's regularizer penalises.
"""
import argparse
import json
import re
import sys

import numpy as np
from safetensors import safe_open

KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rank(a):
    r = np.empty(a.size, dtype=np.float64)
    r[np.argsort(a, kind="stable")] = np.arange(a.size)
    return r


def corr(a, b):
    a = a - a.mean()
    b = b - b.mean()
    d = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 0 else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--saliency", nargs="+", required=True)
    ap.add_argument("--fp")
    ap.add_argument("--model", action="append", default=[], help="NAME=HF_DIR")
    ap.add_argument("--top", type=float, default=0.01)
    ap.add_argument("--skip-qk", action="store_true",
                    help="leave q_proj/k_proj out of the weight-error part: for models whose saliency rows are in "
                         "llama2.c's interleaved RoPE layout while the converted directories are in Hugging Face's")
    ap.add_argument("--json")
    a = ap.parse_args()
    sal = [safe_open(p, "np") for p in a.saliency]
    names = sorted(sal[0].keys(), key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
    fp = safe_open(a.fp + "/model.safetensors", "np") if a.fp else None
    models = {}
    for m in a.model:
        k, _, d = m.partition("=")
        models[k] = safe_open(d + "/model.safetensors", "np")
    stab = {k: {"pearson_log": [], "spearman": [], "top_overlap": []} for k in KINDS}
    err = {m: {k: {"salient": [], "rest": [], "weighted": []} for k in KINDS} for m in models}
    for n in names:
        kind = n.rsplit(".", 1)[-1]
        if kind not in stab:
            continue
        s = [f.get_tensor(n).astype(np.float64).ravel() for f in sal]
        ntop = max(1, int(round(a.top * s[0].size)))
        for i in range(len(s)):
            for j in range(i + 1, len(s)):
                la, lb = np.log(s[i] + 1e-30), np.log(s[j] + 1e-30)
                stab[kind]["pearson_log"].append(corr(la, lb))
                stab[kind]["spearman"].append(corr(rank(s[i]), rank(s[j])))
                ta = np.argpartition(-s[i], ntop - 1)[:ntop]
                tb = np.argpartition(-s[j], ntop - 1)[:ntop]
                stab[kind]["top_overlap"].append(len(np.intersect1d(ta, tb)) / ntop)
        if fp is None or not models or (a.skip_qk and kind in ("q_proj", "k_proj")):
            continue
        smean = np.mean(s, axis=0)
        top = np.zeros(smean.size, dtype=bool)
        top[np.argpartition(-smean, ntop - 1)[:ntop]] = True
        w = fp.get_tensor(n + ".weight").astype(np.float64).ravel()
        for m, f in models.items():
            d2 = (f.get_tensor(n + ".weight").astype(np.float64).ravel() - w) ** 2
            err[m][kind]["salient"].append(float(d2[top].mean()))
            err[m][kind]["rest"].append(float(d2[~top].mean()))
            err[m][kind]["weighted"].append(float((smean * d2).sum() / smean.sum()))
    out = {"seeds": len(s), "top": a.top, "stability": {}, "error": {}}
    print(f"## Saliency stability across {len(a.saliency)} seeds (mean over blocks and seed pairs)\n")
    print(f"| layer | Pearson(log S) | Spearman | top-{a.top:g} overlap |\n|---|---:|---:|---:|")
    for k in KINDS:
        v = {q: float(np.mean(x)) if x else float("nan") for q, x in stab[k].items()}
        out["stability"][k] = v
        print(f"| {k} | {v['pearson_log']:.3f} | {v['spearman']:.3f} | {v['top_overlap']:.3f} |")
    if models:
        print(f"\n## Weight error of salient (top {a.top:g}) vs other weights, relative to FP\n")
        print("| model | layer | mean err² salient | mean err² rest | salient/rest | S-weighted err² |\n|---|---|---:|---:|---:|---:|")
        for m in models:
            out["error"][m] = {}
            for k in KINDS:
                e = err[m][k]
                if not e["salient"]:
                    continue
                sa, re_, wt = np.mean(e["salient"]), np.mean(e["rest"]), np.mean(e["weighted"])
                out["error"][m][k] = {"salient": sa, "rest": re_, "ratio": sa / re_, "weighted": wt}
                print(f"| {m} | {k} | {sa:.3e} | {re_:.3e} | {sa / re_:.2f} | {wt:.3e} |")
    if a.json:
        json.dump(out, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
