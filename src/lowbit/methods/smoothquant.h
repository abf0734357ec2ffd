// SmoothQuant (Xiao, Lin, Seznec, Wu, Demouth, Han 2023, arXiv 2211.10438) scale migration
// (issue 16): activation outliers sit in a few input channels; dividing those channels by s_j and
// multiplying the weights' matching input columns by s_j leaves the model's function unchanged and
// moves the difficulty from the activations (quantized per token) to the weights (quantized per
// output channel / group), with
//     s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)
// (max |X_j| over calibration tokens, max |W_:,j| over the rows of every linear that reads X).
//
// Where it folds (every step an exact identity of the full-precision model):
//   attn   x = rmsnorm(h) * attn_norm feeds q/k/v:      attn_norm_j /= s_j;  wq, wk, wv[:, j] *= s_j
//   ffn    x = rmsnorm(h) * ffn_norm feeds gate/up:     ffn_norm_j  /= s_j;  w_gate, w_up[:, j] *= s_j
//   down   x = silu(gate) * up feeds down_proj:         w_up[j, :] /= s_j;   w_down[:, j] *= s_j
// (o_proj's input, the attention output, is not smoothed: with grouped-query attention its channels
// share v_proj rows across heads.) The down step is skipped on a rotated model: the online Hadamard
// before down_proj does not commute with a per-channel scale.
//
// lowbit uses it before quantization (`lowbit quantize --smooth ALPHA`): the smoothed weights are
// what the method quantizes, and the activation quantizers (--act) see the smoothed activations.
#pragma once
#include <vector>

#include "lowbit/model/llama.h"

namespace lowbit {

// Per layer, per input channel: max |x| of the inputs of q_proj (attn), gate_proj (ffn) and
// down_proj (down) over the calibration windows.
struct SmoothStats {
  std::vector<std::vector<double>> attn, ffn, down;
};

// Runs the model (no gradients, `batch` windows at a time) on calibration windows (i32 [N, T]).
SmoothStats collect_smooth_stats(LlamaModel& model, const Tensor& tokens, int64_t batch = 1);

struct SmoothOptions {
  double alpha = 0.5;  // migration strength, in [0, 1]
  bool down = true;    // also smooth down_proj's input through up_proj's rows
};

// The scales of one smoothing point: s_j from act_max (max |X_j|) and the weights reading X
// (each [out, in] f32 on the host). Channels whose activation or weight maximum is 0 get s = 1.
std::vector<double> smooth_scales(const std::vector<double>& act_max, const std::vector<const Tensor*>& readers,
                                  double alpha);

struct SmoothReport {
  int points = 0;              // smoothing points folded (layers x {attn, ffn[, down]})
  double max_scale = 0, min_scale = 0;  // over every channel of every point
};

// Folds the scales into `w` (host f32 weights; a model's weights() after weights_to(CPU)).
SmoothReport smooth_weights(LlamaWeights& w, const SmoothStats& st, const SmoothOptions& o);

}  // namespace lowbit
