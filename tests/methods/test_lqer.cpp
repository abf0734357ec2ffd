// LQER / L²QER (methods/lqer.h, issue 16): the truncated SVD against a matrix of known spectrum
// (Eckart–Young), the side path reconstructing the error exactly at full rank, the activation
// scale choosing the channels that matter (hand example), LQER on a model (full rank recovers the
// FP weights to f16 rounding) and the checkpoint round trip of the side path.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "common/small_model.h"
#include "common/test_util.h"
#include "lowbit/autograd/functions.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/methods/calibration.h"
#include "lowbit/methods/lqer.h"
#include "lowbit/methods/ptq_methods.h"
#include "lowbit/quant/format.h"
#include "lowbit/quant/quant_linear.h"

using namespace lowbit;
namespace fs = std::filesystem;

namespace {

// n x r matrix with orthonormal columns (Gram-Schmidt of a seeded Gaussian), row-major f64.
std::vector<double> orthonormal_columns(int64_t n, int64_t r, uint64_t seed) {
  const Tensor g = Tensor::randn({r, n}, seed, 1.0, DType::F64).contiguous();
  std::vector<double> rows(g.data<double>(), g.data<double>() + r * n);
  for (int64_t i = 0; i < r; ++i) {
    for (int pass = 0; pass < 2; ++pass)
      for (int64_t j = 0; j < i; ++j) {
        double d = 0;
        for (int64_t c = 0; c < n; ++c) d += rows[size_t(i * n + c)] * rows[size_t(j * n + c)];
        for (int64_t c = 0; c < n; ++c) rows[size_t(i * n + c)] -= d * rows[size_t(j * n + c)];
      }
    double nn = 0;
    for (int64_t c = 0; c < n; ++c) nn += rows[size_t(i * n + c)] * rows[size_t(i * n + c)];
    for (int64_t c = 0; c < n; ++c) rows[size_t(i * n + c)] /= std::sqrt(nn);
  }
  std::vector<double> out(size_t(n * r));
  for (int64_t i = 0; i < r; ++i)
    for (int64_t c = 0; c < n; ++c) out[size_t(c * r + i)] = rows[size_t(i * n + c)];
  return out;
}

// B A as f64 [out, in].
std::vector<double> product(const LqerFactors& f) {
  const int64_t out = f.B.size(0), k = f.B.size(1), in = f.A.size(1);
  std::vector<double> p(size_t(out * in), 0.0);
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < k; ++i)
      for (int64_t c = 0; c < in; ++c)
        p[size_t(o * in + c)] += double(f.B.data<float>()[o * k + i]) * double(f.A.data<float>()[i * in + c]);
  return p;
}

Tensor calibration(int V) {
  std::vector<int32_t> stream;
  for (int i = 0; i < 400; ++i) stream.push_back((i * 13 + 5) % V);
  return sample_calibration(stream, 4, 24, 1);
}

}  // namespace

TEST(Lqer, TruncatedSvdRecoversAKnownSpectrum) {
  // M = U diag(s) Vᵀ with known s: the top-k values come back, and the residual is Eckart–Young's
  // sqrt(sum of the other s^2) — the best any rank-k matrix can do.
  const int64_t R = 30, C = 20, r = 8;
  const std::vector<double> s = {10, 7, 5, 3, 2, 1, 0.5, 0.1};
  const auto u = orthonormal_columns(R, r, 1), v = orthonormal_columns(C, r, 2);
  Tensor m = Tensor::zeros({R, C}, DType::F64);
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < C; ++j)
      for (int64_t t = 0; t < r; ++t) m.data<double>()[i * C + j] += u[size_t(i * r + t)] * s[size_t(t)] * v[size_t(j * r + t)];
  for (int64_t k : {1, 3, 5, 8, 20}) {
    const TruncatedSvd svd = truncated_svd(m, k, 7);
    const int64_t kk = std::min<int64_t>(k, C);
    ASSERT_EQ(int64_t(svd.s.size()), kk);
    for (int64_t t = 0; t < kk; ++t) EXPECT_NEAR(svd.s[size_t(t)], t < r ? s[size_t(t)] : 0.0, 1e-9) << "k " << k << " t " << t;
    double res = 0, bound = 0;
    for (int64_t i = 0; i < R; ++i)
      for (int64_t j = 0; j < C; ++j) {
        double a = 0;
        for (int64_t t = 0; t < kk; ++t) a += svd.u.data<double>()[i * kk + t] * svd.sv.data<double>()[t * C + j];
        const double d = m.data<double>()[i * C + j] - a;
        res += d * d;
      }
    for (int64_t t = kk; t < r; ++t) bound += s[size_t(t)] * s[size_t(t)];
    EXPECT_NEAR(std::sqrt(res), std::sqrt(bound), 1e-9) << "k " << k;
    // u has orthonormal columns.
    for (int64_t a = 0; a < kk && a < r; ++a)
      for (int64_t b = 0; b < kk && b < r; ++b) {
        double d = 0;
        for (int64_t i = 0; i < R; ++i) d += svd.u.data<double>()[i * kk + a] * svd.u.data<double>()[i * kk + b];
        EXPECT_NEAR(d, a == b ? 1.0 : 0.0, 1e-9);
      }
  }
}

TEST(Lqer, FullRankSidePathReconstructsTheErrorExactly) {
  for (auto [out, in] : {std::pair<int64_t, int64_t>{12, 20}, {20, 12}, {16, 16}}) {
    const Tensor e = Tensor::randn({out, in}, uint64_t(out * 100 + in), 0.01);
    std::vector<double> scale(static_cast<size_t>(in));
    for (int64_t c = 0; c < in; ++c) scale[size_t(c)] = 0.05 + double((c * 7) % 11);
    for (bool scaled : {false, true}) {
      const LqerFactors f = lqer_factors(e, scaled ? scale : std::vector<double>{}, 1000);  // clamped to full rank
      EXPECT_EQ(f.A.size(0), std::min(out, in));
      const auto p = product(f);
      double worst = 0;
      for (int64_t x = 0; x < out * in; ++x) worst = std::max(worst, std::fabs(p[size_t(x)] - double(e.data<float>()[x])));
      EXPECT_LT(worst, 1e-7) << out << "x" << in << (scaled ? " scaled" : "");
    }
  }
}

TEST(Lqer, ActivationScaleKeepsTheChannelsTheActivationsUse) {
  // E = diag(3, 1): the plain rank-1 SVD keeps the larger error (channel 0); with activations of
  // magnitude (0.1, 10) the scaled error E S = diag(0.3, 10) puts channel 1 first, and L²QER keeps
  // that one, undoing S: B A = diag(0, 1).
  const Tensor e = Tensor::from_vector(std::vector<float>{3, 0, 0, 1}, {2, 2});
  const auto plain = product(lqer_factors(e, {}, 1));
  EXPECT_NEAR(plain[0], 3, 1e-6);
  EXPECT_NEAR(plain[1], 0, 1e-6);
  EXPECT_NEAR(plain[2], 0, 1e-6);
  EXPECT_NEAR(plain[3], 0, 1e-6);
  const auto scaled = product(lqer_factors(e, {0.1, 10}, 1));
  EXPECT_NEAR(scaled[0], 0, 1e-6);
  EXPECT_NEAR(scaled[1], 0, 1e-6);
  EXPECT_NEAR(scaled[2], 0, 1e-6);
  EXPECT_NEAR(scaled[3], 1, 1e-6);
  EXPECT_THROW(lqer_factors(e, {1.0}, 1), Error);        // wrong number of scales
  EXPECT_THROW(lqer_factors(e, {1.0, 0.0}, 1), Error);   // non-positive scale
  EXPECT_THROW(parse_lqer_scale("max"), Error);
  EXPECT_EQ(parse_lqer_scale("none"), LqerScale::None);
}

TEST(Lqer, OnAModelFullRankRecoversTheWeightsAndTheCheckpointRoundTrips) {
  LlamaConfig c = test::small_config(RopeStyle::Half);
  const LlamaWeights w = random_weights(c, 4, 0.1);
  const QuantFormat& f = parse_quant_format("int4g32");
  const Tensor calib = calibration(c.vocab_size);
  for (int64_t rank : {int64_t(4), int64_t(1) << 20}) {
    LlamaModel m(c, w);
    const auto fp = snapshot_linear_weights(m);
    const auto scales = collect_lqer_scales(m, calib);
    ASSERT_EQ(scales.size(), fp.size());
    RtnMethod rtn(f);
    PipelineOptions po;
    po.progress = false;
    run_blockwise(m, calib, rtn, f, po);
    LqerOptions o;
    o.rank = rank;
    const LqerReport rep = apply_lqer(m, fp, scales, o);
    EXPECT_EQ(rep.layers, int(fp.size()));
    EXPECT_LT(rep.mean_rel_residual, rep.mean_rel_error);
    for (int i = 0; i < m.n_layers(); ++i)
      for (auto& [name, slot] : m.block(i).linears()) {
        const auto* ql = dynamic_cast<const QuantLinear*>(slot->get());
        ASSERT_NE(ql, nullptr);
        ASSERT_TRUE(ql->has_lora());
        const Tensor& wf = fp.at("model.layers." + std::to_string(i) + "." + name);
        const Tensor eff = ql->effective_weight();
        const Tensor q = ql->quantized().dequantize();
        double e2 = 0, r2 = 0;
        for (int64_t x = 0; x < wf.numel(); ++x) {
          const double e = wf.data<float>()[x] - q.data<float>()[x], r = wf.data<float>()[x] - eff.data<float>()[x];
          e2 += e * e;
          r2 += r * r;
        }
        if (rank > 100) EXPECT_LT(std::sqrt(r2), 2e-3 * std::sqrt(e2)) << name;  // f16 factors
        else EXPECT_LT(r2, e2) << name;
      }
    // A second LQER pass is refused (the layers have adapters now).
    EXPECT_THROW(apply_lqer(m, fp, scales, o), Error);
    // Checkpoint: the factors (already rounded to f16) come back bit for bit; the same logits.
    auto dir = test::temp_dir("lqer-ckpt");
    save_quantized_model(dir.string(), m, "rtn", f, nlohmann::json{{"lqer", {{"rank", rank}, {"scale", "act"}}}});
    QuantizedCheckpoint qc = load_quantized_model(dir.string());
    auto packed = make_quantized_model(qc);
    const Tensor tokens = calib.slice(0, 0, 1).contiguous();
    EXPECT_LT(max_abs_diff(test::logits_of(*packed, tokens), test::logits_of(m, tokens)), 1e-5);
    fs::remove_all(dir);
  }
}
