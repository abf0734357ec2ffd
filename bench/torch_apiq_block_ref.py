#!/usr/bin/env python3
"""PyTorch reference for bench/bench_apiq_block.cpp: one ApiQ block-wise calibration step (Liao et al.
2024, arXiv 2402.05147, "ApiQ-bw") of a Llama-2-7B-shaped block (dim 4096, 32 heads, hidden 11008),
fp32, batch 1 window of 2048 tokens, written as ApiQ / OmniQuant's code runs it:

  * every linear: y = x Q(W)^T + s (x A^T) B^T (PEFT LoRA, rank 64, alpha 16, s = 0.25) with Q the
    learnable-weight-clipping fake quantizer of OmniQuant (Shao et al. 2024, eq. 2; quantize/quantizer.py):
    per group of 64 along `in`, hi = sigmoid(gamma) max(W, 0), lo = sigmoid(beta) min(W, 0),
    s = max((hi - lo) / qmax, 1e-5), z = round(-lo / s), Q = (clamp(round_ste(W / s) + z, 0, qmax) - z) s
    with round_ste(u) = (round(u) - u).detach() + u. (The 0-inclusive range is lowbit's format.h
    convention; OmniQuant uses the plain max/min. Same cost.) --lora merged uses W_eff = Q + s B A instead
    (lowbit's form; the same function).
  * loss = MSE to the FP block's outputs; AdamW, groups LoRA lr 5e-4 and clipping lr 5e-3, wd 0.1.
  * 128 x 2048 random hidden states as block inputs and the FP block's outputs as targets, on the GPU.

--amp fp16 runs the step the way ApiQ's calibrate.py actually does: block inputs and targets stored in
fp16, fp32 weights and trainable parameters, the forward under torch.autocast(fp16) (matmuls and
attention in fp16 on tensor cores; the quantizer stays fp32) and a GradScaler (ApiQ's
NativeScalerWithGradNormCount). --amp bf16: the same with bf16 and no scaler.

Prints ms/step (CUDA events over --steps steps after --warmup), the per-block time for 20 epochs x 128
steps, and torch.cuda.max_memory_allocated over the timed steps, for eager mode and, with --compile, for
torch.compile of the loss function. Run on the same GPU as the C++ benchmark:

    python3 bench/torch_apiq_block_ref.py [--tf32] [--compile]
"""
import argparse

import torch
import torch.nn.functional as F


def rope_half(x, cos, sin):
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def round_ste(x):
    return (x.round() - x).detach() + x


def lwc_fake_quant(w, gamma, beta, bits, gs):
    """OmniQuant's UniformAffineQuantizer with lwc=True, per-group (quantizer.py)."""
    out, inn = w.shape
    qmax = 2 ** bits - 1
    x = w.reshape(-1, gs)
    xmax = x.amax(-1, keepdim=True).clamp(min=0) * torch.sigmoid(gamma.reshape(-1, 1))
    xmin = x.amin(-1, keepdim=True).clamp(max=0) * torch.sigmoid(beta.reshape(-1, 1))
    scale = ((xmax - xmin) / qmax).clamp(min=1e-5, max=1e4)
    zero = (-xmin / scale).round().clamp(0, qmax)  # plain round: no gradient through z (as OmniQuant)
    zero = zero.detach()
    xi = (round_ste(x / scale) + zero).clamp(0, qmax)
    return ((xi - zero) * scale).reshape(out, inn)


class QLinear:
    def __init__(self, w, rank, alpha, bits, gs, gen):
        out, inn = w.shape
        self.w, self.bits, self.gs = w, bits, gs
        self.gamma = torch.full((out, inn // gs), 4.0, device=w.device, requires_grad=True)
        self.beta = torch.full((out, inn // gs), 4.0, device=w.device, requires_grad=True)
        bound = 1.0 / inn ** 0.5  # kaiming_uniform_(a=sqrt(5)), PEFT's default for A
        self.A = ((torch.rand(rank, inn, generator=gen, device=w.device) * 2 - 1) * bound).requires_grad_(True)
        self.B = torch.zeros(out, rank, device=w.device, requires_grad=True)
        self.s = alpha / rank

    def __call__(self, x, merged):
        q = lwc_fake_quant(self.w, self.gamma, self.beta, self.bits, self.gs)
        if merged:
            return F.linear(x, q + self.s * (self.B @ self.A))
        return F.linear(x, q) + self.s * F.linear(F.linear(x, self.A), self.B)


def block(x, p, lin, cos, sin, T, H, hd, merged):
    D = x.shape[-1]
    L = (lambda name, h: lin[name](h, merged)) if lin is not None else (lambda name, h: F.linear(h, p[name]))
    h = F.rms_norm(x, (D,), p["attn_norm"], eps=1e-5)
    q = rope_half(L("wq", h).view(1, T, H, hd), cos, sin)
    k = rope_half(L("wk", h).view(1, T, H, hd), cos, sin)
    v = L("wv", h).view(1, T, H, hd)
    a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    a = a.transpose(1, 2).reshape(T, H * hd)
    x2 = x + L("wo", a)
    h2 = F.rms_norm(x2, (D,), p["ffn_norm"], eps=1e-5)
    return x2 + L("w2", F.silu(L("w1", h2)) * L("w3", h2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the loss")
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument("--lora", default="peft", choices=["peft", "merged"])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--amp", default="off", choices=["off", "fp16", "bf16"],
                    help="autocast as ApiQ's calibrate.py (fp16 + GradScaler)")
    args = ap.parse_args()
    amp_dtype = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.amp]

    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    dev = "cuda"
    D, H, FF, T, N = 4096, 32, 11008, args.seq, args.samples
    hd = D // H
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, std=0.02):
        return (torch.rand(*shape, generator=g, device=dev) * 2 - 1) * (std * 3 ** 0.5)

    p = {"attn_norm": torch.ones(D, device=dev), "ffn_norm": torch.ones(D, device=dev),
         "wq": rnd(D, D), "wk": rnd(D, D), "wv": rnd(D, D), "wo": rnd(D, D),
         "w1": rnd(FF, D), "w3": rnd(FF, D), "w2": rnd(D, FF)}
    pos = torch.arange(T, device=dev, dtype=torch.float64)
    inv = 10000.0 ** (-torch.arange(0, hd, 2, device=dev, dtype=torch.float64) / hd)
    ang = torch.outer(pos, inv)
    cos = ang.cos().float()[None, :, None, :]
    sin = ang.sin().float()[None, :, None, :]
    X = rnd(N * T, D, std=1.0)
    Y = torch.empty_like(X)
    with torch.no_grad():
        for i in range(N):
            Y[i * T:(i + 1) * T] = block(X[i * T:(i + 1) * T], p, None, cos, sin, T, H, hd, False)
    if amp_dtype is not None:  # ApiQ keeps the cached block inputs/outputs in fp16
        X, Y = X.to(amp_dtype), Y.to(amp_dtype)
    torch.cuda.synchronize()

    def run(label, compiled):
        lin = {n: QLinear(p[n], 64, 16.0, 2, 64, g) for n in ["wq", "wk", "wv", "wo", "w1", "w3", "w2"]}
        clip = [t for m in lin.values() for t in (m.gamma, m.beta)]
        lora = [t for m in lin.values() for t in (m.A, m.B)]
        opt = torch.optim.AdamW([{"params": lora, "lr": 5e-4, "weight_decay": 0.1},
                                 {"params": clip, "lr": 5e-3, "weight_decay": 0.1}])

        def loss_fn(x, y):
            return F.mse_loss(block(x, p, lin, cos, sin, T, H, hd, args.lora == "merged"), y)

        fn = torch.compile(loss_fn) if compiled else loss_fn
        state = {"i": 0, "sum": torch.zeros((), device=dev)}
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

        def step():
            k = (state["i"] * 37 + 11) % N
            state["i"] += 1
            if amp_dtype is None:
                loss = fn(X[k * T:(k + 1) * T], Y[k * T:(k + 1) * T])
            else:
                with torch.autocast("cuda", dtype=amp_dtype):
                    loss = fn(X[k * T:(k + 1) * T], Y[k * T:(k + 1) * T])
            state["sum"] += loss.detach().float()
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        first = state["sum"].item() / max(args.warmup, 1)
        state["sum"].zero_()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated() / 2**30
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(args.steps):
            step()
        e.record()
        torch.cuda.synchronize()
        ms = s.elapsed_time(e) / args.steps
        peak = torch.cuda.max_memory_allocated() / 2**30
        block_s = ms * 1e-3 * N * args.epochs
        prec = "f32" if amp_dtype is None else f"autocast {args.amp}"
        print(f"torch {label} on {torch.cuda.get_device_name()} (torch {torch.__version__}), {prec}, TF32 "
              f"{'on' if args.tf32 else 'off'}, LoRA {args.lora}: {ms:.2f} ms/step ({args.steps} steps), "
              f"loss {first:.4e} -> {state['sum'].item() / args.steps:.4e}; per block {args.epochs} x {N} steps "
              f"= {block_s:.1f} s; peak {peak:.2f} GiB ({held:.2f} GiB held before the steps)")
        print(f"RESULT torch-{label} tf32={'on' if args.tf32 else 'off'} amp={args.amp} ms_per_step={ms:.3f} "
              f"block_seconds_{args.epochs}ep={block_s:.1f} peak_gib={peak:.3f} held_gib={held:.3f}", flush=True)
        del opt, lin

    if not args.no_eager:
        run("eager", False)
    if args.compile:
        try:
            run("compile", True)
        except Exception as ex:  # report and carry on: the eager number stands
            print(f"torch.compile failed: {type(ex).__name__}: {ex}")


if __name__ == "__main__":
    main()
