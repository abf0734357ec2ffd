// The block-wise dynamic 8-bit codec (ops/blockwise8.h), the 8-bit AdamW step (ops::adamw8_step)
// and AdamW with 8-bit state (autograd/optim.h AdamWStateOptions).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>

#include "lowbit/autograd/optim.h"
#include "lowbit/ops/blockwise8.h"
#include "lowbit/ops/device_init.h"
#include "lowbit/ops/ops.h"

using namespace lowbit;

namespace {
// Half the gap between the two table values around y (y inside the table's range).
double half_gap_around(const std::array<float, 256>& t, double y) {
  auto hi = std::lower_bound(t.begin(), t.end(), float(y));
  if (hi == t.end()) return 0;
  if (*hi == float(y) || hi == t.begin()) return 0;
  return 0.5 * (double(*hi) - double(*(hi - 1)));
}

std::vector<float> random_values(int64_t n, uint64_t seed) {
  // Magnitudes over six decades, both signs: what the optimizer's moments look like.
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> e(-6, 0), s(0, 1);
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) v = float((s(rng) < 0.5 ? -1 : 1) * std::pow(10.0, e(rng)));
  return x;
}
}  // namespace

TEST(Blockwise8, DynamicMapsAreMonotoneAndHoldZeroAndOne) {
  for (bool is_signed : {true, false}) {
    const auto& t = ops::dynamic_map(is_signed);
    for (size_t k = 1; k < 256; ++k) EXPECT_LT(t[k - 1], t[k]) << (is_signed ? "signed " : "unsigned ") << k;
    EXPECT_EQ(t[255], 1.0f);
    EXPECT_EQ(t[ops::dynamic_zero_code(is_signed)], 0.0f);
    EXPECT_EQ(ops::dynamic_encode(0.0f, is_signed), ops::dynamic_zero_code(is_signed));
    EXPECT_EQ(ops::dynamic_encode(1.0f, is_signed), 255);
    for (size_t k = 0; k < 256; ++k) EXPECT_EQ(ops::dynamic_encode(t[k], is_signed), k) << k;
  }
  const auto& s = ops::dynamic_map(true);
  const auto& u = ops::dynamic_map(false);
  // Signed: -1 .. 1, 127 negative values, 0 at code 127, then 1e-7 and the tree's 127 magnitudes.
  EXPECT_EQ(s[0], -1.0f);
  EXPECT_EQ(ops::dynamic_zero_code(true), 127);
  EXPECT_FLOAT_EQ(s[128], 1e-7f);
  EXPECT_FLOAT_EQ(s[129], 1e-6f);        // e = 6, no fraction bits
  EXPECT_FLOAT_EQ(s[130], 5.5e-6f);      // e = 5, one fraction bit: 1e-5 * (0.1 + 0.9 / 2)
  EXPECT_FLOAT_EQ(s[254], 0.9859375f);   // e = 0, six fraction bits: 0.1 + 0.9 * 63 / 64
  EXPECT_FLOAT_EQ(s[126], -1e-6f);
  // Unsigned: 0 .. 1, 0 at code 0, 1e-7 smallest, seven fraction bits at the top.
  EXPECT_EQ(u[0], 0.0f);
  EXPECT_FLOAT_EQ(u[1], 1e-7f);
  EXPECT_FLOAT_EQ(u[254], 0.99296875f);  // 0.1 + 0.9 * 127 / 128
  EXPECT_FLOAT_EQ(u[127], 0.1f);         // the top of e = 1: 0.1 * (0.1 + 0.9 * 64 / 64)
}

// The encoder's bucket lookup (ops/blockwise8.cpp) against a plain search over the midpoints: at
// every midpoint and the floats next to it, at random values over 12 decades of both signs, and at
// the special values.
TEST(Blockwise8, EncoderEqualsNearestValueSearch) {
  for (bool is_signed : {true, false}) {
    const auto& t = ops::dynamic_map(is_signed);
    EXPECT_LE(ops::dynamic_bucket_steps(is_signed), 2);
    auto reference = [&](float x) -> int {
      if (std::isnan(x)) return 0;
      if (std::isinf(x)) return x > 0 ? 255 : 0;
      int best = 0;
      for (int k = 1; k < 256; ++k)  // nearest value; a tie goes to the larger one
        if (std::fabs(double(x) - double(t[size_t(k)])) <= std::fabs(double(x) - double(t[size_t(best)]))) best = k;
      return best;
    };
    std::vector<float> xs = {0.0f, -0.0f, 1.0f, -1.0f, 1.5f, -3.0f, 1e-30f, -1e-30f, 5e-8f, -5e-8f,
                             std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                             std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::denorm_min()};
    for (size_t k = 0; k + 1 < 256; ++k) {
      const float mid = float(0.5 * (double(t[k]) + double(t[k + 1])));
      for (float x : {mid, std::nextafter(mid, -2.0f), std::nextafter(mid, 2.0f), t[k]}) xs.push_back(x);
    }
    std::mt19937_64 rng(5);
    std::uniform_real_distribution<double> e(-12, 0.3), s(0, 1);
    for (int i = 0; i < 200000; ++i) xs.push_back(float((s(rng) < 0.5 ? -1 : 1) * std::pow(10.0, e(rng))));
    for (float x : xs) {
      const int want = reference(x);
      // Midpoints are rounded to f32, so a value within an ulp of one may go either way.
      const int got = ops::dynamic_encode(x, is_signed);
      if (got != want) {
        ASSERT_NEAR(std::fabs(double(x) - double(t[size_t(got)])), std::fabs(double(x) - double(t[size_t(want)])),
                    2.4e-7 * std::fabs(double(x)))
            << (is_signed ? "signed " : "unsigned ") << x << ": code " << got << ", nearest " << want;
      }
    }
  }
}

TEST(Blockwise8, EncodesAWrittenOutBlock) {
  // absmax 2: x / absmax = 1, -1, 0, 0.5, 0.01, 3e-5.
  //   0.5 lies between the e = 0 values 0.49375 (f + 1 = 28) and 0.5078125 (29): nearest 0.49375.
  //   0.01 is a table value (the top of e = 2: 1e-2 * (0.1 + 0.9 * 16 / 16)).
  //   3e-5 lies between 1e-5 (the top of e = 5) and 3.25e-5 (e = 4, two fraction bits: 1e-4 * (0.1 +
  //   0.9 / 4)), midpoint 2.125e-5: it goes to 3.25e-5.
  const std::vector<float> x = {2.0f, -2.0f, 0.0f, 1.0f, 0.02f, 6e-5f};
  std::vector<uint8_t> codes(x.size());
  const float absmax = ops::blockwise8_encode_block(x.data(), int64_t(x.size()), true, codes.data());
  EXPECT_EQ(absmax, 2.0f);
  std::vector<float> y(x.size());
  ops::blockwise8_decode_block(codes.data(), absmax, int64_t(x.size()), true, y.data());
  const std::vector<float> expect = {2.0f, -2.0f, 0.0f, 2.0f * 0.49375f, 0.02f, 2.0f * 3.25e-5f};
  for (size_t i = 0; i < x.size(); ++i) EXPECT_FLOAT_EQ(y[i], expect[i]) << i;
  // A block of subnormals (a second moment decaying towards 0): 1 / absmax overflows, yet zeros
  // stay zeros and signs stay signs.
  const std::vector<float> tiny = {1e-40f, 0.0f, -5e-41f};
  const float tiny_max = ops::blockwise8_encode_block(tiny.data(), 3, true, codes.data());
  EXPECT_EQ(tiny_max, 1e-40f);
  ops::blockwise8_decode_block(codes.data(), tiny_max, 3, true, y.data());
  EXPECT_EQ(y[0], 1e-40f);
  EXPECT_EQ(y[1], 0.0f);
  EXPECT_LT(y[2], 0.0f);
  EXPECT_NEAR(y[2], -5e-41f, 1e-42f);
  // An all-zero block: absmax 0, zero codes, zeros back.
  std::vector<float> z(5, 0.0f);
  EXPECT_EQ(ops::blockwise8_encode_block(z.data(), 5, false, codes.data()), 0.0f);
  EXPECT_EQ(codes[0], ops::dynamic_zero_code(false));
}

TEST(Blockwise8, ErrorPerBlockIsHalfTheTableGapTimesAbsmax) {
  // Three full blocks and a short one; block b scaled by 10^b so the absmax differ.
  const int64_t n = 3 * ops::kBlockwise8Block + 100;
  for (bool is_signed : {true, false}) {
    std::vector<float> x = random_values(n, is_signed ? 1 : 2);
    for (int64_t i = 0; i < n; ++i) {
      if (!is_signed) x[size_t(i)] = std::fabs(x[size_t(i)]);
      x[size_t(i)] *= float(std::pow(10.0, double(i / ops::kBlockwise8Block)));
    }
    std::vector<uint8_t> codes(static_cast<size_t>(n), 0);
    std::vector<float> absmax(static_cast<size_t>(ops::blockwise8_blocks(n))), y(static_cast<size_t>(n));
    ASSERT_EQ(absmax.size(), 4u);
    ops::blockwise8_encode(x.data(), n, is_signed, codes.data(), absmax.data());
    ops::blockwise8_decode(codes.data(), absmax.data(), n, is_signed, y.data());
    const auto& t = ops::dynamic_map(is_signed);
    // The largest half gap of the table: between the top two values, 0.9 / 2^F / 2 with F = 6
    // (signed) or 7 (unsigned) fraction bits.
    const double worst = is_signed ? 0.9 / 64 / 2 : 0.9 / 128 / 2;
    for (int64_t b = 0; b < 4; ++b) {
      const int64_t lo = b * ops::kBlockwise8Block, hi = std::min(n, lo + ops::kBlockwise8Block);
      float am = 0;
      for (int64_t i = lo; i < hi; ++i) am = std::max(am, std::fabs(x[size_t(i)]));
      EXPECT_EQ(absmax[size_t(b)], am) << "block " << b;
      for (int64_t i = lo; i < hi; ++i) {
        const double err = std::fabs(double(x[size_t(i)]) - double(y[size_t(i)]));
        const double bound = double(am) * half_gap_around(t, double(x[size_t(i)]) / double(am));
        ASSERT_LE(err, bound * (1 + 1e-5) + 1e-6 * double(am)) << "element " << i;
        ASSERT_LE(err, double(am) * worst * (1 + 1e-5)) << "element " << i;
        if (std::fabs(x[size_t(i)]) == am) {
          EXPECT_EQ(std::fabs(y[size_t(i)]), am) << "the absmax comes back exactly";
        }
      }
    }
  }
}

TEST(Blockwise8, AdamW8StepTracksTheF32Step) {
  // Two full blocks and a short one; 20 steps on random gradients.
  const int64_t n = 2 * ops::kBlockwise8Block + 333;
  const double lr = 1e-2;
  Tensor p32 = Tensor::randn({n}, 7, 1.0), p8 = p32.clone(), p0 = p32.clone();
  Tensor m = Tensor::zeros({n}), v = Tensor::zeros({n});
  const int64_t nb = ops::blockwise8_blocks(n);
  Tensor mc = Tensor::empty({n}, DType::U8), vc = Tensor::empty({n}, DType::U8);
  std::fill_n(mc.data<uint8_t>(), n, ops::dynamic_zero_code(true));
  std::fill_n(vc.data<uint8_t>(), n, ops::dynamic_zero_code(false));
  Tensor ma = Tensor::zeros({nb}), va = Tensor::zeros({nb});
  double worst = 0, mean = 0;
  for (int64_t step = 1; step <= 20; ++step) {
    // Gradients with a per-element scale (0.01 .. 1) and noise, as real ones.
    Tensor g = Tensor::randn({n}, uint64_t(100 + step), 1.0);
    for (int64_t i = 0; i < n; ++i) g.data<float>()[i] *= float(0.01 + 0.99 * double(i % 97) / 96.0) + 0.5f;
    ops::adamw_step(p32, g, m, v, lr, 0.9, 0.999, 1e-8, 0.1, step);
    ops::adamw8_step(p8, g, mc, ma, vc, va, lr, 0.9, 0.999, 1e-8, 0.1, step);
    if (step == 1) {
      // From a zero state (decoded exactly) the parameter update is the f32 step's, bit for bit.
      EXPECT_EQ(max_abs_diff(p8, p32), 0.0);
    }
  }
  double moved = 0;  // mean |p - p0| of the f32 run
  for (int64_t i = 0; i < n; ++i) {
    const double d = std::fabs(double(p8.data<float>()[i]) - double(p32.data<float>()[i]));
    worst = std::max(worst, d);
    mean += d / double(n);
    moved += std::fabs(double(p32.data<float>()[i]) - double(p0.data<float>()[i])) / double(n);
  }
  // Stated tolerance: the 8-bit run's parameters differ from the f32 run's by less than 5 % of the
  // f32 run's mean movement on average, and by less than one step's lr at worst (measured: the
  // printed line; pure-noise gradients, the hard case: m is small against its block's absmax).
  EXPECT_LT(mean, 0.05 * moved) << "worst " << worst;  // measured 2.0 %
  EXPECT_LT(worst, lr) << "mean " << mean;  // measured 0.76 lr
  // The decoded first moment against the f32 one: each encode errs by at most 0.0071 x absmax, and
  // the errors of earlier steps decay with beta1; stated tolerance 3 % of the block's absmax.
  std::vector<float> md(static_cast<size_t>(n));
  double mdev = 0;
  ops::blockwise8_decode(mc.data<uint8_t>(), ma.data<float>(), n, true, md.data());
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t i = b * ops::kBlockwise8Block; i < std::min(n, (b + 1) * ops::kBlockwise8Block); ++i)
      mdev = std::max(mdev, double(std::fabs(md[size_t(i)] - m.data<float>()[i]) / ma.data<float>()[b]));
  std::printf("8-bit vs f32 AdamW after 20 steps: params worst %.3g mean %.3g (lr %.3g, f32 mean movement %.3g); "
              "m worst %.3g x absmax\n", worst, mean, lr, moved, mdev);
  EXPECT_LT(mdev, 0.03);  // measured 0.027
  // Bad inputs: wrong absmax length, wrong code dtype, step 0.
  Tensor bad = Tensor::zeros({nb + 1});
  EXPECT_THROW(ops::adamw8_step(p8, Tensor::zeros({n}), mc, bad, vc, va, lr, 0.9, 0.999, 1e-8, 0.1, 21), Error);
  EXPECT_THROW(ops::adamw8_step(p8, Tensor::zeros({n}), m, ma, vc, va, lr, 0.9, 0.999, 1e-8, 0.1, 21), Error);
  EXPECT_THROW(ops::adamw8_step(p8, Tensor::zeros({n}), mc, ma, vc, va, lr, 0.9, 0.999, 1e-8, 0.1, 0), Error);
}

TEST(Blockwise8, AdamW8BitConvergesOnAQuadratic) {
  // f(x) = 1/2 sum a_i (x_i - t_i)^2 over 8192 parameters (4 blocks), curvatures a from 0.1 to 10;
  // 400 steps with a cosine schedule from lr 0.05.
  const int64_t n = 8192;
  Tensor a = Tensor::empty({n}), t = Tensor::randn({n}, 3, 1.0);
  for (int64_t i = 0; i < n; ++i) a.data<float>()[i] = float(0.1 * std::pow(100.0, double(i % 64) / 63.0));
  auto loss_of = [&](const Tensor& x) {
    double s = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double d = double(x.data<float>()[i]) - double(t.data<float>()[i]);
      s += 0.5 * double(a.data<float>()[i]) * d * d;
    }
    return s;
  };
  Var x(Tensor::zeros({n}), true);
  AdamWStateOptions st;
  st.bits = 8;
  AdamW opt({x}, AdamWOptions{0.05, 0.9, 0.999, 1e-8, 0.0}, st);
  EXPECT_EQ(opt.params_8bit(), 1);
  const double l0 = loss_of(x.value());
  for (int64_t s = 0; s < 400; ++s) {
    Tensor g = Tensor::empty({n});
    for (int64_t i = 0; i < n; ++i)
      g.data<float>()[i] = a.data<float>()[i] * (x.value().data<float>()[i] - t.data<float>()[i]);
    x.grad() = g;
    opt.step(warmup_cosine(s, 0, 400, 0.0));
  }
  const double l1 = loss_of(x.value());
  EXPECT_LT(l1, 1e-3 * l0) << "loss " << l0 << " -> " << l1;
}

TEST(Blockwise8, StateBytesAreAQuarterPlusAbsmax) {
  // 10000 elements (5 blocks) get 8-bit state; 100 (under min_8bit_numel) and the listed one keep f32.
  Var big(Tensor::zeros({100, 100}), true), small(Tensor::zeros({100}), true), kept(Tensor::zeros({64, 80}), true);
  AdamW f32({big, small, kept}, AdamWOptions{});
  AdamWStateOptions st;
  st.bits = 8;
  st.keep_32bit = {kept};
  AdamW q8({big, small, kept}, AdamWOptions{}, st);
  EXPECT_EQ(f32.state_bytes(), 2 * 4 * (10000 + 100 + 5120));
  EXPECT_EQ(q8.state_bytes(), 2 * (10000 + 4 * 5) + 2 * 4 * (100 + 5120));
  EXPECT_EQ(q8.params_8bit(), 1);
  EXPECT_EQ(q8.state_tensors().size(), 4u + 2u + 2u);  // (m codes, m absmax, v codes, v absmax), (m, v), (m, v)
  EXPECT_EQ(q8.state_bits(), 8);
  EXPECT_THROW(AdamW({big}, AdamWOptions{}, AdamWStateOptions{4, 4096, {}}), Error);
  // 8-bit state needs f32 parameters.
  Var f64(Tensor::zeros({5000}, DType::F64), true);
  EXPECT_THROW(AdamW({f64}, AdamWOptions{}, st), Error);
}

// No CUDA body yet: a parameter on the GPU with 8-bit state is an error naming the flag, whatever
// its size (never a silent f32 run), and so is the op itself. Skips without a GPU.
TEST(Blockwise8, GpuParametersAreRefused) {
  if (!init_cuda()) GTEST_SKIP() << "no CUDA device (or a CPU-only build): the GPU refusal is not reachable";
  AdamWStateOptions st;
  st.bits = 8;
  for (int64_t n : {int64_t(100), int64_t(10000)}) {
    Var p(Tensor::zeros({n}, DType::F32, Device::CUDA), true);
    try {
      AdamW opt({p}, AdamWOptions{}, st);
      ADD_FAILURE() << "8-bit state accepted a GPU parameter of " << n << " elements";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("--optimizer-bits 8 runs on the CPU only"), std::string::npos) << e.what();
    }
  }
  Tensor p = Tensor::zeros({4096}, DType::F32, Device::CUDA), g = p.clone();
  Tensor c = Tensor::zeros({4096}, DType::U8), a = Tensor::zeros({2});
  EXPECT_THROW(ops::adamw8_step(p, g, c, a, c, a, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1), Error);
}
