// AWQ (Lin, Tang, Tang, Yang, Dang, Han 2023, "AWQ: Activation-aware Weight Quantization for LLM
// Compression and Acceleration") at the level of the linear layers that share one input.
//
// §3.2: scaling up the input channels with large activations before quantization protects the
// salient weights. With s [in] > 0, the layer is rewritten as
//     y = x W^T = (x diag(s)^-1) (W diag(s))^T
// and W diag(s) is quantized. The scales are searched (eq. 4-5) as s = s_x^alpha, s_x the mean
// |x| per input channel, alpha on a grid of 20 points in [0, 1), normalised by
// sqrt(max(s) min(s)) as in the reference code (mit-han-lab/llm-awq, auto_scale.py), choosing the
// alpha that minimises the output error
//     sum over the weights W_k of || X W_k^T - X diag(s)^-1 (Q(W_k diag(s)))^T ||^2.
// alpha = 0 gives s = 1, i.e. plain RTN, so the search never does worse than RTN on X.
// The caller folds diag(s)^-1 into whatever produces x: the preceding RMSNorm weight (g / s) or the
// preceding linear's output rows (W_prev[i, :] / s_i), and stores Q(W_k diag(s)).
//
// Clipping (llm-awq auto_clip.py): per output channel and group, the range is shrunk to
// max|w| * (1 - i/20), i = 0..9, and the shrink minimising the group's output error on (a subsample
// of) the calibration inputs is kept. It runs on the already scaled weight and inputs.
#pragma once
#include <vector>

#include "lowbit/core/tensor.h"
#include "lowbit/quant/format.h"
#include "lowbit/quant/quantized_tensor.h"

namespace lowbit {

struct AwqOptions {
  // Final rounding of ggml block layers weighted by the scaled inputs' mean x^2
  // (rtn_quantize_weighted) instead of the clipping search + the reference rule. Layers in other
  // formats (and ggml types without a per-value grid) keep the clipping search.
  bool weighted_round = false;
  int n_grid = 20;               // alpha in {0, 1/n_grid, ..., (n_grid-1)/n_grid}
  int clip_grid = 20;            // shrink steps of 1/clip_grid ...
  double max_shrink = 0.5;       // ... up to this fraction of the range
  int64_t max_clip_tokens = 512; // calibration rows used by the clipping search (strided subsample)
};

// s_x: mean |x| over the rows of x [..., in] (llm-awq get_act_scale). F32 [in].
Tensor activation_mean_abs(const Tensor& x);
// mean x^2 over the rows of x [..., in] per input channel: the importance of `--weighted-round`
// (diag of H = 2/n X^T X, halved; llama-imatrix's per-channel statistic). F32 [in].
Tensor activation_mean_square(const Tensor& x);

struct AwqScaleResult {
  Tensor scales;                // F32 [in], s (multiply W's columns, divide the input by it)
  double alpha = 0;             // chosen exponent
  double loss = 0;              // output MSE at the chosen alpha (mean over all outputs)
  std::vector<double> losses;   // output MSE for each grid point (losses[0] is plain RTN)
};

// Grid search of the per-input-channel scales for the weights [out_k, in] that all read x [n, in].
// `act_scale` is s_x [in] (activation_mean_abs(x) when undefined). Each grid point's error is one
// product with the n rows, or, when cheaper (n large against in), sum_r d_r^T (X^T X) d_r with the
// Gram matrix built once: the same sum, the rounding differing by ~1e-7 relative.
AwqScaleResult awq_search_scales(const Tensor& x, const std::vector<Tensor>& weights, const QuantFormat& f,
                                 const Tensor& act_scale = Tensor(), const AwqOptions& opt = {});
// The same with one format per weight (mixed-format plans: q/k at q4_k, v at q6_k share one input).
AwqScaleResult awq_search_scales(const Tensor& x, const std::vector<Tensor>& weights,
                                 const std::vector<const QuantFormat*>& formats, const Tensor& act_scale = Tensor(),
                                 const AwqOptions& opt = {});

// Clipping search for one weight w [out, in] reading x [n, in]. Returns F32 [out, n_groups(in)],
// the chosen max |w| of each group (pass to rtn_quantize_clipped). Formats whose parameters do not
// depend on the group's range (ternary, per tensor) get the unclipped max.
Tensor awq_search_clip(const Tensor& x, const Tensor& w, const QuantFormat& f, const AwqOptions& opt = {});

// W diag(s) and X diag(s)^-1.
Tensor scale_weight_columns(const Tensor& w, const Tensor& s);
Tensor divide_input_columns(const Tensor& x, const Tensor& s);

// The whole matrix-level AWQ for linears sharing one input: scale search, then on W_k diag(s) and
// X diag(s)^-1 a clipping search and RTN with the clipped ranges. q[k] quantizes W_k diag(s); the
// effective weight is q[k].dequantize() diag(s)^-1.
struct AwqResult {
  AwqScaleResult scale;
  std::vector<Tensor> clip_max;  // per weight, [out_k, n_groups]
  std::vector<QuantizedTensor> q;
};
AwqResult awq_quantize(const Tensor& x, const std::vector<Tensor>& weights, const QuantFormat& f, bool clip = true,
                       const AwqOptions& opt = {});

}  // namespace lowbit
