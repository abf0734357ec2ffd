#!/usr/bin/env python3
"""Independent unpacker of GPTQ / AWQ safetensors checkpoints, written from the layouts' public
descriptions (AutoGPTQ's "gptq"/"gptq_v2" checkpoint formats, AutoAWQ's WQLinear_GEMM), not from
lowbit's code:

  gptq: qweight int32 [in*bits/32, out], each output column a little-endian bit stream of the codes
        along the input (3 bits: codes straddle words); qzeros int32 [groups, out*bits/32], the same
        along the output, stored as zero-1 for checkpoint_format "gptq" (v1) and as zero for
        "gptq_v2"; scales f16 [groups, out]; g_idx int32 [in]; w = (q - z[g_idx]) * s[g_idx].
  awq:  qweight int32 [in, out/8], nibble k of word j = output 8j + (0,2,4,6,1,3,5,7)[k];
        qzeros int32 [in/G, out/8] packed the same way; scales f16 [in/G, out]; w = (q - z) * s.

usage: hf_quant_unpack.py EXPORT_DIR REFERENCE.safetensors
REFERENCE holds, for every packed module m, "m" = lowbit's dequantized weight f32 [out, in].
Checks the configs, dtypes and shapes, and that every dequantized weight equals the reference
bit for bit. Prints "ok LAYOUT FORMAT N" and exits 0; exits 1 on a mismatch, 3 when numpy or
safetensors is missing.
"""
import json
import os
import sys

try:
    import numpy as np
    from safetensors.numpy import load_file
except ImportError:
    sys.exit(3)

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def fail(msg):
    print("FAIL: " + msg)
    sys.exit(1)


def bitstream_codes(words, bits, n):
    """words uint32 [n_words, cols], each column a little-endian bit stream -> codes [n, cols]."""
    w = words.astype(np.uint64)
    bit = (w[:, None, :] >> np.arange(32, dtype=np.uint64)[None, :, None]) & np.uint64(1)
    bit = bit.reshape(words.shape[0] * 32, words.shape[1])
    codes = np.zeros((n, words.shape[1]), dtype=np.int64)
    for b in range(bits):
        codes |= bit[np.arange(n) * bits + b].astype(np.int64) << b
    return codes


def nibbles_awq(words):
    """uint32 [rows, out/8] -> int64 [rows, out] in output order."""
    rows, n = words.shape
    out = np.zeros((rows, n * 8), dtype=np.int64)
    for k in range(8):
        out[:, AWQ_ORDER[k]::8] = (words.astype(np.int64) >> (4 * k)) & 15
    return out


def main():
    export_dir, ref_path = sys.argv[1], sys.argv[2]
    cfg = json.load(open(os.path.join(export_dir, "config.json")))
    qc = cfg["quantization_config"]
    st = load_file(os.path.join(export_dir, "model.safetensors"))
    ref = load_file(ref_path)
    method = qc["quant_method"]
    if cfg.get("torch_dtype") != "float16":
        fail("config.json torch_dtype is not float16")
    if method == "gptq":
        side = json.load(open(os.path.join(export_dir, "quantize_config.json")))
        for k in ("bits", "group_size", "sym", "desc_act", "checkpoint_format"):
            if side.get(k) != qc.get(k):
                fail("quantize_config.json and config.json disagree on " + k)
        if qc["desc_act"] is not False:
            fail("desc_act")
    elif method == "awq":
        side = json.load(open(os.path.join(export_dir, "quant_config.json")))
        if qc["version"] != "gemm" or qc["bits"] != 4 or qc["zero_point"] is not True:
            fail("awq quantization_config " + json.dumps(qc))
        if side["w_bit"] != 4 or side["q_group_size"] != qc["group_size"] or side["version"].lower() != "gemm":
            fail("quant_config.json")
    else:
        fail("quant_method " + method)
    bits, gs = qc["bits"], qc["group_size"]
    n = 0
    for name, w_ref in ref.items():
        out_f, in_f = w_ref.shape
        qweight, qzeros, scales = st[name + ".qweight"], st[name + ".qzeros"], st[name + ".scales"]
        if qweight.dtype != np.int32 or qzeros.dtype != np.int32 or scales.dtype != np.float16:
            fail(name + ": dtypes")
        if name + ".weight" in st:
            fail(name + ": a dense weight next to the packed one")
        groups = 1 if gs == -1 else -(-in_f // gs)
        if method == "gptq":
            g_idx = st[name + ".g_idx"]
            if qweight.shape != (in_f * bits // 32, out_f) or qzeros.shape != (groups, out_f * bits // 32):
                fail(name + ": shapes %s %s" % (qweight.shape, qzeros.shape))
            if g_idx.dtype != np.int32 or g_idx.shape != (in_f,):
                fail(name + ": g_idx")
            expect_gidx = np.zeros(in_f) if gs == -1 else np.arange(in_f) // gs
            if not np.array_equal(g_idx, expect_gidx):
                fail(name + ": g_idx is not i // group_size")
            q = bitstream_codes(qweight.view(np.uint32), bits, in_f)            # [in, out]
            z = bitstream_codes(qzeros.view(np.uint32).T.copy(), bits, out_f).T  # [groups, out]
            if qc["checkpoint_format"] == "gptq":
                z = z + 1
            elif qc["checkpoint_format"] != "gptq_v2":
                fail("checkpoint_format " + str(qc["checkpoint_format"]))
            if qc["sym"] and not np.all(z == 2 ** (bits - 1)):
                fail(name + ": sym but zeros are not 2^(bits-1)")
            zz, ss = z[g_idx], scales.astype(np.float32)[g_idx]
        else:
            if qweight.shape != (in_f, out_f // 8) or qzeros.shape != (in_f // gs, out_f // 8):
                fail(name + ": shapes")
            if (name + ".g_idx") in st:
                fail(name + ": awq has no g_idx")
            q = nibbles_awq(qweight.view(np.uint32))
            z = nibbles_awq(qzeros.view(np.uint32))
            rows = np.arange(in_f) // gs
            zz, ss = z[rows], scales.astype(np.float32)[rows]
        w = ((q - zz).astype(np.float32) * ss).T  # [out, in]
        if not np.array_equal(w, w_ref):
            bad = np.argwhere(w != w_ref)[0]
            fail("%s: dequantized weight differs at %s: %r vs lowbit %r" % (name, bad, w[tuple(bad)], w_ref[tuple(bad)]))
        n += 1
    for k, v in st.items():
        base = k.rsplit(".", 1)[0]
        if base not in ref and v.dtype != np.float16:
            fail(k + ": a pass-through tensor that is not f16")
    print("ok %s %s %d" % (method, qc.get("checkpoint_format", qc.get("version")), n))


if __name__ == "__main__":
    main()
