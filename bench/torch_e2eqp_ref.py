#!/usr/bin/env python3
"""PyTorch reference for bench/bench_e2eqp.cpp: one EfficientQAT E2E-QP step (Chen et al. 2024, arXiv
2407.11062, section 3.3) of a Llama-2-7B-shaped stack, and the same step with LLM-QAT's distillation
loss, written the way EfficientQAT's code runs E2E-QP:

  * every block linear: frozen integer codes q (uint8 buffer), frozen zero points z and trainable
    per-group step sizes s (f32) of --format (int2g64: 2 bits, groups of 64 along `in`);
    w = (q - z) * s per group (EfficientQAT's QuantLinear with the scales trained and the zeros
    frozen); y = x w^T.
  * Llama blocks: RMSNorm (eps 1e-5), RoPE (Hugging Face half layout, theta 1e4), causal SDPA
    attention, SwiGLU; embeddings, norms and the (untied) head frozen.
  * loss: next-token cross-entropy (step "lm"), or KL(P_teacher || P_student) to the logits of the
    full-precision model (step "distill", the teacher forward without gradient inside the step),
    mean over tokens.
  * AdamW (lr 1e-4, weight decay 0, the steps only), gradient clipping at 1, warmup + cosine scale
    as lowbit's trainer; --amp bf16: the step under torch.autocast(bf16) (EfficientQAT trains with
    --bf16), f32 parameters.

Modes: eager, and torch.compile of the student block, the teacher block and the two losses (one
graph each, reused across layers; the optimizer stays eager). Prints ms/step (CUDA events over --steps
steps after --warmup) and torch.cuda.max_memory_allocated over the timed steps, for each mode and step:

    python3 bench/torch_e2eqp_ref.py --amp bf16 --tf32 --modes eager,compile     # on the GPU

Random weights (uniform, std 0.02; the codes a round-to-nearest min-max encoding) by default. --init FILE
reads a model and a batch written by `bench_e2eqp --dump FILE` instead, checks that the first step's LM
and distillation losses equal lowbit's (exit 1 beyond --tol) and, with --fixed-batch, trains on that
batch; when lowbit's dump came from a --fixed-batch run with the same --warmup, --steps and --lr, the
last step's losses (the end of the same 2-block training trajectory) are compared too. Runs on the CPU too
(--device cpu, f32): the tiny-shape check of the docs (docs/results/qat-7b-step.md).
"""
import argparse
import json
import math
import struct
import sys
import time

import torch
import torch.nn.functional as F

_DT = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16,
       "U8": torch.uint8, "I8": torch.int8, "I32": torch.int32, "I64": torch.int64}


def load_safetensors(path):
    """A minimal safetensors reader (the GPU machine has no pip): tensors and __metadata__."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = bytearray(f.read())
    meta = header.pop("__metadata__", {}) or {}
    out = {}
    for name, v in header.items():
        b, e = v["data_offsets"]
        dt = _DT[v["dtype"]]
        t = torch.frombuffer(data[b:e], dtype=dt) if e > b else torch.empty(0, dtype=dt)
        out[name] = t.reshape(v["shape"]).clone()
    return out, meta


def warmup_cosine(step, warmup, total, min_ratio):  # lowbit's trainer schedule (autograd/optim.cpp)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    t = min((step - warmup) / (total - warmup), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def rope_half(x, cos, sin):
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


NAMES = ["wq", "wk", "wv", "wo", "w1", "w3", "w2"]  # q, k, v, o, gate, up, down
HF = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
      "w1": "mlp.gate_proj", "w3": "mlp.up_proj", "w2": "mlp.down_proj"}


def block(x, W, attn_norm, ffn_norm, cos, sin, B, T, H, eps):
    """One Llama block on x [B*T, D] with the seven weights W (a list in NAMES order)."""
    D = x.shape[-1]
    hd = D // H
    wq, wk, wv, wo, w1, w3, w2 = W
    h = F.rms_norm(x, (D,), attn_norm, eps=eps)
    q = rope_half(F.linear(h, wq).view(B, T, H, hd), cos, sin)
    k = rope_half(F.linear(h, wk).view(B, T, H, hd), cos, sin)
    v = F.linear(h, wv).view(B, T, H, hd)
    a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    x2 = x + F.linear(a.transpose(1, 2).reshape(B * T, D), wo)
    h2 = F.rms_norm(x2, (D,), ffn_norm, eps=eps)
    return x2 + F.linear(F.silu(F.linear(h2, w1)) * F.linear(h2, w3), w2)


def dequant(q, z, s):
    """w = (q - z) * s per group; q uint8 [out, in], z and s [out, G]."""
    out, inn = q.shape
    G = s.shape[1]
    return ((q.view(out, G, inn // G).float() - z.unsqueeze(-1)) * s.unsqueeze(-1)).view(out, inn)


def student_block(x, qs, zs, ss, attn_norm, ffn_norm, cos, sin, B: int, T: int, H: int, eps: float):
    return block(x, [dequant(q, z, s) for q, z, s in zip(qs, zs, ss)], attn_norm, ffn_norm, cos, sin, B, T, H, eps)


def teacher_block(x, ws, attn_norm, ffn_norm, cos, sin, B: int, T: int, H: int, eps: float):
    return block(x, ws, attn_norm, ffn_norm, cos, sin, B, T, H, eps)


def head(x, final_norm, out_w, eps: float):
    return F.linear(F.rms_norm(x, (x.shape[-1],), final_norm, eps=eps), out_w)


def lm_loss(x, final_norm, out_w, tgt, eps: float):
    return F.cross_entropy(head(x, final_norm, out_w, eps).float(), tgt)


def kl_loss(x, final_norm, out_w, teacher_logits, eps: float):
    logq = F.log_softmax(head(x, final_norm, out_w, eps).float(), dim=-1)
    logp = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(logq, logp, log_target=True, reduction="batchmean")


def rtn(w, bits, gs):
    """Round-to-nearest min-max asymmetric encoding (lowbit's int formats: the range includes 0)."""
    out, inn = w.shape
    qmax = 2 ** bits - 1
    x = w.view(out, inn // gs, gs)
    hi = x.amax(-1).clamp(min=0)
    lo = x.amin(-1).clamp(max=0)
    s = ((hi - lo) / qmax).clamp(min=1e-8)
    z = torch.round(-lo / s)
    q = torch.clamp(torch.round(x / s.unsqueeze(-1)) + z.unsqueeze(-1), 0, qmax).to(torch.uint8)
    return q.view(out, inn), z, s


def parse_format(name):
    # intBgG (asymmetric), the formats E2E-QP trains in lowbit's table.
    assert name.startswith("int") and "g" in name and not name.endswith("s"), f"format {name}: use intBgG"
    b, g = name[3:].split("g")
    return int(b), int(g)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--modes", default="eager,compile", help="comma list of eager, compile")
    ap.add_argument("--steps-kind", default="lm,distill", help="comma list of lm, distill")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--format", default="int2g64")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--amp", default="off", choices=["off", "bf16"])
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--init", help="a file written by bench_e2eqp --dump (model, batch, lowbit's first losses)")
    ap.add_argument("--fixed-batch", action="store_true", help="every step on the first batch (with --init: lowbit's)")
    ap.add_argument("--tol", type=float, default=1e-4, help="--init: relative tolerance of the first losses")
    args = ap.parse_args()
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (gpu and args.amp == "bf16") else None
    bits, gs = parse_format(args.format)
    eps = 1e-5
    t_setup = time.perf_counter()
    # ---- the model: fp weights (teacher), codes / zeros / steps (student) ----
    g = torch.Generator(device=dev).manual_seed(0)
    fixed = None
    lowbit_loss, lowbit_last = {}, {}
    if args.init:
        ts, meta = load_safetensors(args.init)
        L = sum(1 for k in ts if k.endswith(".input_layernorm.weight"))
        emb = ts["fp.model.embed_tokens.weight"].to(dev)
        final_norm = ts["fp.model.norm.weight"].to(dev)
        out_w = ts["fp.lm_head.weight"].to(dev)
        V, D = emb.shape
        fp, norms, codes = [], [], []
        for i in range(L):
            p = f"fp.model.layers.{i}."
            fp.append([ts[p + HF[n] + ".weight"].to(dev) for n in NAMES])
            norms.append((ts[p + "input_layernorm.weight"].to(dev), ts[p + "post_attention_layernorm.weight"].to(dev)))
            sp = f"student.layers.{i}."
            codes.append([(ts[sp + HF[n] + ".q"].to(dev), ts[sp + HF[n] + ".zero"].to(dev),
                           ts[sp + HF[n] + ".step"].to(dev)) for n in NAMES])
        fixed = (ts["batch.in"].to(dev).long(), ts["batch.tgt"].to(dev).long())
        B, T = fixed[0].shape
        H = int(meta["config"].split()[3])
        for k, v in meta.items():
            if k.startswith("loss_") and k.endswith("_step0"):
                lowbit_loss[k[len("loss_"):-len("_step0")]] = float(v)
        # lowbit's last loss of a --fixed-batch run with these settings (the same trajectory)
        wu, st_, lr_, fb = meta.get("run", "0 0 0 0").split()
        same_run = args.fixed_batch and fb == "1" and (int(wu), int(st_)) == (args.warmup, args.steps) and \
            abs(float(lr_) - args.lr) <= 1e-12 * max(1.0, args.lr)
        lowbit_last = {k[len("loss_"):-len("_last")]: float(v) for k, v in meta.items()
                       if same_run and k.startswith("loss_") and k.endswith("_last")}
    else:
        L, D, FF, V, H, B, T = args.layers, args.dim, args.hidden, args.vocab, args.heads, args.batch, args.seq

        def rnd(*shape):  # uniform, std 0.02 (as the C++ benchmark's fast_random)
            return (torch.rand(*shape, generator=g, device=dev) * 2 - 1) * (0.02 * 3 ** 0.5)

        emb, out_w, final_norm = rnd(V, D), rnd(V, D), torch.ones(D, device=dev)
        fp, norms, codes = [], [], []
        for _ in range(L):
            ws = [rnd(D, D), rnd(D, D), rnd(D, D), rnd(D, D), rnd(FF, D), rnd(FF, D), rnd(D, FF)]
            fp.append(ws)
            norms.append((torch.ones(D, device=dev), torch.ones(D, device=dev)))
            codes.append([rtn(w, bits, gs) for w in ws])
    hd = D // H
    pos = torch.arange(T, device=dev, dtype=torch.float64)
    inv = 10000.0 ** (-torch.arange(0, hd, 2, device=dev, dtype=torch.float64) / hd)
    ang = torch.outer(pos, inv)
    cos = ang.cos().float()[None, :, None, :]
    sin = ang.sin().float()[None, :, None, :]
    if gpu:
        torch.cuda.synchronize()
    setup_s = time.perf_counter() - t_setup
    name = torch.cuda.get_device_name() if gpu else "the CPU"
    print(f"torch_e2eqp_ref on {name} (torch {torch.__version__}): {L} blocks of dim {D}, {H} heads, vocab {V}, "
          f"{args.format}, batch {B} x {T} tokens, amp {args.amp}, TF32 {'on' if args.tf32 else 'off'}; "
          f"setup {setup_s:.1f} s", flush=True)

    def batch(i):
        if args.fixed_batch or (fixed is not None and i == 0):
            if fixed is None:
                return batch_random(0)
            return fixed
        return batch_random(i)

    def batch_random(i):
        gb = torch.Generator(device=dev).manual_seed(1000 + i)
        ids = torch.randint(0, V, (B, T + 1), generator=gb, device=dev)
        return ids[:, :T], ids[:, 1:].reshape(-1)

    rc = 0
    for mode in args.modes.split(","):
        compiled = mode == "compile"
        sb = torch.compile(student_block) if compiled else student_block
        tb = torch.compile(teacher_block) if compiled else teacher_block
        lm = torch.compile(lm_loss) if compiled else lm_loss
        kl = torch.compile(kl_loss) if compiled else kl_loss
        for kind in args.steps_kind.split(","):
            distill = kind == "distill"
            # Fresh steps and optimizer per (mode, kind): each starts from the same model.
            steps = [[s.clone().requires_grad_(True) for (_, _, s) in layer] for layer in codes]
            params = [s for layer in steps for s in layer]
            opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
            total = args.warmup + args.steps

            def objective(inp, tgt):
                x = emb[inp.reshape(-1)]
                tl = None
                if distill:
                    with torch.no_grad():
                        xt = x
                        for i in range(L):
                            xt = tb(xt, fp[i], norms[i][0], norms[i][1], cos, sin, B, T, H, eps)
                        tl = head(xt, final_norm, out_w, eps)
                for i in range(L):
                    x = sb(x, [c[0] for c in codes[i]], [c[1] for c in codes[i]], steps[i], norms[i][0], norms[i][1],
                           cos, sin, B, T, H, eps)
                return kl(x, final_norm, out_w, tl, eps) if distill else lm(x, final_norm, out_w, tgt, eps)

            if fixed is not None and kind in lowbit_loss and mode == "eager":
                with torch.no_grad():
                    v = objective(*fixed).item()
                ref = lowbit_loss[kind]
                rel = abs(v - ref) / max(abs(ref), 1e-12)
                ok = rel <= args.tol
                print(f"  first-step {kind} loss: torch {v:.9g}, lowbit {ref:.9g}, relative difference {rel:.2e} "
                      f"({'ok' if ok else 'FAIL'}, tolerance {args.tol:g})", flush=True)
                if not ok:
                    rc = 1
            losses = []

            def step(i):
                inp, tgt = batch(i)
                if amp is not None:
                    with amp:
                        loss = objective(inp, tgt)
                else:
                    loss = objective(inp, tgt)
                losses.append(loss.detach())
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                for grp in opt.param_groups:
                    grp["lr"] = args.lr * warmup_cosine(i, 0, total, 0.1)
                opt.step()
                opt.zero_grad(set_to_none=True)

            t0 = time.perf_counter()
            for i in range(args.warmup):
                step(i)
            if gpu:
                torch.cuda.synchronize()
                warm_s = time.perf_counter() - t0
                torch.cuda.reset_peak_memory_stats()
                held = torch.cuda.memory_allocated() / 2**30
                ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                ev0.record()
            else:
                warm_s = time.perf_counter() - t0
                held = 0.0
                t1 = time.perf_counter()
            for i in range(args.warmup, total):
                step(i)
            if gpu:
                ev1.record()
                torch.cuda.synchronize()
                ms = ev0.elapsed_time(ev1) / args.steps
                peak = torch.cuda.max_memory_allocated() / 2**30
            else:
                ms = (time.perf_counter() - t1) * 1e3 / args.steps
                peak = 0.0
            first, last = losses[0].item(), losses[-1].item()
            if kind in lowbit_last:
                ref = lowbit_last[kind]
                rel = abs(last - ref) / max(abs(ref), 1e-12)
                ok = rel <= args.tol
                print(f"  {mode} {kind}, last step of the fixed-batch trajectory: torch {last:.9g}, lowbit {ref:.9g}, "
                      f"relative difference {rel:.2e} ({'ok' if ok else 'FAIL'})", flush=True)
                if not ok:
                    rc = 1
            print(f"  {mode} {kind}: {ms:.2f} ms/step (mean of {args.steps} steps after {args.warmup} warm-up, "
                  f"warm-up {warm_s:.1f} s), loss {first:.4f} (step 1) -> {last:.4f} (step {total}); peak "
                  f"{peak:.2f} GiB ({held:.2f} GiB held before the steps)")
            print(f"RESULT torch-{mode} step={kind} layers={L} batch={B} seq={T} tf32={'on' if args.tf32 else 'off'} "
                  f"amp={args.amp} ms_per_step={ms:.3f} peak_gib={peak:.3f} held_gib={held:.3f} "
                  f"loss_first={first:.6f} loss_last={last:.6f}", flush=True)
            del opt, steps, params, losses
    return rc


if __name__ == "__main__":
    sys.exit(main())
