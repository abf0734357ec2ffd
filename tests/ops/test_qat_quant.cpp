// The QAT weight quantizer ops (ops/qat_quant.h) on the CPU against the formulas of quant/lsq.h and
// quant/paretoq.h written out here element by element, in f64 and f32; and their argument checks.
// Their gradients against finite differences (f64, of the straight-through surrogate) are
// tests/quant/test_lsq.cpp and tests/quant/test_paretoq.cpp; CPU vs CUDA: Parity.QatQuantizers.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "lowbit/ops/qat_quant.h"
#include "qat_cases.h"

using namespace lowbit;

namespace {

double at(const Tensor& t, int64_t r, int64_t c) { return t.item(r * t.size(1) + c); }

struct Lsq {
  double qlo, qhi;
  bool asym;
};
Lsq lsq_of(const FormatTraits& f) {
  if (f.kind == QuantKind::IntSym) {
    const double qp = std::pow(2.0, f.bits - 1) - 1;
    return {-qp, qp, false};
  }
  return {0, std::pow(2.0, f.bits) - 1, true};
}

void expect_close(double got, double want, double tol, const std::string& what) {
  EXPECT_NEAR(got, want, tol * std::max(1.0, std::fabs(want))) << what;
}

}  // namespace

TEST(QatQuantOps, LsqForwardAndBackwardAreTheWrittenOutFormulas) {
  for (DType dt : {DType::F64, DType::F32}) {
    const double tol = dt == DType::F64 ? 1e-12 : 1e-5;
    uint64_t seed = 10;
    for (const auto& c : test::qat_format_cases()) {
      const test::QatParams p = test::qat_params(c, seed += 10);
      const Tensor w = p.w.to(dt), s = p.step.to(dt), z = p.offset.defined() ? p.offset.to(dt) : Tensor();
      const Tensor dy = p.dy.to(dt);
      const double gscale = 0.07;
      Tensor y, dw, ds, dz;
      ops::lsq_quant_forward(w, s, z, c.f, y);
      ops::lsq_quant_backward(w, s, z, dy, c.f, gscale, &dw, ds, &dz);
      ASSERT_EQ(dz.defined(), c.f.kind == QuantKind::IntAsym);
      const Lsq g = lsq_of(c.f);
      const int64_t G = c.f.n_groups(c.in);
      int clamped = 0;
      for (int64_t r = 0; r < c.out; ++r)
        for (int64_t k = 0; k < G; ++k) {
          const double sv = at(s, r, k);
          const double zr = g.asym ? std::clamp(std::nearbyint(at(z, r, k)), g.qlo, g.qhi) : 0.0;
          double dsum = 0, zsum = 0;
          for (int64_t j = c.f.group_begin(k); j < c.f.group_end(k, c.in); ++j) {
            const double x = at(w, r, j), d = at(dy, r, j), u = x / sv + zr;
            const double q = std::nearbyint(std::clamp(u, g.qlo, g.qhi));
            const std::string what = std::string(c.f.name) + " " + dtype_name(dt) + " (" + std::to_string(r) + ", " +
                                     std::to_string(j) + ")";
            expect_close(at(y, r, j), (q - zr) * sv, tol, what + " y");
            const bool inside = u >= g.qlo && u <= g.qhi;
            clamped += !inside;
            EXPECT_EQ(at(dw, r, j), inside ? d : 0.0) << what << " dw";
            dsum += inside ? d * (q - u) : d * (q - zr);
            zsum += inside ? 0.0 : -d * sv;
          }
          expect_close(at(ds, r, k), gscale * dsum, 10 * tol, std::string(c.f.name) + " dstep");
          if (g.asym) expect_close(at(dz, r, k), gscale * zsum, 10 * tol, std::string(c.f.name) + " doffset");
        }
      EXPECT_GT(clamped, 0) << c.f.name << ": the case should clamp some elements";
    }
  }
}

TEST(QatQuantOps, SeqForwardAndBackwardAreTheWrittenOutFormulas) {
  const test::QatFormatCase c = test::qat_format_cases()[0];
  const test::QatParams p = test::qat_params(c, 77);
  for (DType dt : {DType::F64, DType::F32}) {
    const double tol = dt == DType::F64 ? 1e-12 : 1e-5;
    const Tensor w = p.w.to(dt), a = p.alpha.to(dt), dy = p.dy.to(dt);
    for (const auto& sc : test::seq_cases()) {
      Tensor y, dw, da;
      ops::seq_quant_forward(w, a, sc.q, c.f, y);
      ops::seq_quant_backward(w, a, dy, sc.q, c.f, 0.05, &dw, da);
      const double n = sc.q.n, shift = sc.q.shift, clip = sc.q.sign ? 1.0 : 0.99;
      for (int64_t r = 0; r < c.out; ++r)
        for (int64_t k = 0; k < c.f.n_groups(c.in); ++k) {
          const double al = std::max(at(a, r, k), 1e-5);
          double dsum = 0;
          for (int64_t j = c.f.group_begin(k); j < c.f.group_end(k, c.in); ++j) {
            const double x = at(w, r, j), v = x / al, d = at(dy, r, j);
            const double kk = sc.q.sign ? (x > 0) - (x < 0) : std::nearbyint(std::clamp(v, -0.99, 0.99) * n - shift);
            const double level = (kk + shift) / n;
            const std::string what = std::string(sc.name) + " " + dtype_name(dt) + " col " + std::to_string(j);
            expect_close(at(y, r, j), level * al, tol, what + " y");
            const bool inside = std::fabs(v) <= clip;
            EXPECT_EQ(at(dw, r, j), inside ? d : 0.0) << what << " dw";
            dsum += sc.q.sign ? d * kk : inside ? d * (level - v) : d * (v < 0 ? -sc.q.outside : sc.q.outside);
          }
          expect_close(at(da, r, k), 0.05 * dsum, 10 * tol, std::string(sc.name) + " dalpha");
        }
    }
  }
}

TEST(QatQuantOps, GroupScaleIsCodesTimesTheGroupStep) {
  for (const auto& c : test::qat_format_cases()) {
    const test::QatParams p = test::qat_params(c, 5);
    const Tensor codes = p.codes.to(DType::F64), s = p.step.to(DType::F64), dy = p.dy.to(DType::F64);
    Tensor y, ds;
    ops::group_scale_forward(codes, s, c.f, y);
    ops::group_scale_backward(codes, dy, c.f, ds);
    for (int64_t r = 0; r < c.out; ++r)
      for (int64_t k = 0; k < c.f.n_groups(c.in); ++k) {
        double sum = 0;
        for (int64_t j = c.f.group_begin(k); j < c.f.group_end(k, c.in); ++j) {
          EXPECT_DOUBLE_EQ(at(y, r, j), at(codes, r, j) * at(s, r, k));
          sum += at(codes, r, j) * at(dy, r, j);
        }
        EXPECT_NEAR(at(ds, r, k), sum, 1e-12 * std::max(1.0, std::fabs(sum))) << c.f.name;
      }
  }
}

// Integer codes as I8 (E2E-QP's frozen codes on the device) give exactly what the same integers in
// the step's float dtype give, forward and backward (the sums run in the same order), f64 and f32.
TEST(QatQuantOps, GroupScaleTakesInt8Codes) {
  for (DType dt : {DType::F64, DType::F32})
    for (const auto& c : test::qat_format_cases()) {
      const test::QatParams p = test::qat_params(c, 7);
      Tensor ci = Tensor::empty(p.codes.shape(), DType::I8), cf = Tensor::empty(p.codes.shape(), dt);
      for (int64_t i = 0; i < p.codes.numel(); ++i) {
        const double v = std::nearbyint(p.codes.item(i) * 40.0);  // -120 .. 120
        ci.data<int8_t>()[i] = int8_t(v);
        cf.set_item(i, v);
      }
      const Tensor s = p.step.to(dt), dy = p.dy.to(dt);
      Tensor yi, yf, dsi, dsf;
      ops::group_scale_forward(ci, s, c.f, yi);
      ops::group_scale_forward(cf, s, c.f, yf);
      ops::group_scale_backward(ci, dy, c.f, dsi);
      ops::group_scale_backward(cf, dy, c.f, dsf);
      ASSERT_EQ(yi.dtype(), dt);
      ASSERT_EQ(dsi.dtype(), dt);
      for (int64_t i = 0; i < yf.numel(); ++i) ASSERT_EQ(yi.item(i), yf.item(i)) << c.f.name << " y " << i;
      for (int64_t i = 0; i < dsf.numel(); ++i) ASSERT_EQ(dsi.item(i), dsf.item(i)) << c.f.name << " dstep " << i;
    }
}

// A bf16 output (the operand of a bf16 GEMM under autocast, issue 19): the f32 product rounded to
// nearest even; I8 and float codes alike. It needs an f32 step and the codes' shape.
TEST(QatQuantOps, GroupScaleBf16Output) {
  for (const auto& c : test::qat_format_cases()) {
    const test::QatParams p = test::qat_params(c, 17);
    Tensor ci = Tensor::empty(p.codes.shape(), DType::I8);
    for (int64_t i = 0; i < p.codes.numel(); ++i) ci.data<int8_t>()[i] = int8_t(std::nearbyint(p.codes.item(i) * 40.0));
    for (const Tensor& codes : {ci, p.codes}) {
      Tensor y32, y16 = Tensor::empty(codes.shape(), DType::BF16);
      ops::group_scale_forward(codes, p.step, c.f, y32);
      ops::group_scale_forward(codes, p.step, c.f, y16);
      ASSERT_EQ(y16.dtype(), DType::BF16);
      EXPECT_EQ(max_abs_diff(y16.to(DType::F32), y32.to(DType::BF16).to(DType::F32)), 0.0) << c.f.name;
    }
    Tensor bad = Tensor::empty({ci.size(0), ci.size(1) + 1}, DType::BF16);
    EXPECT_THROW(ops::group_scale_forward(ci, p.step, c.f, bad), Error) << c.f.name;
    Tensor y16 = Tensor::empty(ci.shape(), DType::BF16);
    EXPECT_THROW(ops::group_scale_forward(ci, p.step.to(DType::F64), c.f, y16), Error) << c.f.name;
  }
}

TEST(QatQuantOps, RejectBadArguments) {
  const test::QatFormatCase asym = test::qat_format_cases()[0], sym = test::qat_format_cases()[1];
  const test::QatParams p = test::qat_params(asym, 1), ps = test::qat_params(sym, 2);
  Tensor y, ds;
  EXPECT_THROW(ops::lsq_quant_forward(p.w, p.step, Tensor(), asym.f, y), Error);        // asym needs an offset
  EXPECT_THROW(ops::lsq_quant_forward(ps.w, ps.step, ps.step, sym.f, y), Error);        // sym has none
  EXPECT_THROW(ops::lsq_quant_forward(p.w, p.step.slice(0, 0, 2).contiguous(), p.offset, asym.f, y), Error);
  EXPECT_THROW(ops::lsq_quant_forward(p.w, p.step.to(DType::F64), p.offset, asym.f, y), Error);  // dtype
  EXPECT_THROW(ops::lsq_quant_backward(p.w, p.step, p.offset, p.dy.slice(1, 0, 64).contiguous(), asym.f, 1.0, nullptr,
                                       ds, nullptr),
               Error);                                                                  // dy shape
  EXPECT_THROW(ops::lsq_quant_backward(p.w, p.step, p.offset, p.dy, asym.f, NAN, nullptr, ds, nullptr), Error);
  FormatTraits ternary = asym.f;
  ternary.kind = QuantKind::Ternary;
  EXPECT_THROW(ops::lsq_quant_forward(p.w, p.step, p.offset, ternary, y), Error);       // not a uniform int format
  EXPECT_THROW(ops::seq_quant_forward(p.w, Tensor(), test::seq_cases()[0].q, asym.f, y), Error);
  EXPECT_THROW(ops::group_scale_forward(p.codes, p.step.to(DType::F64), asym.f, y), Error);
  const Tensor ci = Tensor::zeros(p.codes.shape(), DType::I8);                          // I8 codes:
  EXPECT_THROW(ops::group_scale_forward(ci, p.step.slice(0, 0, 2).contiguous(), asym.f, y), Error);  // step shape
  EXPECT_THROW(ops::group_scale_forward(ci, Tensor(), asym.f, y), Error);                // no step
  EXPECT_THROW(ops::group_scale_backward(ci, p.dy.slice(1, 0, 64).contiguous(), asym.f, ds), Error);  // dy shape
  EXPECT_THROW(ops::group_scale_backward(ci.slice(1, 0, 64), p.dy, asym.f, ds), Error);  // not contiguous
  EXPECT_THROW(ops::group_scale_forward(Tensor::zeros({0, 64}, DType::I8), p.step, asym.f, y), Error);  // empty
  EXPECT_THROW(ops::group_scale_forward(ci, p.step, ternary, y), Error);                 // not a uniform int format
  EXPECT_THROW(ops::group_scale_forward(ci, p.step.to(DType::I8), asym.f, y), Error);   // integer step
  EXPECT_THROW(ops::lsq_quant_forward(p.w.to(DType::BF16), p.step.to(DType::BF16), p.offset.to(DType::BF16), asym.f, y),
               Error);                                                                  // CPU body: f32/f64
}
