#!/usr/bin/env python3
"""Perplexity table of the post-training quantization methods on the stories15M-shaped model trained
with `lowbit train` on linux-docs (issues 5 and 6; docs/results/train-stories15m.md).

Tokens: the Llama 2 tokenizer (shared/tokenizers/llama2/tokenizer.model), no BOS. Each text is tokenized
once, whole, into raw int32 ids by `lowbit train --steps 0` (its token cache train.tokens / valid.tokens,
the same tokenization `lowbit train` and `lowbit eval ppl --text` use), in the work directory.
Calibration: --nsamples random windows of 256 tokens (the model's max_seq_len) from all of linux-docs
train.txt (7.57 M tokens), `--calib-tokens --seqlen 256 --seed 0`; the same windows for every method (RTN
needs none: it is data-free). ApiQ/SAPR may use the first --apiq-nsamples of them and fewer epochs.
Evaluation: `lowbit eval ppl --ctx 256` on linux-docs test.txt and on WikiText-2 raw test; with
--eval-windows N, on N evenly spaced non-overlapping 256-token windows of each (0 = every window).
Methods: FP, RTN, GPTQ, AWQ at int4/int3/int2 with g128 and g64; ApiQ block-wise and layer-wise and SAPR
(ApiQ + saliency-aware regularization, arXiv 2504.13932) at int2g64 and int3g128, plus the SAPR paper's
metric, the reduction of ApiQ's degradation: (d_ApiQ - d_SAPR) / d_ApiQ with d = ppl - ppl_FP.

Only the Python standard library; runs the `lowbit` CLI. Usage:
    bench/ptq_table_trained.py [--lowbit build/lowbit] [--jobs 2] [--epochs 3] [--rank 4] [--workdir DIR]
Prints a markdown table on stdout (progress on stderr).
"""
import argparse
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ptq_common import (APIQ_FORMATS, BASELINE_FORMATS, Bench, add_common_args, print_ppl_table,  # noqa: E402
                        print_sapr_metric, print_times, run, single_thread_env)

CTX = 256


def tokenize(lowbit, tokenizer, out_dir, train_text, valid_text=None):
    """Tokenizes whole text files into out_dir/train.tokens (and valid.tokens) with lowbit's token cache."""
    want = [os.path.join(out_dir, "train.tokens")] + ([os.path.join(out_dir, "valid.tokens")] if valid_text else [])
    if all(os.path.exists(p) and os.path.exists(p + ".key") for p in want):
        return want
    cmd = [lowbit, "train", "--out", out_dir, "--tokenizer", tokenizer, "--train", train_text, "--steps", "0",
           "--dim", "8", "--hidden-dim", "8", "--layers", "1", "--heads", "1", "--json"]
    if valid_text:
        cmd += ["--valid", valid_text]
    run(cmd, single_thread_env())
    return want


def window_subset(tokens_path, out_path, n):
    """Writes n evenly spaced non-overlapping CTX-token windows of tokens_path (all when n <= 0) to out_path;
    eval ppl --ctx CTX on it scores exactly those windows. Returns (windows taken, windows in the file)."""
    data = open(tokens_path, "rb").read()
    total = len(data) // 4 // CTX
    idx = range(total) if n <= 0 or n >= total else [i * total // n for i in range(n)]
    w = CTX * 4
    with open(out_path, "wb") as f:
        for i in idx:
            f.write(data[i * w:(i + 1) * w])
    return len(idx), total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, epochs=3, rank=4,
                    rank_help="LoRA rank (paper: 64 on 4096 channels = +0.5 bit/weight; rank 4 on this model's 288 "
                              "channels costs about the same: +0.44 bit on 288x288, +0.31 on 288x768)")
    ap.add_argument("--model", default=os.environ.get("LOWBIT_TRAINED_MODEL",
                                                      "/work/models/stories15m-linuxdocs/model.bin"))
    ap.add_argument("--tokenizer", default=None, help="default: SHARED/tokenizers/llama2/tokenizer.model")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows of 256 tokens")
    ap.add_argument("--apiq-nsamples", type=int, default=None, help="ApiQ/SAPR calibration windows (default: --nsamples)")
    ap.add_argument("--eval-windows", type=int, default=0,
                    help="evaluate on this many evenly spaced 256-token windows of each test set (0: all)")
    ap.add_argument("--controls", action="store_true", help="also ApiQ-bw at rank 0 (learnable clipping only)")
    a = ap.parse_args()

    tokenizer = a.tokenizer or os.path.join(a.shared, "tokenizers", "llama2", "tokenizer.model")
    train_txt = os.path.join(a.shared, "data", "linux-docs", "train.txt")
    test_txt = os.path.join(a.shared, "data", "linux-docs", "test.txt")
    wiki_txt = os.path.join(a.shared, "data", "wikitext-2-raw", "wiki.test.raw")
    for p in (a.lowbit, a.model, tokenizer, train_txt, test_txt, wiki_txt):
        if not os.path.exists(p):
            raise SystemExit(f"not found: {p} (set --lowbit / --shared / --model)")
    work = a.workdir or tempfile.mkdtemp(prefix="lowbit-ptq-trained-")
    os.makedirs(work, exist_ok=True)
    apiq_n = a.apiq_nsamples or a.nsamples
    t_start = time.time()

    # Test sets first (a few seconds); train.txt (~70 s) in the background while FP and RTN are evaluated.
    wiki_tok, linux_tok = tokenize(a.lowbit, tokenizer, os.path.join(work, "tok-test"), wiki_txt, test_txt)
    evalsets, sizes = [], {}
    for name, src in (("linux-docs test", linux_tok), ("WikiText-2 test", wiki_tok)):
        sub = os.path.join(work, ("linux" if name.startswith("linux") else "wiki") + f"-eval{a.eval_windows}.i32")
        sizes[name] = window_subset(src, sub, a.eval_windows)
        evalsets.append((name, ["--tokens", sub, "--ctx", str(CTX)]))
    train_tok = os.path.join(work, "tok-train", "train.tokens")
    ready, failed = threading.Event(), []

    def tokenize_train():
        try:
            tokenize(a.lowbit, tokenizer, os.path.join(work, "tok-train"), train_txt)
        except BaseException as e:  # noqa: BLE001 - reported after the pool
            failed.append(e)
        finally:
            ready.set()

    threading.Thread(target=tokenize_train, daemon=True).start()

    calib = ["--calib-tokens", train_tok, "--nsamples", str(a.nsamples), "--seqlen", str(CTX)]
    bench = Bench(a.lowbit, a.model, work, evalsets, calib, calib_ready=ready)
    apiq_calib = ["--calib-tokens", train_tok, "--nsamples", str(apiq_n), "--seqlen", str(CTX)]
    apiq_common = ("--rank", str(a.rank), "--lora-alpha", str(a.rank), "--epochs", str(a.epochs))
    saliency = os.path.join(work, "saliency-fisher.safetensors")
    sapr_extra = apiq_common + ("--saliency", saliency, "--lambda", str(a.lam))

    fp = {}
    # Cheap, calibration-free work first (while train.txt is tokenized), then the longest runs first.
    jobs = [([("fp", "-")], [lambda: fp.update(bench.fp()) or {}])]
    jobs += [([("rtn", f)], [dict(method="rtn", fmt=f, calib=[])]) for f in BASELINE_FORMATS]
    # The saliency (Fisher, full model) is computed by the first SAPR run and reused by the second through
    # --saliency, so the two run one after the other in one job.
    jobs += [([("sapr", f) for f in APIQ_FORMATS],
              [dict(method="sapr", fmt=f, extra=sapr_extra, calib=apiq_calib) for f in APIQ_FORMATS])]
    jobs += [([(m, f)], [dict(method=m, fmt=f, extra=apiq_common, calib=apiq_calib)]) for f in APIQ_FORMATS
             for m in ("apiq", "apiq-layer")]
    if a.controls:
        jobs += [([("apiq-r0", f)], [dict(method="apiq", fmt=f, tag="-r0", calib=apiq_calib,
                                          extra=("--rank", "0", "--epochs", str(a.epochs)))]) for f in APIQ_FORMATS]
    jobs += [([(m, f)], [dict(method=m, fmt=f)]) for m in ("awq", "gptq") for f in BASELINE_FORMATS]
    results = bench.run_all(jobs, a.jobs)
    if failed:
        raise SystemExit(f"tokenizing {train_txt} failed: {failed[0]}")
    results.pop(("fp", "-"), None)
    total = time.time() - t_start

    names = [e for e, _ in evalsets]
    sets = "; ".join(f"{e}: {n} of {t} windows" + (" (all)" if n == t else ", evenly spaced")
                     for e, (n, t) in sizes.items())
    apiq_desc = (f"LoRA rank {a.rank} (alpha {a.rank}), {a.epochs} epochs (paper: 20), {apiq_n} calibration windows "
                 f"(paper: 128 × 2048 tokens), batch 1, LoRA lr 5e-4, clipping lr 5e-3, weight decay 0.1; SAPR: Fisher "
                 f"saliency (mean 1 per layer), lambda {a.lam:g}, Ŵ = Q(W) + BA, the paper's stage schedule "
                 f"({a.epochs - (a.epochs + 2) // 4} weight- then {(a.epochs + 2) // 4} output-preservation epochs)")
    print(f"Perplexity (`lowbit eval ppl --ctx {CTX}`, Llama 2 tokenizer, no BOS; {sets}) of the stories15M-shaped "
          f"model trained on linux-docs ({os.path.basename(a.model)}; FP " +
          ", ".join(f"{e} {fp[e]:.3f}" for e in names) +
          f"). Calibration: {a.nsamples} random windows of {CTX} tokens (seed 0) from all of linux-docs train.txt, "
          f"tokenized once, whole ({CTX}-token windows because the model's max_seq_len is {CTX}); RTN is data-free. "
          f"ApiQ/SAPR: {apiq_desc}. Bits per weight (in parentheses) include scales, zeros and f16 LoRA adapters. "
          f"Generated by bench/ptq_table_trained.py in {total / 60:.1f} min ({a.jobs} single-threaded runs in "
          f"parallel).\n")
    for e in names:
        print(f"**{e}**\n")
        print_ppl_table(results, fp, e)
    print_sapr_metric(results, fp, names)
    print_times(results, a.jobs, prefixes=("gptq", "awq", "apiq", "sapr"))


if __name__ == "__main__":
    main()
