// Attention over a KV cache stored as f32, f16 or int8 (inference; ops.h, "KV-cache attention"), or
// packed KIVI int4/int2 codes (ops/kv_quant.h: kivi_attention_forward, same tiles and products; an
// item decodes the packed rows and the full-precision ring into its per-thread buffer).
//
// Storage: f16 keeps each value as IEEE half (round to nearest even); q8 keeps one int8 code per
// value and one f32 scale per (token, kv head) row of head_dim values: scale = max|x| / 127,
// code = round(x / scale), value = code * scale (absmax symmetric, as ggml's Q8_0 but over a
// whole head row instead of 32 values).
//
// CPU body: work items are (kv head, tile of up to 64 query rows). An item widens the keys and
// values it may see (rows 0 .. the tile's last position, one kv head) into a per-thread f32
// buffer, once for all the query heads that share the kv head (an f16 cache inside a pool task:
// all kv heads at once, before the items), then runs the same BLAS products and softmax
// as ops::attention_forward on them. So no f32 copy of the cache exists: each step
// reads the cache in its own type, one kv head's rows at a time. f32 caches are read in place.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "lowbit/core/blas.h"
#include "lowbit/core/format_traits.h"
#include "lowbit/core/threads.h"
#include "lowbit/core/vecmath.h"
#include "lowbit/ops/dispatch.h"
#include "lowbit/ops/kv_quant.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LB_KV_X86 1
#else
#define LB_KV_X86 0
#endif

namespace lowbit::ops {

namespace {
bool is_cache_dtype(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::I8; }

// Rows [0, n) of one kv head (row stride ld elements) widened to f32 rows of hd values.
void widen_rows(const Tensor& t, const float* scale, int64_t kh, int64_t KVH, int64_t hd, int64_t n, float* dst) {
  const int64_t ld = KVH * hd;
  if (t.dtype() == DType::F16) {
    const auto* p = static_cast<const uint16_t*>(t.raw_data()) + kh * hd;
    if (hd == ld) vec::f16_to_f32(p, dst, n * hd);
    else vec::f16_rows_to_f32(p, ld, dst, n, hd);
    return;
  }
  const auto* p = static_cast<const int8_t*>(t.raw_data()) + kh * hd;
  for (int64_t j = 0; j < n; ++j) {
    const int8_t* src = p + j * ld;
    const float s = scale[j * KVH + kh];
    float* d = dst + j * hd;
    for (int64_t c = 0; c < hd; ++c) d[c] = float(src[c]) * s;
  }
}

// Query rows per work item of attend_tiles.
inline int64_t query_tile(int64_t Tk) { return Tk <= 4096 ? 64 : 16; }

inline float softmax_row(float* s, int64_t n) {
  const float mx = vec::max(s, n);
  const float sum = vec::exp_shift_sum(s, n, mx);
  vec::scale(s, n, 1.0f / sum);
  return mx + std::log(sum);
}
// The tiled attention both cache kinds share: work items (kv head, tile of query rows); `rows_of`
// (kh, kn, Kw, Vw, K, V, ld) points K/V at the f32 keys/values of rows 0 .. kn-1 of kv head kh (row
// stride ld), widening them into the per-thread buffers Kw/Vw when the cache is not f32.
template <class RowsOf>
void attend_tiles(const float* qp, float* op_, int64_t Tq, int64_t H, int64_t hd, int64_t Tk, int64_t KVH,
                  double scale, RowsOf&& rows_of) {
  const int64_t group = H / KVH, off = Tk - Tq, ldq = H * hd;
  const int64_t Bq = query_tile(Tk), tiles = (Tq + Bq - 1) / Bq;
  parallel_each(KVH * tiles, [&](int64_t item) {
    const int64_t qt = tiles - 1 - item / KVH, kh = item % KVH;  // longest tiles first
    const int64_t i0 = qt * Bq, i1 = std::min(Tq, i0 + Bq), rows = i1 - i0, kn = off + i1;
    thread_local std::vector<float> S, Kw, Vw;
    const float *K, *V;
    int64_t ld;
    rows_of(kh, kn, Kw, Vw, K, V, ld);
    if (rows == 1) {
      // One query row (decode): the group's heads are adjacent in q, so one product serves them all.
      if (S.size() < size_t(group * kn)) S.resize(size_t(group * kn));
      const float* Q = qp + (i0 * H + kh * group) * hd;
      float* O = op_ + (i0 * H + kh * group) * hd;
      blas::gemm(false, true, group, kn, hd, float(scale), Q, hd, K, ld, 0.0f, S.data(), kn);
      for (int64_t g = 0; g < group; ++g) softmax_row(S.data() + g * kn, kn);
      blas::gemm(false, false, group, hd, kn, 1.0f, S.data(), kn, V, ld, 0.0f, O, hd);
      return;
    }
    if (S.size() < size_t(rows * kn)) S.resize(size_t(rows * kn));
    for (int64_t h = kh * group; h < (kh + 1) * group; ++h) {
      const float* Q = qp + (i0 * H + h) * hd;
      float* O = op_ + (i0 * H + h) * hd;
      blas::gemm(false, true, rows, kn, hd, float(scale), Q, ldq, K, ld, 0.0f, S.data(), kn);
      for (int64_t r = 0; r < rows; ++r) {
        float* s = S.data() + r * kn;
        const int64_t valid = off + i0 + r + 1;
        softmax_row(s, valid);
        for (int64_t j = valid; j < kn; ++j) s[j] = 0;
      }
      blas::gemm(false, false, rows, hd, kn, 1.0f, S.data(), kn, V, ld, 0.0f, O, ldq);
    }
  });
}

// ---- decode rows over an f16 cache, read in place (kv_decode_attention_f16) ----------------------
// Whether one-row attention over an f16 cache reads the f16 keys/values in place (the fused
// kernel below) or widens them and runs the BLAS products: LOWBIT_KV_DIRECT=0 / 1, else on where
// the CPU has AVX-512 and head_dim is a multiple of 16; set_kv_direct overrides (tests, benches).
std::atomic<int> g_kv_direct{-1};
bool kv_direct_enabled() {
  int v = g_kv_direct.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* e = std::getenv("LOWBIT_KV_DIRECT");
    v = e && e[0] == '0' ? 0 : 1;
    g_kv_direct.store(v, std::memory_order_relaxed);
  }
  return v == 1;
}

#if LB_KV_X86
// The sum of a vector's 16 lanes: halves, 128-bit quarters, pairs, lanes (permutes within the
// register; the maskz forms: GCC 12's plain ones and _mm512_reduce_add_ps trip
// -Wmaybe-uninitialized on their undefined operand).
__attribute__((target("avx512f"))) inline float hsum512(__m512 v) {
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(0xffff, v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(0xffff, v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(0xffff, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_add_ps(v, _mm512_maskz_permute_ps(0xffff, v, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_cvtss_f32(v);
}
// The scores of NG query heads (rows of hd floats at q, stride hd) against one key (hd f16 at kr):
// s[g * lds] = scale * sum_c q[g][c] kr[c]. Per head the 16 lanes accumulate chunk after chunk
// (fma), then one horizontal sum.
template <int NG>
__attribute__((target("avx512f,f16c,fma"))) inline void f16_score(const float* q, int64_t hd, const uint16_t* kr,
                                                                   float scale, float* s, int64_t lds) {
  __m512 acc[NG];
  for (int g = 0; g < NG; ++g) acc[g] = _mm512_setzero_ps();
  for (int64_t c = 0; c < hd; c += 16) {
    const __m512 kv = _mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kr + c)));
    for (int g = 0; g < NG; ++g) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * hd + c), kv, acc[g]);
  }
  for (int g = 0; g < NG; ++g) s[g * lds] = scale * hsum512(acc[g]);
}
// Scores of kv heads [kh0, kh1) (their query heads) for keys 0 .. n-1: S[h * n + j]. Row by row,
// the rows' spans of these heads read in order; the key rows kAhead on and each value row (read
// next by f16_weighted) are requested ahead (the cache comes from memory: a step's weights have
// evicted it).
constexpr int64_t kAhead = 8;
__attribute__((target("avx512f,f16c,fma"))) void f16_scores(const float* q, const uint16_t* k, const uint16_t* v,
                                                              int64_t n, int64_t group, int64_t KVH, int64_t hd,
                                                              int64_t kh0, int64_t kh1, float scale, float* S) {
  const int64_t ld = KVH * hd, span = (kh1 - kh0) * hd;
  for (int64_t j = 0; j < std::min(n, kAhead); ++j)
    for (int64_t c = 0; c < span; c += 32)
      _mm_prefetch(reinterpret_cast<const char*>(k + j * ld + kh0 * hd + c), _MM_HINT_T0);
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* kr = k + j * ld + kh0 * hd;
    for (int64_t c = 0; c < span; c += 32) {
      if (j + kAhead < n) _mm_prefetch(reinterpret_cast<const char*>(kr + kAhead * ld + c), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(v + j * ld + kh0 * hd + c), _MM_HINT_T0);
    }
    for (int64_t kh = kh0; kh < kh1; ++kh)
      for (int64_t g0 = 0; g0 < group; g0 += 4) {
        const int64_t h = kh * group + g0;
        const float* Q = q + h * hd;
        const uint16_t* K = kr + (kh - kh0) * hd;
        float* s = S + h * n + j;
        switch (std::min<int64_t>(4, group - g0)) {
          case 1: f16_score<1>(Q, hd, K, scale, s, n); break;
          case 2: f16_score<2>(Q, hd, K, scale, s, n); break;
          case 3: f16_score<3>(Q, hd, K, scale, s, n); break;
          default: f16_score<4>(Q, hd, K, scale, s, n); break;
        }
      }
  }
}
// o[g][c] = sum_j p[g * ldp + j] v[j][c] for NG heads (f16 value rows of hd at v + j * ldv),
// 16 channels at a time, keys in order.
template <int NG>
__attribute__((target("avx512f,f16c,fma"))) void f16_weighted(const float* p, int64_t ldp, const uint16_t* v,
                                                                int64_t ldv, int64_t n, int64_t hd, float* o) {
  for (int64_t c = 0; c < hd; c += 16) {
    __m512 acc[NG];
    for (int g = 0; g < NG; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const __m512 vv =
          _mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + j * ldv + c)));
      for (int g = 0; g < NG; ++g) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * ldp + j]), vv, acc[g]);
    }
    for (int g = 0; g < NG; ++g) _mm512_storeu_ps(o + g * hd + c, acc[g]);
  }
}
bool kv_direct_cpu() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c") &&
                         __builtin_cpu_supports("fma");
  return ok;
}
#endif

// Whether kv_attention_forward runs one query row over an f16 cache with head_dim hd through the
// fused kernel.
bool kv_direct_for(int64_t hd) {
#if LB_KV_X86
  return hd % 16 == 0 && hd > 0 && kv_direct_cpu() && kv_direct_enabled();
#else
  (void)hd;
  return false;
#endif
}

// Kv heads [kh0, kh1) of a decode row (kv_direct_for(hd) holds): scores of their query heads,
// softmax_row, weighted values in blocks of up to 4 heads, written to out.
void decode_heads_f16(const float* q, const uint16_t* k, const uint16_t* v, int64_t Tk, int64_t H, int64_t KVH,
                      int64_t hd, float scale, float* out, int64_t kh0, int64_t kh1) {
#if LB_KV_X86
  const int64_t group = H / KVH, ld = KVH * hd;
  thread_local std::vector<float> S;
  if (S.size() < size_t(H * Tk)) S.resize(size_t(H * Tk));
  f16_scores(q, k, v, Tk, group, KVH, hd, kh0, kh1, scale, S.data());
  for (int64_t h = kh0 * group; h < kh1 * group; ++h) softmax_row(S.data() + h * Tk, Tk);
  for (int64_t kh = kh0; kh < kh1; ++kh)
    for (int64_t g0 = 0; g0 < group; g0 += 4) {
      const int64_t h = kh * group + g0;
      const float* s = S.data() + h * Tk;
      const uint16_t* V = v + kh * hd;
      float* O = out + h * hd;
      switch (std::min<int64_t>(4, group - g0)) {
        case 1: f16_weighted<1>(s, Tk, V, ld, Tk, hd, O); break;
        case 2: f16_weighted<2>(s, Tk, V, ld, Tk, hd, O); break;
        case 3: f16_weighted<3>(s, Tk, V, ld, Tk, hd, O); break;
        default: f16_weighted<4>(s, Tk, V, ld, Tk, hd, O); break;
      }
    }
#else
  (void)q, (void)k, (void)v, (void)Tk, (void)H, (void)KVH, (void)hd, (void)scale, (void)out, (void)kh0, (void)kh1;
#endif
}
}  // namespace

bool set_kv_direct(bool on) {
  const bool was = kv_direct_enabled();
  g_kv_direct.store(on ? 1 : 0, std::memory_order_relaxed);
  return was;
}

bool kv_decode_attention_f16(const float* q, const uint16_t* k, const uint16_t* v, int64_t Tk, int64_t H, int64_t KVH,
                             int64_t hd, double scale, float* out) {
  if (!kv_direct_for(hd) || Tk < 1 || KVH < 1 || H % KVH != 0) return false;
  // Serially (a batched step's pool task): all kv heads in one pass over the rows. Outside a
  // parallel region: one kv head per pool task. The same products either way.
  if (KVH == 1 || in_parallel_region() || num_threads() < 2)
    decode_heads_f16(q, k, v, Tk, H, KVH, hd, float(scale), out, 0, KVH);
  else
    parallel_each(KVH, [&](int64_t kh) { decode_heads_f16(q, k, v, Tk, H, KVH, hd, float(scale), out, kh, kh + 1); });
  return true;
}

void kv_store(const Tensor& src, Tensor& dst, Tensor& dst_scale) {
  const char* op = "kv_store";
  detail::check_contiguous(op, src, "src");
  detail::check_contiguous(op, dst, "dst");
  if (src.dtype() != DType::F32 || src.device() != Device::CPU) throw_error(op, ": src must be f32 on the CPU, got ", src.describe());
  if (dst.device() != Device::CPU || !is_cache_dtype(dst.dtype()))
    throw_error(op, ": dst must be f32, f16 or i8 on the CPU, got ", dst.describe());
  if (src.dim() != 3) throw_error(op, ": src must be [T, KVH, head_dim], got ", src.describe());
  detail::check_shape(op, dst, src.shape(), "dst");
  const int64_t T = src.size(0), KVH = src.size(1), hd = src.size(2), rows = T * KVH;
  const float* s = src.data<float>();
  switch (dst.dtype()) {
    case DType::F32: std::memcpy(dst.data<float>(), s, size_t(rows * hd) * sizeof(float)); return;
    case DType::F16: vec::f32_to_f16_exact(s, static_cast<uint16_t*>(dst.raw_data()), rows * hd); return;
    default: break;
  }
  detail::check_contiguous(op, dst_scale, "dst_scale");
  detail::check_shape(op, dst_scale, {T, KVH}, "dst_scale");
  if (dst_scale.dtype() != DType::F32) throw_error(op, ": dst_scale must be f32, got ", dst_scale.describe());
  int8_t* d = dst.data<int8_t>();
  float* sc = dst_scale.data<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = s + r * hd;
    float amax = 0;
    for (int64_t c = 0; c < hd; ++c) amax = std::max(amax, std::abs(x[c]));
    const float scale = amax / 127.0f, inv = amax > 0 ? 127.0f / amax : 0.0f;
    sc[r] = scale;
    for (int64_t c = 0; c < hd; ++c) d[r * hd + c] = int8_t(std::lrint(std::clamp(x[c] * inv, -127.0f, 127.0f)));
  }
}

void kv_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& k_scale,
                          const Tensor& v_scale, double scale, Tensor& out) {
  const char* op = "kv_attention_forward";
  detail::check_contiguous(op, q, "q");
  detail::check_contiguous(op, k, "k");
  detail::check_contiguous(op, v, "v");
  if (q.dtype() != DType::F32 || q.device() != Device::CPU) throw_error(op, ": q must be f32 on the CPU, got ", q.describe());
  if (q.dim() != 3 || k.dim() != 3) throw_error(op, ": q and k must be [T, heads, head_dim], got ", q.describe(), ", ", k.describe());
  if (!is_cache_dtype(k.dtype()) || k.device() != Device::CPU)
    throw_error(op, ": the cache must be f32, f16 or i8 on the CPU, got ", k.describe());
  detail::check_shape(op, v, k.shape(), "v");
  if (v.dtype() != k.dtype() || v.device() != k.device()) throw_error(op, ": v is ", v.describe(), " but k is ", k.describe());
  const int64_t Tq = q.size(0), H = q.size(1), hd = q.size(2), Tk = k.size(0), KVH = k.size(1);
  if (k.size(2) != hd) throw_error(op, ": k ", k.describe(), " does not match q ", q.describe());
  if (KVH == 0 || H % KVH != 0) throw_error(op, ": ", KVH, " kv heads do not divide ", H, " heads");
  if (Tk < Tq) throw_error(op, ": fewer keys (", Tk, ") than queries (", Tq, ")");
  const bool q8 = k.dtype() == DType::I8;
  if (q8) {
    for (auto* s : {&k_scale, &v_scale}) {
      detail::check_contiguous(op, *s, "scale");
      detail::check_shape(op, *s, {Tk, KVH}, "scale");
      if (s->dtype() != DType::F32) throw_error(op, ": scales must be f32, got ", s->describe());
    }
  }
  detail::check_shape(op, out, q.shape(), "out");
  if (out.dtype() != DType::F32 || !out.is_contiguous()) throw_error(op, ": out must be contiguous f32, got ", out.describe());
  if (Tq == 0) return;
  // One query row over an f16 cache (decode): the fused kernel reads the f16 rows in place.
  if (k.dtype() == DType::F16 && Tq == 1 &&
      kv_decode_attention_f16(q.data<float>(), static_cast<const uint16_t*>(k.raw_data()),
                              static_cast<const uint16_t*>(v.raw_data()), Tk, H, KVH, hd, scale, out.data<float>()))
    return;
  const float* ksc = q8 ? k_scale.data<float>() : nullptr;
  const float* vsc = q8 ? v_scale.data<float>() : nullptr;
  // f16, one query tile, items run serially (a batched decode step calls this from each
  // sequence's pool task): the whole cache is widened once, here, as contiguous rows of all kv
  // heads (instead of one head's slice of each row per item: ~9 % of an 8-row step at 100 tokens of
  // context, docs/results/packed-inference.md), and the items read it like an f32 cache. The same
  // f32 values, so the same numbers.
  const float *kf = nullptr, *vf = nullptr;
  if (k.dtype() == DType::F32) {
    kf = k.data<float>();
    vf = v.data<float>();
  } else if (k.dtype() == DType::F16 && Tq <= query_tile(Tk) && KVH > 1 && (num_threads() < 2 || in_parallel_region())) {
    thread_local std::vector<float> Kall, Vall;
    const int64_t n = Tk * KVH * hd;
    if (Kall.size() < size_t(n)) Kall.resize(size_t(n)), Vall.resize(size_t(n));
    vec::f16_to_f32(static_cast<const uint16_t*>(k.raw_data()), Kall.data(), n);
    vec::f16_to_f32(static_cast<const uint16_t*>(v.raw_data()), Vall.data(), n);
    kf = Kall.data();
    vf = Vall.data();
  }
  attend_tiles(q.data<float>(), out.data<float>(), Tq, H, hd, Tk, KVH, scale,
               [&](int64_t kh, int64_t kn, std::vector<float>& Kw, std::vector<float>& Vw, const float*& K,
                   const float*& V, int64_t& ld) {
                 if (kf) {  // f32 rows of all kv heads (the cache itself, or widened above)
                   K = kf + kh * hd;
                   V = vf + kh * hd;
                   ld = KVH * hd;
                   return;
                 }
                 if (Kw.size() < size_t(kn * hd)) Kw.resize(size_t(kn * hd)), Vw.resize(size_t(kn * hd));
                 widen_rows(k, ksc, kh, KVH, hd, kn, Kw.data());
                 widen_rows(v, vsc, kh, KVH, hd, kn, Vw.data());
                 K = Kw.data();
                 V = Vw.data();
                 ld = hd;
               });
}

namespace {
// One packed row of hd codes -> f32: keys (per-channel pairs: s[c], z[c]) and values (one pair per
// vg channels). A byte holds 8/B codes, lowest bits first; every value is float(code - z) * s.
template <int B>
void decode_key_row(const uint8_t* row, int64_t hd, const float* s, const uint8_t* z, float* d) {
  constexpr int per = 8 / B;
  constexpr unsigned mask = (1u << B) - 1u;
  for (int64_t b = 0; b < hd / per; ++b) {
    const unsigned byte = row[b];
    for (int e = 0; e < per; ++e) {
      const int64_t c = b * per + e;
      d[c] = float(int((byte >> (e * B)) & mask) - int(z[c])) * s[c];
    }
  }
}
template <int B>
void decode_value_row(const uint8_t* row, int64_t hd, int64_t vg, const float* s, const uint8_t* z, float* d) {
  constexpr unsigned mask = (1u << B) - 1u;
  for (int64_t g = 0, c = 0; c < hd; ++g) {
    const float sg = s[g];
    const int zg = z[g];
    if (vg % (8 / B) == 0) {  // whole bytes per group
      const int64_t b0 = c * B / 8, b1 = (c + vg) * B / 8;
      for (int64_t b = b0; b < b1; ++b) {
        const unsigned byte = row[b];
        for (int e = 0; e < 8 / B; ++e) d[b * (8 / B) + e] = float(int((byte >> (e * B)) & mask) - zg) * sg;
      }
      c += vg;
    } else {
      for (const int64_t e = c + vg; c < e; ++c) d[c] = float(int(unpack_code(B, row, c)) - zg) * sg;
    }
  }
}

// Rows [0, n) of kv head kh of a packed layer -> f32 [n, hd] keys and values.
template <int B>
void decode_rows(const KiviView& kv, int64_t KVH, int64_t hd, int64_t kh, int64_t n, float* K, float* V) {
  const int64_t rb = hd * B / 8, nq = std::min(n, kv.quantized), nvg = hd / kv.vgroup;
  const auto* kc = kv.k_codes.data<uint8_t>();
  const auto* vc = kv.v_codes.data<uint8_t>();
  const float* ks = kv.k_scale.data<float>();
  const auto* kz = kv.k_zero.data<uint8_t>();
  const float* vs = kv.v_scale.data<float>();
  const auto* vz = kv.v_zero.data<uint8_t>();
  for (int64_t j = 0; j < nq; ++j) {
    const int64_t r = j * KVH + kh, p = ((j / kv.group) * KVH + kh) * hd;
    decode_key_row<B>(kc + r * rb, hd, ks + p, kz + p, K + j * hd);
    decode_value_row<B>(vc + r * rb, hd, kv.vgroup, vs + r * nvg, vz + r * nvg, V + j * hd);
  }
  const auto* kr = static_cast<const uint16_t*>(kv.k_res.raw_data());
  const auto* vr = static_cast<const uint16_t*>(kv.v_res.raw_data());
  for (int64_t j = nq; j < n; ++j) {
    const int64_t r = ((j % kv.ring) * KVH + kh) * hd;
    vec::f16_to_f32(kr + r, K + j * hd, hd);
    vec::f16_to_f32(vr + r, V + j * hd, hd);
  }
}

void check_kivi_view(const char* op, const KiviView& kv, int64_t KVH, int64_t hd) {
  if (kv.bits != 2 && kv.bits != 4 && kv.bits != 8) throw_error(op, ": ", kv.bits, " bits (expected 2, 4 or 8)");
  if ((hd * kv.bits) % 8 != 0) throw_error(op, ": head_dim ", hd, " of ", kv.bits, "-bit codes is not a whole number of bytes");
  if (kv.group < 1 || kv.vgroup < 1 || hd % kv.vgroup != 0)
    throw_error(op, ": groups of ", kv.group, " tokens / ", kv.vgroup, " channels do not fit head_dim ", hd);
  const int64_t cap = kv.k_codes.dim() == 3 ? kv.k_codes.size(0) : -1;
  if (!(0 <= kv.quantized && kv.quantized <= kv.length && kv.length <= cap) || kv.quantized % kv.group != 0 ||
      kv.length - kv.quantized > kv.ring)
    throw_error(op, ": inconsistent cache state (", kv.quantized, " of ", kv.length, " tokens packed, capacity ", cap,
                ", ring ", kv.ring, ", group ", kv.group, ")");
  struct Want {
    const Tensor* t;
    Shape shape;
    DType dt;
    const char* name;
  };
  const Want wants[] = {{&kv.k_codes, {cap, KVH, hd * kv.bits / 8}, DType::U8, "k_codes"},
                        {&kv.v_codes, {cap, KVH, hd * kv.bits / 8}, DType::U8, "v_codes"},
                        {&kv.k_scale, {(cap + kv.group - 1) / kv.group, KVH, hd}, DType::F32, "k_scale"},
                        {&kv.k_zero, {(cap + kv.group - 1) / kv.group, KVH, hd}, DType::U8, "k_zero"},
                        {&kv.v_scale, {cap, KVH, hd / kv.vgroup}, DType::F32, "v_scale"},
                        {&kv.v_zero, {cap, KVH, hd / kv.vgroup}, DType::U8, "v_zero"},
                        {&kv.k_res, {kv.ring, KVH, hd}, DType::F16, "k_res"},
                        {&kv.v_res, {kv.ring, KVH, hd}, DType::F16, "v_res"}};
  for (const Want& w : wants) {
    detail::check_contiguous(op, *w.t, w.name);
    detail::check_shape(op, *w.t, w.shape, w.name);
    if (w.t->dtype() != w.dt || w.t->device() != Device::CPU)
      throw_error(op, ": ", w.name, " must be ", dtype_name(w.dt), " on the CPU, got ", w.t->describe());
  }
}
}  // namespace

void kivi_attention_forward(const Tensor& q, const KiviView& kv, double scale, Tensor& out) {
  const char* op = "kivi_attention_forward";
  detail::check_contiguous(op, q, "q");
  if (q.dtype() != DType::F32 || q.device() != Device::CPU || q.dim() != 3)
    throw_error(op, ": q must be f32 [T, heads, head_dim] on the CPU, got ", q.describe());
  const int64_t Tq = q.size(0), H = q.size(1), hd = q.size(2);
  const int64_t KVH = kv.k_codes.dim() == 3 ? kv.k_codes.size(1) : 0;
  if (KVH == 0 || H % KVH != 0) throw_error(op, ": ", KVH, " kv heads do not divide ", H, " heads");
  check_kivi_view(op, kv, KVH, hd);
  const int64_t Tk = kv.length;
  if (Tk < Tq) throw_error(op, ": fewer keys (", Tk, ") than queries (", Tq, ")");
  detail::check_shape(op, out, q.shape(), "out");
  if (out.dtype() != DType::F32 || !out.is_contiguous()) throw_error(op, ": out must be contiguous f32, got ", out.describe());
  if (Tq == 0) return;
  attend_tiles(q.data<float>(), out.data<float>(), Tq, H, hd, Tk, KVH, scale,
               [&](int64_t kh, int64_t kn, std::vector<float>& Kw, std::vector<float>& Vw, const float*& K,
                   const float*& V, int64_t& ld) {
                 if (Kw.size() < size_t(kn * hd)) Kw.resize(size_t(kn * hd)), Vw.resize(size_t(kn * hd));
                 switch (kv.bits) {
                   case 2: decode_rows<2>(kv, KVH, hd, kh, kn, Kw.data(), Vw.data()); break;
                   case 4: decode_rows<4>(kv, KVH, hd, kh, kn, Kw.data(), Vw.data()); break;
                   default: decode_rows<8>(kv, KVH, hd, kh, kn, Kw.data(), Vw.data()); break;
                 }
                 K = Kw.data();
                 V = Vw.data();
                 ld = hd;
               });
}

}  // namespace lowbit::ops
