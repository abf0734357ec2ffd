#!/usr/bin/env python3
"""Perplexity table of the post-training quantization methods on stories260K (issues 5 and 6).

Calibration: the first 32 sequences of shared/models/stories260K/sample-tokens.i32 (each BOS + 256
tokens), passed as --calib-tokens with --nsamples 32 --seqlen 256. Evaluation: perplexity on the
last 32 sequences with --ctx 257 (non-overlapping windows = the 32 sequences). Methods: FP, RTN,
GPTQ, AWQ at int4/int3/int2 with g128 and g64; ApiQ block-wise and layer-wise and SAPR (ApiQ +
saliency-aware regularization, arXiv 2504.13932) at int2g64 and int3g128, plus the SAPR paper's
metric, the reduction of ApiQ's degradation: (d_ApiQ - d_SAPR) / d_ApiQ with d = ppl - ppl_FP.

Optional extra SAPR rows (the default table has none of them):
  --sapr-paper-lambdas 0.1,1  the reference code's recipe (lowbit quantize --sapr-recipe paper: raw
                              summed Fisher, summed regularizer on Q(W), 3/4 of the epochs weight
                              preservation then 1/4 output preservation), one row per lambda;
  --sapr-mixed                our SAPR form (layer-normalised Fisher, mean, Q(W)+BA, --lam) with every
                              epoch on the mixed loss (the default row uses the paper's 3/4 weight-
                              + 1/4 output-preservation split);
  --val-tokens FILE           a second evaluation set (e.g. sequences sampled from the FP model with
                              `lowbit generate`), for choosing lambda without the held-out set.

Only the Python standard library; runs the `lowbit` CLI. Usage:
    bench/ptq_table.py [--lowbit build/lowbit] [--jobs 2] [--epochs 20] [--rank 1]
Prints a markdown table on stdout (progress on stderr).
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ptq_common  # noqa: E402
from ptq_common import (APIQ_FORMATS, BASELINE_FORMATS, Bench, add_common_args, print_ppl_table,  # noqa: E402
                        print_sapr_metric, print_times, run)

SEQ = 257  # BOS + 256 tokens per sampled sequence


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, epochs=20, rank=1,
                    rank_help="LoRA rank (paper: 64 on 4096 channels = +0.5 bit/weight; rank 1 on 64 channels costs the same)")
    ap.add_argument("--sapr-paper-lambdas", default="",
                    help="comma-separated lambdas: one extra row each with --sapr-recipe paper (reference recipe)")
    ap.add_argument("--sapr-mixed", action="store_true",
                    help="extra row: our SAPR form with every epoch on the mixed loss (no stage split)")
    ap.add_argument("--val-tokens", default=None,
                    help="extra evaluation set (raw int32 sequences of 257 tokens), e.g. for choosing lambda")
    a = ap.parse_args()
    paper_lams = [float(x) for x in a.sapr_paper_lambdas.split(",") if x.strip()]

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

    evalsets = [("held-out", ["--tokens", held_out, "--ctx", str(SEQ)])]
    if a.val_tokens:
        evalsets.append(("val", ["--tokens", os.path.abspath(a.val_tokens), "--ctx", str(SEQ)]))
    bench = Bench(a.lowbit, model, work, evalsets=evalsets,
                  calib=["--calib-tokens", calib, "--nsamples", "32", "--seqlen", "256"])
    apiq_common = ["--rank", str(a.rank), "--lora-alpha", str(a.rank), "--epochs", str(a.epochs)]
    saliency = os.path.join(work, "saliency-fisher.safetensors")
    sapr_extra = tuple(apiq_common + ["--saliency", saliency, "--lambda", str(a.lam)])
    rank0 = ("--rank", "0", "--epochs", str(a.epochs))

    # The saliency (Fisher, full model, 32 backward passes) is computed by the first SAPR run and reused by
    # the second through --saliency, so the two run one after the other in one job, submitted first.
    chain_keys = [("sapr", f) for f in APIQ_FORMATS]
    chain = [dict(method="sapr", fmt=f, extra=sapr_extra) for f in APIQ_FORMATS]
    extra_rows = []
    if a.sapr_mixed:  # same saliency file, so after the default SAPR runs in their chain
        mixed = ("--sapr-weight-epochs", "0", "--sapr-output-epochs", "0")
        chain_keys += [("sapr-mixed", f) for f in APIQ_FORMATS]
        chain += [dict(method="sapr", fmt=f, extra=sapr_extra + mixed, tag="-mixed") for f in APIQ_FORMATS]
        extra_rows.append(("sapr-mixed", "SAPR, our form, all epochs mixed"))
    jobs = [(chain_keys, chain)]
    if paper_lams:
        # The raw saliency, computed once up front (0 epochs) so the recipe runs can share it.
        raw = os.path.join(work, "saliency-fisher-raw.safetensors")
        if not os.path.exists(raw):
            run([a.lowbit, "quantize", "-m", model, "--method", "sapr", *bench.calib, "--epochs", "0",
                 "--saliency-norm", "none", "--saliency", raw, "-o", os.path.join(work, "saliency-raw-run"), "--json"],
                bench.env)
        for lam in paper_lams:
            key = f"sapr-paper-{lam:g}"
            extra = tuple(apiq_common + ["--saliency", raw, "--sapr-recipe", "paper", "--lambda", repr(lam)])
            jobs += [([(key, f)], [dict(method="sapr", fmt=f, extra=extra, tag=f"-paper-{lam:g}")]) for f in APIQ_FORMATS]
            extra_rows.append((key, f"SAPR, reference recipe, λ {lam:g}"))
    ptq_common.ROW_NAMES.extend(extra_rows)
    jobs += [([(m, f)], [dict(method=m, fmt=f)]) for f in BASELINE_FORMATS for m in ("rtn", "gptq", "awq")]
    jobs += [([(m, f)], [dict(method=m, fmt=f, extra=tuple(apiq_common))]) for f in APIQ_FORMATS
             for m in ("apiq", "apiq-layer")]
    # Control at the baselines' bits per weight: ApiQ-bw without adapters (learnable clipping only).
    jobs += [([("apiq-r0", f)], [dict(method="apiq", fmt=f, extra=rank0, tag="-r0")]) for f in APIQ_FORMATS]

    t_start = time.time()
    fp = bench.fp()
    results = bench.run_all(jobs, a.jobs)
    total = time.time() - t_start

    print(f"Perplexity of stories260K on the held-out last 32 sequences of sample-tokens.i32 (ctx {SEQ}); FP "
          f"{fp['held-out']:.3f}. Calibration: the first 32 sequences (--nsamples 32 --seqlen 256). ApiQ/SAPR: LoRA "
          f"rank {a.rank} (alpha {a.rank}), {a.epochs} epochs, batch 1, LoRA lr 5e-4, clipping lr 5e-3, weight decay "
          f"0.1; SAPR: Fisher saliency (mean 1 per layer), lambda {a.lam:g}, Ŵ = Q(W) + BA, the paper's stage schedule "
          f"({a.epochs - (a.epochs + 2) // 4} weight-preservation then {(a.epochs + 2) // 4} output-preservation "
          f"epochs). Bits per weight (in parentheses) include "
          f"scales, zeros and f16 LoRA adapters. Generated by bench/ptq_table.py in {total / 60:.1f} min.\n")
    print_ppl_table(results, fp, "held-out")
    if a.val_tokens:
        print(f"The same models on --val-tokens {a.val_tokens} (FP {fp['val']:.3f}):\n")
        print_ppl_table(results, fp, "val")
    print_sapr_metric(results, fp, [e for e, _ in evalsets])
    if extra_rows:
        print("Reduction of ApiQ-bw's degradation, (ppl ApiQ-bw − ppl X) / (ppl ApiQ-bw − ppl FP), per SAPR variant:\n")
        names = [("sapr", "SAPR (default)")] + extra_rows
        print("| variant | eval set | " + " | ".join(APIQ_FORMATS) + " |")
        print("|---|---|" + "---|" * len(APIQ_FORMATS))
        for key, label in names:
            for e, _ in evalsets:
                cells = []
                for f in APIQ_FORMATS:
                    if (key, f) in results and ("apiq", f) in results:
                        da = results[("apiq", f)]["ppl"][e] - fp[e]
                        cells.append(f"{100 * (da - (results[(key, f)]['ppl'][e] - fp[e])) / da:+.1f} %")
                    else:
                        cells.append("—")
                print(f"| {label} | {e} | " + " | ".join(cells) + " |")
        print()
    print_times(results, a.jobs)


if __name__ == "__main__":
    main()
