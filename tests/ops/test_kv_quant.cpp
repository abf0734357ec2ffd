// The KIVI codec of the packed KV cache (ops/kv_quant.h): codes, scales and zero points follow the
// documented formula (checked against an independent f64 reference per group), the bit packing is
// little-endian within a byte, decode(encode(x)) equals kivi_fake_quant exactly and stays within
// half a step of x, and kivi_fake_quant agrees with fake_quant's asymmetric mode up to the f32
// rounding of the scale. kivi_attention_forward over a packed cache (packed prefix + f16 ring)
// equals kv_attention_forward over the same keys/values decoded to f32. Bad arguments throw.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "lowbit/core/format_traits.h"
#include "lowbit/ops/kv_quant.h"
#include "lowbit/ops/ops.h"

using namespace lowbit;

namespace {
Tensor rnd(const Shape& s, uint64_t seed, double scale = 1.0) {
  Tensor t = Tensor::randn(s, seed);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = float(p[i] * scale);
  return t;
}

// The documented codec for one group, in f64 with the f32 scale: (scale, zero, codes).
struct RefGroup {
  float s;
  int z;
  std::vector<int> codes;
};
RefGroup ref_group(const std::vector<float>& x, int bits) {
  const int qmax = (1 << bits) - 1;
  double lo = 0, hi = 0;
  for (float v : x) lo = std::min(lo, double(v)), hi = std::max(hi, double(v));
  RefGroup g{float((hi - lo) / qmax), 0, {}};
  if (g.s > 0) g.z = int(std::clamp(std::nearbyint(-lo / double(g.s)), 0.0, double(qmax)));
  for (float v : x) {
    const int c = g.s > 0 ? int(std::clamp(std::nearbyint(double(v) / double(g.s)) + g.z, 0.0, double(qmax))) : 0;
    g.codes.push_back(c);
  }
  return g;
}
}  // namespace

TEST(KiviCodec, MatchesTheFormulaAndRoundTrips) {
  for (int bits : {2, 4, 8})
    for (bool per_column : {false, true}) {
      const int64_t M = 24, N = 32, group = per_column ? 8 : 16;
      Tensor x = rnd({M, N}, 7 + uint64_t(bits));
      x.data<float>()[5] = 40.0f;  // an outlier
      for (int64_t c = 0; c < N; ++c) x.data<float>()[2 * N + c] = 0.0f;  // an all-zero row
      const Shape ps = per_column ? Shape{M / group, N} : Shape{M, N / group};
      Tensor codes = Tensor::empty({M, N * bits / 8}, DType::U8), scale = Tensor::empty(ps),
             zero = Tensor::empty(ps, DType::U8);
      ops::kivi_quantize(x, bits, group, per_column, codes, scale, zero);
      Tensor y = Tensor::empty({M, N}), fq = Tensor::empty({M, N}), fq_ref = Tensor::empty({M, N});
      ops::kivi_dequantize(codes, scale, zero, bits, group, per_column, y);
      ops::kivi_fake_quant(x, bits, group, per_column, fq);
      ops::fake_quant(x, bits, true, 1.0, group, per_column, fq_ref);
      const int64_t lines = per_column ? N : M, per_line = (per_column ? M : N) / group;
      for (int64_t l = 0; l < lines; ++l)
        for (int64_t g = 0; g < per_line; ++g) {
          std::vector<float> xs;
          std::vector<int64_t> at;
          for (int64_t k = 0; k < group; ++k) {
            const int64_t r = per_column ? g * group + k : l, c = per_column ? l : g * group + k;
            xs.push_back(x.data<float>()[r * N + c]);
            at.push_back(r * N + c);
          }
          const RefGroup ref = ref_group(xs, bits);
          const int64_t slot = per_column ? g * N + l : l * per_line + g;
          ASSERT_EQ(scale.data<float>()[slot], ref.s);
          ASSERT_EQ(int(zero.data<uint8_t>()[slot]), ref.z);
          for (int64_t k = 0; k < group; ++k) {
            const int64_t i = at[size_t(k)], r = i / N, c = i % N;
            ASSERT_EQ(int(unpack_code(bits, codes.data<uint8_t>() + r * (N * bits / 8), c)), ref.codes[size_t(k)]);
            const float want = float(ref.codes[size_t(k)] - ref.z) * ref.s;
            ASSERT_EQ(y.data<float>()[i], want);
            ASSERT_EQ(fq.data<float>()[i], want);
            EXPECT_LE(std::abs(double(want) - xs[size_t(k)]), 0.5 * ref.s * (1 + 1e-6));
            // fake_quant keeps the scale in f64: the two differ only by that rounding.
            EXPECT_NEAR(fq_ref.data<float>()[i], want, 1e-6 * (std::abs(want) + ref.s));
          }
        }
    }
  // Bit layout: little-endian within a byte.
  Tensor x = Tensor::from_vector(std::vector<float>{0, 1, 2, 3, 4, 5, 6, 15}, {1, 8});
  Tensor codes = Tensor::empty({1, 4}, DType::U8), scale = Tensor::empty({1, 1}), zero = Tensor::empty({1, 1}, DType::U8);
  ops::kivi_quantize(x, 4, 8, false, codes, scale, zero);  // range [0, 15]: scale 1, zero 0, code = x
  EXPECT_EQ(scale.data<float>()[0], 1.0f);
  EXPECT_EQ(codes.data<uint8_t>()[0], 0x10);
  EXPECT_EQ(codes.data<uint8_t>()[1], 0x32);
  EXPECT_EQ(codes.data<uint8_t>()[3], 0xF6);
}

TEST(KiviCodec, RejectsBadArguments) {
  Tensor x = rnd({8, 16}, 1);
  Tensor codes = Tensor::empty({8, 8}, DType::U8), scale = Tensor::empty({8, 2}), zero = Tensor::empty({8, 2}, DType::U8);
  EXPECT_NO_THROW(ops::kivi_quantize(x, 4, 8, false, codes, scale, zero));
  EXPECT_THROW(ops::kivi_quantize(x, 3, 8, false, codes, scale, zero), Error);   // 3 bits
  EXPECT_THROW(ops::kivi_quantize(x, 4, 5, false, codes, scale, zero), Error);   // group does not divide
  EXPECT_THROW(ops::kivi_quantize(x, 2, 8, false, codes, scale, zero), Error);   // codes shape for 4 bits
  Tensor bad_scale = Tensor::empty({8, 3});
  EXPECT_THROW(ops::kivi_quantize(x, 4, 8, false, codes, bad_scale, zero), Error);
  Tensor f16 = Tensor::empty({8, 16}, DType::F16);
  EXPECT_THROW(ops::kivi_quantize(f16, 4, 8, false, codes, scale, zero), Error);
  Tensor y = Tensor::empty({8, 16});
  EXPECT_THROW(ops::kivi_dequantize(codes, scale, zero, 4, 8, true, y), Error);  // scale shape of row groups
  Tensor odd = rnd({2, 3}, 2), oc = Tensor::empty({2, 0}, DType::U8);
  EXPECT_THROW(ops::kivi_quantize(odd, 2, 3, false, oc, scale, zero), Error);  // 3 values of 2 bits: not whole bytes
}

// A packed layer of Tk tokens: [0, Q) quantized (keys per channel in groups of G tokens, values per
// token in groups of VG channels), [Q, Tk) in an f16 ring of R slots (token t in slot t % R).
TEST(KiviAttention, EqualsAttentionOverTheDecodedCache) {
  const int64_t H = 6, KVH = 2, hd = 16, G = 8, VG = 8, C = KVH * hd;
  for (int bits : {4, 2})
    for (auto [Tq, Tk, Q] : {std::array<int64_t, 3>{1, 45, 32}, {1, 5, 0}, {20, 40, 40}, {70, 90, 72}}) {
      const int64_t cap = 96, R = std::max<int64_t>(1, Tk - Q + 3);
      Tensor k = rnd({Tk, KVH, hd}, 31, 2.0), v = rnd({Tk, KVH, hd}, 32), q = rnd({Tq, H, hd}, 33);
      ops::KiviView kv;
      kv.bits = bits;
      kv.length = Tk;
      kv.quantized = Q;
      kv.group = G;
      kv.vgroup = VG;
      kv.ring = R;
      kv.k_codes = Tensor::zeros({cap, KVH, hd * bits / 8}, DType::U8);
      kv.v_codes = Tensor::zeros({cap, KVH, hd * bits / 8}, DType::U8);
      kv.k_scale = Tensor::zeros({cap / G, KVH, hd});
      kv.k_zero = Tensor::zeros({cap / G, KVH, hd}, DType::U8);
      kv.v_scale = Tensor::zeros({cap, KVH, hd / VG});
      kv.v_zero = Tensor::zeros({cap, KVH, hd / VG}, DType::U8);
      kv.k_res = Tensor::zeros({R, KVH, hd}, DType::F16);
      kv.v_res = Tensor::zeros({R, KVH, hd}, DType::F16);
      // The reference cache in f32: the decoded prefix, then the f16-rounded ring.
      Tensor kd = Tensor::empty({Tk, KVH, hd}), vd = Tensor::empty({Tk, KVH, hd});
      if (Q > 0) {
        const int64_t rb = C * bits / 8;
        Tensor kq = k.slice(0, 0, Q).contiguous().view({Q, C}), vq = v.slice(0, 0, Q).contiguous().view({Q, C});
        Tensor kc = kv.k_codes.view({cap, rb}).slice(0, 0, Q), vc = kv.v_codes.view({cap, rb}).slice(0, 0, Q);
        Tensor ks = kv.k_scale.view({cap / G, C}).slice(0, 0, Q / G), kz = kv.k_zero.view({cap / G, C}).slice(0, 0, Q / G);
        Tensor vs = kv.v_scale.view({cap, C / VG}).slice(0, 0, Q), vz = kv.v_zero.view({cap, C / VG}).slice(0, 0, Q);
        ops::kivi_quantize(kq, bits, G, true, kc, ks, kz);
        ops::kivi_quantize(vq, bits, VG, false, vc, vs, vz);
        Tensor a = kd.slice(0, 0, Q).view({Q, C}), b = vd.slice(0, 0, Q).view({Q, C});
        ops::kivi_fake_quant(kq, bits, G, true, a);
        ops::kivi_fake_quant(vq, bits, VG, false, b);
      }
      for (int64_t t = Q; t < Tk; ++t)
        for (int64_t e = 0; e < C; ++e) {
          const uint16_t hk = f32_to_f16(k.data<float>()[t * C + e]), hv = f32_to_f16(v.data<float>()[t * C + e]);
          static_cast<uint16_t*>(kv.k_res.raw_data())[(t % R) * C + e] = hk;
          static_cast<uint16_t*>(kv.v_res.raw_data())[(t % R) * C + e] = hv;
          kd.data<float>()[t * C + e] = f16_to_f32(hk);
          vd.data<float>()[t * C + e] = f16_to_f32(hv);
        }
      Tensor got = Tensor::empty({Tq, H, hd}), want = Tensor::empty({Tq, H, hd});
      const double sc = 1 / std::sqrt(double(hd));
      ops::kivi_attention_forward(q, kv, sc, got);
      ops::kv_attention_forward(q, kd, vd, Tensor(), Tensor(), sc, want);
      double worst = 0;
      for (int64_t i = 0; i < got.numel(); ++i) worst = std::max(worst, std::abs(got.item(i) - want.item(i)));
      EXPECT_LE(worst, 1e-6) << bits << " bits, Tq " << Tq << " Tk " << Tk << " Q " << Q;
      // An inconsistent state is an error, not a read past the buffers.
      ops::KiviView bad = kv;
      bad.quantized = Q + 1;
      EXPECT_THROW(ops::kivi_attention_forward(q, bad, sc, got), Error);
      bad = kv;
      bad.length = cap + 1;
      EXPECT_THROW(ops::kivi_attention_forward(q, bad, sc, got), Error);
      bad = kv;
      bad.ring = R - 3 - 1;  // the unquantized tokens do not fit
      if (Tk - Q > bad.ring) {
        EXPECT_THROW(ops::kivi_attention_forward(q, bad, sc, got), Error);
      }
      bad = kv;
      bad.k_scale = Tensor::zeros({1, KVH, hd});
      EXPECT_THROW(ops::kivi_attention_forward(q, bad, sc, got), Error);
    }
}
