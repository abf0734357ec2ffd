// LSQ / LSQ+ fake quantization (quant/lsq.h): the forward against the written-out formula, the
// backward against f64 finite differences of its straight-through surrogate, the initialisations,
// and the packed encoding of a trained quantizer.
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "lowbit/autograd/functions.h"
#include "lowbit/quant/lsq.h"
#include "lowbit/quant/lsq_linear.h"
#include "lowbit/quant/quantize.h"

using namespace lowbit;

namespace {

double clampd(double x, double lo, double hi) { return x < lo ? lo : x > hi ? hi : x; }

struct Grid {
  double qlo, qhi;
  bool asym;
};
Grid grid(const QuantFormat& f) {
  if (f.kind == QuantKind::IntSym) {
    const double qp = double((1 << (f.bits - 1)) - 1);
    return {-qp, qp, false};
  }
  return {0, double((1 << f.bits) - 1), true};
}

// The forward written out (lsq.h): Ŵ = (round(clamp(w/s + zr, qlo, qhi)) - zr) * s.
Tensor reference_forward(const Tensor& w, const Tensor& s, const Tensor& z, const QuantFormat& f) {
  const Grid gr = grid(f);
  const int64_t out = w.size(0), in = w.size(1), G = f.n_groups(in);
  Tensor y = Tensor::empty({out, in}, DType::F64);
  for (int64_t r = 0; r < out; ++r)
    for (int64_t j = 0; j < in; ++j) {
      const int64_t g = f.group_of_column(j);
      const double sg = s.item(r * G + g);
      const double zr = gr.asym ? clampd(std::nearbyint(z.item(r * G + g)), gr.qlo, gr.qhi) : 0.0;
      const double q = std::nearbyint(clampd(w.item(r * in + j) / sg + zr, gr.qlo, gr.qhi));
      y.set_item(r * in + j, (q - zr) * sg);
    }
  return y;
}

// The straight-through surrogate around (w0, s0, z0): per element the clamp mask, the rounding
// residual round(u) - u (inside) or the clamped code (outside) and per group round(z) - z are held
// at their base values; then
//   inside:  Ŵ = s * (w/s + zr + resid - zr) = w + s * resid      (zr = z + dz_held)
//   outside: Ŵ = s * (code - zr)
// and the step's and offset's influence is scaled by g (LSQ's gradient scale) by evaluating
// them at s0 + g (s - s0), z0 + g (z - z0): the surrogate's derivative in s is g times the plain one.
struct Surrogate {
  const QuantFormat& f;
  double g;
  int64_t out, in, G;
  std::vector<double> resid, code, zheld, s0, z0;
  std::vector<char> inside;
  Surrogate(const QuantFormat& fmt, double gs, const Tensor& w, const Tensor& s, const Tensor& z)
      : f(fmt), g(gs), out(w.size(0)), in(w.size(1)), G(fmt.n_groups(w.size(1))) {
    const Grid gr = grid(f);
    resid.assign(size_t(out * in), 0);
    code.assign(size_t(out * in), 0);
    inside.assign(size_t(out * in), 0);
    zheld.assign(size_t(out * G), 0);
    s0.assign(size_t(out * G), 0);
    z0.assign(size_t(out * G), 0);
    for (int64_t k = 0; k < out * G; ++k) {
      s0[size_t(k)] = s.item(k);
      if (gr.asym) {
        z0[size_t(k)] = z.item(k);
        zheld[size_t(k)] = clampd(std::nearbyint(z.item(k)), gr.qlo, gr.qhi) - z.item(k);
      }
    }
    for (int64_t r = 0; r < out; ++r)
      for (int64_t j = 0; j < in; ++j) {
        const int64_t k = r * G + f.group_of_column(j), i = r * in + j;
        const double zr = gr.asym ? z0[size_t(k)] + zheld[size_t(k)] : 0.0;
        const double u = w.item(i) / s0[size_t(k)] + zr;
        inside[size_t(i)] = u >= gr.qlo && u <= gr.qhi;
        if (inside[size_t(i)]) resid[size_t(i)] = std::nearbyint(u) - u;
        else code[size_t(i)] = u < gr.qlo ? gr.qlo : gr.qhi;
      }
  }
  Tensor eval(const Tensor& w, const Tensor& s, const Tensor& z) const {
    const Grid gr = grid(f);
    Tensor y = Tensor::empty({out, in}, DType::F64);
    for (int64_t r = 0; r < out; ++r)
      for (int64_t j = 0; j < in; ++j) {
        const int64_t k = r * G + f.group_of_column(j), i = r * in + j;
        const double se = s0[size_t(k)] + g * (s.item(k) - s0[size_t(k)]);
        const double zr = gr.asym ? z0[size_t(k)] + g * (z.item(k) - z0[size_t(k)]) + zheld[size_t(k)] : 0.0;
        y.set_item(i, inside[size_t(i)] ? w.item(i) + se * resid[size_t(i)] : se * (code[size_t(i)] - zr));
      }
    return y;
  }
};

double dot(const Tensor& a, const Tensor& b) {
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) s += a.item(i) * b.item(i);
  return s;
}

void check_fd(Tensor x, const Tensor& grad, const std::function<double()>& loss, const std::string& what) {
  ASSERT_TRUE(grad.defined()) << what << ": no gradient";
  const double h = 1e-6;
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double o = x.item(i);
    x.set_item(i, o + h);
    const double lp = loss();
    x.set_item(i, o - h);
    const double lm = loss();
    x.set_item(i, o);
    const double num = (lp - lm) / (2 * h);
    ASSERT_NEAR(grad.item(i), num, 1e-6 * std::max(1.0, std::fabs(num))) << what << " element " << i;
  }
}

// A weight with some elements far outside a shrunk range, so both branches of the clamp occur.
Tensor test_weight(int64_t out, int64_t in, uint64_t seed) {
  Tensor w = Tensor::randn({out, in}, seed, 1.0, DType::F64);
  w.set_item(3, 6.0);
  w.set_item(in + 5, -7.0);
  return w;
}

}  // namespace

TEST(Lsq, ForwardMatchesFormulaForEveryInitAndFormat) {
  for (const char* name : {"int2g64", "int3g64", "int4g128", "int2g32s", "int4pcs", "int3pc", "int8pc"}) {
    const QuantFormat& f = parse_quant_format(name);
    const int64_t out = 5, in = 150;  // a short last group
    const Tensor w = test_weight(out, in, 7);
    for (LsqInit init : {LsqInit::Lsq, LsqInit::MinMax, LsqInit::Mse}) {
      LsqParams p = lsq_init(w, f, init);
      ASSERT_EQ(p.step.shape(), Shape({out, f.n_groups(in)})) << name;
      ASSERT_EQ(p.offset.defined(), f.kind == QuantKind::IntAsym) << name;
      for (int64_t i = 0; i < p.step.numel(); ++i) ASSERT_GT(p.step.item(i), 0) << name;
      Var y = lsq_fake_quant(Var(w), Var(p.step), p.offset.defined() ? Var(p.offset) : Var(), f, 1.0);
      const Tensor ref = reference_forward(w, p.step, p.offset, f);
      for (int64_t i = 0; i < ref.numel(); ++i)
        ASSERT_EQ(y.value().item(i), ref.item(i)) << name << " " << lsq_init_name(init) << " element " << i;
      // f32 agrees with f64 to rounding.
      Var y32 = lsq_fake_quant(Var(w.to(DType::F32)), Var(p.step.to(DType::F32)),
                               p.offset.defined() ? Var(p.offset.to(DType::F32)) : Var(), f, 1.0);
      for (int64_t i = 0; i < ref.numel(); ++i)
        ASSERT_NEAR(y32.value().item(i), ref.item(i), 1e-5 * (1 + std::fabs(ref.item(i)))) << name << " f32 " << i;
    }
  }
}

TEST(Lsq, MinMaxInitIsRoundToNearestAndMseInitIsNoWorse) {
  for (const char* name : {"int2g64", "int3g64", "int4g128s"}) {
    const QuantFormat& f = parse_quant_format(name);
    const Tensor w = Tensor::randn({8, 128}, 3, 1.0, DType::F32);
    LsqParams mm = lsq_init(w, f, LsqInit::MinMax);
    const Tensor rtn = quantize(w, f).dequantize();
    Var y = lsq_fake_quant(Var(w), Var(mm.step), mm.offset.defined() ? Var(mm.offset) : Var(), f, 1.0);
    for (int64_t i = 0; i < w.numel(); ++i) ASSERT_EQ(y.value().item(i), rtn.item(i)) << name << " element " << i;
    LsqParams ms = lsq_init(w, f, LsqInit::Mse);
    Var ym = lsq_fake_quant(Var(w), Var(ms.step), ms.offset.defined() ? Var(ms.offset) : Var(), f, 1.0);
    double e_mm = 0, e_ms = 0;
    for (int64_t i = 0; i < w.numel(); ++i) {
      e_mm += std::pow(y.value().item(i) - w.item(i), 2);
      e_ms += std::pow(ym.value().item(i) - w.item(i), 2);
    }
    EXPECT_LE(e_ms, e_mm * (1 + 1e-6)) << name;
  }
}

TEST(Lsq, GradientsMatchFiniteDifferencesOfTheSurrogate) {
  for (const char* name : {"int2g64", "int3g32", "int4pc", "int2g32s", "int4pcs"}) {
    const QuantFormat& f = parse_quant_format(name);
    const int64_t out = 3, in = 70;
    const Tensor w = test_weight(out, in, 11);
    LsqParams p = lsq_init(w, f, LsqInit::Mse);
    // Shrink the steps so that clamping happens, and put offsets off the integers (STE on round(z)).
    for (int64_t i = 0; i < p.step.numel(); ++i) p.step.set_item(i, p.step.item(i) * 0.7);
    if (p.offset.defined())
      for (int64_t i = 0; i < p.offset.numel(); ++i) p.offset.set_item(i, p.offset.item(i) + 0.23);
    const double g = lsq_grad_scale(f, in);
    EXPECT_NEAR(g, 1.0 / std::sqrt(double(f.group_size ? std::min<int64_t>(f.group_size, in) : in) * double(lsq_qp(f))),
                1e-15);
    Var wv(w.clone(), true), sv(p.step.clone(), true), zv = p.offset.defined() ? Var(p.offset.clone(), true) : Var();
    const Tensor proj = Tensor::randn({out, in}, 5, 1.0, DType::F64);
    Var y = lsq_fake_quant(wv, sv, zv, f, g);
    Surrogate sur(f, g, w, p.step, p.offset.defined() ? p.offset : Tensor::zeros(p.step.shape(), DType::F64));
    Tensor wx = w.clone(), sx = p.step.clone(), zx = p.offset.defined() ? p.offset.clone() : Tensor::zeros(p.step.shape(), DType::F64);
    ASSERT_LT(std::fabs(dot(sur.eval(wx, sx, zx), proj) - dot(y.value(), proj)), 1e-10)
        << name << ": the surrogate equals the forward at the base point";
    backward(sum(mul(y, Var(proj))));
    auto loss = [&] { return dot(sur.eval(wx, sx, zx), proj); };
    check_fd(wx, wv.grad(), loss, std::string(name) + " dW");
    check_fd(sx, sv.grad(), loss, std::string(name) + " dstep");
    if (zv.defined()) check_fd(zx, zv.grad(), loss, std::string(name) + " doffset");
    // Both branches were exercised: some weight gradient is zero (clamped), some is not.
    int zeros = 0;
    for (int64_t i = 0; i < wv.grad().numel(); ++i) zeros += wv.grad().item(i) == 0;
    EXPECT_GT(zeros, 0) << name;
    EXPECT_LT(zeros, wv.grad().numel()) << name;
  }
}

TEST(Lsq, GroupScaleDequantGradient) {
  const QuantFormat& f = parse_quant_format("int2g32");
  const Tensor c = Tensor::randn({4, 80}, 2, 1.0, DType::F64);
  Var s(Tensor::randn({4, f.n_groups(80)}, 4, 1.0, DType::F64), true);
  const Tensor proj = Tensor::randn({4, 80}, 6, 1.0, DType::F64);
  Var y = group_scale_dequant(c, s, f);
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t j = 0; j < 80; ++j)
      ASSERT_EQ(y.value().item(r * 80 + j), c.item(r * 80 + j) * s.value().item(r * 3 + j / 32));
  backward(sum(mul(y, Var(proj))));
  Tensor sx = s.value().clone();
  check_fd(sx, s.grad(), [&] { return dot(group_scale_dequant(c, Var(sx), f).value(), proj); }, "dstep");
}

TEST(Lsq, EncodeDecodesToTheForwardWithTheStoredStep) {
  for (const char* name : {"int2g64", "int3g64", "int4g32s", "int8pc"}) {
    const QuantFormat& f = parse_quant_format(name);
    const Tensor w = Tensor::randn({6, 200}, 9, 0.05, DType::F32);
    LsqParams p = lsq_init(w, f, LsqInit::Mse);
    if (p.offset.defined()) p.offset.set_item(0, p.offset.item(0) + 0.4);  // rounds back
    const QuantizedTensor q = lsq_encode(w, p.step, p.offset, f);
    const Tensor stored = lsq_storage_step(p.step);
    Var y = lsq_fake_quant(Var(w), Var(stored), p.offset.defined() ? Var(p.offset) : Var(), f, 1.0);
    const Tensor dq = q.dequantize();
    for (int64_t i = 0; i < w.numel(); ++i) ASSERT_EQ(dq.item(i), y.value().item(i)) << name << " element " << i;
    // frozen codes round-trip: c * step = the same values, and re-encoding gives the same bytes.
    const FrozenCodes fc = frozen_codes(q);
    Var yc = group_scale_dequant(fc.codes, Var(fc.step), f);
    for (int64_t i = 0; i < w.numel(); ++i) ASSERT_EQ(yc.value().item(i), dq.item(i)) << name << " frozen " << i;
    const QuantizedTensor q2 = encode_frozen(fc, fc.step, f);
    const Tensor dq2 = q2.dequantize();
    for (int64_t i = 0; i < w.numel(); ++i) ASSERT_EQ(dq2.item(i), dq.item(i)) << name << " re-encoded " << i;
  }
}

TEST(Lsq, Int8CodesOnlyForIntegersInRange) {
  Tensor c = Tensor::empty({2, 3}, DType::F32);
  const float v[] = {-128, 127, 0, 3, -2, 1};
  for (int i = 0; i < 6; ++i) c.data<float>()[i] = v[i];
  const Tensor q = int8_codes(c);
  ASSERT_TRUE(q.defined());
  ASSERT_EQ(q.dtype(), DType::I8);
  ASSERT_EQ(q.shape(), c.shape());
  for (int i = 0; i < 6; ++i) EXPECT_EQ(q.data<int8_t>()[i], int8_t(v[i]));
  c.data<float>()[4] = -1.5f;  // a half-integer zero point (ParetoQ's 2-bit SEQ) stays f32
  EXPECT_FALSE(int8_codes(c).defined());
  c.data<float>()[4] = 128.0f;
  EXPECT_FALSE(int8_codes(c).defined());
  c.data<float>()[4] = NAN;
  EXPECT_FALSE(int8_codes(c).defined());
  // E2E-QP's layer computes the packed tensor's values from its codes: I8 up to 4 bits (asym and sym),
  // f32 where q - z may leave [-128, 127] (int8 asymmetric).
  for (const char* name : {"int2g64", "int4g32s", "int3g64", "int8pc"}) {
    const QuantFormat& f = parse_quant_format(name);
    const QuantizedTensor qt = quantize(Tensor::randn({5, 128}, 3, 0.05, DType::F32), f);
    if (f.bits <= 4) {
      ASSERT_TRUE(int8_codes(frozen_codes(qt).codes).defined()) << name;
    }
    const Tensor w = LsqTrainLinear(qt, Tensor()).effective_weight(), dq = qt.dequantize();
    for (int64_t i = 0; i < dq.numel(); ++i) ASSERT_EQ(w.item(i), dq.item(i)) << name << " " << i;
  }
}

TEST(Lsq, RejectsBadInputs) {
  const QuantFormat& f = parse_quant_format("int2g64");
  const Tensor w = Tensor::randn({2, 64}, 1, 1.0, DType::F32);
  LsqParams p = lsq_init(w, f, LsqInit::MinMax);
  EXPECT_THROW(lsq_fake_quant(Var(w), Var(p.step), Var(), f, 1.0), Error);  // asym needs an offset
  EXPECT_THROW(lsq_fake_quant(Var(w), Var(Tensor::full({2, 2}, 1.0)), Var(p.offset), f, 1.0), Error);
  EXPECT_THROW(lsq_fake_quant(Var(w), Var(p.step), Var(p.offset), parse_quant_format("q4_0"), 1.0), Error);
  EXPECT_THROW(lsq_fake_quant(Var(w), Var(p.step), Var(p.offset), parse_quant_format("int2g64s"), 1.0), Error);
  EXPECT_THROW(parse_lsq_init("bogus"), Error);
}
