// OneBit (Xu et al. 2024, arXiv 2402.11295): a linear layer whose weight is one sign bit per
// value and two f16 value vectors,
//
//   W ≈ diag(h) · sign(W) · diag(g),   y = x Ŵᵀ = h ⊙ (sign(W) · (g ⊙ x))   (the paper's eq. 4-5)
//
// h [out] one value per output row, g [in] one value per input column (the paper names them g and
// h the other way round; here h is the row's, g the column's). Stored as the `onebit` format
// (quant/format.h: sign bits, h in `scales`, g in `col_scales`): 1 + 16/in + 16/out bits per weight.
//
// Initialisation: Sign-Value-Independent Decomposition (SVID, §3.3, eq. 6-7): W = sign(W) ⊙ |W|,
// and |W| ≈ h gᵀ by a rank-1 approximation. The paper takes NMF; `svid` does either rank-1 NMF by
// Lee & Seung's multiplicative updates (SvidMethod::Nmf) or the dominant singular pair of |W| by
// power iteration (SvidMethod::Power, the default). |W| is non-negative, so its dominant singular
// vectors are non-negative (Perron-Frobenius) and both give a non-negative factor; for rank 1 the
// Frobenius-optimal non-negative factor IS the dominant singular pair (it is the unconstrained
// optimum and happens to be non-negative), so NMF converges to the same h gᵀ (tests check both
// against each other and against the scalar absmean scale of BitNet / ParetoQ's sign quantizer).
//
// Training (§3.4, `lowbit qat --method onebit`, train/qat.cpp): a latent full-precision weight W
// whose sign is taken with the straight-through estimator (d sign(W)/dW := 1) and the value
// vectors h, g trained with it, end to end, by knowledge distillation from the FP teacher. The
// paper's loss is the logits' KL plus an MSE between the l2-normalised hidden states of every
// layer (L_KD = L_CE + α L_MSE): train/qat.h's hidden_state_mse, α = `--hidden-mse` (default 1).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "lowbit/autograd/functions.h"
#include "lowbit/model/linear.h"
#include "lowbit/quant/quantized_tensor.h"

namespace lowbit {

enum class SvidMethod { Power, Nmf };
SvidMethod parse_svid_method(const std::string& name);  // "power" or "nmf"; throws naming the value
const char* svid_method_name(SvidMethod m);

// A rank-1 non-negative factorisation |W| ≈ h gᵀ of an [out, in] weight (f32 or f64, CPU),
// balanced so that ‖h‖ = ‖g‖ (h = √σ u, g = √σ v for |W|'s dominant singular pair σ u vᵀ).
// Iterates until the relative change of h gᵀ's error is below 1e-10 or `iters` passes.
struct Svid {
  std::vector<double> h, g;  // [out], [in], every entry >= 0
};
Svid svid(const Tensor& w, SvidMethod m = SvidMethod::Power, int iters = 200);

// The onebit tensor of sign(w) (w >= 0 -> +1, the codec's rule) with the values h [out] and g
// [in] rounded to f16 (a value too large for f16 throws naming the row or column).
QuantizedTensor onebit_pack(const Tensor& w, const std::vector<double>& h, const std::vector<double>& g);
// SVID, then onebit_pack: the data-free onebit quantizer (quantize() and `quantize --method rtn
// --format onebit` call it with SvidMethod::Power).
QuantizedTensor onebit_quantize(const Tensor& w, SvidMethod m = SvidMethod::Power);

// Ŵ = diag(h) sign(W) diag(g) with the straight-through gradient: dW = G ⊙ h gᵀ (sign passed
// through as the identity), dh_i = Σ_j G_ij s_ij g_j, dg_j = Σ_i G_ij s_ij h_i (s = sign(W),
// W >= 0 -> +1). W [out, in], h [out], g [in], one float dtype (f32 or f64) on the CPU (no CUDA body).
Var onebit_weight(const Var& w, const Var& h, const Var& g);

// The training layer of `qat --method onebit`: y = x Ŵᵀ (+ bias), Ŵ = onebit_weight(W, h, g).
// Latent W starts as the FP weight, h and g from SVID (rounded to f16 so that the untrained layer is
// exactly the packed SVID tensor). CPU only (f32, or f64 for the tests).
class OneBitTrainLinear : public Linear {
 public:
  OneBitTrainLinear(const Tensor& weight, const Tensor& bias, SvidMethod init = SvidMethod::Power);

  Var forward(const Var& x) const override;
  int64_t in_features() const override { return weight_.shape()[1]; }
  int64_t out_features() const override { return weight_.shape()[0]; }
  std::vector<Var> parameters() const override { return {weight_, h_, g_}; }
  std::vector<Var> weight_parameters() const { return {weight_}; }
  std::vector<Var> value_parameters() const { return {h_, g_}; }
  std::vector<Var> state() const { return {weight_, h_, g_}; }  // what a resumable state must hold
  Tensor effective_weight() const override;                   // Ŵ without grad
  Tensor bias() const override { return bias_.defined() ? bias_.value() : Tensor(); }
  std::string kind() const override { return "onebit"; }
  Var quantized_weight() const { return onebit_weight(weight_, h_, g_); }

  void snap_values();            // h, g := their f16 roundings (then forward == encode()'s function)
  QuantizedTensor encode() const;  // sign(W), h and g at f16

 private:
  Var weight_, h_, g_, bias_;
};

}  // namespace lowbit
