// Calibration of WKVQuant's KV smoothing (issue 16; Yue et al. 2024, "WKVQuant: Quantizing Weight
// and Key/Value Cache for Large Language Models Gains More", arXiv 2402.12065; the quantizer is
// ops/wkv_quant.h, the attention path model/rotation.h KVQuantSpec).
//
// For every layer, keys and values separately, the static per-channel shift d and scale s of the
// two-dimensional quantizer (z = (x - d) / s, quantized per token, then x^ = s * z^ + d) are chosen
// on calibration windows, layer by layer on the full-precision model's hidden states:
//  1. initialization from the calibration statistics of each channel c (keys after RoPE, in the
//     Hugging Face channel order of each head; values): d_c = (max_c + min_c) / 2 and the half range
//     r_c = (max_c - min_c) / 2 (floored at 1e-6 of the largest);
//  2. a grid search of one exponent a per (layer, K/V): s_c = r_c^a for a in o.alphas (a = 0: the
//     shift alone), plus "no smoothing" (d = 0, s = 1) — so the choice is never worse than no
//     smoothing on the calibration loss. Keys first (values unsmoothed), then values (with the
//     chosen keys);
//  3. the loss is cross-block (WKVQuant's cross-block reconstruction regularization, in a reduced
//     form): the relative squared error ||y - y_fp||^2 / ||y_fp||^2 of the output of block
//     l + o.lookahead (capped at the last block) when only layer l's cache is quantized — blocks
//     after l run in full precision — against the full-precision output of the same block.
// The candidates run with KVQuantSpec's past-only rule at window 0 (every past token quantized, the
// query's own token in full precision) and o.group channels per token group.
//
// Not done (the paper's full method): learning d and s per channel by gradient descent on the
// cross-block loss (the paper trains them with the weight quantizer's parameters, OmniQuant-style,
// and measures the cross-block loss with the mean absolute error); here one exponent a per (layer,
// K/V) is searched on a grid and d is the midrange.
#pragma once
#include <cstdint>
#include <vector>

#include "lowbit/core/tensor.h"
#include "lowbit/model/llama.h"

namespace lowbit {

struct WkvCalibOptions {
  int bits = 4;         // 4 or 2
  int64_t group = 32;   // channels per token group (the whole head when it does not divide head_dim)
  int lookahead = 1;    // the loss is measured on the output of block l + lookahead (0: block l itself)
  std::vector<double> alphas{0.0, 0.5, 1.0};
};

struct WkvCalibReport {
  Tensor shift, scale;  // f32 [n_layers, 2, KVH*hd]: KVQuantSpec::wkv_shift / wkv_scale
  // Per layer: the chosen exponent of keys / values (-1: no smoothing chosen) and the calibration
  // losses (as step 3) without smoothing and with the chosen smoothing, cross-block and local
  // (block l's own output).
  std::vector<double> alpha_keys, alpha_values;
  std::vector<double> loss_plain, loss_chosen, local_plain, local_chosen;
  double seconds = 0;
};

// Runs `tokens` (i32 [N, T] calibration windows) through the model (no gradients; its own KV
// quantization is switched off while it runs) and chooses the smoothing of every layer. The model
// must be f32 on the CPU.
WkvCalibReport learn_wkv_smoothing(LlamaModel& model, const Tensor& tokens, const WkvCalibOptions& o = {});

}  // namespace lowbit
