// Learnable weight clipping (quant/lwc.h; OmniQuant eq. 2 as trained by ApiQ) on the GPU
// (ops/cuda/lwc.cu) against the CPU reference body, forward and straight-through backward, and the
// fused ApiQ training layer (QuantTrainLinear: Q(W) + s B A) on both devices. Skipped without a GPU.
//
// Tolerances. Both bodies evaluate the same fp32 formulas; they differ only in expf (CUDA: up to 2
// ulp) vs the host's expf inside sigmoid, and in the summation order of the per-group scale
// gradient. A 1-ulp difference of the scale s can flip round(w/s) only for w/s within ~1e-7 of a
// tie, which random inputs essentially never hit; the test still allows such flips (a handful of
// elements, at most 1e-4 of them) and compares gradients only in groups without one, so that it
// checks identical rounding decisions rather than the luck of the draw:
//   forward   |y_gpu - y_cpu| <= 1e-5 * max|y_cpu| per element (else: a counted decision flip)
//   dgamma, dbeta  normalised max error <= 2e-4 (64-term sums with cancellation, fp32)
//   dW        normalised max error <= 1e-5
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "lowbit/autograd/functions.h"
#include "lowbit/ops/device_init.h"
#include "lowbit/quant/lwc.h"
#include "lowbit/quant/train_linear.h"

using namespace lowbit;

namespace {

class LwcCuda : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!init_cuda()) GTEST_SKIP() << "no CUDA device (or a CPU-only build): LWC GPU parity tests skipped";
    cuda_set_allow_tf32(false);
  }
};

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, double(std::fabs(x)));
  return m;
}

// Weights with an all-zero group, a constant positive group and a heavy outlier in row 0.
Tensor test_weight(int64_t out, int64_t in, uint64_t seed) {
  Tensor w = Tensor::randn({out, in}, seed, 0.02);
  float* p = w.data<float>();
  for (int64_t j = 0; j < std::min<int64_t>(in, 32); ++j) p[1 * in + j] = 0.0f;
  for (int64_t j = 0; j < std::min<int64_t>(in, 32); ++j) p[2 * in + j] = 0.01f;
  p[5] = 0.3f;
  return w;
}

// Logits spread over heavy clipping (sigmoid(-1) = 0.27) to none (sigmoid(6) = 0.998).
Tensor test_logits(int64_t out, int64_t G, uint64_t seed) {
  Tensor u = Tensor::uniform({out, G}, seed, -1.0, 6.0);
  return u;
}

struct Report {
  int64_t flips = 0, groups_compared = 0, groups = 0;
  double fwd = 0, dgamma = 0, dbeta = 0, dw = 0;
  double dgamma_nodw = 0, dbeta_nodw = 0;  // the backward without W's gradient (ApiQ's case; vectorised kernel)
};

Report compare(const QuantFormat& f, int64_t out, int64_t in, uint64_t seed) {
  const int64_t G = f.n_groups(in);
  const bool asym = f.kind == QuantKind::IntAsym;
  const Tensor w = test_weight(out, in, seed), g = test_logits(out, G, seed + 1);
  const Tensor b = asym ? test_logits(out, G, seed + 2) : Tensor();
  const Tensor dy = Tensor::randn({out, in}, seed + 3);

  Tensor y_c = Tensor::empty({out, in}), dw_c = Tensor::empty({out, in}), dg_c = Tensor::empty({out, G});
  Tensor db_c = asym ? Tensor::empty({out, G}) : Tensor();
  lwc_forward_into(w, g, b, f, y_c);
  lwc_backward_into(w, g, b, dy, f, dw_c, dg_c, db_c);

  const Device D = Device::CUDA;
  const Tensor wg = w.to(D), gg = g.to(D), bg = asym ? b.to(D) : Tensor(), dyg = dy.to(D);
  Tensor y_g = Tensor::full({out, in}, NAN).to(D), dw_g = Tensor::full({out, in}, NAN).to(D);
  Tensor dg_g = Tensor::full({out, G}, NAN).to(D), db_g = asym ? Tensor::full({out, G}, NAN).to(D) : Tensor();
  lwc_forward_into(wg, gg, bg, f, y_g);
  lwc_backward_into(wg, gg, bg, dyg, f, dw_g, dg_g, db_g);
  Tensor no_dw, dg_g2 = Tensor::full({out, G}, NAN).to(D), db_g2 = asym ? Tensor::full({out, G}, NAN).to(D) : Tensor();
  lwc_backward_into(wg, gg, bg, dyg, f, no_dw, dg_g2, db_g2);
  cuda_synchronize();

  const std::vector<float> yc = y_c.to_vector(), yg = y_g.to(Device::CPU).to_vector();
  const std::vector<float> wc = dw_c.to_vector(), wgv = dw_g.to(Device::CPU).to_vector();
  const std::vector<float> gc = dg_c.to_vector(), ggv = dg_g.to(Device::CPU).to_vector();
  const std::vector<float> bc = asym ? db_c.to_vector() : std::vector<float>();
  const std::vector<float> bgv = asym ? db_g.to(Device::CPU).to_vector() : std::vector<float>();
  const std::vector<float> ggv2 = dg_g2.to(Device::CPU).to_vector();
  const std::vector<float> bgv2 = asym ? db_g2.to(Device::CPU).to_vector() : std::vector<float>();

  Report r;
  r.groups = out * G;
  const double ymax = max_abs(yc), ytol = 1e-5 * ymax;
  std::vector<char> flipped(size_t(out * G), 0);
  for (int64_t i = 0; i < out * in; ++i) {
    const double d = std::fabs(double(yg[size_t(i)]) - double(yc[size_t(i)]));
    if (!(d <= ytol)) {  // NaN counts as a flip, and flips are bounded below
      ++r.flips;
      flipped[size_t((i / in) * G + f.group_of_column(i % in))] = 1;
    } else {
      r.fwd = std::max(r.fwd, d / ymax);
    }
  }
  const double gden = std::max(max_abs(gc), 1e-30), bden = asym ? std::max(max_abs(bc), 1e-30) : 1.0;
  const double wden = std::max(max_abs(wc), 1e-30);
  for (int64_t k = 0; k < out * G; ++k) {
    if (flipped[size_t(k)]) continue;
    ++r.groups_compared;
    const double eg = std::fabs(double(ggv[size_t(k)]) - double(gc[size_t(k)])) / gden;
    r.dgamma = std::max(r.dgamma, std::isnan(eg) ? INFINITY : eg);
    const double eg2 = std::fabs(double(ggv2[size_t(k)]) - double(gc[size_t(k)])) / gden;
    r.dgamma_nodw = std::max(r.dgamma_nodw, std::isnan(eg2) ? INFINITY : eg2);
    if (asym) {
      const double eb = std::fabs(double(bgv[size_t(k)]) - double(bc[size_t(k)])) / bden;
      r.dbeta = std::max(r.dbeta, std::isnan(eb) ? INFINITY : eb);
      const double eb2 = std::fabs(double(bgv2[size_t(k)]) - double(bc[size_t(k)])) / bden;
      r.dbeta_nodw = std::max(r.dbeta_nodw, std::isnan(eb2) ? INFINITY : eb2);
    }
    const int64_t row = k / G, grp = k % G;
    for (int64_t j = f.group_begin(grp); j < f.group_end(grp, in); ++j) {
      const size_t i = size_t(row * in + j);
      const double e = std::fabs(double(wgv[i]) - double(wc[i])) / wden;
      r.dw = std::max(r.dw, std::isnan(e) ? INFINITY : e);
    }
  }
  return r;
}

}  // namespace

TEST_F(LwcCuda, ForwardAndBackwardMatchTheCpuBody) {
  struct Case {
    const char* fmt;
    int64_t out, in;
  };
  // Odd shapes: partial last groups (in = 320 with g128), per-channel rows longer than a warp's
  // stride, and a 7B-like row length. Groups that tile the rows (g32/g64/g128 with in a multiple)
  // take the vectorised kernels (forward, and the backward without dW), with a group count that
  // does not fill the last block (e.g. 37 x 320 / 64 = 185 groups).
  const Case cases[] = {{"int2g64", 37, 320},  {"int2g64", 64, 4096}, {"int3g128", 29, 320},  {"int4g128s", 33, 320},
                        {"int2g64s", 17, 192}, {"int2pc", 21, 1000},  {"int4pcs", 13, 777},   {"int8pc", 9, 300},
                        {"int3g128", 23, 1024}, {"int4g32", 11, 96},  {"int4g128s", 7, 384}, {"int2g64", 3, 11008}};
  uint64_t seed = 100;
  for (const auto& c : cases) {
    const QuantFormat& f = parse_quant_format(c.fmt);
    const Report r = compare(f, c.out, c.in, seed += 10);
    std::printf("  lwc %-9s [%3lld x %5lld]: fwd %.2e  dgamma %.2e / %.2e  dbeta %.2e / %.2e  dW %.2e  flips %lld  "
                "groups %lld/%lld (with / without dW)\n",
                c.fmt, (long long)c.out, (long long)c.in, r.fwd, r.dgamma, r.dgamma_nodw, r.dbeta, r.dbeta_nodw, r.dw,
                (long long)r.flips, (long long)r.groups_compared, (long long)r.groups);
    EXPECT_LE(r.flips, std::max<int64_t>(2, c.out * c.in / 10000)) << c.fmt;
    EXPECT_GE(double(r.groups_compared), 0.99 * double(r.groups)) << c.fmt;
    EXPECT_LE(r.fwd, 1e-5) << c.fmt;
    EXPECT_LE(r.dgamma, 2e-4) << c.fmt;
    EXPECT_LE(r.dbeta, 2e-4) << c.fmt;
    EXPECT_LE(r.dgamma_nodw, 2e-4) << c.fmt;
    EXPECT_LE(r.dbeta_nodw, 2e-4) << c.fmt;
    EXPECT_LE(r.dw, 1e-5) << c.fmt;
  }
}

TEST_F(LwcCuda, RejectsUnsupportedInputs) {
  const QuantFormat& f = parse_quant_format("int2g64");
  const Device D = Device::CUDA;
  Tensor w = Tensor::randn({4, 128}, 1).to(D), g = Tensor::zeros({4, 2}).to(D), b = Tensor::zeros({4, 2}).to(D);
  Tensor y = Tensor::empty({4, 128}, DType::F32, D);
  EXPECT_THROW(lwc_forward_into(w, g, b.to(Device::CPU), f, y), Error);  // mixed devices
  Tensor wb = w.to(DType::BF16), gb = g.to(DType::BF16), bb = b.to(DType::BF16);
  Tensor yb = Tensor::empty({4, 128}, DType::BF16, D);
  EXPECT_THROW(lwc_forward_into(wb, gb, bb, f, yb), Error);  // f32 only on the GPU
}

// The ApiQ training layer, y = x (Q(W) + s B A)^T, one forward/backward on both devices: output and
// the gradients of gamma, beta, A and B (TF32 off, so the GEMMs are fp32 on both sides).
TEST_F(LwcCuda, TrainLinearForwardBackwardMatchesCpu) {
  const QuantFormat& f = parse_quant_format("int2g64");
  const int64_t out = 96, in = 320, n = 48;
  const Tensor w = Tensor::randn({out, in}, 7, 0.02), x = Tensor::randn({n, in}, 8), t = Tensor::randn({n, out}, 9, 0.1);
  QuantTrainOptions o;
  o.rank = 8;
  o.seed = 3;
  o.init = LoraInit::Given;
  const Tensor A = Tensor::randn({8, in}, 10, 0.05), B = Tensor::randn({out, 8}, 11, 0.05);  // B != 0: dA is nonzero
  auto run = [&](Device d) {
    QuantTrainLinear lin(w.to(d), Tensor(), f, o, A, B);
    Var loss = mse(lin.forward(Var(x.to(d))), Var(t.to(d)));
    backward(loss);
    std::vector<Tensor> r{lin.forward(Var(x.to(d))).value().to(Device::CPU)};
    for (const Var& p : lin.parameters()) r.push_back(p.grad().to(Device::CPU));
    return r;
  };
  const auto c = run(Device::CPU), g = run(Device::CUDA);
  ASSERT_EQ(c.size(), g.size());
  const char* names[] = {"y", "dgamma", "dbeta", "dA", "dB"};
  for (size_t i = 0; i < c.size(); ++i) {
    const std::vector<float> a = c[i].to_vector(), b = g[i].to_vector();
    ASSERT_EQ(a.size(), b.size());
    double num = 0;
    for (size_t k = 0; k < a.size(); ++k) num = std::max(num, std::fabs(double(a[k]) - double(b[k])));
    const double e = num / std::max(max_abs(a), 1e-30);
    std::printf("  QuantTrainLinear %-6s normalised error %.2e\n", names[i], e);
    EXPECT_LE(e, 2e-4) << names[i];
  }
}

// AutocastBf16Guard (autograd/functions.h): the ApiQ layer (x requires grad, so all three large
// products run: x Q^T, dY^T x, dY Q), a plain linear and attention take bf16 operands with fp32
// accumulation and still return f32 values and gradients. Against the CPU's f32 results the error is
// bf16 rounding of the operands (unit roundoff 2^-9 = 2e-3 per operand, partly averaging out over
// the K-term sums): normalised max errors of a few 1e-3; the bound is 2e-2 (3e-2 for attention's
// gradients, which chain three products). The error must also be above fp32 level, or the bf16
// path did not run.
TEST_F(LwcCuda, AutocastBf16MatchesCpu) {
  auto nerr = [](const Tensor& a_cpu, const Tensor& b_any) {
    const std::vector<float> a = a_cpu.to_vector(), b = b_any.to(Device::CPU).to_vector();
    double num = 0;
    for (size_t k = 0; k < a.size(); ++k) num = std::max(num, std::fabs(double(a[k]) - double(b[k])));
    return num / std::max(max_abs(a), 1e-30);
  };
  const QuantFormat& f = parse_quant_format("int2g64");
  const int64_t out = 96, in = 320, n = 48;
  const Tensor w = Tensor::randn({out, in}, 17, 0.02), x = Tensor::randn({n, in}, 18), t = Tensor::randn({n, out}, 19, 0.1);
  const Tensor bias = Tensor::randn({out}, 20, 0.1);
  QuantTrainOptions o;
  o.rank = 8;
  o.init = LoraInit::Given;
  const Tensor A = Tensor::randn({8, in}, 21, 0.05), B = Tensor::randn({out, 8}, 22, 0.05);
  auto run_layer = [&](Device d, bool autocast) {
    AutocastBf16Guard guard(autocast);
    QuantTrainLinear lin(w.to(d), bias, f, o, A, B);
    Var xv(x.to(d), true);
    Var y = lin.forward(xv);
    backward(mse(y, Var(t.to(d))));
    std::vector<Tensor> r{y.value().to(Device::CPU), xv.grad().to(Device::CPU)};
    for (const Var& p : lin.parameters()) r.push_back(p.grad().to(Device::CPU));
    return r;
  };
  const auto c = run_layer(Device::CPU, false), g = run_layer(Device::CUDA, true);
  const char* names[] = {"y", "dx", "dgamma", "dbeta", "dA", "dB"};
  for (size_t i = 0; i < c.size(); ++i) {
    const double e = nerr(c[i], g[i]);
    std::printf("  autocast QuantTrainLinear %-6s normalised error %.2e\n", names[i], e);
    EXPECT_LE(e, 2e-2) << names[i];
    if (i < 2) {
      EXPECT_GT(e, 1e-6) << names[i] << " is at fp32 level: the bf16 products did not run";
    }
  }
  // Plain linear and attention (GQA, head_dim 64: the bf16 tensor-core kernels).
  const int64_t T = 80, H = 4, KVH = 2, hd = 64;
  const Tensor q = Tensor::randn({T, H * hd}, 23), k = Tensor::randn({T, KVH * hd}, 24), v = Tensor::randn({T, KVH * hd}, 25);
  const Tensor wl = Tensor::randn({H * hd, H * hd}, 26, 0.05), tgt = Tensor::randn({T, H * hd}, 27, 0.1);
  auto run_attn = [&](Device d, bool autocast) {
    AutocastBf16Guard guard(autocast);
    Var qv(q.to(d), true), kv(k.to(d), true), vv(v.to(d), true), wv(wl.to(d), true);
    Var y = linear(attention(qv, kv, vv, 1, T, T, H, KVH, hd), wv);
    backward(mse(y, Var(tgt.to(d))));
    return std::vector<Tensor>{y.value().to(Device::CPU), qv.grad().to(Device::CPU), kv.grad().to(Device::CPU),
                               vv.grad().to(Device::CPU), wv.grad().to(Device::CPU)};
  };
  const auto ca = run_attn(Device::CPU, false), ga = run_attn(Device::CUDA, true);
  const char* anames[] = {"y", "dq", "dk", "dv", "dw"};
  for (size_t i = 0; i < ca.size(); ++i) {
    const double e = nerr(ca[i], ga[i]);
    std::printf("  autocast attention+linear %-3s normalised error %.2e\n", anames[i], e);
    EXPECT_LE(e, i == 0 || i == 4 ? 2e-2 : 3e-2) << anames[i];
    EXPECT_GT(e, 1e-6) << anames[i] << " is at fp32 level: the bf16 path did not run";
  }
  // Outside the guard nothing changes: f32 on the GPU again (fp32-level agreement, TF32 off).
  const auto g2 = run_layer(Device::CUDA, false);
  EXPECT_LE(nerr(c[0], g2[0]), 2e-4);
  EXPECT_FALSE(AutocastBf16Guard::active());
}

// ---- Q written in bf16 by the quantizer (issue 19) -------------------------------------------------
// lwc_forward_into with a bf16 output of f32 weights: Q rounded to nearest even as it is written, for
// the bf16 GEMMs under autocast. The CPU body is the reference: its f32 result rounded (runs without
// a GPU).
TEST(LwcBf16Output, CpuBodyRoundsTheF32Result) {
  for (const char* fmt : {"int2g64", "int3g128s", "int4g32"}) {
    const QuantFormat& f = parse_quant_format(fmt);
    const int64_t out = 12, in = 200;  // partial last group for g64 / g128
    const int64_t G = lwc_n_groups(f, in);
    const Tensor w = test_weight(out, in, 41), g = test_logits(out, G, 42);
    const Tensor b = lwc_has_beta(f) ? test_logits(out, G, 43) : Tensor();
    Tensor y32 = Tensor::empty({out, in}, DType::F32), y16 = Tensor::empty({out, in}, DType::BF16);
    lwc_forward_into(w, g, b, f, y32);
    lwc_forward_into(w, g, b, f, y16);
    EXPECT_EQ(max_abs_diff(y16.to(DType::F32), y32.to(DType::BF16).to(DType::F32)), 0.0) << fmt;
    Tensor bad = Tensor::empty({out, in + 1}, DType::BF16);
    EXPECT_THROW(lwc_forward_into(w, g, b, f, bad), Error) << fmt;
  }
}

// On the GPU the kernels store bf16 directly (fast vectorised kernels and the generic warp-per-group
// one): exactly the GPU's f32 result cast to bf16, and the CPU reference's bf16 values except where
// a rounding decision flips (as ForwardAndBackwardMatchTheCpuBody allows).
TEST_F(LwcCuda, Bf16OutputEqualsF32ThenCast) {
  struct Case {
    const char* fmt;
    int64_t out, in;
  };
  for (const Case& c : {Case{"int2g64", 64, 512}, Case{"int3g128s", 48, 1024}, Case{"int4g32", 40, 256},
                        Case{"int2g64", 17, 200} /* partial groups: the generic kernel */, Case{"int4pc", 9, 300}}) {
    const QuantFormat& f = parse_quant_format(c.fmt);
    const int64_t G = lwc_n_groups(f, c.in);
    const Tensor w = test_weight(c.out, c.in, 51), g = test_logits(c.out, G, 52);
    const Tensor b = lwc_has_beta(f) ? test_logits(c.out, G, 53) : Tensor();
    const Tensor wd = w.to(Device::CUDA), gd = g.to(Device::CUDA), bd = b.defined() ? b.to(Device::CUDA) : Tensor();
    Tensor y32 = Tensor::empty({c.out, c.in}, DType::F32, Device::CUDA), y16 = Tensor::empty({c.out, c.in}, DType::BF16, Device::CUDA);
    lwc_forward_into(wd, gd, bd, f, y32);
    lwc_forward_into(wd, gd, bd, f, y16);
    const Tensor ref = to_bf16(y32).to(Device::CPU).to(DType::F32), got = y16.to(Device::CPU).to(DType::F32);
    EXPECT_EQ(max_abs_diff(got, ref), 0.0) << c.fmt << " " << c.out << "x" << c.in;
    Tensor yc = Tensor::empty({c.out, c.in}, DType::BF16);
    lwc_forward_into(w, g, b, f, yc);
    // Against the CPU: equal, or one bf16 step apart where the two f32 values (1-ulp apart at most, see
    // the header) straddle a bf16 rounding boundary; anything larger is a rounding decision of the
    // integer code, allowed as in ForwardAndBackwardMatchTheCpuBody.
    const std::vector<float> a = yc.to(DType::F32).to_vector(), d = got.to_vector();
    int64_t steps = 0, flips = 0;
    for (size_t k = 0; k < a.size(); ++k) {
      const double diff = std::fabs(double(a[k]) - double(d[k]));
      if (diff == 0) continue;
      if (diff <= std::ldexp(std::max(std::fabs(double(a[k])), std::fabs(double(d[k]))), -7)) ++steps;
      else ++flips;
    }
    std::printf("  lwc bf16 output %-10s %lldx%lld vs the CPU: %lld one-bf16-step differences, %lld rounding flips\n",
                c.fmt, (long long)c.out, (long long)c.in, (long long)steps, (long long)flips);
    EXPECT_LE(double(flips), std::max(1.0, 1e-4 * double(a.size()))) << c.fmt;
    EXPECT_LE(double(steps), 0.01 * double(a.size())) << c.fmt;
  }
}

// QuantTrainLinear under AutocastBf16Guard: the fused op (quantizer writes Q in bf16) against the
// unfused composition (f32 Q, then lora_linear's cast), with and without LoRA and bias, asymmetric
// and symmetric formats: the same bf16 operands and the same GEMMs, so the same values (bound 1e-6
// normalised, to allow a GEMM algorithm choice; expected 0).
TEST_F(LwcCuda, FusedBf16LayerEqualsUnfused) {
  auto nerr = [](const Tensor& a_any, const Tensor& b_any) {
    const std::vector<float> a = a_any.to(Device::CPU).to_vector(), b = b_any.to(Device::CPU).to_vector();
    double num = 0;
    for (size_t k = 0; k < a.size(); ++k) num = std::max(num, std::fabs(double(a[k]) - double(b[k])));
    return num / std::max(max_abs(a), 1e-30);
  };
  const bool was = autocast_fused_weights();
  for (const char* fmt : {"int2g64", "int3g128s"})
    for (int64_t rank : {int64_t(8), int64_t(0)}) {
      const QuantFormat& f = parse_quant_format(fmt);
      const int64_t out = 96, in = 384, n = 40;
      const Tensor w = Tensor::randn({out, in}, 61, 0.02), x = Tensor::randn({n, in}, 62), t = Tensor::randn({n, out}, 63, 0.1);
      const Tensor bias = rank > 0 ? Tensor::randn({out}, 64, 0.1) : Tensor();
      QuantTrainOptions o;
      o.rank = rank;
      o.init = LoraInit::Given;
      const Tensor A = Tensor::randn({std::max<int64_t>(rank, 1), in}, 65, 0.05), B = Tensor::randn({out, std::max<int64_t>(rank, 1)}, 66, 0.05);
      auto run = [&](bool fused) {
        set_autocast_fused_weights(fused);
        AutocastBf16Guard guard(true);
        QuantTrainLinear lin(w.to(Device::CUDA), bias, f, o, rank > 0 ? A : Tensor(), rank > 0 ? B : Tensor());
        Var xv(x.to(Device::CUDA), true);
        Var y = lin.forward(xv);
        backward(mse(y, Var(t.to(Device::CUDA))));
        std::vector<Tensor> r{y.value().to(Device::CPU), xv.grad().to(Device::CPU)};
        for (const Var& p : lin.parameters()) r.push_back(p.grad().to(Device::CPU));
        return r;
      };
      const auto u = run(false), fz = run(true);
      ASSERT_EQ(u.size(), fz.size());
      for (size_t i = 0; i < u.size(); ++i) {
        const double e = nerr(u[i], fz[i]);
        std::printf("  fused bf16 %-9s rank %lld output/grad %zu: normalised difference %.2e\n", fmt, (long long)rank, i, e);
        EXPECT_LE(e, 1e-6) << fmt << " rank " << rank << " tensor " << i;
      }
    }
  set_autocast_fused_weights(was);
}
