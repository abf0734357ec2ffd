// PTQ1.61 (Zhao et al., ACL 2025, "PTQ1.61: Push the Real Limit of Extremely Low-Bit Post-Training
// Quantization Methods for Large Language Models", arXiv 2502.13179; reference code
// github.com/zjq0455/PTQ1.61, quantize/blockptq.py and models/int_llama_layer.py read for this).
//
// Per linear W [out, in]:
//   1. Structured mask (one bit per INPUT channel, not per weight): the k = round(ratio * in)
//      channels with the largest calibration activation magnitude max_t |x_tj| are salient
//      (reference: act_scales = per-channel max|x|, threshold at the top 20 %).
//   2. Salient columns: 4-bit asymmetric per-row min/max quantization (the reference's high_quant;
//      lowbit's int4pc codec, f16 scale and zero), range taken over the salient columns of the row.
//   3. The other columns binarized: w ~ r_j * (mu_i + alpha_i * s_ij), s = sign(w - mu) (0 -> +1),
//      mu_i the row mean of the non-salient weights, alpha_i = mean |w - mu| (the closed-form L2
//      optimum for those signs and that mean), r_j = 1 initially. (alpha_i, mu_i) carry the
//      reference's per-row factor r1 (folded in); r_j is its per-column factor r2 (the "angular"
//      term).
//   4. Scaling-factor optimization: the reference trains alpha, r1, r2 with AdamW on each block's
//      output (MSE + cosine loss, 20 epochs). lowbit's version (our choice, documented): the same
//      parameters minimise the layer's output error sum_i e_i^T H e_i (H = 2 X^T X / n, damped as
//      GPTQ), by exact alternating least squares — per row (alpha_i, mu_i) with r fixed (2 x 2
//      normal equations), then r with every (alpha, mu) fixed (one [in-k]^2 SPD system) — each step
//      kept only if the error does not rise, so the error never increases. Signs and the salient
//      part stay fixed, as in the reference.
//   5. Optional (Ptq161Options::block_epochs, --ptq161-block-epochs): the paper's block-wise step in
//      a reduced form — AdamW on alpha, mu, r of all the block's linears against the FP block
//      output (MSE only; the reference adds a cosine term and trains 20 epochs), kept only if the
//      block's error drops.
//   6. alpha, mu, r rounded to f16 (their storage).
// Not implemented: the paper's "quantization preprocessing" (a restorative-LoRA pass over the FP
// model before the PTQ run).
//
// Storage: the format table's `ptq161` format (QuantKind::SalientBinary; quant/ptq161_tensor.h
// packs it: mask bits, sign bits, 4-bit codes, f16 row factors alpha, mu, s, z and f16 column
// factors r of the binary columns); the reported bits per weight count its stored bytes. The layer
// is a QuantLinear: inference runs quant_matmul's SalientBinary bodies on the packed codes.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "lowbit/methods/pipeline.h"

namespace lowbit {

struct Ptq161Options {
  double salient_ratio = 0.2;  // share of input channels kept at 4 bits (reference: 0.2)
  int opt_iters = 4;           // alternating least-squares sweeps (0: closed-form scales only)
  double percdamp = 0.01;      // damping of H (fraction of its mean diagonal), as GPTQ
  // Block-wise refinement after the layer-wise fit (0: off): AdamW on every linear's alpha, mu
  // (lr 5e-4) and r (lr 1e-3, the reference's two learning rates) against the FP block output
  // (MSE), one calibration window per step, this many passes; kept only if the block's MSE over
  // all windows drops.
  int block_epochs = 0;
};

// round(ratio * in), clamped to [0, in].
int64_t ptq161_salient_count(int64_t in, double ratio);
// mask[j] = 1 for the ptq161_salient_count(in, ratio) channels of largest score (ties: lower j).
std::vector<uint8_t> ptq161_select_channels(const float* score, int64_t in, double ratio);

// Closed-form binarization of one row over its non-salient columns (mask[j] == 0): mu = mean,
// sign[j] = +-1 = sign(w_j - mu) (0 -> +1; salient columns get 0), alpha = mean |w - mu|.
void ptq161_binarize_row(const float* w, const uint8_t* mask, int64_t in, double& alpha, double& mu, int8_t* sign);

// One quantized layer (f32 / double fit before the f16 rounding of the stored factors).
struct Ptq161Layer {
  int64_t out = 0, in = 0;
  std::vector<uint8_t> mask;       // [in] 1 = salient (4-bit)
  std::vector<float> s4, z4;       // [out] salient part: w = (q - z) * s (int4pc codec, f16-exact)
  std::vector<uint8_t> q4;         // [out * in] 4-bit codes (salient columns; 0 elsewhere)
  std::vector<int8_t> sign;        // [out * in] +-1 (non-salient columns; 0 elsewhere)
  std::vector<double> alpha, mu;   // [out]
  std::vector<double> col;         // [in] r (1 on salient columns)
  // Decoded weight [out, in] from the factors as they are held (stored_f16: rounded to f16 first).
  Tensor dequantize(bool stored_f16 = true) const;
  // Rounds alpha, mu and col to f16 (what is stored).
  void round_to_f16();
};

// The layout's size without the per-row byte padding of the packed rows, in bits:
// out*(in-k) + 4*out*k + 64*out + in + 16*(in-k).
int64_t ptq161_storage_bits(int64_t out, int64_t in, int64_t k);

// Steps 1-3 (mask, salient 4-bit, closed-form binarization) of w [out, in] given per-input-channel
// activation scores [in].
Ptq161Layer ptq161_init(const Tensor& w, const float* act_score, const Ptq161Options& o);
// sum_i (w_i - wq_i)^T H (w_i - wq_i) (h: [in, in] row-major).
double ptq161_layer_error(const Tensor& w, const Tensor& wq, const std::vector<double>& h);
// Step 4 on a layer from ptq161_init: alternating least squares on the H-weighted error (h: the
// damped [in, in] Hessian). Returns the error after each step (first entry: before any).
std::vector<double> ptq161_optimize(const Tensor& w, const std::vector<double>& h, Ptq161Layer& l, int iters);
// H of a [in, in] F32 Hessian, damped by percdamp * mean(diag) (dead channels get diag 1 first).
std::vector<double> ptq161_damped_hessian(const Tensor& h, double percdamp);

class Ptq161Method : public BlockMethod {
 public:
  Ptq161Method(const QuantFormat& f, Ptq161Options o);
  std::string name() const override { return "ptq161"; }
  std::string options_key() const override;
  void quantize_block(BlockContext& ctx, std::vector<LinearReport>& reports) override;

 private:
  struct Pending {  // a fitted layer waiting for the block-wise step and packing
    std::string name;
    std::shared_ptr<Linear>* slot;
    Ptq161Layer layer;
    Tensor w, bias;
    Device dev;
    size_t report;
  };
  void refine_block(BlockContext& ctx, std::vector<Pending>& pending);
  const QuantFormat& f_;  // int4pc: the salient part's codec (also the checkpoint's nominal format)
  Ptq161Options o_;
};

}  // namespace lowbit
