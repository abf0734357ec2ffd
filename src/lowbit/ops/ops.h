// Kernel-level ops: plain functions over Tensors, no autograd. Each op has a forward and (where
// it is differentiable) a backward declared side by side; the autograd layer
// (src/lowbit/autograd/functions.h) pairs them. Every op dispatches on the device of its inputs:
// the CPU body is the readable reference (f32 and f64, the latter for gradient checks); the CUDA
// body lives in ops/cuda/ and is tested against the CPU one (tests/ops/test_parity_*).
//
// Conventions. Activations are row-major [rows, channels]; a sequence batch is [B*T, C] with
// token t of sequence b at row b*T + t. Attention tensors are [B, T, heads, head_dim].
// Outputs are written into caller-allocated tensors (shape checked) so that callers control
// memory; "backward" functions write (not accumulate) their gradient outputs unless noted.
#pragma once
#include <cstdint>
#include <vector>

#include "lowbit/core/tensor.h"
#include "lowbit/ops/rope_style.h"

namespace lowbit::ops {

// ---- matmul ----------------------------------------------------------------------------------
// c = alpha * op(a) op(b) + beta * c, op(x) = x or x^T over the last two dims.
// a: [..., M, K] ([..., K, M] if trans_a); b: [..., K, N] ([..., N, K] if trans_b) or 2-D
// (broadcast over a's batch dims); c: [..., M, N]. All contiguous. Same dtype throughout, except
// on CUDA bf16 a and b may write an f32 c (mixed precision).
void gemm(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor& c, double alpha = 1.0,
          double beta = 0.0);

// ---- elementwise -----------------------------------------------------------------------------
// b has a's shape, or b is a vector of a's last-dim size (broadcast over rows).
void add(const Tensor& a, const Tensor& b, Tensor& out);
void sub(const Tensor& a, const Tensor& b, Tensor& out);
void mul(const Tensor& a, const Tensor& b, Tensor& out);
void scale(const Tensor& x, double s, Tensor& out);   // out = s * x
void axpy(double alpha, const Tensor& x, Tensor& y);  // y += alpha * x (same shape)
// out[c] = sum_r x[r, c] over all leading dims (bias / broadcast gradients).
void sum_rows(const Tensor& x, Tensor& out);
void sum(const Tensor& x, Tensor& out);        // out: 0-d
double sum_squares(const Tensor& x);           // host result (gradient norms)

// ---- normalisation ---------------------------------------------------------------------------
// y = x / sqrt(mean(x^2) + eps) * w over the last dim; x: [M, D], w: [D], rstd: [M].
void rmsnorm_forward(const Tensor& x, const Tensor& w, double eps, Tensor& y, Tensor& rstd);
void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& rstd, Tensor& dx,
                      Tensor& dw);

// ---- rotary position embedding (Su et al. 2021) ---------------------------------------------
// x, y: [B, T, H, hd]; token t has position pos0 + t; pair i rotates by (pos * theta^(-2i/hd)).
// inverse = true rotates by the negative angle, which is the backward of the forward rotation.
void rope(const Tensor& x, int64_t pos0, double theta, RopeStyle style, bool inverse, Tensor& y,
          const RopeScaling& scaling = {});  // scaling: rope_style.h (CPU and CUDA)
// rope's CPU body (forward) on raw f32 rows, no Tensor: x, y [T, H, hd] (y may be x), token t at
// position pos0 + t. The same numbers as rope (a batched decode step's per-sequence RoPE).
void rope_f32(const float* x, float* y, int64_t T, int64_t H, int64_t hd, int64_t pos0, double theta, RopeStyle style,
              const RopeScaling& scaling = {});

// ---- causal grouped-query attention ----------------------------------------------------------
// q: [B, Tq, H, hd]; k, v: [B, Tk, KVH, hd] with Tk >= Tq; query i sits at position Tk - Tq + i
// and attends to keys 0..that position. Head h uses kv head h / (H / KVH).
// out: [B, Tq, H, hd]; lse: [B, H, Tq] (log-sum-exp of the scaled scores, kept for backward,
// so the T x T probability matrix is never stored).
void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale, Tensor& out, Tensor& lse);
void attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                        const Tensor& lse, double scale, Tensor& dq, Tensor& dk, Tensor& dv);

// ---- attention over a KV cache (inference, CPU; ops/kv_attention.cpp) -------------------------
// The cache holds [T, KVH, hd] keys and values as f32, f16 or i8; i8 rows come with one f32 scale
// per (token, kv head): value = code * scale.
// kv_store: src f32 [T, KVH, hd] written into dst (same shape, the cache's type); for i8 dst,
// dst_scale [T, KVH] f32 receives the row scales (absmax / 127), else it is not read.
void kv_store(const Tensor& src, Tensor& dst, Tensor& dst_scale);
// q: f32 [Tq, H, hd], queries at positions Tk - Tq .. Tk - 1, causal as attention_forward; k, v:
// [Tk, KVH, hd] (f32, f16 or i8, read in that type); k_scale/v_scale [Tk, KVH] f32 for i8 (else
// ignored); out: f32 [Tq, H, hd]. No log-sum-exp, no backward.
void kv_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& k_scale,
                          const Tensor& v_scale, double scale, Tensor& out);
// One query row (a decode step) over an f16 cache, read in place: q f32 [H, hd] at position Tk - 1,
// k / v f16 rows [Tk, KVH, hd] (contiguous), out f32 [H, hd]. Per kv head: scores (f16 keys widened
// in registers, 16 channels a vector), softmax, weighted f16 values — no f32 copy of the cache. The
// kv heads run over the pool outside a parallel region, serially inside one. Returns false (nothing
// written) where the fused kernel does not apply: no AVX-512 here, head_dim not a multiple of 16,
// or turned off (LOWBIT_KV_DIRECT=0, set_kv_direct(false)); kv_attention_forward then widens the
// rows and runs its BLAS products (its Tq = 1 f16 case calls this first). Numbers: the same
// softmax, products summed in another order than the BLAS path (tests: 2e-5 of f64 attention).
bool kv_decode_attention_f16(const float* q, const uint16_t* k, const uint16_t* v, int64_t Tk, int64_t H, int64_t KVH,
                             int64_t hd, double scale, float* out);
// Turns the fused kernel of kv_decode_attention_f16 on or off (tests, measurements); returns the
// previous setting. Default: on unless LOWBIT_KV_DIRECT=0.
bool set_kv_direct(bool on);

// ---- randomized Hadamard transform (ops/hadamard.cpp; QuIP / QuaRot) ---------------------------
// x, y: [..., n] contiguous (y may not alias x), n = p * m with p a power of two; `small` [m, m]
// (undefined: m = 1), `signs` [n] (undefined: all +1); same dtype as x. With
// K = H_p / sqrt(p) (x) small (Kronecker product: element i = a * m + b, a < p, b < m; H_p the
// Sylvester Hadamard matrix), each row becomes
//   transpose = false: y = (x * signs) K         transpose = true: y = (x K^T) * signs,
// so the transpose undoes the forward when `small` is orthogonal and is its backward. CPU and CUDA
// (ops/cuda/act_quant.cu, bit for bit).
void hadamard_transform(const Tensor& x, const Tensor& signs, const Tensor& small, bool transpose, Tensor& y);

// ---- fake quantization (ops/hadamard.cpp): activations per token, KV caches -------------------
// x, y: [M, N] contiguous. Groups of `group` consecutive values, along each row (per_column =
// false: per-token quantization when group = N) or down each column (per_column = true: per-channel
// groups of `group` rows). Each group is rounded to a `bits`-bit grid (round half to even) and back:
//   symmetric:  s = clip * max|x| / (2^(b-1) - 1),   q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1),  y = q s
//   asymmetric: lo = clip * min(x, 0), hi = clip * max(x, 0), s = (hi - lo) / (2^b - 1),
//               z = round(-lo / s),  q = clamp(round(x / s) + z, 0, 2^b - 1),  y = (q - z) s
// An all-zero group stays zero. bits in [2, 16], clip in (0, 1]. No backward (the autograd
// wrapper passes gradients straight through). CPU and CUDA (ops/cuda/act_quant.cu, bit for bit).
void fake_quant(const Tensor& x, int bits, bool asymmetric, double clip, int64_t group, bool per_column, Tensor& y);

// ---- activations -----------------------------------------------------------------------------
void silu_forward(const Tensor& x, Tensor& y);                                 // y = x * sigmoid(x)
void silu_backward(const Tensor& dy, const Tensor& x, Tensor& dx);
void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& y);           // y = silu(gate) * up
void swiglu_backward(const Tensor& dy, const Tensor& gate, const Tensor& up, Tensor& dgate, Tensor& dup);

// ---- embedding -------------------------------------------------------------------------------
// ids: i32 [N] with 0 <= id < V (checked); table: [V, D]; out: [N, D].
void embedding_forward(const Tensor& table, const Tensor& ids, Tensor& out);
void embedding_backward(const Tensor& dout, const Tensor& ids, Tensor& dtable);  // dtable zeroed, then scatter-add

// ---- losses (mean over rows) ----------------------------------------------------------------
// Softmax cross-entropy. logits: [N, V]; targets: i32 [N], -1 = ignored; loss: 0-d; lse: [N].
void cross_entropy_forward(const Tensor& logits, const Tensor& targets, Tensor& loss, Tensor& lse);
void cross_entropy_backward(const Tensor& dloss, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                            Tensor& dlogits);
// KL(P || Q) with P = softmax(p_logits) (reference/teacher) and Q = softmax(q_logits), mean over rows.
void kl_div_forward(const Tensor& p_logits, const Tensor& q_logits, Tensor& loss);
// dp or dq may be undefined (not needed).
void kl_div_backward(const Tensor& dloss, const Tensor& p_logits, const Tensor& q_logits, Tensor& dp, Tensor& dq);
// mean((a - b)^2) over all elements.
void mse_forward(const Tensor& a, const Tensor& b, Tensor& loss);
void mse_backward(const Tensor& dloss, const Tensor& a, const Tensor& b, Tensor& da, Tensor& db);
// Weighted squared error scale * sum_i w_i (a_i - b_i)^2 (SAPR's saliency regularizer, methods/
// saliency.h, in one reduction instead of sub, mul, mul, sum and scale), and its gradient for a:
// da = 2 scale dloss w (a - b), with dloss a 0-d tensor on a's device (read there, not on the host).
void weighted_sq_err_forward(const Tensor& a, const Tensor& b, const Tensor& w, double scale, Tensor& loss);
void weighted_sq_err_backward(const Tensor& dloss, const Tensor& a, const Tensor& b, const Tensor& w, double scale,
                              Tensor& da);

// ---- dtype conversion ------------------------------------------------------------------------
// out = x converted to out's dtype (round to nearest even), same shape and device, both
// contiguous. CPU: any float dtypes (f64, f32, bf16, f16). CUDA: f32 and bf16 in any direction,
// one memory-bound pass (no host staging, unlike Tensor::to(DType) across devices). The autograd
// `cast` (functions.h) is its own backward: the gradient is cast back.
void cast(const Tensor& x, Tensor& out);

// ---- optimizer -------------------------------------------------------------------------------
// One AdamW step (Loshchilov & Hutter 2019, PyTorch semantics: decoupled decay p -= lr*wd*p).
// step counts from 1.
void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, double lr, double beta1, double beta2,
                double eps, double weight_decay, int64_t step);

// The same step for a group of parameters sharing the hyper-parameters and the step count (one
// AdamW parameter group; adamw_step_groups with one group). f32 tensors on the GPU take one kernel
// launch per kAdamwMultiMax parameters instead of one each (same per-element arithmetic as adamw_step's CUDA body, so the
// results are bit-identical to it); anything else runs adamw_step per parameter.
struct AdamwParam {
  Tensor* param;
  const Tensor* grad;
  Tensor* m;
  Tensor* v;
};
inline constexpr int kAdamwMultiMax = 32;
void adamw_step_multi(const std::vector<AdamwParam>& params, double lr, double beta1, double beta2, double eps,
                      double weight_decay, int64_t step);

// Several AdamW parameter groups, each with its own hyper-parameters and step count, in one call.
// When every tensor of every group is f32 and contiguous on the GPU they all go into the same fused
// launches (one per kAdamwMultiMax tensors, whatever their group): ApiQ's step updates a block's 7
// linears' clipping (lr 5e-3) and LoRA (lr 5e-4) tensors, 28 in all, in one launch instead of one
// per group. The per-element arithmetic is adamw_step's CUDA body (bit-identical to it); the CPU
// body, and anything else, is adamw_step per tensor with its group's hyper-parameters (the reference).
struct AdamwHyper {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
  int64_t step = 1;  // counts from 1
};
struct AdamwGroupStep {
  std::vector<AdamwParam> params;
  AdamwHyper hyper;
};
void adamw_step_groups(const std::vector<AdamwGroupStep>& groups);

// The AdamW step with block-wise 8-bit state (`--optimizer-bits 8`; the codec is ops/blockwise8.h):
// for each block of kBlockwise8Block elements, m (signed dynamic codes, u8 with param's shape, and
// one f32 absmax per block: m_absmax [blockwise8_blocks(numel)]) and v (unsigned codes, v_absmax)
// are decoded to f32, the element-wise update is adamw_step's CPU arithmetic on them, and the new
// m and v are encoded again with the block's new absmax. param and grad f32, contiguous. CPU only:
// a tensor on the GPU is an error (no CUDA body yet). Blocks are independent, so the result does
// not depend on the thread count.
void adamw8_step(Tensor& param, const Tensor& grad, Tensor& m_codes, Tensor& m_absmax, Tensor& v_codes,
                 Tensor& v_absmax, double lr, double beta1, double beta2, double eps, double weight_decay,
                 int64_t step);

}  // namespace lowbit::ops
