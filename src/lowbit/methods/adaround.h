// AdaRound and AdaQuant: learned rounding / learned weights and steps, layer-wise on the output error.
//
// Both minimise the layer reconstruction error on calibration inputs X (the quantized-path inputs of
// the pipeline, GPTQ's sequential groups inside a block),
//     rec(Q) = mean_tokens || x W^T - x Q^T ||^2 = 1/2 sum_rows (w - q) H (w - q)^T,   H = 2/n X^T X
// (GPTQ's Hessian, so the mean-over-tokens / sum-over-outputs squared error of the references'
// lp_loss), on the full calibration set each step: the gradient in Q is -(W - Q) H, exact, no
// mini-batch sampling. Integer formats (asymmetric and symmetric, grouped or per channel); the
// group parameters start from round-to-nearest's min/max fit and the result is a normal
// QuantizedTensor (codes, f16 scales and zeros).
//
// ---- AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization",
// arXiv 2004.10568) -----------------------------------------------------------------------------
//   soft Q = s * (clamp(floor(W/s) + h(V) + z, qmin, qmax) - z),   h(V) = clip(sigmoid(V)(zeta - gamma) + gamma, 0, 1)
//   (the rectified sigmoid), scales s and zeros z fixed;
//   loss = rec(soft Q) + lambda * sum (1 - |2 h(V) - 1|^beta), beta annealed;
//   V starts where h(V) = W/s - floor(W/s) (soft Q = W inside the grid); the result rounds up where
//   V >= 0 (h > 1/2).
// Defaults: zeta = 1.1, gamma = -0.1 (paper, after Louizos et al.); Adam with its
// default lr 1e-3 for 10k iterations (paper §5 "Experiments"); lambda = 0.01, beta annealed
// linearly from 20 to 2, no regularizer in the first 20 % of the iterations (the paper's annealing
// of beta and warm-up; the numbers as in the AIMET and BRECQ reference implementations of AdaRound,
// whose defaults agree). The paper's asymmetric reconstruction (FP target on FP inputs, the
// quantized model's inputs) and its activation function in the loss are not used: the target is
// W on the same quantized-path inputs (as GPTQ/COMQ here), the loss is on the linear output.
// Block-wise (BRECQ-style) reconstruction is not implemented.
//
// ---- AdaQuant (Hubara et al. 2021, "Accurate Post Training Quantization With Small Calibration
// Sets", ICML 2021, arXiv 2006.10518) ----------------------------------------------------------
//   Q = s * (clamp(round((W + V)/s) + z, qmin, qmax) - z): a continuous perturbation V of the
//   weights and each group's step s are trained on rec(Q) with the straight-through estimator
//   (round's derivative 1; clamped elements pass no gradient to V; ds gets (code - z) - (W+V)/s
//   inside the grid, (code - z) at the clamp). The zero points stay (they are integers in the
//   stored format); s is rounded to the f16 the format stores at the end.
// Defaults from the reference code (CalibTIP, adaquant(): Adam, 100 iterations, lr 1e-5 for the
// weights and 1e-3 for the quantizer's range (= step * (qmax - qmin) here, so the step's lr is
// 1e-3 / (qmax - qmin)); its comments note they were tuned for 8-bit ResNet/MobileNet and that
// "lr_factor = 1e-2" times std(W) / the weight range was tried: with those relative rates
// (1e-2 * std(W), 1e-2 * (max - min)) AdaQuant was worse than RTN at int4g128 on stories260K,
// docs/results/ptq17-stories260k.md). The "sequential" AdaQuant is what the pipeline does: each
// layer is trained on the inputs produced by the already quantized layers and blocks (default
// --next-input quantized), but the target is W on those same inputs, not the FP layer on FP
// inputs. The reference's bias tuning and activation-quantizer parameters do not apply
// (weight-only, Llama has no biases).
//
// AdaRound's loop runs on ops (ops/adaround.h: the soft error, gemm(E, H), the Adam step), in f64,
// on the device W comes on: the GPU when the pipeline runs there (the paper's 10k iterations a
// layer are one f64 [out, in] x [in, in] product each: ~40 h for SmolLM2 on a 2-core host), else the
// CPU. AdaQuant runs on the host in f32/double (W and H are brought to the CPU), one gemm of
// [out, in] x [in, in] per iteration (100 by default).
#pragma once
#include <string>
#include <vector>

#include "lowbit/methods/ptq_methods.h"
#include "lowbit/ops/adaround.h"

namespace lowbit {

struct AdaRoundOptions {
  int iters = 10000;
  double lr = 1e-3;
  double lambda = 0.01;
  double beta_start = 20, beta_end = 2;
  double warmup = 0.2;  // fraction of the iterations without the rounding regularizer
  double zeta = 1.1, gamma = -0.1;
};

struct AdaQuantOptions {
  int iters = 100;
  double lr_w = 1e-5;      // Adam lr of the weights W + V
  double lr_range = 1e-3;  // Adam lr of each group's range s * (qmax - qmin)
  bool learn_scales = true;
};

// The rectified sigmoid h(v) = clip(sigmoid(v)(zeta - gamma) + gamma, 0, 1) and dh/dv (0 where clipped).
double rectified_sigmoid(double v, double zeta = 1.1, double gamma = -0.1);
double rectified_sigmoid_grad(double v, double zeta = 1.1, double gamma = -0.1);

// AdaRound's objective on one layer, for the optimiser and for gradient checks.
class AdaRoundProblem {
 public:
  // w: [out, in]; h: [in, in] (GPTQ's Hessian 2/n X^T X).
  AdaRoundProblem(const Tensor& w, const Tensor& h, const QuantFormat& f, const AdaRoundOptions& o);
  int64_t out() const { return out_; }
  int64_t in() const { return in_; }
  // V at the start: h(V) = the fractional part of W/s.
  const std::vector<double>& v_init() const { return v0_; }
  // rec(soft Q(V)) + reg_weight * sum (1 - |2h - 1|^beta); grad (if non-null) gets d/dV.
  double loss(const std::vector<double>& v, double beta, double reg_weight, std::vector<double>* grad) const;
  // rec(Q) of the hard rounding (up where v >= 0) and its dequantized values.
  double hard_loss(const std::vector<double>& v, std::vector<double>* q = nullptr) const;
  // rec(Q) of round-to-nearest with the same parameters.
  double rtn_loss() const;
  const std::vector<GroupParams>& params() const { return params_; }
  float tensor_scale() const { return ts_; }
  // The per-weight constants of ops/adaround.h (fl = floor(W/s) + z, s, z), the grid, W and H
  // (f32 and f64, on the CPU): what adaround_quantize uploads for its loop.
  const std::vector<double>& floors() const { return floor_; }
  const std::vector<double>& scales() const { return scale_; }
  const std::vector<double>& zeros() const { return zero_; }
  ops::adaround::Grid grid() const { return {double(qmin_), double(qmax_), o_.zeta, o_.gamma}; }
  const Tensor& weight() const { return w_; }
  const Tensor& hessian() const { return h_; }

 private:
  double rec(const std::vector<double>& q, std::vector<double>* eh) const;  // eh = (W - Q) H
  const QuantFormat& f_;
  AdaRoundOptions o_;
  int64_t out_ = 0, in_ = 0, G_ = 0;
  Tensor w_, h_;                       // f32 CPU
  std::vector<double> floor_;          // floor(W/s) + z (codes before adding h)
  std::vector<double> scale_, zero_;   // per element
  std::vector<double> v0_;
  mutable std::vector<double> q_, eh_;  // scratch of loss()
  std::vector<GroupParams> params_;
  float ts_ = 1;
  float qmin_ = 0, qmax_ = 0;
};

struct AdaRoundResult {
  QuantizedTensor q;
  double loss_rtn = 0, loss = 0;  // rec(Q) of round-to-nearest and of the learned rounding
  int64_t flipped = 0;            // weights rounded the other way than round-to-nearest
  int64_t undecided = 0;          // weights whose final h(V) is neither 0 nor 1 (|2h - 1| < 0.99)
  std::vector<double> v;          // the final rounding variables
};

AdaRoundResult adaround_quantize(const Tensor& w, const Tensor& h, const QuantFormat& f, const AdaRoundOptions& o = {});

struct AdaQuantResult {
  QuantizedTensor q;
  double loss_rtn = 0, loss = 0;
};

AdaQuantResult adaquant_quantize(const Tensor& w, const Tensor& h, const QuantFormat& f, const AdaQuantOptions& o = {});

// In the block pipeline: GPTQ's sequential groups and Hessians, the per-layer solve replaced.
class AdaRoundMethod : public GptqMethod {
 public:
  AdaRoundMethod(const QuantFormat& f, AdaRoundOptions o) : GptqMethod(f, GptqOptions{}), a_(o) {}
  std::string name() const override { return "adaround"; }
  bool supports_data_parallel() const override { return false; }  // not plain sums over windows
  std::string options_key() const override;

 protected:
  GptqResult solve(const Tensor& w, const Tensor& h, const QuantFormat& f) override;

 private:
  AdaRoundOptions a_;
};

class AdaQuantMethod : public GptqMethod {
 public:
  AdaQuantMethod(const QuantFormat& f, AdaQuantOptions o) : GptqMethod(f, GptqOptions{}), a_(o) {}
  std::string name() const override { return "adaquant"; }
  bool supports_data_parallel() const override { return false; }  // not plain sums over windows
  std::string options_key() const override;

 protected:
  GptqResult solve(const Tensor& w, const Tensor& h, const QuantFormat& f) override;

 private:
  AdaQuantOptions a_;
};

}  // namespace lowbit
