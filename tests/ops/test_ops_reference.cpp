// Forward ops against plain reference formulas (f64 loops written independently of the kernels).
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <sstream>
#include <sys/wait.h>
#include <vector>

#include "lowbit/autograd/optim.h"
#include "lowbit/core/threads.h"
#include "lowbit/ops/ops.h"

using namespace lowbit;

static Tensor rnd(Shape s, uint64_t seed, DType dt = DType::F32) { return Tensor::randn(s, seed, 1.0, dt); }

TEST(OpsReference, GemmMatchesLoops) {
  Tensor a = rnd({2, 3, 5}, 1), b = rnd({2, 5, 4}, 2), c = Tensor::empty({2, 3, 4});
  ops::gemm(a, false, b, false, c);
  for (int bi = 0; bi < 2; ++bi)
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 4; ++j) {
        double s = 0;
        for (int k = 0; k < 5; ++k) s += a.item(bi * 15 + i * 5 + k) * b.item(bi * 20 + k * 4 + j);
        EXPECT_NEAR(c.item(bi * 12 + i * 4 + j), s, 1e-5);
      }
  Tensor bad = Tensor::empty({2, 3, 3});
  EXPECT_THROW(ops::gemm(a, false, b, false, bad), Error);
  EXPECT_THROW(ops::gemm(a, false, a, false, c), Error);
}

TEST(OpsReference, RmsNorm) {
  Tensor x = rnd({3, 8}, 1), w = rnd({8}, 2), y = Tensor::empty({3, 8}), r = Tensor::empty({3});
  ops::rmsnorm_forward(x, w, 1e-5, y, r);
  for (int i = 0; i < 3; ++i) {
    double ss = 0;
    for (int j = 0; j < 8; ++j) ss += x.item(i * 8 + j) * x.item(i * 8 + j);
    const double rs = 1 / std::sqrt(ss / 8 + 1e-5);
    for (int j = 0; j < 8; ++j) EXPECT_NEAR(y.item(i * 8 + j), x.item(i * 8 + j) * rs * w.item(j), 1e-5);
  }
}

// Batched decode normalizes several rows at once (8, 4, then single rows): each row's outputs are
// bit-identical to the row normalized alone, and to the formula evaluated in its own f32/f64 order.
TEST(OpsReference, RmsNormRowsTogetherEqualEachRowAlone) {
  const int64_t D = 576;
  for (int64_t M : {1, 3, 4, 5, 8, 9, 13, 17}) {
    Tensor x = rnd({M, D}, 10 + uint64_t(M)), w = rnd({D}, 3), y = Tensor::empty({M, D}), r = Tensor::empty({M});
    ops::rmsnorm_forward(x, w, 1e-5, y, r);
    const float *px = x.data<float>(), *pw = w.data<float>();
    for (int64_t i = 0; i < M; ++i) {
      Tensor x1 = x.slice(0, i, i + 1).contiguous(), y1 = Tensor::empty({1, D}), r1 = Tensor::empty({1});
      ops::rmsnorm_forward(x1, w, 1e-5, y1, r1);
      double ss = 0;
      for (int64_t j = 0; j < D; ++j) ss += double(px[i * D + j]) * double(px[i * D + j]);
      const float rs = float(1.0 / std::sqrt(ss / double(D) + 1e-5));
      ASSERT_EQ(r.data<float>()[i], rs) << "M=" << M << " row " << i;
      ASSERT_EQ(r1.data<float>()[0], rs);
      for (int64_t j = 0; j < D; ++j) {
        const float want = px[i * D + j] * rs * pw[j];
        ASSERT_EQ(y.data<float>()[i * D + j], want) << "M=" << M << " row " << i << " column " << j;
        ASSERT_EQ(y1.data<float>()[j], want);
      }
    }
  }
}

TEST(OpsReference, RopeStylesAreRelatedByAPermutation) {
  // Interleaved pairs (2i, 2i+1) and half pairs (i, i+hd/2) give the same result after moving
  // channel 2i -> i and 2i+1 -> i + hd/2 (the Meta <-> Hugging Face weight permutation).
  const int64_t hd = 8;
  Tensor x = rnd({1, 3, 2, hd}, 1), y1 = Tensor::empty(x.shape()), y2 = Tensor::empty(x.shape());
  Tensor xp = Tensor::empty(x.shape());
  for (int64_t r = 0; r < 6; ++r)
    for (int64_t i = 0; i < hd / 2; ++i) {
      xp.set_item(r * hd + i, x.item(r * hd + 2 * i));
      xp.set_item(r * hd + i + hd / 2, x.item(r * hd + 2 * i + 1));
    }
  ops::rope(x, 7, 10000.0, RopeStyle::Interleaved, false, y1);
  ops::rope(xp, 7, 10000.0, RopeStyle::Half, false, y2);
  for (int64_t r = 0; r < 6; ++r)
    for (int64_t i = 0; i < hd / 2; ++i) {
      EXPECT_NEAR(y1.item(r * hd + 2 * i), y2.item(r * hd + i), 1e-6);
      EXPECT_NEAR(y1.item(r * hd + 2 * i + 1), y2.item(r * hd + i + hd / 2), 1e-6);
    }
  // Position 0 is the identity; inverse undoes forward.
  Tensor z = Tensor::empty(x.shape()), back = Tensor::empty(x.shape());
  ops::rope(x, 0, 10000.0, RopeStyle::Interleaved, false, z);
  EXPECT_EQ(max_abs_diff(x.slice(1, 0, 1), z.slice(1, 0, 1)), 0.0);
  ops::rope(y1, 7, 10000.0, RopeStyle::Interleaved, true, back);
  EXPECT_LT(max_abs_diff(back, x), 1e-5);
}

// ops::rope_f32 (raw rows, the batched decode step's per-sequence RoPE) equals ops::rope on the
// same rows bit for bit: both styles, with llama3 scaling, several positions and widths, into
// another buffer and in place.
TEST(OpsReference, RopeOnRawRowsEqualsTheTensorOp) {
  RopeScaling llama3;
  llama3.factor = 8.0;
  llama3.low_freq_factor = 1.0;
  llama3.high_freq_factor = 4.0;
  llama3.original_max_position = 8192;
  for (RopeStyle style : {RopeStyle::Interleaved, RopeStyle::Half})
    for (const RopeScaling& sc : {RopeScaling{}, llama3})
      for (auto [T, H, hd, pos0] : {std::array<int64_t, 4>{1, 9, 64, 0}, {1, 3, 64, 41}, {3, 2, 8, 7}, {5, 4, 128, 300}}) {
        Tensor x = rnd({1, T, H, hd}, 5 + uint64_t(pos0)), want = Tensor::empty(x.shape());
        ops::rope(x, pos0, 10000.0, style, false, want, sc);
        Tensor got = Tensor::empty(x.shape()), inplace = x.clone();
        ops::rope_f32(x.data<float>(), got.data<float>(), T, H, hd, pos0, 10000.0, style, sc);
        ops::rope_f32(inplace.data<float>(), inplace.data<float>(), T, H, hd, pos0, 10000.0, style, sc);
        for (int64_t i = 0; i < x.numel(); ++i) {
          ASSERT_EQ(got.data<float>()[i], want.data<float>()[i]) << "T " << T << " hd " << hd << " value " << i;
          ASSERT_EQ(inplace.data<float>()[i], want.data<float>()[i]) << "in place, value " << i;
        }
      }
  float one[3] = {1, 2, 3};
  EXPECT_THROW(ops::rope_f32(one, one, 1, 1, 3, 0, 10000.0, RopeStyle::Half), Error);  // odd head_dim
  EXPECT_THROW(ops::rope_f32(one, one, 1, 1, 2, -1, 10000.0, RopeStyle::Half), Error);  // negative position
}

// rope_scaling "llama3": the inverse frequencies against a numpy transcription of transformers'
// _compute_llama3_parameters (run by python3; skipped without numpy), and the op rotating by them.
TEST(OpsReference, RopeLlama3FrequencyScaling) {
  const double theta = 500000.0;
  const int64_t hd = 128;
  RopeScaling s;
  s.factor = 8;
  s.low_freq_factor = 1;
  s.high_freq_factor = 4;
  s.original_max_position = 8192;
  const std::vector<double> got = rope_inv_freq(theta, hd, s);
  ASSERT_EQ(got.size(), size_t(hd / 2));
  const char* py = R"(python3 -c "
import math, sys
try:
    import numpy as np
except ImportError:
    sys.exit(3)
base, dim, factor, low, high, old = 500000.0, 128, 8.0, 1.0, 4.0, 8192
inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float64) / dim))
low_wavelen = old / low
high_wavelen = old / high
wavelen = 2 * math.pi / inv_freq
inv_freq_llama = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
smooth_factor = (old / wavelen - low) / (high - low)
smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
inv_freq_llama = np.where(is_medium, smoothed, inv_freq_llama)
print(' '.join(repr(float(x)) for x in inv_freq_llama))
" 2>/dev/null)";
  std::string out;
  FILE* p = popen(py, "r");
  int rc = -1;
  if (p) {
    char buf[4096];
    for (size_t n; (n = fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
    const int st = pclose(p);
    rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  }
  if (rc != 0) GTEST_SKIP() << "python3 with numpy is not available";
  std::istringstream is(out);
  int scaled = 0, smoothed = 0, kept = 0;
  const std::vector<double> plain = rope_inv_freq(theta, hd);
  for (size_t i = 0; i < got.size(); ++i) {
    double want = 0;
    ASSERT_TRUE(is >> want) << "numpy printed " << out;
    EXPECT_NEAR(got[i], want, 1e-15 + 1e-12 * std::fabs(want)) << "pair " << i;
    if (got[i] == plain[i]) ++kept;
    else if (std::fabs(got[i] - plain[i] / 8) < 1e-18 + 1e-12 * plain[i]) ++scaled;
    else ++smoothed;
  }
  EXPECT_GT(kept, 0);  // all three regimes occur for Llama 3.1's values
  EXPECT_GT(scaled, 0);
  EXPECT_GT(smoothed, 0);

  // The op rotates pair i by pos * inv_freq[i].
  Tensor x = rnd({1, 2, 1, hd}, 3, DType::F64), y = Tensor::empty(x.shape(), DType::F64);
  ops::rope(x, 5000, theta, RopeStyle::Half, false, y, s);
  for (int64_t t = 0; t < 2; ++t)
    for (int64_t i = 0; i < hd / 2; ++i) {
      const double ang = double(5000 + t) * got[size_t(i)], c = std::cos(ang), sn = std::sin(ang);
      const double x0 = x.item(t * hd + i), x1 = x.item(t * hd + i + hd / 2);
      EXPECT_NEAR(y.item(t * hd + i), x0 * c - x1 * sn, 1e-12);
      EXPECT_NEAR(y.item(t * hd + i + hd / 2), x0 * sn + x1 * c, 1e-12);
    }
}

TEST(OpsReference, AttentionMatchesDenseSoftmax) {
  const int64_t B = 2, T = 6, H = 4, KVH = 2, hd = 5;
  Tensor q = rnd({B, T, H, hd}, 1, DType::F64), k = rnd({B, T, KVH, hd}, 2, DType::F64), v = rnd({B, T, KVH, hd}, 3, DType::F64);
  Tensor out = Tensor::empty(q.shape(), DType::F64), lse = Tensor::empty({B, H, T}, DType::F64);
  const double sc = 1 / std::sqrt(double(hd));
  ops::attention_forward(q, k, v, sc, out, lse);
  auto at = [](const Tensor& t, int64_t b, int64_t s, int64_t h, int64_t c) {
    return t.item(((b * t.size(1) + s) * t.size(2) + h) * t.size(3) + c);
  };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < T; ++i) {
        std::vector<double> p(T, 0.0);
        double z = 0;
        for (int64_t j = 0; j <= i; ++j) {
          double s = 0;
          for (int64_t c = 0; c < hd; ++c) s += at(q, b, i, h, c) * at(k, b, j, h / 2, c);
          p[j] = std::exp(s * sc);
          z += p[j];
        }
        for (int64_t c = 0; c < hd; ++c) {
          double o = 0;
          for (int64_t j = 0; j <= i; ++j) o += p[j] / z * at(v, b, j, h / 2, c);
          EXPECT_NEAR(at(out, b, i, h, c), o, 1e-12);
        }
      }
  // Decode case: the last query alone over all keys equals the last row of the full pass.
  Tensor q1 = q.slice(1, T - 1, T).contiguous(), o1 = Tensor::empty(q1.shape(), DType::F64), l1 = Tensor::empty({B, H, 1}, DType::F64);
  ops::attention_forward(q1, k, v, sc, o1, l1);
  EXPECT_LT(max_abs_diff(o1, out.slice(1, T - 1, T)), 1e-12);
}

// The f32 body works in tiles of query rows (64, or 16 for long contexts) and skips the keys above
// the causal diagonal: several tiles, a partial last tile, and queries that start after cached keys.
TEST(OpsReference, AttentionTilesMatchDenseSoftmaxF32) {
  for (auto [Tq, Tk] : {std::array<int64_t, 2>{150, 150}, {70, 150}, {1, 131}, {64, 64}}) {
    const int64_t B = 2, H = 6, KVH = 2, hd = 16, off = Tk - Tq;
    Tensor q = rnd({B, Tq, H, hd}, 11), k = rnd({B, Tk, KVH, hd}, 12), v = rnd({B, Tk, KVH, hd}, 13);
    Tensor out = Tensor::empty(q.shape()), lse = Tensor::empty({B, H, Tq});
    const double sc = 1 / std::sqrt(double(hd));
    ops::attention_forward(q, k, v, sc, out, lse);
    auto at = [](const Tensor& t, int64_t b, int64_t s, int64_t h, int64_t c) {
      return t.item(((b * t.size(1) + s) * t.size(2) + h) * t.size(3) + c);
    };
    double worst = 0, worst_lse = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < Tq; ++i) {
          const int64_t n = off + i + 1;
          std::vector<double> s(static_cast<size_t>(n));
          double mx = -1e300, z = 0;
          for (int64_t j = 0; j < n; ++j) {
            double d = 0;
            for (int64_t c = 0; c < hd; ++c) d += at(q, b, i, h, c) * at(k, b, j, h / (H / KVH), c);
            s[size_t(j)] = d * sc;
            mx = std::max(mx, s[size_t(j)]);
          }
          for (int64_t j = 0; j < n; ++j) z += std::exp(s[size_t(j)] - mx);
          worst_lse = std::max(worst_lse, std::abs(lse.item((b * H + h) * Tq + i) - (mx + std::log(z))));
          for (int64_t c = 0; c < hd; ++c) {
            double o = 0;
            for (int64_t j = 0; j < n; ++j) o += std::exp(s[size_t(j)] - mx) / z * at(v, b, j, h / (H / KVH), c);
            worst = std::max(worst, std::abs(at(out, b, i, h, c) - o));
          }
        }
    EXPECT_LT(worst, 2e-5) << "Tq " << Tq << " Tk " << Tk;
    EXPECT_LT(worst_lse, 2e-5) << "Tq " << Tq << " Tk " << Tk;
  }
}

// Attention over a typed KV cache: kv_store's f16 / q8 encodings decode as documented (f16: the
// nearest half; q8: |x - code*scale| <= scale/2 with scale = absmax/127), and kv_attention_forward
// equals dense causal softmax attention (f64 loops) over the decoded keys/values to 2e-5, for
// decode (Tq = 1), a prefill with several query tiles and a chunk after cached keys. Against
// attention over the original f32 keys/values the outputs stay within 5e-3 (f16) and 3e-2 (q8)
// for unit-normal data, the tolerance the model-level tests also see.
TEST(OpsReference, KvCacheAttentionMatchesDenseSoftmax) {
  for (DType dt : {DType::F32, DType::F16, DType::I8})
    for (auto [Tq, Tk] : {std::array<int64_t, 2>{1, 131}, {150, 150}, {70, 150}, {1, 1}}) {
      const int64_t H = 6, KVH = 2, hd = 16, off = Tk - Tq, group = H / KVH;
      Tensor q = rnd({Tq, H, hd}, 21), k = rnd({Tk, KVH, hd}, 22), v = rnd({Tk, KVH, hd}, 23);
      Tensor kc = Tensor::empty(k.shape(), dt), vc = Tensor::empty(v.shape(), dt);
      Tensor ks, vs;
      if (dt == DType::I8) ks = Tensor::empty({Tk, KVH}), vs = Tensor::empty({Tk, KVH});
      ops::kv_store(k, kc, ks);
      ops::kv_store(v, vc, vs);
      // Decoded values, checked against the encoding's error bound.
      auto decoded = [&](const Tensor& orig, const Tensor& c, const Tensor& sc) {
        Tensor d = Tensor::empty(orig.shape(), DType::F64);
        for (int64_t i = 0; i < orig.numel(); ++i) {
          double x;
          if (dt == DType::F32) {
            x = c.data<float>()[i];
          } else if (dt == DType::F16) {
            x = f16_to_f32(static_cast<const uint16_t*>(c.raw_data())[i]);
            EXPECT_EQ(x, double(f16_to_f32(f32_to_f16(orig.data<float>()[i]))));
          } else {
            const double scale = sc.data<float>()[i / hd];
            x = c.data<int8_t>()[i] * scale;
            EXPECT_LE(std::abs(x - orig.data<float>()[i]), scale * 0.5 + 1e-7);
          }
          d.set_item(i, x);
        }
        return d;
      };
      Tensor kd = decoded(k, kc, ks), vd = decoded(v, vc, vs);
      Tensor out = Tensor::empty(q.shape());
      const double sc = 1 / std::sqrt(double(hd));
      ops::kv_attention_forward(q, kc, vc, ks, vs, sc, out);
      auto dense = [&](const Tensor& kk, const Tensor& vv, int64_t i, int64_t h, int64_t c) {
        const int64_t n = off + i + 1, kh = h / group;
        std::vector<double> s(static_cast<size_t>(n));
        double mx = -1e300, z = 0, o = 0;
        for (int64_t j = 0; j < n; ++j) {
          double d = 0;
          for (int64_t e = 0; e < hd; ++e) d += q.item((i * H + h) * hd + e) * kk.item((j * KVH + kh) * hd + e);
          s[size_t(j)] = d * sc;
          mx = std::max(mx, s[size_t(j)]);
        }
        for (int64_t j = 0; j < n; ++j) z += std::exp(s[size_t(j)] - mx);
        for (int64_t j = 0; j < n; ++j) o += std::exp(s[size_t(j)] - mx) / z * vv.item((j * KVH + kh) * hd + c);
        return o;
      };
      double worst = 0, worst_vs_f32 = 0;
      for (int64_t i = 0; i < Tq; i += (Tq > 20 ? 7 : 1))  // a sample of query rows (f64 loops are slow)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t c = 0; c < hd; ++c) {
            const double got = out.item((i * H + h) * hd + c);
            worst = std::max(worst, std::abs(got - dense(kd, vd, i, h, c)));
            worst_vs_f32 = std::max(worst_vs_f32, std::abs(got - dense(k, v, i, h, c)));
          }
      EXPECT_LT(worst, 2e-5) << dtype_name(dt) << " Tq " << Tq << " Tk " << Tk;
      EXPECT_LT(worst_vs_f32, dt == DType::I8 ? 3e-2 : dt == DType::F16 ? 5e-3 : 2e-5) << dtype_name(dt) << " Tq " << Tq;
    }
  // Bad arguments are errors, not crashes.
  Tensor q = rnd({1, 4, 8}, 1), k = Tensor::empty({3, 2, 8}, DType::I8), out = Tensor::empty({1, 4, 8});
  EXPECT_THROW(ops::kv_attention_forward(q, k, k, Tensor(), Tensor(), 1.0, out), Error);  // q8 without scales
  Tensor kb = Tensor::empty({3, 3, 8}, DType::F16);
  EXPECT_THROW(ops::kv_attention_forward(q, kb, kb, Tensor(), Tensor(), 1.0, out), Error);  // 3 kv heads, 4 heads
  Tensor k64 = Tensor::empty({3, 2, 8}, DType::F64);
  EXPECT_THROW(ops::kv_attention_forward(q, k64, k64, Tensor(), Tensor(), 1.0, out), Error);
  Tensor src = rnd({3, 2, 8}, 2), bad_scale = Tensor::empty({3, 1});
  EXPECT_THROW(ops::kv_store(src, k, bad_scale), Error);
}

// The fused one-row attention over an f16 cache (kv_decode_attention_f16: keys/values read in
// place) against dense softmax attention in f64 over the decoded cache, to 2e-5, over a table of
// shapes: head_dim 16 / 64 / 128 (and 24, 8: not a multiple of 16, where it declines and
// kv_attention_forward widens), groups of 1-9 query heads per kv head (blocks of 4 and the rest),
// 1-3 kv heads, 1-300 keys. kv_attention_forward's Tq = 1 case takes it (bit for bit), the
// widening path agrees within 2e-5, inside a pool task it gives the same floats as outside, and
// set_kv_direct(false) turns it off.
TEST(OpsReference, KvDecodeAttentionF16ReadsTheCacheInPlace) {
  struct Case {
    int64_t H, KVH, hd, Tk;
  };
  const std::vector<Case> cases = {{9, 3, 64, 40}, {9, 3, 64, 1}, {4, 1, 16, 300}, {8, 2, 128, 77},
                                   {5, 5, 16, 33}, {14, 2, 32, 129}, {6, 3, 24, 20}, {2, 1, 8, 5}};
  for (const Case& c : cases) {
    const int64_t H = c.H, KVH = c.KVH, hd = c.hd, Tk = c.Tk, group = H / KVH;
    Tensor q = rnd({1, H, hd}, 61 + uint64_t(Tk)), k = rnd({Tk, KVH, hd}, 62), v = rnd({Tk, KVH, hd}, 63);
    Tensor kc = Tensor::empty(k.shape(), DType::F16), vc = Tensor::empty(v.shape(), DType::F16), none;
    ops::kv_store(k, kc, none);
    ops::kv_store(v, vc, none);
    const auto* kp = static_cast<const uint16_t*>(kc.raw_data());
    const auto* vp = static_cast<const uint16_t*>(vc.raw_data());
    const double sc = 1 / std::sqrt(double(hd));
    Tensor fused = Tensor::full({1, H, hd}, -7.0);
    const bool took = ops::kv_decode_attention_f16(q.data<float>(), kp, vp, Tk, H, KVH, hd, sc, fused.data<float>());
#if defined(__x86_64__) && defined(__GNUC__)
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
#else
    const bool avx512 = false;
#endif
    const bool can = hd % 16 == 0 && avx512;
    EXPECT_EQ(took, can) << "hd " << hd;
    Tensor via_op = Tensor::empty({1, H, hd});
    ops::kv_attention_forward(q, kc, vc, Tensor(), Tensor(), sc, via_op);
    const bool was = ops::set_kv_direct(false);
    Tensor widened = Tensor::empty({1, H, hd});
    EXPECT_FALSE(ops::kv_decode_attention_f16(q.data<float>(), kp, vp, Tk, H, KVH, hd, sc, widened.data<float>()));
    ops::kv_attention_forward(q, kc, vc, Tensor(), Tensor(), sc, widened);
    ops::set_kv_direct(was);
    double worst = 0, worst_widened = 0;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kh = h / group;
      std::vector<double> s(static_cast<size_t>(Tk));
      double mx = -1e300, z = 0;
      for (int64_t j = 0; j < Tk; ++j) {
        double d = 0;
        for (int64_t e = 0; e < hd; ++e)
          d += double(q.data<float>()[h * hd + e]) * f16_to_f32(kp[(j * KVH + kh) * hd + e]);
        s[size_t(j)] = d * sc;
        mx = std::max(mx, s[size_t(j)]);
      }
      for (double& x : s) z += (x = std::exp(x - mx));
      for (int64_t e = 0; e < hd; ++e) {
        double o = 0;
        for (int64_t j = 0; j < Tk; ++j) o += s[size_t(j)] / z * f16_to_f32(vp[(j * KVH + kh) * hd + e]);
        const float got = via_op.data<float>()[h * hd + e];
        if (took) {
          ASSERT_EQ(fused.data<float>()[h * hd + e], got) << "h " << h << " e " << e;
        }
        worst = std::max(worst, std::abs(double(got) - o));
        worst_widened = std::max(worst_widened, std::abs(double(widened.data<float>()[h * hd + e]) - o));
      }
    }
    EXPECT_LT(worst, 2e-5) << "H " << H << " KVH " << KVH << " hd " << hd << " Tk " << Tk;
    EXPECT_LT(worst_widened, 2e-5) << "H " << H << " KVH " << KVH << " hd " << hd << " Tk " << Tk;
    // Inside a pool task (the kv heads run serially there): the same floats.
    std::vector<Tensor> inside(3);
    parallel_each(3, [&](int64_t t) {
      inside[size_t(t)] = Tensor::empty({1, H, hd});
      ops::kv_attention_forward(q, kc, vc, Tensor(), Tensor(), sc, inside[size_t(t)]);
    });
    for (const Tensor& t : inside)
      for (int64_t i = 0; i < t.numel(); ++i) ASSERT_EQ(t.data<float>()[i], via_op.data<float>()[i]) << "value " << i;
  }
}

// A batched decode step runs each sequence's attention in a pool task, where an f16 cache's kv
// heads are widened together (one buffer for all the call's items): the same numbers as the
// call outside a parallel region (each item widening its own head), bit for bit, for several
// caches one after another on the same threads (no buffer of an earlier call is reused).
TEST(OpsReference, KvCacheAttentionInsideAPoolTaskEqualsOutside) {
  const int64_t H = 9, KVH = 3, hd = 64;
  struct Case {
    int64_t Tq, Tk;
  };
  const std::vector<Case> cases = {{1, 40}, {1, 41}, {3, 41}, {1, 1}, {70, 150}, {1, 200}};
  std::vector<Tensor> qs, ks, vs, want;
  for (size_t c = 0; c < cases.size(); ++c) {
    const auto [Tq, Tk] = cases[c];
    Tensor q = rnd({Tq, H, hd}, 31 + c), k = rnd({Tk, KVH, hd}, 41 + c), v = rnd({Tk, KVH, hd}, 51 + c);
    Tensor kc = Tensor::empty(k.shape(), DType::F16), vc = Tensor::empty(v.shape(), DType::F16), none;
    ops::kv_store(k, kc, none);
    ops::kv_store(v, vc, none);
    Tensor out = Tensor::empty(q.shape());
    ops::kv_attention_forward(q, kc, vc, Tensor(), Tensor(), 0.125, out);  // outside: one head per item
    qs.push_back(q), ks.push_back(kc), vs.push_back(vc), want.push_back(out);
  }
  std::vector<Tensor> got(cases.size());
  for (auto& g : got) g = Tensor::empty({1});
  for (int round = 0; round < 2; ++round) {
    parallel_each(int64_t(cases.size()), [&](int64_t c) {
      EXPECT_TRUE(in_parallel_region() || num_threads() < 2);
      got[size_t(c)] = Tensor::empty(qs[size_t(c)].shape());
      ops::kv_attention_forward(qs[size_t(c)], ks[size_t(c)], vs[size_t(c)], Tensor(), Tensor(), 0.125, got[size_t(c)]);
    });
    for (size_t c = 0; c < cases.size(); ++c)
      for (int64_t i = 0; i < want[c].numel(); ++i)
        ASSERT_EQ(got[c].data<float>()[i], want[c].data<float>()[i]) << "case " << c << " value " << i;
  }
}

// f32 activations times f16/bf16 weights (the CPU's 16-bit weight path) equal the f32 product
// of the widened weights, for both layouts of b and several panel counts.
TEST(OpsReference, GemmWithSixteenBitWeights) {
  for (DType dt : {DType::F16, DType::BF16})
    for (bool tb : {true, false})
      for (auto [M, N, K] : {std::array<int64_t, 3>{5, 7, 3}, {33, 600, 40}, {1, 1000, 300}}) {
        Tensor a = rnd({M, K}, 21), b16 = rnd(tb ? Shape{N, K} : Shape{K, N}, 22).to(dt);
        Tensor b32 = b16.to(DType::F32), c16 = rnd({M, N}, 23), c32 = c16.clone();
        ops::gemm(a, false, b16, tb, c16, 0.5, 1.0);
        ops::gemm(a, false, b32, tb, c32, 0.5, 1.0);
        EXPECT_LT(max_abs_diff(c16, c32), 1e-4) << dtype_name(dt) << " tb " << tb << " " << M << "x" << N << "x" << K;
        // Batched a ([2, M, K]) against the same 2-D weight.
        Tensor a3 = rnd({2, M, K}, 24), y16 = Tensor::empty({2, M, N}), y32 = Tensor::empty({2, M, N});
        ops::gemm(a3, false, b16, tb, y16);
        ops::gemm(a3, false, b32, tb, y32);
        EXPECT_LT(max_abs_diff(y16, y32), 1e-4);
      }
  // A transposed a, or an f16 a, is refused with a message.
  Tensor w = rnd({4, 3}, 25).to(DType::F16), x = rnd({3, 2}, 26), y = Tensor::empty({2, 4});
  EXPECT_THROW(ops::gemm(x, true, w, true, y), Error);
}

TEST(OpsReference, LossesMatchFormulas) {
  Tensor z = Tensor::from_vector(std::vector<float>{1, 2, 3, 0, 0, 0}, {2, 3});
  Tensor t = Tensor::from_vector(std::vector<int32_t>{2, 0}, {2});
  Tensor loss = Tensor::empty({}), lse = Tensor::empty({2});
  ops::cross_entropy_forward(z, t, loss, lse);
  const double l0 = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0)) - 3.0, l1 = std::log(3.0);
  EXPECT_NEAR(loss.item(), (l0 + l1) / 2, 1e-6);
  Tensor bad = Tensor::from_vector(std::vector<int32_t>{3, 0}, {2});
  EXPECT_THROW(ops::cross_entropy_forward(z, bad, loss, lse), Error);
  // KL of a distribution with itself is 0; against uniform it is log V - H(P).
  Tensor kl = Tensor::empty({});
  ops::kl_div_forward(z, z, kl);
  EXPECT_NEAR(kl.item(), 0.0, 1e-7);
  Tensor u = Tensor::zeros({2, 3});
  ops::kl_div_forward(z.slice(0, 0, 1).contiguous(), u.slice(0, 0, 1).contiguous(), kl);
  double H = 0, Z = std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
  for (double a : {1.0, 2.0, 3.0}) H -= std::exp(a) / Z * std::log(std::exp(a) / Z);
  EXPECT_NEAR(kl.item(), std::log(3.0) - H, 1e-6);
}

TEST(OpsReference, EmbeddingRejectsOutOfRangeIds) {
  Tensor table = rnd({4, 2}, 1), out = Tensor::empty({2, 2});
  ops::embedding_forward(table, Tensor::from_vector(std::vector<int32_t>{3, 1}, {2}), out);
  EXPECT_EQ(out.item(0), table.item(6));
  EXPECT_THROW(ops::embedding_forward(table, Tensor::from_vector(std::vector<int32_t>{4, 1}, {2}), out), Error);
}

TEST(OpsReference, AdamWMatchesPyTorchFormula) {
  // One parameter, two steps, against the closed form of torch.optim.AdamW.
  Var p(Tensor::from_vector(std::vector<double>{1.0}, {1}), true);
  AdamW opt({p}, AdamWOptions{0.1, 0.9, 0.999, 1e-8, 0.01});
  double x = 1.0, m = 0, v = 0;
  for (int s = 1; s <= 2; ++s) {
    const double g = 2 * x;  // d/dx x^2
    p.grad() = Tensor::from_vector(std::vector<double>{g}, {1});
    opt.step();
    x *= 1 - 0.1 * 0.01;
    m = 0.9 * m + 0.1 * g;
    v = 0.999 * v + 0.001 * g * g;
    x -= 0.1 * (m / (1 - std::pow(0.9, s))) / (std::sqrt(v / (1 - std::pow(0.999, s))) + 1e-8);
    EXPECT_NEAR(p.value().item(), x, 1e-12);
  }
}

// The group update on the CPU is adamw_step per tensor; its checks name the bad entry.
TEST(OpsReference, AdamWMultiEqualsPerTensorAndChecksItsInputs) {
  std::vector<Tensor> p, g, m, v;
  for (int64_t n : {int64_t(3), int64_t(0), int64_t(70)}) {
    p.push_back(Tensor::randn({n}, uint64_t(n) + 1, 1.0, DType::F64));
    g.push_back(Tensor::randn({n}, uint64_t(n) + 2, 1.0, DType::F64));
    m.push_back(Tensor::zeros({n}, DType::F64));
    v.push_back(Tensor::zeros({n}, DType::F64));
  }
  std::vector<Tensor> p2, m2, v2;
  for (size_t k = 0; k < p.size(); ++k) p2.push_back(p[k].clone()), m2.push_back(m[k].clone()), v2.push_back(v[k].clone());
  std::vector<ops::AdamwParam> ps;
  for (size_t k = 0; k < p.size(); ++k) ps.push_back({&p[k], &g[k], &m[k], &v[k]});
  for (int64_t step = 1; step <= 2; ++step) {
    ops::adamw_step_multi(ps, 1e-2, 0.9, 0.999, 1e-8, 0.1, step);
    for (size_t k = 0; k < p.size(); ++k) ops::adamw_step(p2[k], g[k], m2[k], v2[k], 1e-2, 0.9, 0.999, 1e-8, 0.1, step);
  }
  for (size_t k = 0; k < p.size(); ++k) {
    EXPECT_EQ(max_abs_diff(p[k], p2[k]), 0.0) << k;
    EXPECT_EQ(max_abs_diff(v[k], v2[k]), 0.0) << k;
  }
  Tensor wrong = Tensor::zeros({4}, DType::F64);
  std::vector<ops::AdamwParam> bad{{&p[0], &wrong, &m[0], &v[0]}};
  EXPECT_THROW(ops::adamw_step_multi(bad, 1e-2, 0.9, 0.999, 1e-8, 0.1, 1), Error);
  bad = {{&p[0], nullptr, &m[0], &v[0]}};
  EXPECT_THROW(ops::adamw_step_multi(bad, 1e-2, 0.9, 0.999, 1e-8, 0.1, 1), Error);
  EXPECT_THROW(ops::adamw_step_multi(ps, 1e-2, 0.9, 0.999, 1e-8, 0.1, 0), Error);
  ops::adamw_step_multi({}, 1e-2, 0.9, 0.999, 1e-8, 0.1, 1);  // nothing to do
}

// Several groups in one call: on the CPU each tensor is adamw_step with its own group's
// hyper-parameters and step count; AdamW::step_all equals stepping each optimizer alone.
TEST(OpsReference, AdamWGroupsEqualPerTensorWithEachGroupsHyperParameters) {
  const ops::AdamwHyper h1{1e-2, 0.9, 0.999, 1e-8, 0.1, 3}, h2{5e-4, 0.8, 0.99, 1e-6, 0.0, 1};
  std::vector<Tensor> p, g, m, v, p2, m2, v2;
  for (int64_t n : {int64_t(5), int64_t(0), int64_t(40), int64_t(9)}) {
    p.push_back(Tensor::randn({n}, uint64_t(n) + 11, 1.0, DType::F64));
    g.push_back(Tensor::randn({n}, uint64_t(n) + 12, 1.0, DType::F64));
    m.push_back(Tensor::randn({n}, uint64_t(n) + 13, 0.1, DType::F64));
    v.push_back(Tensor::full({n}, 0.01, DType::F64));
  }
  for (size_t k = 0; k < p.size(); ++k) p2.push_back(p[k].clone()), m2.push_back(m[k].clone()), v2.push_back(v[k].clone());
  std::vector<ops::AdamwGroupStep> gs(2);
  gs[0].hyper = h1, gs[1].hyper = h2;
  for (size_t k = 0; k < p.size(); ++k) gs[k % 2].params.push_back({&p[k], &g[k], &m[k], &v[k]});
  ops::adamw_step_groups(gs);
  for (size_t k = 0; k < p.size(); ++k) {
    const ops::AdamwHyper& h = k % 2 ? h2 : h1;
    ops::adamw_step(p2[k], g[k], m2[k], v2[k], h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.step);
    EXPECT_EQ(max_abs_diff(p[k], p2[k]), 0.0) << k;
    EXPECT_EQ(max_abs_diff(m[k], m2[k]), 0.0) << k;
    EXPECT_EQ(max_abs_diff(v[k], v2[k]), 0.0) << k;
  }
  gs[1].hyper.step = 0;
  EXPECT_THROW(ops::adamw_step_groups(gs), Error);
  ops::adamw_step_groups({});  // nothing to do

  // AdamW::step_all: two optimizers (different lr, one stepped twice before) = each stepped alone.
  auto make = [](uint64_t seed) {
    return std::vector<Var>{Var(Tensor::randn({6}, seed, 1.0, DType::F64), true), Var(Tensor::randn({3, 2}, seed + 1, 1.0, DType::F64), true)};
  };
  std::vector<Var> a = make(1), b = make(3), a2 = make(1), b2 = make(3);
  AdamW oa(a, AdamWOptions{1e-2, 0.9, 0.999, 1e-8, 0.1}), ob(b, AdamWOptions{5e-4, 0.9, 0.999, 1e-8, 0.0});
  AdamW oa2(a2, AdamWOptions{1e-2, 0.9, 0.999, 1e-8, 0.1}), ob2(b2, AdamWOptions{5e-4, 0.9, 0.999, 1e-8, 0.0});
  auto set_grads = [](std::vector<Var>& ps, uint64_t seed) {
    for (auto& q : ps) q.grad() = Tensor::randn(q.shape(), seed++, 1.0, DType::F64);
  };
  for (int s = 0; s < 3; ++s) {
    set_grads(a, 100 + s), set_grads(a2, 100 + s);
    oa.step(), oa2.step();
  }
  for (int s = 0; s < 2; ++s) {
    set_grads(a, 200 + s), set_grads(a2, 200 + s), set_grads(b, 300 + s), set_grads(b2, 300 + s);
    AdamW::step_all({&oa, &ob}, 0.5);
    oa2.step(0.5), ob2.step(0.5);
  }
  EXPECT_EQ(oa.steps(), 5);
  EXPECT_EQ(ob.steps(), 2);
  for (size_t k = 0; k < a.size(); ++k) {
    EXPECT_EQ(max_abs_diff(a[k].value(), a2[k].value()), 0.0) << k;
    EXPECT_EQ(max_abs_diff(b[k].value(), b2[k].value()), 0.0) << k;
  }
}

TEST(OpsReference, ClipGradNorm) {
  Var a(Tensor::from_vector(std::vector<double>{3.0}, {1}), true), b(Tensor::from_vector(std::vector<double>{4.0}, {1}), true);
  a.grad() = a.value().clone();
  b.grad() = b.value().clone();
  EXPECT_NEAR(clip_grad_norm({a, b}, 1.0), 5.0, 1e-12);
  EXPECT_NEAR(a.grad().item(), 0.6, 1e-6);
  EXPECT_NEAR(b.grad().item(), 0.8, 1e-6);
}
