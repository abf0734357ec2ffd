// Activation clip ratios searched on calibration data (issue 16; the clipping search of QuaRot /
// OmniQuant-style PTQ, for activations): per-token activation quantization (--act) takes the range
// clip * max|x| of each token, and a ratio below 1 trades a few clipped outliers for a finer grid
// for everything else. Instead of one fixed ratio (--act-clip R), `lowbit quantize --act-clip
// search` chooses one ratio per block and activation point (ActPoint: q/k/v's input, o_proj's,
// gate/up's, down_proj's) from a grid: the ratio c minimising the output error of the linears that
// read the point,
//     sum over readers W of || (Q_c(X) - X) W^T ||_F^2     (= || Q_c(X) W^T - X W^T ||_F^2)
// on rows X sampled evenly from the calibration windows' inputs to that point (captured in one
// pass of the windows through the blocks, with the activations unquantized; each point is searched
// on its own, not sequentially). Q_c is the run's activation quantizer (act_fake_quant) with clip c. The
// ratios are kept in ActQuantSpec::clips and recorded in the checkpoint.
#pragma once
#include <vector>

#include "lowbit/core/tensor.h"
#include "lowbit/model/llama.h"
#include "lowbit/model/rotation.h"

namespace lowbit {

struct ActClipOptions {
  std::vector<double> grid = {1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.8, 0.75,
                              0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3};
  int64_t rows = 256;  // rows sampled per (layer, point) at an even stride over the calibration tokens
};

struct ActClipReport {
  std::vector<double> clips;  // n_layers * kActPoints ratios (ActQuantSpec::clips)
  // The objective summed over every point at clip 1 and at the chosen ratios (<= the former when
  // the grid holds 1).
  double error_clip1 = 0, error_searched = 0;
  int64_t rows = 0;  // rows sampled per point
};

// The objective for one point: x f32 [R, in] host rows, readers f32 [out, in] host weights, the
// quantizer `act` with its clip replaced by `clip`.
double act_clip_error(const Tensor& x, const std::vector<const Tensor*>& readers, const ActQuantSpec& act, double clip);

// The grid's minimiser of act_clip_error (the first of equals); *error gets its objective and
// *error_clip1 the objective at clip 1 (the grid's own evaluation when it holds 1).
double search_point_clip(const Tensor& x, const std::vector<const Tensor*>& readers, const ActQuantSpec& act,
                         const std::vector<double>& grid, double* error = nullptr, double* error_clip1 = nullptr);

// Runs the model (no gradients, one window at a time, its own activation quantization switched off
// while it runs) on calibration windows (i32 [N, T]) and searches every point. The model's linears
// must be dense (a full-precision or dequantized model), on the CPU.
ActClipReport search_act_clips(LlamaModel& model, const Tensor& tokens, const ActQuantSpec& act,
                               const ActClipOptions& o = {});

}  // namespace lowbit
