// Internal to quant_matmul: the int8-activation operand and the per-ISA row kernels.
#pragma once
#include <cstdint>
#include <cstring>

#include "lowbit/ops/quant_matmul.h"

namespace lowbit::ops::qmm {

inline constexpr int64_t kBlock = 32;  // activation block (values sharing one int8 scale)

// Activations of one row quantized per block of 32: q (int8, the 32 values of a full block stored
// in the order the weight layout unpacks them, see block_source_index), d (scale), sum (sum of q).
// The last, partial block (in % 32 values) is stored in natural order, zero padded.
// pair: (d, d * sum) of each block, interleaved (the four-row kernels broadcast one pair at once).
struct QRow {
  const int8_t* q;
  const float* d;
  const int32_t* sum;
  const float* pair;
};

// Position p of a full 32-value block holds activation (block start + block_source_index(bits, p)):
// the order in which the SIMD kernels unpack 32 packed codes of `bits` bits without shuffles.
//   4 bits: 16 bytes, low nibbles (values 0, 2, ..., 30) then high nibbles (1, 3, ..., 31).
//   2 bits: 8 bytes, bits [2j, 2j+2) of bytes 0..7 (values j, 4+j, ..., 28+j) for j = 0..3.
//   8 bits: natural order.
inline int block_source_index(int bits, int p) {
  if (bits == 4) return p < 16 ? 2 * p : 2 * (p - 16) + 1;
  if (bits == 2) return 4 * (p % 8) + p / 8;
  return p;
}

// Dot products of weight row `row` with m (1..kMaxRows) quantized activation rows a[0..m) over the
// first nfull blocks: out[j] = sum over blocks b of s_g * d_jb * (sum_i q_i a_ji - z_g * sum_jb).
// The tail is not included. Each weight block is unpacked once for all m rows (batched decode:
// `lowbit serve` steps several sequences at once); row j's arithmetic is the same whatever m is,
// so a row gets the same numbers alone or in a batch.
inline constexpr int kMaxRows = 4;
using RowKernel = void (*)(const PackedWeight& w, int64_t row, const QRow* a, int m, int64_t nfull, float* out);

// Four consecutive weight rows [row, row + 4) against m (1..kMaxRows) activation rows at once:
// out[j * kRowGroup + r] = the dot product of weight row (row + r) with activation row j, over the
// first nfull blocks (the decode GEMV: each activation block is loaded once for four rows and the
// block scales are applied to four rows with one vector FMA). Row j's arithmetic does not depend
// on m either, so batched and single decode still give the same numbers.
inline constexpr int kRowGroup = 4;
using QuadKernel = void (*)(const PackedWeight& w, int64_t row, const QRow* a, int m, int64_t nfull, float* out);

// A panel of `rows` consecutive weight rows [row, row + rows) (8 on 256-bit vectors, 16 with
// AVX-512) against any number m of activation rows (the batched decode GEMM,
// quant_matmul_x86.inc): each weight block is decoded once per call into an interleaved L1 tile
// and reused for every activation row; out[j * ld + r] = the dot product of weight row (row + r)
// with activation row j over the first nfull blocks (a.m rows). Row j's arithmetic does not depend on m (a
// sequence gets the same numbers alone or in a batch).
// The panel kernels read the activations block-major: entry k = b * m + j is block b of row j
// (q: 32 int8 at q + k * 32 in block_source_index order, d, sum, dsum = d * sum), so the m rows'
// blocks sit side by side and one pointer walks them.
struct PanelActs {
  int64_t m = 0;
  const int8_t* q = nullptr;
  const float* d = nullptr;
  const int32_t* sum = nullptr;
  const float* dsum = nullptr;
};
using PanelKernel = void (*)(const PackedWeight& w, int64_t row, const PanelActs& a, int64_t nfull, float* out, int64_t ld);
struct Panel {
  PanelKernel fn = nullptr;
  int rows = 0;
};
inline constexpr int kMaxPanelRows = 16;

// The kernel of a layout (IntGroups: by bits), or null when there is none.
RowKernel portable_kernel(const PackedWeight& w);
#if defined(__x86_64__) || defined(__i386__)
RowKernel avx2_kernel(const PackedWeight& w);
RowKernel avx2vnni_kernel(const PackedWeight& w);
QuadKernel avx2_quad_kernel(const PackedWeight& w);
QuadKernel avx2vnni_quad_kernel(const PackedWeight& w);
Panel avx2_panel_kernel(const PackedWeight& w);
Panel avx2vnni_panel_kernel(const PackedWeight& w);
// Tests: with `on`, the Avx2Vnni ISA runs the AVX-VNNI (256-bit, VEX) kernels even where AVX-512
// VNNI is present, so both copies are checked on one machine. Returns false (and changes nothing)
// when the CPU lacks AVX-VNNI.
bool force_avxvnni(bool on);
// The 16-row (AVX-512) kernels on ggml weights in the panel layout: the products read it directly
// (true, the default unless LOWBIT_PANEL_DIRECT=0) or through the tile decode. Returns the previous
// setting (tests run both).
bool set_panel_direct(bool on);
// One full block of 32 activations quantized (d = amax / 127, round half to even, +-127) into q
// in block_source_index(bits) order; returns the sum of q. Equal to the portable loop's numbers.
int32_t avx2_quantize_block(const float* x, int bits, int8_t* q, float* d);
#endif

// ---- Ternary layouts: 256-value activation blocks -------------------------------------------
// The ternary format (2-bit IntGroups codes, one tensor scale), ggml tq2_0 and tq1_0. Activations
// are quantized per block of 256 (one d each); a full block is stored in `slots` int8 slots in the
// order the SIMD kernels unpack the codes (ternary_slot_source), so the integer products of a
// whole block are summed before one f32 multiply-add per block and weight row.
inline constexpr int64_t kBlockK = 256;
enum class TernaryKind : uint8_t { None, Ternary, TQ2_0, TQ1_0 };
inline TernaryKind ternary_kind(const PackedWeight& w) {
  switch (w.layout) {
    case PackedLayout::GgmlTQ2_0: return TernaryKind::TQ2_0;
    case PackedLayout::GgmlTQ1_0: return TernaryKind::TQ1_0;
    case PackedLayout::IntGroups: return w.bits == 2 && !w.scales && w.n_groups == 1 ? TernaryKind::Ternary : TernaryKind::None;
    default: return TernaryKind::None;
  }
}
// Slots per full block: 256, or 320 for tq1_0 (its last 96 values are unpacked from one 32-byte
// vector of base-3 digits five times over, with zero slots for the lanes that carry no value).
inline int ternary_slots(TernaryKind k) { return k == TernaryKind::TQ1_0 ? 320 : 256; }
// Value (index in the block) held by slot p of a full block, or -1 for a zero slot.
//   ternary: per 128 values (32 code bytes, four values a byte), run k of 32 slots holds values
//            4p + k (the 2-bit shift k of byte p);
//   tq2_0:   natural order (32 code bytes give 4 runs of 32 values, one per 2-bit shift);
//   tq1_0:   slots 0..159 natural (qs[0..32), digit k = values 32k..32k+31); then 5 runs of 32 slots,
//            run k: qs[32..48) digit k (values 160 + 16k + l), qh[0..4) digit k (240 + 4k + l, k < 4),
//            12 zero slots.
inline int ternary_slot_source(TernaryKind k, int p) {
  if (k == TernaryKind::Ternary) return 128 * (p / 128) + 4 * (p % 32) + (p % 128) / 32;
  if (k != TernaryKind::TQ1_0 || p < 160) return p;
  const int run = (p - 160) / 32, l = (p - 160) % 32;
  if (l < 16) return 160 + 16 * run + l;
  if (l < 20 && run < 4) return 240 + 4 * run + (l - 16);
  return -1;
}
// Weight rows [row0, row1) (row1 - row0 a multiple of kRowGroup), four at a time, against m
// (1..kMaxRows) activation rows over the first nfull blocks of 256: y[j * ystride + row] = post *
// the dot product of weight row `row` with activation row j (each row's arithmetic independent of
// m and of the range, so batched and single decode give the same numbers).
using TernaryKernel = void (*)(const PackedWeight& w, int64_t row0, int64_t row1, const QRow* a, int m, int64_t nfull,
                               float* y, int64_t ystride, float post);
#if defined(__x86_64__) || defined(__i386__)
// Ternary layouts: the four-row kernels over full 256-value blocks (nfull = in / 256), and one
// full activation block quantized into ternary_slots(k) slots (the portable loop's numbers). Null
// kernel for TernaryKind::None.
TernaryKernel avx2_ternary_quad_kernel(TernaryKind k);
TernaryKernel avx2vnni_ternary_quad_kernel(TernaryKind k);
int32_t avx2_quantize_block256(const float* x, TernaryKind k, int8_t* q, float* d);
#endif

// ---- The ternary lookup-table kernel (quant_matmul.h, "The ternary lookup-table layout") -------
// Tables of one activation row: for each block b (nb of them, the partial last one included) and
// pair k (128 per block) 32 bytes at (b 128 + k) 32: the low bytes of the 9 int16 entries (7 zero
// entries after them), then the high bytes. q: the row's operand (QRow::q, ternary_slots(Ternary) =
// 256 slots per block, the partial block zero padded).
inline constexpr int64_t kLutTableBytes = 32 * 128;  // per block
using TernaryLutTables = void (*)(const int8_t* q, int64_t nb, uint8_t* tables);
// Tiles [t0, t1) of the index form against m (1..kMaxRows) activation rows (tables[j], a[j].d):
// y[j ystride + row] = post * sum over the nb blocks b of d_jb * isum_b (fma in block order). The
// portable and SIMD copies give the same numbers, bit for bit.
using TernaryLutKernel = void (*)(const uint8_t* tl, int64_t nb, int64_t t0, int64_t t1, const uint8_t* const* tables,
                                  const QRow* a, int m, float* y, int64_t ystride, float post);
// Row of a tile held by byte p of a 32-byte index vector.
inline int tl_row(int p) { return p < 8 || p >= 24 ? p : p < 16 ? p + 8 : p - 8; }
void portable_lut_tables(const int8_t* q, int64_t nb, uint8_t* tables);
void portable_lut_tiles(const uint8_t* tl, int64_t nb, int64_t t0, int64_t t1, const uint8_t* const* tables,
                        const QRow* a, int m, float* y, int64_t ystride, float post);
#if defined(__x86_64__) || defined(__i386__)
void avx2_lut_tables(const int8_t* q, int64_t nb, uint8_t* tables);
void avx2_lut_tiles(const uint8_t* tl, int64_t nb, int64_t t0, int64_t t1, const uint8_t* const* tables,
                    const QRow* a, int m, float* y, int64_t ystride, float post);
#endif

// ---- SalientBinary (ptq161): the int8 body's operand and the x86 row kernels -----------------
// Per activation row: the binary columns' r_j x_j (gathered in column order) quantized to int8
// per block of 32 (d = amax / 127, as quantize_block; natural order) and the salient columns' x_j
// to int16 per block of 32 (d = amax / 32767; block_source_index(4, p) order, the nibbles' unpack
// order), each zero padded to whole blocks. The salient columns are the ones with the largest
// activations, and int8 blocks of them cost most of the body's error (docs/results/ptq161.md);
// int16 costs one more multiply-add per 16 of them. dsum[2m], dsum[2m + 1]: sum_b d_b S_b of row
// m's binary and salient blocks (S_b = the block's code sum).
struct SalientActs {
  int64_t M = 0, bblk = 0, sblk = 0;  // rows; blocks per row of the binary / salient columns
  const int8_t* qb = nullptr;         // [M, bblk * 32]
  const float* db = nullptr;          // [M, bblk]
  const int16_t* qs = nullptr;        // [M, sblk * 32]
  const float* ds = nullptr;          // [M, sblk]
  const float* dsum = nullptr;        // [M, 2]
};
// Weight rows [row0, row1) against all a.M activation rows: y[m * w.out + r] (quant_matmul_salient_x86.inc),
// four weight rows per pass from row0 (a row's numbers do not depend on row0 or row1).
using SalientKernel = void (*)(const PackedWeight& w, int64_t row0, int64_t row1, const SalientActs& a, float* y);
#if defined(__x86_64__) || defined(__i386__)
SalientKernel avx2_salient_kernel();
SalientKernel avx2vnni_salient_kernel();  // AVX-512 VNNI + BW (mask-register sign expansion), else AVX-VNNI
#endif

// The SalientBinary panel kernel (batched decode and prefill; quant_matmul_salient_x86.inc): weight
// rows in panels of `rows` (16 on AVX-512, 8 on 256-bit vectors), one weight row per 32-bit lane, a
// panel's sign bits and nibbles turned once per call into an interleaved tile (lane r = 4 sign bits
// of row r as 0/1 bytes, or 2 of its 4-bit codes as int16) that every activation row meets with
// broadcast 4-byte activation chunks: no horizontal sums, one FMA per block for the whole panel.
// It reads the operand in panel order (prepared with panel_order): position p of a full binary
// block holds column salient_panel_source(true, p) of the block, of a salient block salient column
// salient_panel_source(false, p). Same signature as SalientKernel (rows [row0, row1), panels from
// row0, the last partial panel repeating its last row; each lane's arithmetic is independent of the
// others and of M, so a row's numbers depend neither on its panel nor on the batch).
struct SalientPanel {
  SalientKernel fn = nullptr;
  int rows = 0;
};
inline int salient_panel_source(bool binary, int p) {
  if (binary) return 8 * (p % 4) + p / 4;       // lane byte u of dword t: bit t of sign byte u
  return 8 * (p / 8) + (p / 2) % 4 + 4 * (p % 2);  // int16 pair v = 4c + n: nibble n of each word of dword c
}
#if defined(__x86_64__) || defined(__i386__)
SalientPanel avx2_salient_panel();
SalientPanel avx2vnni_salient_panel();  // AVX-512 VNNI + BW: 16 rows, else AVX-VNNI: 8
// The operand's gather: x[0, in) split by the column mask (bit j % 8 of mask[j / 8]) into xb (the
// clear bits' columns, in order) and xs (the set ones); writes up to 16 floats past each list's
// end. AVX-512 (vcompressps 16 columns at a time), or null on CPUs without it.
using SplitColumns = void (*)(const float* x, const uint8_t* mask, int64_t in, float* xb, float* xs);
SplitColumns avx512_split_columns();
#endif

// ---- The Exact body's f32 dot products (quant_matmul_f32.cpp) --------------------------------
// y[m * ldy + j] = the dot product of x row m (x + m * ldx) and weight row j (w + j * ldw) over n
// values, for m < M, j < N, each summed in ONE order that depends on n only (never on M, N, the
// tile an element falls in, the thread that runs it or the ISA), so a row of activations gets the
// same numbers alone, in a batch or a prompt, on one thread or many:
//   eight lanes l = 0..7, s_l = fma(x[i], w[i], s_l) over i = 8k + l < n8 = n - n % 8, in order of k
//   (fused multiply-add: one rounding per term); then t = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7));
//   then t = fma(x[i], w[i], t) for i = n8 .. n - 1 in order; the result is t.
// The x86 copies keep one 256-bit accumulator per output (lane l = s_l) and vary only how many
// outputs share a pass (register tiles of up to 4 x rows by 8 weight rows, larger with AVX-512's 32
// registers); the portable copy runs the same formula with std::fma. All copies give the same
// numbers, bit for bit (tests: test_quant_matmul.cpp, ExactAndInt8RowsDoNotDependOnTheBatch).
using F32DotRows = void (*)(const float* x, int64_t ldx, int64_t M, const float* w, int64_t ldw, int64_t N, int64_t n,
                            float* y, int64_t ldy);
void portable_f32_dot_rows(const float* x, int64_t ldx, int64_t M, const float* w, int64_t ldw, int64_t N, int64_t n,
                           float* y, int64_t ldy);
#if defined(__x86_64__) || defined(__i386__)
// AVX2 + FMA; `wide`: the copy for the AVX-512 register file (larger tiles, same numbers) where the
// CPU has AVX-512 VL, else the AVX2 copy. The caller checks AVX2 and FMA.
F32DotRows x86_f32_dot_rows(bool wide);
#endif

// Order of the activations inside a full block for this layout (block_source_index's `bits`):
// IntGroups unpack in their bit order, ggml blocks keep the natural order.
inline int act_order_bits(const PackedWeight& w) { return w.layout == PackedLayout::IntGroups ? w.bits : 8; }

}  // namespace lowbit::ops::qmm
