#include "lowbit/quant/train_linear.h"

#include <cmath>

#include "lowbit/autograd/functions.h"
#include "lowbit/ops/ops.h"
#include "lowbit/quant/lwc.h"
#include "lowbit/quant/quantize.h"

namespace lowbit {

namespace {

// Rounds every value to the nearest f16 (the adapters' storage precision), kept as f32.
Tensor round_to_f16(const Tensor& t) { return t.to(Device::CPU).to(DType::F16).to(DType::F32).contiguous(); }

// W_eff = Q(W; gamma, beta) + s B A as one autograd op (the merged form of ApiQ's PEFT layer
// x Q^T + s (x A^T) B^T, same function). Fusing saves the B A temporary, the scale and the add
// passes over [out, in] in both directions: the forward writes Q and lets the GEMM accumulate
// s B A into it (beta = 1); the backward reads dW_eff once for the clipping gradients (lwc.h's
// straight-through backward) and twice in the LoRA GEMMs dB = s dW_eff A^T, dA = s B^T dW_eff.
// W is frozen (no gradient).
Var lwc_lora_weight(const Var& w, const Var& gamma, const Var& beta, const Var& A, const Var& B, double s,
                    const QuantFormat& f) {
  const Tensor wv = w.value().contiguous(), gv = gamma.value().contiguous();
  const Tensor bv = beta.defined() ? beta.value().contiguous() : Tensor();
  const Tensor av = A.value().contiguous(), bbv = B.value().contiguous();
  Tensor y = Tensor::empty(wv.shape(), wv.dtype(), wv.device());
  lwc_forward_into(wv, gv, bv, f, y);
  ops::gemm(bbv, false, av, false, y, s, 1.0);
  std::vector<Var> inputs{gamma, A, B};
  if (beta.defined()) inputs.push_back(beta);
  return make_result(y, inputs, "lwc_lora_weight", [gamma, beta, A, B, wv, gv, bv, av, bbv, s, &f](const Tensor& g) {
    const Tensor gc = g.contiguous();
    if (gamma.requires_grad() || (beta.defined() && beta.requires_grad())) {
      Tensor no_dw;
      Tensor dg = Tensor::empty(gv.shape(), gv.dtype(), gv.device());
      Tensor db = bv.defined() ? Tensor::empty(bv.shape(), bv.dtype(), bv.device()) : Tensor();
      lwc_backward_into(wv, gv, bv, gc, f, no_dw, dg, db);
      accumulate_grad(gamma, dg);
      if (db.defined()) accumulate_grad(beta, db);
    }
    if (B.requires_grad()) {
      Tensor dB = Tensor::empty(bbv.shape(), bbv.dtype(), bbv.device());
      ops::gemm(gc, false, av, true, dB, s);
      accumulate_grad(B, dB);
    }
    if (A.requires_grad()) {
      Tensor dA = Tensor::empty(av.shape(), av.dtype(), av.device());
      ops::gemm(bbv, true, gc, false, dA, s);
      accumulate_grad(A, dA);
    }
  });
}

// The gradients of y = x Q^T + s (x A^T) B^T (+ bias) other than Q's, shared by lora_linear and
// lwc_linear_bf16: with u = dY B, dB = s dY^T t, dA = s u^T x, dx = dY Q + s u A, dbias = the sum of
// dY's rows. gc: dY; go, qo: dY and Q as the large products read them (bf16 copies under autocast);
// t = x A^T from the forward. A undefined: no LoRA (dx = dY Q).
void lora_input_grads(const Var& x, const Var& A, const Var& B, const Var& bias, const Tensor& gc, const Tensor& go,
                      const Tensor& qo, const Tensor& xv, const Tensor& av, const Tensor& bv, const Tensor& t, double s) {
  const bool lora = A.defined();
  if (lora && B.requires_grad()) {
    Tensor dB = Tensor::empty(bv.shape(), bv.dtype(), bv.device());
    ops::gemm(gc, true, t, false, dB, s);
    accumulate_grad(B, dB);
  }
  Tensor u;
  if (lora && (A.requires_grad() || x.requires_grad())) {
    u = Tensor::empty(t.shape(), t.dtype(), t.device());
    ops::gemm(gc, false, bv, false, u);
  }
  if (lora && A.requires_grad()) {
    Tensor dA = Tensor::empty(av.shape(), av.dtype(), av.device());
    ops::gemm(u, true, xv, false, dA, s);
    accumulate_grad(A, dA);
  }
  if (x.requires_grad()) {
    Tensor dx = Tensor::empty(xv.shape(), xv.dtype(), xv.device());
    ops::gemm(go, false, qo, false, dx);
    if (lora) ops::gemm(u, false, av, false, dx, s, 1.0);
    accumulate_grad(x, dx);
  }
  if (bias.defined() && bias.requires_grad()) {
    Tensor db = Tensor::empty(bias.value().shape(), bias.value().dtype(), bias.value().device());
    ops::sum_rows(gc, db);
    accumulate_grad(bias, db);
  }
}

// y = x Q^T + s (x A^T) B^T (+ bias): PEFT's LoRA form (ApiQ's layer), one autograd op. The
// rank-r products stay [N, r]; nothing of size [out, in] is formed besides Q itself (the merged
// form above writes Q + s B A and reads dW_eff twice more in the backward: three extra passes over
// [out, in] per step). Backward with u = dY B:  dQ = dY^T x,  dB = s dY^T t,  dA = s u^T x,
// dx = dY Q + s u A, with t = x A^T saved from the forward. x is [N, in].
Var lora_linear(const Var& x, const Var& q, const Var& A, const Var& B, double s, const Var& bias) {
  const Tensor xv = x.value().contiguous(), qv = q.value().contiguous();
  const Tensor av = A.value().contiguous(), bv = B.value().contiguous();
  LB_CHECK(xv.dim() == 2 && qv.dim() == 2 && xv.size(1) == qv.size(1), "lora_linear: x ", xv.describe(),
           " and weight ", qv.describe(), " do not match (weight is [out, in])");
  const int64_t n = xv.size(0), r = av.size(0);
  // Under AutocastBf16Guard the three large products (x Q^T, dY^T x, dY Q) take bf16 operands xo,
  // qo (and dY's copy) and write f32, as `linear` does; the rank-r LoRA products stay f32 (cheap).
  const bool mixed = autocast_bf16_applies(xv) && qv.dtype() == DType::F32;
  const Tensor xo = mixed ? to_bf16(xv) : xv, qo = mixed ? to_bf16(qv) : qv;
  Tensor t = Tensor::empty({n, r}, xv.dtype(), xv.device());
  ops::gemm(xv, false, av, true, t);
  Tensor y = Tensor::empty({n, qv.size(0)}, xv.dtype(), xv.device());
  ops::gemm(xo, false, qo, true, y);
  ops::gemm(t, false, bv, true, y, s, 1.0);
  if (bias.defined()) ops::add(y, bias.value(), y);
  std::vector<Var> inputs{x, q, A, B};
  if (bias.defined()) inputs.push_back(bias);
  return make_result(y, inputs, "lora_linear", [x, q, A, B, bias, xv, xo, qo, av, bv, t, s, mixed](const Tensor& g) {
    const Tensor gc = g.contiguous();
    const Tensor go = mixed ? to_bf16(gc) : gc;
    if (q.requires_grad()) {
      Tensor dq = Tensor::empty(qo.shape(), xv.dtype(), qo.device());
      ops::gemm(go, true, xo, false, dq);
      accumulate_grad(q, dq);
    }
    lora_input_grads(x, A, B, bias, gc, go, qo, xv, av, bv, t, s);
  });
}

// Under AutocastBf16Guard: y = x Q(W; gamma, beta)^T + s (x A^T) B^T (+ bias) as one autograd op
// whose quantizer writes Q in bf16 directly (lwc_forward_into with a bf16 output), the operand of
// the bf16 GEMMs: no f32 Q, and no cast pass over it, per step. The backward forms dQ = dY^T x (f32,
// from the bf16 operands) and passes it straight to the clipping backward (dgamma, dbeta); the LoRA
// and input gradients are lora_linear's. The same function as lwc_fake_quant followed by
// lora_linear (or linear when rank is 0): Q rounded to bf16 is what their to_bf16 gives.
// A and B undefined: no LoRA (rank 0).
Var lwc_linear_bf16(const Var& x, const Var& w, const Var& gamma, const Var& beta, const Var& A, const Var& B,
                    double s, const Var& bias, const QuantFormat& f) {
  const Tensor xv = x.value().contiguous(), wv = w.value().contiguous(), gv = gamma.value().contiguous();
  const Tensor bv = beta.defined() ? beta.value().contiguous() : Tensor();
  const bool lora = A.defined();
  const Tensor av = lora ? A.value().contiguous() : Tensor(), bbv = lora ? B.value().contiguous() : Tensor();
  LB_CHECK(xv.dim() == 2 && xv.size(1) == wv.size(1), "lwc_linear_bf16: x ", xv.describe(), " and weight ",
           wv.describe(), " do not match (weight is [out, in])");
  const int64_t n = xv.size(0);
  Tensor qo = Tensor::empty(wv.shape(), DType::BF16, wv.device());
  lwc_forward_into(wv, gv, bv, f, qo);
  const Tensor xo = autocast_bf16_input(x);  // one cast for the layers that read the same input
  Tensor y = Tensor::empty({n, wv.size(0)}, xv.dtype(), xv.device());
  ops::gemm(xo, false, qo, true, y);
  Tensor t;
  if (lora) {
    t = Tensor::empty({n, av.size(0)}, xv.dtype(), xv.device());
    ops::gemm(xv, false, av, true, t);
    ops::gemm(t, false, bbv, true, y, s, 1.0);
  }
  if (bias.defined()) ops::add(y, bias.value(), y);
  std::vector<Var> inputs{x, gamma};
  if (beta.defined()) inputs.push_back(beta);
  if (lora) inputs.push_back(A), inputs.push_back(B);
  if (bias.defined()) inputs.push_back(bias);
  return make_result(y, inputs, "lwc_linear_bf16", [=, &f](const Tensor& g) {
    const Tensor gc = g.contiguous();
    const Tensor go = to_bf16(gc);
    if (gamma.requires_grad() || (beta.defined() && beta.requires_grad())) {
      Tensor dq = Tensor::empty(wv.shape(), DType::F32, wv.device());
      ops::gemm(go, true, xo, false, dq);
      Tensor no_dw;
      Tensor dg = Tensor::empty(gv.shape(), gv.dtype(), gv.device());
      Tensor db = bv.defined() ? Tensor::empty(bv.shape(), bv.dtype(), bv.device()) : Tensor();
      lwc_backward_into(wv, gv, bv, dq, f, no_dw, dg, db);
      accumulate_grad(gamma, dg);
      if (db.defined()) accumulate_grad(beta, db);
    }
    lora_input_grads(x, A, B, bias, gc, go, qo, xv, av, bbv, t, s);
  });
}
}  // namespace

QuantTrainLinear::QuantTrainLinear(const Tensor& weight, const Tensor& bias, const QuantFormat& f,
                                   const QuantTrainOptions& o, const Tensor& lora_A, const Tensor& lora_B)
    : format_(f), opt_(o) {
  LB_CHECK(weight.defined() && weight.dim() == 2 && weight.numel() > 0,
           "QuantTrainLinear: weight must be a non-empty [out, in], got ",
           weight.defined() ? weight.describe() : std::string("undefined"));
  LB_CHECK(lwc_supports(f), "QuantTrainLinear: format ", f.name,
           " has no learnable clipping (use a uniform integer format: int2g64, int3g128, int4g128s, ..., or one of "
           "the ggml types ", lwc_ggml_names(), ")");
  LB_CHECK(o.rank >= 0, "QuantTrainLinear: LoRA rank must be >= 0, got ", o.rank);
  LB_CHECK(o.rank == 0 || o.lora_alpha > 0, "QuantTrainLinear: lora_alpha must be > 0, got ", o.lora_alpha);
  // Everything lives on the weight's device (the GPU when the model is there: lwc and the GEMMs
  // have CUDA bodies, so a training step never leaves the device). The LoRA initialisation is drawn
  // on the CPU and copied, so it does not depend on the device.
  const Device dev = weight.device();
  LB_CHECK(dev == Device::CPU || weight.dtype() != DType::F64, "QuantTrainLinear: f64 weights must be on the CPU");
  const DType dt = weight.dtype() == DType::F64 ? DType::F64 : DType::F32;
  const int64_t out = weight.size(0), in = weight.size(1);
  LB_CHECK(!lwc_is_ggml(f) || in % f.group_size == 0, "QuantTrainLinear: format ", f.name, ": rows of ", in,
           " values are not whole ", f.group_size, "-value blocks (--preset falls back to a 32-value type for such "
           "rows, as llama.cpp)");
  LB_CHECK(!lwc_is_ggml(f) || dev == Device::CPU, "QuantTrainLinear: format ", f.name,
           ": learnable clipping on the ggml block grids runs on the CPU (--device cpu)");
  const int64_t G = lwc_n_groups(f, in);
  const Tensor wt = weight.to(dt).contiguous();
  weight_ = Var(o.share_weight ? wt : wt.clone(), false);
  if (bias.defined()) {
    LB_CHECK(bias.numel() == out, "QuantTrainLinear: bias ", bias.describe(), " does not match ", out, " outputs");
    bias_ = Var(bias.to(dev).to(dt).contiguous().view({out}).clone(), false);
  }
  if (lwc_is_ggml(f) && o.clip_init_rtn) {
    Tensor g = Tensor::empty({1}, dt), b;
    lwc_ggml_init_from_rtn(weight, f, g, b);
    gamma_ = Var(g.to(dt).to(dev), true);
    if (b.defined()) beta_ = Var(b.to(dt).to(dev), true);
  } else {
    gamma_ = Var(Tensor::full({out, G}, o.clip_init, dt).to(dev), true);
    if (lwc_has_beta(f)) beta_ = Var(Tensor::full({out, G}, o.clip_init, dt).to(dev), true);
  }
  gamma_.set_name("lwc.gamma");
  beta_.set_name("lwc.beta");
  if (o.rank == 0) return;
  const int64_t r = o.rank;
  Tensor a, b;
  switch (o.init) {
    case LoraInit::Kaiming: {
      const double bound = 1.0 / std::sqrt(double(in));  // kaiming_uniform_(a = sqrt(5)): gain sqrt(1/3) * sqrt(3/in)
      a = Tensor::uniform({r, in}, o.seed, -bound, bound, dt);
      b = Tensor::zeros({out, r}, dt);
      break;
    }
    case LoraInit::Gaussian:
      a = Tensor::randn({r, in}, o.seed, 1.0 / double(r), dt);
      b = Tensor::zeros({out, r}, dt);
      break;
    case LoraInit::Given:
      LB_CHECK(lora_A.defined() && lora_A.shape() == Shape({r, in}), "QuantTrainLinear: given lora_A must be [", r,
               ", ", in, "], got ", lora_A.defined() ? lora_A.describe() : std::string("undefined"));
      LB_CHECK(lora_B.defined() && lora_B.shape() == Shape({out, r}), "QuantTrainLinear: given lora_B must be [", out,
               ", ", r, "], got ", lora_B.defined() ? lora_B.describe() : std::string("undefined"));
      a = lora_A.to(Device::CPU).to(dt).contiguous().clone();
      b = lora_B.to(Device::CPU).to(dt).contiguous().clone();
      break;
  }
  lora_A_ = Var(a.to(dev), true);
  lora_B_ = Var(b.to(dev), true);
  lora_A_.set_name("lora.A");
  lora_B_.set_name("lora.B");
}

Var QuantTrainLinear::quantized_weight(bool with_lora) const {
  if (with_lora && opt_.rank > 0) return lwc_lora_weight(weight_, gamma_, beta_, lora_A_, lora_B_, lora_scale(), format_);
  return lwc_fake_quant(weight_, gamma_, beta_, format_);
}

// PEFT's form (lora_linear) for the layer's output; the merged Q + s B A (quantized_weight) is
// what effective_weight() and the SAPR regularizer use. Same function either way.
Var QuantTrainLinear::forward(const Var& x) const {
  // bf16 autocast on the GPU: the quantizer writes Q in bf16 for the GEMMs (lwc_linear_bf16).
  if (autocast_bf16_applies(x.value()) && weight_.value().dtype() == DType::F32 && !lwc_is_ggml(format_) && autocast_fused_weights())
    return lwc_linear_bf16(x, weight_, gamma_, beta_, opt_.rank > 0 ? lora_A_ : Var(), opt_.rank > 0 ? lora_B_ : Var(),
                           lora_scale(), bias_, format_);
  if (opt_.rank == 0) return linear(x, quantized_weight(false), bias_);
  return lora_linear(x, quantized_weight(false), lora_A_, lora_B_, lora_scale(), bias_);
}

std::vector<Var> QuantTrainLinear::clip_parameters() const {
  std::vector<Var> p{gamma_};
  if (beta_.defined()) p.push_back(beta_);
  return p;
}

std::vector<Var> QuantTrainLinear::lora_parameters() const {
  if (opt_.rank == 0) return {};
  return {lora_A_, lora_B_};
}

std::vector<Var> QuantTrainLinear::parameters() const {
  std::vector<Var> p = clip_parameters();
  for (auto& v : lora_parameters()) p.push_back(v);
  return p;
}

Tensor QuantTrainLinear::effective_weight() const {
  NoGradGuard ng;
  return quantized_weight(true).value();
}

FinalizedLinear QuantTrainLinear::finalize() const {
  FinalizedLinear r;
  const Tensor w = weight_.value().to(Device::CPU).to(DType::F32).contiguous();
  r.q = lwc_encode(w, gamma_.value(), beta_.defined() ? beta_.value() : Tensor(), format_);
  if (opt_.rank > 0) {
    r.lora_A = round_to_f16(lora_A_.value());
    Tensor b = lora_B_.value().to(Device::CPU).to(DType::F32).contiguous().clone();
    float* p = b.data<float>();
    const float s = float(lora_scale());
    for (int64_t i = 0; i < b.numel(); ++i) p[i] *= s;
    r.lora_B = round_to_f16(b);
  }
  return r;
}

}  // namespace lowbit
