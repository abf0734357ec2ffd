#!/usr/bin/env python3
"""PyTorch reference for bench/bench_train_step.cpp: one training step of the Llama 110M shape
(llama2.c stories110M: dim 768, 12 layers, 12 heads, hidden 2048, vocab 32000, tied embeddings,
interleaved RoPE, RMSNorm eps 1e-5, SwiGLU, no biases) on random tokens: forward, f32
cross-entropy, backward, clip_grad_norm_(1.0), AdamW (betas 0.9/0.95, eps 1e-8, weight decay 0.1
on matrices, none on norms; PyTorch's default foreach implementation), loss.item() every step as
lowbit's trainer does.

Modes:
  f32            float32 everywhere (--tf32: TF32 tensor cores for matmuls, as lowbit --tf32)
  bf16-autocast  float32 parameters and AdamW, torch.autocast(bfloat16): the usual PyTorch recipe
                 (matmuls and attention in bf16; residual stream and norms stay f32)
  bf16-copies    lowbit's scheme: bf16 copies of the f32 masters each step, bf16 activations
                 everywhere (embedding lookup in f32), f32 logits for the loss, bf16 gradients cast
                 back and added into the f32 masters' gradients, AdamW on f32
Each mode prints the median step time (CUDA events), tokens/s and torch.cuda.max_memory_allocated
over the timed steps; --compile also times torch.compile of the model+loss (f32, bf16-autocast).

    python3 bench/torch_train_step_ref.py --modes f32,bf16-autocast,bf16-copies --tf32 --compile
"""
import argparse
import copy
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

D, L, H, FF, V = 768, 12, 12, 2048, 32000


def rope_tables(hd, T, dev):
    freqs = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.outer(torch.arange(T, dtype=torch.float64), freqs)
    return ang.cos().float().to(dev), ang.sin().float().to(dev)


def apply_rotary(x, cos, sin):  # x [B, T, H, hd], interleaved pairs as llama2.c
    xr, xi = x.float().reshape(x.shape[:-1] + (-1, 2)).unbind(-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([xr * c - xi * s, xr * s + xi * c], dim=-1).flatten(3).type_as(x)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn_norm = nn.Parameter(torch.ones(D))
        self.ffn_norm = nn.Parameter(torch.ones(D))
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.w1 = nn.Linear(D, FF, bias=False)
        self.w3 = nn.Linear(D, FF, bias=False)
        self.w2 = nn.Linear(FF, D, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        hd = D // H
        h = F.rms_norm(x, (D,), self.attn_norm, 1e-5)
        q = apply_rotary(self.wq(h).view(B, T, H, hd), cos, sin).transpose(1, 2)
        k = apply_rotary(self.wk(h).view(B, T, H, hd), cos, sin).transpose(1, 2)
        v = self.wv(h).view(B, T, H, hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + self.wo(a)
        h = F.rms_norm(x, (D,), self.ffn_norm, 1e-5)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Llama(nn.Module):
    def __init__(self, T):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.layers = nn.ModuleList(Block() for _ in range(L))
        self.norm = nn.Parameter(torch.ones(D))
        self.T = T
        # init as lowbit's init_weights: N(0, 0.02), wo and w2 scaled by 1/sqrt(2 L)
        for n, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)
                if n.endswith("wo.weight") or n.endswith("w2.weight"):
                    p.data /= (2 * L) ** 0.5

    def body(self, x, cos, sin):
        for blk in self.layers:
            x = blk(x, cos, sin)
        return F.linear(F.rms_norm(x, (D,), self.norm, 1e-5), self.tok.weight)

    def forward(self, idx, tgt, cos, sin):
        logits = self.body(self.tok(idx), cos, sin)
        return F.cross_entropy(logits.float().view(-1, V), tgt.view(-1))


def make_opt(model):
    ps = [p for p in model.parameters()]
    groups = [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=5e-4, betas=(0.9, 0.95), eps=1e-8)


def bench(mode, compile_, args):
    dev = "cuda"
    torch.manual_seed(0)
    B, T = args.batch, args.seq
    model = Llama(T).to(dev)
    opt = make_opt(model)
    cos, sin = rope_tables(D // H, T, dev)
    g = torch.Generator(device=dev).manual_seed(1)
    params = list(model.parameters())
    fwd = torch.compile(model) if compile_ else model
    if mode == "bf16-copies":
        copy_model = copy.deepcopy(model).to(torch.bfloat16)
        cparams = list(copy_model.parameters())

    def step():
        idx = torch.randint(0, V, (B, T), device=dev, generator=g)
        tgt = torch.randint(0, V, (B, T), device=dev, generator=g)
        opt.zero_grad(set_to_none=True)
        if mode == "bf16-copies":
            with torch.no_grad():
                torch._foreach_copy_(cparams, params)
            for p in cparams:
                p.grad = None
            x = model.tok(idx).to(torch.bfloat16)
            logits = copy_model.body(x, cos, sin)
            loss = F.cross_entropy(logits.float().view(-1, V), tgt.view(-1))
        else:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=(mode == "bf16-autocast")):
                loss = fwd(idx, tgt, cos, sin)
        lv = loss.item()
        loss.backward()
        if mode == "bf16-copies":
            with torch.no_grad():
                for p, c in zip(params, cparams):
                    if c.grad is None:
                        continue
                    if p.grad is None:
                        p.grad = c.grad.float()
                    else:
                        p.grad += c.grad.float()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return lv

    t0 = time.time()
    for _ in range(args.warmup):
        lv = step()
    torch.cuda.synchronize()
    warm_s = time.time() - t0
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        lv = step()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30
    label = ("compile" if compile_ else "eager")
    tf = " tf32" if (mode == "f32" and args.tf32) else ""
    print(f"torch {label} {mode}{tf} 110M train step on {torch.cuda.get_device_name()} (torch {torch.__version__}): "
          f"batch {B} x seq {T}: median {med:.2f} ms (min {min(times):.2f}, max {max(times):.2f}), "
          f"{B * T / (med * 1e-3):.0f} tokens/s, peak {peak:.3f} GiB, warm-up {warm_s:.1f}s, last loss {lv:.4f}")
    m = mode + ("-tf32" if tf else "")
    print(f"RESULT torch-{label} {m} median_ms={med:.3f} tokens_per_s={B * T / (med * 1e-3):.0f} peak_gib={peak:.3f}",
          flush=True)
    del model, opt
    if mode == "bf16-copies":
        del copy_model
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="f32,bf16-autocast,bf16-copies")
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (f32, bf16-autocast)")
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    modes = args.modes.split(",")
    if not args.compile_only:
        for m in modes:
            bench(m, False, args)
    if args.compile or args.compile_only:
        for m in modes:
            if m == "bf16-copies":
                continue
            try:
                bench(m, True, args)
            except Exception as ex:  # the eager numbers stand
                print(f"torch.compile {m} failed: {type(ex).__name__}: {str(ex)[:300]}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
