// quant_matmul: argument checks, path selection, the reference body, the exact (f32 activation)
// bodies, activation quantization and the portable int8 kernel. Design notes in quant_matmul.h.
#include "lowbit/ops/quant_matmul.h"


#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "lowbit/core/cpu_features.h"
#include "lowbit/core/dtype.h"
#include "lowbit/core/format_traits.h"
#include "lowbit/core/threads.h"
#include "lowbit/ops/dispatch.h"
#include "lowbit/ops/quant_matmul_kernels.h"
#include "lowbit/ops/quant_matmul_salient.h"

namespace lowbit::ops {

namespace {

using qmm::kBlock;
using qmm::QRow;

constexpr const char* kOp = "quant_matmul";

int64_t ggml_block_bytes(PackedLayout l) {
  switch (l) {
    case PackedLayout::GgmlQ4_0: return 18;
    case PackedLayout::GgmlQ4_1: return 20;
    case PackedLayout::GgmlQ8_0: return 34;
    case PackedLayout::GgmlTQ2_0: return 66;
    case PackedLayout::GgmlTQ1_0: return 54;
    default: return 0;
  }
}
int64_t ggml_block_values(PackedLayout l) {
  return l == PackedLayout::GgmlTQ2_0 || l == PackedLayout::GgmlTQ1_0 ? qmm::kBlockK : kBlock;
}

void check_view(const PackedWeight& w) {
  if (w.out <= 0 || w.in <= 0) throw_error(kOp, ": weight [", w.format, "] has shape [", w.out, ", ", w.in, "]");
  if (!w.dequantize_row) throw_error(kOp, ": weight [", w.format, "] has no dequantize_row");
  if (w.layout == PackedLayout::Generic) return;
  if (!w.codes) throw_error(kOp, ": weight [", w.format, "] lacks its codes");
  if (w.panel_rows != 0 && !quant_matmul_panel_layout_supported(w, w.panel_rows))
    throw_error(kOp, ": weight [", w.format, "] [", w.out, ", ", w.in, "] claims a panel layout of ", w.panel_rows,
                " rows it cannot have");
  if (w.layout == PackedLayout::SalientBinary) return salient::check(w, kOp);
  if (w.layout == PackedLayout::SignValue) {
    if (w.panel_rows != 0 || !w.scales || !w.col_scales || w.row_bytes != (w.in + 7) / 8)
      throw_error(kOp, ": weight [", w.format, "] SignValue view needs the row values h, the column values g and ",
                  "row_bytes ", (w.in + 7) / 8, " (no panel layout); got row_bytes ", w.row_bytes,
                  w.scales ? "" : ", no h", w.col_scales ? "" : ", no g");
    return;
  }
  if (w.layout == PackedLayout::TritPlanes) {
    if (w.bits != 2 || !w.scales || !w.zeros || w.group_size <= 0 || w.group_size % 4 != 0 ||
        w.n_groups != (w.in + w.group_size - 1) / w.group_size || w.row_bytes != 2 * ((w.in + 3) / 4))
      throw_error(kOp, ": weight [", w.format, "] TritPlanes view needs bits 2, both plane scales, groups of a multiple of 4 over ", w.in,
                  " columns in groups and row_bytes ", 2 * ((w.in + 3) / 4), "; got bits ", w.bits, ", ", w.n_groups,
                  " groups of ", w.group_size, ", row_bytes ", w.row_bytes);
    return;
  }
  if (w.layout != PackedLayout::IntGroups) {
    const int64_t bb = ggml_block_bytes(w.layout), bv = ggml_block_values(w.layout);
    if (bb == 0) throw_error(kOp, ": weight [", w.format, "] has an unknown layout ", int(w.layout));
    if (w.in % bv != 0 || w.row_bytes != w.in / bv * bb)
      throw_error(kOp, ": weight [", w.format, "] needs rows of whole ", bv, "-value blocks (", bb,
                  " bytes each), got in = ", w.in, ", row_bytes = ", w.row_bytes);
    return;
  }
  if (w.bits != 2 && w.bits != 4 && w.bits != 8)
    throw_error(kOp, ": weight [", w.format, "] IntGroups layout needs 2, 4 or 8-bit codes, got ", w.bits);
  if (w.group_size <= 0 || w.n_groups != (w.in + w.group_size - 1) / w.group_size)
    throw_error(kOp, ": weight [", w.format, "] has ", w.n_groups, " groups of ", w.group_size, " for ", w.in,
                " columns");
  if (w.row_bytes != (w.in * w.bits + 7) / 8)
    throw_error(kOp, ": weight [", w.format, "] row_bytes ", w.row_bytes, " != ", (w.in * w.bits + 7) / 8);
  if (!w.scales && (w.n_groups != 1 || !(w.tensor_scale > 0.0f) || !std::isfinite(w.tensor_scale)))
    throw_error(kOp, ": weight [", w.format, "] lacks its scales (a tensor scale stands in only for one group per row, "
                "and must be finite and positive)");
}

// Code i of a packed row (format.h's little-endian layout, 2/4/8 bits).
inline int code_at(int bits, const uint8_t* row, int64_t i) {
  switch (bits) {
    case 4: return (row[i >> 1] >> ((i & 1) * 4)) & 0x0f;
    case 2: return (row[i >> 2] >> ((i & 3) * 2)) & 0x03;
    default: return row[i];
  }
}

// IntGroups row decode with the codec's arithmetic ((float(q) - z) * s), so bit-identical to
// dequantize_row, without the per-row unpack buffer and indirect calls.
void int_groups_row(const PackedWeight& w, int64_t r, float* dst) {
  const uint8_t* rp = w.codes + r * w.row_bytes;
  if (w.panel_rows != 0) {  // the panel layout: the row's bytes gathered first
    thread_local std::vector<uint8_t> gathered;
    gathered.resize(size_t(w.row_bytes));
    quant_matmul_row_bytes(w, r, gathered.data());
    rp = gathered.data();
  }
  const uint16_t* sc = w.scales ? w.scales + r * w.n_groups : nullptr;
  const uint16_t* zp = w.zeros ? w.zeros + r * w.n_groups : nullptr;
  for (int64_t g = 0; g < w.n_groups; ++g) {
    const float s = sc ? f16_to_f32(sc[g]) : w.tensor_scale, z = zp ? f16_to_f32(zp[g]) : w.implicit_zero;
    const int64_t b = g * w.group_size, e = std::min(w.in, b + w.group_size);
    if (w.bits == 4) {
      int64_t i = b;
      if (i & 1) { dst[i] = (float(code_at(4, rp, i)) - z) * s; ++i; }
      for (; i + 1 < e; i += 2) {
        const uint8_t byte = rp[i >> 1];
        dst[i] = (float(byte & 0x0f) - z) * s;
        dst[i + 1] = (float(byte >> 4) - z) * s;
      }
      if (i < e) dst[i] = (float(code_at(4, rp, i)) - z) * s;
    } else {
      for (int64_t i = b; i < e; ++i) dst[i] = (float(code_at(w.bits, rp, i)) - z) * s;
    }
  }
}

// TritPlanes row decode: w = t1 a1 + t2 a2 with core's trit_pair_value arithmetic (bit-identical
// to dequantize_row), the two planes read a byte (four values) at a time.
void trit_planes_row(const PackedWeight& w, int64_t r, float* dst) {
  const uint8_t* p1 = w.codes + r * w.row_bytes;
  const uint8_t* p2 = p1 + w.row_bytes / 2;
  for (int64_t g = 0; g < w.n_groups; ++g) {
    const float a1 = f16_to_f32(w.scales[r * w.n_groups + g]), a2 = f16_to_f32(w.zeros[r * w.n_groups + g]);
    const int64_t b = g * w.group_size, e = std::min(w.in, b + w.group_size);  // b is a multiple of 4
    for (int64_t i = b; i < e; i += 4) {
      const unsigned c1 = p1[i >> 2], c2 = p2[i >> 2];
      const int64_t n = std::min<int64_t>(4, e - i);
      for (int64_t k = 0; k < n; ++k)
        dst[i + k] = trit_pair_value(uint8_t(3 * (c2 >> (2 * k) & 3) + (c1 >> (2 * k) & 3)), a1, a2);
    }
  }
}

// SignValue row decode: w_j = h (+-1) g_j with core's sign_value_value (bit-identical to dequantize_row).
void sign_value_row(const PackedWeight& w, int64_t r, float* dst) {
  const uint8_t* rp = w.codes + r * w.row_bytes;
  const float h = f16_to_f32(w.scales[r]);
  for (int64_t j = 0; j < w.in; ++j) dst[j] = sign_value_value(rp[j >> 3] >> (j & 7) & 1, h, f16_to_f32(w.col_scales[j]));
}

void decode_row(const PackedWeight& w, int64_t r, float* dst) {
  if (w.layout == PackedLayout::IntGroups) int_groups_row(w, r, dst);
  else if (w.layout == PackedLayout::SignValue) sign_value_row(w, r, dst);
  else if (w.layout == PackedLayout::TritPlanes) trit_planes_row(w, r, dst);
  else if (w.layout == PackedLayout::SalientBinary) salient::decode_row(w, r, dst);
  else w.dequantize_row(r, dst);
}

// ---- Reference: decode one row with the format's own codec, f64 accumulation -----------------
void reference_body(const float* x, int64_t M, const PackedWeight& w, float* y) {
  std::vector<float> row(static_cast<size_t>(w.in));
  for (int64_t o = 0; o < w.out; ++o) {
    w.dequantize_row(o, row.data());
    for (int64_t m = 0; m < M; ++m) {
      double acc = 0;
      for (int64_t i = 0; i < w.in; ++i) acc += double(x[m * w.in + i]) * double(row[size_t(i)]);
      y[m * w.out + o] = float(acc);
    }
  }
}

// Parallel loops: lowbit's thread pool (core/threads.h) by default, or OpenMP threads with
// LOWBIT_QUANT_THREADS=omp (their count follows --threads: set_num_threads calls
// omp_set_num_threads). OpenMP was the default while the pool waited for every worker to check in
// after each call (a preempted worker stalled the caller); the pool now waits only for the tasks,
// and one set of threads serves every op, so decode no longer has OpenMP's threads spinning next
// to the pool's on 2 cores (docs/results/packed-inference.md, "Decode at 2 threads").
// A chunk is at least kMinChunkWork weight values (smaller products run serially).
constexpr int64_t kMinChunkWork = int64_t(1) << 14;
constexpr int64_t kTaskWork = int64_t(1) << 16;  // weights per dynamic task of the int8 body
// ... of its plain layouts (Int8Product: the panel kernels). 2^18: on the 2-core Zen 4 VM in the
// real-time class (chrt -f 10, so that other jobs cannot preempt), two threads decoded an 8-row
// SmolLM2 step in 9.7-11.8 ms instead of 13.4-14.9 (1-row: 5.4-5.5 vs 5.7-6.6) — each task starts
// with its first panels not prefetched and claims a task on the shared counter, and 2^16 made
// ~2000 tasks a step; under load (normal class) no difference (docs/results/packed-inference.md,
// "Two threads"). Which kernel computes a row does not depend on it.
constexpr int64_t kPanelTaskWork = int64_t(1) << 18;
inline int64_t row_grain(int64_t in) { return std::max<int64_t>(1, kMinChunkWork / std::max<int64_t>(1, in)); }

bool use_openmp() {
  static const bool omp = [] {
    const char* e = std::getenv("LOWBIT_QUANT_THREADS");
    const std::string v = e ? e : "";
    if (!v.empty() && v != "omp" && v != "pool") throw_error("LOWBIT_QUANT_THREADS='", v, "': expected pool or omp");
    return v == "omp";
  }();
  return omp;
}

// fn(begin, end) over [0, n) in chunks of at least `grain` (static split, one chunk per thread).
template <class F>
void rows_for(int64_t n, int64_t grain, const F& fn) {
  if (!use_openmp()) return parallel_for(n, grain, [&](int64_t b, int64_t e) { fn(b, e); });
  const int64_t chunks = std::clamp<int64_t>(n / std::max<int64_t>(1, grain), 1, num_threads());
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) fn(n * c / chunks, n * (c + 1) / chunks);
}

// fn(i) for every i in [0, n), handed out dynamically.
template <class F>
void items_each(int64_t n, const F& fn) {
  if (!use_openmp()) return parallel_each(n, [&](int64_t i) { fn(i); });
#pragma omp parallel for schedule(dynamic) if (n > 1)
  for (int64_t i = 0; i < n; ++i) fn(i);
}

// ---- Exact: weight rows decoded to f32, every output summed in qmm::F32DotRows' one order ------
// (quant_matmul_kernels.h), so a row of x gets the same numbers whatever M, the split over
// threads, the body (decode or tiled) and the ISA are.
qmm::F32DotRows f32_dot_kernel(QuantIsa isa) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == QuantIsa::Avx2 || isa == QuantIsa::Avx2Vnni) return qmm::x86_f32_dot_rows(isa == QuantIsa::Avx2Vnni);
#endif
  (void)isa;
  return &qmm::portable_f32_dot_rows;
}

// Few rows (decode): each thread decodes its weight rows kDecodeRows at a time into a thread-local
// buffer and meets them with all M activation rows.
constexpr int64_t kDecodeRows = 8;
void exact_decode_body(const float* x, int64_t M, const PackedWeight& w, float* y, qmm::F32DotRows dot) {
  const int64_t in = w.in, out = w.out;
  rows_for(out, row_grain(in), [&](int64_t o0, int64_t o1) {
    thread_local std::vector<float> rows;
    if (rows.size() < size_t(kDecodeRows * in)) rows.resize(size_t(kDecodeRows * in));
    for (int64_t o = o0; o < o1; o += kDecodeRows) {
      const int64_t n = std::min(kDecodeRows, o1 - o);
      for (int64_t r = 0; r < n; ++r) decode_row(w, o + r, rows.data() + r * in);
      dot(x, in, M, rows.data(), in, n, in, y + o, out);
    }
  });
}

// ---- SignValue (OneBit): y_i = h_i (2 P+_i - S) per activation row, P+_i the sum of x_g = g ⊙ x
// over row i's set sign bits, read from one table of 256 partial sums per 8 columns (built per
// activation row: 256 adds per 8 columns, then one read per 8 weights of every row) --------------
void sign_value_body(const float* x, int64_t M, const PackedWeight& w, float* y) {
  const int64_t in = w.in, out = w.out, nb = (in + 7) / 8;
  std::vector<float> table(size_t(nb * 256)), xg(size_t(nb * 8), 0.0f);
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * in;
    double total = 0;
    for (int64_t j = 0; j < in; ++j) {
      xg[size_t(j)] = f16_to_f32(w.col_scales[j]) * xm[j];
      total += xg[size_t(j)];
    }
    const float S = float(total);
    // table[b][v] = the sum of xg[8b + t] over the set bits t of v (v's top bit added to v without it).
    rows_for(nb, std::max<int64_t>(1, kMinChunkWork / 256), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        float* t = table.data() + b * 256;
        const float* v = xg.data() + b * 8;
        t[0] = 0.0f;
        for (int k = 0; k < 8; ++k)
          for (int u = 0; u < (1 << k); ++u) t[(1 << k) + u] = t[u] + v[k];
      }
    });
    float* ym = y + m * out;
    rows_for(out, std::max<int64_t>(1, kMinChunkWork * 8 / std::max<int64_t>(1, in)), [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        const uint8_t* rp = w.codes + o * w.row_bytes;
        float s[4] = {0, 0, 0, 0};
        int64_t b = 0;
        for (; b + 4 <= nb; b += 4)
          for (int k = 0; k < 4; ++k) s[k] += table[size_t((b + k) * 256 + rp[b + k])];
        for (; b < nb; ++b) s[0] += table[size_t(b * 256 + rp[b])];
        const float plus = (s[0] + s[1]) + (s[2] + s[3]);
        ym[o] = f16_to_f32(w.scales[o]) * (2.0f * plus - S);
      }
    });
  }
}

// Many rows (prefill): each task decodes a panel of weight rows (about 4 per thread, at most
// kExactPanelFloats of f32 so that it stays in L2 while every block of activation rows passes it,
// at least 16 rows) and writes its own output columns.
constexpr int64_t kExactPanelFloats = int64_t(1) << 16;
void exact_tiled_body(const float* x, int64_t M, const PackedWeight& w, float* y, qmm::F32DotRows dot) {
  const int64_t in = w.in, out = w.out;
  const int64_t max_rows = std::max<int64_t>(16, kExactPanelFloats / in / 16 * 16);
  const int64_t want = ((out + 4 * num_threads() - 1) / (4 * num_threads()) + 15) / 16 * 16;
  const int64_t panel = std::min(out, std::clamp<int64_t>(want, 16, max_rows));
  const int64_t panels = (out + panel - 1) / panel;
  items_each(panels, [&](int64_t p) {
    const int64_t o0 = p * panel, n = std::min(panel, out - o0);
    thread_local std::vector<float> buf;
    if (buf.size() < size_t(n * in)) buf.resize(size_t(n * in));
    for (int64_t r = 0; r < n; ++r) decode_row(w, o0 + r, buf.data() + r * in);
    dot(x, in, M, buf.data(), in, n, in, y + o0, out);
  });
}

// ---- Int8 activations ------------------------------------------------------------------------
struct QActs {
  int64_t nb = 0;  // blocks per row (last one may be partial)
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> sum;
  std::vector<float> pair;  // (d, d * sum) per block
  QRow row(int64_t m) const {
    return {q.data() + m * nb * kBlock, d.data() + m * nb, sum.data() + m * nb, pair.data() + 2 * m * nb};
  }
};

// QuantSharedInputScope: while one is alive on this thread, the last Int8-body call's activations
// (and its panel copy) are kept with the input they came from, for the next calls on the same input.
thread_local int t_shared_input = 0;
// QuantActPerRowScope: 0 = activations per block of 32 (d = amax / 127), else one scale per row,
// d = amax_row / t_act_row_qmax, codes in [-qmax, qmax].
thread_local int t_act_row_qmax = 0;
// QuantActPerRowScope's scale of the row x[0, in): amax / row_qmax (0 outside the scope).
float act_row_scale(const float* x, int64_t in, int row_qmax) {
  if (row_qmax <= 0) return 0.0f;
  float amax = 0.0f;
  for (int64_t i = 0; i < in; ++i) amax = std::max(amax, std::fabs(x[i]));
  return amax / float(row_qmax);
}
// The scalar path's (d, qmax) of an activation block xb[0, n): the row's under the scope, else
// amax / 127 with codes in [-127, 127].
std::pair<float, int> act_block_scale(const float* xb, int64_t n, float row_d, int row_qmax) {
  if (row_qmax > 0) return {row_d, row_qmax};
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(xb[i]));
  return {amax / 127.0f, 127};
}
struct SharedInput {
  bool acts = false, panels = false;  // the thread's QActs / panel copy hold this input's numbers
  const float* x = nullptr;
  int64_t M = 0, in = 0;
  int bits = 0;
  QuantIsa isa = QuantIsa::Auto;
  int row_qmax = 0;
  bool same(const float* x_, int64_t M_, int64_t in_, int bits_, QuantIsa isa_) const {
    return acts && x == x_ && M == M_ && in == in_ && bits == bits_ && isa == isa_ && row_qmax == t_act_row_qmax;
  }
};
thread_local SharedInput t_shared;

// The buffers are the calling thread's and reused from call to call (decode runs ~200 products
// per token); the returned reference is valid until this thread's next call
// (inside a QuantSharedInputScope: the next call on another input).
// The panel kernels' block-major copy of the full blocks: entry b * M + j = block b of row j.
struct PanelCopy {
  int8_t* q = nullptr;
  float *d = nullptr, *dsum = nullptr;
  int32_t* sum = nullptr;
};

// `panel` (optional): also writes the block-major copy of the full blocks, each row by the task
// that quantized it (a copy made afterwards by the calling thread would read the other threads'
// rows from their caches).
// Values per task of the row split: a decode step's rows (8 x 576 or 8 x 1536) are quantized on
// the calling thread. Split over two threads from 2048 values on, they cost more than they saved
// (2-core Zen 4, 8-row decode step: 4-8 % more CPU time — the pool hand-off and the block-major
// copy's lines written by one core, read by the other; docs/results/packed-inference.md).
constexpr int64_t kQuantizeChunkValues = 16384;
const QActs& quantize_acts(const float* x, int64_t M, int64_t in, int bits, QuantIsa isa, const PanelCopy* panel = nullptr) {
  thread_local QActs a;
  if (t_shared_input > 0 && t_shared.same(x, M, in, bits, isa)) return a;  // this input, already quantized
  t_shared = {};
  a.nb = (in + kBlock - 1) / kBlock;
  const size_t nblk = size_t(M * a.nb);
  if (a.d.size() < nblk) {
    a.q.resize(nblk * kBlock);
    a.d.resize(nblk);
    a.sum.resize(nblk);
    a.pair.resize(2 * nblk);
  }
  int src[kBlock];
  for (int p = 0; p < kBlock; ++p) src[p] = qmm::block_source_index(bits, p);
  const int row_qmax = t_act_row_qmax;  // read on the calling thread (the tasks run on others)
#if defined(__x86_64__) || defined(__i386__)
  const bool simd = (isa == QuantIsa::Avx2 || isa == QuantIsa::Avx2Vnni) && row_qmax == 0;
#else
  const bool simd = false;
  (void)isa;
#endif
  // Rows are independent: many rows (a prefill piece) are split over the pool, each row
  // quantized exactly as alone. `A` (not the thread_local `a`) inside: tasks run on other threads.
  QActs& A = a;
  rows_for(M, (kQuantizeChunkValues + in - 1) / in, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float row_d = act_row_scale(x + m * in, in, row_qmax);  // per-row scale (QuantActPerRowScope)
      for (int64_t b = 0; b < A.nb; ++b) {
        const float* xb = x + m * in + b * kBlock;
        const int64_t n = std::min(kBlock, in - b * kBlock);
        const size_t k = size_t(m * A.nb + b);
        int8_t* qb = A.q.data() + k * kBlock;
        int32_t s = 0;
        float d = 0.0f;
#if defined(__x86_64__) || defined(__i386__)
        if (simd && n == kBlock) s = qmm::avx2_quantize_block(xb, bits, qb, &d);
#endif
        if (!simd || n < kBlock) {
          int qmax = 127;
          std::tie(d, qmax) = act_block_scale(xb, n, row_d, row_qmax);
          const float inv = d > 0 ? 1.0f / d : 0.0f;
          for (int64_t p = 0; p < kBlock; ++p) {
            if (p >= n) {
              qb[p] = 0;  // the partial last block is zero padded
              continue;
            }
            const float v = n == kBlock ? xb[src[p]] : xb[p];
            const int qv = int(std::nearbyint(v * inv));
            qb[p] = int8_t(std::clamp(qv, -qmax, qmax));
            s += qb[p];
          }
        }
        A.d[k] = d;
        A.sum[k] = s;
        A.pair[2 * k] = d;
        A.pair[2 * k + 1] = d * float(s);
        if (panel && n == kBlock) {
          const size_t c = size_t(b * M + m);
          std::memcpy(panel->q + c * kBlock, qb, kBlock);
          panel->d[c] = d;
          panel->sum[c] = s;
          panel->dsum[c] = A.pair[2 * k + 1];
        }
      }
    }
  });
  if (t_shared_input > 0) t_shared = {true, panel != nullptr, x, M, in, bits, isa, row_qmax};
  return a;
}

// The partial last block (natural order), scalar.
float tail_dot(const PackedWeight& w, int64_t row, const QRow& a, int64_t nfull) {
  const int64_t b0 = nfull * kBlock;
  if (b0 >= w.in || w.layout != PackedLayout::IntGroups) return 0.0f;
  const uint8_t* rp = w.codes + row * w.row_bytes;
  const int8_t* q = a.q + nfull * kBlock;
  float acc = 0.0f, s = 0.0f, z = 0.0f;
  for (int64_t i = b0, g = -1; i < w.in; ++i) {
    if (i / w.group_size != g) {  // the group's parameters, decoded once per group
      g = i / w.group_size;
      s = f16_to_f32(w.scales[row * w.n_groups + g]);
      z = w.zeros ? f16_to_f32(w.zeros[row * w.n_groups + g]) : w.implicit_zero;
    }
    acc += s * a.d[nfull] * ((float(code_at(w.bits, rp, i)) - z) * float(q[i - b0]));
  }
  return acc;
}

template <int Bits>
float portable_row(const PackedWeight& w, int64_t row, const QRow& a, int64_t nfull) {
  const uint8_t* rp = w.codes + row * w.row_bytes;
  const int64_t bpg = w.n_groups == 1 ? nfull : w.group_size / kBlock;
  constexpr int64_t kBytes = kBlock * Bits / 8;
  float acc = 0.0f;
  for (int64_t g = 0, b = 0; b < nfull; ++g) {
    const float s = f16_to_f32(w.scales[row * w.n_groups + g]);
    const float z = w.zeros ? f16_to_f32(w.zeros[row * w.n_groups + g]) : w.implicit_zero;
    for (const int64_t e = std::min(nfull, b + bpg); b < e; ++b) {
      const uint8_t* bp = rp + b * kBytes;
      const int8_t* qa = a.q + b * kBlock;
      int32_t isum = 0;
      for (int p = 0; p < kBlock; ++p) {
        int c;
        if constexpr (Bits == 4) c = p < 16 ? (bp[p] & 0x0f) : (bp[p - 16] >> 4);
        else if constexpr (Bits == 2) c = (bp[p % 8] >> (2 * (p / 8))) & 0x03;
        else c = bp[p];
        isum += c * qa[p];
      }
      const float sd = s * a.d[b];
      acc += sd * (float(isum) - z * float(a.sum[b]));
    }
  }
  return acc;
}

inline float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_to_f32(h);
}

template <PackedLayout L>
float portable_ggml_row(const PackedWeight& w, int64_t row, const QRow& a, int64_t nfull) {
  const int64_t kBytes = ggml_block_bytes(L);
  const uint8_t* rp = w.codes + row * w.row_bytes;
  float acc = 0.0f;
  for (int64_t b = 0; b < nfull; ++b) {
    const uint8_t* blk = rp + b * kBytes;
    const int8_t* qa = a.q + b * kBlock;
    const float dd = f16_at(blk) * a.d[b];
    int32_t isum = 0;
    if constexpr (L == PackedLayout::GgmlQ8_0) {
      for (int p = 0; p < kBlock; ++p) isum += int8_t(blk[2 + p]) * qa[p];
      acc += dd * float(isum);
    } else {
      const uint8_t* qs = blk + (L == PackedLayout::GgmlQ4_0 ? 2 : 4);
      for (int p = 0; p < 16; ++p) isum += (qs[p] & 0x0f) * qa[p] + (qs[p] >> 4) * qa[p + 16];
      if constexpr (L == PackedLayout::GgmlQ4_0) acc += dd * (float(isum) - 8.0f * float(a.sum[b]));
      else acc += dd * float(isum) + f16_at(blk + 2) * a.d[b] * float(a.sum[b]);
    }
  }
  return acc;
}

QuantIsa resolve_isa(QuantIsa isa) {
  if (isa == QuantIsa::Auto) return quant_isa_best();
  if (!quant_isa_supported(isa)) throw_error(kOp, ": instruction set ", quant_isa_name(isa), " is not supported by this CPU");
  return isa;
}

qmm::RowKernel pick_kernel(QuantIsa isa, const PackedWeight& w) {
  qmm::RowKernel k = nullptr;
  switch (isa) {
#if defined(__x86_64__) || defined(__i386__)
    case QuantIsa::Avx2: k = qmm::avx2_kernel(w); break;
    case QuantIsa::Avx2Vnni: k = qmm::avx2vnni_kernel(w); break;
#endif
    default: k = qmm::portable_kernel(w);
  }
  if (!k) throw_error(kOp, ": no int8 kernel for weight [", w.format, "]");
  return k;
}

qmm::QuadKernel pick_quad_kernel(QuantIsa isa, const PackedWeight& w) {
  switch (isa) {
#if defined(__x86_64__) || defined(__i386__)
    case QuantIsa::Avx2: return qmm::avx2_quad_kernel(w);
    case QuantIsa::Avx2Vnni: return qmm::avx2vnni_quad_kernel(w);
#endif
    default: return nullptr;  // portable: row by row
  }
}

qmm::Panel pick_panel_kernel(QuantIsa isa, const PackedWeight& w) {
  switch (isa) {
#if defined(__x86_64__) || defined(__i386__)
    case QuantIsa::Avx2: return qmm::avx2_panel_kernel(w);
    case QuantIsa::Avx2Vnni: return qmm::avx2vnni_panel_kernel(w);
#endif
    default: return {};  // portable: row by row
  }
}

// Weight rows go in panels (8 rows, 16 with AVX-512: qmm::Panel::rows) through the panel (GEMM)
// kernel where the ISA has one, the rest (out % panel rows) in groups of kRowGroup through the
// four-row kernel, then row by row;
// chunks of the thread split are whole panels (or groups), so which kernel computes a row depends
// on the row index only, never on M or the thread count. The split is over weight rows (output
// columns), every task covering all M activation rows: each weight byte is read by one thread once.
void ternary_body(const float* x, int64_t M, const PackedWeight& w, float* y, QuantIsa isa, qmm::TernaryKind kind,
                  TernaryBody tk);

void int8_body(const float* x, int64_t M, const PackedWeight& w_in, float* y, QuantIsa isa, bool panels,
               TernaryBody tk = TernaryBody::Auto);

// TritPlanes: each plane is an int2 group row (codes t + 1, implicit zero 1, the plane's f16 scales)
// whose rows are row_bytes apart; the 2-bit kernels run once per plane and the products are added.
void trit_planes_body(const float* x, int64_t M, const PackedWeight& w, float* y, QuantIsa isa, bool panels) {
  PackedWeight p = w;
  p.layout = PackedLayout::IntGroups;
  p.zeros = nullptr;
  p.implicit_zero = 1.0f;
  int8_body(x, M, p, y, isa, panels);  // plane 1: codes from the row start, scales a1
  p.codes = w.codes + w.row_bytes / 2;
  p.scales = w.zeros;                  // plane 2: the second half of the row, scales a2
  thread_local std::vector<float> y2;
  y2.resize(size_t(M * w.out));
  int8_body(x, M, p, y2.data(), isa, panels);
  for (int64_t i = 0; i < M * w.out; ++i) y[i] += y2[size_t(i)];
}

#if defined(__x86_64__) || defined(__i386__)
// The SalientBinary panel kernel for an x86 ISA (Avx2 or Avx2Vnni).
qmm::SalientPanel salient_panel(QuantIsa isa) {
  return isa == QuantIsa::Avx2 ? qmm::avx2_salient_panel() : qmm::avx2vnni_salient_panel();
}
#endif

// SalientBinary (ptq161), Int8: the whole product in quant_matmul_salient (x86: the panel kernel
// for every row with `panels`, else the four-row kernels; or the portable tables). (Exact: decoded
// rows through exact_decode_body / exact_tiled_body, as every other layout.)
void salient_binary_int8_body(const float* x, int64_t M, const PackedWeight& w, float* y, QuantIsa isa, bool panels) {
  const QuantIsa r = resolve_isa(isa);
#if defined(__x86_64__) || defined(__i386__)
  if ((r == QuantIsa::Avx2 || r == QuantIsa::Avx2Vnni) && panels) return salient::int8_panel(x, M, w, y, salient_panel(r));
  if (r == QuantIsa::Avx2 || r == QuantIsa::Avx2Vnni)
    return salient::int8_simd(x, M, w, y, r == QuantIsa::Avx2 ? qmm::avx2_salient_kernel() : qmm::avx2vnni_salient_kernel());
#endif
  (void)r;
  salient::int8_portable(x, M, w, y);
}

// One product of the Int8 body on the plain layouts (IntGroups, ggml q4_0 / q4_1 / q8_0), its
// activations quantized: the work split into tasks of whole row groups (int8_body runs them in one
// parallel region, quant_matmul_many runs the tasks of several products in one).
struct Int8Product {
  const PackedWeight* w = nullptr;  // with unit scales when the weight has a tensor scale
  float post = 1.0f;
  const QActs* a = nullptr;
  const QRow* all_rows = nullptr;
  qmm::PanelActs pa;
  qmm::RowKernel k = nullptr;
  qmm::QuadKernel qk = nullptr;
  qmm::Panel pk;
  int64_t M = 0, nfull = 0, out = 0, P = 0, G = 1, groups = 0, per_task = 1, tasks = 0;
  bool tail = false;
  float* y = nullptr;

  void run(int64_t t) const {
    const PackedWeight& w_ = *w;
    const int64_t g0 = t * per_task, g1 = std::min(groups, g0 + per_task);
    QRow rows[qmm::kMaxRows];
    float dots[qmm::kMaxRows * qmm::kRowGroup];
    int64_t o = g0 * G;
    const int64_t o1 = std::min(out, g1 * G);
    if (pk.fn)
      for (; o + P <= o1; o += P) {
        pk.fn(w_, o, pa, nfull, y + o, out);  // the dot products straight into y's rows
        if (tail || post != 1.0f)
          for (int64_t j = 0; j < M; ++j)
            for (int64_t r = 0; r < P; ++r) {
              float& v = y[j * out + o + r];
              v = post * (v + (tail ? tail_dot(w_, o + r, all_rows[j], nfull) : 0.0f));
            }
      }
    if (qk)
      for (; o + qmm::kRowGroup <= o1; o += qmm::kRowGroup)
        for (int64_t m0 = 0; m0 < M; m0 += qmm::kMaxRows) {
          const int n = int(std::min<int64_t>(qmm::kMaxRows, M - m0));
          for (int j = 0; j < n; ++j) rows[j] = a->row(m0 + j);
          qk(w_, o, rows, n, nfull, dots);
          for (int j = 0; j < n; ++j)
            for (int r = 0; r < qmm::kRowGroup; ++r)
              y[(m0 + j) * out + o + r] = post * (dots[j * qmm::kRowGroup + r] + (tail ? tail_dot(w_, o + r, rows[j], nfull) : 0.0f));
        }
    for (; o < o1; ++o)
      for (int64_t m0 = 0; m0 < M; m0 += qmm::kMaxRows) {  // each weight block unpacked once per kMaxRows rows
        const int n = int(std::min<int64_t>(qmm::kMaxRows, M - m0));
        for (int j = 0; j < n; ++j) rows[j] = a->row(m0 + j);
        k(w_, o, rows, n, nfull, dots);
        for (int j = 0; j < n; ++j) y[(m0 + j) * out + o] = post * (dots[j] + (tail ? tail_dot(w_, o, rows[j], nfull) : 0.0f));
      }
  }
};

// Whether int8_body runs this weight as an Int8Product (the other layouts have bodies of their own).
bool plain_int8_layout(const PackedWeight& w) {
  return w.layout != PackedLayout::TritPlanes && w.layout != PackedLayout::SalientBinary &&
         qmm::ternary_kind(w) == qmm::TernaryKind::None;
}

// The buffers a product's operand lives in: the activations (quantize_acts, this thread's), their
// rows, the panel kernels' block-major copy of the full blocks (this thread's, read by all) and the
// unit scales of a tensor-scaled weight.
struct Int8Scratch {
  std::vector<QRow> all_rows;
  std::vector<uint16_t> unit;
  PackedWeight w_unit;
  std::vector<uint8_t> row_codes;  // a panel-layout weight's codes in the row layout (row_layout_copy)
  PackedWeight w_rows;
};

// A panel-layout weight (w.panel_rows) seen in the storage layout: the codes copied into `codes`
// and converted back, for the bodies that read rows (quant_matmul.h: everything but the x86 panel
// kernels). Returns w itself when it is in the storage layout already.
const PackedWeight& row_layout_copy(const PackedWeight& w, std::vector<uint8_t>& codes, PackedWeight& view) {
  if (w.panel_rows == 0) return w;
  codes.assign(w.codes, w.codes + w.out * w.row_bytes);
  quant_matmul_to_row_layout(w, codes.data());
  view = w;
  view.codes = codes.data();
  view.panel_rows = 0;
  return view;
}

// Quantizes x (or reuses it inside a QuantSharedInputScope) and fills `p` for y = x · w^T.
void prepare_int8(const float* x, int64_t M, const PackedWeight& w_given, float* y, QuantIsa isa, bool panels,
                  Int8Scratch& scratch, Int8Product& p) {
  // The panel layout goes straight to a panel kernel whose height divides the layout's; the other
  // kernels read rows.
  const qmm::Panel given_pk = panels ? pick_panel_kernel(isa, w_given) : qmm::Panel{};
  const bool panel_read = w_given.panel_rows != 0 && given_pk.fn && w_given.panel_rows % given_pk.rows == 0;
  const PackedWeight& w_in = panel_read ? w_given : row_layout_copy(w_given, scratch.row_codes, scratch.w_rows);
  // A tensor scale (ternary): the kernels run with unit f16 scales, the products are scaled after.
  const bool tensor_scaled = w_in.layout == PackedLayout::IntGroups && !w_in.scales;
  if (tensor_scaled) {
    scratch.unit.assign(size_t(w_in.out * w_in.n_groups), f32_to_f16(1.0f));
    scratch.w_unit = w_in;
    scratch.w_unit.scales = scratch.unit.data();
  }
  const PackedWeight& w = tensor_scaled ? scratch.w_unit : w_in;
  p.w = &w;
  p.post = tensor_scaled ? w_in.tensor_scale : 1.0f;
  p.M = M;
  p.y = y;
  const bool panel_copy_kept = t_shared_input > 0 && t_shared.panels && t_shared.same(x, M, w.in, qmm::act_order_bits(w), isa);
  p.pk = panels ? pick_panel_kernel(isa, w) : qmm::Panel{};
  p.nfull = w.in / kBlock;
  // The panel kernels' block-major copy of the full blocks (this thread's buffers, read by all).
  thread_local std::vector<int8_t> bq;
  thread_local std::vector<float> bd, bds;
  thread_local std::vector<int32_t> bs;
  if (p.pk.fn) {
    const size_t n = size_t(p.nfull * M);
    if (bd.size() < n) {
      bq.resize(n * kBlock);
      bd.resize(n);
      bds.resize(n);
      bs.resize(n);
    }
  }
  const PanelCopy copy{bq.data(), bd.data(), bds.data(), bs.data()};
  const bool fresh = !(t_shared_input > 0 && t_shared.same(x, M, w.in, qmm::act_order_bits(w), isa));
  const QActs& a = quantize_acts(x, M, w.in, qmm::act_order_bits(w), isa, p.pk.fn && fresh ? &copy : nullptr);
  p.a = &a;
  p.k = pick_kernel(isa, w);
  p.qk = pick_quad_kernel(isa, w);
  p.out = w.out;
  p.tail = p.nfull * kBlock < w.in;  // only IntGroups rows end in a partial block
  p.P = p.pk.rows;
  p.G = p.pk.fn ? p.P : p.qk ? qmm::kRowGroup : 1;
  p.groups = (p.out + p.G - 1) / p.G;
  // Tasks of about kPanelTaskWork weights, handed out dynamically (a thread that falls behind on a
  // shared machine takes fewer), whole row groups each.
  p.per_task = std::max<int64_t>(1, kPanelTaskWork / (p.G * w.in));
  p.tasks = (p.groups + p.per_task - 1) / p.per_task;
  scratch.all_rows.resize(size_t(M));
  for (int64_t j = 0; j < M; ++j) scratch.all_rows[size_t(j)] = a.row(j);
  p.all_rows = scratch.all_rows.data();
  p.pa = {};
  if (p.pk.fn) {
    const int64_t nfull = p.nfull;
    if (!panel_copy_kept && !fresh) {  // activations kept from a product without panels: copy them now
      for (int64_t b = 0; b < nfull; ++b)
        for (int64_t j = 0; j < M; ++j) {
          const size_t k = size_t(b * M + j), src = size_t(j * a.nb + b);
          std::memcpy(bq.data() + k * kBlock, a.q.data() + src * kBlock, kBlock);
          bd[k] = a.d[src];
          bs[k] = a.sum[src];
          bds[k] = a.pair[2 * src + 1];
        }
      if (t_shared_input > 0 && t_shared.acts) t_shared.panels = true;
    }
    p.pa = {M, bq.data(), bd.data(), bs.data(), bds.data()};
  }
}

// The ternary layouts (TQ2_0, TQ1_0 and the ternary format) go to ternary_body (activation blocks of 256).
void int8_body(const float* x, int64_t M, const PackedWeight& w_in, float* y, QuantIsa isa, bool panels, TernaryBody tk) {
  if (w_in.layout == PackedLayout::TritPlanes) return trit_planes_body(x, M, w_in, y, isa, panels);
  if (w_in.layout == PackedLayout::SalientBinary) return salient_binary_int8_body(x, M, w_in, y, isa, panels);
  if (const qmm::TernaryKind kind = qmm::ternary_kind(w_in); kind != qmm::TernaryKind::None)
    return ternary_body(x, M, w_in, y, isa, kind, tk);
  Int8Scratch scratch;
  Int8Product p;
  prepare_int8(x, M, w_in, y, resolve_isa(isa), panels, scratch, p);
  items_each(p.tasks, [&](int64_t t) { p.run(t); });
}

// ---- Int8 activations, ternary layouts (blocks of 256) ---------------------------------------
// The operand: per row, blocks of 256 values with one d each; a full block in ternary_slots slots
// (qmm::ternary_slot_source order), the partial last block (the ternary format only: ggml rows are
// whole blocks) in natural order, zero padded. sum = sum of the block's q.
struct QActsK {
  int64_t nb = 0, slots = 0;
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> sum;
  std::vector<float> pair;  // (d, d * sum) per block
  QRow row(int64_t m) const {
    return {q.data() + m * nb * slots, d.data() + m * nb, sum.data() + m * nb, pair.data() + 2 * m * nb};
  }
};

// qmm::ternary_slot_source of every slot, one table per kind (built once).
const int* slot_sources(qmm::TernaryKind kind) {
  struct Tables {
    int t[4][320];
    Tables() {
      for (int k = 0; k < 4; ++k)
        for (int p = 0; p < 320; ++p) t[k][p] = qmm::ternary_slot_source(qmm::TernaryKind(k), p);
    }
  };
  static const Tables tables;
  return tables.t[int(kind)];
}

const QActsK& quantize_acts_k(const float* x, int64_t M, int64_t in, qmm::TernaryKind kind, bool simd) {
  thread_local QActsK a;
  a.nb = (in + qmm::kBlockK - 1) / qmm::kBlockK;
  a.slots = qmm::ternary_slots(kind);
  const size_t nblk = size_t(M * a.nb);
  if (a.d.size() < nblk || a.q.size() < nblk * size_t(a.slots)) {
    a.q.resize(nblk * size_t(a.slots));
    a.d.resize(nblk);
    a.sum.resize(nblk);
    a.pair.resize(2 * nblk);
  }
  const int* src = slot_sources(kind);
  // QuantActPerRowScope: one d = amax_row / qmax for every block of a row (activations already on
  // that per-token grid, e.g. BitNet v2's int4, come back as their own codes).
  const int row_qmax = t_act_row_qmax;
  if (row_qmax > 0) simd = false;
#if !(defined(__x86_64__) || defined(__i386__))
  simd = false;
#endif
  for (int64_t m = 0; m < M; ++m) {
    const float row_d = act_row_scale(x + m * in, in, row_qmax);
    for (int64_t b = 0; b < a.nb; ++b) {
      const float* xb = x + m * in + b * qmm::kBlockK;
      const int64_t n = std::min(qmm::kBlockK, in - b * qmm::kBlockK);
      const size_t k = size_t(m * a.nb + b);
      int8_t* qb = a.q.data() + k * size_t(a.slots);
      int32_t s = 0;
      float d = 0.0f;
#if defined(__x86_64__) || defined(__i386__)
      if (simd && n == qmm::kBlockK) s = qmm::avx2_quantize_block256(xb, kind, qb, &d);
#endif
      if (!simd || n < qmm::kBlockK) {
        int qmax = 127;
        std::tie(d, qmax) = act_block_scale(xb, n, row_d, row_qmax);
        const float inv = d > 0 ? 1.0f / d : 0.0f;
        for (int64_t p = 0; p < a.slots; ++p) {
          const int64_t i = n == qmm::kBlockK ? src[p] : (p < n ? p : -1);
          qb[p] = i < 0 ? int8_t(0) : int8_t(std::clamp(int(std::nearbyint(xb[i] * inv)), -qmax, qmax));
          s += qb[p];
        }
      }
      a.d[k] = d;
      a.sum[k] = s;
      a.pair[2 * k] = d;
      a.pair[2 * k + 1] = d * float(s);
    }
  }
  return a;
}

// Code (0, 1, 2) of value i of a full block b of a ternary-layout row.
inline int ternary_code(qmm::TernaryKind kind, const uint8_t* rp, int64_t b, int i) {
  switch (kind) {
    case qmm::TernaryKind::TQ2_0: {
      const uint8_t* blk = rp + b * 66;
      return (blk[(i / 128) * 32 + i % 32] >> (2 * ((i / 32) % 4))) & 3;
    }
    case qmm::TernaryKind::TQ1_0: {
      const uint8_t* blk = rp + b * 54;
      if (i < 160) return ggml::tq1_digit(blk[i % 32], i / 32) + 1;
      if (i < 240) return ggml::tq1_digit(blk[32 + (i - 160) % 16], (i - 160) / 16) + 1;
      return ggml::tq1_digit(blk[48 + (i - 240) % 4], (i - 240) / 4) + 1;
    }
    default: return code_at(2, rp, b * qmm::kBlockK + i);
  }
}

// One weight row against one activation row, every block (full ones through the slot table, the
// ternary format's partial last block in natural order): the portable body and the rows the
// four-row kernels leave over. Before the ternary format's tensor scale.
float ternary_row(const PackedWeight& w, qmm::TernaryKind kind, const int* src, int64_t slots, int64_t row,
                  const QRow& a, int64_t nb) {
  const uint8_t* rp = w.codes + row * w.row_bytes;
  const int64_t bb = ggml_block_bytes(w.layout);
  float acc = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t n = std::min(qmm::kBlockK, w.in - b * qmm::kBlockK);
    const int8_t* q = a.q + b * slots;
    int32_t isum = 0;
    if (n == qmm::kBlockK) {
      int c[qmm::kBlockK];
      for (int i = 0; i < qmm::kBlockK; ++i) c[i] = ternary_code(kind, rp, b, i);
      for (int64_t p = 0; p < slots; ++p)
        if (src[p] >= 0) isum += c[src[p]] * q[p];
    } else {
      for (int64_t i = 0; i < n; ++i) isum += ternary_code(kind, rp, b, int(i)) * q[i];
    }
    const float dw = kind == qmm::TernaryKind::Ternary ? 1.0f : f16_at(rp + b * bb + bb - 2);
    acc += dw * a.d[b] * float(isum - a.sum[b]);
  }
  return acc;
}

// The Int8 body of the ternary layouts (same work split as int8_body: groups of four rows through
// the SIMD kernel, the rest and the portable ISA row by row). With the lookup-table kernel (the
// ternary format with its index form, TernaryBody): the tiles of 32 rows through it (every block,
// the partial last one too), the rows after them as before.
void ternary_body(const float* x, int64_t M, const PackedWeight& w, float* y, QuantIsa isa, qmm::TernaryKind kind,
                  TernaryBody tk) {
  isa = resolve_isa(isa);
  const bool simd = isa == QuantIsa::Avx2 || isa == QuantIsa::Avx2Vnni;
  if (tk == TernaryBody::Lut && !w.tl_codes)
    throw_error(kOp, ": weight [", w.format, "] [", w.out, ", ", w.in, "]: the lookup-table kernel needs the index form ",
                "(quant_matmul_to_tl_layout; LOWBIT_TERNARY_KERNEL=lut builds it at load)");
  const bool lut = tk != TernaryBody::Plain && w.tl_codes && kind == qmm::TernaryKind::Ternary;
  const QActsK& a = quantize_acts_k(x, M, w.in, kind, simd);
  qmm::TernaryKernel qk = nullptr;
#if defined(__x86_64__) || defined(__i386__)
  if (isa == QuantIsa::Avx2) qk = qmm::avx2_ternary_quad_kernel(kind);
  if (isa == QuantIsa::Avx2Vnni) qk = qmm::avx2vnni_ternary_quad_kernel(kind);
#endif
  const int* src = slot_sources(kind);
  const int64_t nfull = w.in / qmm::kBlockK, out = w.out, slots = a.slots;
  const bool tail = nfull < a.nb;
  const float post = kind == qmm::TernaryKind::Ternary ? w.tensor_scale : 1.0f;
  // The partial last block of the ternary format (in % 256 values), natural order.
  const auto tail_of = [&](int64_t r, const QRow& q) {
    if (!tail) return 0.0f;
    QRow last = q;
    last.q += nfull * slots;
    last.d += nfull;
    last.sum += nfull;
    // Four codes a byte (the row's last byte may hold fewer: its padding codes meet zero slots).
    const uint8_t* rp = w.codes + r * w.row_bytes + nfull * (qmm::kBlockK / 4);
    int32_t isum = 0;
    for (int64_t i = 0; i < w.in - nfull * qmm::kBlockK; i += 4) {
      const int c = rp[i / 4];
      isum += (c & 3) * last.q[i] + (c >> 2 & 3) * last.q[i + 1] + (c >> 4 & 3) * last.q[i + 2] + (c >> 6) * last.q[i + 3];
    }
    return last.d[0] * float(isum - last.sum[0]);
  };
  // The plain SIMD kernel runs the ternary format's partial last block too (simd_tail): its operand
  // block in the slot order of a full one (the codes past the row's end meet zero slots).
  const bool simd_tail = qk && tail && kind == qmm::TernaryKind::Ternary;
  thread_local std::vector<int8_t> tail_q;
  if (simd_tail) {
    tail_q.resize(size_t(M * qmm::kBlockK));
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* q = a.row(m).q + nfull * slots;  // natural order, zero padded
      for (int p = 0; p < qmm::kBlockK; ++p) tail_q[size_t(m * qmm::kBlockK + p)] = q[src[p]];
    }
  }
  const int8_t* tail_q0 = tail_q.data();  // the tasks run on other threads (their own thread_locals)
  // Lookup-table tiles: rows [0, lut_rows), every block (the partial last one too: its index form is
  // padded with zero weights, the operand with zero slots); the tables of every activation row first.
  const int64_t lut_tiles = lut ? out / kTernaryLutRows : 0, lut_rows = lut_tiles * kTernaryLutRows;
  thread_local std::vector<uint8_t> tables;
  qmm::TernaryLutKernel lk = &qmm::portable_lut_tiles;
  if (lut) {
    qmm::TernaryLutTables build = &qmm::portable_lut_tables;
#if defined(__x86_64__) || defined(__i386__)
    if (simd) {
      build = &qmm::avx2_lut_tables;
      lk = &qmm::avx2_lut_tiles;
    }
#endif
    const int64_t tb = a.nb * qmm::kLutTableBytes;
    if (tables.size() < size_t(M * tb)) tables.resize(size_t(M * tb));
    uint8_t* tp = tables.data();
    rows_for(M, (kQuantizeChunkValues + w.in - 1) / w.in, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) build(a.row(m).q, a.nb, tp + m * tb);
    });
  }
  const uint8_t* tab0 = tables.data();
  const int64_t lut_per_task = std::max<int64_t>(1, kTaskWork / (kTernaryLutRows * w.in));
  const int64_t lut_tasks = (lut_tiles + lut_per_task - 1) / lut_per_task;
  const int64_t G = qk ? qmm::kRowGroup : 1, groups = (out - lut_rows + G - 1) / G;
  const int64_t per_task = std::max<int64_t>(1, kTaskWork / (G * w.in)), tasks = (groups + per_task - 1) / per_task;
  items_each(lut_tasks + tasks, [&](int64_t t) {
    QRow rows[qmm::kMaxRows];
    if (t < lut_tasks) {
      const int64_t t0 = t * lut_per_task, t1 = std::min(lut_tiles, t0 + lut_per_task);
      const uint8_t* tabs[qmm::kMaxRows];
      for (int64_t m0 = 0; m0 < M; m0 += qmm::kMaxRows) {
        const int n = int(std::min<int64_t>(qmm::kMaxRows, M - m0));
        for (int j = 0; j < n; ++j) {
          rows[j] = a.row(m0 + j);
          tabs[j] = tab0 + (m0 + j) * a.nb * qmm::kLutTableBytes;
        }
        lk(w.tl_codes, a.nb, t0, t1, tabs, rows, n, y + m0 * out, out, post);
      }
      return;
    }
    t -= lut_tasks;
    const int64_t g0 = t * per_task, g1 = std::min(groups, g0 + per_task);
    int64_t o = lut_rows + g0 * G;
    const int64_t o1 = std::min(out, lut_rows + g1 * G);
    if (qk) {
      const int64_t oq = o + (o1 - o) / qmm::kRowGroup * qmm::kRowGroup, nr = oq - o;
      // The partial last block through the same kernel (simd_tail): these rows' tail bytes copied
      // once into 64-byte rows (the rest zero: those codes meet zero slots), met by the operand's
      // block in slot order for every group of activation rows.
      thread_local std::vector<uint8_t> codes;
      thread_local std::vector<float> part;
      PackedWeight wt = w;
      if (simd_tail) {
        const int64_t tb = w.row_bytes - nfull * (qmm::kBlockK / 4);
        codes.assign(size_t(nr * 64), 0);
        part.resize(size_t(qmm::kMaxRows * nr));
        for (int64_t r = 0; r < nr; ++r)
          std::memcpy(codes.data() + r * 64, w.codes + (o + r) * w.row_bytes + nfull * (qmm::kBlockK / 4), size_t(tb));
        wt.in = qmm::kBlockK;
        wt.row_bytes = 64;
        wt.codes = codes.data();
      }
      for (int64_t m0 = 0; m0 < M; m0 += qmm::kMaxRows) {
        const int n = int(std::min<int64_t>(qmm::kMaxRows, M - m0));
        for (int j = 0; j < n; ++j) rows[j] = a.row(m0 + j);
        qk(w, o, oq, rows, n, nfull, y + m0 * out, out, post);
        if (simd_tail) {
          QRow trows[qmm::kMaxRows];
          for (int j = 0; j < n; ++j) {
            const int64_t k = (m0 + j) * a.nb + nfull;
            trows[j] = {tail_q0 + (m0 + j) * qmm::kBlockK, a.d.data() + k, a.sum.data() + k, a.pair.data() + 2 * k};
          }
          qk(wt, 0, nr, trows, n, 1, part.data(), nr, post);
          for (int j = 0; j < n; ++j)
            for (int64_t r = 0; r < nr; ++r) y[(m0 + j) * out + o + r] += part[size_t(j * nr + r)];
        } else if (tail) {
          for (int j = 0; j < n; ++j)
            for (int64_t r = o; r < oq; ++r) y[(m0 + j) * out + r] += post * tail_of(r, rows[j]);
        }
      }
      o = oq;
    }
    for (; o < o1; ++o)
      for (int64_t m = 0; m < M; ++m) y[m * out + o] = post * ternary_row(w, kind, src, slots, o, a.row(m), a.nb);
  });
}

// LOWBIT_QUANT_MATMUL=int8|exact|reference overrides the Auto choice (measurements: e.g. the
// perplexity of the int8-activation path over whole windows). Read once.
QuantMatmulPath env_path() {
  static const QuantMatmulPath p = [] {
    const char* e = std::getenv("LOWBIT_QUANT_MATMUL");
    return e ? parse_quant_matmul_path(e, "LOWBIT_QUANT_MATMUL") : QuantMatmulPath::Auto;
  }();
  return p;
}

#ifdef LOWBIT_WITH_CUDA
// LOWBIT_CUDA_GEMV, read once: v1, v2 or v2pdl (the default: measured fastest on an H100).
CudaGemv env_cuda_gemv() {
  static const CudaGemv v = [] {
    const char* e = std::getenv("LOWBIT_CUDA_GEMV");
    if (!e || !*e) return CudaGemv::V2Pdl;
    const std::string_view s(e);
    if (s == "v1") return CudaGemv::V1;
    if (s == "v2") return CudaGemv::V2;
    if (s == "v2pdl") return CudaGemv::V2Pdl;
    throw_error("LOWBIT_CUDA_GEMV=", s, ": expected v1, v2 or v2pdl");
  }();
  return v;
}
#endif

std::atomic<QuantMatmulPath> g_default_path{QuantMatmulPath::Auto};
thread_local int64_t t_int8_max_rows = kQuantDecodeMaxRows;  // QuantInt8RowsScope
thread_local int t_salient_prefill_exact = 0;                  // QuantSalientPrefillExactScope

}  // namespace

namespace {
// The portable bodies take one activation row; RowKernel's form runs them row after row.
template <float (*One)(const PackedWeight&, int64_t, const qmm::QRow&, int64_t)>
void portable_rows(const PackedWeight& w, int64_t row, const qmm::QRow* a, int m, int64_t nfull, float* out) {
  for (int j = 0; j < m; ++j) out[j] = One(w, row, a[j], nfull);
}
}  // namespace

namespace qmm {
RowKernel portable_kernel(const PackedWeight& w) {
  switch (w.layout) {
    case PackedLayout::GgmlQ4_0: return &portable_rows<&portable_ggml_row<PackedLayout::GgmlQ4_0>>;
    case PackedLayout::GgmlQ4_1: return &portable_rows<&portable_ggml_row<PackedLayout::GgmlQ4_1>>;
    case PackedLayout::GgmlQ8_0: return &portable_rows<&portable_ggml_row<PackedLayout::GgmlQ8_0>>;
    case PackedLayout::IntGroups:
      switch (w.bits) {
        case 2: return &portable_rows<&portable_row<2>>;
        case 4: return &portable_rows<&portable_row<4>>;
        case 8: return &portable_rows<&portable_row<8>>;
        default: return nullptr;
      }
    default: return nullptr;
  }
}
}  // namespace qmm

bool quant_isa_supported(QuantIsa isa) {
  switch (isa) {
    case QuantIsa::Auto:
    case QuantIsa::Portable: return true;
#if defined(__x86_64__) || defined(__i386__)
    case QuantIsa::Avx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu::has_f16c();
    case QuantIsa::Avx2Vnni:
      return quant_isa_supported(QuantIsa::Avx2) &&
             ((__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512bw")) ||
              cpu::has_avxvnni());
#endif
    default: return false;
  }
}

QuantIsa quant_isa_best() {
  static const QuantIsa best = [] {
    for (QuantIsa i : {QuantIsa::Avx2Vnni, QuantIsa::Avx2})
      if (quant_isa_supported(i)) return i;
    return QuantIsa::Portable;
  }();
  return best;
}

const char* quant_isa_name(QuantIsa isa) {
  switch (isa) {
    case QuantIsa::Auto: return "auto";
    case QuantIsa::Portable: return "portable";
    case QuantIsa::Avx2: return "avx2";
    case QuantIsa::Avx2Vnni: return "avx2-vnni";
  }
  return "?";
}

bool quant_matmul_has_int8_kernel(const PackedWeight& w) {
  if (w.layout == PackedLayout::Generic || w.layout == PackedLayout::SignValue) return false;
  const bool grouped = w.layout == PackedLayout::IntGroups || w.layout == PackedLayout::TritPlanes;
  return !grouped || w.n_groups == 1 || w.group_size % kBlock == 0;
}

// ---- The CPU panel layout (quant_matmul.h) ---------------------------------------------------
namespace {
// One row's 32-value block: bytes before its codes (ggml's d, or d and m), all its bytes, and the
// dwords of its codes.
struct PanelGeom {
  int64_t hdr = 0, bytes = 0, dwords = 0;
};
PanelGeom panel_geom(const PackedWeight& w) {
  switch (w.layout) {
    case PackedLayout::GgmlQ4_0: return {2, 18, 4};
    case PackedLayout::GgmlQ4_1: return {4, 20, 4};
    case PackedLayout::GgmlQ8_0: return {2, 34, 8};
    case PackedLayout::IntGroups: return {0, 4 * int64_t(w.bits), int64_t(w.bits)};
    default: return {};
  }
}

// Byte offset, inside panel block `blk` (H rows), of row l's header half-word h and code dword k.
inline int64_t panel_hdr_at(int64_t H, int64_t l, int64_t h) { return h * 2 * H + 2 * l; }
inline int64_t panel_code_at(const PanelGeom& g, int64_t H, int64_t l, int64_t k) { return H * g.hdr + 4 * (k * H + l); }

// Row l (its storage bytes `row`) <-> its bytes in the panel of H rows at `panel`; to_panel picks
// the direction.
void panel_row_copy(const PanelGeom& g, int64_t H, int64_t nb, int64_t l, uint8_t* row, uint8_t* panel, bool to_panel) {
  for (int64_t b = 0; b < nb; ++b) {
    uint8_t* blk = panel + b * H * g.bytes;
    uint8_t* r = row + b * g.bytes;
    for (int64_t h = 0; h < g.hdr / 2; ++h) {
      uint8_t* p = blk + panel_hdr_at(H, l, h);
      to_panel ? std::memcpy(p, r + 2 * h, 2) : std::memcpy(r + 2 * h, p, 2);
    }
    for (int64_t k = 0; k < g.dwords; ++k) {
      uint8_t* p = blk + panel_code_at(g, H, l, k);
      to_panel ? std::memcpy(p, r + g.hdr + 4 * k, 4) : std::memcpy(r + g.hdr + 4 * k, p, 4);
    }
  }
}

// Every whole panel of `codes` from one layout to the other, in place (a panel's bytes through a
// per-thread buffer of H rows).
void panel_convert(const PackedWeight& w, int64_t H, uint8_t* codes, bool to_panel) {
  const PanelGeom g = panel_geom(w);
  const int64_t rb = w.row_bytes, nb = w.in / kBlock, panels = w.out / H;
  parallel_for(panels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<uint8_t> tmp(size_t(H * rb));
    for (int64_t p = p0; p < p1; ++p) {
      uint8_t* span = codes + p * H * rb;
      std::memcpy(tmp.data(), span, size_t(H * rb));
      for (int64_t l = 0; l < H; ++l)
        to_panel ? panel_row_copy(g, H, nb, l, tmp.data() + l * rb, span, true)
                 : panel_row_copy(g, H, nb, l, span + l * rb, tmp.data(), false);
    }
  });
}
}  // namespace

bool quant_matmul_panel_layout_supported(const PackedWeight& w, int64_t height) {
  if ((height != 8 && height != 16) || w.out < height || w.in % kBlock != 0) return false;
  switch (w.layout) {
    case PackedLayout::GgmlQ4_0:
    case PackedLayout::GgmlQ4_1:
    case PackedLayout::GgmlQ8_0: return w.row_bytes == w.in / kBlock * panel_geom(w).bytes;
    case PackedLayout::IntGroups:
      return w.scales && (w.bits == 2 || w.bits == 4 || w.bits == 8) && w.row_bytes == w.in * w.bits / 8 &&
             (w.n_groups == 1 || w.group_size % kBlock == 0);
    default: return false;
  }
}

int64_t quant_matmul_panel_height(const PackedWeight& w) {
  const int64_t h = pick_panel_kernel(quant_isa_best(), w).rows;
  return quant_matmul_panel_layout_supported(w, h) ? h : 0;
}

void quant_matmul_to_panel_layout(const PackedWeight& w, int64_t height, uint8_t* codes) {
  check_view(w);
  if (w.panel_rows != 0) throw_error(kOp, ": weight [", w.format, "] is already in the panel layout of ", w.panel_rows, " rows");
  if (!quant_matmul_panel_layout_supported(w, height))
    throw_error(kOp, ": weight [", w.format, "] [", w.out, ", ", w.in, "] has no panel layout of ", height,
                " rows (ggml q4_0/q4_1/q8_0 or 2/4/8-bit groups of whole 32-value blocks with f16 scales, at least ",
                height, " rows)");
  panel_convert(w, height, codes, true);
}

void quant_matmul_to_row_layout(const PackedWeight& w, uint8_t* codes) {
  check_view(w);
  if (w.panel_rows == 0) return;
  if (!quant_matmul_panel_layout_supported(w, w.panel_rows))
    throw_error(kOp, ": weight [", w.format, "] claims a panel layout of ", w.panel_rows, " rows it cannot have");
  panel_convert(w, w.panel_rows, codes, false);
}

void quant_matmul_row_bytes(const PackedWeight& w, int64_t row, uint8_t* dst) {
  const int64_t H = w.panel_rows, rb = w.row_bytes;
  if (H == 0 || row >= w.out / H * H) {
    std::memcpy(dst, w.codes + row * rb, size_t(rb));
    return;
  }
  panel_row_copy(panel_geom(w), H, w.in / kBlock, row % H, dst, const_cast<uint8_t*>(w.codes + row / H * H * rb), false);
}

namespace {
constexpr bool kPanelLayoutDefault = true;
std::atomic<int> g_panel_layout{-1};  // -1: not decided yet (LOWBIT_PANEL_LAYOUT on first use)
}  // namespace

bool quant_panel_layout_enabled() {
  int v = g_panel_layout.load();
  if (v < 0) {
    const char* e = std::getenv("LOWBIT_PANEL_LAYOUT");
    v = e && std::string_view(e) == "0" ? 0 : e && std::string_view(e) == "1" ? 1 : int(kPanelLayoutDefault);
    g_panel_layout.store(v);
  }
  return v == 1;
}

void set_quant_panel_layout_enabled(bool on) { g_panel_layout.store(on ? 1 : 0); }

bool quant_matmul_int8_prefill(const PackedWeight& w) {
  if (w.layout == PackedLayout::SalientBinary) return quant_isa_best() != QuantIsa::Portable;  // the x86 panel kernel
  return qmm::ternary_kind(w) != qmm::TernaryKind::None;
}

int64_t quant_matmul_act_block(const PackedWeight& w) {
  return qmm::ternary_kind(w) != qmm::TernaryKind::None ? qmm::kBlockK : kBlock;
}

namespace {
std::atomic<int> g_cuda_packed{-1};  // -1: not decided yet (read LOWBIT_CUDA_PACKED on first use; on unless "0")
}  // namespace

bool cuda_packed_enabled() {
  int v = g_cuda_packed.load();
  if (v < 0) {
    const char* e = std::getenv("LOWBIT_CUDA_PACKED");
    v = e && std::string_view(e) == "0" ? 0 : 1;
    g_cuda_packed.store(v);
  }
  return v == 1;
}

void set_cuda_packed_enabled(bool on) { g_cuda_packed.store(on ? 1 : 0); }

bool quant_matmul_has_cuda_layout(const PackedWeight& w) {
  switch (w.layout) {
    case PackedLayout::GgmlQ4_0:
    case PackedLayout::GgmlQ4_1:
    case PackedLayout::GgmlQ8_0: return w.in % kBlock == 0;
    case PackedLayout::GgmlTQ2_0: return true;  // blocks of 256: 8 sub-blocks of 32, each (d, 1)
    case PackedLayout::IntGroups:
      // The ternary format (no group scales): one group per row with f16 scale 1, the f32 tensor
      // scale (gamma) applied to the product afterwards (DevicePackedWeight::post).
      if (!w.scales)
        return qmm::ternary_kind(w) == qmm::TernaryKind::Ternary && w.in % kBlock == 0 && std::isfinite(w.tensor_scale);
      return (w.bits == 2 || w.bits == 4 || w.bits == 8) && w.in % kBlock == 0 &&
             (w.n_groups == 1 || w.group_size % kBlock == 0);
    default: return false;
  }
}

DevicePackedWeight upload_packed_weight(const PackedWeight& w) {
  DevicePackedWeight d = device_layout_on_host(w);
  d.codes = d.codes.to(Device::CUDA);
  d.params = d.params.to(Device::CUDA);
  return d;
}

DevicePackedWeight device_layout_on_host(const PackedWeight& w) {
  check_view(w);
  if (w.panel_rows != 0)
    throw_error(kOp, ": weight [", w.format, "] is in the CPU panel layout; the GPU copy is built from the row layout");
  if (!quant_matmul_has_cuda_layout(w))
    throw_error(kOp, ": weight [", w.format, "] [", w.out, ", ", w.in, "] has no GPU form (IntGroups with in % 32 == 0 and ",
                "groups of whole 32-value blocks, the ternary format, or ggml q4_0 / q4_1 / q8_0 / tq2_0); a CUDA model ",
                "keeps a dense copy of such a weight");
  DevicePackedWeight d;
  d.out = w.out;
  d.in = w.in;
  const int64_t nb = w.in / kBlock;
  const bool ggml = w.layout != PackedLayout::IntGroups;
  d.bits = ggml ? (w.layout == PackedLayout::GgmlQ8_0 ? 8 : w.layout == PackedLayout::GgmlTQ2_0 ? 2 : 4) : w.bits;
  d.group_size = ggml ? kBlock : w.group_size;
  d.n_groups = ggml ? nb : w.n_groups;
  d.order = ggml ? 8 : w.bits;
  d.offset = w.layout == PackedLayout::GgmlQ4_1;
  d.row_bytes = w.in * d.bits / 8;
  if (!ggml && !w.scales) d.post = w.tensor_scale;  // the ternary format's gamma, in f32
  Tensor codes = Tensor::empty({w.out, d.row_bytes}, DType::U8);
  Tensor params = Tensor::empty({w.out, d.n_groups, 2}, DType::F16);
  uint8_t* pc = codes.data<uint8_t>();
  uint16_t* pp = static_cast<uint16_t*>(params.raw_data());
  const uint16_t f16_zero = f32_to_f16(0.0f), f16_one = f32_to_f16(1.0f), f16_eight = f32_to_f16(8.0f);
  for (int64_t r = 0; r < w.out; ++r) {
    const uint8_t* src = w.codes + r * w.row_bytes;
    uint8_t* dst = pc + r * d.row_bytes;
    uint16_t* prm = pp + r * d.n_groups * 2;
    if (!ggml) {
      std::memcpy(dst, src, size_t(d.row_bytes));
      if (d.bits == 8)  // signed codes for dp4a: (q - 128) - (z - 128) = q - z
        for (int64_t i = 0; i < d.row_bytes; ++i) dst[i] = uint8_t(src[i] ^ 0x80u);
      for (int64_t g = 0; g < d.n_groups; ++g) {
        float z = w.zeros ? f16_to_f32(w.zeros[r * w.n_groups + g]) : w.implicit_zero;
        if (d.bits == 8) z -= 128.0f;
        prm[2 * g] = w.scales ? w.scales[r * w.n_groups + g] : f16_one;
        prm[2 * g + 1] = f32_to_f16(z);
      }
      continue;
    }
    if (w.layout == PackedLayout::GgmlTQ2_0) {
      // Each 256-value block: qs[64] then d (f16). Sub-block c (values 32c .. 32c + 31) sits in
      // qs[32 (c / 4) + l] at shift 2 (c % 4); the kernels read natural order (byte p % 8 of the
      // 8-byte block at shift 2 (p / 8)), codes 0..2 with zero 1.
      for (int64_t b = 0; b < w.in / qmm::kBlockK; ++b) {
        const uint8_t* blk = src + b * 66;
        uint16_t dd;
        std::memcpy(&dd, blk + 64, 2);
        for (int c = 0; c < 8; ++c) {
          const int64_t sb = b * 8 + c;
          uint8_t* o = dst + sb * 8;
          std::memset(o, 0, 8);
          for (int p = 0; p < 32; ++p) {
            const int code = (blk[32 * (c / 4) + p] >> (2 * (c % 4))) & 3;
            o[p % 8] = uint8_t(o[p % 8] | (code << (2 * (p / 8))));
          }
          prm[2 * sb] = dd;
          prm[2 * sb + 1] = f16_one;
        }
      }
      continue;
    }
    const int64_t bb = ggml_block_bytes(w.layout), cb = kBlock * d.bits / 8;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = src + b * bb;
      uint16_t dd, mm;
      std::memcpy(&dd, blk, 2);
      prm[2 * b] = dd;
      switch (w.layout) {
        case PackedLayout::GgmlQ4_0:
          prm[2 * b + 1] = f16_eight;
          std::memcpy(dst + b * cb, blk + 2, size_t(cb));
          break;
        case PackedLayout::GgmlQ4_1:
          std::memcpy(&mm, blk + 2, 2);
          prm[2 * b + 1] = mm;
          std::memcpy(dst + b * cb, blk + 4, size_t(cb));
          break;
        default:
          prm[2 * b + 1] = f16_zero;
          std::memcpy(dst + b * cb, blk + 2, size_t(cb));
      }
    }
  }
  d.codes = codes;
  d.params = params;
  return d;
}

void quant_embedding(const PackedWeight& w, const Tensor& ids, Tensor& out) {
  check_view(w);
  detail::check_contiguous(kOp, ids, "ids");
  detail::check_contiguous(kOp, out, "out");
  if (ids.dtype() != DType::I32 || ids.dim() != 1)
    throw_error("quant_embedding: ids must be i32 [n], got ", ids.describe());
  const int64_t n = ids.numel();
  detail::check_shape("quant_embedding", out, {n, w.in}, "out");
  if (out.dtype() != DType::F32) throw_error("quant_embedding: out must be f32, got ", out.describe());
  if (out.device() == Device::CUDA) {
    if (!w.device || !w.device->defined())
      throw_error("quant_embedding: table [", w.format, "] has no GPU copy (upload_packed_weight)");
#ifdef LOWBIT_WITH_CUDA
    cuda::quant_embedding(w, ids, out);
    if (w.device->post != 1.0f) scale(out, double(w.device->post), out);
    return;
#else
    detail::no_cuda("quant_embedding");
#endif
  }
  if (ids.device() != Device::CPU) throw_error("quant_embedding: ids ", ids.describe(), " with out on the CPU");
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = ids.data<int32_t>()[i];
    if (id < 0 || id >= w.out)
      throw_error("quant_embedding: token id ", id, " at position ", i, " is outside the vocabulary [0, ", w.out, ")");
    w.dequantize_row(id, out.data<float>() + i * w.in);
  }
}

namespace {
// The body a CPU product of M rows takes.
QuantMatmulPath cpu_path(int64_t M, const PackedWeight& w, const QuantMatmulOptions& opt) {
  QuantMatmulPath path = opt.path;
  if (path == QuantMatmulPath::Auto) path = g_default_path.load(std::memory_order_relaxed);
  if (path == QuantMatmulPath::Auto) path = env_path();
  if (path == QuantMatmulPath::Auto)
    path = (M <= t_int8_max_rows ||
            (quant_matmul_int8_prefill(w) && !(t_salient_prefill_exact > 0 && w.layout == PackedLayout::SalientBinary)) ||
            (t_act_row_qmax > 0 && plain_int8_layout(w))) &&
                   quant_matmul_has_int8_kernel(w)
               ? QuantMatmulPath::Int8
               : QuantMatmulPath::Exact;
  if (path == QuantMatmulPath::Int8 && !quant_matmul_has_int8_kernel(w)) path = QuantMatmulPath::Exact;
  return path;
}
}  // namespace

void quant_matmul_many(const Tensor& x, const std::vector<const PackedWeight*>& ws, const std::vector<Tensor*>& ys,
                       const QuantMatmulOptions& opt) {
  if (ws.size() != ys.size()) throw_error(kOp, ": ", ws.size(), " weights but ", ys.size(), " outputs");
  for (const PackedWeight* w : ws) check_view(*w);
  // Several products of this input can share one parallel region when each is an Int8-body
  // product on the CPU into an f32 [M, out] output; `also(w)` adds each region's own condition.
  const bool cpu_input = x.device() == Device::CPU && x.dtype() == DType::F32 && x.dim() == 2 && x.is_contiguous() &&
                         x.size(0) > 0 && ws.size() > 1;
  const auto every_product = [&](const auto& also) {
    for (size_t i = 0; i < ws.size(); ++i) {
      const PackedWeight& w = *ws[i];
      const Tensor& y = *ys[i];
      if (!(also(w) && w.in == x.size(1) && y.device() == Device::CPU && y.dtype() == DType::F32 && y.is_contiguous() &&
            y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == w.out && cpu_path(x.size(0), w, opt) == QuantMatmulPath::Int8))
        return false;
    }
    return true;
  };
  // Plain layouts: they share the quantized activations (same width and activation order).
  const bool one_region = cpu_input && every_product([&](const PackedWeight& w) {
    return plain_int8_layout(w) && w.layout != PackedLayout::Generic && qmm::act_order_bits(w) == qmm::act_order_bits(*ws[0]);
  });
#if defined(__x86_64__) || defined(__i386__)
  // SalientBinary (ptq161) weights through the panel kernel: one region for all the products.
  const QuantIsa sisa = resolve_isa(opt.isa);
  if (!one_region && cpu_input && opt.int8_panels && !salient::act_sim_enabled() &&
      (sisa == QuantIsa::Avx2 || sisa == QuantIsa::Avx2Vnni) &&
      every_product([](const PackedWeight& w) { return w.layout == PackedLayout::SalientBinary; })) {
    std::vector<float*> yp;
    for (Tensor* y : ys) yp.push_back(y->data<float>());
    salient::int8_panel_many(x.data<float>(), x.size(0), ws, yp, salient_panel(sisa));
    return;
  }
#endif
  if (!one_region) {
    for (size_t i = 0; i < ws.size(); ++i) quant_matmul(x, *ws[i], *ys[i], opt);
    return;
  }
  const int64_t M = x.size(0);
  const QuantIsa isa = resolve_isa(opt.isa);
  std::vector<Int8Scratch> scratch(ws.size());
  std::vector<Int8Product> p(ws.size());
  std::vector<int64_t> first(ws.size() + 1, 0);  // product i owns tasks [first[i], first[i + 1])
  {
    QuantSharedInputScope shared;  // the products after the first reuse its activations (and panel copy)
    for (size_t i = 0; i < ws.size(); ++i) {
      prepare_int8(x.data<float>(), M, *ws[i], ys[i]->data<float>(), isa, opt.int8_panels, scratch[i], p[i]);
      first[i + 1] = first[i] + p[i].tasks;
    }
    items_each(first.back(), [&](int64_t t) {
      size_t i = 0;
      while (t >= first[i + 1]) ++i;
      p[i].run(t - first[i]);
    });
  }
}

void quant_matmul(const Tensor& x, const PackedWeight& w, Tensor& y, const QuantMatmulOptions& opt) {
  check_view(w);
  detail::check_contiguous(kOp, x, "x");
  detail::check_contiguous(kOp, y, "y");
  if (x.device() == Device::CUDA) {
    if (x.dtype() != DType::F32 || x.dim() != 2 || x.size(1) != w.in)
      throw_error(kOp, ": x must be f32 [M, ", w.in, "] for weight [", w.format, "] [", w.out, ", ", w.in, "], got ",
                  x.describe());
    detail::check_shape(kOp, y, {x.size(0), w.out}, "y");
    if (y.dtype() != DType::F32 || y.device() != Device::CUDA)
      throw_error(kOp, ": y must be f32 on cuda like x, got ", y.describe());
    if (!w.device || !w.device->defined() || w.device->out != w.out || w.device->in != w.in)
      throw_error(kOp, ": weight [", w.format, "] [", w.out, ", ", w.in, "] has no GPU copy (upload_packed_weight)");
    if (x.size(0) == 0) return;
    // The same precedence as the CPU: the call's path, then the process default, then LOWBIT_QUANT_MATMUL.
    QuantMatmulPath path = opt.path;
    if (path == QuantMatmulPath::Auto) path = g_default_path.load(std::memory_order_relaxed);
    if (path == QuantMatmulPath::Auto) path = env_path();
    const bool int8 = path == QuantMatmulPath::Int8 || (path == QuantMatmulPath::Auto && x.size(0) <= kQuantDecodeMaxRows);
#ifdef LOWBIT_WITH_CUDA
    cuda::quant_matmul(x, w, y, int8, opt.cuda_gemv == CudaGemv::Auto ? env_cuda_gemv() : opt.cuda_gemv);
    if (w.device->post != 1.0f) scale(y, double(w.device->post), y);
    return;
#else
    (void)int8;
    detail::no_cuda(kOp);
#endif
  }
  if (x.dtype() != DType::F32 || x.device() != Device::CPU || x.dim() != 2 || x.size(1) != w.in)
    throw_error(kOp, ": x must be f32 [M, ", w.in, "] on the CPU for weight [", w.format, "] [", w.out, ", ", w.in,
                "], got ", x.describe());
  const int64_t M = x.size(0);
  detail::check_shape(kOp, y, {M, w.out}, "y");
  if (y.dtype() != DType::F32 || y.device() != Device::CPU) throw_error(kOp, ": y must be f32 on the CPU, got ", y.describe());
  if (M == 0) return;
  const float* px = x.data<float>();
  float* py = y.data<float>();
  std::vector<float> sim;  // LOWBIT_PTQ161_ACT_SIM: the activations rounded as the variable says
  if (w.layout == PackedLayout::SalientBinary && salient::act_sim_enabled()) {
    sim.resize(size_t(M * w.in));
    salient::act_sim(px, M, w, sim.data());
    px = sim.data();
  }
  switch (cpu_path(M, w, opt)) {
    case QuantMatmulPath::Reference: reference_body(px, M, w, py); break;
    case QuantMatmulPath::Int8: int8_body(px, M, w, py, opt.isa, opt.int8_panels, opt.ternary); break;
    default:
      // Every Exact body gives a row of x the same numbers whatever M is (and whatever the
      // threads): SignValue's tables are built per activation row; the others (SalientBinary
      // included: its f32 tables at M <= 8 and decoded rows above would sum in two orders) decode
      // weight rows to f32 and sum every output in F32DotRows' one order (the decode and tiled
      // bodies differ only in how the work is split).
      if (w.layout == PackedLayout::SignValue) {
        sign_value_body(px, M, w, py);
      } else if (M <= kQuantDecodeMaxRows) {
        exact_decode_body(px, M, w, py, f32_dot_kernel(resolve_isa(opt.isa)));
      } else {
        exact_tiled_body(px, M, w, py, f32_dot_kernel(resolve_isa(opt.isa)));
      }
  }
}

QuantMatmulPath parse_quant_matmul_path(const std::string& name, const std::string& what) {
  if (name == "auto") return QuantMatmulPath::Auto;
  if (name == "int8") return QuantMatmulPath::Int8;
  if (name == "exact") return QuantMatmulPath::Exact;
  if (name == "reference") return QuantMatmulPath::Reference;
  throw_error(what, ": '", name, "': expected auto, int8, exact or reference");
}

QuantSharedInputScope::QuantSharedInputScope() {
  ++t_shared_input;
  t_shared = {};
}
QuantSharedInputScope::~QuantSharedInputScope() {
  --t_shared_input;
  t_shared = {};
}

QuantInt8RowsScope::QuantInt8RowsScope(int64_t max_rows) : previous_(t_int8_max_rows) { t_int8_max_rows = max_rows; }
QuantInt8RowsScope::~QuantInt8RowsScope() { t_int8_max_rows = previous_; }

QuantSalientPrefillExactScope::QuantSalientPrefillExactScope() { ++t_salient_prefill_exact; }
QuantSalientPrefillExactScope::~QuantSalientPrefillExactScope() { --t_salient_prefill_exact; }
QuantActPerRowScope::QuantActPerRowScope(int bits) : previous_(t_act_row_qmax) {
  if (bits < 2 || bits > 8) throw_error("QuantActPerRowScope: ", bits, " bits (expected 2 to 8)");
  t_act_row_qmax = (1 << (bits - 1)) - 1;
  t_shared = {};
}
QuantActPerRowScope::~QuantActPerRowScope() {
  t_act_row_qmax = previous_;
  t_shared = {};
}

void set_quant_matmul_default(QuantMatmulPath path) { g_default_path.store(path, std::memory_order_relaxed); }
QuantMatmulPath quant_matmul_default() { return g_default_path.load(std::memory_order_relaxed); }

}  // namespace lowbit::ops
