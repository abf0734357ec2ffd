#!/usr/bin/env python3
"""PyTorch reference for bench/bench_gpu_block.cpp: the same Llama-2-7B-shaped decoder block
(dim 4096, 32 heads, hidden 11008, seq 2048, batch 1), forward + backward from a random dy, with
the weight gradients dropped before each step as lowbit's benchmark does.

Prints the median step time (CUDA events) and torch.cuda.max_memory_allocated over the timed steps,
for eager mode and, when it works, torch.compile. Run on the same GPU as the C++ benchmark:

    python3 bench/torch_block_ref.py --dtype f32 [--tf32] [--compile] [--fp8]
"""
import argparse
import statistics

import torch
import torch.nn.functional as F


def rope_half(x, cos, sin):
    # Hugging Face rotate_half layout, as RopeStyle::Half in lowbit.
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def to_fp8(t, dtype):
    """Per-tensor current scaling: codes = t / s with s = amax / max (as lowbit's lp_quantize_fp8)."""
    amax = t.detach().abs().amax().float().clamp(min=1e-30)
    s = amax / torch.finfo(dtype).max
    return (t / s).to(dtype), s


class Fp8Linear(torch.autograd.Function):
    """y = x W^T with the three GEMMs through torch._scaled_mm (FP8 tensor cores): E4M3 x and W,
    E5M2 dy, f32 outputs, fast accumulation off — the native path of lowbit's --precision fp8 (with
    current scaling; lowbit's default delayed scaling differs only in where the scale comes from)."""

    @staticmethod
    def forward(ctx, x, w):
        qx, sx = to_fp8(x, torch.float8_e4m3fn)
        qw, sw = to_fp8(w, torch.float8_e4m3fn)
        ctx.save_for_backward(qx, sx, qw, sw)
        return torch._scaled_mm(qx, qw.t(), scale_a=sx, scale_b=sw, out_dtype=torch.float32, use_fast_accum=False)

    @staticmethod
    def backward(ctx, g):
        qx, sx, qw, sw = ctx.saved_tensors
        qg, sg = to_fp8(g, torch.float8_e5m2)
        # _scaled_mm takes a row-major first operand and a column-major second one
        dx = torch._scaled_mm(qg, qw.t().contiguous().t(), scale_a=sg, scale_b=sw, out_dtype=torch.float32,
                              use_fast_accum=False)
        dw = torch._scaled_mm(qg.t().contiguous(), qx.t().contiguous().t(), scale_a=sg, scale_b=sx,
                              out_dtype=torch.float32, use_fast_accum=False)
        return dx, dw


LINEAR = F.linear


def block(x, p, cos, sin, B, T, H, KVH, hd):
    F_linear = LINEAR
    D = x.shape[-1]
    h = F.rms_norm(x, (D,), p["attn_norm"], eps=1e-5)
    q = rope_half(F_linear(h, p["wq"]).view(B, T, H, hd), cos, sin)
    k = rope_half(F_linear(h, p["wk"]).view(B, T, KVH, hd), cos, sin)
    v = F_linear(h, p["wv"]).view(B, T, KVH, hd)
    a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=(H != KVH))
    a = a.transpose(1, 2).reshape(B * T, H * hd)
    x2 = x + F_linear(a, p["wo"])
    h2 = F.rms_norm(x2, (D,), p["ffn_norm"], eps=1e-5)
    return x2 + F_linear(F.silu(F_linear(h2, p["w1"])) * F_linear(h2, p["w3"]), p["w2"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--fp8", action="store_true",
                    help="the seven linears through torch._scaled_mm (Fp8Linear; f32 activations, as "
                         "bench_gpu_block --precision fp8)")
    args = ap.parse_args()
    global LINEAR
    if args.fp8:
        if args.dtype != "f32":
            raise SystemExit("--fp8 takes f32 activations (--dtype f32)")
        LINEAR = Fp8Linear.apply

    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    dt = torch.float32 if args.dtype == "f32" else torch.bfloat16
    dev = "cuda"
    D, H, KVH, FF, T, B = 4096, 32, 32, 11008, args.seq, 1
    hd = D // H
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, std=0.02, mean=0.0):
        return (torch.randn(*shape, generator=g, device=dev) * std + mean).to(dt).requires_grad_(True)

    p = {
        "attn_norm": rnd(D, std=0.1, mean=1.0), "ffn_norm": rnd(D, std=0.1, mean=1.0),
        "wq": rnd(D, D), "wk": rnd(KVH * hd, D), "wv": rnd(KVH * hd, D), "wo": rnd(D, D),
        "w1": rnd(FF, D), "w3": rnd(FF, D), "w2": rnd(D, FF),
    }
    x0 = torch.randn(B * T, D, generator=g, device=dev).to(dt)
    dy = torch.randn(B * T, D, generator=g, device=dev).to(dt)
    pos = torch.arange(T, device=dev, dtype=torch.float64)
    inv = 10000.0 ** (-torch.arange(0, hd, 2, device=dev, dtype=torch.float64) / hd)
    ang = torch.outer(pos, inv)  # [T, hd/2]
    cos = ang.cos().to(dt)[None, :, None, :]
    sin = ang.sin().to(dt)[None, :, None, :]

    def run(fn, label):
        if args.fp8:
            label += "-fp8"
        def step():
            for t in p.values():
                t.grad = None
            x = x0.clone().requires_grad_(True)
            y = fn(x, p, cos, sin, B, T, H, KVH, hd)
            y.backward(dy)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            step()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        med = statistics.median(times)
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"torch {label} block fwd+bwd on {torch.cuda.get_device_name()}: {args.dtype}, tf32 "
              f"{'on' if args.tf32 else 'off'}: median {med:.2f} ms (min {min(times):.2f}, max {max(times):.2f}), "
              f"peak {peak:.3f} GiB")
        print(f"RESULT torch-{label} {args.dtype} tf32={'on' if args.tf32 else 'off'} median_ms={med:.3f} "
              f"peak_gib={peak:.3f}", flush=True)

    run(block, "eager")
    if args.compile:
        try:
            run(torch.compile(block), "compile")
        except Exception as ex:  # report and carry on: the eager number stands
            print(f"torch.compile failed: {type(ex).__name__}: {ex}")


if __name__ == "__main__":
    main()
