// AWQ (Lin et al. 2023, §3.2) matrix-level scale and clipping searches.
#include <gtest/gtest.h>

#include <cmath>

#include "lowbit/methods/awq.h"
#include "lowbit/methods/layer_error.h"
#include "lowbit/methods/rtn.h"
#include "lowbit/quant/quantize.h"

using namespace lowbit;

// Inputs with a few salient channels (large activations), as AWQ observes in LLMs.
static Tensor salient_inputs(int64_t n, int64_t in, uint64_t seed) {
  Tensor x = Tensor::randn({n, in}, seed);
  for (int64_t i = 0; i < x.numel(); ++i)
    if ((i % in) % 17 == 3) x.data<float>()[i] *= 20.0f;
  return x;
}

// Effective weight of an AWQ-quantized layer: Q(W diag(s)) diag(s)^-1.
static Tensor effective_weight(const QuantizedTensor& q, const Tensor& s) {
  Tensor d = q.dequantize();
  const int64_t in = d.size(1);
  for (int64_t i = 0; i < d.numel(); ++i) d.data<float>()[i] /= s.data<float>()[i % in];
  return d;
}

TEST(Awq, ActivationMeanAbs) {
  Tensor x = Tensor::from_vector(std::vector<float>{1, -2, -3, 4}, {2, 2});
  Tensor s = activation_mean_abs(x);
  EXPECT_FLOAT_EQ(s.data<float>()[0], 2.0f);
  EXPECT_FLOAT_EQ(s.data<float>()[1], 3.0f);
}

TEST(Awq, ScaleSearchBeatsRtnOnSalientChannels) {
  const int64_t in = 256;
  Tensor x = salient_inputs(512, in, 1);
  std::vector<Tensor> ws = {Tensor::randn({64, in}, 2, 0.02), Tensor::randn({32, in}, 3, 0.02)};
  for (const char* name : {"int4g128", "int3g128", "int4pc"}) {
    const QuantFormat& f = parse_quant_format(name);
    AwqScaleResult r = awq_search_scales(x, ws, f);
    ASSERT_EQ(r.losses.size(), 20u);
    EXPECT_EQ(r.scales.numel(), in);
    // alpha = 0 is RTN; the search can only improve on it.
    double rtn = 0;
    for (const Tensor& w : ws) rtn += linear_output_mse(x, w, rtn_quantize(w, f).dequantize()) * double(w.size(0));
    rtn /= 96.0;
    EXPECT_NEAR(r.losses[0], rtn, 1e-6 * rtn);
    EXPECT_LT(r.loss, 0.9 * rtn) << name;
    EXPECT_GT(r.alpha, 0.0);
    // Scaling is exact before quantization: (X/s) (W s)^T == X W^T.
    Tensor y0 = linear_forward(x, ws[0]);
    Tensor y1 = linear_forward(divide_input_columns(x, r.scales), scale_weight_columns(ws[0], r.scales));
    EXPECT_LT(max_abs_diff(y0, y1), 1e-4);
    std::printf("  %-9s RTN %.4e  AWQ scales %.4e (alpha %.2f)\n", name, rtn, r.loss, r.alpha);
  }
}

TEST(Awq, ClippingReducesOutputError) {
  const int64_t in = 256;
  Tensor x = Tensor::randn({512, in}, 5);
  Tensor w = Tensor::randn({64, in}, 6, 0.02);
  for (int64_t i = 0; i < 64; ++i) w.set_item(i * in + (i * 7) % in, 0.2);  // one outlier per row
  for (const char* name : {"int3g128", "int4g128", "int4g64s", "mxfp4"}) {
    const QuantFormat& f = parse_quant_format(name);
    Tensor clip = awq_search_clip(x, w, f);
    ASSERT_EQ(clip.shape(), Shape({64, f.n_groups(in)}));
    double rtn = linear_output_mse(x, w, rtn_quantize(w, f).dequantize());
    double clipped = linear_output_mse(x, w, rtn_quantize_clipped(w, f, clip).dequantize());
    // The search minimises each group's own output error; the layer error also has cross-group
    // terms, so it may rise slightly where clipping barely helps (mxfp4: +0.01 % here).
    EXPECT_LE(clipped, rtn * 1.001) << name;
    std::printf("  %-9s RTN %.4e  clipped %.4e\n", name, rtn, clipped);
  }
  // Ternary parameters do not depend on the range: no clipping.
  Tensor c = awq_search_clip(x, w, parse_quant_format("ternary"));
  EXPECT_EQ(max_abs_diff(rtn_quantize_clipped(w, parse_quant_format("ternary"), c).dequantize(),
                         rtn_quantize(w, parse_quant_format("ternary")).dequantize()),
            0.0);
}

TEST(Awq, FullMatrixLevelPipeline) {
  const int64_t in = 128;
  Tensor x = salient_inputs(256, in, 9);
  std::vector<Tensor> ws = {Tensor::randn({32, in}, 10, 0.02), Tensor::randn({48, in}, 11, 0.02)};
  const QuantFormat& f = parse_quant_format("int3g64");
  AwqResult r = awq_quantize(x, ws, f);
  ASSERT_EQ(r.q.size(), 2u);
  ASSERT_EQ(r.clip_max.size(), 2u);
  for (size_t k = 0; k < ws.size(); ++k) {
    double rtn = linear_output_mse(x, ws[k], rtn_quantize(ws[k], f).dequantize());
    double awq = linear_output_mse(x, ws[k], effective_weight(r.q[k], r.scale.scales));
    EXPECT_LT(awq, rtn) << "weight " << k;
  }
}

TEST(Awq, MalformedInputsThrow) {
  const QuantFormat& f = parse_quant_format("int4g32");
  Tensor x = Tensor::randn({16, 64}, 1);
  EXPECT_THROW(awq_search_scales(x, {}, f), Error);
  EXPECT_THROW(awq_search_scales(x, {Tensor::randn({8, 32}, 2)}, f), Error);  // width mismatch
  Tensor xn = x.clone();
  xn.set_item(9, std::nan(""));
  EXPECT_THROW(awq_search_scales(xn, {Tensor::randn({8, 64}, 2)}, f), Error);
  EXPECT_THROW(scale_weight_columns(Tensor::randn({8, 64}, 2), Tensor::zeros({64})), Error);  // s must be > 0
  EXPECT_THROW(rtn_quantize_clipped(Tensor::randn({8, 64}, 2), f, Tensor::zeros({8, 3})), Error);
}

// Pins AWQ's output (chosen alpha, scales, every dequantized weight) on a fixed case to the values
// the original search (one X (W - Q)^T product over all rows per grid point) produced, so that
// faster ways of computing the same search keep its results bit for bit.
TEST(Awq, OutputPinned) {
  const int64_t in = 256;
  Tensor x = salient_inputs(3000, in, 21);
  std::vector<Tensor> ws = {Tensor::randn({96, in}, 22, 0.02), Tensor::randn({64, in}, 23, 0.02)};
  auto fnv = [](uint64_t h, const Tensor& t) {
    const auto* p = reinterpret_cast<const unsigned char*>(t.data<float>());
    for (int64_t i = 0; i < t.numel() * int64_t(sizeof(float)); ++i) h = (h ^ p[i]) * 1099511628211ull;
    return h;
  };
  const std::pair<const char*, uint64_t> expected[] = {
      {"int3g64", 0x6a1f181035951407ull},
      {"int4g128", 0xd18ec346659c4399ull},
      {"int2g64", 0x5c2badb87de66c07ull},
      {"q4_k", 0x512e0df90743a221ull}};
  for (const auto& [name, want] : expected) {
    const QuantFormat& f = parse_quant_format(name);
    AwqResult r = awq_quantize(x, ws, f);
    uint64_t h = fnv(14695981039346656037ull, r.scale.scales);
    for (const QuantizedTensor& q : r.q) h = fnv(h, q.dequantize());
    std::printf("  %-9s alpha %.2f  hash 0x%016llx\n", name, r.scale.alpha, static_cast<unsigned long long>(h));
    EXPECT_EQ(h, want) << name;
  }
}
