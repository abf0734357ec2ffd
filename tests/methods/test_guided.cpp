// GuidedQuant's guided Hessians (methods/guided.h): the row groups, the per-group weights against
// finite differences of the end loss, the weighted Hessians against a hand-worked example and brute
// force, GPTQ equality for one group with equal weights, format refusals and resume after a kill.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "common/small_model.h"
#include "common/stories_fixture.h"
#include "lowbit/autograd/functions.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/methods/guided.h"
#include "lowbit/methods/registry.h"
#include "lowbit/model/weights.h"

using namespace lowbit;

namespace {

Tensor mat(int64_t r, int64_t c, std::initializer_list<float> v) {
  Tensor t = Tensor::empty({r, c});
  int64_t i = 0;
  for (float x : v) t.data<float>()[i++] = x;
  return t;
}

// Adds `delta` to output element (t, j) of the wrapped linear (no gradients: finite differences).
class PerturbLinear : public Linear {
 public:
  PerturbLinear(std::shared_ptr<Linear> inner, int64_t t, int64_t j, double delta)
      : inner_(std::move(inner)), t_(t), j_(j), delta_(delta) {}
  Var forward(const Var& x) const override {
    Tensor v = inner_->forward(x).value().contiguous().clone();
    v.data<double>()[t_ * v.size(1) + j_] += delta_;
    return Var(v);
  }
  int64_t in_features() const override { return inner_->in_features(); }
  int64_t out_features() const override { return inner_->out_features(); }
  std::vector<Var> parameters() const override { return {}; }
  Tensor effective_weight() const override { return inner_->effective_weight(); }
  std::string kind() const override { return "perturb"; }

 private:
  std::shared_ptr<Linear> inner_;
  int64_t t_, j_;
  double delta_;
};

}  // namespace

TEST(Guided, RowGroupBounds) {
  EXPECT_EQ(row_group_bounds(8, 4), (std::vector<int64_t>{0, 2, 4, 6, 8}));
  EXPECT_EQ(row_group_bounds(10, 4), (std::vector<int64_t>{0, 2, 5, 7, 10}));  // sizes differ by one at most
  EXPECT_EQ(row_group_bounds(2, 3), (std::vector<int64_t>{0, 0, 1, 2}));      // more groups than rows
  EXPECT_EQ(row_group_bounds(5, 1), (std::vector<int64_t>{0, 5}));
  EXPECT_THROW(row_group_bounds(5, 0), Error);
}

// Row t, group k: mean over the group's columns of grad^2.
TEST(Guided, GroupMeanSquaresWorkedExample) {
  // out 5, g 2: groups {0, 1} and {2, 3, 4}
  Tensor g = mat(2, 5, {1, 3, 2, 0, -2,  //
                        0, -1, 1, 1, 4});
  Tensor w = group_mean_squares(g, 2);
  ASSERT_EQ(w.shape(), (Shape{2, 2}));
  EXPECT_FLOAT_EQ(w.item(0), 5.0f);         // (1 + 9) / 2
  EXPECT_FLOAT_EQ(w.item(1), 8.0f / 3.0f);  // (4 + 0 + 4) / 3
  EXPECT_FLOAT_EQ(w.item(2), 0.5f);         // (0 + 1) / 2
  EXPECT_FLOAT_EQ(w.item(3), 6.0f);         // (1 + 1 + 16) / 3
}

// H_k = sum_t w_tk x_t x_t^T by hand: x = [1 2; 0 1; 3 -1], w = [2 0; 1 1; 0 3].
//   H_0 = 2 [1 2; 2 4] + 1 [0 0; 0 1]           = [2 4; 4 9]
//   H_1 = 1 [0 0; 0 1] + 3 [9 -3; -3 1]         = [27 -9; -9 4]
// and again by brute force on random rows (two batches accumulated into the same sums).
TEST(Guided, WeightedHessianWorkedExampleAndBruteForce) {
  std::vector<Tensor> h;
  accumulate_row_group_hessians(mat(3, 2, {1, 2, 0, 1, 3, -1}), mat(3, 2, {2, 0, 1, 1, 0, 3}), h);
  ASSERT_EQ(h.size(), 2u);
  const float h0[] = {2, 4, 4, 9}, h1[] = {27, -9, -9, 4};
  for (int i = 0; i < 4; ++i) {
    EXPECT_FLOAT_EQ(h[0].data<float>()[i], h0[i]) << i;
    EXPECT_FLOAT_EQ(h[1].data<float>()[i], h1[i]) << i;
  }
  const int64_t rows = 37, in = 9, g = 3;
  Tensor x = Tensor::randn({rows, in}, 11), w = Tensor::randn({rows, g}, 12);
  for (int64_t i = 0; i < w.numel(); ++i) w.data<float>()[i] = std::fabs(w.data<float>()[i]);
  std::vector<Tensor> hs;
  accumulate_row_group_hessians(x.slice(0, 0, 20), w.slice(0, 0, 20), hs);
  accumulate_row_group_hessians(x.slice(0, 20, rows), w.slice(0, 20, rows), hs);
  for (int64_t k = 0; k < g; ++k)
    for (int64_t a = 0; a < in; ++a)
      for (int64_t b = 0; b < in; ++b) {
        double want = 0;
        for (int64_t t = 0; t < rows; ++t) want += double(w.item(t * g + k)) * x.item(t * in + a) * x.item(t * in + b);
        EXPECT_NEAR(hs[size_t(k)].item(a * in + b), want, 1e-4 * (1 + std::fabs(want))) << k << " " << a << " " << b;
      }
}

// The weights are the group means of the squared gradient of the SUM of the window's next-token
// losses with respect to each linear's output: checked against central finite differences of that
// sum on a small f64 model, for every output channel of two linears at a few tokens; the last
// token of a window has no target, so its weights are 0.
TEST(Guided, WeightsAreGroupMeansOfSquaredEndLossGradients) {
  LlamaConfig c = test::small_config(RopeStyle::Half);
  LlamaWeights w = random_weights(c, 7, 0.2);
  for_each_weight(w, [](const std::string&, Tensor& t) { t = t.to(DType::F64); });
  LlamaModel model(c, w);
  const int64_t L = 6, g = 3;
  Tensor tokens = Tensor::empty({2, L}, DType::I32);
  for (int64_t i = 0; i < tokens.numel(); ++i) tokens.data<int32_t>()[i] = int32_t((i * 17 + 3) % c.vocab_size);
  GuidedStats st = compute_guided_stats(model, tokens, g);
  ASSERT_EQ(st.weights.size(), size_t(7 * c.n_layers));
  auto loss_sum = [&](const Tensor& tw) {
    NoGradGuard ng;
    Tensor targets = Tensor::empty({L}, DType::I32);
    for (int64_t t = 0; t < L; ++t) targets.data<int32_t>()[t] = t + 1 < L ? tw.data<int32_t>()[t + 1] : -1;
    return cross_entropy(model.forward(tw), targets).value().item() * double(L - 1);
  };
  const std::pair<int, const char*> mods[] = {{0, "self_attn.v_proj"}, {1, "mlp.down_proj"}};
  for (const auto& [layer, name] : mods) {
    std::shared_ptr<Linear>* slot = nullptr;
    for (auto& [n, s] : model.block(layer).linears())
      if (n == name) slot = s;
    ASSERT_NE(slot, nullptr);
    const std::shared_ptr<Linear> orig = *slot;
    const int64_t out = orig->out_features();
    const std::vector<int64_t> b = row_group_bounds(out, g);
    const Tensor& got = st.weights.at("model.layers." + std::to_string(layer) + "." + name);
    for (int64_t wdw : {0, 1})
      for (int64_t t : {int64_t(0), int64_t(2), L - 1}) {
        const Tensor tw = tokens.slice(0, wdw, wdw + 1).contiguous();
        std::vector<double> sq(static_cast<size_t>(out));
        const double h = 1e-5;
        for (int64_t j = 0; j < out; ++j) {
          *slot = std::make_shared<PerturbLinear>(orig, t, j, h);
          const double fp = loss_sum(tw);
          *slot = std::make_shared<PerturbLinear>(orig, t, j, -h);
          const double fm = loss_sum(tw);
          const double d = (fp - fm) / (2 * h);
          sq[size_t(j)] = d * d;
        }
        *slot = orig;
        for (int64_t k = 0; k < g; ++k) {
          double want = 0;
          for (int64_t j = b[size_t(k)]; j < b[size_t(k + 1)]; ++j) want += sq[size_t(j)];
          want /= double(b[size_t(k + 1)] - b[size_t(k)]);
          const double have = got.item((wdw * L + t) * g + k);
          if (t == L - 1) {
            EXPECT_EQ(have, 0.0) << name << " window " << wdw << " token " << t;
          } else {
            EXPECT_GT(want, 0.0);
            EXPECT_NEAR(have, want, 1e-4 * want + 1e-12) << name << " window " << wdw << " token " << t << " group " << k;
          }
        }
      }
  }
}

// Stacking the GPTQ results of row slices gives the tensor of the whole layer.
TEST(Guided, StackRowGroupsKeepsRowsInOrder) {
  const QuantFormat& f = parse_quant_format("int4g32");
  Tensor w = Tensor::randn({10, 64}, 3);
  Tensor h = Tensor::zeros({64, 64});
  for (int64_t i = 0; i < 64; ++i) h.data<float>()[i * 64 + i] = 1.0f;
  const GptqResult whole = gptq_quantize(w, h, f);
  std::vector<GptqResult> parts;
  for (auto [lo, hi] : {std::pair{0, 3}, std::pair{3, 7}, std::pair{7, 10}})
    parts.push_back(gptq_quantize(w.slice(0, lo, hi).contiguous(), h, f));
  const GptqResult s = stack_row_groups(parts);
  EXPECT_EQ(s.q.shape, (Shape{10, 64}));
  EXPECT_EQ(max_abs_diff(s.q.dequantize(), whole.q.dequantize()), 0.0);  // diagonal H: rows are independent
  EXPECT_NEAR(s.loss, whole.loss, 1e-6 * (1 + whole.loss));
}

TEST(Guided, RegisteredAndRefusesTensorScaleFormatsWithGroups) {
  EXPECT_NE(method_names().find("guided"), std::string::npos);
  EXPECT_TRUE(find_method("guided").needs_calibration);
  MethodConfig c;
  c.format = &parse_quant_format("ternary");
  try {
    make_method("guided", c);
    ADD_FAILURE() << "no error for ternary with 4 groups";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("one scale for the whole tensor"), std::string::npos) << e.what();
  }
  c.guided.groups = 1;
  EXPECT_EQ(make_method("guided", c)->name(), "guided");
  c.guided.groups = 0;
  EXPECT_THROW(make_method("guided", c), Error);
}

using GuidedStories = test::StoriesPtq;

// One group and equal weights (any constant) give H = GPTQ's Hessian, so exactly GPTQ's model; the
// method's own gradient weights (4 groups) give another.
TEST_F(GuidedStories, OneGroupWithEqualWeightsIsGptq) {
  calib_windows = 4;
  calib_len = 64;
  Checkpoint ck = load_llama2c(model_path);
  const QuantFormat& f = parse_quant_format("int3g32");
  LlamaModel g(ck.config, ck.weights), flat(ck.config, ck.weights), guided(ck.config, ck.weights);
  GptqMethod gm(f, GptqOptions{});
  GuidedMethod fm(f, GptqOptions{}, GuidedOptions{1});
  GuidedStats st;
  st.groups = 1;
  st.nsamples = calib_windows;
  st.seqlen = calib_len;
  for (int i = 0; i < ck.config.n_layers; ++i)
    for (auto& [name, slot] : g.block(i).linears())
      st.weights["model.layers." + std::to_string(i) + "." + name] = Tensor::full({calib_windows * calib_len, 1}, 0.37);
  fm.set_stats(st);
  GuidedMethod rm(f, GptqOptions{}, GuidedOptions{});
  quantize(g, gm, f);
  quantize(flat, fm, f);
  const PipelineReport rr = quantize(guided, rm, f);
  EXPECT_GT(rm.gradient_seconds(), 0.0);
  EXPECT_EQ(rm.stats().groups, 4);
  LlamaWeights a = g.weights(), b = flat.weights(), d = guided.weights();
  double diff = 0;
  for (int i = 0; i < ck.config.n_layers; ++i) {
    EXPECT_EQ(max_abs_diff(a.layers[i].wq, b.layers[i].wq), 0.0) << i;
    EXPECT_EQ(max_abs_diff(a.layers[i].wk, b.layers[i].wk), 0.0) << i;
    EXPECT_EQ(max_abs_diff(a.layers[i].wo, b.layers[i].wo), 0.0) << i;
    EXPECT_EQ(max_abs_diff(a.layers[i].w_up, b.layers[i].w_up), 0.0) << i;
    EXPECT_EQ(max_abs_diff(a.layers[i].w_down, b.layers[i].w_down), 0.0) << i;
    diff += max_abs_diff(a.layers[i].w_down, d.layers[i].w_down);
  }
  EXPECT_GT(diff, 0.0);
  EXPECT_EQ(rr.linears.size(), 35u);
}

// Killed after two blocks and resumed: the statistics come back from the state directory (no second
// gradient pass) and the model is the uninterrupted run's.
TEST_F(GuidedStories, ResumesToTheSameModel) {
  calib_windows = 4;
  calib_len = 64;
  expect_resume_identical(*this, [](const QuantFormat& f) {
    return std::make_unique<GuidedMethod>(f, GptqOptions{}, GuidedOptions{});
  }, "int3g32");
  Checkpoint ck = load_llama2c(model_path);
  const QuantFormat& f = parse_quant_format("int3g32");
  auto dir = test::temp_dir("guided-resume");
  PipelineOptions o;
  o.state_dir = dir.string();
  o.stop_after_blocks = 1;
  o.checkpoint_seconds = 1e9;
  {
    LlamaModel part(ck.config, ck.weights);
    GuidedMethod m(f, GptqOptions{}, GuidedOptions{});
    quantize(part, m, f, o);
    EXPECT_GT(m.gradient_seconds(), 0.0);
  }
  EXPECT_TRUE(std::filesystem::exists(dir / "guided-stats.safetensors"));
  o.stop_after_blocks = 0;
  LlamaModel resumed(ck.config, ck.weights);
  GuidedMethod m(f, GptqOptions{}, GuidedOptions{});
  EXPECT_EQ(quantize(resumed, m, f, o).resumed_from_block, 1);
  EXPECT_EQ(m.gradient_seconds(), 0.0);  // read back, not recomputed
  // Statistics of another setting (2 groups) in the same directory are not taken for these.
  const std::string path = (dir / "guided-stats.safetensors").string();
  EXPECT_EQ(load_guided_stats(path, "another key").groups, 0);
  std::filesystem::remove_all(dir);
}
