#!/usr/bin/env python3
"""Load a GPTQ / AWQ safetensors directory written by `lowbit export --layout gptq|awq` in Hugging Face
transformers (GPTQ/AWQ kernels from GPT-QModel, CPU) and compare its logits with lowbit's on the same
token windows.

usage: hf_load_export.py --tokens TOKENS.i32 --ctx N [--windows W] [--dtype float32|bfloat16|float16]
           [--backend torch] [--awq-backend torch_awq] [--json OUT.jsonl]
           --case LABEL EXPORT_DIR LOWBIT_LOGITS.f32 LOWBIT_F16_LOGITS.f32 [--case ...]

TOKENS.i32: the raw int32 token stream lowbit read; LOWBIT_LOGITS.f32: what
`lowbit eval ppl -m QUANTIZED_DIR --tokens TOKENS.i32 --ctx N --max-windows W --dequantize --logits-out FILE`
wrote (f32 [W, N, vocab]); LOWBIT_F16_LOGITS.f32 (or '-'): the same on `lowbit convert --dtype f16` of
QUANTIZED_DIR (the weights rounded to f16, as the exported file and GPT-QModel's torch kernels hold
them), LOWBIT_F16_DIR (or '-') that converted directory: every packed layer's weight as the kernel
dequantizes it is compared with it bit for bit. Each window is one transformers forward of N tokens. Prints one line per case: max and mean
|logit diff| and argmax agreement against each lowbit reference, and the perplexities of the same
predictions (every position but each window's last). A case that fails to load is reported, and
the exit status is 1.
"""
import argparse
import json
import math
import sys
import time

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", nargs=5, action="append", required=True,
                    metavar=("LABEL", "EXPORT_DIR", "LOWBIT_LOGITS", "LOWBIT_F16_LOGITS", "LOWBIT_F16_DIR"),
                    help="LOWBIT_F16_LOGITS and LOWBIT_F16_DIR may be '-'")
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--ctx", type=int, required=True)
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto (the checkpoint's)")
    ap.add_argument("--backend", default="torch",
                    help="GPTQ: transformers' GPTQConfig backend (GPT-QModel's), or 'default' for none")
    ap.add_argument("--awq-backend", default="torch_awq", help="AWQ: transformers' AwqConfig backend, or 'default'")
    ap.add_argument("--json", default="", help="append one JSON object a line per case")
    a = ap.parse_args()
    failed = 0
    for label, export_dir, lb, lb16, dense16 in a.case:
        try:
            run_case(a, label, export_dir, lb, "" if lb16 == "-" else lb16, "" if dense16 == "-" else dense16)
        except Exception as e:  # report and go on with the next case
            failed += 1
            print(f"{label}: FAILED to load/run in transformers: {type(e).__name__}: {e}", flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps({"label": label, "error": f"{type(e).__name__}: {e}"}) + "\n")
    sys.exit(1 if failed else 0)


def backend_weights_vs(model, method, dense_dir):
    """Each packed layer's weight as the GPT-QModel kernel dequantizes it ([in, out], f16) against
    lowbit's f16 weight of the same layer (`lowbit convert --dtype f16`, [out, in]): the number of
    layers that agree bit for bit, and the largest |difference| over all of them."""
    from safetensors import safe_open
    if method == "awq":
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
    exact = total = 0
    worst = 0.0
    with safe_open(dense_dir + "/model.safetensors", "pt") as f:
        for name, m in model.named_modules():
            if not hasattr(m, "qweight"):
                continue
            if method == "awq":
                w = dequantize_gemm(m.qweight, m.qzeros, m.scales, m.bits, m.group_size)
            else:
                w = m.dequantize_weight()
            ref = f.get_tensor(name + ".weight")
            w = w.t()  # both kernels dequantize to [in, out]
            if w.shape != ref.shape:
                raise ValueError(f"{name}: kernel weight {tuple(w.shape)} vs lowbit {tuple(ref.shape)}")
            d = (w.float() - ref.float()).abs().max().item()
            total += 1
            exact += int(d == 0.0)
            worst = max(worst, d)
    return {"layers": total, "bit_exact": exact, "max_abs_diff": worst}


def run_case(a, label, export_dir, lowbit_logits, lowbit_f16, dense16=""):

    import transformers
    from transformers import AutoModelForCausalLM

    cfg = json.load(open(export_dir + "/config.json"))
    qc = dict(cfg["quantization_config"])
    method = qc["quant_method"]
    # dtype "auto": the checkpoint's (float16); backend "default": no quantization_config override, the
    # plain from_pretrained(DIR) a user writes (GPT-QModel picks the kernel).
    kwargs = {"dtype": a.dtype if a.dtype == "auto" else getattr(torch, a.dtype), "device_map": "cpu"}
    backend = a.backend if method == "gptq" else a.awq_backend
    if backend != "default":
        if method == "gptq":
            qcfg = transformers.GPTQConfig.from_dict({**qc, "backend": backend})
        else:
            qcfg = transformers.AwqConfig.from_dict({**qc, "backend": backend})
        kwargs["quantization_config"] = qcfg
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(export_dir, **kwargs)
    model.eval()
    load_s = time.time() - t0
    qmods = [m for m in model.modules() if hasattr(m, "qweight")]
    kinds = sorted({type(m).__name__ for m in qmods})
    n_q = len(qmods)

    stream = np.fromfile(a.tokens, dtype="<i4")
    W, T = a.windows, a.ctx
    refs = {"lowbit": lowbit_logits}
    if lowbit_f16:
        refs["lowbit_f16"] = lowbit_f16
    ref = {}
    V = None
    for name, path in refs.items():
        arr = np.fromfile(path, dtype="<f4")
        V = arr.size // (W * T)
        if V * W * T != arr.size:
            sys.exit(f"{path}: {arr.size} floats is not {W} x {T} x vocab")
        ref[name] = arr.reshape(W, T, V)
    stats = {name: {"max": 0.0, "sum": 0.0, "agree": 0, "nll": 0.0} for name in ref}
    stats["transformers"] = {"nll": 0.0}
    n = 0

    def window_nll(logits, tgt):
        x = logits[:-1].astype(np.float64)
        m = x.max(-1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(x - m).sum(-1))
        return float((lse - x[np.arange(T - 1), tgt]).sum())

    t0 = time.time()
    with torch.no_grad():
        for w in range(W):
            ids = torch.from_numpy(stream[w * T:(w + 1) * T].astype(np.int64))[None]
            out = model(input_ids=ids).logits[0].float().numpy()
            if out.shape[-1] != V:
                sys.exit(f"vocab mismatch: transformers {out.shape[-1]}, lowbit {V}")
            tgt = stream[w * T + 1:(w + 1) * T]
            stats["transformers"]["nll"] += window_nll(out, tgt)
            for name, r in ref.items():
                d = np.abs(out - r[w])
                st = stats[name]
                st["max"] = max(st["max"], float(d.max()))
                st["sum"] += float(d.sum())
                st["agree"] += int((out.argmax(-1) == r[w].argmax(-1)).sum())
                st["nll"] += window_nll(r[w], tgt)
            n += T - 1
    fwd_s = time.time() - t0
    res = {
        "label": label,
        "quant_method": method,
        "checkpoint_format": qc.get("checkpoint_format", qc.get("version")),
        "bits": qc.get("bits"), "group_size": qc.get("group_size"), "sym": qc.get("sym", None),
        "dtype": a.dtype, "backend": backend, "quant_linear": kinds, "quant_layers": n_q,
        "windows": W, "ctx": T, "positions": W * T,
        "ppl_transformers": math.exp(stats["transformers"]["nll"] / n),
        "load_s": round(load_s, 1), "forward_s": round(fwd_s, 1),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    if dense16:
        with torch.no_grad():
            res["weights_vs_lowbit_f16"] = backend_weights_vs(model, method, dense16)
    for name in ref:
        st = stats[name]
        res["vs_" + name] = {"max_abs_logit_diff": st["max"], "mean_abs_logit_diff": st["sum"] / (W * T * V),
                             "argmax_agree": st["agree"], "ppl": math.exp(st["nll"] / n)}
    try:
        import importlib.metadata as md
        res["gptqmodel"] = md.version("gptqmodel")
    except Exception:
        pass
    line = (f"{res['label']}: {method}/{res['checkpoint_format']} {a.dtype} backend={res['backend']} "
            f"{'+'.join(kinds) or 'NO QUANT LAYER'} x{n_q} ppl transformers {res['ppl_transformers']:.4f}")
    for name in ref:
        r = res["vs_" + name]
        line += (f" | vs {name}: max|diff| {r['max_abs_logit_diff']:.3e} mean {r['mean_abs_logit_diff']:.2e}"
                 f" argmax {r['argmax_agree']}/{W * T} ppl {r['ppl']:.4f}")
    if dense16:
        wv = res["weights_vs_lowbit_f16"]
        line += f" | weights: {wv['bit_exact']}/{wv['layers']} layers bit-exact vs lowbit f16 (max |diff| {wv['max_abs_diff']:.3e})"
    print(line, flush=True)
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
