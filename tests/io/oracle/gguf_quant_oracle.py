#!/usr/bin/env python3
"""Writes a GGUF file with gguf-py holding, for every ggml block type lowbit decodes, random raw
blocks and gguf-py's dequantization of them, plus (for the types gguf-py can quantize) f32 inputs
and gguf-py's quantization of them. Used by tests/io/test_gguf_quant.cpp as a bit-exact oracle.

  gguf_quant_oracle.py OUT.gguf

Tensors, per type T (lower-case name):
  raw.T       the random blocks, [rows, cols] in type T
  deq.T       F32 [rows, cols] = gguf.quants.dequantize(raw.T)
  src.T       F32 [rows, cols] inputs (quantizable types only)
  quant.T     gguf.quants.quantize(src.T, T)
Exit status 0 on success; 77 when gguf or numpy cannot be imported (the test then skips).
"""
import sys

try:
    import numpy as np
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize, dequantize
    from gguf.constants import GGML_QUANT_SIZES
except Exception as e:  # noqa: BLE001
    print(f"gguf/numpy not importable: {e}", file=sys.stderr)
    sys.exit(77)

# Byte offsets of the f16 fields inside each block (random bytes there could be inf/NaN).
F16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
    "TQ1_0": [52], "TQ2_0": [64], "IQ4_NL": [0], "IQ4_XS": [0],
}
QUANTIZABLE = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0"}
ROWS = {"Q4_0": 3, "Q4_1": 7, "Q5_0": 5, "Q5_1": 3, "Q8_0": 7, "Q2_K": 3, "Q3_K": 7, "Q4_K": 5,
        "Q5_K": 3, "Q6_K": 7, "TQ1_0": 3, "TQ2_0": 5, "IQ4_NL": 7, "IQ4_XS": 3}


def main() -> None:
    out = sys.argv[1]
    rng = np.random.default_rng(1234)
    w = gguf.GGUFWriter(out, arch="lowbit-test")
    for name, fields in F16_FIELDS.items():
        qt = Q[name]
        block, size = GGML_QUANT_SIZES[qt]
        rows, cols = ROWS[name], block * (3 if block == 32 else 2)
        raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
        for off in fields:  # finite f16 scales of either sign, including subnormals
            scale = (rng.standard_normal((rows, cols // block)) * 0.05).astype(np.float16)
            scale[0, 0] = np.float16(3e-6)  # an f16 subnormal
            raw[:, :, off:off + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
        raw = raw.reshape(rows, cols // block * size)
        w.add_tensor(f"raw.{name.lower()}", raw, raw_dtype=qt)
        w.add_tensor(f"deq.{name.lower()}", dequantize(raw, qt).astype(np.float32))
        if name in QUANTIZABLE:
            src = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)
            src[0, :block] = 0.0          # an all-zero block
            src[1, 3] = 0.7               # an outlier
            src[rows - 1, :block] = np.abs(src[rows - 1, :block])  # one-signed block
            w.add_tensor(f"src.{name.lower()}", src)
            w.add_tensor(f"quant.{name.lower()}", quantize(src, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
