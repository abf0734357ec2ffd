// The Coupled Quantization codec (ops/coupled_quant.h): nearest-centroid codes on a worked example,
// decode / fake quantization against the formula, ties, bad inputs.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

#include "common/expect_message.h"
#include "lowbit/core/error.h"
#include "lowbit/ops/coupled_quant.h"

using namespace lowbit;

namespace {
// Two groups of 2 channels, 3 centroids each.
Tensor worked_codebook() {
  return Tensor::from_vector(std::vector<float>{0, 0, 1, 1, -2, 0,    // group 0: (0,0) (1,1) (-2,0)
                                                5, 5, 0, 0, 5, -5},   // group 1: (5,5) (0,0) (5,-5)
                             {2, 3, 2});
}

using test::expect_message;
}  // namespace

TEST(CoupledQuant, NearestCentroidWorkedExample) {
  const Tensor cb = worked_codebook();
  // Row 0: group 0 (0.9, 0.6) -> (1,1) [d 0.17 vs 1.17, 8.57]; group 1 (4, -3) -> (5,-5) [d 5 vs 65, 25].
  // Row 1: group 0 (-0.9, 0) -> (0,0) [d 0.81 vs 4.61, 1.21]; group 1 (1, 1) -> (0,0) [d 32, 2, 52].
  // Row 2: ties: group 0 (-1, 0) is 1 from (0,0) and 1 from (-2,0): the lower index (0) wins;
  //        group 1 (5, 0) is 25 from (5,5) and from (5,-5), 25 from (0,0): index 0.
  const Tensor x = Tensor::from_vector(std::vector<float>{0.9f, 0.6f, 4, -3, -0.9f, 0, 1, 1, -1, 0, 5, 0}, {3, 4});
  Tensor codes = Tensor::empty({3, 2}, DType::U8);
  ops::cq_encode(x, cb, codes);
  const uint8_t want[6] = {1, 2, 0, 1, 0, 0};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(codes.data<uint8_t>()[i], want[i]) << "code " << i;
  Tensor y = Tensor::empty({3, 4});
  ops::cq_decode(codes, cb, y);
  const float yw[12] = {1, 1, 5, -5, 0, 0, 0, 0, 0, 0, 5, 5};
  for (int i = 0; i < 12; ++i) EXPECT_EQ(y.data<float>()[i], yw[i]) << "value " << i;
  // Fake quantization = decode(encode(x)), also in place; applying it again changes nothing.
  Tensor z = Tensor::empty({3, 4});
  ops::cq_fake_quant(x, cb, z);
  for (int i = 0; i < 12; ++i) EXPECT_EQ(z.data<float>()[i], yw[i]);
  Tensor w = x.clone();
  ops::cq_fake_quant(w, cb, w);
  for (int i = 0; i < 12; ++i) EXPECT_EQ(w.data<float>()[i], yw[i]);
  ops::cq_fake_quant(w, cb, w);
  for (int i = 0; i < 12; ++i) EXPECT_EQ(w.data<float>()[i], yw[i]);
  // cq_nearest on the transposed layout reports the distance.
  const float ct[6] = {0, 1, -2, 0, 1, 0};  // group 0 transposed: channel 0 row, channel 1 row
  const float p[2] = {0.9f, 0.6f};
  float d = -1;
  EXPECT_EQ(ops::cq_nearest(p, ct, 3, 2, &d), 1);
  EXPECT_NEAR(d, 0.01f + 0.16f, 1e-6);
}

TEST(CoupledQuant, RandomRowsMatchBruteForce) {
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0.0f, 1.0f);
  const int64_t G = 3, K = 256, c = 8, M = 40;
  Tensor cb = Tensor::empty({G, K, c});
  for (int64_t i = 0; i < cb.numel(); ++i) cb.data<float>()[i] = n(rng);
  Tensor x = Tensor::empty({M, G * c});
  for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = n(rng);
  Tensor codes = Tensor::empty({M, G}, DType::U8), y = Tensor::empty({M, G * c});
  ops::cq_encode(x, cb, codes);
  ops::cq_fake_quant(x, cb, y);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      double best = 1e300;
      int64_t bj = -1;
      for (int64_t j = 0; j < K; ++j) {
        double s = 0;
        for (int64_t d = 0; d < c; ++d) {
          const double e = double(x.data<float>()[m * G * c + g * c + d]) - cb.data<float>()[(g * K + j) * c + d];
          s += e * e;
        }
        if (s < best) {
          best = s;
          bj = j;
        }
      }
      EXPECT_EQ(codes.data<uint8_t>()[m * G + g], bj);
      for (int64_t d = 0; d < c; ++d)
        EXPECT_EQ(y.data<float>()[m * G * c + g * c + d], cb.data<float>()[(g * K + bj) * c + d]);
    }
}

TEST(CoupledQuant, BadInputsAreRefused) {
  const Tensor cb = worked_codebook();
  Tensor x = Tensor::zeros({2, 4}), y = Tensor::zeros({2, 4});
  expect_message([&] { ops::cq_fake_quant(Tensor::zeros({2, 5}), cb, y); }, "channels");
  expect_message([&] { ops::cq_fake_quant(x, Tensor::zeros({2, 3}), y); }, "f32 [groups, centroids, channels]");
  expect_message([&] { ops::cq_fake_quant(x, Tensor::zeros({2, 300, 2}), y); }, "1..256 centroids");
  Tensor nan_cb = cb.clone();
  nan_cb.data<float>()[3] = std::numeric_limits<float>::quiet_NaN();
  expect_message([&] { ops::cq_fake_quant(x, nan_cb, y); }, "not finite");
  Tensor codes = Tensor::zeros({2, 2}, DType::U8);
  codes.data<uint8_t>()[1] = 3;  // only 3 centroids
  expect_message([&] { ops::cq_decode(codes, cb, y); }, "outside the codebook");
  expect_message([&] { ops::cq_decode(Tensor::zeros({2, 3}, DType::U8), cb, y); }, "codes must be u8");
  expect_message([&] { ops::cq_encode(x, cb, codes = Tensor::zeros({2, 2}, DType::I32)); }, "codes must be u8");
}
