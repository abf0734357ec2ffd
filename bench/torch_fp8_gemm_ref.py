#!/usr/bin/env python3
"""PyTorch reference for bench/bench_fp8_gemm.cpp (issue 18): the same shapes y [M, N] = x [M, K] W [N, K]^T,
median time of torch.matmul in f32 (TF32 with --tf32), bf16 (f32 output as lowbit's: bf16 matmul then
.float() is not the same, so torch's bf16 matmul with bf16 output is timed, the faster of the two), and
torch._scaled_mm with E4M3 operands and per-tensor scales (f32 output, use_fast_accum off as lowbit),
with and without the quantization of both operands (amax, scale, cast). Run on the same GPU, in the same
device call as the C++ benchmark:

    python3 bench/torch_fp8_gemm_ref.py [--tf32] [--iters 20] [--shapes MxNxK,...]
"""
import argparse
import statistics

import torch


def median_ms(iters, f):
    f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        f()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def to_fp8(t):
    amax = t.abs().amax().float()
    scale = amax / 448.0
    return (t / scale).to(torch.float8_e4m3fn), scale


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--shapes", default="4096x4096x4096,4096x11008x4096,4096x4096x11008,8192x8192x8192,16384x768x288")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, f32 {'TF32' if a.tf32 else 'FP32'}, median of {a.iters}")
    print("| M x N x K | f32 ms | bf16 ms | _scaled_mm fp8 ms | fp8+quant ms | fp8 TFLOP/s | fp8 / bf16 speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for item in a.shapes.split(","):
        M, N, K = (int(v) for v in item.split("x"))
        g = torch.Generator(device="cuda").manual_seed(1)
        x = torch.randn(M, K, device="cuda", generator=g)
        w = torch.randn(N, K, device="cuda", generator=g) * 0.02
        xb, wb = x.bfloat16(), w.bfloat16()
        cx, sx = to_fp8(x)
        cw, sw = to_fp8(w)
        t_f32 = median_ms(a.iters, lambda: x @ w.t())
        t_bf16 = median_ms(a.iters, lambda: xb @ wb.t())
        mm = lambda cx, cw, sx, sw: torch._scaled_mm(cx, cw.t(), scale_a=sx, scale_b=sw, out_dtype=torch.float32,
                                                   use_fast_accum=False)
        t_fp8 = median_ms(a.iters, lambda: mm(cx, cw, sx, sw))

        def quant_mm():
            qx, qsx = to_fp8(x)
            qw, qsw = to_fp8(w)
            return mm(qx, qw, qsx, qsw)

        t_fp8q = median_ms(a.iters, quant_mm)
        flop = 2.0 * M * N * K
        print(f"| {M}x{N}x{K} | {t_f32:.3f} | {t_bf16:.3f} | {t_fp8:.3f} | {t_fp8q:.3f} | {flop / t_fp8 / 1e9:.0f} | {t_bf16 / t_fp8:.2f} |")


if __name__ == "__main__":
    main()
