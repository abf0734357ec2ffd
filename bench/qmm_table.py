#!/usr/bin/env python3
"""Table of bench_quant's BM_QuantMatmulInt8 (JSON on stdin): per format and M, the best time of the
repetitions for the four-row kernels (panels 0) and the panel GEMM kernel (panels 1), their ratio,
and each one's cost relative to its own M = 1 call (the batched step's cost in single-row calls).
With --ternary: BM_TernaryMatmul's plain vs lookup-table kernels instead. With --exact: BM_ExactPanel's
OpenBLAS sgemm vs the row-count-independent F32DotRows on one decoded panel."""
import json
import sys

runs = json.load(sys.stdin)["benchmarks"]

if "--ternary" in sys.argv[1:]:
    # BM_TernaryMatmul: best wall time of the repetitions per (shape, M, threads) for the plain
    # kernel (0) and the lookup-table kernel (1); ratio > 1: the lookup table is faster.
    best, label = {}, {}
    for r in runs:
        if r.get("run_type") != "iteration" or not r["name"].startswith("BM_TernaryMatmul/"):
            continue
        kernel, shape, m, threads = (int(v) for v in r["name"].split("/")[1:5])
        key = (shape, m, threads, kernel)
        best[key] = min(best.get(key, r["real_time"]), r["real_time"])
        label[shape] = " ".join(r.get("label", "").split(" ")[:2])
    print("| weight | M | threads | plain us | lut us | plain / lut |")
    print("|---|---:|---:|---:|---:|---:|")
    for (shape, m, threads, kernel) in sorted(best):
        if kernel != 0 or (shape, m, threads, 1) not in best:
            continue
        p, t = best[(shape, m, threads, 0)], best[(shape, m, threads, 1)]
        print(f"| {label[shape]} | {m} | {threads} | {p:.1f} | {t:.1f} | {p / t:.2f}x |")
    sys.exit(0)
if "--exact" in sys.argv[1:]:
    # BM_ExactPanel: best CPU time of the repetitions per (shape, M) for sgemm (0) and F32DotRows
    # (1); ratio > 1: F32DotRows is faster.
    best, label = {}, {}
    for r in runs:
        if r.get("run_type") != "iteration" or not r["name"].startswith("BM_ExactPanel/"):
            continue
        kernel, shape, m = (int(v) for v in r["name"].split("/")[1:4])
        key = (shape, m, kernel)
        best[key] = min(best.get(key, r["cpu_time"]), r["cpu_time"])
        label[shape] = r.get("label", "").split(" ")[0]
    print("| panel | M | sgemm us | f32dot us | sgemm / f32dot | f32dot GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for (shape, m, kernel) in sorted(best):
        if kernel != 0 or (shape, m, 1) not in best:
            continue
        g, f = best[(shape, m, 0)], best[(shape, m, 1)]
        rows, cols = (int(v) for v in label[shape].strip("[]").split("x"))
        print(f"| {label[shape]} | {m} | {g:.1f} | {f:.1f} | {g / f:.2f}x | {2 * m * rows * cols / f / 1e3:.1f} |")
    sys.exit(0)
best = {}
label = {}
for r in runs:
    if r.get("run_type") != "iteration" or not r["name"].startswith("BM_QuantMatmulInt8/"):
        continue
    panels, fmt, m = (int(v) for v in r["name"].split("/")[1:4])
    key = (fmt, m, panels)
    t = r["cpu_time"]  # microseconds of CPU (the bench is single-threaded; robust to preemption)
    best[key] = min(best.get(key, t), t)
    label[fmt] = r.get("label", "").rsplit(" ", 1)[0]
print("| weight | M | four-row us | panel us | speed-up | four-row / its M=1 | panel / its M=1 |")
print("|---|---:|---:|---:|---:|---:|---:|")
for fmt in sorted(label):
    ms = sorted({m for (f, m, _) in best if f == fmt})
    for m in ms:
        q, p = best.get((fmt, m, 0)), best.get((fmt, m, 1))
        if q is None or p is None:
            continue
        q1, p1 = best.get((fmt, 1, 0)), best.get((fmt, 1, 1))
        print(f"| {label[fmt]} | {m} | {q:.1f} | {p:.1f} | {q / p:.2f}x | {q / q1:.2f} | {p / p1:.2f} |")
