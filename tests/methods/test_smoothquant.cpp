// SmoothQuant scale migration (methods/smoothquant.h): the scale formula on a worked example, the
// fold preserves the full-precision model, and with alpha = 1 every smoothed input channel's
// maximum becomes 1 (the activations' range moved entirely into the weights).
#include <gtest/gtest.h>

#include <cmath>

#include "common/small_model.h"
#include "common/test_util.h"
#include "lowbit/methods/calibration.h"
#include "lowbit/methods/smoothquant.h"

using namespace lowbit;

namespace {
Tensor calib_for(const LlamaConfig& c) {
  std::vector<int32_t> stream;
  for (int i = 0; i < 300; ++i) stream.push_back((i * 17 + 3) % c.vocab_size);
  return sample_calibration(stream, 3, 16, 0);
}
}  // namespace

TEST(SmoothQuant, ScalesFollowTheFormula) {
  // max|W_:,j| over both rows: {2, 2, 3}; max|X_j| = {4, 1, 0}.
  const Tensor w = Tensor::from_vector(std::vector<float>{1, 2, 3, -2, 0.5f, 1}, {2, 3});
  const auto s = smooth_scales({4, 1, 0}, {&w}, 0.5);
  EXPECT_NEAR(s[0], std::sqrt(4.0) / std::sqrt(2.0), 1e-12);
  EXPECT_NEAR(s[1], 1.0 / std::sqrt(2.0), 1e-12);
  EXPECT_EQ(s[2], 1.0);  // a channel that never fires keeps its scale
  const auto s1 = smooth_scales({4, 1, 0}, {&w}, 1.0);
  EXPECT_NEAR(s1[0], 4.0, 1e-12);
  EXPECT_THROW(smooth_scales({4, 1, 0}, {&w}, 1.5), Error);
  const Tensor bad = Tensor::zeros({2, 2});
  EXPECT_THROW(smooth_scales({4, 1, 0}, {&bad}, 0.5), Error);  // width mismatch
}

TEST(SmoothQuant, FoldKeepsTheModelAndFlattensTheChannels) {
  for (const bool tied : {true, false}) {
    LlamaConfig c = test::small_config(RopeStyle::Half);
    c.tied_embeddings = tied;
    LlamaWeights w0 = random_weights(c, 21, 0.2);
    // An outlier channel in the first block's attention input: scale a norm weight up.
    w0.layers[0].attn_norm.data<float>()[5] = 20.0f;
    LlamaModel m0(c, w0);
    const Tensor calib = calib_for(c);
    const SmoothStats st = collect_smooth_stats(m0, calib, 2);
    ASSERT_EQ(st.attn.size(), size_t(c.n_layers));
    EXPECT_GT(st.attn[0][5], 5 * st.attn[0][4]);
    for (const double alpha : {0.5, 1.0}) {
      LlamaWeights w = w0;
      SmoothOptions o;
      o.alpha = alpha;
      const SmoothReport r = smooth_weights(w, st, o);
      EXPECT_EQ(r.points, 3 * c.n_layers);
      LlamaModel m1(c, w);
      const Tensor a = test::logits_of(m0, calib), b = test::logits_of(m1, calib);
      EXPECT_LT(max_abs_diff(a, b), 1e-4 * std::max(1.0, max_abs_diff(a, Tensor::zeros(a.shape()))))
          << "alpha " << alpha << (tied ? " tied" : " untied");
      // w0 is untouched (the fold works on copies of the weights).
      EXPECT_EQ(w0.layers[0].attn_norm.data<float>()[5], 20.0f);
      if (alpha == 1.0) {
        const SmoothStats s1 = collect_smooth_stats(m1, calib, 2);
        for (int i = 0; i < c.n_layers; ++i)
          for (const auto* v : {&s1.attn[size_t(i)], &s1.ffn[size_t(i)], &s1.down[size_t(i)]})
            for (double x : *v) EXPECT_NEAR(x, 1.0, 1e-4) << "layer " << i;
      }
    }
  }
}

TEST(SmoothQuant, AutoAlphaIsTheGridMinimumOfTheOutputError) {
  LlamaConfig c = test::small_config(RopeStyle::Half);
  LlamaWeights w0 = random_weights(c, 22, 0.2);
  w0.layers[0].attn_norm.data<float>()[5] = 30.0f;  // an outlier input channel of q/k/v
  LlamaModel m0(c, w0);
  const Tensor calib = calib_for(c);  // 3 windows x 16 tokens = 48 rows
  const SmoothStats st = collect_smooth_stats(m0, calib, 1, 20);
  ASSERT_EQ(st.attn_x.size(), size_t(c.n_layers));
  // Every 48 / 20 = 2nd token, at most 20 rows.
  EXPECT_EQ(st.attn_x[0].size(0), 20);
  EXPECT_EQ(st.down_x[0].size(1), c.hidden_dim);
  // A sampled row is the input of q_proj at that token: its outlier channel is large.
  EXPECT_GT(std::fabs(st.attn_x[0].data<float>()[5]), 1.0);
  const QuantFormat& f = parse_quant_format("int4pc");
  const ActQuantSpec act{4, false, 1.0, ActFloat::None, {}};
  SmoothOptions o;
  o.search = true;
  o.format = &f;
  o.act = act;
  LlamaWeights w = w0;
  const SmoothReport r = smooth_weights(w, st, o);
  ASSERT_EQ(r.alphas.size(), size_t(3 * c.n_layers));
  // Recompute the objective over the grid for every point of layer 0 from the original weights.
  const LayerWeights& l = w0.layers[0];
  const std::vector<std::pair<std::pair<const std::vector<double>*, const Tensor*>, std::vector<const Tensor*>>> pts = {
      {{&st.attn[0], &st.attn_x[0]}, {&l.wq, &l.wk, &l.wv}},
      {{&st.ffn[0], &st.ffn_x[0]}, {&l.w_gate, &l.w_up}},
      {{&st.down[0], &st.down_x[0]}, {&l.w_down}}};
  for (size_t k = 0; k < pts.size(); ++k) {
    double best = -1, best_err = 1e300, err0 = 0;
    for (double a : o.grid) {
      const double e = smooth_error(*pts[k].first.first, *pts[k].first.second, pts[k].second, a, f, act);
      EXPECT_GE(e, 0.0);
      if (a == 0.0) err0 = e;
      if (e < best_err) best_err = e, best = a;
    }
    EXPECT_EQ(r.alphas[k], best) << "point " << k;
    if (k == 0) {  // with a 30x outlier channel and 4-bit activations, migrating some range pays
      EXPECT_GT(best, 0.0);
      EXPECT_LT(best_err, 0.9 * err0);
    }
  }
  // The searched fold keeps the full-precision model.
  LlamaModel m1(c, w);
  const Tensor a = test::logits_of(m0, calib), b = test::logits_of(m1, calib);
  EXPECT_LT(max_abs_diff(a, b), 1e-4 * std::max(1.0, max_abs_diff(a, Tensor::zeros(a.shape()))));
  // Searching needs the sampled rows and a format.
  const SmoothStats no_rows = collect_smooth_stats(m0, calib, 1);
  LlamaWeights w2 = w0;
  EXPECT_THROW(smooth_weights(w2, no_rows, o), Error);
  SmoothOptions no_format = o;
  no_format.format = nullptr;
  EXPECT_THROW(smooth_weights(w2, st, no_format), Error);
}
