// The packed KIVI KV cache (KVCacheType::Int4 / Int2, issue 16) against the simulated KV
// quantization (ModelTransforms::kv with an f16 cache): on small random models, plain and
// Hadamard-rotated, the logits are bit-for-bit equal for each chunking of the sequence (token by
// token, chunks that straddle group boundaries, the whole sequence at once; the same chunking on
// both sides), for a group that
// divides head_dim and one that does not (values then per head), with and without a window;
// forward_batch over packed caches equals one sequence at a time; the cache holds less memory
// than f16 (int2 less than int4); bad layouts are errors.
#include <gtest/gtest.h>

#include <cmath>

#include "common/small_model.h"
#include "lowbit/autograd/functions.h"
#include "lowbit/model/rotation.h"

using namespace lowbit;

using test::cached_logits;

namespace {
// A KIVI spec (bits, group, window); the CQ fields stay empty.
KVQuantSpec kivi_spec(int bits, int64_t group, int64_t window) {
  KVQuantSpec s;
  s.bits = bits;
  s.group = group;
  s.window = window;
  return s;
}
Tensor tokens_of(int64_t T, int V, int seed = 1) {
  std::vector<int32_t> v;
  for (int64_t i = 0; i < T; ++i) v.push_back(int32_t((i * 7 + seed * 13 + 3) % V));
  return Tensor::from_vector(v, {T});
}
double max_diff(const Tensor& a, const Tensor& b) {
  double d = 0;
  for (int64_t i = 0; i < a.numel(); ++i) d = std::max(d, std::abs(a.item(i) - b.item(i)));
  return d;
}
}  // namespace

TEST(PackedKvCache, EqualsSimulatedQuantizationBitForBit) {
  LlamaConfig c = test::small_config(RopeStyle::Half);  // head_dim 16, 2 kv heads of 4 heads
  c.max_seq_len = 64;
  const LlamaWeights w = random_weights(c, 21, 0.15);
  const int64_t T = 45;
  const Tensor tok = tokens_of(T, c.vocab_size);
  for (bool rotated : {false, true}) {
    LlamaConfig rc = c;
    LlamaWeights rw = w;
    ModelTransforms t;
    if (rotated) t = rotate_weights(rc, rw, 3);
    LlamaModel sim(rc, rw), packed(rc, rw);
    packed.set_transforms(t);
    const Tensor fp = cached_logits(packed, tok, T, KVCacheType::F16);
    for (int bits : {4, 2})
      for (auto [group, window] : {std::array<int64_t, 2>{8, 5}, {6, 0}, {4, 12}}) {
        ModelTransforms q = t;
        q.kv = kivi_spec(bits, group, window);
        sim.set_transforms(q);
        packed.set_kv_cache_layout(group, window);
        const KVCacheType type = bits == 4 ? KVCacheType::Int4 : KVCacheType::Int2;
        const Tensor whole = cached_logits(sim, tok, T, KVCacheType::F16);
        EXPECT_GT(max_diff(whole, fp), 1e-5) << "the quantization changes the logits";
        for (int64_t chunk : {int64_t(1), int64_t(7), T}) {
          // The same chunking on both sides (chunkings differ among themselves by float rounding
          // of other matrix shapes, amplified where it flips a code).
          const Tensor want = chunk == T ? whole : cached_logits(sim, tok, chunk, KVCacheType::F16);
          EXPECT_EQ(max_diff(cached_logits(packed, tok, chunk, type), want), 0.0)
              << (rotated ? "rotated " : "") << bits << " bits, group " << group << ", window " << window << ", chunk "
              << chunk;
          EXPECT_LE(max_diff(want, whole), 1e-3);
        }
        // A packed cache on a model that also records the simulation: the cache quantizes (once).
        EXPECT_EQ(max_diff(cached_logits(sim, tok, T, type), whole), 0.0);
      }
  }
}

TEST(PackedKvCache, BatchedDecodingAndMemory) {
  LlamaConfig c = test::small_config(RopeStyle::Interleaved);
  c.max_seq_len = 64;
  LlamaModel m(c, random_weights(c, 5, 0.15));
  m.set_kv_cache_layout(4, 3);
  NoGradGuard ng;
  for (KVCacheType type : {KVCacheType::Int4, KVCacheType::Int2}) {
    // Two sequences of different lengths decoded together equal each alone.
    const Tensor a = tokens_of(11, c.vocab_size, 1), b = tokens_of(4, c.vocab_size, 2);
    KVCache ca = m.make_cache(40, type), cb = m.make_cache(40, type), sa = m.make_cache(40, type), sb = m.make_cache(40, type);
    m.forward_cached(a, ca);
    m.forward_cached(a, sa);
    m.forward_cached(b, cb);
    m.forward_cached(b, sb);
    for (int step = 0; step < 12; ++step) {
      const int32_t ta = (step * 3 + 1) % c.vocab_size, tb = (step * 5 + 2) % c.vocab_size;
      const Tensor both = m.forward_batch(Tensor::from_vector(std::vector<int32_t>{ta, tb}, {2}), {&ca, &cb}).value();
      const Tensor one = m.forward_cached(Tensor::from_vector(std::vector<int32_t>{ta}, {1}), sa).value();
      const Tensor two = m.forward_cached(Tensor::from_vector(std::vector<int32_t>{tb}, {1}), sb).value();
      EXPECT_LE(max_diff(both.slice(0, 0, 1).contiguous(), one), 1e-5) << kv_cache_type_name(type) << " step " << step;
      EXPECT_LE(max_diff(both.slice(0, 1, 2).contiguous(), two), 1e-5) << kv_cache_type_name(type) << " step " << step;
    }
  }
  // Memory: per token, int4 codes + scales are below f16's 4 bytes per key/value pair, int2 below int4.
  const int64_t n = 4096;
  m.set_kv_cache_layout(16, 3);  // one value group per head, key scales shared by 16 tokens
  const int64_t f16 = m.make_cache(n, KVCacheType::F16).bytes(), i4 = m.make_cache(n, KVCacheType::Int4).bytes(),
                i2 = m.make_cache(n, KVCacheType::Int2).bytes();
  EXPECT_LT(i4, f16 * 6 / 10);
  EXPECT_LT(i2, i4);
  EXPECT_STREQ(kv_cache_type_name(parse_kv_cache_type("int2")), "int2");
  EXPECT_THROW(parse_kv_cache_type("int3"), Error);
  EXPECT_THROW(m.set_kv_cache_layout(0, 3), Error);
  EXPECT_THROW(m.set_kv_cache_layout(8, -1), Error);
  // A head_dim whose codes are not whole bytes.
  LlamaConfig odd = c;
  odd.dim = 24;
  odd.n_heads = 4;
  odd.n_kv_heads = 2;  // head_dim 6: int4 fits (3 bytes), int2 does not
  LlamaModel mo(odd, random_weights(odd, 6, 0.1));
  EXPECT_NO_THROW(mo.make_cache(8, KVCacheType::Int4));
  EXPECT_THROW(mo.make_cache(8, KVCacheType::Int2), Error);
}
