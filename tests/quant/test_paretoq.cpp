// ParetoQ's quantizers (quant/paretoq.h): the sign / SEQ forward against the written-out formulas
// of the reference code, the backward against f64 finite differences of its straight-through
// surrogate, the initialisations, the 3-4 bit LSQ grid, and the packed encoding (half-integer zero
// points for 2-bit SEQ) decoding to exactly the trained fake-quant weights.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <set>
#include <string>

#include "lowbit/autograd/functions.h"
#include "lowbit/ops/device_init.h"
#include "lowbit/ops/quant_matmul.h"
#include "lowbit/quant/lsq.h"
#include "lowbit/quant/paretoq.h"
#include "lowbit/quant/paretoq_linear.h"
#include "lowbit/quant/quant_linear.h"

using namespace lowbit;

namespace {

constexpr double kClip = 1.0 - 1e-2;

double clampd(double x, double lo, double hi) { return x < lo ? lo : x > hi ? hi : x; }
double sgn(double x) { return x > 0 ? 1.0 : x < 0 ? -1.0 : 0.0; }

// The reference code's forward, written out in terms of α (utils_quant.py):
//   1 bit:    α sign(w)
//   1.58 bit: α round(clamp(w/α, -c, c) 1.5) / 1.5
//   2 bit:    α (round(clamp(w/α, -c, c) 2 - 0.5) + 0.5) / 2
double reference_level(ParetoQBits b, double w, double a) {
  a = std::max(a, 1e-5);
  const double v = w / a;
  switch (b) {
    case ParetoQBits::One: return a * sgn(w);
    case ParetoQBits::Ternary: return a * std::nearbyint(clampd(v, -kClip, kClip) * 1.5) / 1.5;
    case ParetoQBits::Two: return a * (std::nearbyint(clampd(v, -kClip, kClip) * 2 - 0.5) + 0.5) / 2;
    default: break;
  }
  return NAN;
}

struct Case {
  ParetoQBits bits;
  const char* format;
};
const Case kSeqCases[] = {{ParetoQBits::Two, "int2g64"},      {ParetoQBits::Two, "int2pc"},
                          {ParetoQBits::Ternary, "int2g32s"}, {ParetoQBits::Ternary, "int2pcs"},
                          {ParetoQBits::Ternary, "int2g64"},  {ParetoQBits::One, "int2pcs"},
                          {ParetoQBits::One, "int2g128"}};

std::string label(const Case& c) { return std::string(paretoq_bits_name(c.bits)) + "-bit " + c.format; }

// A weight with a few elements far out, so that with a shrunk α both sides of the clip occur.
Tensor test_weight(int64_t out, int64_t in, uint64_t seed) {
  Tensor w = Tensor::randn({out, in}, seed, 1.0, DType::F64);
  w.set_item(3, 6.0);
  w.set_item(in + 5, -7.0);
  w.set_item(2 * in + 1, 0.0);  // sign(0) = 0
  return w;
}

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

// The straight-through surrogate around (w0, α0) (paretoq.h): per element the mask, the rounding
// residual ρ = q - v (inside), the clamped level and sign(w0) are held; α enters as α0 + g (α - α0):
//   SEQ inside:   Ŵ = w + α ρ              SEQ outside: Ŵ = α0 q_edge + (α - α0) Q±
//   sign:         Ŵ = α sign(w0) + m (w - w0), m = 1[|w0/α0| <= 1]
struct Surrogate {
  ParetoQBits b;
  const QuantFormat& f;
  double g;
  int64_t out, in, G;
  std::vector<double> w0, a0, rho, level, qpm;
  std::vector<char> inside;
  Surrogate(ParetoQBits bits, const QuantFormat& fmt, double gs, const Tensor& w, const Tensor& a)
      : b(bits), f(fmt), g(gs), out(w.size(0)), in(w.size(1)), G(fmt.n_groups(w.size(1))) {
    const size_t n = size_t(out * in);
    w0.resize(n), rho.resize(n), level.resize(n), qpm.resize(n), inside.resize(n);
    for (int64_t k = 0; k < out * G; ++k) a0.push_back(a.item(k));
    for (int64_t r = 0; r < out; ++r)
      for (int64_t j = 0; j < in; ++j) {
        const size_t i = size_t(r * in + j);
        const double al = a0[size_t(r * G + f.group_of_column(j))];
        w0[i] = w.item(int64_t(i));
        const double v = w0[i] / al, q = reference_level(b, w0[i], al) / al;
        const double lim = b == ParetoQBits::One ? 1.0 : kClip;
        inside[i] = v >= -lim && v <= lim;
        rho[i] = q - v;
        level[i] = q;
        const double qp = b == ParetoQBits::Two ? 0.75 : 1.0;  // the reference's Q±
        qpm[i] = v < 0 ? -qp : qp;
      }
  }
  Tensor eval(const Tensor& w, const Tensor& a) const {
    Tensor y = Tensor::empty({out, in}, DType::F64);
    for (int64_t r = 0; r < out; ++r)
      for (int64_t j = 0; j < in; ++j) {
        const size_t i = size_t(r * in + j), k = size_t(r * G + f.group_of_column(j));
        const double ae = a0[k] + g * (a.item(int64_t(k)) - a0[k]);
        const double x = w.item(int64_t(i));
        double v;
        if (b == ParetoQBits::One) v = ae * sgn(w0[i]) + (inside[i] ? x - w0[i] : 0.0);
        else if (inside[i]) v = x + ae * rho[i];
        else v = a0[k] * level[i] + (ae - a0[k]) * qpm[i];
        y.set_item(int64_t(i), v);
      }
    return y;
  }
};

}  // namespace

TEST(ParetoQ, BitNamesAndDefaults) {
  for (ParetoQBits b : {ParetoQBits::One, ParetoQBits::Ternary, ParetoQBits::Two, ParetoQBits::Three, ParetoQBits::Four})
    EXPECT_EQ(parse_paretoq_bits(paretoq_bits_name(b)), b);
  EXPECT_EQ(parse_paretoq_bits("ternary"), ParetoQBits::Ternary);
  EXPECT_THROW(parse_paretoq_bits("1.5"), Error);
  EXPECT_EQ(paretoq_default_bits(parse_quant_format("int2g64")), ParetoQBits::Two);
  EXPECT_EQ(paretoq_default_bits(parse_quant_format("int2pcs")), ParetoQBits::Ternary);
  EXPECT_EQ(paretoq_default_bits(parse_quant_format("int3g128")), ParetoQBits::Three);
  EXPECT_EQ(paretoq_default_bits(parse_quant_format("int4g32s")), ParetoQBits::Four);
  EXPECT_THROW(paretoq_default_bits(parse_quant_format("int8pc")), Error);
  EXPECT_THROW(paretoq_default_bits(parse_quant_format("q4_0")), Error);
  EXPECT_NEAR(paretoq_grad_scale(ParetoQBits::Two, 400), 1.0 / 20, 1e-15);
  EXPECT_NEAR(paretoq_grad_scale(ParetoQBits::Four, 7), 1.0 / 7, 1e-15);
}

TEST(ParetoQ, InitIsTheReferenceCodes) {
  const int64_t out = 4, in = 150;  // a short last group
  const Tensor w = test_weight(out, in, 3);
  for (const char* name : {"int2g64", "int2pcs", "int4g32", "int3pc"}) {
    const QuantFormat& f = parse_quant_format(name);
    for (ParetoQBits b : {ParetoQBits::One, ParetoQBits::Ternary, ParetoQBits::Two, ParetoQBits::Three, ParetoQBits::Four}) {
      try {
        paretoq_check_format(b, f);
      } catch (const Error&) {
        continue;
      }
      const Tensor a = paretoq_init_alpha(w, b, f);
      const int64_t G = f.n_groups(in);
      ASSERT_EQ(a.shape(), Shape({out, G}));
      for (int64_t r = 0; r < out; ++r)
        for (int64_t g = 0; g < G; ++g) {
          double amax = 0, asum = 0;
          for (int64_t j = f.group_begin(g); j < f.group_end(g, in); ++j)
            amax = std::max(amax, std::fabs(w.item(r * in + j))), asum += std::fabs(w.item(r * in + j));
          const double n = double(f.group_end(g, in) - f.group_begin(g));
          const double want = b == ParetoQBits::One     ? asum / n
                              : b == ParetoQBits::Three ? amax / 3
                              : b == ParetoQBits::Four  ? amax / 7
                                                        : amax;
          ASSERT_NEAR(a.item(r * G + g), want, 1e-12 * want) << name << " " << paretoq_bits_name(b);
        }
    }
  }
  // An all-zero group gets the floor, not 0.
  const Tensor z = Tensor::zeros({1, 64}, DType::F32);
  EXPECT_EQ(paretoq_init_alpha(z, ParetoQBits::Two, parse_quant_format("int2g64")).item(0), float(1e-5));
}

TEST(ParetoQ, ForwardMatchesTheReferenceFormula) {
  for (const Case& c : kSeqCases) {
    const QuantFormat& f = parse_quant_format(c.format);
    const int64_t out = 5, in = 150;
    const Tensor w = test_weight(out, in, 7);
    Tensor a = paretoq_init_alpha(w, c.bits, f);
    for (int64_t i = 0; i < a.numel(); ++i) a.set_item(i, a.item(i) * (i % 2 ? 0.4 : 1.0));  // clip some
    Var y = paretoq_fake_quant(Var(w), Var(a), c.bits, f, 1.0);
    const int64_t G = f.n_groups(in);
    std::set<double> levels;
    for (int64_t r = 0; r < out; ++r)
      for (int64_t j = 0; j < in; ++j) {
        const double al = a.item(r * G + f.group_of_column(j));
        const double want = reference_level(c.bits, w.item(r * in + j), al);
        const double got = y.value().item(r * in + j);
        ASSERT_NEAR(got, want, 1e-14 * al) << label(c) << " element " << r << "," << j;
        levels.insert(std::nearbyint(got / al * 12));  // in twelfths of α: ±9, ±3 (2 bit); ±8, 0 (1.58); ±12, 0 (1)
      }
    const std::set<double> grid = c.bits == ParetoQBits::Two       ? std::set<double>{-9, -3, 3, 9}
                                  : c.bits == ParetoQBits::Ternary ? std::set<double>{-8, 0, 8}
                                                                   : std::set<double>{-12, 0, 12};
    EXPECT_EQ(levels, grid) << label(c) << ": every level of the grid is used, and nothing else";
    // f32 agrees with f64 to rounding.
    Var y32 = paretoq_fake_quant(Var(w.to(DType::F32)), Var(a.to(DType::F32)), c.bits, f, 1.0);
    for (int64_t i = 0; i < w.numel(); ++i)
      ASSERT_NEAR(y32.value().item(i), y.value().item(i), 1e-5 * (1 + std::fabs(y.value().item(i)))) << label(c) << " f32 " << i;
  }
}

TEST(ParetoQ, GradientsMatchFiniteDifferencesOfTheSurrogate) {
  for (const Case& c : kSeqCases) {
    const QuantFormat& f = parse_quant_format(c.format);
    const int64_t out = 3, in = 70;
    const Tensor w = test_weight(out, in, 11);
    Tensor a = paretoq_init_alpha(w, c.bits, f);
    for (int64_t i = 0; i < a.numel(); ++i) a.set_item(i, a.item(i) * 0.5);  // clip some (sign: |v| > 1)
    const double g = paretoq_grad_scale(c.bits, out * in);
    Var wv(w.clone(), true), av(a.clone(), true);
    const Tensor proj = Tensor::randn({out, in}, 5, 1.0, DType::F64);
    Var y = paretoq_fake_quant(wv, av, c.bits, f, g);
    Surrogate sur(c.bits, f, g, w, a);
    Tensor wx = w.clone(), ax = a.clone();
    ASSERT_LT(std::fabs(dot(sur.eval(wx, ax), proj) - dot(y.value(), proj)), 1e-10)
        << label(c) << ": the surrogate equals the forward at the base point";
    backward(sum(mul(y, Var(proj))));
    auto loss = [&] { return dot(sur.eval(wx, ax), proj); };
    check_fd(wx, wv.grad(), loss, label(c) + " dW");
    check_fd(ax, av.grad(), loss, label(c) + " dalpha");
    int zeros = 0;
    for (int64_t i = 0; i < wv.grad().numel(); ++i) zeros += wv.grad().item(i) == 0;
    EXPECT_GT(zeros, 0) << label(c) << ": some weights are clipped";
    EXPECT_LT(zeros, wv.grad().numel()) << label(c);
  }
}

TEST(ParetoQ, LsqFormOfThreeAndFourBitsIsThePapersSignedGrid) {
  // The reference's LsqBinaryTernaryExtension: α clamp(round(w/α), -2^(b-1), 2^(b-1) - 1).
  for (const char* name : {"int3g64", "int4pc", "int4g32"}) {
    const QuantFormat& f = parse_quant_format(name);
    const ParetoQBits b = paretoq_default_bits(f);
    const int64_t out = 4, in = 100, G = f.n_groups(in);
    const Tensor w = test_weight(out, in, 13);
    LsqParams p = paretoq_lsq_params(w, b, f);
    for (int64_t i = 0; i < p.step.numel(); ++i) p.step.set_item(i, p.step.item(i) * 0.6);
    Var y = lsq_fake_quant(Var(w), Var(p.step), Var(p.offset), f, 1.0);
    const double qn = -double(1 << (f.bits - 1)), qp = double((1 << (f.bits - 1)) - 1);
    bool lowest = false;
    for (int64_t r = 0; r < out; ++r)
      for (int64_t j = 0; j < in; ++j) {
        const double s = p.step.item(r * G + f.group_of_column(j));
        const double k = clampd(std::nearbyint(w.item(r * in + j) / s), qn, qp);
        lowest |= k == qn;
        ASSERT_EQ(y.value().item(r * in + j), k * s) << name << " " << r << "," << j;
      }
    EXPECT_TRUE(lowest) << name << ": the extra negative level -2^(b-1) is reached";
    // The packed tensor holds it (zero point 2^(b-1), code 0).
    const Tensor w32 = w.to(DType::F32), s32 = lsq_storage_step(p.step).to(DType::F32);
    const QuantizedTensor q = lsq_encode(w32, s32, p.offset, f);
    Var ys = lsq_fake_quant(Var(w32), Var(s32), Var(p.offset.to(DType::F32)), f, 1.0);
    const Tensor dq = q.dequantize();
    for (int64_t i = 0; i < w.numel(); ++i) ASSERT_EQ(dq.item(i), ys.value().item(i)) << name << " " << i;
  }
}

TEST(ParetoQ, EncodeDecodesToTheFakeQuantWeightsExactly) {
  for (const Case& c : kSeqCases) {
    const QuantFormat& f = parse_quant_format(c.format);
    const Tensor w = Tensor::randn({6, 200}, 9, 0.05, DType::F32);
    Tensor a = paretoq_init_alpha(w, c.bits, f);
    for (int64_t i = 0; i < a.numel(); ++i) a.set_item(i, a.item(i) * (0.55 + 0.01 * double(i % 7)));  // trained-like
    const Tensor stored = paretoq_storage_alpha(a, c.bits);
    const double n = c.bits == ParetoQBits::Two ? 2 : c.bits == ParetoQBits::Ternary ? 1.5 : 1;
    for (int64_t i = 0; i < a.numel(); ++i) {
      const float h = float(stored.item(i) / n);
      ASSERT_EQ(f16_to_f32(f32_to_f16(h)), h) << label(c) << ": the grid step is an f16 value";
      ASSERT_NEAR(stored.item(i), a.item(i), a.item(i) * std::ldexp(1.0, -10)) << label(c);
    }
    const QuantizedTensor q = paretoq_encode(w, a, c.bits, f);
    ASSERT_EQ(q.format, f.id);
    if (f.has_zero) {
      EXPECT_EQ(q.group_params(0, 0).zero, c.bits == ParetoQBits::Two ? 1.5f : 1.0f) << label(c);
    }
    const Tensor dq = q.dequantize();
    Var y = paretoq_fake_quant(Var(w), Var(stored), c.bits, f, 1.0);
    for (int64_t i = 0; i < w.numel(); ++i) ASSERT_EQ(dq.item(i), y.value().item(i)) << label(c) << " element " << i;
    // The packed layer runs it: y = x dq^T through the packed kernels.
    const Tensor x = Tensor::randn({3, 200}, 4, 1.0, DType::F32);
    QuantLinear ql(q, Tensor(), Device::CPU);
    NoGradGuard ng;
    const Tensor got = ql.forward(Var(x)).value();
    const Tensor want = linear(Var(x), Var(dq), Var()).value();
    double scale = 0;
    for (int64_t i = 0; i < want.numel(); ++i) scale = std::max(scale, std::fabs(want.item(i)));
    for (int64_t i = 0; i < want.numel(); ++i)
      ASSERT_NEAR(got.item(i), want.item(i), 2e-2 * scale) << label(c) << " packed forward " << i;
  }
}

TEST(ParetoQ, TrainLayerExportsItsOwnFunction) {
  const QuantFormat& f = parse_quant_format("int2g64");
  const Tensor w = Tensor::randn({8, 128}, 21, 0.1, DType::F32);
  SeqTrainLinear layer(w, Tensor(), f, ParetoQBits::Two, paretoq_init_alpha(w, ParetoQBits::Two, f),
                       paretoq_grad_scale(ParetoQBits::Two, w.numel()));
  EXPECT_EQ(layer.parameters().size(), 2u);
  // A gradient step moves α off the f16 grid; snapping puts the layer's function on the packed one.
  Var loss = sum(mul(layer.forward(Var(Tensor::randn({4, 128}, 2))), Var(Tensor::randn({4, 8}, 3))));
  backward(loss);
  for (Var p : layer.parameters()) {
    ASSERT_TRUE(p.grad().defined());
    Tensor& v = p.mutable_value();
    for (int64_t i = 0; i < v.numel(); ++i) v.set_item(i, v.item(i) - 1e-3 * p.grad().item(i));
  }
  layer.snap_alpha();
  const Tensor dq = layer.encode().dequantize(), ew = layer.effective_weight();
  for (int64_t i = 0; i < dq.numel(); ++i) ASSERT_EQ(dq.item(i), ew.item(i)) << i;
}

TEST(ParetoQ, RejectsBadInputs) {
  const QuantFormat& f = parse_quant_format("int2g64");
  const Tensor w = Tensor::randn({2, 64}, 1, 1.0, DType::F32);
  const Tensor a = paretoq_init_alpha(w, ParetoQBits::Two, f);
  EXPECT_THROW(paretoq_fake_quant(Var(w), Var(Tensor::full({2, 2}, 1.0)), ParetoQBits::Two, f, 1.0), Error);  // shape
  EXPECT_THROW(paretoq_fake_quant(Var(w), Var(a.to(DType::F64)), ParetoQBits::Two, f, 1.0), Error);         // dtype
  EXPECT_THROW(paretoq_fake_quant(Var(w), Var(a), ParetoQBits::Two, parse_quant_format("int2g64s"), 1.0), Error);
  EXPECT_THROW(paretoq_fake_quant(Var(w), Var(a), ParetoQBits::Two, parse_quant_format("q4_0"), 1.0), Error);
  EXPECT_THROW(paretoq_fake_quant(Var(w), Var(a), ParetoQBits::Four, f, 1.0), Error);  // LSQ's, not SEQ's
  EXPECT_THROW(paretoq_fake_quant(Var(w), Var(a), ParetoQBits::Two, f, NAN), Error);
  EXPECT_THROW(paretoq_check_format(ParetoQBits::Ternary, parse_quant_format("int3g64")), Error);
  EXPECT_THROW(paretoq_check_format(ParetoQBits::Three, parse_quant_format("int4g64")), Error);
  EXPECT_THROW(paretoq_init_alpha(Tensor::zeros({0, 4}), ParetoQBits::Two, f), Error);
  EXPECT_THROW(paretoq_lsq_params(w, ParetoQBits::Two, f), Error);
  Tensor big = a.clone();
  big.set_item(0, 1e6);  // the step does not fit f16
  EXPECT_THROW(paretoq_encode(w, big, ParetoQBits::Two, f), Error);
  Tensor bad = a.clone();
  bad.set_item(0, NAN);
  EXPECT_THROW(paretoq_encode(w, bad, ParetoQBits::Two, f), Error);
}

// The packed kernels take the zero point as a float: 2-bit SEQ's half-integer zero point (1.5) runs
// on every backend within the bounds of tests/quant/test_quant_matmul.cpp (exact: 1e-5 relative to
// sum |x w|; int8 activations: plus the activation rounding), against the reference body.
TEST(ParetoQ, HalfIntegerZeroPointsRunOnEveryPackedBackend) {
  struct Be {
    const char* name;
    ops::QuantMatmulPath path;
    ops::QuantIsa isa;
    bool int8, cuda;
  };
  const Be backends[] = {{"exact", ops::QuantMatmulPath::Exact, ops::QuantIsa::Auto, false, false},
                         {"auto", ops::QuantMatmulPath::Auto, ops::QuantIsa::Auto, true, false},
                         {"int8-portable", ops::QuantMatmulPath::Int8, ops::QuantIsa::Portable, true, false},
                         {"int8-avx2", ops::QuantMatmulPath::Int8, ops::QuantIsa::Avx2, true, false},
                         {"int8-avx2-vnni", ops::QuantMatmulPath::Int8, ops::QuantIsa::Avx2Vnni, true, false},
                         {"cuda", ops::QuantMatmulPath::Auto, ops::QuantIsa::Auto, true, true},
                         {"cuda-int8", ops::QuantMatmulPath::Int8, ops::QuantIsa::Auto, true, true},
                         {"cuda-exact", ops::QuantMatmulPath::Exact, ops::QuantIsa::Auto, false, true}};
  const bool gpu = init_cuda();
  if (gpu) ops::set_cuda_packed_enabled(true);
  int run = 0;
  for (const char* name : {"int2g32", "int2g64", "int2g128", "int2pc"})
    for (const auto& [out, in, M] : {std::array<int64_t, 3>{7, 96, 1}, {16, 256, 3}, {9, 200, 12}, {33, 512, 1}}) {
      const QuantFormat& f = parse_quant_format(name);
      const Tensor w = Tensor::randn({out, in}, 5 + uint64_t(in), 0.05);
      const QuantizedTensor q = paretoq_encode(w, paretoq_init_alpha(w, ParetoQBits::Two, f), ParetoQBits::Two, f);
      const ops::PackedWeight view = q.packed_view();
      const Tensor x = Tensor::randn({M, in}, 3 + uint64_t(out), 1.0);
      Tensor yref = Tensor::empty({M, out});
      ops::quant_matmul(x, view, yref, {ops::QuantMatmulPath::Reference});
      const Tensor wd = q.dequantize();
      const Tensor dense = linear(Var(x), Var(wd), Var()).value();
      for (int64_t i = 0; i < M * out; ++i) ASSERT_NEAR(yref.item(i), dense.item(i), 1e-4) << name << " reference";
      const int64_t ab = ops::quant_matmul_act_block(view);
      for (const Be& be : backends) {
        if ((be.cuda && (!gpu || !ops::quant_matmul_has_cuda_layout(view))) || !ops::quant_isa_supported(be.isa)) continue;
        Tensor y = Tensor::empty({M, out});
        if (be.cuda) {
          q.upload_to_device();
          Tensor yd = Tensor::empty({M, out}, DType::F32, Device::CUDA);
          ops::quant_matmul(x.to(Device::CUDA), q.packed_view(), yd, {be.path, be.isa});
          y = yd.to(Device::CPU);
        } else {
          ops::quant_matmul(x, view, y, {be.path, be.isa});
        }
        ++run;
        for (int64_t m = 0; m < M; ++m)
          for (int64_t o = 0; o < out; ++o) {
            double sc = 0, rb = 0;
            for (int64_t b0 = 0; b0 < in; b0 += ab) {
              double amax = 0;
              for (int64_t i = b0; i < std::min(in, b0 + ab); ++i) amax = std::max(amax, std::fabs(x.item(m * in + i)));
              for (int64_t i = b0; i < std::min(in, b0 + ab); ++i) {
                sc += std::fabs(wd.item(o * in + i) * x.item(m * in + i));
                rb += std::fabs(wd.item(o * in + i)) * amax / 127.0 / 2.0;
              }
            }
            const double tol = 1e-5 * sc + 1e-7 + (be.int8 ? rb * (1 + 1e-3) : 0.0);
            ASSERT_LE(std::fabs(y.item(m * out + o) - yref.item(m * out + o)), tol)
                << name << " x " << be.name << " [" << out << "x" << in << "] M=" << M << " output " << m << "," << o;
          }
      }
    }
  EXPECT_GT(run, 0);
}
