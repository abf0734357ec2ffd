// Differentiable ops on Vars. Each pairs a forward kernel with its backward kernel from
// ops/ops.h; see functions.cpp, where every op's gradient is written next to its forward.
// Shapes use the letters of ops.h: activations [M, C] with M = B*T rows.
#pragma once
#include "lowbit/autograd/variable.h"
#include "lowbit/ops/rope_style.h"

namespace lowbit {

// op(a) op(b) over the last two dims (batched; a 2-D b broadcasts over a's batch dims).
Var matmul(const Var& a, const Var& b, bool trans_a = false, bool trans_b = false);
// x [M, in] . w[out, in]^T (+ bias [out]) -> [M, out]
Var linear(const Var& x, const Var& w, const Var& bias = Var());
Var add(const Var& a, const Var& b);  // b same shape, or a row vector broadcast over rows
Var sub(const Var& a, const Var& b);
Var mul(const Var& a, const Var& b);
Var scale(const Var& x, double s);
Var sum(const Var& x);   // 0-d
Var mean(const Var& x);  // 0-d
Var reshape(const Var& x, const Shape& shape);
Var rmsnorm(const Var& x, const Var& w, double eps);  // over the last dim
// x: [B*T, H*hd] viewed as [B, T, H, hd]; token t at position pos0 + t.
Var rope(const Var& x, int64_t B, int64_t T, int64_t H, int64_t hd, int64_t pos0, double theta, RopeStyle style,
         const RopeScaling& scaling = {});
// q: [B*Tq, H*hd]; k, v: [B*Tk, KVH*hd]; causal (query i at position Tk - Tq + i); out [B*Tq, H*hd].
Var attention(const Var& q, const Var& k, const Var& v, int64_t B, int64_t Tq, int64_t Tk, int64_t H, int64_t KVH,
              int64_t hd);
Var silu(const Var& x);
Var swiglu(const Var& gate, const Var& up);  // silu(gate) * up
Var embedding(const Var& table, const Tensor& ids);  // ids i32 [N] -> [N, D]
Var cross_entropy(const Var& logits, const Tensor& targets);  // mean over rows; target -1 ignored
Var kl_div(const Var& p_logits, const Var& q_logits);           // mean over rows of KL(P || Q)
Var mse(const Var& a, const Var& b);                             // mean over elements
// scale * sum w (a - b)^2 (0-d); only a gets a gradient (b, w constants: SAPR's regularizer).
Var weighted_sq_err(const Var& a, const Tensor& b, const Tensor& w, double scale);
// Randomized Hadamard transform of the rows of x [..., n] (ops::hadamard_transform; signs [n] and
// small [m, m] are constants of x's dtype, either may be undefined): y = (x * signs) K, or
// y = (x K^T) * signs with transpose. The backward applies the other direction to the gradient.
Var hadamard_transform(const Var& x, const Tensor& signs, const Tensor& small, bool transpose = false);
// Fake quantization of x [M, N] (ops::fake_quant) with a straight-through gradient (dy passes to
// x unchanged).
Var fake_quant(const Var& x, int bits, bool asymmetric, double clip, int64_t group, bool per_column = false);
// x converted to `dtype` (f64/f32/bf16 on the CPU, f32/bf16 on the GPU); the backward converts
// the gradient back to x's dtype. Identity (no copy, no node) when x already has that dtype.
// Mixed precision uses it to hand fp32 activations to bf16 blocks and bf16 logits to an fp32 loss.
Var cast(const Var& x, DType dtype);

// Mixed precision for the matrix products of f32 models on the GPU (the idea of torch.autocast,
// bf16 only): while a guard is alive on this thread, `linear`, `attention` and the quantized
// training layer (quant/train_linear.h) with f32 CUDA inputs round their operands to bf16 and run
// the products on bf16 tensor cores with fp32 accumulation; they still take and return f32 (the
// products' results are written in f32, attention's output is converted back), and so do their
// gradients. Everything else (norms, activations, losses, parameters, optimizer) stays f32. The
// mode is read when the forward runs; the backward does what its forward chose. CPU tensors and
// f64/bf16 inputs are unaffected.
class AutocastBf16Guard {
 public:
  explicit AutocastBf16Guard(bool enable = true);
  ~AutocastBf16Guard();
  AutocastBf16Guard(const AutocastBf16Guard&) = delete;
  AutocastBf16Guard& operator=(const AutocastBf16Guard&) = delete;
  static bool active();

 private:
  bool prev_;
};
// True when a guard is active and x is an f32 tensor on the GPU (the products above go bf16).
bool autocast_bf16_applies(const Tensor& x);
// Under the guard, the training layers whose weight is computed each step (QuantTrainLinear's
// clipping quantizer, LsqTrainLinear's frozen codes times steps) write that weight in bf16 directly
// for the bf16 GEMMs, in one fused op (no f32 weight and no cast pass over it; the same values as
// computing it in f32 and casting). Off (LOWBIT_BF16_WEIGHT_FUSED=0 at start, or this switch): the
// unfused composition, for before/after timings and the tests that compare the two.
bool autocast_fused_weights();
void set_autocast_fused_weights(bool on);
// x converted to `dtype` on its device with ops::cast (no autograd; x itself, made contiguous, when it
// already has that dtype). Tensor::to(dtype) stages device tensors through the host.
Tensor cast_to(const Tensor& x, DType dtype);
Tensor to_bf16(const Tensor& x);  // cast_to(x, BF16)
// The bf16 operand of x for an autocast product: to_bf16(x.value()), cast once per activation when
// x is an op's output (kept on its node and shared by every product that reads it: the q/k/v
// projections of one normed input take one cast instead of three); a leaf (its value may be updated
// in place) is cast each time.
Tensor autocast_bf16_input(const Var& x);

}  // namespace lowbit
