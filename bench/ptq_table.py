#!/usr/bin/env python3
"""Perplexity table of the post-training quantization methods on stories260K (issues 5 and 6).

Calibration: the first 32 sequences of shared/models/stories260K/sample-tokens.i32 (each BOS + 256
tokens), passed as --calib-tokens with --nsamples 32 --seqlen 256. Evaluation: perplexity on the
last 32 sequences with --ctx 257 (non-overlapping windows = the 32 sequences). Methods: FP, RTN,
GPTQ, AWQ at int4/int3/int2 with g128 and g64; ApiQ block-wise and layer-wise and SAPR (ApiQ +
saliency-aware regularization, arXiv 2504.13932) at int2g64 and int3g128, plus the SAPR paper's
metric, the reduction of ApiQ's degradation: (d_ApiQ - d_SAPR) / d_ApiQ with d = ppl - ppl_FP.

Only the Python standard library; runs the `lowbit` CLI. Usage:
    bench/ptq_table.py [--lowbit build/lowbit] [--jobs 2] [--epochs 20] [--rank 1]
Prints a markdown table on stdout (progress on stderr).
"""
import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 257  # BOS + 256 tokens per sampled sequence


def run(cmd, env):
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.stderr.write(" ".join(cmd) + "\n" + r.stdout + r.stderr)
        raise SystemExit(f"command failed ({r.returncode}): {cmd[1]} {cmd[2]}")
    return r.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lowbit", default=os.environ.get("LOWBIT", os.path.join(ROOT, "build", "lowbit")))
    ap.add_argument("--shared", default=os.environ.get("LOWBIT_SHARED", os.path.join(os.path.dirname(ROOT), "shared")))
    ap.add_argument("--jobs", type=int, default=2, help="quantization runs in parallel (each single-threaded)")
    ap.add_argument("--epochs", type=int, default=20, help="ApiQ/SAPR epochs per block (paper: 20)")
    ap.add_argument("--rank", type=int, default=1,
                    help="LoRA rank (paper: 64 on 4096 channels = +0.5 bit/weight; rank 1 on 64 channels costs the same)")
    ap.add_argument("--lam", type=float, default=3.0, help="SAPR lambda")
    ap.add_argument("--workdir", default=None, help="keep outputs here (default: a temporary directory)")
    a = ap.parse_args()

    model = os.path.join(a.shared, "models", "stories260K", "stories260K.bin")
    tokens = os.path.join(a.shared, "models", "stories260K", "sample-tokens.i32")
    for p in (a.lowbit, model, tokens):
        if not os.path.exists(p):
            raise SystemExit(f"not found: {p} (set --lowbit / --shared)")
    data = open(tokens, "rb").read()
    half = 32 * SEQ * 4
    if len(data) < 2 * half:
        raise SystemExit(f"{tokens}: expected 64 sequences of {SEQ} int32 ids")
    work = a.workdir or tempfile.mkdtemp(prefix="lowbit-ptq-table-")
    os.makedirs(work, exist_ok=True)
    calib, held_out = os.path.join(work, "calib.i32"), os.path.join(work, "eval.i32")
    open(calib, "wb").write(data[:half])
    open(held_out, "wb").write(data[half:2 * half])
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")

    def ppl(path):
        out = run([a.lowbit, "eval", "ppl", "-m", path, "--tokens", held_out, "--ctx", str(SEQ), "--json"], env)
        return json.loads(out)["ppl"]

    apiq_common = ["--rank", str(a.rank), "--lora-alpha", str(a.rank), "--epochs", str(a.epochs)]
    saliency = os.path.join(work, "saliency-fisher.safetensors")

    def quantize(method, fmt, extra=(), tag=""):
        out = os.path.join(work, f"{method}{tag}-{fmt}")
        t0 = time.time()
        run([a.lowbit, "quantize", "-m", model, "--method", method, "--format", fmt, "--calib-tokens", calib,
             "--nsamples", "32", "--seqlen", "256", "-o", out, "--json", *extra], env)
        secs = time.time() - t0
        rep = json.load(open(os.path.join(out, "quantize_report.json")))
        p = ppl(out)
        sys.stderr.write(f"{method + tag:11s} {fmt:9s} ppl {p:9.3f}  bpw {rep['bits_per_weight']:.3f}  {secs:6.1f}s\n")
        return {"ppl": p, "bpw": rep["bits_per_weight"], "seconds": secs}

    baseline_formats = ["int4g128", "int4g64", "int3g128", "int3g64", "int2g128", "int2g64"]
    apiq_formats = ["int2g64", "int3g128"]
    jobs = [(m, f, (), "") for f in baseline_formats for m in ("rtn", "gptq", "awq")]
    jobs += [(m, f, tuple(apiq_common), "") for f in apiq_formats for m in ("apiq", "apiq-layer")]
    # Control at the baselines' bits per weight: ApiQ-bw without adapters (learnable clipping only).
    rank0 = ["--rank", "0", "--epochs", str(a.epochs)]
    jobs += [("apiq", f, tuple(rank0), "-r0") for f in apiq_formats]
    sapr_extra = tuple(apiq_common + ["--saliency", saliency, "--lambda", str(a.lam)])

    t_start = time.time()
    fp = ppl(model)
    sys.stderr.write(f"FP ppl {fp:.3f}\n")
    results = {}
    # The saliency (Fisher, full model, 32 backward passes) is computed once by the first SAPR run
    # and reused by the second through --saliency.
    results[("sapr", apiq_formats[0])] = quantize("sapr", apiq_formats[0], sapr_extra)
    with cf.ThreadPoolExecutor(max_workers=max(1, a.jobs)) as ex:
        futs = {ex.submit(quantize, m, f, e, t): (m + t, f) for m, f, e, t in jobs}
        futs[ex.submit(quantize, "sapr", apiq_formats[1], sapr_extra)] = ("sapr", apiq_formats[1])
        for fu in cf.as_completed(futs):
            results[futs[fu]] = fu.result()
    total = time.time() - t_start

    cols = sorted({f for _, f in results}, key=lambda f: (-int(f[3]), -int(f[5:])))
    names = [("rtn", "RTN"), ("gptq", "GPTQ"), ("awq", "AWQ"), ("apiq-r0", "ApiQ-bw, rank 0 (clipping only)"),
             ("apiq-layer", "ApiQ-lw"), ("apiq", "ApiQ-bw"), ("sapr", "SAPR (ApiQ-bw + saliency)")]
    print(f"Perplexity of stories260K on the held-out last 32 sequences of sample-tokens.i32 (ctx {SEQ}); FP "
          f"{fp:.3f}. Calibration: the first 32 sequences (--nsamples 32 --seqlen 256). ApiQ/SAPR: LoRA rank {a.rank} "
          f"(alpha {a.rank}), {a.epochs} epochs, batch 1, LoRA lr 5e-4, clipping lr 5e-3, weight decay 0.1; SAPR: "
          f"Fisher saliency, lambda {a.lam:g}, all epochs mixed. Bits per weight (in parentheses) include scales, zeros "
          f"and f16 LoRA adapters. Generated by bench/ptq_table.py in {total / 60:.1f} min.\n")
    print("| method | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    print("| FP (f32) | " + " | ".join(f"{fp:.3f}" for _ in cols) + " |")
    for key, label in names:
        cells = []
        for c in cols:
            r = results.get((key, c))
            cells.append(f"{r['ppl']:.3f} ({r['bpw']:.2f})" if r else "—")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()
    print("Reduction of ApiQ's degradation by SAPR (the paper's metric; positive = SAPR closer to FP):\n")
    print("| format | ppl ApiQ-bw − FP | ppl SAPR − FP | reduction |")
    print("|---|---|---|---|")
    for f in apiq_formats:
        da, ds = results[("apiq", f)]["ppl"] - fp, results[("sapr", f)]["ppl"] - fp
        print(f"| {f} | {da:.3f} | {ds:.3f} | {100 * (da - ds) / da:+.2f} % |")
    print()
    print("Time per quantization run (s, single-threaded, "
          f"{a.jobs} runs in parallel): " + ", ".join(f"{k[0]} {k[1]} {v['seconds']:.0f}" for k, v in sorted(results.items())
                                                       if k[0].startswith(("apiq", "sapr"))))


if __name__ == "__main__":
    main()
