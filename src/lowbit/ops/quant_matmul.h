// quant_matmul: y = x · dequant(W)^T with W kept packed (issue 10). The op layer cannot see
// quant/ (layering core → ops → ... → quant), so the weight arrives as a `PackedWeight` view that
// quant/QuantizedTensor::packed_view() builds: raw pointers into the packed storage plus a
// `dequantize_row` callback that decodes one row of any format (the reference body uses only that,
// so every format runs, slowly but exactly). Formats the fast kernels know describe their layout:
//
//   IntGroups  lowbit's uniform integer formats with 2, 4 or 8-bit codes (int2/int4 groups, asym and
//              sym, per-channel, int8pc): codes U8 [out, row_bytes], each row little-endian packed
//              (format.h), one f16 scale per group, an f16 zero per group (asym) or the implicit zero
//              2^(bits-1) (sym); w = (q - z) * s.
//   GgmlQ4_0, GgmlQ4_1, GgmlQ8_0
//              ggml's blocks of 32 (core/ggml_blocks.h) as stored in GGUF: codes U8 [out, row_bytes],
//              `in` a multiple of 32; w = d (q - 8), d q + m, d q.
//
// Bodies (QuantMatmulOptions::path):
//   Reference   row by row: dequantize_row, then f32 dot products (the oracle the tests use).
//   Exact       f32 activations: decode (M <= 8) dequantizes one row at a time into a thread-local
//               buffer; prefill dequantizes tiles of rows and multiplies them with the BLAS sgemm.
//               Equal to Reference up to f32 summation order (tests: 1e-5).
//   Int8        activations quantized per block of 32 to int8 (d = amax/127, as llama.cpp's Q8_0),
//               integer dot products per block, f32 accumulation across blocks. Error bound per output:
//               sum_i |w_i| * d_block(i) / 2 (the activation rounding), plus f32 rounding.
//   Auto        Int8 for M <= 8 when the layout has an integer kernel, Exact otherwise. A
//               process-wide default (set_quant_matmul_default: the CLI's --matmul) overrides it,
//               else the environment variable LOWBIT_QUANT_MATMUL=int8|exact|reference does.
// The instruction set of the Int8 body is picked at run time from cpuid (best available:
// AVX-512 VNNI / AVX-VNNI on 256-bit vectors, else AVX2, else portable C++), or forced for tests.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

#include "lowbit/core/tensor.h"

namespace lowbit::ops {

enum class PackedLayout : uint8_t { Generic, IntGroups, GgmlQ4_0, GgmlQ4_1, GgmlQ8_0 };

struct PackedWeight {
  int64_t out = 0, in = 0;
  const char* format = "";  // the format's name, for messages (a static string)
  PackedLayout layout = PackedLayout::Generic;
  int64_t row_bytes = 0;        // packed bytes per row (every layout but Generic)
  const uint8_t* codes = nullptr;  // every layout but Generic
  // IntGroups only:
  int bits = 0;                 // 2, 4 or 8
  int64_t group_size = 0;       // columns per group (== in for per-channel formats)
  int64_t n_groups = 0;         // groups per row
  const uint16_t* scales = nullptr;  // f16 [out, n_groups]
  const uint16_t* zeros = nullptr;   // f16 [out, n_groups], or null: implicit zero
  float implicit_zero = 0.0f;
  // Every layout: decodes row r into dst[0, in). Must be callable from several threads at once.
  std::function<void(int64_t row, float* dst)> dequantize_row;
};

enum class QuantMatmulPath : uint8_t { Auto, Reference, Exact, Int8 };
enum class QuantIsa : uint8_t { Auto, Portable, Avx2, Avx2Vnni };

struct QuantMatmulOptions {
  QuantMatmulPath path = QuantMatmulPath::Auto;
  QuantIsa isa = QuantIsa::Auto;  // Int8 body only; a forced ISA the CPU lacks throws
};

// Largest token count the Auto path sends to the Int8 (decode) body.
inline constexpr int64_t kQuantDecodeMaxRows = 8;

// x: f32 [M, in] contiguous on the CPU; y: f32 [M, out] (written). Throws lowbit::Error on a shape,
// dtype or device mismatch, or an IntGroups view whose fields are inconsistent.
void quant_matmul(const Tensor& x, const PackedWeight& w, Tensor& y, const QuantMatmulOptions& opt = {});

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

}  // namespace lowbit::ops
