// x86 (AVX2) copy of quant_matmul's ternary lookup-table kernel (quant_matmul_tl.cpp holds the
// portable one it equals bit for bit). Compiled with a target attribute: the library is built
// without -march, quant_matmul.cpp calls these only when cpuid reports AVX2 and FMA.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include "lowbit/ops/quant_matmul_kernels.h"

#define LB_AVX2 __attribute__((target("avx2,fma")))

namespace lowbit::ops::qmm {

namespace {

// A 16-byte table in both 128-bit lanes (vpshufb looks up within each lane).
LB_AVX2 inline __m256i table16(const uint8_t* p) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Tiles [t0, t1) against M activation rows. Per block and row the int16 sums of 128 looked-up
// entries stay exact (|e| <= 254); the 32 rows' sums sit in two vectors, rows in tl_row order.
template <int M>
LB_AVX2 void lut_tiles_m(const uint8_t* tl, int64_t nb, int64_t t0, int64_t t1, const uint8_t* const* tables,
                         const QRow* a, float* y, int64_t ystride, float post) {
  const __m256i lo4 = _mm256_set1_epi8(0x0f);
  const __m256 vpost = _mm256_set1_ps(post);
  for (int64_t t = t0; t < t1; ++t) {
    __m256 acc[M][4];
    for (int j = 0; j < M; ++j)
      for (int r = 0; r < 4; ++r) acc[j][r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* ib = tl + (t * nb + b) * 64 * 32;
      __m256i s[M][2];
      for (int j = 0; j < M; ++j) s[j][0] = s[j][1] = _mm256_setzero_si256();
      for (int c = 0; c < 64; ++c) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ib + 32 * c));
        const __m256i i0 = _mm256_and_si256(v, lo4);
        const __m256i i1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4);
        for (int j = 0; j < M; ++j) {
          const uint8_t* tk = tables[j] + b * kLutTableBytes + 2 * c * 32;
          const __m256i l0 = _mm256_shuffle_epi8(table16(tk), i0), h0 = _mm256_shuffle_epi8(table16(tk + 16), i0);
          const __m256i l1 = _mm256_shuffle_epi8(table16(tk + 32), i1), h1 = _mm256_shuffle_epi8(table16(tk + 48), i1);
          s[j][0] = _mm256_add_epi16(s[j][0], _mm256_add_epi16(_mm256_unpacklo_epi8(l0, h0), _mm256_unpacklo_epi8(l1, h1)));
          s[j][1] = _mm256_add_epi16(s[j][1], _mm256_add_epi16(_mm256_unpackhi_epi8(l0, h0), _mm256_unpackhi_epi8(l1, h1)));
        }
      }
      for (int j = 0; j < M; ++j) {
        const __m256 d = _mm256_set1_ps(a[j].d[b]);
        const __m128i part[4] = {_mm256_castsi256_si128(s[j][0]), _mm256_extracti128_si256(s[j][0], 1),
                                 _mm256_castsi256_si128(s[j][1]), _mm256_extracti128_si256(s[j][1], 1)};
        for (int r = 0; r < 4; ++r)
          acc[j][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(part[r])), d, acc[j][r]);
      }
    }
    for (int j = 0; j < M; ++j)
      for (int r = 0; r < 4; ++r) _mm256_storeu_ps(y + j * ystride + t * 32 + 8 * r, _mm256_mul_ps(acc[j][r], vpost));
  }
}

}  // namespace

LB_AVX2 void avx2_lut_tables(const int8_t* q, int64_t nb, uint8_t* tables) {
  // Entry i = 3 c0 + c1: (c0 - 1) a0 + (c1 - 1) a1 as int16 lanes (entries 9..15 zero).
  const __m256i c0 = _mm256_setr_epi16(-1, -1, -1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0);
  const __m256i c1 = _mm256_setr_epi16(-1, 0, 1, -1, 0, 1, -1, 0, 1, 0, 0, 0, 0, 0, 0, 0);
  // Per 128-bit lane: its 8 low bytes, then its 8 high bytes; the qword permute then gives
  // [low bytes of entries 0..15][high bytes of entries 0..15].
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14,
                                         1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t k = 0; k < nb * 128; ++k) {
    const __m256i a0 = _mm256_set1_epi16(q[2 * k]), a1 = _mm256_set1_epi16(q[2 * k + 1]);
    const __m256i e = _mm256_add_epi16(_mm256_sign_epi16(a0, c0), _mm256_sign_epi16(a1, c1));
    const __m256i r = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(e, split), 0xD8);  // qwords 0, 2, 1, 3
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tables + k * 32), r);
  }
}

LB_AVX2 void avx2_lut_tiles(const uint8_t* tl, int64_t nb, int64_t t0, int64_t t1, const uint8_t* const* tables,
                            const QRow* a, int m, float* y, int64_t ystride, float post) {
  switch (m) {
    case 1: return lut_tiles_m<1>(tl, nb, t0, t1, tables, a, y, ystride, post);
    case 2: return lut_tiles_m<2>(tl, nb, t0, t1, tables, a, y, ystride, post);
    case 3: return lut_tiles_m<3>(tl, nb, t0, t1, tables, a, y, ystride, post);
    default: return lut_tiles_m<4>(tl, nb, t0, t1, tables, a, y, ystride, post);
  }
}

}  // namespace lowbit::ops::qmm
#endif
