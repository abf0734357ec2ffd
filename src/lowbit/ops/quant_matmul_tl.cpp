// quant_matmul's lookup-table (TL) kernel for the ternary format: the index form of the weights
// (built once at load), the portable tables and tiles (the reference the x86 copy in
// quant_matmul_tl_x86.cpp equals bit for bit). Design: quant_matmul.h, "The ternary lookup-table layout".
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "lowbit/core/error.h"
#include "lowbit/ops/quant_matmul.h"
#include "lowbit/ops/quant_matmul_kernels.h"

namespace lowbit::ops {

bool quant_matmul_tl_supported(const PackedWeight& w) {
  return qmm::ternary_kind(w) == qmm::TernaryKind::Ternary && w.panel_rows == 0 && w.codes &&
         w.out >= kTernaryLutRows && w.row_bytes == (w.in + 3) / 4;
}

int64_t quant_matmul_tl_bytes(const PackedWeight& w) {
  return w.out / kTernaryLutRows * ((w.in + qmm::kBlockK - 1) / qmm::kBlockK) * kTernaryLutRows * (qmm::kBlockK / 4);
}

void quant_matmul_to_tl_layout(const PackedWeight& w, uint8_t* dst) {
  if (!quant_matmul_tl_supported(w))
    throw_error("quant_matmul: weight [", w.format, "] [", w.out, ", ", w.in,
                "] has no lookup-table layout (the ternary format in its storage layout, at least ",
                kTernaryLutRows, " rows)");
  const int64_t tiles = w.out / kTernaryLutRows, nfull = w.in / qmm::kBlockK, nb = (w.in + qmm::kBlockK - 1) / qmm::kBlockK;
  // Code of value i of a row; 1 (weight 0) past the row's end (the partial last block's padding).
  const auto code = [&](int64_t row, int64_t i) {
    return i < w.in ? (w.codes[row * w.row_bytes + i / 4] >> (2 * (i % 4))) & 3 : 1;
  };
  // Value of slot p of block b: full blocks in the operand's slot order, the partial one natural.
  const auto value = [&](int64_t b, int p) {
    return b * qmm::kBlockK + (b < nfull ? qmm::ternary_slot_source(qmm::TernaryKind::Ternary, p) : p);
  };
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t c = 0; c < 64; ++c) {
        uint8_t* v = dst + ((t * nb + b) * 64 + c) * 32;
        for (int p = 0; p < 32; ++p) {
          const int64_t row = t * kTernaryLutRows + qmm::tl_row(p);
          uint8_t byte = 0;
          for (int h = 0; h < 2; ++h) {  // pair 2c + h: slots (2 (2c + h), 2 (2c + h) + 1) of block b
            const int k = int(2 * c + h);
            byte = uint8_t(byte | (3 * code(row, value(b, 2 * k)) + code(row, value(b, 2 * k + 1))) << (4 * h));
          }
          v[p] = byte;
        }
      }
}

namespace {
// LOWBIT_TERNARY_KERNEL=lut / plain, read once; set_quant_ternary_lut_enabled overrides.
std::atomic<int> g_ternary_lut{-1};
}  // namespace

bool quant_ternary_lut_enabled() {
  int v = g_ternary_lut.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* e = std::getenv("LOWBIT_TERNARY_KERNEL");
    const std::string_view s = e ? e : "";
    if (!s.empty() && s != "lut" && s != "plain")
      throw_error("LOWBIT_TERNARY_KERNEL='", s, "': expected lut or plain");
    v = s == "lut" ? 1 : 0;
    g_ternary_lut.store(v, std::memory_order_relaxed);
  }
  return v == 1;
}

void set_quant_ternary_lut_enabled(bool on) { g_ternary_lut.store(on ? 1 : 0, std::memory_order_relaxed); }

namespace qmm {

void portable_lut_tables(const int8_t* q, int64_t nb, uint8_t* tables) {
  for (int64_t k = 0; k < nb * 128; ++k) {
    uint8_t* t = tables + k * 32;
    std::memset(t, 0, 32);
    for (int i = 0; i < 9; ++i) {
      const int e = (i / 3 - 1) * q[2 * k] + (i % 3 - 1) * q[2 * k + 1];
      t[i] = uint8_t(e & 0xff);
      t[16 + i] = uint8_t((e >> 8) & 0xff);
    }
  }
}

void portable_lut_tiles(const uint8_t* tl, int64_t nb, int64_t t0, int64_t t1, const uint8_t* const* tables,
                        const QRow* a, int m, float* y, int64_t ystride, float post) {
  for (int64_t t = t0; t < t1; ++t)
    for (int j = 0; j < m; ++j)
      for (int p = 0; p < 32; ++p) {
        float acc = 0.0f;
        for (int64_t b = 0; b < nb; ++b) {
          const uint8_t* ib = tl + (t * nb + b) * 64 * 32;
          const uint8_t* tb = tables[j] + b * kLutTableBytes;
          int32_t isum = 0;
          for (int c = 0; c < 64; ++c)
            for (int h = 0; h < 2; ++h) {
              const uint8_t* tk = tb + (2 * c + h) * 32;
              const int idx = (ib[c * 32 + p] >> (4 * h)) & 0x0f;
              isum += int16_t(uint16_t(tk[idx] | tk[16 + idx] << 8));
            }
          acc = std::fma(float(isum), a[j].d[b], acc);
        }
        y[j * ystride + t * 32 + tl_row(p)] = acc * post;
      }
}

}  // namespace qmm
}  // namespace lowbit::ops
