// CUDA bodies of the kernel-level ops. Each function has exactly the signature of its namesake in
// ops/ops.h and is reached through LB_CUDA_ROUTE (ops/dispatch.h) after the CPU entry point has
// checked shapes, so these bodies check only what is specific to the GPU (dtypes, head sizes).
// Plain C++: no CUDA headers here, so that host-only translation units can include it.
//
// Dtypes on the GPU: f32 everywhere; bf16 (fp32 arithmetic inside) for gemm, the elementwise ops,
// reductions, rmsnorm, rope, attention, activations, embedding, losses and AdamW. f64 only where
// named (gemm, AdaRound's passes: its solver runs in f64); elsewhere it exists on the CPU for
// gradient checks.
#pragma once
#include <cstdint>

#include "lowbit/core/format_traits.h"
#include "lowbit/core/tensor.h"
#include "lowbit/ops/ops.h"
#include "lowbit/ops/adaround.h"
#include "lowbit/ops/lp_int4.h"
#include "lowbit/ops/lp_quant.h"
#include "lowbit/ops/ternary.h"
#include "lowbit/ops/qat_quant.h"
#include "lowbit/ops/quant_matmul.h"
#include "lowbit/ops/rope_style.h"

namespace lowbit::ops::cuda {

void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, double alpha, double beta);

void add(const Tensor& a, const Tensor& b, Tensor& out);
void sub(const Tensor& a, const Tensor& b, Tensor& out);
void mul(const Tensor& a, const Tensor& b, Tensor& out);
void scale(const Tensor& x, double s, Tensor& out);
void axpy(double alpha, const Tensor& x, Tensor& y);
void sum_rows(const Tensor& x, Tensor& out);
void sum(const Tensor& x, Tensor& out);
double sum_squares(const Tensor& x);

void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd);
void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx, Tensor& dw);

void rope(const Tensor& x, int64_t pos0, double theta, RopeStyle style, bool inverse, Tensor& y,
          const RopeScaling& scaling);

// head_dim <= 128 on the GPU. bf16 with head_dim 64 or 128 runs on tensor cores (WMMA), everything
// else on fp32 CUDA cores (set LOWBIT_CUDA_SIMT_ATTENTION=1 to force the latter). lse may be f32
// even when q/k/v are bf16 (recommended: a bf16 lse keeps only ~3 significant digits of the softmax
// normaliser, which shows up in the backward).
void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale, Tensor& out, Tensor& lse);
void attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                        const Tensor& lse, double scale, Tensor& dq, Tensor& dk, Tensor& dv);

void silu_forward(const Tensor& x, Tensor& y);
void silu_backward(const Tensor& dy, const Tensor& x, Tensor& dx);
void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& y);
void swiglu_backward(const Tensor& dy, const Tensor& gate, const Tensor& up, Tensor& dgate, Tensor& dup);

// ids may live on the CPU (already validated there) or on the GPU (validated by the kernel: an id
// outside [0, V) sets a device flag that is read back after the launch and raised as lowbit::Error,
// which costs one host synchronisation per call).
void embedding_forward(const Tensor& table, const Tensor& ids, Tensor& out);
void embedding_backward(const Tensor& dout, const Tensor& ids, Tensor& dtable);

// Targets on the GPU are validated like embedding ids (device flag, one synchronisation).
void cross_entropy_forward(const Tensor& logits, const Tensor& targets, Tensor& loss, Tensor& lse);
void cross_entropy_backward(const Tensor& dloss, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                            Tensor& dlogits);
void kl_div_forward(const Tensor& p_logits, const Tensor& q_logits, Tensor& loss);
void kl_div_backward(const Tensor& dloss, const Tensor& p_logits, const Tensor& q_logits, Tensor& dp, Tensor& dq);
void mse_forward(const Tensor& a, const Tensor& b, Tensor& loss);
void mse_backward(const Tensor& dloss, const Tensor& a, const Tensor& b, Tensor& da, Tensor& db);
void weighted_sq_err_forward(const Tensor& a, const Tensor& b, const Tensor& w, double scale, Tensor& loss);
void weighted_sq_err_backward(const Tensor& dloss, const Tensor& a, const Tensor& b, const Tensor& w, double scale,
                              Tensor& da);

void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, double lr, double beta1, double beta2,
                double eps, double weight_decay, int64_t step);
// f32, contiguous, all on the GPU, numel > 0 (ops::adamw_step_groups checks and routes); hyper[k]
// is params[k]'s group's. One launch per kAdamwMultiMax tensors.
void adamw_step_fused(const std::vector<AdamwParam>& params, const std::vector<AdamwHyper>& hyper);

// Learnable-weight-clipping fake quantization (OmniQuant eq. 2, trained by ApiQ): the CUDA bodies
// of quant/lwc.h's forward and straight-through backward (quant/lwc.cpp checks shapes and passes
// the format's traits row, an IntAsym or IntSym format). f32 only. w, y, dy, dw: [out, in]; gamma,
// beta, dgamma, dbeta: [out, n_groups]; beta/dbeta undefined for symmetric formats; dw may be
// undefined (not wanted).
void lwc_forward(const Tensor& w, const Tensor& gamma, const Tensor& beta, const FormatTraits& f, Tensor& y);
void lwc_backward(const Tensor& w, const Tensor& gamma, const Tensor& beta, const Tensor& dy, const FormatTraits& f,
                  Tensor& dw, Tensor& dgamma, Tensor& dbeta);

// The QAT weight quantizers (ops/qat_quant.h: LSQ / LSQ+, ParetoQ's sign / SEQ, E2E-QP's frozen
// codes); the CPU entry points check the arguments and allocate the outputs. f32 only.
// slice: MatQuant's Matryoshka slice of the codes (0: none; ops/qat_quant_math.h lsq_grid_sliced).
void lsq_quant_forward(const Tensor& w, const Tensor& step, const Tensor& offset, const FormatTraits& f, Tensor& y,
                       int slice);
void lsq_quant_backward(const Tensor& w, const Tensor& step, const Tensor& offset, const Tensor& dy,
                        const FormatTraits& f, double grad_scale, Tensor* dw, Tensor& dstep, Tensor* doffset,
                        int slice);
void seq_quant_forward(const Tensor& w, const Tensor& alpha, const SeqGrid& q, const FormatTraits& f, Tensor& y);
void seq_quant_backward(const Tensor& w, const Tensor& alpha, const Tensor& dy, const SeqGrid& q, const FormatTraits& f,
                        double grad_scale, Tensor* dw, Tensor& dalpha);
void group_scale_forward(const Tensor& codes, const Tensor& step, const FormatTraits& f, Tensor& y);
void group_scale_backward(const Tensor& codes, const Tensor& dy, const FormatTraits& f, Tensor& dstep);

// The operand quantizer of low-precision training (ops/lp_quant.h; ops/cuda/lp_quant.cu). f32 only;
// reads the amax back to the host (one synchronisation per call).
void lp_quantize(const Tensor& x, const LpQuantSpec& spec, Tensor& y, LpQuantStats* stats);
// Its FP8 codes (ops/lp_quant.h; lp_quant.cu) and the native FP8 GEMM (cuBLASLt; fp8_gemm.cu).
void lp_quantize_fp8(const Tensor& x, const LpQuantSpec& spec, Tensor& codes, LpQuantStats* stats, bool transpose);
void fp8_gemm(const Tensor& a, LpFormat fa, const Tensor& b, LpFormat fb, float alpha, Tensor& y);
// INT4 training's quantizers (ops/lp_int4.h; ops/cuda/lp_int4.cu), bit for bit the CPU bodies. f32
// only. hq and bitsplit read the amax back to the host (one synchronisation per call); lss reads the
// 3T row norms back and uploads the 2T row factors (the water filling and the keep draws run on the
// host, ops/lp_int4_math.h).
void lp_int4_hq(const Tensor& x, int32_t block, uint64_t seed, bool back, Tensor& y, LpInt4Stats* stats);
void lp_int4_bitsplit(const Tensor& g, uint64_t seed, Tensor& hi, Tensor& lo, LpSplitStats* stats);
void lp_int4_lss(const Tensor& hi, const Tensor& lo, const Tensor& partner, bool sample, uint64_t seed, Tensor& y,
                 LpLssStats* stats);

// The activation / KV fake quantizer, the randomized Hadamard transform (ops/ops.h) and BitNet's
// quantizers (ops/ternary.h): ops/cuda/act_quant.cu, f32 and f64, bit for bit the CPU bodies except
// ternary gamma's mean (another summation order of the same double sum).
void fake_quant(const Tensor& x, int bits, bool asymmetric, double clip, int64_t group, bool per_column, Tensor& y);
void hadamard_transform(const Tensor& x, const Tensor& signs, const Tensor& small, bool transpose, Tensor& y);
void act_quant_int4_absmean(const Tensor& x, Tensor& out);
double ternary_gamma(const Tensor& w, TernaryScale scale);
double ternary_fake_quant(const Tensor& w, TernaryScale scale, Tensor& out);

// AdaRound's element-wise passes (ops/adaround.h; ops/cuda/adaround.cu): f64 and f32, one thread per weight.
void adaround_soft_error(const Tensor& v, const Tensor& w, const Tensor& fl, const Tensor& s, const Tensor& z,
                         const adaround::Grid& g, Tensor& e);
void adaround_adam_step(Tensor& v, Tensor& m, Tensor& m2, const Tensor& eh, const Tensor& fl, const Tensor& s,
                        const Tensor& z, const adaround::Grid& g, const AdaRoundStep& st);

// GPTQ (Frantar et al. 2022, Alg. 1) of one linear layer for the uniform integer formats of the
// format table (methods/gptq_cuda.cpp passes the format's traits row and wraps the result into a
// QuantizedTensor; see gptq.cu for the method). w: f32 [out, in], h: f32 [in, in]
// (H = 2 X^T X / n), both on cuda. Same semantics as the CPU gptq_quantize.
struct GptqKernelOptions {
  double percdamp = 0.01;
  int64_t block_size = 128;           // at most 128 on the GPU
  bool act_order = false;             // implies static groups when grouped
  bool static_groups = false;
  bool fp64_factorization = true;     // Cholesky / triangular inverse in f64 (else f32)
  bool want_dequantized = false;      // also return the dequantized weight
};
struct GptqIntResult {
  Tensor codes;        // U8 [out, row_bytes], packed as format.h specifies (cuda)
  Tensor scales;       // F16 [out, groups] (cuda)
  Tensor zeros;        // F16 [out, groups] (cuda); undefined when symmetric
  Tensor dequantized;  // F32 [out, in] (cuda) when asked for
  double loss = 0;     // sum of (w - q)^2 / (2 U_jj^2), as gptq.py's Losses
  int64_t dead_columns = 0;
};
GptqIntResult gptq_int(const Tensor& w, const Tensor& h, const FormatTraits& f, const GptqKernelOptions& opt);

// Packed-weight products and lookups (quant_matmul.h; the CPU entry points check the arguments,
// w.device is set). int8: the decode GEMV with int8 activations (in chunks of 8 rows when M > 8),
// else dequantized f32 tiles + cuBLAS. kernel: the GEMV variant (resolved, not Auto).
void quant_matmul(const Tensor& x, const PackedWeight& w, Tensor& y, bool int8, CudaGemv kernel);
void quant_embedding(const PackedWeight& w, const Tensor& ids, Tensor& out);

}  // namespace lowbit::ops::cuda
