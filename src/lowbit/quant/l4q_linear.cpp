#include "lowbit/quant/l4q_linear.h"

#include <cmath>

#include "lowbit/autograd/functions.h"
#include "lowbit/ops/ops.h"

namespace lowbit {

namespace {

// M = W0 + s B A (a new tensor).
Tensor merge(const Tensor& w0, const Tensor& a, const Tensor& b, double s) {
  Tensor m = w0.clone();
  ops::gemm(b, false, a, false, m, s, 1.0);
  return m;
}

// y = x Q(W0 + s B A)^T (+ bias) as one autograd op that keeps no [out, in] tensor between the
// forward and the backward (L4Q's memory-optimised layer): the backward recomputes M and Q(M), then
//   dx = dY Q,  dQ = dY^T x,  (dM, dstep, doffset) = lsq backward of dQ,  dB = s dM A^T,  dA = s B^T dM
// and frees them before the next layer's backward runs. Saved: x (as `linear` saves it) and the
// small parameters. x is [N, in].
Var l4q_linear(const Var& x, const Tensor& w0, const Var& A, const Var& B, const Var& step, const Var& offset,
               double s, const QuantFormat& f, double grad_scale, const Var& bias) {
  const Tensor xv = x.value().contiguous();
  LB_CHECK(xv.dim() == 2 && xv.size(1) == w0.size(1), "l4q: input ", xv.describe(), " does not match the weight [",
           w0.size(0), ", ", w0.size(1), "]");
  LB_CHECK(xv.device() == w0.device() && xv.dtype() == w0.dtype(), "l4q: input ", xv.describe(),
           " must have the weight's dtype and device (", w0.describe(), ")");
  const Tensor av = A.value().contiguous(), bv = B.value().contiguous(), sv = step.value().contiguous();
  const Tensor ov = offset.defined() ? offset.value().contiguous() : Tensor();
  Tensor y = Tensor::empty({xv.size(0), w0.size(0)}, xv.dtype(), xv.device());
  {
    const Tensor q = lsq_fake_quant_value(merge(w0, av, bv, s), sv, ov, f);
    ops::gemm(xv, false, q, true, y);
  }
  if (bias.defined()) ops::add(y, bias.value(), y);
  std::vector<Var> inputs{x, A, B, step};
  if (offset.defined()) inputs.push_back(offset);
  if (bias.defined()) inputs.push_back(bias);
  return make_result(y, inputs, "l4q_linear", [x, A, B, step, offset, bias, xv, w0, av, bv, sv, ov, s, &f,
                                               grad_scale](const Tensor& g) {
    const Tensor gc = g.contiguous();
    Tensor m = merge(w0, av, bv, s);
    Tensor dq = Tensor::empty(w0.shape(), w0.dtype(), w0.device());
    {
      const Tensor q = lsq_fake_quant_value(m, sv, ov, f);
      if (x.requires_grad()) {
        Tensor dx = Tensor::empty(xv.shape(), xv.dtype(), xv.device());
        ops::gemm(gc, false, q, false, dx);
        accumulate_grad(x, dx);
      }
    }
    ops::gemm(gc, true, xv, false, dq);
    Tensor dm, ds, dz;
    const bool need_dm = A.requires_grad() || B.requires_grad();
    lsq_fake_quant_grads(m, sv, ov, f, grad_scale, dq, need_dm ? &dm : nullptr, &ds, &dz);
    m = Tensor();
    dq = Tensor();
    if (step.requires_grad()) accumulate_grad(step, ds);
    if (offset.defined() && offset.requires_grad() && dz.defined()) accumulate_grad(offset, dz);
    if (B.requires_grad()) {
      Tensor dB = Tensor::empty(bv.shape(), bv.dtype(), bv.device());
      ops::gemm(dm, false, av, true, dB, s);
      accumulate_grad(B, dB);
    }
    if (A.requires_grad()) {
      Tensor dA = Tensor::empty(av.shape(), av.dtype(), av.device());
      ops::gemm(bv, true, dm, false, dA, s);
      accumulate_grad(A, dA);
    }
    if (bias.defined() && bias.requires_grad()) {
      Tensor db = Tensor::empty(bias.value().shape(), bias.value().dtype(), bias.value().device());
      ops::sum_rows(gc, db);
      accumulate_grad(bias, db);
    }
  });
}

}  // namespace

L4qTrainLinear::L4qTrainLinear(const Tensor& weight, const Tensor& bias, const QuantFormat& f, const LsqParams& init,
                               const L4qOptions& o)
    : format_(f), opt_(o) {
  LB_CHECK(lsq_supports(f), "l4q: format ", f.name, " is not a uniform integer format (LSQ needs intB{gG,pc}[s])");
  LB_CHECK(weight.defined() && weight.dim() == 2 && weight.numel() > 0, "l4q: weight must be a non-empty [out, in], got ",
           weight.defined() ? weight.describe() : std::string("undefined"));
  LB_CHECK(o.rank >= 1, "l4q: LoRA rank must be >= 1, got ", o.rank);
  LB_CHECK(o.lora_alpha > 0 && std::isfinite(o.lora_alpha), "l4q: lora_alpha must be > 0, got ", o.lora_alpha);
  // Everything lives on the weight's device (the quantizer and the GEMMs have CUDA bodies); the
  // LoRA initialisation is drawn on the CPU and copied, so it does not depend on the device.
  const Device dev = weight.device();
  const DType dt = weight.dtype() == DType::F64 ? DType::F64 : DType::F32;
  LB_CHECK(dev == Device::CPU || dt == DType::F32, "l4q: f64 weights must be on the CPU");
  const int64_t out = weight.size(0), in = weight.size(1), G = f.n_groups(in);
  w0_ = Var(weight.to(dt).contiguous().clone(), false);
  if (bias.defined()) {
    LB_CHECK(bias.numel() == out, "l4q: bias ", bias.describe(), " does not match ", out, " outputs");
    bias_ = Var(bias.to(dev).to(dt).contiguous().view({out}).clone(), false);
  }
  LB_CHECK(init.step.defined() && init.step.shape() == Shape({out, G}), "l4q: initial step must be [", out, ", ", G,
           "], got ", init.step.defined() ? init.step.describe() : std::string("undefined"));
  step_ = Var(init.step.to(dt).to(dev).contiguous().clone(), true);
  step_.set_name("l4q.step");
  if (f.kind == QuantKind::IntAsym) {
    LB_CHECK(init.offset.defined() && init.offset.shape() == Shape({out, G}), "l4q: format ", f.name,
             " needs an initial zero point [", out, ", ", G, "]");
    offset_ = Var(init.offset.to(dt).to(dev).contiguous().clone(), true);
    offset_.set_name("l4q.offset");
  }
  const double bound = 1.0 / std::sqrt(double(in));  // PEFT's kaiming_uniform_(a = sqrt(5))
  lora_A_ = Var(Tensor::uniform({o.rank, in}, o.seed, -bound, bound, dt).to(dev), true);
  lora_B_ = Var(Tensor::zeros({out, o.rank}, dt).to(dev), true);
  lora_A_.set_name("lora.A");
  lora_B_.set_name("lora.B");
}

Var L4qTrainLinear::merged_weight() const {
  return add(w0_, scale(matmul(lora_B_, lora_A_), lora_scale()));
}

Var L4qTrainLinear::quantized_weight() const {
  return lsq_fake_quant(merged_weight(), step_, offset_, format_, opt_.grad_scale);
}

Var L4qTrainLinear::forward(const Var& x) const {
  return l4q_linear(x, w0_.value(), lora_A_, lora_B_, step_, offset_, lora_scale(), format_, opt_.grad_scale, bias_);
}

std::vector<Var> L4qTrainLinear::lora_parameters() const { return {lora_A_, lora_B_}; }

std::vector<Var> L4qTrainLinear::quant_parameters() const {
  std::vector<Var> p{step_};
  if (offset_.defined()) p.push_back(offset_);
  return p;
}

std::vector<Var> L4qTrainLinear::parameters() const {
  std::vector<Var> p = lora_parameters();
  for (auto& q : quant_parameters()) p.push_back(q);
  return p;
}

Tensor L4qTrainLinear::effective_weight() const {
  NoGradGuard ng;
  return quantized_weight().value();
}

QuantizedTensor L4qTrainLinear::encode() const {
  NoGradGuard ng;
  const Tensor m = merged_weight().value();
  return lsq_encode(m, step_.value(), offset_.defined() ? offset_.value() : Tensor(), format_);
}

}  // namespace lowbit
