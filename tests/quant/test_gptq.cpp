// GPTQ (Frantar et al. 2022, Alg. 1) on single linear layers.
#include <gtest/gtest.h>

#include <cmath>

#include "lowbit/methods/gptq.h"
#include "lowbit/methods/layer_error.h"
#include "lowbit/methods/rtn.h"
#include "lowbit/quant/quantize.h"

using namespace lowbit;

// Correlated layer inputs X [n, in]: 16 shared factors plus noise, with channel magnitudes varying
// over a factor of ~10 (as LLM activations do). GPTQ gains from exactly this structure.
static Tensor correlated_inputs(int64_t n, int64_t in, uint64_t seed) {
  Tensor z = Tensor::randn({n, 16}, seed);
  Tensor bt = Tensor::randn({in, 16}, seed + 1);  // B^T
  Tensor x = linear_forward(z, bt);                // Z B
  Tensor noise = Tensor::randn({n, in}, seed + 2, 0.5);
  float* px = x.data<float>();
  for (int64_t i = 0; i < x.numel(); ++i) {
    int64_t c = i % in;
    px[i] = (px[i] + noise.data<float>()[i]) * (0.3f + float(c % 10));
  }
  return x;
}

static Tensor hessian_of(const Tensor& x) {
  HessianAccumulator acc(x.size(1));
  acc.add(x);
  return acc.hessian();
}

TEST(Gptq, HessianAccumulatorIsTwoXtXOverN) {
  Tensor x = Tensor::randn({10, 6}, 3);
  HessianAccumulator acc(6);
  acc.add(x.slice(0, 0, 4));
  acc.add(x.slice(0, 4, 10).reshape({2, 3, 6}));  // any leading shape
  EXPECT_EQ(acc.n_samples(), 10);
  Tensor h = acc.hessian();
  for (int64_t i = 0; i < 6; ++i)
    for (int64_t j = 0; j < 6; ++j) {
      double s = 0;
      for (int64_t t = 0; t < 10; ++t) s += x.item(t * 6 + i) * x.item(t * 6 + j);
      EXPECT_NEAR(h.item(i * 6 + j), 2.0 * s / 10, 1e-5);
    }
  EXPECT_THROW(acc.add(Tensor::randn({3, 5}, 1)), Error);
  EXPECT_THROW(HessianAccumulator(4).hessian(), Error);
}

TEST(Gptq, CholeskyOfInverseHessian) {
  const int64_t n = 150;  // more than one Cholesky block
  Tensor h = hessian_of(Tensor::randn({400, n}, 5));
  std::vector<float> hf = h.to_vector();
  std::vector<double> hd(hf.begin(), hf.end());
  std::vector<double> u = inverse_hessian_cholesky_upper(hd, n);
  // U upper triangular with U^T U H = I.
  double max_err = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) ASSERT_EQ(u[size_t(i * n + j)], 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t k = 0; k < n; ++k) {
        double utu = 0;
        for (int64_t m = 0; m <= std::min(i, k); ++m) utu += u[size_t(m * n + i)] * u[size_t(m * n + k)];
        s += utu * hd[size_t(k * n + j)];
      }
      max_err = std::max(max_err, std::fabs(s - (i == j ? 1.0 : 0.0)));
    }
  EXPECT_LT(max_err, 1e-8);
  std::vector<double> neg = {-1.0};
  EXPECT_THROW(inverse_hessian_cholesky_upper(neg, 1), Error);
}

TEST(Gptq, IdentityHessianReproducesRtn) {
  for (const char* name : {"int4g128", "int3g32", "int2g64", "int4pc", "int4g32s", "int8pc", "ternary", "mxfp4", "nvfp4"}) {
    const QuantFormat& f = parse_quant_format(name);
    Tensor w = Tensor::randn({24, 200}, 21, 0.05);
    Tensor eye = Tensor::zeros({200, 200});
    for (int64_t i = 0; i < 200; ++i) eye.set_item(i * 200 + i, 1.0);
    for (bool act_order : {false, true}) {
      GptqOptions opt;
      opt.act_order = act_order;  // equal diagonal: the order stays the identity
      opt.block_size = 64;
      GptqResult g = gptq_quantize(w, eye, f, opt);
      QuantizedTensor r = rtn_quantize(w, f);
      EXPECT_EQ(max_abs_diff(g.q.dequantize(), r.dequantize()), 0.0) << name << " act_order " << act_order;
      EXPECT_EQ(max_abs_diff(g.q.codes, r.codes), 0.0) << name;
    }
  }
}

TEST(Gptq, BeatsRtnOnCorrelatedInputs) {
  const int64_t out = 64, in = 256;
  Tensor x = correlated_inputs(1024, in, 40);
  Tensor h = hessian_of(x);
  Tensor w = Tensor::randn({out, in}, 41, 0.02);
  for (const char* name : {"int4g128", "int3g64", "int2g64", "int4pc", "int3g128s", "mxfp4"}) {
    const QuantFormat& f = parse_quant_format(name);
    double rtn = linear_output_mse(x, w, rtn_quantize(w, f).dequantize());
    GptqResult g = gptq_quantize(w, h, f);
    double gptq = linear_output_mse(x, w, g.q.dequantize());
    EXPECT_GT(g.loss, 0);
    EXPECT_LT(gptq, 0.8 * rtn) << name << ": GPTQ " << gptq << " vs RTN " << rtn;
    std::printf("  %-10s output MSE  RTN %.4e  GPTQ %.4e  (ratio %.3f)\n", name, rtn, gptq, gptq / rtn);
  }
}

TEST(Gptq, ActOrderWithStaticGroupsBeatsRtn) {
  const int64_t out = 48, in = 256;
  Tensor x = correlated_inputs(1024, in, 50);
  Tensor h = hessian_of(x);
  Tensor w = Tensor::randn({out, in}, 51, 0.02);
  for (const char* name : {"int4g32", "int3g64", "int2g64"}) {
    const QuantFormat& f = parse_quant_format(name);
    double rtn = linear_output_mse(x, w, rtn_quantize(w, f).dequantize());
    GptqOptions plain, ordered, statics;
    ordered.act_order = true;
    statics.static_groups = true;
    double e_plain = linear_output_mse(x, w, gptq_quantize(w, h, f, plain).q.dequantize());
    double e_static = linear_output_mse(x, w, gptq_quantize(w, h, f, statics).q.dequantize());
    double e_ordered = linear_output_mse(x, w, gptq_quantize(w, h, f, ordered).q.dequantize());
    EXPECT_LT(e_ordered, 0.8 * rtn) << name;
    EXPECT_LT(e_static, 0.8 * rtn) << name;
    std::printf("  %-8s output MSE  RTN %.4e  GPTQ %.4e  static groups %.4e  act-order %.4e\n", name, rtn, e_plain,
                e_static, e_ordered);
  }
}

// Each OBS step's loss increase (w - q)^2 / (2 [H_F^-1]_qq) is exact for the quadratic objective
// 1/2 dW H dW^T, so GPTQ's summed loss must equal that objective at the result (H with dampening).
// This checks the error propagation (within-block and lazy updates, act-order permutation) end to end.
TEST(Gptq, LossEqualsQuadraticObjective) {
  const int64_t out = 12, in = 160;
  Tensor x = correlated_inputs(512, in, 70);
  Tensor h = hessian_of(x);
  Tensor w = Tensor::randn({out, in}, 71, 0.02);
  for (bool act_order : {false, true}) {
    GptqOptions opt;
    opt.act_order = act_order;
    opt.block_size = 48;  // several blocks, the last one short
    opt.percdamp = 0.05;
    GptqResult g = gptq_quantize(w, h, parse_quant_format("int3g32"), opt);
    Tensor d = g.q.dequantize();
    double mean_diag = 0;
    for (int64_t i = 0; i < in; ++i) mean_diag += h.item(i * in + i) / double(in);
    double objective = 0;
    for (int64_t r = 0; r < out; ++r)
      for (int64_t i = 0; i < in; ++i)
        for (int64_t j = 0; j < in; ++j) {
          double hij = h.item(i * in + j) + (i == j ? opt.percdamp * mean_diag : 0.0);
          objective += 0.5 * (w.item(r * in + i) - d.item(r * in + i)) * hij * (w.item(r * in + j) - d.item(r * in + j));
        }
    EXPECT_NEAR(g.loss, objective, 1e-3 * objective) << "act_order " << act_order;
  }
}

TEST(Gptq, DeadColumnsAreZeroed) {
  const int64_t in = 64;
  Tensor x = correlated_inputs(256, in, 60);
  for (int64_t t = 0; t < 256; ++t) x.set_item(t * in + 7, 0.0);  // channel 7 is never active
  Tensor w = Tensor::randn({16, in}, 61, 0.02);
  GptqResult g = gptq_quantize(w, hessian_of(x), parse_quant_format("int4g32"));
  EXPECT_EQ(g.dead_columns, 1);
  Tensor d = g.q.dequantize();
  for (int64_t r = 0; r < 16; ++r) EXPECT_EQ(d.item(r * in + 7), 0.0);
}

TEST(Gptq, MalformedInputsThrow) {
  const QuantFormat& f = parse_quant_format("int4g32");
  Tensor w = Tensor::randn({8, 64}, 1, 0.02);
  Tensor h = hessian_of(Tensor::randn({128, 64}, 2));
  EXPECT_THROW(gptq_quantize(w, Tensor::zeros({32, 32}), f), Error);  // wrong Hessian shape
  Tensor hn = h.clone();
  hn.set_item(5, std::nan(""));
  EXPECT_THROW(gptq_quantize(w, hn, f), Error);
  Tensor wn = w.clone();
  wn.set_item(3, std::nan(""));
  EXPECT_THROW(gptq_quantize(wn, h, f), Error);
  Tensor neg = Tensor::zeros({64, 64});
  for (int64_t i = 0; i < 64; ++i) neg.set_item(i * 64 + i, -1.0);
  EXPECT_THROW(gptq_quantize(w, neg, f), Error);  // not positive definite
  GptqOptions bad;
  bad.block_size = 0;
  EXPECT_THROW(gptq_quantize(w, h, f, bad), Error);
}
