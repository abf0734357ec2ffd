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
//
// `--smooth auto` chooses alpha per smoothing point from a grid (0, 0.1, ..., 1), as the SmoothQuant
// paper's per-model sweep does but per point and without touching any evaluation text: the alpha
// that minimises the quantized readers' output error on sampled calibration rows,
//     sum over readers W of || Q_a(X diag(1/s)) Q_w(W diag(s))^T - X W^T ||_F^2
// with Q_w the round-to-nearest fake quantizer of the run's weight format and Q_a the per-token
// activation quantizer the run targets (--act; int8 symmetric when none is given).
#pragma once
#include <vector>

#include "lowbit/model/llama.h"
#include "lowbit/model/rotation.h"
#include "lowbit/quant/format.h"

namespace lowbit {

// Per layer, per input channel: max |x| of the inputs of q_proj (attn), gate_proj (ffn) and
// down_proj (down) over the calibration windows.
struct SmoothStats {
  std::vector<std::vector<double>> attn, ffn, down;
  // With sample_rows > 0: up to that many input rows per layer and point (f32 [R, in], host), taken
  // at an even stride over all calibration tokens; the alpha search reads them.
  std::vector<Tensor> attn_x, ffn_x, down_x;
};

// Runs the model (no gradients, `batch` windows at a time) on calibration windows (i32 [N, T]).
SmoothStats collect_smooth_stats(LlamaModel& model, const Tensor& tokens, int64_t batch = 1,
                                 int64_t sample_rows = 0);

struct SmoothOptions {
  double alpha = 0.5;  // migration strength, in [0, 1]
  bool down = true;    // also smooth down_proj's input through up_proj's rows
  // alpha search (--smooth auto): needs SmoothStats' sampled rows and the weight format.
  bool search = false;
  std::vector<double> grid = {0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0};
  const QuantFormat* format = nullptr;  // Q_w
  ActQuantSpec act{8, false, 1.0, ActFloat::None, {}};  // Q_a (bits 0: activations not quantized)
};

// The scales of one smoothing point: s_j from act_max (max |X_j|) and the weights reading X
// (each [out, in] f32 on the host). Channels whose activation or weight maximum is 0 get s = 1.
std::vector<double> smooth_scales(const std::vector<double>& act_max, const std::vector<const Tensor*>& readers,
                                  double alpha);

struct SmoothReport {
  int points = 0;              // smoothing points folded (layers x {attn, ffn[, down]})
  double max_scale = 0, min_scale = 0;  // over every channel of every point
  std::vector<double> alphas;  // the alpha of every point, in fold order (layer-major: attn, ffn, down)
};

// The search objective above for one point and one alpha (x: f32 [R, in] host rows).
double smooth_error(const std::vector<double>& act_max, const Tensor& x, const std::vector<const Tensor*>& readers,
                    double alpha, const QuantFormat& format, const ActQuantSpec& act);

// Folds the scales into `w` (host f32 weights; a model's weights() after weights_to(CPU)).
SmoothReport smooth_weights(LlamaWeights& w, const SmoothStats& st, const SmoothOptions& o);

}  // namespace lowbit
