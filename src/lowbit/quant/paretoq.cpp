// ParetoQ's sign / SEQ fake quantization: forward and backward side by side (formulas and gradient
// conventions in paretoq.h).
#include "lowbit/quant/paretoq.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "lowbit/core/dtype.h"
#include "lowbit/ops/qat_quant.h"

namespace lowbit {

namespace {

// The grid of one low-bit quantizer and its per-element arithmetic: ops::SeqGrid and
// ops/qat_quant_math.h (shared with the op bodies).
using Seq = ops::SeqGrid;
constexpr double kEps = ops::qat::kSeqEps;
Seq seq_of(ParetoQBits b) {
  switch (b) {
    case ParetoQBits::One: return {true, 1.0, 0.0, 1.0};
    case ParetoQBits::Ternary: return {false, 1.5, 0.0, 1.0};
    case ParetoQBits::Two: return {false, 2.0, 0.5, 0.75};
    default: break;
  }
  throw_error("paretoq: ", paretoq_bits_name(b), "-bit weights train with LSQ (quant/lsq.h), not SEQ");
}

void check_params(const Tensor& w, const Tensor& alpha, ParetoQBits b, const QuantFormat& f, const char* who) {
  paretoq_check_format(b, f);
  LB_CHECK(w.defined() && w.dim() == 2 && w.numel() > 0, who, " [", f.name,
           "]: weight must be a non-empty [out, in], got ", w.defined() ? w.describe() : std::string("undefined"));
  const Shape gs{w.size(0), f.n_groups(w.size(1))};
  LB_CHECK(alpha.defined() && alpha.shape() == gs, who, " [", f.name, "]: alpha must be ", shape_str(gs),
           " (one per group), got ", alpha.defined() ? alpha.describe() : std::string("undefined"));
  LB_CHECK(alpha.device() == w.device() && alpha.dtype() == w.dtype(), who, " [", f.name, "]: ", alpha.describe(),
           " must have the weight's dtype and device (", w.describe(), ")");
}

}  // namespace

const char* paretoq_bits_name(ParetoQBits b) {
  switch (b) {
    case ParetoQBits::One: return "1";
    case ParetoQBits::Ternary: return "1.58";
    case ParetoQBits::Two: return "2";
    case ParetoQBits::Three: return "3";
    case ParetoQBits::Four: return "4";
  }
  return "?";
}

ParetoQBits parse_paretoq_bits(const std::string& name) {
  if (name == "1") return ParetoQBits::One;
  if (name == "1.58" || name == "ternary") return ParetoQBits::Ternary;
  if (name == "2") return ParetoQBits::Two;
  if (name == "3") return ParetoQBits::Three;
  if (name == "4") return ParetoQBits::Four;
  throw_error("unknown ParetoQ bit width '", name, "' (expected 1, 1.58, 2, 3 or 4)");
}

bool paretoq_is_seq(ParetoQBits b) { return b == ParetoQBits::One || b == ParetoQBits::Ternary || b == ParetoQBits::Two; }

ParetoQBits paretoq_default_bits(const QuantFormat& f) {
  if (f.kind == QuantKind::IntAsym || f.kind == QuantKind::IntSym) {
    if (f.bits == 2) return f.kind == QuantKind::IntAsym ? ParetoQBits::Two : ParetoQBits::Ternary;
    if (f.bits == 3) return ParetoQBits::Three;
    if (f.bits == 4) return ParetoQBits::Four;
  }
  throw_error("paretoq: format ", f.name,
              " has no ParetoQ bit width (use int2 asymmetric for 2-bit SEQ, int2 symmetric for ternary, int3/int4 "
              "for LSQ: int2g64, int2pcs, int4g128, ...)");
}

void paretoq_check_format(ParetoQBits b, const QuantFormat& f) {
  const bool is_int = f.kind == QuantKind::IntAsym || f.kind == QuantKind::IntSym;
  switch (b) {
    case ParetoQBits::Two:
      LB_CHECK(is_int && f.bits == 2 && f.kind == QuantKind::IntAsym, "paretoq: 2-bit SEQ's levels {-1.5, -0.5, 0.5, 1.5} "
               "x step need an asymmetric int2 format (zero point 1.5: int2g32, int2g64, int2g128, int2pc); ", f.name,
               " cannot hold them");
      return;
    case ParetoQBits::Ternary:
    case ParetoQBits::One:
      LB_CHECK(is_int && f.bits == 2, "paretoq: ", paretoq_bits_name(b), "-bit weights {-1, 0, 1} x step per group need an "
               "int2 format (int2g64s, int2pcs, or asymmetric int2 with zero point 1); ", f.name, " cannot hold them");
      return;
    case ParetoQBits::Three:
    case ParetoQBits::Four: {
      const int bits = b == ParetoQBits::Three ? 3 : 4;
      LB_CHECK(is_int && f.bits == bits, "paretoq: ", bits, "-bit LSQ needs an int", bits, " format (int", bits,
               "g128, int", bits, "pc, ...); got ", f.name);
      return;
    }
  }
}

double paretoq_grad_scale(ParetoQBits b, int64_t numel) {
  LB_CHECK(numel > 0, "paretoq_grad_scale: empty weight");
  const double qp = b == ParetoQBits::Three ? 3.0 : b == ParetoQBits::Four ? 7.0 : 1.0;
  return 1.0 / std::sqrt(double(numel) * qp);
}

Tensor paretoq_init_alpha(const Tensor& w_in, ParetoQBits b, const QuantFormat& f) {
  paretoq_check_format(b, f);
  LB_CHECK(w_in.defined() && w_in.dim() == 2 && w_in.numel() > 0 && w_in.device() == Device::CPU &&
               (w_in.dtype() == DType::F32 || w_in.dtype() == DType::F64),
           "paretoq_init_alpha [", f.name, "]: weight must be a non-empty f32/f64 [out, in] on the CPU, got ",
           w_in.describe());
  const Tensor w = w_in.to(DType::F64).contiguous();
  const int64_t out = w.size(0), in = w.size(1), G = f.n_groups(in);
  Tensor alpha = Tensor::empty({out, G}, DType::F64);
  const double* wp = w.data<double>();
  double* ap = alpha.data<double>();
  const double div = b == ParetoQBits::Three ? 3.0 : b == ParetoQBits::Four ? 7.0 : 1.0;
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t j0 = f.group_begin(g), j1 = f.group_end(g, in);
      double amax = 0, asum = 0;
      for (int64_t j = j0; j < j1; ++j) {
        const double x = std::fabs(wp[r * in + j]);
        amax = std::max(amax, x);
        asum += x;
      }
      const double a = b == ParetoQBits::One ? asum / double(j1 - j0) : amax / div;
      ap[r * G + g] = std::max(a, kEps);
    }
  return alpha.to(w_in.dtype());
}

LsqParams paretoq_lsq_params(const Tensor& w, ParetoQBits b, const QuantFormat& f) {
  LB_CHECK(!paretoq_is_seq(b), "paretoq: ", paretoq_bits_name(b), "-bit weights train with SEQ / sign, not LSQ");
  LsqParams p;
  p.step = paretoq_init_alpha(w, b, f);
  if (f.kind == QuantKind::IntAsym) p.offset = Tensor::full(p.step.shape(), double(1 << (f.bits - 1)), p.step.dtype());
  return p;
}

Var paretoq_fake_quant(const Var& w, const Var& alpha, ParetoQBits b, const QuantFormat& f, double grad_scale) {
  LB_CHECK(w.defined() && alpha.defined(), "paretoq_fake_quant [", f.name, "]: undefined weight or alpha");
  const Seq q = seq_of(b);
  const Tensor wv = w.value().contiguous(), av = alpha.value().contiguous();
  check_params(wv, av, b, f, "paretoq_fake_quant");
  LB_CHECK(std::isfinite(grad_scale), "paretoq_fake_quant [", f.name, "]: gradient scale must be finite");
  Tensor y;
  ops::seq_quant_forward(wv, av, q, f, y);
  return make_result(y, {w, alpha}, "paretoq_fake_quant", [w, alpha, wv, av, q, &f, grad_scale](const Tensor& gy) {
    Tensor dw, da;
    ops::seq_quant_backward(wv, av, gy.contiguous(), q, f, grad_scale, w.requires_grad() ? &dw : nullptr, da);
    if (dw.defined()) accumulate_grad(w, dw);
    if (alpha.requires_grad()) accumulate_grad(alpha, da);
  });
}

Tensor paretoq_storage_alpha(const Tensor& alpha, ParetoQBits b) {
  const Seq q = seq_of(b);
  LB_CHECK(alpha.defined() && alpha.device() == Device::CPU && (alpha.dtype() == DType::F32 || alpha.dtype() == DType::F64),
           "paretoq_storage_alpha: alpha must be f32/f64 on the CPU");
  Tensor a = alpha.to(DType::F64).contiguous().clone();
  double* p = a.data<double>();
  for (int64_t i = 0; i < a.numel(); ++i) {
    LB_CHECK(std::isfinite(p[i]), "paretoq: alpha ", p[i], " is not finite");
    const double ae = std::max(p[i], kEps);
    uint16_t hb = f32_to_f16(float(ae / q.n));
    double h = f16_to_f32(hb);
    // Never below the floor (the forward would lift it and change the step) nor 0.
    if (!(h * q.n >= kEps) || !(h > 0)) {
      ++hb;
      h = f16_to_f32(hb);
    }
    LB_CHECK(std::isfinite(h), "paretoq: alpha ", p[i], " does not fit the f16 storage of the format's scales");
    p[i] = h * q.n;
  }
  return a.to(alpha.dtype());
}

QuantizedTensor paretoq_encode(const Tensor& w_in, const Tensor& alpha_in, ParetoQBits b, const QuantFormat& f) {
  const Seq q = seq_of(b);
  const Tensor w = w_in.to(Device::CPU).to(DType::F32).contiguous();
  const Tensor alpha = paretoq_storage_alpha(alpha_in.to(Device::CPU).to(DType::F32), b).contiguous();
  check_params(w, alpha, b, f, "paretoq_encode");
  const int64_t out = w.size(0), in = w.size(1), G = f.n_groups(in);
  // Code = k + the zero point: 2-bit SEQ k in {-2..1}, zero 1.5 -> code k + 2 (w = (code - 1.5) h);
  // ternary / sign k in {-1, 0, 1}, zero 1 (asymmetric) or the implicit 2 (symmetric).
  const float zero = b == ParetoQBits::Two ? 1.5f : (f.kind == QuantKind::IntSym ? 2.0f : 1.0f);
  const float code_of_k0 = b == ParetoQBits::Two ? 2.0f : zero;
  std::vector<uint8_t> codes(size_t(out * in));
  std::vector<GroupParams> params(size_t(out * G));
  const float* wp = w.data<float>();
  const float* ap = alpha.data<float>();
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const float a = ops::qat::seq_alpha(ap[r * G + g]);
      params[size_t(r * G + g)] = {a / float(q.n), zero};
      for (int64_t j = f.group_begin(g), e = f.group_end(g, in); j < e; ++j) {
        const float x = wp[r * in + j];
        codes[size_t(r * in + j)] = uint8_t(ops::qat::seq_k(q, x, x / a) + code_of_k0);
      }
    }
  return make_quantized_tensor(f, out, in, codes.data(), params.data(), 1.0f);
}

}  // namespace lowbit
