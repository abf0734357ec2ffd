// Learnable clipping on llama.cpp's block grids (quant/lwc.h, "ggml block formats"): the f64
// gradients against the straight-through surrogate written out here, the f32 training forward
// against the encoded blocks (bit for bit), and bad inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "lowbit/autograd/functions.h"
#include "lowbit/core/format_traits.h"
#include "lowbit/quant/lwc.h"
#include "lowbit/quant/quantize.h"

using namespace lowbit;

namespace {

const char* const kTypes[] = {"q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"};

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
double f16r(double v) { return double(fmt_f16_to_f32(fmt_f32_to_f16(float(v)))); }

// One type's grid, as lwc.h describes it (written independently of lwc_ggml.cpp).
struct Spec {
  int sub, ns, qmax, off, sc_lo, sc_hi;
  bool affine, kquant, abs127;
};
Spec spec(const std::string& n) {
  if (n == "q4_0") return {32, 1, 15, 8, 0, 0, false, false, false};
  if (n == "q5_0") return {32, 1, 31, 16, 0, 0, false, false, false};
  if (n == "q8_0") return {32, 1, 254, 127, 0, 0, false, false, true};
  if (n == "q4_1") return {32, 1, 15, 0, 0, 0, true, false, false};
  if (n == "q5_1") return {32, 1, 31, 0, 0, 0, true, false, false};
  if (n == "q2_k") return {16, 16, 3, 0, 0, 15, true, true, false};
  if (n == "q4_k") return {32, 8, 15, 0, 0, 63, true, true, false};
  if (n == "q5_k") return {32, 8, 31, 0, 0, 63, true, true, false};
  if (n == "q3_k") return {16, 16, 7, 4, -32, 31, false, true, false};
  return {16, 16, 63, 32, -128, 127, false, true, false};  // q6_k
}

// Continuous scale and min of one sub-block for logits (g, b).
void clip(const Spec& s, const double* x, double g, double b, double& scale, double& min) {
  double mx = x[0], mn = x[0], ext = x[0];
  for (int i = 1; i < s.sub; ++i) {
    mx = std::max(mx, x[i]), mn = std::min(mn, x[i]);
    if (std::fabs(x[i]) > std::fabs(ext)) ext = x[i];
  }
  const double sg = kLwcGgmlRange * sigmoid(g), sb = kLwcGgmlRange * sigmoid(b);
  min = 0;
  if (s.abs127) {
    scale = sg * std::fabs(ext) / 127;
  } else if (!s.affine) {
    scale = sg * ext / -s.off;
  } else if (!s.kquant) {
    const double c = (mx + mn) / 2, hi = c + sg * (mx - c), lo = c + sb * (mn - c);
    scale = (hi - lo) / s.qmax, min = lo;
  } else {
    const double hi = std::max(mx, 0.0), lo = std::min(mn, 0.0);
    scale = (sg * hi - sb * lo) / s.qmax, min = -sb * lo;
  }
}

// The straight-through surrogate around (w, g0, b0): every discrete decision of the forward (f16
// rounding residuals of d/dmin, the sub-block that sets d/dmin, the sub-scale rounding residuals or
// clamped codes, each value's level residual or clamped level) frozen; the rest continuous.
struct Surrogate {
  Spec s;
  int64_t out, in, bs, G;
  const Tensor& w;
  struct Block {
    int tD = -1, tDm = -1;
    double rhoD = 0, rhoDm = 0, D0 = 0, Dm0 = 0;
    std::vector<int> sc, m;
    std::vector<char> scc, mc;
    std::vector<double> rsc, rm;
  };
  std::vector<Block> blocks;
  std::vector<double> res;  // level - u (inside) ...
  std::vector<int> level;
  std::vector<char> inside;

  Surrogate(const std::string& name, const Tensor& w0, const Tensor& g0, const Tensor& b0)
      : s(spec(name)), out(w0.size(0)), in(w0.size(1)), bs(int64_t(s.sub) * s.ns), G(w0.size(1) / s.sub), w(w0) {
    const int64_t nb = in / bs;
    blocks.resize(size_t(out * nb));
    res.assign(size_t(out * in), 0), level.assign(size_t(out * in), 0), inside.assign(size_t(out * in), 0);
    for (int64_t r = 0; r < out; ++r)
      for (int64_t b = 0; b < nb; ++b) {
        Block& B = blocks[size_t(r * nb + b)];
        std::vector<double> scale(size_t(s.ns)), min(size_t(s.ns));
        sub_params(g0, b0, r, b, scale, min);
        B.sc.assign(size_t(s.ns), 0), B.m.assign(size_t(s.ns), 0), B.scc.assign(size_t(s.ns), 0),
            B.mc.assign(size_t(s.ns), 0), B.rsc.assign(size_t(s.ns), 0), B.rm.assign(size_t(s.ns), 0);
        std::vector<double> step(size_t(s.ns)), shift(size_t(s.ns));
        if (!s.kquant) {
          B.D0 = f16r(scale[0]), B.rhoD = B.D0 - scale[0];
          step[0] = B.D0;
          if (s.affine) B.Dm0 = f16r(min[0]), B.rhoDm = B.Dm0 - min[0], shift[0] = -B.Dm0;
        } else {
          double best = 0, bestm = 0;
          for (int t = 0; t < s.ns; ++t) {
            const double key = s.affine ? scale[size_t(t)] : std::fabs(scale[size_t(t)]);
            if (key > best) best = key, B.tD = t;
            if (s.affine && min[size_t(t)] > bestm) bestm = min[size_t(t)], B.tDm = t;
          }
          const double d = B.tD >= 0 ? scale[size_t(B.tD)] / (s.affine ? s.sc_hi : s.sc_lo) : 0.0;
          B.D0 = f16r(d), B.rhoD = B.D0 - d;
          const double dm = B.tDm >= 0 ? min[size_t(B.tDm)] / s.sc_hi : 0.0;
          B.Dm0 = f16r(dm), B.rhoDm = B.Dm0 - dm;
          for (int t = 0; t < s.ns; ++t) {
            if (B.D0 != 0) {
              const double v = scale[size_t(t)] / B.D0, n = std::nearbyint(v);
              B.sc[size_t(t)] = int(std::clamp(n, double(s.sc_lo), double(s.sc_hi)));
              B.scc[size_t(t)] = n < s.sc_lo || n > s.sc_hi;
              B.rsc[size_t(t)] = B.sc[size_t(t)] - v;
            }
            if (s.affine && B.Dm0 != 0) {
              const double v = min[size_t(t)] / B.Dm0, n = std::nearbyint(v);
              B.m[size_t(t)] = int(std::clamp(n, 0.0, double(s.sc_hi)));
              B.mc[size_t(t)] = n < 0 || n > s.sc_hi;
              B.rm[size_t(t)] = B.m[size_t(t)] - v;
            }
            step[size_t(t)] = B.D0 * B.sc[size_t(t)], shift[size_t(t)] = B.Dm0 * B.m[size_t(t)];
          }
        }
        for (int64_t j = 0; j < bs; ++j) {
          const int t = int(j / s.sub);
          const int64_t i = r * in + b * bs + j;
          const double st = step[size_t(t)], sh = shift[size_t(t)];
          if (st == 0) continue;  // level 0, clamped
          const double u = (w.item(i) + sh) / st;
          const double n = !s.kquant && !s.abs127 ? std::floor(u + 0.5) : s.abs127 ? std::round(u) : std::nearbyint(u);
          const double lo = s.abs127 ? -127 : -s.off, hi = s.abs127 ? 127 : s.qmax - s.off;
          inside[size_t(i)] = n >= lo && n <= hi;
          level[size_t(i)] = int(std::clamp(n, lo, hi));
          res[size_t(i)] = level[size_t(i)] - u;
        }
      }
  }
  void sub_params(const Tensor& g, const Tensor& b, int64_t r, int64_t blk, std::vector<double>& scale,
                  std::vector<double>& min) const {
    double x[32];
    for (int t = 0; t < s.ns; ++t) {
      for (int i = 0; i < s.sub; ++i) x[i] = w.item(r * in + blk * bs + t * s.sub + i);
      const int64_t k = r * G + blk * s.ns + t;
      clip(s, x, g.item(k), b.defined() ? b.item(k) : 0.0, scale[size_t(t)], min[size_t(t)]);
    }
  }
  Tensor eval(const Tensor& g, const Tensor& b) const {
    Tensor y = Tensor::zeros({out, in}, DType::F64);
    const int64_t nb = in / bs;
    std::vector<double> scale(size_t(s.ns)), min(size_t(s.ns)), step(size_t(s.ns)), shift(size_t(s.ns));
    for (int64_t r = 0; r < out; ++r)
      for (int64_t blk = 0; blk < nb; ++blk) {
        const Block& B = blocks[size_t(r * nb + blk)];
        sub_params(g, b, r, blk, scale, min);
        if (!s.kquant) {
          step[0] = scale[0] + B.rhoD;
          shift[0] = s.affine ? -(min[0] + B.rhoDm) : 0.0;
        } else {
          const double D = B.tD >= 0 ? scale[size_t(B.tD)] / (s.affine ? s.sc_hi : s.sc_lo) + B.rhoD : 0.0;
          const double Dm = B.tDm >= 0 ? min[size_t(B.tDm)] / s.sc_hi + B.rhoDm : 0.0;
          for (int t = 0; t < s.ns; ++t) {
            step[size_t(t)] = B.D0 == 0 ? 0.0 : B.scc[size_t(t)] ? D * B.sc[size_t(t)] : scale[size_t(t)] + D * B.rsc[size_t(t)];
            shift[size_t(t)] = B.Dm0 == 0 ? 0.0 : B.mc[size_t(t)] ? Dm * B.m[size_t(t)] : min[size_t(t)] + Dm * B.rm[size_t(t)];
          }
        }
        for (int64_t j = 0; j < bs; ++j) {
          const int t = int(j / s.sub);
          const int64_t i = r * in + blk * bs + j;
          y.set_item(i, inside[size_t(i)] ? w.item(i) + step[size_t(t)] * res[size_t(i)]
                                          : step[size_t(t)] * level[size_t(i)] - shift[size_t(t)]);
        }
      }
    return y;
  }
};

double dot(const Tensor& a, const Tensor& b) {
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) s += a.item(i) * b.item(i);
  return s;
}

template <class Loss>
void check_fd(Tensor t, const Tensor& analytic, Loss&& loss, const std::string& what) {
  ASSERT_TRUE(analytic.defined()) << what << " got no gradient";
  const double h = 1e-6;
  double norm = 0;
  for (int64_t i = 0; i < t.numel(); ++i) {
    const double orig = t.item(i);
    t.set_item(i, orig + h);
    const double fp = loss();
    t.set_item(i, orig - h);
    const double fm = loss();
    t.set_item(i, orig);
    const double num = (fp - fm) / (2 * h);
    ASSERT_NEAR(analytic.item(i), num, 1e-6 * std::max(1.0, std::fabs(num))) << what << " element " << i;
    norm += std::fabs(num);
  }
  EXPECT_GT(norm, 0) << what << ": clipping must matter";
}

// Weights with a spread of magnitudes across sub-blocks (so d is set by one of them and the other
// sub-scales are neither 0 nor saturated), a few outliers, and one all-zero sub-block.
Tensor weights(int64_t out, int64_t in, uint64_t seed, DType dt) {
  Tensor w = Tensor::randn({out, in}, seed, 1.0, DType::F64);
  for (int64_t r = 0; r < out; ++r)
    for (int64_t j = 0; j < in; ++j) {
      const double s = 0.3 + 0.7 * double((j / 16 + r) % 5) / 4.0;
      w.set_item(r * in + j, w.item(r * in + j) * s * 0.02);
    }
  w.set_item(3, 0.2);  // outlier
  for (int64_t j = 32; j < 48; ++j) w.set_item(in + j, 0.0);
  return w.to(dt);
}

}  // namespace

TEST(LwcGgml, GradientsMatchTheStraightThroughSurrogate) {
  for (const char* name : kTypes) {
    const QuantFormat& f = parse_quant_format(name);
    const Spec s = spec(name);
    const int64_t out = 3, in = 512, G = in / s.sub;
    Tensor w = weights(out, in, 7, DType::F64);
    Tensor gm = Tensor::uniform({out, G}, 4, -1.5, 2.5, DType::F64);
    Tensor bt = lwc_has_beta(f) ? Tensor::uniform({out, G}, 5, -1.5, 2.5, DType::F64) : Tensor();
    ASSERT_EQ(lwc_n_groups(f, in), G) << name;
    ASSERT_EQ(lwc_has_beta(f), s.affine) << name;
    Tensor proj = Tensor::randn({out, in}, 6, 1.0, DType::F64);
    Var gv(gm, true), bv = bt.defined() ? Var(bt, true) : Var();
    Var q = lwc_fake_quant(Var(w), gv, bv, f);
    Surrogate sur(name, w, gm, bt);
    EXPECT_LT(max_abs_diff(q.value(), sur.eval(gm, bt)), 1e-12) << name << ": the surrogate must equal the forward";
    backward(sum(mul(q, Var(proj))));
    auto loss = [&] { return dot(sur.eval(gm, bt), proj); };
    check_fd(gm, gv.grad(), loss, std::string(name) + " dgamma");
    if (bt.defined()) check_fd(bt, bv.grad(), loss, std::string(name) + " dbeta");
  }
}

TEST(LwcGgml, TrainingForwardIsTheEncodedTensorBitForBit) {
  for (const char* name : kTypes) {
    const QuantFormat& f = parse_quant_format(name);
    const int64_t out = 6, in = 768, G = lwc_n_groups(f, in);
    Tensor w = weights(out, in, 21, DType::F32);
    Tensor gm = Tensor::uniform({out, G}, 22, -2.0, 3.0), bt = lwc_has_beta(f) ? Tensor::uniform({out, G}, 23, -2.0, 3.0) : Tensor();
    NoGradGuard ng;
    const Tensor y = lwc_fake_quant(Var(w), Var(gm), bt.defined() ? Var(bt) : Var(), f).value();
    QuantizedTensor q = lwc_encode(w, gm, bt, f);
    ASSERT_EQ(q.format, f.id) << name;
    q.validate();
    const Tensor deq = q.dequantize();
    int64_t differ = 0;
    for (int64_t i = 0; i < y.numel(); ++i) differ += y.data<float>()[i] != deq.data<float>()[i];
    EXPECT_EQ(differ, 0) << name << ": training forward and the encoded blocks differ";
    // Re-encoding the dequantized values on the stored grids leaves them unchanged (the values are
    // grid points), and the f64 body computes the same function (up to rare rounding ties).
    const Tensor y64 = lwc_fake_quant(Var(w.to(DType::F64)), Var(gm.to(DType::F64)),
                                      bt.defined() ? Var(bt.to(DType::F64)) : Var(), f).value();
    int64_t far = 0;
    for (int64_t i = 0; i < y.numel(); ++i) far += std::fabs(y64.item(i) - double(y.data<float>()[i])) > 1e-6;
    EXPECT_LE(far, y.numel() / 200) << name << ": f64 and f32 bodies disagree on " << far << " values";
    // With the factor 1 (K sigmoid = 1: the data's range) the grid is close to RTN's.
    Tensor big = Tensor::full({out, G}, std::log(1.0 / (kLwcGgmlRange - 1.0)));
    const Tensor wide = lwc_encode(w, big, bt.defined() ? big : Tensor(), f).dequantize();
    const Tensor rtn = quantize(w, f).dequantize();
    double e_wide = 0, e_rtn = 0;
    for (int64_t i = 0; i < w.numel(); ++i)
      e_wide += std::pow(double(wide.data<float>()[i]) - w.item(i), 2), e_rtn += std::pow(double(rtn.data<float>()[i]) - w.item(i), 2);
    EXPECT_LT(e_wide, 2.5 * e_rtn) << name << " unclipped " << e_wide << " rtn " << e_rtn;
  }
}

TEST(LwcGgml, RejectsWhatItCannotTrain) {
  auto err = [](auto&& fn) {
    try {
      fn();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  const QuantFormat& q4k = parse_quant_format("q4_k");
  Var w(Tensor::randn({2, 256}, 1)), g(Tensor::zeros({2, 8})), b(Tensor::zeros({2, 8}));
  EXPECT_NE(err([&] { lwc_fake_quant(w, Var(Tensor::zeros({2, 1})), b, q4k); }).find("sub-block"), std::string::npos);
  EXPECT_NE(err([&] { lwc_fake_quant(w, g, Var(), q4k); }).find("beta"), std::string::npos);
  EXPECT_EQ(err([&] { lwc_fake_quant(w, Var(Tensor::zeros({2, 16})), Var(), parse_quant_format("q3_k")); }), "(no error)");
  EXPECT_NE(err([&] { lwc_fake_quant(w, Var(Tensor::zeros({2, 16})), Var(Tensor::zeros({2, 16})), parse_quant_format("q3_k")); })
                .find("beta must be undefined"),
            std::string::npos);
  // Rows that are not whole blocks; the weight must be frozen; types without a uniform grid.
  EXPECT_NE(err([&] { lwc_fake_quant(Var(Tensor::randn({2, 288}, 1)), Var(Tensor::zeros({2, 9})), Var(Tensor::zeros({2, 9})), q4k); })
                .find("whole 256-value blocks"),
            std::string::npos);
  EXPECT_NE(err([&] { lwc_fake_quant(Var(Tensor::randn({2, 256}, 1), true), g, b, q4k); }).find("frozen"), std::string::npos);
  for (const char* n : {"iq4_nl", "iq4_xs", "tq2_0"}) {
    const std::string e = err([&] { lwc_fake_quant(w, g, b, parse_quant_format(n)); });
    EXPECT_NE(e.find("q4_0, q4_1"), std::string::npos) << n << ": " << e;
    EXPECT_FALSE(lwc_supports(parse_quant_format(n))) << n;
  }
}

// The RTN initialisation starts training on (nearly) the reference quantizer's grid: the squared
// weight error of the initial fake-quant forward is within a few percent of RTN's.
TEST(LwcGgml, InitFromRtnStartsOnTheReferenceGrid) {
  for (const char* name : kTypes) {
    const QuantFormat& f = parse_quant_format(name);
    const int64_t out = 16, in = 512;
    Tensor w = Tensor::randn({out, in}, 31, 0.02);
    Tensor gm, bt;
    lwc_ggml_init_from_rtn(w, f, gm, bt);
    ASSERT_EQ(gm.shape(), Shape({out, lwc_n_groups(f, in)})) << name;
    ASSERT_EQ(bt.defined(), lwc_has_beta(f)) << name;
    NoGradGuard ng;
    const Tensor y = lwc_fake_quant(Var(w), Var(gm), bt.defined() ? Var(bt) : Var(), f).value();
    const Tensor rtn = quantize(w, f).dequantize();
    double e_init = 0, e_rtn = 0;
    int64_t same = 0;
    for (int64_t i = 0; i < w.numel(); ++i) {
      e_init += std::pow(double(y.data<float>()[i]) - w.item(i), 2);
      e_rtn += std::pow(double(rtn.data<float>()[i]) - w.item(i), 2);
      same += y.data<float>()[i] == rtn.data<float>()[i];
    }
    std::printf("%s: init/rtn weight error %.4f, %.1f %% of values equal\n", name, e_init / e_rtn,
                100.0 * double(same) / double(w.numel()));
    EXPECT_LT(e_init, 1.01 * e_rtn) << name;
    EXPECT_GT(same, w.numel() * 95 / 100) << name;
  }
}
