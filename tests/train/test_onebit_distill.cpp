// OneBit's distillation loss (train/qat.h, issue 15; arXiv 2402.11295 §3.4): L_KD = KL + α Σ_l MSE of
// the l2-normalised hidden states. The per-layer term against its definition, its gradient and the
// whole objective's gradient against central differences in f64, and the term changing the loss and
// the gradients only when it is on.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "common/small_model.h"
#include "lowbit/autograd/functions.h"
#include "lowbit/model/llama.h"
#include "lowbit/ops/ops.h"
#include "lowbit/train/qat.h"

using namespace lowbit;

namespace {

using test::grad_check_config;

// f64 weights scaled up so that the blocks are far from the identity (a non-trivial function).
LlamaWeights f64_weights(const LlamaConfig& c, uint64_t seed) {
  LlamaWeights w = random_weights(c, seed);
  for_each_weight(w, [](const std::string& n, Tensor& t) {
    t = t.to(DType::F64);
    if (n.find("norm") == std::string::npos) ops::scale(t, 20.0, t);
  });
  return w;
}

Tensor tokens_2x5() {
  return Tensor::from_vector(std::vector<int32_t>{1, 4, 7, 2, 9, 3, 3, 10, 0, 5}, {2, 5});
}

// Σ_rows ||s_r/||s_r|| - t_r/||t_r|| ||^2 / rows, written out.
double hidden_term_by_hand(const Tensor& s, const Tensor& t) {
  const int64_t M = s.size(0), D = s.size(1);
  double total = 0;
  for (int64_t r = 0; r < M; ++r) {
    double ns = 0, nt = 0;
    for (int64_t j = 0; j < D; ++j) {
      ns += s.item(r * D + j) * s.item(r * D + j);
      nt += t.item(r * D + j) * t.item(r * D + j);
    }
    ns = std::sqrt(ns);
    nt = std::sqrt(nt);
    for (int64_t j = 0; j < D; ++j) {
      const double d = s.item(r * D + j) / ns - t.item(r * D + j) / nt;
      total += d * d;
    }
  }
  return total / double(M);
}

// Central differences of f() against the gradient already in p.grad(), every `stride`-th element.
void expect_grad_matches(Var p, const std::function<double()>& f, int64_t stride, const char* what) {
  Tensor val = p.mutable_value();
  ASSERT_TRUE(p.grad().defined()) << what;
  const double h = 1e-6;
  for (int64_t i = 0; i < val.numel(); i += stride) {
    NoGradGuard ng;
    const double orig = val.item(i);
    val.set_item(i, orig + h);
    const double fp = f();
    val.set_item(i, orig - h);
    const double fm = f();
    val.set_item(i, orig);
    const double num = (fp - fm) / (2 * h);
    ASSERT_NEAR(p.grad().item(i), num, 1e-6 * std::max(1.0, std::fabs(num))) << what << " element " << i;
  }
}

}  // namespace

TEST(OneBitHiddenMse, TermIsTheMeanSquaredDistanceOfTheNormalisedRows) {
  const Tensor s = Tensor::randn({5, 7}, 11, 1.5, DType::F64), t = Tensor::randn({5, 7}, 12, 0.3, DType::F64);
  // Tolerance 1e-9: the normalisation's eps (1e-12 on the mean square, ~0.09 for t's rows here) moves
  // the result by ~1e-11 relative.
  const double tol = 1e-9;
  EXPECT_NEAR(hidden_state_mse(Var(s), t).value().item(), hidden_term_by_hand(s, t), tol);
  // Scale-free per row (the normalisation), and 0 against itself.
  Tensor s3 = s.clone();
  ops::scale(s3, 3.0, s3);
  EXPECT_NEAR(hidden_state_mse(Var(s3), t).value().item(), hidden_term_by_hand(s, t), tol);
  EXPECT_NEAR(hidden_state_mse(Var(s), s).value().item(), 0.0, 1e-15);
  // Opposite rows are at the largest distance, 4.
  Tensor neg = s.clone();
  ops::scale(neg, -1.0, neg);
  EXPECT_NEAR(hidden_state_mse(Var(s), neg).value().item(), 4.0, tol);
  // Shapes must agree.
  EXPECT_THROW(hidden_state_mse(Var(s), Tensor::randn({5, 6}, 1, 1.0, DType::F64)), Error);
  EXPECT_THROW(hidden_state_mse(Var(s), t.to(DType::F32)), Error);
}

TEST(OneBitHiddenMse, GradientMatchesFiniteDifferences) {
  const Tensor t = Tensor::randn({6, 9}, 22, 1.0, DType::F64);
  Var s(Tensor::randn({6, 9}, 21, 2.0, DType::F64), true);
  backward(hidden_state_mse(s, t));
  expect_grad_matches(s, [&] { return hidden_state_mse(s, t).value().item(); }, 1, "student hidden states");
}

// The whole distillation objective with the term on: every parameter kind of the student (a block's
// linears and norms) against central differences of the objective, in f64.
TEST(OneBitHiddenMse, ObjectiveGradientMatchesFiniteDifferences) {
  const LlamaConfig c = grad_check_config();
  LlamaModel teacher(c, f64_weights(c, 3), false);
  LlamaModel student(c, f64_weights(c, 4), true);
  const Tensor in = tokens_2x5(), tgt = Tensor::from_vector(std::vector<int32_t>(10, 1), {10});
  E2eOptions o;
  o.distill = true;
  o.hidden_mse = 0.7;
  backward(e2e_objective(student, &teacher, in, tgt, o));
  auto f = [&] { return e2e_objective(student, &teacher, in, tgt, o).value().item(); };
  for (int b = 0; b < c.n_layers; ++b) {
    auto& blk = student.block(b);
    expect_grad_matches(blk.attn_norm, f, 1, "attn_norm");
    expect_grad_matches(blk.ffn_norm, f, 1, "ffn_norm");
    for (auto& [name, lin] : blk.linears())
      for (auto& p : (*lin)->parameters()) expect_grad_matches(p, f, 5, name.c_str());
  }
}

// Off (0) the objective is the KL alone, bit for bit, with the same gradients; on it adds exactly
// α Σ_l hidden_state_mse of the block outputs and changes the gradients, also those of the first
// block (which the KL reaches only through the later blocks).
TEST(OneBitHiddenMse, ChangesTheLossAndGradientsOnlyWhenOn) {
  const LlamaConfig c = grad_check_config();
  LlamaModel teacher(c, f64_weights(c, 3), false);
  LlamaModel student(c, f64_weights(c, 4), true);
  const Tensor in = tokens_2x5(), tgt = Tensor::from_vector(std::vector<int32_t>(10, 1), {10});
  const Var probe = (*student.block(0).linears()[0].second)->parameters()[0];  // block 0's first linear
  auto loss_and_grad = [&](double alpha, Tensor* grad) {
    for (auto& p : student.parameters()) p.zero_grad();
    E2eOptions o;
    o.distill = true;
    o.hidden_mse = alpha;
    Var l = e2e_objective(student, &teacher, in, tgt, o);
    backward(l);
    *grad = probe.grad().clone();
    return l.value().item();
  };
  Tensor g_off, g_kl, g_on;
  const double off = loss_and_grad(0.0, &g_off);
  // The KL alone, computed here.
  for (auto& p : student.parameters()) p.zero_grad();
  Tensor tl;
  {
    NoGradGuard ng;
    tl = teacher.forward(in).value();
  }
  Var kl = kl_div(Var(tl), student.forward(in));
  backward(kl);
  g_kl = probe.grad().clone();
  EXPECT_EQ(off, kl.value().item());
  for (int64_t i = 0; i < g_kl.numel(); ++i) ASSERT_EQ(g_off.item(i), g_kl.item(i)) << i;
  // On: + α Σ_l term(student block l, teacher block l).
  const double alpha = 2.5;
  const double on = loss_and_grad(alpha, &g_on);
  double sum_terms = 0;
  {
    NoGradGuard ng;
    const int64_t B = 2, T = 5;
    Var xs = student.embed(in), xt = teacher.embed(in);
    for (int l = 0; l < c.n_layers; ++l) {
      xs = student.block_forward(l, xs, B, T);
      xt = teacher.block_forward(l, xt, B, T);
      sum_terms += hidden_state_mse(xs, xt.value()).value().item();
    }
  }
  EXPECT_GT(sum_terms, 1e-3);
  EXPECT_NEAR(on, off + alpha * sum_terms, 1e-12 * std::max(1.0, std::fabs(on)));
  double diff = 0;
  for (int64_t i = 0; i < g_on.numel(); ++i) diff = std::max(diff, std::fabs(g_on.item(i) - g_off.item(i)));
  EXPECT_GT(diff, 1e-6);
  // A student equal to the teacher: every term is 0, the objective is the KL (0) either way.
  LlamaModel same(c, f64_weights(c, 3), true);
  E2eOptions o;
  o.distill = true;
  o.hidden_mse = alpha;
  EXPECT_NEAR(e2e_objective(same, &teacher, in, tgt, o).value().item(), 0.0, 1e-12);
}

// Bad values are refused naming the flag: by the trainer and by onebit's configuration.
TEST(OneBitHiddenMse, BadValuesAreRefusedNamingTheFlag) {
  const LlamaConfig c = grad_check_config();
  LlamaModel teacher(c, f64_weights(c, 3), false);
  LlamaModel student(c, f64_weights(c, 4), true);
  std::vector<int32_t> stream(64);
  for (size_t i = 0; i < stream.size(); ++i) stream[i] = int32_t(i % 11);
  auto message = [&](const E2eOptions& o) -> std::string {
    bool complete = true;
    try {
      train_end_to_end(student, &teacher, {}, {}, stream, o, &complete);
    } catch (const Error& e) {
      return e.what();
    }
    return "no error";
  };
  E2eOptions o;
  o.steps = 1;
  o.batch = 1;
  o.seqlen = 4;
  o.progress = false;
  o.distill = true;
  o.hidden_mse = -1;
  EXPECT_NE(message(o).find("--hidden-mse must be a finite number >= 0"), std::string::npos) << message(o);
  o.hidden_mse = std::nan("");
  EXPECT_NE(message(o).find("--hidden-mse must be a finite number >= 0"), std::string::npos) << message(o);
  o.hidden_mse = 1;
  o.distill = false;
  EXPECT_NE(message(o).find("--hidden-mse 1 adds a term to the distillation loss"), std::string::npos) << message(o);
  QatConfig qc;
  qc.format = &parse_quant_format("onebit");
  qc.hidden_mse = std::numeric_limits<double>::infinity();
  try {
    make_qat_method("onebit", qc);
    ADD_FAILURE() << "no error for --hidden-mse inf";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("qat --method onebit: --hidden-mse must be a finite number"), std::string::npos)
        << e.what();
  }
}
