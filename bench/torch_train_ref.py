#!/usr/bin/env python3
"""PyTorch reference for `lowbit train`: the same model, data order and hyperparameters.

A plain PyTorch Llama (llama2.c's model.py architecture: RMSNorm eps 1e-5, interleaved RoPE with
theta 10000, SwiGLU, tied input/output embeddings, no biases), initialised as lowbit's
`init_weights` (N(0, 0.02); wo and w2 scaled by 1/sqrt(2 n_layers); norms 1; a different RNG),
trained with AdamW in two parameter groups (weight decay on >= 2-D tensors, none on the norms),
betas (0.9, 0.95), eps 1e-8, global gradient clipping, linear warmup + cosine decay exactly as
`warmup_cosine` in src/lowbit/autograd/optim.cpp, and gradient accumulation as lowbit (the
micro-batch losses scaled by 1/grad_accum).

It consumes the files a `lowbit train` run writes into its run directory:
  train.tokens, valid.tokens   raw little-endian int32 token ids (lowbit's tokenization)
  order.i64                    the data order from `lowbit train --dump-order` (header, then the
                               window starts of every step and micro-batch, then the validation
                               windows; see write_data_order in src/lowbit/train/trainer.h)
so every optimizer step sees exactly the windows lowbit used, and validation uses the same windows.
With --init-from MODEL.bin (the llama2.c file `lowbit train --steps 0` writes: lowbit's initial
weights for the same --seed and shape) it starts from lowbit's exact weights; in f32 on the CPU the
two runs then agree to ~1e-7 relative (docs/results/train-stories15m.md).

Precision: float32 parameters and arithmetic; with --tf32 (GPU only) matrix products use TF32
tensor cores, as `lowbit train --tf32` does.

Writes OUT/log.jsonl with lowbit's keys (step, loss, lr, grad_norm, tokens_per_second, val_loss)
and prints a JSON summary; with --lowbit-log it also compares the validation losses of the two runs.

  python3 bench/torch_train_ref.py --run-dir RUN --out RUN/torch --device cuda --tf32 \
      --lr 1e-3 --warmup 100 --lowbit-log RUN/log.jsonl
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MAGIC = int.from_bytes(b"LBTORDR1", "little")


# ---- data --------------------------------------------------------------------------------------
def read_order(path):
    raw = np.fromfile(path, dtype="<i8")
    if raw.size < 9 or int(raw[0]) != MAGIC:
        sys.exit(f"{path}: not a lowbit data-order file (bad magic)")
    steps, accum, batch, seq, eval_batches, n_train, n_val, seed = (int(x) for x in raw[1:9])
    n_tr = steps * accum * batch
    n_va = eval_batches * batch if n_val > 0 else 0
    if raw.size != 9 + n_tr + n_va:
        sys.exit(f"{path}: {raw.size} values, expected {9 + n_tr + n_va}")
    return dict(steps=steps, grad_accum=accum, batch=batch, seq_len=seq, eval_batches=eval_batches,
                n_train=n_train, n_val=n_val, seed=seed,
                train=raw[9:9 + n_tr].reshape(steps, accum, batch),
                val=raw[9 + n_tr:].reshape(eval_batches, batch) if n_va else None)


def read_tokens(path):
    return np.fromfile(path, dtype="<i4")


def gather(stream, starts, T):
    """stream: 1-D int64 tensor on the device; starts: [B] int64 tensor -> inputs, targets [B, T]."""
    idx = starts[:, None] + torch.arange(T + 1, device=stream.device)[None, :]
    w = stream[idx]
    return w[:, :-1], w[:, 1:]


# ---- model (llama2.c model.py, without dropout) ------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def precompute_freqs(head_dim, end, theta):
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    t = torch.arange(end, dtype=torch.float32)
    f = torch.outer(t, freqs)
    return torch.cos(f), torch.sin(f)


def apply_rotary(x, cos, sin):
    # x: [B, T, H, hd]; interleaved pairs (x[2i], x[2i+1]) as llama2.c / Meta.
    xr, xi = x.float().reshape(x.shape[:-1] + (-1, 2)).unbind(-1)
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    out_r = xr * cos - xi * sin
    out_i = xr * sin + xi * cos
    return torch.stack([out_r, out_i], dim=-1).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.h, self.kvh = a.n_heads, a.n_kv_heads
        self.hd = a.dim // a.n_heads
        self.wq = nn.Linear(a.dim, self.h * self.hd, bias=False)
        self.wk = nn.Linear(a.dim, self.kvh * self.hd, bias=False)
        self.wv = nn.Linear(a.dim, self.kvh * self.hd, bias=False)
        self.wo = nn.Linear(self.h * self.hd, a.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.h, self.hd)
        k = self.wk(x).view(B, T, self.kvh, self.hd)
        v = self.wv(x).view(B, T, self.kvh, self.hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.kvh != self.h:
            k = k.repeat_interleave(self.h // self.kvh, dim=2)
            v = v.repeat_interleave(self.h // self.kvh, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(o.transpose(1, 2).contiguous().view(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.w1 = nn.Linear(a.dim, a.hidden_dim, bias=False)  # gate (lowbit w_gate)
        self.w2 = nn.Linear(a.hidden_dim, a.dim, bias=False)  # down (lowbit w_down)
        self.w3 = nn.Linear(a.dim, a.hidden_dim, bias=False)  # up   (lowbit w_up)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.attention = Attention(a)
        self.feed_forward = FeedForward(a)
        self.attention_norm = RMSNorm(a.dim, a.norm_eps)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.tok_embeddings = nn.Embedding(a.vocab, a.dim)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.output = nn.Linear(a.dim, a.vocab, bias=False)
        self.output.weight = self.tok_embeddings.weight  # tied
        cos, sin = precompute_freqs(a.dim // a.n_heads, a.max_seq_len, a.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # lowbit init_weights: N(0, 0.02) everywhere, wo/w2 times 1/sqrt(2 L), norms 1.
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * a.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, tokens, targets):
        T = tokens.shape[1]
        x = self.tok_embeddings(tokens)
        cos, sin = self.cos[:T], self.sin[:T]
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.output(self.norm(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def load_llama2c_into(model, path, a):
    """Copies the weights of a llama2.c .bin (as `lowbit train --steps 0` writes the initial ones)."""
    hdr = np.fromfile(path, dtype="<i4", count=7)
    dim, hidden, L, H, KVH, vocab, seq = (int(x) for x in hdr)
    if (dim, hidden, L, H, KVH, abs(vocab)) != (a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab):
        sys.exit(f"{path}: shape {(dim, hidden, L, H, KVH, vocab)} does not match the model")
    if vocab < 0:
        sys.exit(f"{path}: untied classifier not supported")
    w = np.fromfile(path, dtype="<f4", offset=28)
    hd = dim // H
    off = 0

    def take(*shape):
        nonlocal off
        n = int(np.prod(shape))
        t = torch.from_numpy(w[off:off + n].copy()).view(*shape)
        off += n
        return t

    sd = {"tok_embeddings.weight": take(abs(vocab), dim)}
    for name, shape in [("attention_norm.weight", (dim,)), ("attention.wq.weight", (H * hd, dim)),
                        ("attention.wk.weight", (KVH * hd, dim)), ("attention.wv.weight", (KVH * hd, dim)),
                        ("attention.wo.weight", (dim, H * hd)), ("ffn_norm.weight", (dim,)),
                        ("feed_forward.w1.weight", (hidden, dim)), ("feed_forward.w2.weight", (dim, hidden)),
                        ("feed_forward.w3.weight", (hidden, dim))]:
        for i in range(L):
            sd[f"layers.{i}.{name}"] = take(*shape)
    sd["norm.weight"] = take(dim)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in sd:
                v.copy_(sd[k])
            elif k != "output.weight":
                sys.exit(f"{path}: no tensor for {k}")


# ---- schedule (src/lowbit/autograd/optim.cpp warmup_cosine) --------------------------------------
def warmup_cosine(step, warmup, total, min_ratio):
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    t = min((step - warmup) / (total - warmup), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="lowbit run directory (train.tokens, valid.tokens, order)")
    ap.add_argument("--order", help="data order file (default RUN/order.i64)")
    ap.add_argument("--train-tokens", help="default RUN/train.tokens")
    ap.add_argument("--valid-tokens", help="default RUN/valid.tokens")
    ap.add_argument("--out", required=True, help="output directory (log.jsonl, summary.json)")
    ap.add_argument("--config", help="HF config.json for the architecture (default RUN/hf/config.json if present)")
    ap.add_argument("--dim", type=int, default=288)
    ap.add_argument("--hidden-dim", type=int, default=768)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1, help="torch RNG seed for the initial weights")
    ap.add_argument("--init-from", help="llama2.c .bin with the initial weights (e.g. `lowbit train --steps 0`) "
                    "instead of a fresh torch initialisation")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tf32", action="store_true", help="TF32 matrix products on the GPU")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    ap.add_argument("--lowbit-log", help="lowbit's log.jsonl: compare validation losses")
    ap.add_argument("--tolerance", type=float, default=0.02, help="relative val-loss tolerance for the comparison")
    a = ap.parse_args()

    run = a.run_dir
    order = read_order(a.order or os.path.join(run, "order.i64"))
    train = read_tokens(a.train_tokens or os.path.join(run, "train.tokens"))
    valid = read_tokens(a.valid_tokens or os.path.join(run, "valid.tokens"))
    if train.size != order["n_train"] or valid.size != order["n_val"]:
        sys.exit(f"token files ({train.size}, {valid.size}) do not match the order file "
                 f"({order['n_train']}, {order['n_val']})")

    cfg_path = a.config or os.path.join(run, "hf", "config.json")
    if os.path.exists(cfg_path):
        c = json.load(open(cfg_path))
        a.dim, a.hidden_dim = c["hidden_size"], c["intermediate_size"]
        a.layers, a.heads = c["num_hidden_layers"], c["num_attention_heads"]
        a.kv_heads, a.vocab = c.get("num_key_value_heads", a.heads), c["vocab_size"]
        a.max_seq_len = c.get("max_position_embeddings", a.max_seq_len)
        if not c.get("tie_word_embeddings", True):
            sys.exit(f"{cfg_path}: untied embeddings are not supported by this reference")
    a.n_layers, a.n_heads = a.layers, a.heads
    a.n_kv_heads = a.kv_heads or a.heads
    a.norm_eps, a.rope_theta = 1e-5, 10000.0
    T, B, accum, steps = order["seq_len"], order["batch"], order["grad_accum"], order["steps"]
    a.max_seq_len = max(a.max_seq_len, T)
    if int(max(train.max(), valid.max())) >= a.vocab:
        sys.exit("token ids exceed the vocabulary")

    dev = torch.device(a.device)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = a.tf32
        torch.backends.cudnn.allow_tf32 = a.tf32
    elif a.tf32:
        sys.exit("--tf32 needs --device cuda")
    torch.manual_seed(a.seed)
    model = Transformer(a)
    if a.init_from:
        load_llama2c_into(model, a.init_from, a)
    model = model.to(dev)
    n_params = sum(p.numel() for p in model.parameters())

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    params = decay + no_decay
    opt_kw = dict(lr=a.lr, betas=(a.beta1, a.beta2), eps=1e-8)
    if dev.type == "cuda":
        opt_kw["fused"] = True
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], **opt_kw)

    train_t = torch.from_numpy(train.astype(np.int64)).to(dev)
    valid_t = torch.from_numpy(valid.astype(np.int64)).to(dev)
    order_train = torch.from_numpy(order["train"]).to(dev)
    order_val = torch.from_numpy(order["val"]).to(dev) if order["val"] is not None else None

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def validation_loss():
        model.eval()
        total = 0.0
        for k in range(order["eval_batches"]):
            x, y = gather(valid_t, order_val[k], T)
            total += model(x, y).item()
        model.train()
        return total / order["eval_batches"]

    os.makedirs(a.out, exist_ok=True)
    log = open(os.path.join(a.out, "log.jsonl"), "w")
    records = []
    train_seconds = 0.0
    model.train()
    for step in range(steps):
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for m in range(accum):
            x, y = gather(train_t, order_train[step, m], T)
            loss = model(x, y)
            loss_sum += loss.item()
            (loss / accum if accum > 1 else loss).backward()
        gn = torch.nn.utils.clip_grad_norm_(params, a.grad_clip if a.grad_clip > 0 else float("inf"))
        scale = warmup_cosine(step, a.warmup, steps, a.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = a.lr * scale
        opt.step()
        sync()
        dt = time.perf_counter() - t0
        train_seconds += dt
        rec = {"step": step + 1, "loss": loss_sum / accum, "lr": a.lr * scale, "grad_norm": float(gn),
               "tokens_per_second": B * T * accum / max(dt, 1e-9)}
        if not math.isfinite(rec["loss"]):
            sys.exit(f"diverged at step {step + 1}")
        last = step + 1 == steps
        if order_val is not None and (last or (a.eval_every > 0 and (step + 1) % a.eval_every == 0)):
            rec["val_loss"] = validation_loss()
            print(f"step {step + 1}  loss {rec['loss']:.4f}  val_loss {rec['val_loss']:.4f}  lr {rec['lr']:.2e}  "
                  f"{rec['tokens_per_second']:.0f} tok/s", file=sys.stderr, flush=True)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        records.append(rec)

    vals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    summary = {
        "impl": "pytorch", "torch": torch.__version__, "device": a.device,
        "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None, "tf32": a.tf32,
        "init": a.init_from or f"torch.manual_seed({a.seed})", "params": n_params, "steps": steps, "batch": B, "seq_len": T, "grad_accum": accum,
        "lr": a.lr, "warmup": a.warmup, "min_lr_ratio": a.min_lr_ratio, "weight_decay": a.weight_decay,
        "final_train_loss": records[-1]["loss"] if records else None,
        "final_val_loss": vals[-1][1] if vals else None,
        "train_seconds": train_seconds,
        "tokens_per_second": steps * B * T * accum / train_seconds if train_seconds > 0 else None,
        "val_curve": vals,
    }
    if a.lowbit_log:
        lb = {}
        for line in open(a.lowbit_log):
            j = json.loads(line)
            if "val_loss" in j:
                lb[j["step"]] = j["val_loss"]
        cmp = [{"step": s, "lowbit": lb[s], "torch": v, "rel_diff": (lb[s] - v) / v} for s, v in vals if s in lb]
        summary["comparison"] = cmp
        if cmp:
            summary["final_rel_diff"] = cmp[-1]["rel_diff"]
            summary["max_abs_rel_diff"] = max(abs(c["rel_diff"]) for c in cmp)
            summary["within_tolerance"] = abs(cmp[-1]["rel_diff"]) <= a.tolerance
            summary["tolerance"] = a.tolerance
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
