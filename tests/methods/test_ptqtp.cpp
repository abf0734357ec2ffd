// PTQTP (methods/ptqtp.h): the scale step and the trit step on hand-computed groups, the monotone
// error of the alternating procedure, exact recovery of a group that is two trit planes, the
// registry entry, and stories260K end to end (quantize, perplexity, resume after a kill).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>

#include "common/stories_fixture.h"
#include "lowbit/io/llama2c.h"
#include "lowbit/methods/ptq_methods.h"
#include "lowbit/methods/ptqtp.h"
#include "lowbit/methods/registry.h"
#include "lowbit/quant/quantize.h"

using namespace lowbit;

namespace {

std::vector<uint8_t> codes_of(std::initializer_list<std::pair<int, int>> t) {
  std::vector<uint8_t> q;
  for (auto [t1, t2] : t) q.push_back(tp_code(t1, t2));
  return q;
}

}  // namespace

TEST(Ptqtp, CodesNameThePairs) {
  for (int t1 = -1; t1 <= 1; ++t1)
    for (int t2 = -1; t2 <= 1; ++t2) {
      const uint8_t q = tp_code(t1, t2);
      EXPECT_LE(q, 8);
      EXPECT_EQ(tp_t1(q), t1);
      EXPECT_EQ(tp_t2(q), t2);
      // The format decodes the same pair.
      EXPECT_EQ(trit_pair_value(q, 2.0f, 0.5f), float(t1) * 2.0f + float(t2) * 0.5f);
    }
}

// Given T, (a1, a2) solves [[sum t1^2, sum t1 t2], [sum t1 t2, sum t2^2]] a = [sum t1 w, sum t2 w].
TEST(Ptqtp, ScaleStepWorkedExample) {
  const float w[4] = {3.0f, 1.0f, -2.0f, 0.5f};
  const auto q = codes_of({{1, 1}, {1, -1}, {-1, 0}, {0, 1}});
  // S^T S = [[3, 0], [0, 3]], S^T w = [3 + 1 + 2, 3 - 1 + 0.5] = [6, 2.5].
  PtqtpOptions exact;
  exact.lambda0 = 0;
  double a1 = 0, a2 = 0, lambda = -1;
  ptqtp_solve_scales(w, q.data(), 4, exact, a1, a2, &lambda);
  EXPECT_DOUBLE_EQ(a1, 2.0);
  EXPECT_DOUBLE_EQ(a2, 2.5 / 3.0);
  EXPECT_EQ(lambda, 0.0);
  // The default ridge: lambda0 * tr(S^T S) / 2 = 1e-6 * 3 (well conditioned: not raised).
  PtqtpOptions o;
  ptqtp_solve_scales(w, q.data(), 4, o, a1, a2, &lambda);
  EXPECT_DOUBLE_EQ(lambda, 3e-6);
  EXPECT_DOUBLE_EQ(a1, 6.0 / (3.0 + 3e-6));
  EXPECT_DOUBLE_EQ(a2, 2.5 / (3.0 + 3e-6));
  // Collinear planes (t1 = t2 everywhere): S^T S = [[n, n], [n, n]] is singular; the adaptive
  // ridge raises lambda to mu1 / (cond_max - 1) = 2n / (1e4 - 1) and splits the scale evenly:
  // a1 = a2 = sum w / (2n + lambda).
  const float v[3] = {1.0f, 2.0f, 3.0f};
  const auto same = codes_of({{1, 1}, {1, 1}, {1, 1}});
  ptqtp_solve_scales(v, same.data(), 3, o, a1, a2, &lambda);
  EXPECT_DOUBLE_EQ(lambda, 6.0 / (1e4 - 1));
  EXPECT_DOUBLE_EQ(a1, a2);
  EXPECT_NEAR(a1, 6.0 / (6.0 + lambda), 1e-12);
  // Both planes empty: nothing to scale.
  const auto zero = codes_of({{0, 0}, {0, 0}, {0, 0}});
  ptqtp_solve_scales(v, zero.data(), 3, o, a1, a2);
  EXPECT_EQ(a1, 0.0);
  EXPECT_EQ(a2, 0.0);
}

// The scale step is the paper's adaptive ridge regression alpha = (S^T S + lambda I)^-1 S^T w. lambda:
// the paper calls it adaptive, for numerical stability, without a rule in the text we could read;
// lowbit's rule is lambda = max(lambda0 tr(S^T S) / 2, the smallest lambda with
// cond(S^T S + lambda I) <= cond_max). Checked here on random planes of every conditioning against
// the rule and the closed form, computed independently.
TEST(Ptqtp, AdaptiveRidgeLambdaRule) {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  PtqtpOptions o;
  int raised = 0;
  for (int k = 0; k < 300; ++k) {
    const int n = 1 + int(rng() % 64);
    // Planes from independent (well conditioned) to identical (singular), and empty planes.
    const int mode = k % 4;
    std::vector<float> w(static_cast<size_t>(n));
    std::vector<uint8_t> q(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
      w[size_t(i)] = nd(rng);
      const int t1 = mode == 3 ? 0 : int(rng() % 3) - 1;
      const int t2 = mode == 1 ? t1 : (mode == 2 && rng() % 8 ? t1 : int(rng() % 3) - 1);
      q[size_t(i)] = tp_code(t1, t2);
    }
    double a = 0, b = 0, c = 0, p = 0, r = 0;
    for (int i = 0; i < n; ++i) {
      const double t1 = tp_t1(q[size_t(i)]), t2 = tp_t2(q[size_t(i)]);
      a += t1 * t1, b += t1 * t2, c += t2 * t2, p += t1 * w[size_t(i)], r += t2 * w[size_t(i)];
    }
    double a1 = 0, a2 = 0, lambda = -1;
    ptqtp_solve_scales(w.data(), q.data(), n, o, a1, a2, &lambda);
    if (a + c == 0) {  // no plane: no regression
      EXPECT_EQ(a1, 0.0);
      EXPECT_EQ(a2, 0.0);
      continue;
    }
    const double mu1 = (a + c) / 2 + std::sqrt((a - c) * (a - c) / 4 + b * b);
    const double mu2 = std::max((a + c) / 2 - std::sqrt((a - c) * (a - c) / 4 + b * b), 0.0);
    const double base = o.lambda0 * (a + c) / 2;
    const double cond_base = (mu1 + base) / (mu2 + base);
    if (cond_base <= o.cond_max) {
      EXPECT_DOUBLE_EQ(lambda, base) << k;
    } else {
      ++raised;
      EXPECT_GT(lambda, base) << k;
      EXPECT_NEAR((mu1 + lambda) / (mu2 + lambda), o.cond_max, 1e-6 * o.cond_max) << k;  // the smallest such lambda
    }
    // The closed form with that lambda (2 x 2 inverse by cofactors).
    const double det = (a + lambda) * (c + lambda) - b * b;
    EXPECT_NEAR(a1, ((c + lambda) * p - b * r) / det, 1e-9 * (1 + std::fabs(a1))) << k;
    EXPECT_NEAR(a2, ((a + lambda) * r - b * p) / det, 1e-9 * (1 + std::fabs(a2))) << k;
    // Normal equations of the ridge objective hold: (S^T S + lambda I) alpha = S^T w.
    EXPECT_NEAR((a + lambda) * a1 + b * a2, p, 1e-9 * (1 + std::fabs(p))) << k;
    EXPECT_NEAR(b * a1 + (c + lambda) * a2, r, 1e-9 * (1 + std::fabs(r))) << k;
  }
  EXPECT_GT(raised, 50) << "collinear and one-plane cases exercise the adaptive raise";
}

// Given (a1, a2) = (1, 0.3) the nine values are {0, +-0.3, +-0.7, +-1, +-1.3}.
TEST(Ptqtp, TritStepWorkedExample) {
  const float w[6] = {1.2f, 0.8f, -0.1f, -0.45f, 5.0f, -0.9f};
  std::vector<uint8_t> q(6);
  ptqtp_assign_trits(w, 6, 1.0, 0.3, q.data());
  EXPECT_EQ(q, codes_of({{1, 1}, {1, -1}, {0, 0}, {0, -1}, {1, 1}, {-1, 0}}));
  EXPECT_NEAR(ptqtp_group_error(w, q.data(), 6, 1.0, 0.3),
              0.01 + 0.01 + 0.01 + 0.0225 + 3.7 * 3.7 + 0.01, 1e-6);
  // The trit step is the exact minimiser: no other code of any weight does better.
  for (int i = 0; i < 6; ++i)
    for (uint8_t k = 0; k < 9; ++k)
      EXPECT_LE(std::fabs(w[i] - trit_pair_value(q[size_t(i)], 1.0f, 0.3f)),
                std::fabs(w[i] - trit_pair_value(k, 1.0f, 0.3f)) + 1e-6f);
}

TEST(Ptqtp, ErrorNeverIncreasesOverIterations) {
  for (PtqtpStart start : {PtqtpStart::Paper, PtqtpStart::Grid, PtqtpStart::Both}) {
    std::mt19937 rng(5);
    std::normal_distribution<float> nd(0.0f, 0.02f);
    std::student_t_distribution<float> heavy(3.0f);
    PtqtpOptions o;
    o.start = start;
    int stopped_early = 0, improved = 0;
    for (int g = 0; g < 200; ++g) {
      std::vector<float> w(128);
      for (auto& x : w) x = g % 2 ? nd(rng) : 0.01f * heavy(rng);
      const PtqtpGroupFit f = ptqtp_fit_group(w.data(), 128, o);
      ASSERT_EQ(f.errors.size(), size_t(f.iters) + 1);
      for (size_t k = 1; k < f.errors.size(); ++k)
        ASSERT_LE(f.errors[k], f.errors[k - 1]) << ptqtp_start_name(start) << " group " << g << " iteration " << k;
      EXPECT_NEAR(f.errors.back(), ptqtp_group_error(w.data(), f.q.data(), 128, f.a1, f.a2), 1e-12);
      improved += f.errors.back() < f.errors.front();
      stopped_early += f.iters < o.max_iters;
    }
    // The paper's sign start always improves; the RTN grid is already a fixed point for a few groups
    // (2 of 200 here).
    EXPECT_GE(improved, start == PtqtpStart::Paper ? 200 : 190) << ptqtp_start_name(start);
    EXPECT_EQ(stopped_early, 200) << ptqtp_start_name(start) << ": every group converged before the iteration cap";
  }
}

TEST(Ptqtp, GroupOfTwoTritPlanesIsRecoveredExactly) {
  // a1 = 0.625, a2 = 0.1875 (f16 values), random planes with every pair present.
  std::mt19937 rng(11);
  const int64_t out = 4, in = 256;
  Tensor w = Tensor::empty({out, in});
  for (int64_t i = 0; i < out * in; ++i) {
    const int t1 = int(rng() % 3) - 1, t2 = int(rng() % 3) - 1;
    const float scale = (i / 128) % 2 ? 1.0f : 0.5f;  // groups of different magnitude
    w.data<float>()[i] = scale * (0.625f * float(t1) + 0.1875f * float(t2));
  }
  for (int64_t g = 0; g < out * in / 128; ++g) {
    const PtqtpGroupFit f = ptqtp_fit_group(w.data<float>() + g * 128, 128, PtqtpOptions{});
    EXPECT_LT(f.errors.back(), 1e-9) << "group " << g;
  }
  // Other plane ratios: how many of 50 planted groups come back exactly.
  for (auto [p1, p2] : {std::pair<float, float>{1.0f, 0.5f}, {1.0f, 0.4f}, {1.0f, 0.25f}, {1.0f, 0.15f}, {0.7f, 0.6f}}) {
    int exact = 0, exact_paper = 0;
    PtqtpOptions paper, both;
    paper.start = PtqtpStart::Paper;
    both.start = PtqtpStart::Both;
    for (int k = 0; k < 50; ++k) {
      std::vector<float> v(128);
      for (auto& x : v) x = p1 * float(int(rng() % 3) - 1) + p2 * float(int(rng() % 3) - 1);
      exact += ptqtp_fit_group(v.data(), 128, both).errors.back() < 1e-9;
      exact_paper += ptqtp_fit_group(v.data(), 128, paper).errors.back() < 1e-9;
    }
    std::printf("planes (%g, %g): recovered %d/50 (sign start only: %d/50)\n", p1, p2, exact, exact_paper);
    // Recovered every time down to a2 = a1 / 4; below, the alternation can stop in a local minimum
    // from both starts (1, 0.15: 20 of 50 recovered; printed, not asserted).
    if (p2 >= 0.25f * p1) {
      EXPECT_EQ(exact, 50) << p1 << ", " << p2;
    }
    EXPECT_GE(exact, exact_paper);
  }
  const QuantFormat& tp = parse_quant_format("tp2g128");
  const QuantizedTensor q = ptqtp_quantize(w, tp, PtqtpOptions{});
  EXPECT_LT(max_abs_diff(q.dequantize(), w), 1e-6);
  // A Gaussian weight: PTQTP's fit has a lower weight error than the balanced-ternary RTN grid.
  Tensor g = Tensor::randn({16, 512}, 3, 0.02);
  const Tensor d_tp = ptqtp_quantize(g, tp, PtqtpOptions{}).dequantize(), d_rtn = quantize(g, tp).dequantize();
  double e_tp = 0, e_rtn = 0;
  for (int64_t i = 0; i < g.numel(); ++i) {
    e_tp += std::pow(double(d_tp.data<float>()[i] - g.data<float>()[i]), 2);
    e_rtn += std::pow(double(d_rtn.data<float>()[i] - g.data<float>()[i]), 2);
  }
  std::printf("tp2g128 weight error on N(0, 0.02^2): ptqtp %.4g, rtn %.4g\n", e_tp, e_rtn);
  EXPECT_LT(e_tp, e_rtn);
}

// The starts (--tp-start) and per-row scales (--tp-scales row).
TEST(Ptqtp, StartsAndRowScales) {
  EXPECT_EQ(parse_ptqtp_start("paper"), PtqtpStart::Paper);
  EXPECT_EQ(parse_ptqtp_start("grid"), PtqtpStart::Grid);
  EXPECT_EQ(parse_ptqtp_start("both"), PtqtpStart::Both);
  for (PtqtpStart s : {PtqtpStart::Paper, PtqtpStart::Grid, PtqtpStart::Both})
    EXPECT_EQ(parse_ptqtp_start(ptqtp_start_name(s)), s);
  EXPECT_THROW(parse_ptqtp_start("sign"), Error);
  std::mt19937 rng(7);
  std::student_t_distribution<float> heavy(3.0f);
  PtqtpOptions paper, grid, both;
  paper.start = PtqtpStart::Paper;
  grid.start = PtqtpStart::Grid;
  both.start = PtqtpStart::Both;
  const QuantFormat& tp = parse_quant_format("tp2g128");
  for (int g = 0; g < 50; ++g) {
    std::vector<float> w(128);
    for (auto& x : w) x = 0.01f * heavy(rng);
    const PtqtpGroupFit fp = ptqtp_fit_group(w.data(), 128, paper), fg = ptqtp_fit_group(w.data(), 128, grid),
                        fb = ptqtp_fit_group(w.data(), 128, both);
    EXPECT_EQ(fb.errors.back(), std::min(fp.errors.back(), fg.errors.back())) << g;
    // The grid start begins at tp2g128's RTN (the format's own rounding) and only improves on it.
    Tensor t = Tensor::empty({1, 128});
    std::copy(w.begin(), w.end(), t.data<float>());
    const Tensor rtn = quantize(t, tp).dequantize();
    double e_rtn = 0;
    for (int i = 0; i < 128; ++i) e_rtn += std::pow(double(rtn.data<float>()[i]) - double(w[size_t(i)]), 2);
    EXPECT_NEAR(fg.errors.front(), e_rtn, 1e-2 * e_rtn) << g;  // the format rounds the scales to f16
    EXPECT_LE(fg.errors.back(), fg.errors.front()) << g;
  }
  // Row scales: one pair per row, repeated in every group; a row that is two trit planes with one
  // scale pair is recovered exactly (group fits recover it too).
  const int64_t out = 3, in = 384;
  Tensor w = Tensor::empty({out, in});
  for (int64_t i = 0; i < out * in; ++i)
    w.data<float>()[i] = 0.5f * float(int(rng() % 3) - 1) + 0.125f * float(int(rng() % 3) - 1);
  PtqtpOptions row;
  row.row_scales = true;
  const QuantizedTensor qr = ptqtp_quantize(w, tp, row);
  EXPECT_LT(max_abs_diff(qr.dequantize(), w), 1e-6);
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 1; g < 3; ++g) {
      EXPECT_EQ(qr.group_params(r, g).scale, qr.group_params(r, 0).scale);
      EXPECT_EQ(qr.group_params(r, g).zero, qr.group_params(r, 0).zero);
    }
  // A Gaussian weight: per-group scales fit better than one pair per row.
  const Tensor gw = Tensor::randn({8, 512}, 9, 0.02);
  double e_group = 0, e_row = 0;
  const Tensor dg = ptqtp_quantize(gw, tp, both).dequantize(), dr = ptqtp_quantize(gw, tp, row).dequantize();
  for (int64_t i = 0; i < gw.numel(); ++i) {
    e_group += std::pow(double(dg.data<float>()[i] - gw.data<float>()[i]), 2);
    e_row += std::pow(double(dr.data<float>()[i] - gw.data<float>()[i]), 2);
  }
  std::printf("tp2g128 weight error on N(0, 0.02^2): group scales %.4g, row scales %.4g\n", e_group, e_row);
  EXPECT_LT(e_group, e_row);
}

TEST(Ptqtp, RefusesOtherFormatsAndBadOptions) {
  const Tensor w = Tensor::randn({4, 128}, 1, 0.02);
  try {
    ptqtp_quantize(w, parse_quant_format("int4g128"), PtqtpOptions{});
    ADD_FAILURE() << "int4g128 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not a trit-plane format"), std::string::npos) << e.what();
  }
  PtqtpOptions bad;
  bad.max_iters = 0;
  EXPECT_THROW(ptqtp_quantize(w, parse_quant_format("tp2g128"), bad), Error);
  Tensor nan = w.clone();
  nan.data<float>()[5] = std::nanf("");
  EXPECT_THROW(ptqtp_quantize(nan, parse_quant_format("tp2g128"), PtqtpOptions{}), Error);
}

TEST(Ptqtp, RegisteredDataFreeWithItsFormat) {
  const MethodInfo& m = find_method("ptqtp");
  EXPECT_FALSE(m.needs_calibration);
  EXPECT_FALSE(m.trains_adapters);
  EXPECT_EQ(m.default_format, "tp2g128");
  MethodConfig c;
  c.format = &parse_quant_format("tp2g128");
  EXPECT_EQ(make_method("ptqtp", c)->name(), "ptqtp");
  c.format = &parse_quant_format("ternary");
  try {
    make_method("ptqtp", c);
    ADD_FAILURE() << "ternary accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("use --format tp2g128"), std::string::npos) << e.what();
  }
}

using PtqtpStories = test::StoriesPtq;

TEST_F(PtqtpStories, QuantizesEvaluatesAndResumes) {
  calib_windows = 4;  // data-free: the rows only feed the error reports
  calib_len = 64;
  Checkpoint ck = load_llama2c(model_path);
  const QuantFormat& tp = parse_quant_format("tp2g128");
  LlamaModel fp(ck.config, ck.weights), a(ck.config, ck.weights), b(ck.config, ck.weights), c(ck.config, ck.weights);
  PtqtpMethod ptqtp(tp, PtqtpOptions{});
  PtqtpOptions both_o;
  both_o.start = PtqtpStart::Both;
  PtqtpMethod both(tp, both_o);
  RtnMethod rtn(tp);
  const PipelineReport r1 = quantize(a, ptqtp, tp), r2 = quantize(b, rtn, tp);
  quantize(c, both, tp);
  ASSERT_EQ(r1.linears.size(), 35u);
  double e1 = 0, e2 = 0;
  for (size_t i = 0; i < r1.linears.size(); ++i) e1 += r1.linears[i].rel_error, e2 += r2.linears[i].rel_error;
  const double p_fp = ppl(fp), p_tp = ppl(a), p_rtn = ppl(b), p_both = ppl(c);
  std::printf("stories260K tp2g128: ppl fp %.3f, ptqtp %.3f (--tp-start both %.3f), rtn %.3f; mean rel. error ptqtp "
              "%.4g rtn %.4g; %.4f bpw\n", p_fp, p_tp, p_both, p_rtn, e1 / 35, e2 / 35, r1.bits_per_weight);
  EXPECT_LT(e1, e2);
  EXPECT_LT(p_tp, p_rtn);
  // The default (grid start) keeps the groups' largest weights; on this model the lowest weight error
  // (both starts) is better (bench/ptqtp_study_260k.sh: 5.84 vs 5.06).
  EXPECT_LT(p_tp, 1.7 * p_fp);
  EXPECT_LT(p_both, 1.5 * p_fp);
  test::expect_resume_identical(*this, [](const QuantFormat& f) { return std::make_unique<PtqtpMethod>(f, PtqtpOptions{}); },
                                "tp2g128");
}
