// x86 int8-activation kernels of quant_matmul, one copy per instruction set (the library is built
// without -march, so each copy is compiled for its own target and quant_matmul.cpp picks one at
// run time from cpuid). The shared body is quant_matmul_x86.inc.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "lowbit/core/cpu_features.h"
#include "lowbit/core/target_region.h"
#include "lowbit/ops/quant_matmul_kernels.h"

namespace lowbit::ops::qmm {

namespace {
// Whether the 16-row kernels read ggml weights in the panel layout directly (panel_rows_direct)
// or through the tile decode: LOWBIT_PANEL_DIRECT=0 / 1, else on; set_panel_direct overrides.
std::atomic<int> g_panel_direct{-1};
bool panel_direct_enabled() {
  int v = g_panel_direct.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* e = std::getenv("LOWBIT_PANEL_DIRECT");
    v = e && e[0] == '0' ? 0 : 1;
    g_panel_direct.store(v, std::memory_order_relaxed);
  }
  return v == 1;
}
}  // namespace

bool set_panel_direct(bool on) {
  const bool was = panel_direct_enabled();
  g_panel_direct.store(on ? 1 : 0, std::memory_order_relaxed);
  return was;
}

LB_TARGET_BEGIN("avx2,fma,f16c")
namespace avx2 {
static inline __m256i dot_u8s8(__m256i w, __m256i a) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1));
}
#define QMM_DOT(w, a) dot_u8s8(w, a)
#define QMM_DPA(s, w, a) _mm256_add_epi32(s, dot_u8s8(w, a))
#define QMM_VNNI 0
#define QMM_PANEL_ROWS 4
#define QMM_ZMM 0
// Accumulation over a block of 256 in int16 (the ternary kernels' products stay far below 2^15).
#define QMM_ACC(acc, w, a) _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, a))
#define QMM_ACC_SUM(acc) _mm256_madd_epi16(acc, _mm256_set1_epi16(1))
#include "lowbit/ops/quant_matmul_x86.inc"  // undefines the QMM_ macros
#define SAL_EXPAND(bits) expand_bits_shuffle(bits)
#define SAL_DOT(u, a) dot_u8s8(u, a)
#define SAL_MADD16(s, c, a) _mm256_add_epi32(s, _mm256_madd_epi16(c, a))
#define SAL_DPA(s, u, a) _mm256_add_epi32(s, dot_u8s8(u, a))
#define SAL_ZMM 0
#include "lowbit/ops/quant_matmul_salient_x86.inc"  // undefines the SAL_ macros
}  // namespace avx2
LB_TARGET_END()

LB_TARGET_BEGIN("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")
namespace avx512vnni {
#define QMM_DOT(w, a) _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a)
#define QMM_DPA(s, w, a) _mm256_dpbusd_epi32(s, w, a)
#define QMM_VNNI 1
#define QMM_PANEL_ROWS 8  // 32 vector registers (AVX-512): 8 float + 8 int accumulators
#define QMM_ZMM 1         // 16-row panels on 512-bit vectors
#define QMM_ACC(acc, w, a) _mm256_dpbusd_epi32(acc, w, a)
#define QMM_ACC_SUM(acc) (acc)
#include "lowbit/ops/quant_matmul_x86.inc"  // undefines the QMM_ macros
#define SAL_EXPAND(bits) _mm256_maskz_mov_epi8(__mmask32(bits), _mm256_set1_epi8(1))
#define SAL_DOT(u, a) _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, a)
#define SAL_MADD16(s, c, a) _mm256_dpwssd_epi32(s, c, a)
#define SAL_DPA(s, u, a) _mm256_dpbusd_epi32(s, u, a)
#define SAL_ZMM 1  // the four-row pass on 512-bit vectors
#include "lowbit/ops/quant_matmul_salient_x86.inc"  // undefines the SAL_ macros
static void split_columns(const float* x, const uint8_t* mask, int64_t in, float* xb, float* xs) {
  int64_t t = 0, u = 0, j = 0;
  for (; j + 16 <= in; j += 16) {
    uint32_t m = uint32_t(mask[j / 8]) | uint32_t(mask[j / 8 + 1]) << 8;
    const __m512 v = _mm512_loadu_ps(x + j);
    _mm512_storeu_ps(xs + u, _mm512_maskz_compress_ps(__mmask16(m), v));
    _mm512_storeu_ps(xb + t, _mm512_maskz_compress_ps(__mmask16(~m), v));
    m = m - ((m >> 1) & 0x5555u);  // popcount (no popcnt in this target)
    m = (m & 0x3333u) + ((m >> 2) & 0x3333u);
    m = (m + (m >> 4)) & 0x0f0fu;
    const int64_t c = int64_t((m + (m >> 8)) & 0x1fu);
    u += c;
    t += 16 - c;
  }
  for (; j < in; ++j) {
    const int64_t sal = (mask[j >> 3] >> (j & 7)) & 1;
    xs[u] = x[j];
    xb[t] = x[j];
    u += sal;
    t += 1 - sal;
  }
}
}  // namespace avx512vnni
LB_TARGET_END()

LB_TARGET_BEGIN("avx2,fma,f16c,avxvnni")
namespace avxvnni {
#define QMM_DOT(w, a) _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w, a)
#define QMM_DPA(s, w, a) _mm256_dpbusd_avx_epi32(s, w, a)
#define QMM_VNNI 1
#define QMM_PANEL_ROWS 4
#define QMM_ZMM 0
#define QMM_ACC(acc, w, a) _mm256_dpbusd_avx_epi32(acc, w, a)
#define QMM_ACC_SUM(acc) (acc)
#include "lowbit/ops/quant_matmul_x86.inc"  // undefines the QMM_ macros
#define SAL_EXPAND(bits) expand_bits_shuffle(bits)
#define SAL_DOT(u, a) _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, a)
#define SAL_MADD16(s, c, a) _mm256_dpwssd_avx_epi32(s, c, a)
#define SAL_DPA(s, u, a) _mm256_dpbusd_avx_epi32(s, u, a)
#define SAL_ZMM 0
#include "lowbit/ops/quant_matmul_salient_x86.inc"  // undefines the SAL_ macros
}  // namespace avxvnni
LB_TARGET_END()

namespace {
std::atomic<bool> g_force_avxvnni{false};
bool has_avx512vnni() {
  __builtin_cpu_init();
  return !g_force_avxvnni.load(std::memory_order_relaxed) && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
}
}  // namespace

bool force_avxvnni(bool on) {
  if (on && !cpu::has_avxvnni()) return false;
  g_force_avxvnni.store(on, std::memory_order_relaxed);
  return true;
}

RowKernel avx2_kernel(const PackedWeight& w) { return avx2::pick(w); }
int32_t avx2_quantize_block(const float* x, int bits, int8_t* q, float* d) { return avx2::quantize_block(x, bits, q, d); }
QuadKernel avx2_quad_kernel(const PackedWeight& w) { return avx2::pick_quad(w); }
Panel avx2_panel_kernel(const PackedWeight& w) { return avx2::pick_panel(w); }
TernaryKernel avx2_ternary_quad_kernel(TernaryKind k) { return avx2::pick_ternary_quad(k); }
int32_t avx2_quantize_block256(const float* x, TernaryKind k, int8_t* q, float* d) {
  return avx2::quantize_block256(x, k, q, d);
}

RowKernel avx2vnni_kernel(const PackedWeight& w) {
  return has_avx512vnni() ? avx512vnni::pick(w) : avxvnni::pick(w);
}
QuadKernel avx2vnni_quad_kernel(const PackedWeight& w) {
  return has_avx512vnni() ? avx512vnni::pick_quad(w) : avxvnni::pick_quad(w);
}
Panel avx2vnni_panel_kernel(const PackedWeight& w) {
  return has_avx512vnni() ? avx512vnni::pick_panel(w) : avxvnni::pick_panel(w);
}
SalientKernel avx2_salient_kernel() { return &avx2::salient_kernel; }
SalientKernel avx2vnni_salient_kernel() {
  return has_avx512vnni() ? &avx512vnni::salient_kernel : &avxvnni::salient_kernel;
}
SplitColumns avx512_split_columns() { return has_avx512vnni() ? &avx512vnni::split_columns : nullptr; }
SalientPanel avx2_salient_panel() { return {&avx2::salient_panel, avx2::kSalR}; }
SalientPanel avx2vnni_salient_panel() {
  return has_avx512vnni() ? SalientPanel{&avx512vnni::salient_panel, avx512vnni::kSalR}
                          : SalientPanel{&avxvnni::salient_panel, avxvnni::kSalR};
}
TernaryKernel avx2vnni_ternary_quad_kernel(TernaryKind k) {
  return has_avx512vnni() ? avx512vnni::pick_ternary_quad(k) : avxvnni::pick_ternary_quad(k);
}

}  // namespace lowbit::ops::qmm
#endif
