// quant_matmul: y = x · dequant(W)^T with W kept packed (issue 10). The op layer cannot see
// quant/ (layering core → ops → ... → quant), so the weight arrives as a `PackedWeight` view that
// quant/QuantizedTensor::packed_view() builds: raw pointers into the packed storage plus a
// `dequantize_row` callback that decodes one row of any format (the reference body uses only that,
// so every format runs, slowly but exactly). Formats the fast kernels know describe their layout:
//
//   IntGroups  lowbit's uniform integer formats with 2, 4 or 8-bit codes (int2/int4 groups, asym and
//              sym, per-channel, int8pc): codes U8 [out, row_bytes], each row little-endian packed
//              (format.h), one f16 scale per group, an f16 zero per group (asym) or the implicit zero
//              2^(bits-1) (sym); w = (q - z) * s. The ternary format (BitNet b1.58) is IntGroups
//              with 2-bit codes, implicit zero 1, no f16 scales and one f32 `tensor_scale` gamma:
//              w = (q - 1) * gamma.
//   GgmlQ4_0, GgmlQ4_1, GgmlQ8_0
//              ggml's blocks of 32 (core/ggml_blocks.h) as stored in GGUF: codes U8 [out, row_bytes],
//              `in` a multiple of 32; w = d (q - 8), d q + m, d q.
//   TritPlanes lowbit's tp2g128 (PTQTP): two ternary planes per row, codes U8 [out, row_bytes],
//              row_bytes = 2 * ceil(in / 4): plane 1's 2-bit codes q1 = t1 + 1 (format.h's 2-bit
//              packing) in the first half of the row, plane 2's q2 = t2 + 1 in the second; `scales`
//              holds a1 and `zeros` a2 (f16 [out, n_groups]); w = (q1 - 1) a1 + (q2 - 1) a2. The Int8
//              body runs it as two IntGroups 2-bit passes (implicit zero 1, row stride row_bytes), one
//              per plane, and adds them; the Exact body decodes rows through dequantize_row.
//   SalientBinary
//              lowbit's ptq161 (PTQ1.61): `col_mask` (bit j % 8 of byte j / 8: column j salient, k =
//              `salient` columns), codes U8 [out, row_bytes], row_bytes = ceil((in-k)/8) + ceil(k/2):
//              the sign bits of the in - k binary columns (bit t % 8 of byte t / 8), then the 4-bit
//              codes of the salient columns in column order (low nibble first); `scales` f16 [out, 2]
//              = (alpha, s), `zeros` f16 [out, 2] = (mu, z), `col_scales` f16 [in - k] = r_j. Binary
//              column: w = r_j (mu +- alpha); salient: w = (q - z) s. The Int8 body gathers x once
//              per call into x_b = r_j x_j over the binary columns and x_s over the salient ones:
//              x_b quantized to int8 and x_s to int16 per block of 32 (the salient columns hold the
//              largest activations), integer sums per block, one f32 multiply-add per block; x86:
//              the panel kernel (int8_panels, any M: 16 weight rows per pass on AVX-512, 8 on
//              256-bit vectors, one row per 32-bit lane; a panel's sign bits split into 0/1-byte
//              vectors and its nibbles into int16 pairs once per call, met by broadcast activation
//              chunks) or the four-row kernels (a block's sign bits expanded to 0/1 bytes for one
//              u8 x s8 dot product); the portable body reads a lookup table per sign byte (256
//              int16 partial sums of its 8 x_b codes, per call and activation row): y = (mu + alpha)
//              P+ + (mu - alpha) (S - P+), P+ = the sum over the set sign bits, S = the sum of all,
//              plus s * sum_u (q_u - z) x_s[u]. Exact: rows decoded to f32 (salient::decode_row) at
//              every M, as the other layouts (its f32 sign-byte tables, used for M <= 8 before
//              issue 10, summed in another order than the prefill form). No GPU form.
//   SignValue  lowbit's onebit (OneBit, Xu et al. 2024, arXiv 2402.11295): codes U8 [out, ceil(in/8)],
//              the sign bit of weight (i, j) at bit j % 8 of byte j / 8 of row i (1 = +1); `scales` f16
//              [out, 1] = h, `col_scales` f16 [in] = g; w_ij = h_i (+-1) g_j, so
//              y = h ⊙ (sign(W) (g ⊙ x)). The Exact body (every M; Int8 falls back to it: no integer
//              kernel) forms x_g = g ⊙ x once per activation row, builds a lookup table per 8 columns
//              (256 partial sums of their x_g values) and reads one table entry per sign byte:
//              y_i = h_i (2 P+ - S), P+ = the sum of x_g over the set bits, S = the sum of all x_g.
//              No GPU form (device_layout_on_host names the format).
//   GgmlTQ2_0, GgmlTQ1_0
//              ggml's ternary blocks of 256 (66 / 54 bytes: 2-bit codes or base-3 digits, one f16 d),
//              `in` a multiple of 256; w = d (q - 1), q in {0, 1, 2}.
//
// Bodies (QuantMatmulOptions::path):
//   Reference   row by row: dequantize_row, then f32 dot products (the oracle the tests use).
//   Exact       f32 activations: decode (M <= 8) dequantizes 8 weight rows at a time into a
//               thread-local buffer; prefill dequantizes panels of rows (<= 256 KiB of f32, kept in
//               L2) that every block of activation rows passes. Both sum every output in ONE order
//               (qmm::F32DotRows, quant_matmul_kernels.h: eight FMA lanes, a fixed tree, the tail),
//               so a row of x gets the same numbers, bit for bit, whatever M, the thread count and
//               the ISA (portable, AVX2, AVX-512) are: a batched server step, a window read whole or
//               in pieces, one thread or many (issue 10; before, prefill ran OpenBLAS's sgemm,
//               whose order depends on M). SignValue and SalientBinary keep their table bodies
//               (built per activation row: row-independent too). Equal to Reference up to f32
//               summation order (tests: 1e-5); within that, not equal to the dense f32 path's sgemm.
//   Int8        activations quantized per block of 32 to int8 (d = amax/127, as llama.cpp's Q8_0),
//               integer dot products per block, f32 accumulation across blocks. Error bound per output:
//               sum_i |w_i| * d_block(i) / 2 (the activation rounding), plus f32 rounding.
//               The ternary layouts (the ternary format, tq2_0, tq1_0: quant_matmul_act_block = 256)
//               quantize activations per block of 256 instead (llama.cpp's q8_K operand of its TQ
//               kernels, with lowbit's d = amax/127): their codes have no per-32 scale, so the
//               integer products of a whole block are summed before one f32 multiply per block.
//               Row-independent as well: each row is quantized alone, and every kernel (portable,
//               four-row, panel, ternary, lookup-table, ptq161) sums a row's blocks in an order that
//               depends neither on M nor on the threads (tests: ExactAndInt8RowsDoNotDependOnTheBatch).
//   Auto        (a row's numbers change where M crosses 8: int8 decode, f32 prefill; serving keeps
//               its batched steps on Int8 with QuantInt8RowsScope; --matmul exact / int8 fix one body)
//               Int8 for M <= 8 when the layout has an integer kernel, and for every M on the
//               ternary layouts (quant_matmul_int8_prefill: their int8 kernels beat the f32 tiles at
//               every prompt length measured, 9 to 1024 rows, docs/results/bitnet.md) and on
//               SalientBinary where its x86 panel kernel runs (docs/results/ptq161.md); Exact otherwise. A
//               process-wide default (set_quant_matmul_default: the CLI's --matmul) overrides it,
//               else the environment variable LOWBIT_QUANT_MATMUL=int8|exact|reference does.
// Diagnostic for SalientBinary weights: LOWBIT_PTQ161_ACT_SIM (e.g. "b32x8,s32x8": the binary columns'
// r_j x_j and the salient columns' x_j, each gathered in column order, rounded to a symmetric
// code of that many bits per block of that many values or per "row"; a part left out stays f32)
// rounds the activations of every CPU SalientBinary product before the body runs: with
// --matmul exact it separates the int8 body's error by part and granularity (docs/results/ptq161.md).
// The instruction set of the Int8 body is picked at run time from cpuid (best available:
// AVX-512 VNNI / AVX-VNNI on 256-bit vectors, else AVX2, else portable C++), or forced for tests.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "lowbit/core/tensor.h"

namespace lowbit::ops {

enum class PackedLayout : uint8_t {
  Generic, IntGroups, GgmlQ4_0, GgmlQ4_1, GgmlQ8_0, GgmlTQ2_0, GgmlTQ1_0, TritPlanes, SalientBinary, SignValue
};

// A packed weight's copy on the GPU, in the layout the CUDA kernels read (ops/cuda/quant_gemv.cuh
// documents it): codes U8 [out, in / 32 blocks of 8, 16 or 32 bytes] and group parameters F16
// [out, n_groups, 2] = (s, z) with w = (q - z) s, or (d, m) with w = d q + m when `offset`.
// lowbit's IntGroups codes are uploaded as stored (int8: as signed q - 128, z - 128); ggml blocks
// are split into their codes and (d, 8), (d, m) or (d, 0). Built once by upload_packed_weight.
struct DevicePackedWeight {
  Tensor codes, params;
  int64_t out = 0, in = 0, row_bytes = 0, group_size = 0, n_groups = 0;
  int bits = 0;
  int order = 8;        // element order inside a 32-value block: 8 natural, 4 / 2 lowbit's bit order
  bool offset = false;
  // Multiplies the whole product (quant_matmul's y, quant_embedding's rows) after the kernels: the
  // ternary format's f32 gamma, whose groups carry an f16 scale of 1 (exact, as on the CPU's `post`).
  float post = 1.0f;
  bool defined() const { return codes.defined(); }
};

struct PackedWeight {
  int64_t out = 0, in = 0;
  const char* format = "";  // the format's name, for messages (a static string)
  PackedLayout layout = PackedLayout::Generic;
  int64_t row_bytes = 0;        // packed bytes per row (every layout but Generic); also the row stride
  const uint8_t* codes = nullptr;  // every layout but Generic
  // IntGroups and TritPlanes (bits 2; scales = a1, zeros = a2) only:
  int bits = 0;                 // 2, 4 or 8
  int64_t group_size = 0;       // columns per group (== in for per-channel formats)
  int64_t n_groups = 0;         // groups per row
  const uint16_t* scales = nullptr;  // f16 [out, n_groups], or null: every group's scale is tensor_scale
  float tensor_scale = 1.0f;         // null scales only (ternary gamma)
  const uint16_t* zeros = nullptr;   // f16 [out, n_groups], or null: implicit zero
  float implicit_zero = 0.0f;
  // SalientBinary only (scales / zeros above are [out, 2]: (alpha, s) and (mu, z)):
  int64_t salient = 0;                  // salient columns k (set bits of col_mask)
  const uint8_t* col_mask = nullptr;    // [ceil(in / 8)]
  const uint16_t* col_scales = nullptr;  // f16 [in - salient]; SignValue: f16 [in], g
  // SignValue: scales = h (f16 [out, 1]), col_scales = g (f16 [in]), bits 1, n_groups 1.
  // Every layout: decodes row r into dst[0, in). Must be callable from several threads at once.
  std::function<void(int64_t row, float* dst)> dequantize_row;
  // The copy on the GPU (CUDA calls need it), or null.
  const DevicePackedWeight* device = nullptr;
  // The ternary format only: the lookup-table (TL) index form of the codes (quant_matmul_to_tl_layout,
  // built once at load: tl_bytes(w) bytes, the same size as the codes), or null. The Int8 body's TL
  // kernel reads it (QuantMatmulOptions::ternary); every other body reads `codes`.
  const uint8_t* tl_codes = nullptr;
  // 0: `codes` in the storage layout above (row after row). H (8 or 16): the CPU panel layout of
  // H rows (quant_matmul_to_panel_layout below) for the rows [0, out - out % H); the rows after them
  // keep the storage layout.
  int64_t panel_rows = 0;
};

enum class QuantMatmulPath : uint8_t { Auto, Reference, Exact, Int8 };
enum class QuantIsa : uint8_t { Auto, Portable, Avx2, Avx2Vnni };
// The CUDA decode GEMV (ops/cuda/quant_gemv.cuh): V1 the first kernel; V2 each lane's code loads
// of a chunk issued before its arithmetic; V2Pdl V2 launched with programmatic dependent launch
// (the GEMV's launch and first weight loads overlap the activation quantization kernel). Auto:
// LOWBIT_CUDA_GEMV (v1, v2, v2pdl), else V2Pdl (fastest or tied in every row of quant_gemv_bench on
// an H100, 2026-12-07; V1 where the device lacks sm_90: launch_kernel falls back to a plain launch).
enum class CudaGemv : uint8_t { Auto, V1, V2, V2Pdl };
// The Int8 body's kernel for the ternary format (CPU): Plain the 2-bit code kernels (int8 dot
// products of codes and activations, ternary_rows in quant_matmul_x86.inc); Lut the lookup-table
// kernel (bitnet.cpp TL1 / T-MAC style, "The ternary lookup-table layout" below), which needs
// w.tl_codes (a call that asks for it without them throws). Auto: Lut when w.tl_codes is set (the
// loader builds them only when LOWBIT_TERNARY_KERNEL=lut, quant_ternary_lut_enabled), else Plain.
enum class TernaryBody : uint8_t { Auto, Plain, Lut };

struct QuantMatmulOptions {
  QuantMatmulPath path = QuantMatmulPath::Auto;
  // Int8 body, and the Exact body's f32 kernel (every ISA gives it the same numbers); a forced ISA
  // the CPU lacks throws.
  QuantIsa isa = QuantIsa::Auto;
  // Int8 body, AVX2 / VNNI: weight rows in panels of 8 through the GEMM kernel (decoded once, reused
  // for all M activation rows; SalientBinary: every row through its panel kernel). false: the
  // four-row kernels only (the body before the GEMM kernel; benchmarks compare the two in one run).
  // Either gives a row the same numbers whatever M is.
  bool int8_panels = true;
  CudaGemv cuda_gemv = CudaGemv::Auto;  // CUDA Int8 body only
  TernaryBody ternary = TernaryBody::Auto;  // CPU Int8 body, the ternary format only
};

// Largest token count the Auto path sends to the Int8 (decode) body.
inline constexpr int64_t kQuantDecodeMaxRows = 8;

// While alive, the Auto path of quant_matmul calls made on this thread (CPU) sends products of up to
// `max_rows` rows (instead of kQuantDecodeMaxRows) to the Int8 body: serving's mixed steps run the
// decode rows and short prompt pieces of several sequences in one product (the weights are read
// once; every row's numbers are those it gets alone, the Int8 body being row-independent).
// Nests; restores the previous limit.
class QuantInt8RowsScope {
 public:
  explicit QuantInt8RowsScope(int64_t max_rows);
  ~QuantInt8RowsScope();
  QuantInt8RowsScope(const QuantInt8RowsScope&) = delete;
  QuantInt8RowsScope& operator=(const QuantInt8RowsScope&) = delete;

 private:
  int64_t previous_;
};

// While alive, the Auto path of quant_matmul calls made on this thread (CPU) keeps prompt-sized
// products (more rows than the Int8 limit) of SalientBinary (ptq161) weights on the Exact body, as
// before their panel kernel made Int8 the prefill default: the block-wise quantization pipeline
// opens it, so ptq161 quantization (calibration forwards through quantized blocks) gives the same
// models as before. Nests.
class QuantSalientPrefillExactScope {
 public:
  QuantSalientPrefillExactScope();
  ~QuantSalientPrefillExactScope();
  QuantSalientPrefillExactScope(const QuantSalientPrefillExactScope&) = delete;
  QuantSalientPrefillExactScope& operator=(const QuantSalientPrefillExactScope&) = delete;
};

// While alive, CPU products on this thread quantize their activations as `--act int8` / `int4`
// (symmetric, per token) does: one scale per row, d = max|x_row| / qmax with qmax = 2^(bits-1) - 1,
// codes nearbyint(x / d) in [-qmax, qmax] (int8 lanes for both widths), instead of one d per block of
// 32; and the Auto path sends products of every row count on the plain layouts (IntGroups, ggml
// q4_0 / q4_1 / q8_0) to the Int8 body (integer dot products: the packed W4A8 / W4A4 product). The
// ternary layouts' body (ternary format, TQ2_0, TQ1_0: Int8 on Auto at every row count already)
// takes the same per-row scale for all its blocks of 256 (BitNet v2's W1.58A4 checkpoints); the
// TritPlanes and SalientBinary bodies keep their own activation blocks. On an input that is
// already fake-quantized per row to that grid with clip 1 (model/rotation.h's act_fake_quant: x =
// q s) the codes come back as q and d as s to f32 rounding, so the product equals the simulation's
// x · dequant(W)^T up to f32 summation order (tests: test_quant_matmul.cpp). Nests; restores the
// previous setting.
class QuantActPerRowScope {
 public:
  explicit QuantActPerRowScope(int bits);
  ~QuantActPerRowScope();
  QuantActPerRowScope(const QuantActPerRowScope&) = delete;
  QuantActPerRowScope& operator=(const QuantActPerRowScope&) = delete;

 private:
  int previous_;
};

// While alive, CPU Int8-body products on this thread that read the same input (same pointer, rows,
// width, activation order and ISA) as the previous one quantize it once: the second and later
// reuse its int8 activations and their panel copy (the numbers are those of a fresh quantization,
// which is deterministic). The caller promises not to write the input meanwhile: the attention's
// q / k / v projections read one normed input, as the MLP's gate and up do (serving's batched steps
// quantized each of those inputs three or two times). Nests; each scope starts and ends empty.
class QuantSharedInputScope {
 public:
  QuantSharedInputScope();
  ~QuantSharedInputScope();
  QuantSharedInputScope(const QuantSharedInputScope&) = delete;
  QuantSharedInputScope& operator=(const QuantSharedInputScope&) = delete;
};

// x: f32 [M, in] contiguous on the CPU; y: f32 [M, out] (written). Throws lowbit::Error on a shape,
// dtype or device mismatch, or an IntGroups view whose fields are inconsistent.
// On CUDA (x and y f32 on the GPU, w.device set): Auto and Int8 with M <= 8 run the decode GEMV
// (int8 activations per block of 32, the CPU Int8 body's operand, dp4a); Exact, Reference and
// M > 8 dequantize tiles of rows to f32 on the GPU and multiply them with cuBLAS (TF32 only when
// allowed, device_init.h). Never builds the whole f32 weight.
void quant_matmul(const Tensor& x, const PackedWeight& w, Tensor& y, const QuantMatmulOptions& opt = {});

// ys[i] = x · dequant(*ws[i])^T for several weights that read one input (a layer's q / k / v, or
// gate / up): each product's numbers are those of quant_matmul(x, *ws[i], *ys[i], opt). When every
// product takes the CPU's Int8 body on a plain layout (IntGroups, ggml q4_0 / q4_1 / q8_0) with the
// same activation order, x is quantized once and the tasks of all the products are handed to the
// thread pool in one parallel region (one wait for the slowest thread instead of one per product);
// otherwise one quant_matmul after the other.
void quant_matmul_many(const Tensor& x, const std::vector<const PackedWeight*>& ws, const std::vector<Tensor*>& ys,
                       const QuantMatmulOptions& opt = {});

// True when the weight has a GPU form: IntGroups with f16 scales, in % 32 == 0 and whole 32-value
// blocks per group (or one group per row), and the ggml q4_0 / q4_1 / q8_0 layouts.
bool quant_matmul_has_cuda_layout(const PackedWeight& w);
// Whether models use the packed CUDA path (QuantLinear on CUDA, packed vocabulary on CUDA). ON by
// default since it passed bench/cuda/packed_gpu.sh on an H100 (2026-12-06: GEMV within 1e-7 of the
// CPU int8 body, the GPU parity cells, the packed-model tests); LOWBIT_CUDA_PACKED=0 in the
// environment (or set_cuda_packed_enabled(false)) keeps the dense weight built on the device, which
// prefills faster (the f32 tile dequantization is slow: docs/results/packed-inference.md).
bool cuda_packed_enabled();
void set_cuda_packed_enabled(bool on);
// Builds the GPU copy (host-side repacking, one upload). Throws when there is no GPU form or the
// build has no CUDA.
DevicePackedWeight upload_packed_weight(const PackedWeight& w);
// The same layout in host memory (what upload_packed_weight copies; tests check it on the CPU).
DevicePackedWeight device_layout_on_host(const PackedWeight& w);
// Embedding lookup from a packed table on the GPU: out[i, :] = row ids[i] of w, f32 [n, in].
// ids: i32 [n] on the CPU or the GPU (an id outside [0, out) throws).
void quant_embedding(const PackedWeight& w, const Tensor& ids, Tensor& out);
// "auto", "int8", "exact", "reference" -> the path; throws lowbit::Error naming `what` otherwise.
QuantMatmulPath parse_quant_matmul_path(const std::string& name, const std::string& what = "--matmul");
// The path every call with options.path == Auto takes (Auto: LOWBIT_QUANT_MATMUL, else the M rule).
void set_quant_matmul_default(QuantMatmulPath path);
QuantMatmulPath quant_matmul_default();

// What the CPU supports, and the ISA Auto picks.
bool quant_isa_supported(QuantIsa isa);
QuantIsa quant_isa_best();
const char* quant_isa_name(QuantIsa isa);
// True when the Int8 body has an integer kernel for this weight (otherwise Int8 falls back to Exact).
bool quant_matmul_has_int8_kernel(const PackedWeight& w);
// Values per int8 activation block (one scale d = amax/127 each) of the Int8 body for this weight:
// 256 for the ternary layouts (the ternary format: 2-bit IntGroups with a tensor scale; ggml tq2_0,
// tq1_0), 32 otherwise. The error bound above holds with d over blocks of this size.
int64_t quant_matmul_act_block(const PackedWeight& w);
// ---- The CPU panel layout (repacked once at load) -------------------------------------------
// The Int8 body's x86 panel kernel reads H weight rows at a time (16 with AVX-512 VNNI, 8 on
// 256-bit vectors) and decodes each 32-value block of the H rows into an interleaved tile: lane r of
// vector c holds the 4 codes at positions 4c..4c+3 of row r. In the storage layout that takes a
// dword transpose of H strided rows per block (and a gather of H scales). The panel layout stores
// the same bytes in that order once: rows [0, out - out % H) in panels of H consecutive rows; panel
// p keeps the byte span of its rows ([p H row_bytes, (p + 1) H row_bytes)), block after block, each
// block's H * block_bytes bytes as
//   ggml q4_0 / q8_0:  d[H] (f16), then the codes;   q4_1: d[H], m[H] (f16), then the codes;
//   IntGroups 2/4/8-bit:  the codes (scales and zeros stay in their own [out, n_groups] arrays);
//   the codes: dword k of the block's code bytes of row l at byte 4 (k H + l), k < bits (4 bytes per
//   dword: 2 dwords of 2-bit, 4 of 4-bit, 8 of 8-bit codes per 32 values).
// A lossless permutation of the same bytes (same size, done in place): the tile decode becomes
// contiguous loads, masks and shifts. The rows after the last whole panel stay as stored. The
// Int8 body's x86 panel kernels read it directly (any ISA whose panel height divides H); the
// Reference and Exact bodies decode rows through dequantize_row (which must read the layout) or
// gather each IntGroups row's bytes (quant_matmul_row_bytes); the portable and four-row Int8
// kernels get a row-layout copy of the codes for the call; CUDA refuses it (the GPU copy is built
// from the row layout). So every body's numbers are those of the storage layout, bit for bit.
// Supported: ggml q4_0 / q4_1 / q8_0, IntGroups with 2/4/8-bit codes, f16 scales, in % 32 == 0 and
// groups of whole blocks (not the ternary format's tensor scale), at least H rows.
bool quant_matmul_panel_layout_supported(const PackedWeight& w, int64_t height);
// H the best ISA's panel kernel reads for this weight (quant_isa_best()), or 0 (no panel kernel,
// or a weight the panel layout does not support).
int64_t quant_matmul_panel_height(const PackedWeight& w);
// In place: `codes` (w's codes, out * row_bytes bytes, writable) from the storage layout to the panel
// layout of `height` rows (w.panel_rows must be 0), and back (w.panel_rows = the height). Throws
// when the layout does not support the weight.
void quant_matmul_to_panel_layout(const PackedWeight& w, int64_t height, uint8_t* codes);
void quant_matmul_to_row_layout(const PackedWeight& w, uint8_t* codes);
// The storage-layout bytes of row `row` (row_bytes of them) whatever w.panel_rows is.
void quant_matmul_row_bytes(const PackedWeight& w, int64_t row, uint8_t* dst);
// Whether CPU inference loads (cli's load_model) rearrange packed weights into the panel layout:
// LOWBIT_PANEL_LAYOUT=1 / 0 in the environment, else the default (docs/results/packed-inference.md,
// "Panel layout at load", says which and why); set_quant_panel_layout_enabled overrides both.
bool quant_panel_layout_enabled();
void set_quant_panel_layout_enabled(bool on);

// ---- The ternary lookup-table (TL) layout (repacked once at load) -----------------------------
// The lookup-table kernel (bitnet.cpp's TL1 on x86 / T-MAC: arXiv 2407.00088, 2410.16144) for the
// ternary format. The activations are the ternary body's int8 operand (per block of 256, d =
// amax / 127, values in its slot order, qmm::ternary_slot_source), so the integer sums and the error
// bound are the plain kernel's. Per activation row, each pair of slots (2k, 2k+1) of a block gets a
// table of the 9 partial sums e(c0, c1) = (c0 - 1) a_2k + (c1 - 1) a_2k+1 (c in {0, 1, 2}, index
// 3 c0 + c1; |e| <= 254, int16, stored as a 16-byte plane of low bytes and one of high bytes), built
// once per call; a weight pair is then a 4-bit index into its table, and 32 weight rows are looked up
// at once by a byte shuffle (vpshufb) per plane, the int16 sums kept per block (128 pairs x 254 <
// 2^15: exact), then one f32 multiply-add by d per block and row.
// The index form (w.tl_codes, quant_matmul_tl_bytes: 2 bits per weight of the tiled rows, the
// partial last block padded to 256): rows [0, out - out % 32) in tiles of 32 rows (the rows after
// them take the plain kernel); tile t, block b (nb = ceil(in / 256) of them), couple c (pairs 2c
// and 2c + 1, c < 64): 32 bytes at ((t nb + b) 64 + c) 32, byte p for row 32 t + tl_row(p) (tl_row:
// bytes 0-7 rows 0-7, 8-15 rows 16-23, 16-23 rows 8-15, 24-31 rows 24-31 — the order the int16
// unpack leaves them), the index of pair 2c in its low nibble, of pair 2c + 1 in its high nibble.
// Pair k of a full block is the operand's slots (2k, 2k + 1) (ternary_slot_source order); of the
// partial last block, values (2k, 2k + 1) in natural order (the operand's order there), with zero
// weights (code 1) past the row's end, so that block runs through the tables too.
inline constexpr int64_t kTernaryLutRows = 32;
// The ternary format (2-bit IntGroups codes with a tensor scale, storage layout) with at least 32 rows.
bool quant_matmul_tl_supported(const PackedWeight& w);
int64_t quant_matmul_tl_bytes(const PackedWeight& w);
// Writes the index form of w's codes into dst (quant_matmul_tl_bytes(w) bytes). Throws when the
// weight is not supported.
void quant_matmul_to_tl_layout(const PackedWeight& w, uint8_t* dst);
// Whether CPU inference loads (cli's load_model) build the TL index form of ternary weights, which
// makes Auto take the lookup-table kernel: LOWBIT_TERNARY_KERNEL=lut / plain in the environment
// (default plain: docs/results/bitnet.md, "Lookup-table kernel", says why);
// set_quant_ternary_lut_enabled overrides it.
bool quant_ternary_lut_enabled();
void set_quant_ternary_lut_enabled(bool on);

// True when Auto sends products of any row count (prefill too) to the Int8 body for this weight:
// the ternary layouts (whose int8 kernels are faster than dequantized f32 tiles at every prompt
// length measured) and SalientBinary when the CPU has its x86 panel kernel (AVX2 or better).
// Other layouts take Int8 only up to kQuantDecodeMaxRows (or QuantInt8RowsScope).
bool quant_matmul_int8_prefill(const PackedWeight& w);

}  // namespace lowbit::ops
