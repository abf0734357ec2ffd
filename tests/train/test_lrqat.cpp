// LR-QAT (qat --method lr-qat, arXiv 2406.06385): the training layer (quant/lrqat_linear.h) — the
// downcast of W0/s0 against its written-out fixed-point formula, the forward against the written-out
// Ŵ = s (clamp(round(Φ0 + (α/r) B A)) − z), the gradients against f64 finite differences of the
// straight-through surrogate, the exported packed tensor decoding to the trained weight exactly — and
// the method on stories260K: loss reduction in a few CPU steps, a loadable checkpoint, resume after a
// stop giving the same model, gradient checkpointing not changing the result.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <string>

#include "common/stories_fixture.h"
#include "qat_stories.h"
#include "lowbit/autograd/functions.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/quant/lrqat_linear.h"
#include "lowbit/quant/quant_linear.h"
#include "lowbit/quant/quantize.h"
#include "lowbit/train/qat.h"

using namespace lowbit;
namespace fs = std::filesystem;

namespace {

double clampd(double x, double lo, double hi) { return x < lo ? lo : x > hi ? hi : x; }

// A weight with a few elements far outside the range the MSE init keeps (so Φ0's clamp acts).
Tensor test_weight(int64_t out, int64_t in, uint64_t seed, DType dt) {
  Tensor w = Tensor::randn({out, in}, seed, 0.1, DType::F64);
  w.set_item(3, 0.9);
  w.set_item(in + 5, -0.8);
  return w.to(dt);
}

// A layer whose adapter and steps moved away from their start; b_std sets how far B A reaches (in
// grid steps: large values push Φ0 + C past the grid, so the clamp acts).
LrQatTrainLinear moved_layer(const QuantFormat& f, DType dt, const Tensor& w, double b_std, bool checkpoint = true,
                             LrQatDowncast d = LrQatDowncast::Int8) {
  LrQatOptions o;
  o.rank = 3;
  o.lora_alpha = 6;
  o.seed = 3;
  o.grad_scale = lsq_grad_scale(f, w.size(1));
  o.checkpoint = checkpoint;
  o.downcast = d;
  LrQatTrainLinear t(w, Tensor(), f, lsq_init(w.to(dt), f, LsqInit::Mse), o);
  auto p = t.parameters();  // A, B, step
  p[1].mutable_value().copy_(Tensor::randn(p[1].value().shape(), 11, b_std, dt));
  Tensor s = p[2].value().to(DType::F64);
  for (int64_t i = 0; i < s.numel(); ++i) s.data<double>()[i] *= 1.0 + 0.01 * double(i % 7);
  p[2].mutable_value().copy_(s.to(dt));
  return t;
}

// C = (α/r) B A written out.
std::vector<double> adapter_of(const Tensor& A, const Tensor& B, double cs) {
  const int64_t r = A.size(0), in = A.size(1), out = B.size(0);
  std::vector<double> c(size_t(out * in), 0.0);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t j = 0; j < in; ++j) {
      double acc = 0;
      for (int64_t k = 0; k < r; ++k) acc += B.item(o * r + k) * A.item(k * in + j);
      c[size_t(o * in + j)] = cs * acc;
    }
  return c;
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

struct LrQatStories : test::QatStoriesBase {};

}  // namespace

TEST(LrQatLayer, DowncastIsTheWrittenOutFixedPointAndOneBytePerWeight) {
  for (const char* name : {"int2g64", "int3g32", "int4g64", "int4pc", "int2g64s", "int4g64s", "int8pc"}) {
    const QuantFormat& f = parse_quant_format(name);
    const Tensor w = test_weight(5, 100, 7, DType::F32);
    const LsqParams init = lsq_init(w, f, LsqInit::Mse);
    const Tensor k = lrqat_downcast(w, init.step, init.offset, f, LrQatDowncast::Int8);
    ASSERT_EQ(k.dtype(), DType::I8) << name;
    ASSERT_EQ(k.shape(), w.shape());
    const Tensor phi = lrqat_upcast(k, f, LrQatDowncast::Int8, DType::F64);
    // Written out: grid [qlo, qhi] (symmetric ±(2^(B-1) - 1), asymmetric [0, 2^B - 1]), 8 - B fractional bits.
    const bool asym = f.kind == QuantKind::IntAsym;
    const double qhi = asym ? double((1 << f.bits) - 1) : double((1 << (f.bits - 1)) - 1), qlo = asym ? 0.0 : -qhi;
    const double frac = std::ldexp(1.0, 8 - f.bits);
    const int64_t in = w.size(1), G = f.n_groups(in);
    int clamped = 0;
    for (int64_t r = 0; r < w.size(0); ++r)
      for (int64_t j = 0; j < in; ++j) {
        const int64_t g = r * G + f.group_of_column(j);
        const double z = asym ? clampd(std::nearbyint(init.offset.item(g)), qlo, qhi) : 0.0;
        const double u = double(w.item(r * in + j)) / double(init.step.item(g)) + z;
        clamped += u < qlo || u > qhi;
        const double want = std::nearbyint(clampd(u, qlo, qhi) * frac) / frac;
        ASSERT_EQ(phi.item(r * in + j), want) << name << " element " << r << "," << j;
      }
    EXPECT_GT(clamped, 0) << name << ": the test weight should reach past the grid";
  }
  // The 16-bit and f32 downcasts: W0/s0 + z0 rounded to the type, not clamped.
  const QuantFormat& f = parse_quant_format("int4g64");
  const Tensor w = test_weight(4, 64, 9, DType::F32);
  const LsqParams init = lsq_init(w, f, LsqInit::Mse);
  const Tensor exact = lrqat_upcast(lrqat_downcast(w, init.step, init.offset, f, LrQatDowncast::F32), f,
                                    LrQatDowncast::F32, DType::F64);
  for (auto [d, dt, tol] : {std::tuple{LrQatDowncast::BF16, DType::BF16, 1.0 / 128}, {LrQatDowncast::F16, DType::F16, 1.0 / 1024}}) {
    const Tensor s16 = lrqat_downcast(w, init.step, init.offset, f, d);
    ASSERT_EQ(s16.dtype(), dt);
    const Tensor p16 = lrqat_upcast(s16, f, d, DType::F64);
    for (int64_t i = 0; i < w.numel(); ++i)
      ASSERT_NEAR(p16.item(i), exact.item(i), tol * std::max(1.0, std::fabs(exact.item(i)))) << lrqat_downcast_name(d) << " " << i;
  }
  EXPECT_EQ(parse_lrqat_downcast("bf16"), LrQatDowncast::BF16);
  EXPECT_THROW(parse_lrqat_downcast("int4"), Error);
  EXPECT_THROW(lrqat_grid(parse_quant_format("q4_0")), Error);
}

TEST(LrQatLayer, TrainsAdapterAndStepsOnlyAndStartsAtTheRoundedPhi0) {
  for (const char* name : {"int2g64", "int3g64s"}) {
    const QuantFormat& f = parse_quant_format(name);
    const Tensor w = test_weight(24, 128, 5, DType::F32);
    const LsqParams init = lsq_init(w, f, LsqInit::Mse);
    LrQatOptions o;
    o.rank = 4;
    LrQatTrainLinear t(w, Tensor(), f, init, o);
    ASSERT_EQ(t.parameters().size(), 3u);
    EXPECT_EQ(t.lora_parameters()[0].value().shape(), Shape({4, 128}));
    EXPECT_EQ(t.lora_parameters()[1].value().shape(), Shape({24, 4}));
    EXPECT_EQ(t.quant_parameters()[0].value().shape(), init.step.shape());
    EXPECT_EQ(t.stored_phi0().dtype(), DType::I8);  // 1 byte per weight; W0 itself is not kept
    // B = 0: Ŵ = s0 (clamp(round(Φ0)) − z0), round-to-nearest of W0 on (s0, z0) up to the fixed point.
    const Tensor eff = t.effective_weight(), phi = t.phi0();
    const int64_t G = f.n_groups(128);
    int differs_from_rtn = 0;
    const Tensor rtn = lsq_fake_quant(Var(w), Var(init.step), init.offset.defined() ? Var(init.offset) : Var(), f, 1.0).value();
    for (int64_t r = 0; r < 24; ++r)
      for (int64_t j = 0; j < 128; ++j) {
        const int64_t g = r * G + f.group_of_column(j), i = r * 128 + j;
        const double lo = f.kind == QuantKind::IntAsym ? 0.0 : -double((1 << (f.bits - 1)) - 1);
        const double hi = f.kind == QuantKind::IntAsym ? double((1 << f.bits) - 1) : -lo;
        const double q = clampd(std::nearbyint(phi.item(i)), lo, hi);
        ASSERT_EQ(eff.item(i), float(init.step.item(g) * (q - t.zero().item(g)))) << name << " " << i;
        differs_from_rtn += eff.item(i) != rtn.item(i);
      }
    EXPECT_LT(differs_from_rtn, 24 * 128 / 50) << name << ": the int8 fixed point changes only near-ties";
  }
  const QuantFormat& f = parse_quant_format("int2g64");
  const Tensor w = Tensor::randn({8, 64}, 5, 0.1, DType::F32);
  const LsqParams init = lsq_init(w, f, LsqInit::Mse);
  LrQatOptions bad;
  bad.rank = 0;
  EXPECT_THROW(LrQatTrainLinear(w, Tensor(), f, init, bad), Error);
  bad.rank = 9;  // > min(8, 64)
  EXPECT_THROW(LrQatTrainLinear(w, Tensor(), f, init, bad), Error);
  bad.rank = 2;
  bad.lora_alpha = 0;
  EXPECT_THROW(LrQatTrainLinear(w, Tensor(), f, init, bad), Error);
  EXPECT_THROW(LrQatTrainLinear(w, Tensor(), parse_quant_format("q4_0"), init, LrQatOptions()), Error);
  EXPECT_THROW(LrQatTrainLinear(w, Tensor(), f, LsqParams{init.step, Tensor()}, LrQatOptions()), Error)
      << "an asymmetric format needs zero points";
  Tensor nan_w = w.clone();
  nan_w.set_item(5, std::nan(""));
  EXPECT_THROW(lrqat_downcast(nan_w, init.step, init.offset, f, LrQatDowncast::Int8), Error) << "a NaN weight";
  Tensor zero_step = init.step.clone();
  zero_step.set_item(0, 0.0);
  EXPECT_THROW(lrqat_downcast(w, zero_step, init.offset, f, LrQatDowncast::Int8), Error) << "a zero step";
}

TEST(LrQatLayer, ForwardMatchesTheWrittenOutFormula) {
  for (const char* name : {"int2g64", "int3g32", "int4g64s", "int4pc"})
    for (bool ck : {true, false}) {
      const QuantFormat& f = parse_quant_format(name);
      const int64_t out = 9, in = 70;
      const Tensor w = test_weight(out, in, 21, DType::F64);
      LrQatTrainLinear t = moved_layer(f, DType::F64, w, 6.0, ck);
      auto p = t.parameters();
      const std::vector<double> c = adapter_of(p[0].value(), p[1].value(), t.lora_scale());
      const Tensor phi = t.phi0(), s = p[2].value(), z = t.zero();
      const bool asym = f.kind == QuantKind::IntAsym;
      const double qhi = asym ? double((1 << f.bits) - 1) : double((1 << (f.bits - 1)) - 1), qlo = asym ? 0.0 : -qhi;
      const int64_t G = f.n_groups(in);
      std::vector<double> wq(size_t(out * in));
      int outside = 0;
      for (int64_t r = 0; r < out; ++r)
        for (int64_t j = 0; j < in; ++j) {
          const int64_t i = r * in + j, g = r * G + f.group_of_column(j);
          const double q = std::nearbyint(phi.item(i) + c[size_t(i)]);
          outside += q < qlo || q > qhi;
          wq[size_t(i)] = s.item(g) * (clampd(q, qlo, qhi) - z.item(g));
        }
      EXPECT_GT(outside, 0) << name;
      const Tensor x = Tensor::randn({5, in}, 13, 1.0, DType::F64);
      const Tensor y = t.forward(Var(x)).value();
      for (int64_t b = 0; b < 5; ++b)
        for (int64_t o = 0; o < out; ++o) {
          double want = 0;
          for (int64_t j = 0; j < in; ++j) want += x.item(b * in + j) * wq[size_t(o * in + j)];
          ASSERT_NEAR(y.item(b * out + o), want, 1e-12 * std::max(1.0, std::fabs(want))) << name << " y " << b << "," << o;
        }
      // The unfused autograd form computes the same weight.
      const Tensor eff = t.effective_weight();
      for (int64_t i = 0; i < out * in; ++i) ASSERT_NEAR(eff.item(i), wq[size_t(i)], 1e-14) << name << " W " << i;
    }
}

TEST(LrQatLayer, GradientsMatchFiniteDifferencesOfTheSurrogate) {
  // The surrogate around the base point (A0, B0, s0): per element the rounding residual
  // rho = round(Z0) − Z0 (Z0 = Φ0 + C0) and the clamp mask are held; then
  //   inside:  Ŵ = s_e (Φ0 + C + rho − z)       outside: Ŵ = s_e (clamp(round(Z0)) − z)
  // with C = (α/r) B A and s_e = s0 + g (s − s0) (the step's gradient scale g), y = x Ŵᵀ, and the loss
  // <y, P>. Its derivatives in A, B, s and x are what the fused layer's backward must give.
  for (const char* name : {"int2g64", "int3g32", "int4pc", "int2g32s", "int4g64s"})
    for (bool ck : {true, false}) {
      const QuantFormat& f = parse_quant_format(name);
      const int64_t out = 6, in = 70, nb = 4;
      const Tensor w = test_weight(out, in, 31, DType::F64);
      LrQatTrainLinear t = moved_layer(f, DType::F64, w, 3.0, ck);
      auto p = t.parameters();
      const double g = lsq_grad_scale(f, in), cs = t.lora_scale();
      const Tensor phi = t.phi0(), z = t.zero();
      const bool asym = f.kind == QuantKind::IntAsym;
      const double qhi = asym ? double((1 << f.bits) - 1) : double((1 << (f.bits - 1)) - 1), qlo = asym ? 0.0 : -qhi;
      const int64_t G = f.n_groups(in);
      Tensor A = p[0].value().clone(), B = p[1].value().clone(), S = p[2].value().clone();
      const Tensor s0 = S.clone();
      const std::vector<double> c0 = adapter_of(A, B, cs);
      std::vector<double> rho(size_t(out * in)), qc(size_t(out * in));
      std::vector<char> inside(size_t(out * in));
      int n_in = 0;
      for (int64_t i = 0; i < out * in; ++i) {
        const double Z = phi.item(i) + c0[size_t(i)], q = std::nearbyint(Z);
        inside[size_t(i)] = q >= qlo && q <= qhi;
        rho[size_t(i)] = q - Z;
        qc[size_t(i)] = clampd(q, qlo, qhi);
        n_in += inside[size_t(i)];
      }
      ASSERT_GT(n_in, 0) << name;
      ASSERT_LT(n_in, out * in) << name << ": both branches of the clamp must occur";
      Tensor X = Tensor::randn({nb, in}, 41, 1.0, DType::F64);
      const Tensor P = Tensor::randn({nb, out}, 43, 1.0, DType::F64);
      auto surrogate_loss = [&] {
        const std::vector<double> c = adapter_of(A, B, cs);
        double loss = 0;
        for (int64_t o = 0; o < out; ++o)
          for (int64_t j = 0; j < in; ++j) {
            const int64_t i = o * in + j, k = o * G + f.group_of_column(j);
            const double se = s0.item(k) + g * (S.item(k) - s0.item(k));
            const double wq = inside[size_t(i)] ? se * (phi.item(i) + c[size_t(i)] + rho[size_t(i)] - z.item(k))
                                                : se * (qc[size_t(i)] - z.item(k));
            for (int64_t b = 0; b < nb; ++b) loss += P.item(b * out + o) * X.item(b * in + j) * wq;
          }
        return loss;
      };
      Var xv(X.clone(), true);
      const Var y = t.forward(xv);
      ASSERT_NEAR(dot(y.value(), P), surrogate_loss(), 1e-10) << name << ": the surrogate equals the forward at the base point";
      backward(sum(mul(y, Var(P))));
      const std::string tag = std::string(name) + (ck ? " (checkpointed)" : " (kept)");
      check_fd(A, p[0].grad(), surrogate_loss, tag + " dA");
      check_fd(B, p[1].grad(), surrogate_loss, tag + " dB");
      check_fd(S, p[2].grad(), surrogate_loss, tag + " dstep");
      check_fd(X, xv.grad(), surrogate_loss, tag + " dx");
    }
}

TEST(LrQatLayer, ExportedPackedWeightDecodesToTheTrainedWeightExactly) {
  for (const char* name : {"int2g64", "int3g64", "int4g32s", "int3pc", "int4g64"}) {
    const QuantFormat& f = parse_quant_format(name);
    const Tensor w = test_weight(16, 128, 7, DType::F32);
    LrQatTrainLinear t = moved_layer(f, DType::F32, w, 1.0);
    auto p = t.parameters();
    Tensor c;
    {
      NoGradGuard ng;
      c = t.adapter().value();
    }
    const Tensor want = lrqat_quant_value(t.phi0(), c, lsq_storage_step(p[2].value()), t.zero(), f);
    const Tensor start = lrqat_quant_value(t.phi0(), Tensor::zeros(c.shape()), lsq_storage_step(p[2].value()), t.zero(), f);
    int moved = 0;
    for (int64_t i = 0; i < want.numel(); ++i) moved += want.item(i) != start.item(i);
    EXPECT_GT(moved, 0) << name << ": the adapter changed some integer codes";
    const QuantizedTensor q = t.encode();
    EXPECT_EQ(q.fmt().name, f.name);
    const Tensor got = q.dequantize();
    ASSERT_EQ(got.numel(), want.numel());
    for (int64_t i = 0; i < want.numel(); ++i) ASSERT_EQ(got.item(i), want.item(i)) << name << " element " << i;
  }
}

TEST_F(LrQatStories, LrQatReducesTheLmLossBeatsRtnAndWritesALoadableCheckpoint) {
  expect_trains_beats_rtn_and_reloads("lr-qat", [](const QatResult& r) { EXPECT_EQ(r.stages[0].hyper.at("downcast"), "int8"); });
}

TEST_F(LrQatStories, LrQatResumeAfterStopGivesTheSameModel) {
  // Another downcast is another state: refused.
  expect_resume_gives_the_same_model("lr-qat", [](QatConfig& c) { c.downcast = "bf16"; });
}

TEST_F(LrQatStories, GradCheckpointingDoesNotChangeTheResult) {
  Checkpoint ck = load_llama2c(model_path);
  LlamaModel fp(ck.config, ck.weights);
  QatConfig c = small("int4g64s");
  c.steps = 4;
  QatResult on = make_qat_method("lr-qat", c)->run(fp, calib_stream);
  c.grad_checkpoint = false;
  QatResult off = make_qat_method("lr-qat", c)->run(fp, calib_stream);
  const auto pa = packed(*on.model), pb = packed(*off.model);
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t k = 0; k < pa.size(); ++k)
    for (int64_t i = 0; i < pa[k].numel(); ++i) ASSERT_EQ(pa[k].item(i), pb[k].item(i)) << "layer " << k << " element " << i;
}

TEST(QatRegistryLrQat, IsRegisteredAndChecksItsOptions) {
  EXPECT_NO_THROW(find_qat_method("lr-qat"));
  QatConfig c;
  c.format = &parse_quant_format("q4_0");
  EXPECT_THROW(make_qat_method("lr-qat", c), Error);
  c.format = &parse_quant_format("int2g64");
  EXPECT_NO_THROW(make_qat_method("lr-qat", c));
  c.lora_rank = 0;
  EXPECT_THROW(make_qat_method("lr-qat", c), Error);
  c.lora_rank = 8;
  c.lora_alpha = 0;
  EXPECT_THROW(make_qat_method("lr-qat", c), Error);
  c.lora_alpha = 16;
  c.downcast = "int4";
  EXPECT_THROW(make_qat_method("lr-qat", c), Error);
}

TEST(LrQatInit, Lp4RangeHasTheSmallestL4ErrorOnItsGrid) {
  // --init lp4 (LR-QAT's reference range estimator LP_p4): the MSE grid minimising Σ|Q(w) − w|^4; its
  // L4 error is no larger than the MSE choice's (a point of the same grid) or the min-max range's.
  for (const char* name : {"int2g64", "int4g64", "int3g64s", "int4pcs"}) {
    const QuantFormat& f = parse_quant_format(name);
    const Tensor w = test_weight(6, 128, 51, DType::F64);
    auto l4 = [&](const LsqParams& p) {
      const Tensor q = lsq_fake_quant(Var(w), Var(p.step), p.offset.defined() ? Var(p.offset) : Var(), f, 1.0).value();
      double e = 0;
      for (int64_t i = 0; i < w.numel(); ++i) e += std::pow(q.item(i) - w.item(i), 4);
      return e;
    };
    const double lp4 = l4(lsq_init(w, f, LsqInit::Lp4)), mse = l4(lsq_init(w, f, LsqInit::Mse));
    EXPECT_LE(lp4, mse * (1 + 1e-12)) << name;
    EXPECT_LE(lp4, l4(lsq_init(w, f, LsqInit::MinMax)) * (1 + 1e-12)) << name;
    EXPECT_STREQ(lsq_init_name(LsqInit::Lp4), "lp4");
    EXPECT_EQ(parse_lsq_init("lp4"), LsqInit::Lp4);
  }
}
