#include <gtest/gtest.h>

#include <cmath>

#include "lowbit/core/tensor.h"

using namespace lowbit;

TEST(Tensor, FactoriesAndItems) {
  Tensor t = Tensor::zeros({2, 3});
  EXPECT_EQ(t.numel(), 6);
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw_data()) % 64, 0u);
  t.set_item(4, 2.5);
  EXPECT_DOUBLE_EQ(t.item(4), 2.5);
  EXPECT_THROW(t.item(6), Error);
  EXPECT_THROW(t.data<double>(), Error);
  EXPECT_THROW(Tensor::empty({-1, 2}), Error);
}

TEST(Tensor, ViewsShareStorage) {
  Tensor t = Tensor::from_vector(std::vector<float>{0, 1, 2, 3, 4, 5}, {2, 3});
  Tensor tr = t.transpose(0, 1);
  EXPECT_FALSE(tr.is_contiguous());
  Tensor c = tr.contiguous();
  EXPECT_EQ(c.to_vector(), (std::vector<float>{0, 3, 1, 4, 2, 5}));
  Tensor s = t.slice(1, 1, 3);
  EXPECT_EQ(s.contiguous().to_vector(), (std::vector<float>{1, 2, 4, 5}));
  s.fill_(9);
  EXPECT_EQ(t.to_vector(), (std::vector<float>{0, 9, 9, 3, 9, 9}));
  EXPECT_EQ(t.select(0, 1).to_vector(), (std::vector<float>{3, 9, 9}));
  EXPECT_EQ(t.view({3, -1}).shape(), (Shape{3, 2}));
  EXPECT_THROW(t.view({4, -1}), Error);
  EXPECT_THROW(tr.view({6}), Error);
  EXPECT_EQ(tr.reshape({6}).to_vector(), (std::vector<float>{0, 3, 9, 9, 9, 9}));
  EXPECT_THROW(t.slice(1, 2, 4), Error);
}

TEST(Tensor, DtypeConversions) {
  Tensor t = Tensor::from_vector(std::vector<float>{1.0f, -2.5f, 65504.0f, 1e-8f, 3.14159f}, {5});
  Tensor h = t.to(DType::F16).to(DType::F32);
  EXPECT_FLOAT_EQ(h.item(0), 1.0f);
  EXPECT_FLOAT_EQ(h.item(1), -2.5f);
  EXPECT_FLOAT_EQ(h.item(2), 65504.0f);
  EXPECT_NEAR(h.item(4), 3.14159, 2e-3);
  Tensor b = t.to(DType::BF16).to(DType::F32);
  EXPECT_NEAR(b.item(4), 3.14159, 2e-2);
  EXPECT_EQ(parse_dtype("bfloat16"), DType::BF16);
  EXPECT_THROW(parse_dtype("f8"), Error);
}

TEST(Tensor, F16ExhaustiveRoundTrip) {
  // Every finite f16 value converts to f32 and back to itself.
  for (uint32_t u = 0; u < 0x10000u; ++u) {
    uint16_t h = uint16_t(u);
    if (((h >> 10) & 0x1f) == 0x1f) continue;  // inf/nan
    ASSERT_EQ(f32_to_f16(f16_to_f32(h)), h) << "h=" << u;
  }
  EXPECT_EQ(f32_to_f16(1e6f), 0x7c00);
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(NAN))));
}

TEST(Tensor, RandomIsSeeded) {
  Tensor a = Tensor::randn({100}, 7), b = Tensor::randn({100}, 7), c = Tensor::randn({100}, 8);
  EXPECT_EQ(max_abs_diff(a, b), 0.0);
  EXPECT_GT(max_abs_diff(a, c), 0.0);
}
