// KIVI KV-cache quantization (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization
// for KV Cache"): the codec of the packed int4/int2 cache and attention over that cache (CPU only;
// ops/kv_quant.cpp, ops/kv_attention.cpp).
//
// Codec (asymmetric min/max, the grid always holds zero, as ops::fake_quant's asymmetric mode):
// for a group of values x,
//   lo = min(x, 0), hi = max(x, 0) (in double),  s = float((hi - lo) / (2^b - 1))   (stored f32),
//   z = round(-lo / s) in [0, 2^b - 1]                                               (stored u8),
//   code = clamp(round(x / s) + z, 0, 2^b - 1),  value = float(code - z) * s;
// an all-zero group has s = 0, z = 0 and decodes to zeros (round half to even throughout).
// The scale is rounded to f32 *before* the codes are chosen, so decoding the stored (code, s, z)
// gives exactly what kivi_fake_quant gives: the simulated path (model/rotation.h KVQuantSpec) and
// the packed cache compute the same numbers.
//
// Codes are packed little-endian along a row: value j of a row sits in byte j*b/8 at bit (j*b)%8,
// so a row of n values takes n*b/8 bytes (n*b must be a multiple of 8).
//
// Layout of one layer's packed cache (KIVI): keys per channel in groups of `group` tokens (a group
// is quantized once it is complete and older than the full-precision window), values per token in
// groups of `vgroup` channels of a head:
//   k_codes, v_codes  u8  [capacity, KVH, hd*b/8]    codes of token t, kv head, channel
//   k_scale, k_zero   f32/u8 [capacity/group (rounded up), KVH, hd]   one pair per (token group, channel)
//   v_scale, v_zero   f32/u8 [capacity, KVH, hd/vgroup]             one pair per (token, channel group)
//   k_res, v_res      f16 [ring, KVH, hd]   the tokens not yet quantized, token t in slot t % ring
#pragma once
#include <cstdint>

#include "lowbit/core/tensor.h"

namespace lowbit::ops {

// Encodes x f32 [M, N] (contiguous) with `bits` in {2, 4, 8} in groups of `group` values:
// per_column = false: consecutive values along each row (values; scale/zero [M, N/group]);
// per_column = true: `group` consecutive rows of each column (keys; scale/zero [M/group, N]).
// codes: u8 [M, N*bits/8]; scale f32 and zero u8 of the shapes above (all contiguous, CPU).
void kivi_quantize(const Tensor& x, int bits, int64_t group, bool per_column, Tensor& codes, Tensor& scale,
                   Tensor& zero);
// The inverse: codes/scale/zero as kivi_quantize writes them -> y f32 [M, N].
void kivi_dequantize(const Tensor& codes, const Tensor& scale, const Tensor& zero, int bits, int64_t group,
                     bool per_column, Tensor& y);
// decode(encode(x)) with groups as ops::fake_quant(x, bits, asymmetric = true, clip = 1, group,
// per_column, y) takes them (per_column: column groups of `group` rows): the simulated KIVI cache.
void kivi_fake_quant(const Tensor& x, int bits, int64_t group, bool per_column, Tensor& y);

// One layer of a packed cache, as the layout above; tokens [0, quantized) are packed, tokens
// [quantized, length) are in the ring (length - quantized <= ring).
struct KiviView {
  int bits = 0;
  int64_t length = 0, quantized = 0, group = 0, vgroup = 0, ring = 0;
  Tensor k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res;
};

// Causal attention of q f32 [Tq, H, hd] (positions length-Tq .. length-1) over the packed cache:
// out f32 [Tq, H, hd], as kv_attention_forward over the decoded keys/values. Each work item
// (kv head, tile of query rows) decodes the rows it may see into a per-thread f32 buffer; no f32
// copy of the whole cache is made.
void kivi_attention_forward(const Tensor& q, const KiviView& kv, double scale, Tensor& out);

}  // namespace lowbit::ops
