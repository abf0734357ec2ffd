// The RTN reference quantizer and fake quantization: error bounds stated per format.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "lowbit/methods/rtn.h"
#include "lowbit/quant/quantize.h"

using namespace lowbit;

// Weights with a spread of group ranges: N(0, 0.02) with a few outliers and one constant row.
static Tensor test_weight(int64_t out, int64_t in, uint64_t seed) {
  Tensor w = Tensor::randn({out, in}, seed, 0.02);
  float* p = w.data<float>();
  p[3] = 0.3f, p[in + 5] = -0.25f;
  if (out > 2)
    for (int64_t c = 0; c < in; ++c) p[2 * in + c] = 0.0f;  // an all-zero row
  return w;
}

// Half the spacing of the E2M1 grid around magnitude a (in units of the scale).
static float e2m1_half_spacing(float a) { return a <= 2 ? 0.25f : a <= 4 ? 0.5f : 1.0f; }

TEST(Quantize, ErrorWithinHalfAStepForEveryFormat) {
  for (const QuantFormat& f : all_quant_formats()) {
    for (auto [out, in] : {std::pair<int64_t, int64_t>{6, 256}, {5, 200}, {3, 13}}) {
      if (f.kind == QuantKind::Ternary) continue;  // ternary clips by design (tested below)
      if (f.is_ggml_block()) continue;             // ggml blocks: tests/quant/test_ggml_formats.cpp
      if (f.has_column_mask()) continue;           // ptq161 binarizes: tests/quant/test_ptq161_tensor.cpp
      if (f.kind == QuantKind::SignValue) continue;  // onebit binarizes (SVID): tests/quant/test_onebit.cpp
      Tensor w = test_weight(out, in, 11);
      QuantizedTensor q = quantize(w, f);
      Tensor d = q.dequantize();
      ASSERT_EQ(d.shape(), w.shape());
      const float *pw = w.data<float>(), *pd = d.data<float>();
      for (int64_t r = 0; r < out; ++r)
        for (int64_t g = 0; g < f.n_groups(in); ++g) {
          GroupParams p = q.group_params(r, g);
          for (int64_t c = f.group_begin(g); c < f.group_end(g, in); ++c) {
            float x = pw[r * in + c], err = std::fabs(x - pd[r * in + c]);
            float bound;
            if (f.kind == QuantKind::IntAsym || f.kind == QuantKind::IntSym) {
              bound = 0.5f * p.scale;  // the grid covers the group's range (scale rounded up to f16)
            } else if (f.kind == QuantKind::TritPlanes) {
              // {-1,0,1} a1 + {-1,0,1} a2 with a1 ~ 3 a2: steps a2 and a1 - 2 a2, range a1 + a2 >= amax
              bound = 0.5f * std::max(p.zero, p.scale - 2 * p.zero);
            } else {                    // fp4: half the local grid spacing, or the saturation error
              float a = std::fabs(x) / p.scale;
              bound = a <= 6 ? e2m1_half_spacing(a) * p.scale : (std::fabs(x) - 6 * p.scale);
            }
            ASSERT_LE(err, bound * (1 + 1e-5f) + 1e-12f)
                << f.name << " [" << out << ", " << in << "] row " << r << " col " << c << " w " << x << " scale "
                << p.scale;
          }
        }
    }
  }
}

TEST(Quantize, FakeQuantizeEqualsDequantizeOfQuantize) {
  for (const QuantFormat& f : all_quant_formats()) {
    if (f.is_ggml_block()) continue;  // rows of 200 are no whole blocks; see test_ggml_formats.cpp
    Tensor w = test_weight(5, 200, 4);
    EXPECT_EQ(max_abs_diff(fake_quantize(w, f), quantize(w, f).dequantize()), 0.0) << f.name;
    EXPECT_EQ(max_abs_diff(rtn_quantize(w, f).dequantize(), quantize(w, f).dequantize()), 0.0) << f.name;
  }
  // 1-D input is a single row.
  Tensor v = Tensor::randn({64}, 1);
  EXPECT_EQ(fake_quantize(v, parse_quant_format("int4g32")).shape(), Shape({64}));
}

TEST(Quantize, IntegerCodesAndZeroPoints) {
  const QuantFormat& f = parse_quant_format("int4g128");
  Tensor w = test_weight(4, 256, 9);
  QuantizedTensor q = quantize(w, f);
  std::vector<uint8_t> row(256);
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t g = 0; g < 2; ++g) {
      GroupParams p = q.group_params(r, g);
      EXPECT_EQ(p.zero, std::nearbyint(p.zero));
      EXPECT_GE(p.zero, 0);
      EXPECT_LE(p.zero, 15);
    }
  // Zero is exact (the range contains 0): the all-zero row dequantizes to exactly 0.
  Tensor d = q.dequantize();
  for (int64_t c = 0; c < 256; ++c) EXPECT_EQ(d.data<float>()[2 * 256 + c], 0.0f);
  // Symmetric codes never use code 0.
  QuantizedTensor s = quantize(w, parse_quant_format("int4g128s"));
  for (int64_t r = 0; r < 4; ++r) {
    s.unpack_row(r, row.data());
    for (uint8_t c : row) EXPECT_GE(c, 1);
  }
}

TEST(Quantize, TernaryUsesPerTensorAbsmean) {
  const QuantFormat& f = parse_quant_format("ternary");
  Tensor w = Tensor::randn({8, 40}, 5, 0.1);
  double mean_abs = 0;
  for (float x : w.to_vector()) mean_abs += std::fabs(x) / double(w.numel());
  QuantizedTensor q = quantize(w, f);
  EXPECT_NEAR(q.tensor_scale_value(), mean_abs, 1e-6);
  Tensor d = q.dequantize();
  const float gamma = q.tensor_scale_value();
  for (int64_t i = 0; i < w.numel(); ++i) {
    float x = w.data<float>()[i], y = d.data<float>()[i];
    float expect = gamma * std::clamp(std::nearbyint(x / gamma), -1.0f, 1.0f);  // RoundClip(W/gamma, -1, 1)
    EXPECT_EQ(y, expect);
  }
}

TEST(Quantize, Fp4ScalesFollowTheSpecs) {
  Tensor w = Tensor::randn({4, 64}, 8, 0.05);
  QuantizedTensor mx = quantize(w, parse_quant_format("mxfp4"));
  for (int64_t r = 0; r < 4; ++r)
    for (int64_t g = 0; g < 2; ++g) {
      float amax = 0;
      for (int64_t c = g * 32; c < g * 32 + 32; ++c) amax = std::max(amax, std::fabs(w.data<float>()[r * 64 + c]));
      // OCP MX: X = 2^(floor(log2 amax) - 2), a power of two with amax / X in [4, 8).
      float x = mx.group_params(r, g).scale;
      EXPECT_EQ(x, std::exp2(std::floor(std::log2(amax)) - 2));
      EXPECT_GE(amax / x, 4.0f);
      EXPECT_LT(amax / x, 8.0f);
    }
  QuantizedTensor nv = quantize(w, parse_quant_format("nvfp4"));
  float amax = 0;
  for (float v : w.to_vector()) amax = std::max(amax, std::fabs(v));
  EXPECT_FLOAT_EQ(nv.tensor_scale_value(), amax / (6 * 448));
}

TEST(Quantize, MalformedInputsThrow) {
  const QuantFormat& f = parse_quant_format("int4g128");
  Tensor w = Tensor::randn({4, 128}, 1);
  w.set_item(77, std::nan(""));
  EXPECT_THROW(quantize(w, f), Error);
  w.set_item(77, INFINITY);
  EXPECT_THROW(fake_quantize(w, f), Error);
  EXPECT_THROW(quantize(Tensor::randn({2, 3, 4}, 1), f), Error);
  EXPECT_THROW(quantize(Tensor(), f), Error);
  EXPECT_THROW(quantize(Tensor::full({2, 2}, 1e9), f), Error);  // scale overflows f16
  EXPECT_THROW(quantize_with_params(Tensor::randn({2, 128}, 1), f, {GroupParams{}}, 1.0f), Error);
}

TEST(Quantize, AcceptsOtherDtypesAndViews) {
  const QuantFormat& f = parse_quant_format("int4g32");
  Tensor w = Tensor::randn({64, 16}, 2);
  Tensor wt = w.transpose(0, 1);  // non-contiguous [16, 64]
  EXPECT_EQ(max_abs_diff(fake_quantize(wt, f), fake_quantize(wt.contiguous(), f)), 0.0);
  Tensor wb = wt.contiguous().to(DType::BF16);
  EXPECT_EQ(max_abs_diff(fake_quantize(wb, f), fake_quantize(wb.to(DType::F32), f)), 0.0);
}
