// WKVQuant's two-dimensional quantizer and past-only attention (ops/wkv_quant.h): the quantizer on
// a hand-computed example (smoothing, per-token 2-bit groups, un-smoothing), no smoothing = KIVI's
// per-token codec, the attention against kv_attention_forward over hand-mixed rows, bad inputs.
#include <gtest/gtest.h>

#include <functional>
#include <random>

#include "lowbit/core/error.h"
#include "lowbit/ops/kv_quant.h"
#include "lowbit/ops/ops.h"
#include "lowbit/ops/wkv_quant.h"

using namespace lowbit;

namespace {
void expect_message(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no error, expected one mentioning '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

Tensor randn(const Shape& s, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  Tensor t = Tensor::empty(s);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = n(rng);
  return t;
}
}  // namespace

TEST(WkvQuant, TwoDimensionalQuantizerWorkedExample) {
  // shift d = (1, 0, 10, -2), scale s = (2, 1, 4, 0.5); 2 bits (codes 0..3), groups of 2 channels.
  const Tensor d = Tensor::from_vector(std::vector<float>{1, 0, 10, -2}, {4});
  const Tensor s = Tensor::from_vector(std::vector<float>{2, 1, 4, 0.5f}, {4});
  // Row 0: x = (7, 1.4, 4, -1.4) -> z = (x - d) / s = (3, 1.4, -1.5, 1.2).
  //   group (3, 1.4): lo 0, hi 3, step 1, zero 0: codes (3, 1) -> (3, 1) -> y = (3*2+1, 1*1+0) = (7, 1).
  //   group (-1.5, 1.2): lo -1.5, hi 1.2, step 0.9, zero round(1.5/0.9 = 1.67) = 2:
  //   codes round(-1.67)+2 = 0, round(1.33)+2 = 3 -> (0-2)*0.9 = -1.8, (3-2)*0.9 = 0.9
  //   -> y = (-1.8*4+10, 0.9*0.5-2) = (2.8, -1.55).
  // Row 1: x = d -> z = 0: all-zero groups decode to 0 -> y = d.
  const Tensor x = Tensor::from_vector(std::vector<float>{7, 1.4f, 4, -1.4f, 1, 0, 10, -2}, {2, 4});
  Tensor y;
  ops::wkv_fake_quant(x, d, s, 2, 2, y);
  const std::vector<float> want{7, 1, 2.8f, -1.55f, 1, 0, 10, -2};
  for (int i = 0; i < 8; ++i) EXPECT_NEAR(y.data<float>()[i], want[size_t(i)], 2e-6) << i;
  // Without smoothing the same row is quantized as it is: (7, 1.4) in 2 bits, step 7/3: codes
  // (3, round(0.6) = 1) -> (7, 2.333); (4, -1.4): lo -1.4, hi 4, step 1.8, zero round(0.78) = 1:
  // codes round(2.22)+1 = 3, round(-0.78)+1 = 0 -> (3.6, -1.8).
  Tensor plain;
  ops::wkv_fake_quant(x, Tensor(), Tensor(), 2, 2, plain);
  const std::vector<float> want_plain{7, 7.0f / 3, 3.6f, -1.8f};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(plain.data<float>()[i], want_plain[size_t(i)], 2e-6) << i;
  // No smoothing is KIVI's per-token codec, bit for bit; identity smoothing (0, 1) the same.
  const Tensor r = randn({6, 16}, 3);
  Tensor a, b = Tensor::empty({6, 16}), c;
  ops::wkv_fake_quant(r, Tensor(), Tensor(), 4, 8, a);
  ops::kivi_fake_quant(r, 4, 8, false, b);
  ops::wkv_fake_quant(r, Tensor::zeros({16}), Tensor::full({16}, 1.0), 4, 8, c);
  for (int64_t i = 0; i < r.numel(); ++i) {
    EXPECT_EQ(a.data<float>()[i], b.data<float>()[i]) << i;
    EXPECT_EQ(c.data<float>()[i], b.data<float>()[i]) << i;
  }
  // Bad input names the problem.
  expect_message([&] { ops::wkv_fake_quant(x, d, Tensor(), 2, 2, y); }, "give both shift and scale");
  expect_message([&] { ops::wkv_fake_quant(x, d, Tensor::from_vector(std::vector<float>{1, 0, 1, 1}, {4}), 2, 2, y); },
                 "scale of channel 1 is 0");
  expect_message([&] { ops::wkv_fake_quant(x, d.slice(0, 0, 3).contiguous(), s.slice(0, 0, 3).contiguous(), 2, 2, y); },
                 "must be [4]");
  expect_message([&] { ops::wkv_fake_quant(x, d, s, 3, 2, y); }, "3 bits");
  expect_message([&] { ops::wkv_fake_quant(x, d, s, 2, 3, y); }, "group of 3");
}

TEST(WkvQuant, PastQuantAttentionMatchesMixedRows) {
  const int64_t T = 5, S = 7, H = 4, KVH = 2, hd = 8;
  const Tensor q = randn({T, H, hd}, 1), k = randn({S, KVH, hd}, 2), v = randn({S, KVH, hd}, 3);
  const Tensor kq = randn({S, KVH, hd}, 4), vq = randn({S, KVH, hd}, 5);
  const std::vector<int64_t> L{0, 2, 3, 6, 7};  // query i at position 2 + i reads rows j < L[i] from kq / vq
  const double scale = 0.35;
  Tensor out;
  ops::past_quant_attention_forward(q, k, v, kq, vq, L, scale, out);
  for (int64_t i = 0; i < T; ++i) {
    const int64_t n = S - T + i + 1;
    Tensor km = k.slice(0, 0, n).contiguous().clone(), vm = v.slice(0, 0, n).contiguous().clone();
    km.slice(0, 0, L[size_t(i)]).copy_(kq.slice(0, 0, L[size_t(i)]));
    vm.slice(0, 0, L[size_t(i)]).copy_(vq.slice(0, 0, L[size_t(i)]));
    Tensor ref = Tensor::empty({1, H, hd});
    ops::kv_attention_forward(q.slice(0, i, i + 1).contiguous(), km, vm, Tensor(), Tensor(), scale, ref);
    for (int64_t e = 0; e < H * hd; ++e)
      EXPECT_NEAR(out.data<float>()[i * H * hd + e], ref.data<float>()[e], 2e-5) << "query " << i << " element " << e;
  }
  // Nothing quantized: plain causal attention.
  Tensor plain, ref = Tensor::empty({T, H, hd});
  ops::past_quant_attention_forward(q, k, v, Tensor(), Tensor(), std::vector<int64_t>(T, 0), scale, plain);
  ops::kv_attention_forward(q, k, v, Tensor(), Tensor(), scale, ref);
  for (int64_t e = 0; e < ref.numel(); ++e) EXPECT_NEAR(plain.data<float>()[e], ref.data<float>()[e], 2e-5) << e;
  expect_message([&] { ops::past_quant_attention_forward(q, k, v, kq, vq, {0, 2, 3, 6, 8}, scale, out); },
                 "query 4 reads 8 quantized tokens");
  expect_message([&] { ops::past_quant_attention_forward(q, k, v, kq, vq, {0, 2}, scale, out); }, "2 quantized counts for 5");
}
