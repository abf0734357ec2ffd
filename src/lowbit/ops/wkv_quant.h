// WKVQuant's KV-cache quantizer (Yue et al. 2024, "WKVQuant: Quantizing Weight and Key/Value Cache
// for Large Language Models Gains More", arXiv 2402.12065) as simulated (fake) quantization on the
// CPU (ops/wkv_quant.cpp; the attention path and the calibration: model/rotation.h KVQuantSpec,
// methods/kv_wkv.h).
//
// Two-dimensional quantization: a static per-channel smoothing, then a dynamic per-token quantizer.
// For keys or values x f32 [M tokens, C channels] with a shift d [C] and a scale s [C] > 0,
//   z = (x - d) / s                         (f32, per channel: the static "channel" dimension),
//   zq = kivi_fake_quant(z, bits, group)     (per token, asymmetric min/max over each group of
//                                             `group` consecutive channels: the dynamic "token"
//                                             dimension; ops/kv_quant.h's codec),
//   y = zq * s + d                           (f32).
// Undefined d / s act as 0 / 1 (no smoothing: plain per-token quantization).
//
// Past-only quantization: past_quant_attention_forward is causal attention in which query i reads
// keys/values j < quantized[i] from the quantized copies (kq, vq) and the others, its own included,
// in full precision (KVQuantSpec::quantized_len decides quantized[i]; WKVQuant's rule never
// quantizes the query's own token).
#pragma once
#include <cstdint>
#include <vector>

#include "lowbit/core/tensor.h"

namespace lowbit::ops {

// y = s * kivi_fake_quant((x - d) / s, bits, group, per-token) + d as above. x f32 [M, C] (CPU),
// shift / scale f32 [C] (contiguous; both undefined = no smoothing; scale > 0), bits 2, 4 or 8,
// group divides C. y: f32 [M, C] contiguous (may not alias x).
void wkv_fake_quant(const Tensor& x, const Tensor& shift, const Tensor& scale, int bits, int64_t group, Tensor& y);

// Causal attention of q f32 [T, H, hd] (positions S-T .. S-1) over k, v f32 [S, KVH, hd] (full
// precision) and kq, vq f32 [Lq, KVH, hd] (the quantized versions of tokens 0 .. Lq-1): query i (at
// position p = S-T+i) reads keys/values 0 .. p, rows j < quantized[i] from kq / vq, the others from
// k / v. quantized: T entries, 0 <= quantized[i] <= min(Lq, p + 1). Grouped-query: head h reads kv
// head h / (H / KVH). out f32 [T, H, hd] contiguous. Scores and softmax in f32 with the row max
// subtracted, the normalizer in f64.
void past_quant_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& kq, const Tensor& vq,
                                  const std::vector<int64_t>& quantized, double scale, Tensor& out);

}  // namespace lowbit::ops
