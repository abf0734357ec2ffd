// Matryoshka Quantization (quant/matryoshka.h, MatQuant arXiv 2502.06786): the slice of a code
// against a written-out table, the slice of a packed tensor against hand-computed codes, scales and
// values, the training quantizer's r-bit forward equal bit for bit to the sliced encoded tensor, its
// straight-through gradients against f64 finite differences of the surrogate, and the flag parsers'
// errors.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>

#include "common/expect_message.h"
#include "lowbit/autograd/functions.h"
#include "lowbit/quant/lsq.h"
#include "lowbit/quant/matryoshka.h"

using namespace lowbit;

namespace {

// EXPECT_THROW with the message checked.
void expect_error(const std::function<void()>& fn, const std::string& needle) { test::expect_message(fn, needle); }

double dot(const Tensor& a, const Tensor& b) {
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) s += a.item(i) * b.item(i);
  return s;
}

}  // namespace

TEST(Matryoshka, SliceOfACodeMatchesTheWrittenOutTable) {
  // S(q, r) = clamp(round(q / 2^(8-r)), 0, 2^r - 1), ties up; written out by hand.
  struct Row {
    int q, r, s;
  };
  const Row rows[] = {
      // int8 -> int2 (q / 64)
      {0, 2, 0}, {31, 2, 0}, {32, 2, 1}, {95, 2, 1}, {96, 2, 2}, {159, 2, 2}, {160, 2, 3}, {223, 2, 3},
      {224, 2, 3} /* 3.5 rounds to 4: clamped */, {255, 2, 3},
      // int8 -> int3 (q / 32)
      {15, 3, 0}, {16, 3, 1}, {100, 3, 3}, {239, 3, 7}, {240, 3, 7} /* 7.5 -> 8: clamped */,
      // int8 -> int4 (q / 16)
      {7, 4, 0}, {8, 4, 1}, {23, 4, 1}, {24, 4, 2}, {130, 4, 8}, {247, 4, 15}, {248, 4, 15}, {255, 4, 15},
      // int8 -> int8: the code itself
      {0, 8, 0}, {137, 8, 137}, {255, 8, 255}};
  for (const Row& x : rows)
    EXPECT_EQ(int(matryoshka_slice_code(uint8_t(x.q), 8, x.r)), x.s) << "q " << x.q << " r " << x.r;
  // Nested: the 2-bit slice of the 4-bit slice is not required to equal the direct 2-bit slice
  // (double rounding), but for codes away from ties it does.
  EXPECT_EQ(matryoshka_slice_code(matryoshka_slice_code(200, 8, 4), 4, 2), matryoshka_slice_code(200, 8, 2));
}

TEST(Matryoshka, SliceOfAPackedTensorIsAnOrdinaryIntTensorWithTheParentsGrid) {
  const QuantFormat& f8 = parse_quant_format("int8g32");
  // One row, two groups of 32: group 0 s = 0.125, z = 130; group 1 s = 0.5, z = 7.
  std::vector<uint8_t> codes(64);
  const int written[8] = {0, 32, 100, 130, 160, 200, 224, 255};
  for (int j = 0; j < 64; ++j) codes[size_t(j)] = uint8_t(written[j % 8]);
  const GroupParams params[2] = {{0.125f, 130.0f}, {0.5f, 7.0f}};
  const QuantizedTensor q8 = make_quantized_tensor(f8, 1, 64, codes.data(), params, 1.0f);
  const QuantizedTensor q2 = matryoshka_slice(q8, 2);
  EXPECT_EQ(q2.format, QuantFormatId::Int2G32);
  // Codes: round(q / 64) clamped to 3.
  const int want2[8] = {0, 1, 2, 2, 3, 3, 3, 3};
  std::vector<uint8_t> got(64);
  q2.unpack_row(0, got.data());
  for (int j = 0; j < 64; ++j) ASSERT_EQ(int(got[size_t(j)]), want2[j % 8]) << j;
  // Parameters: s 2^6 and z / 2^6.
  EXPECT_EQ(q2.group_params(0, 0).scale, 8.0f);
  EXPECT_EQ(q2.group_params(0, 0).zero, 2.03125f);
  EXPECT_EQ(q2.group_params(0, 1).scale, 32.0f);
  EXPECT_EQ(q2.group_params(0, 1).zero, 0.109375f);
  // Values: s (S 64 - z) on the parent's grid, e.g. q = 200: S = 3, 0.125 (192 - 130) = 7.75.
  const Tensor v = q2.dequantize();
  const double want_v0[8] = {0.125 * (0 - 130), 0.125 * (64 - 130), 0.125 * (128 - 130), 0.125 * (128 - 130),
                             0.125 * (192 - 130), 7.75, 0.125 * (192 - 130), 0.125 * (192 - 130)};
  for (int j = 0; j < 32; ++j) ASSERT_EQ(v.item(j), want_v0[j % 8]) << j;
  EXPECT_EQ(v.item(32 + 5), 0.5 * (192 - 7));
  // int4: round(q / 16), scale 2, zero 130 / 16.
  const QuantizedTensor q4 = matryoshka_slice(q8, 4);
  EXPECT_EQ(q4.format, QuantFormatId::Int4G32);
  q4.unpack_row(0, got.data());
  const int want4[8] = {0, 2, 6, 8, 10, 13, 14, 15};  // 100/16 = 6.25, 130/16 = 8.125, 200/16 = 12.5 -> 13, 255/16 -> 16 -> 15
  for (int j = 0; j < 8; ++j) ASSERT_EQ(int(got[size_t(j)]), want4[j]) << j;
  EXPECT_EQ(q4.group_params(0, 0).scale, 2.0f);
  EXPECT_EQ(q4.group_params(0, 0).zero, 8.125f);
  // r = 8: the parent itself.
  const QuantizedTensor same = matryoshka_slice(q8, 8);
  EXPECT_EQ(same.format, QuantFormatId::Int8G32);
  const Tensor a = same.dequantize(), b = q8.dequantize();
  for (int64_t i = 0; i < a.numel(); ++i) ASSERT_EQ(a.item(i), b.item(i));
}

TEST(Matryoshka, TrainingForwardOfEveryWidthIsTheSlicedEncodedTensor) {
  // What the loss saw (lsq_fake_quant with a slice, at the stored f16 steps) is bit for bit what the
  // sliced checkpoint decodes, for every width and group size.
  for (const char* name : {"int8g32", "int8g64", "int8g128"}) {
    const QuantFormat& f = parse_quant_format(name);
    const Tensor w = Tensor::randn({5, 300}, 21, 0.05, DType::F32);
    LsqParams p = lsq_init(w, f, LsqInit::Mse);
    p.offset.set_item(1, p.offset.item(1) + 0.4);
    const QuantizedTensor q = lsq_encode(w, p.step, p.offset, f);
    const Tensor stored = lsq_storage_step(p.step);
    for (int r : {8, 4, 3, 2}) {
      const Tensor y = lsq_fake_quant_value(w, stored, p.offset, f, r == 8 ? 0 : r);
      const QuantizedTensor qs = matryoshka_slice(q, r);
      EXPECT_EQ(qs.fmt().bits, r);
      EXPECT_EQ(qs.fmt().group_size, f.group_size);
      const Tensor d = qs.dequantize();
      for (int64_t i = 0; i < w.numel(); ++i) ASSERT_EQ(d.item(i), y.item(i)) << name << " r " << r << " element " << i;
    }
  }
}

TEST(Matryoshka, SlicedQuantizerGradientsMatchFiniteDifferencesOfTheSurrogate) {
  // The straight-through surrogate of the r-bit slice around (w0, s0, z0) (quant/lsq.h, with the
  // clamp at the sliced top T = 256 - 2^(8-r)): per element with u = w/s + zr,
  //   inside (0 <= u <= T): Ŵ = w + s (S 2^(8-r) - u0)     the residual held at the base point
  //   outside:              Ŵ = s (bound - zr)              bound 0 or T
  // and zr = z + (round(z0) - z0) (round(z) passes the gradient).
  const QuantFormat& f = parse_quant_format("int8g32");
  for (int r : {4, 3, 2}) {
    const int64_t out = 3, in = 70, G = f.n_groups(in);
    Tensor w = Tensor::randn({out, in}, 13, 1.0, DType::F64);
    w.set_item(3, 6.0);
    w.set_item(in + 5, -7.0);
    LsqParams p = lsq_init(w, f, LsqInit::MinMax);
    for (int64_t i = 0; i < p.step.numel(); ++i) p.step.set_item(i, p.step.item(i) * 0.8);
    for (int64_t i = 0; i < p.offset.numel(); ++i) p.offset.set_item(i, p.offset.item(i) + 0.23);
    const double top = 256.0 - double(1 << (8 - r));
    std::vector<double> held(size_t(out * in)), zheld(size_t(out * G));
    std::vector<char> inside(size_t(out * in));
    for (int64_t k = 0; k < out * G; ++k) zheld[size_t(k)] = std::nearbyint(p.offset.item(k)) - p.offset.item(k);
    for (int64_t i = 0; i < out * in; ++i) {
      const int64_t k = (i / in) * G + f.group_of_column(i % in);
      const double zr = p.offset.item(k) + zheld[size_t(k)];
      const double u = w.item(i) / p.step.item(k) + zr;
      inside[size_t(i)] = u >= 0 && u <= top;
      const double q = std::nearbyint(std::min(std::max(u, 0.0), 255.0));
      const double sq = double(int(matryoshka_slice_code(uint8_t(q), 8, r)) << (8 - r));
      held[size_t(i)] = inside[size_t(i)] ? sq - u : (u < 0 ? 0.0 : top);
    }
    Tensor wx = w.clone(), sx = p.step.clone(), zx = p.offset.clone();
    auto surrogate = [&] {
      Tensor y = Tensor::empty({out, in}, DType::F64);
      for (int64_t i = 0; i < out * in; ++i) {
        const int64_t k = (i / in) * G + f.group_of_column(i % in);
        const double s = sx.item(k), zr = zx.item(k) + zheld[size_t(k)];
        y.set_item(i, inside[size_t(i)] ? wx.item(i) + s * held[size_t(i)] : s * (held[size_t(i)] - zr));
      }
      return y;
    };
    const Tensor proj = Tensor::randn({out, in}, 5, 1.0, DType::F64);
    Var wv(w.clone(), true), sv(p.step.clone(), true), zv(p.offset.clone(), true);
    Var y = lsq_fake_quant(wv, sv, zv, f, 1.0, r);
    ASSERT_LT(std::fabs(dot(surrogate(), proj) - dot(y.value(), proj)), 1e-10) << "r " << r << ": surrogate = forward";
    backward(sum(mul(y, Var(proj))));
    const double h = 1e-6;
    auto check = [&](Tensor x, const Tensor& grad, const char* what) {
      for (int64_t i = 0; i < x.numel(); ++i) {
        const double o = x.item(i);
        x.set_item(i, o + h);
        const double lp = dot(surrogate(), proj);
        x.set_item(i, o - h);
        const double lm = dot(surrogate(), proj);
        x.set_item(i, o);
        const double num = (lp - lm) / (2 * h);
        ASSERT_NEAR(grad.item(i), num, 1e-6 * std::max(1.0, std::fabs(num))) << "r " << r << " " << what << " " << i;
      }
    };
    check(wx, wv.grad(), "dW");
    check(sx, sv.grad(), "dstep");
    check(zx, zv.grad(), "doffset");
    int zeros = 0;
    for (int64_t i = 0; i < wv.grad().numel(); ++i) zeros += wv.grad().item(i) == 0;
    EXPECT_GT(zeros, 0) << "r " << r << ": some elements clamped";
    EXPECT_LT(zeros, wv.grad().numel()) << "r " << r;
  }
}

TEST(Matryoshka, BadWidthsAndFormatsAreNamedErrors) {
  EXPECT_EQ(parse_matryoshka_widths("8,4,2"), (std::vector<int>{8, 4, 2}));
  EXPECT_EQ(parse_matryoshka_widths("2"), (std::vector<int>{2}));
  expect_error([] { parse_matryoshka_widths("8,5,2"); }, "--widths: '5' is not a Matryoshka width");
  expect_error([] { parse_matryoshka_widths("8,,2"); }, "--widths: '' is not a Matryoshka width");
  expect_error([] { parse_matryoshka_widths("8,4,8"); }, "--widths: width 8 is listed twice");
  expect_error([] { parse_matryoshka_widths("four"); }, "--widths: 'four'");
  EXPECT_EQ(parse_width_weights("", 3), (std::vector<double>{1, 1, 1}));
  EXPECT_EQ(parse_width_weights("0.5,1,2", 3), (std::vector<double>{0.5, 1, 2}));
  expect_error([] { parse_width_weights("1,1", 3); }, "--width-weights: 2 weights for 3 widths");
  expect_error([] { parse_width_weights("1,-1,1", 3); }, "--width-weights: '-1' is not a finite weight");
  expect_error([] { parse_width_weights("1,nan,1", 3); }, "--width-weights: 'nan'");
  expect_error([] { parse_width_weights("0,0", 2); }, "--width-weights: every weight is 0");
  expect_error([] { matryoshka_slice_format(parse_quant_format("int4g64"), 2); },
               "--slice: the model is stored in int4g64, not a Matryoshka parent");
  expect_error([] { matryoshka_slice_format(parse_quant_format("int8g64"), 5); }, "--slice: 5 is not a Matryoshka width");
  expect_error([] { matryoshka_slice_format(parse_quant_format("int8pc"), 2); }, "not a Matryoshka parent");
  EXPECT_EQ(std::string(matryoshka_slice_format(parse_quant_format("int8g128"), 3).name), "int3g128");
  // The sliced quantizer needs an asymmetric format wider than the slice.
  const QuantFormat& fs = parse_quant_format("int4g64s");
  const Tensor w = Tensor::randn({2, 64}, 1, 1.0, DType::F32);
  const LsqParams p = lsq_init(w, fs, LsqInit::MinMax);
  expect_error([&] { lsq_fake_quant_value(w, p.step, p.offset, fs, 2); }, "Matryoshka slice of 2 bits");
}
