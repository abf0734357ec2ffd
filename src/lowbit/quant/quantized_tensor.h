// A quantized weight matrix in one of the formats of format.h: packed codes plus the metadata the
// format's table row says it has. The storage layout is documented at the top of format.h; for
// ggml block formats `codes` holds the raw ggml blocks of each row and nothing else is set.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "lowbit/core/tensor.h"
#include "lowbit/ops/quant_matmul.h"
#include "lowbit/quant/format.h"

namespace lowbit {

struct QuantizedTensor {
  QuantFormatId format = QuantFormatId::Int4G128;
  Shape shape;          // [out, in] of the original weight
  Tensor codes;         // U8 [out, row_bytes(in)] (ggml block formats: the raw blocks)
  Tensor scales;        // [out, n_groups(in)], dtype scale_dtype(format); undefined for ternary
  Tensor zeros;         // F16 [out, n_groups(in)], integer values; asymmetric int only (trit
                        // planes: the second plane's scale a2)
  Tensor tensor_scale;  // F32 [1]; ternary and nvfp4 only
  // Formats with a column mask (has_column_mask(): ptq161) only, undefined otherwise:
  Tensor col_mask;      // U8 [ceil(in/8)]: bit j % 8 of byte j / 8 set = column j is salient
  Tensor col_scales;    // F16 [in - k]: the factor r_j of each binary column, in column order
                        // (onebit: F16 [in], the value g_j of every column; no col_mask)

  const QuantFormat& fmt() const { return quant_format(format); }
  int64_t out_features() const { return shape.at(0); }
  int64_t in_features() const { return shape.at(1); }
  // Salient columns (set bits of col_mask; 0 for formats without a mask) and the packed bytes of one
  // row of `codes` (the format's row_bytes, or masked_row_bytes(in, salient()) with a mask).
  int64_t salient() const;
  int64_t row_bytes() const;

  // Checks shapes and dtypes against the format (a packed size mismatch, a missing zero tensor,
  // ...) and throws lowbit::Error naming the field. Called by dequantize() and by loaders.
  void validate() const;
  // Scans the codes for values the format never produces (trit-plane pair codes above 8; ptq161:
  // a set padding bit of a row's sign bits or 4-bit codes; onebit: a set padding bit after a row's
  // sign bits) and throws naming the row and column; a no-op for the other formats (every code
  // value decodes).
  // O(size): loaders call it once, validate() does not.
  void check_codes() const;

  // Decoded parameters of group g of row r, and the unpacked codes of row r (lowbit's own formats;
  // ggml block formats keep these inside their blocks and throw).
  float tensor_scale_value() const;  // 1 when the format has none
  GroupParams group_params(int64_t row, int64_t g) const;
  void unpack_row(int64_t row, uint8_t* codes) const;  // `in` codes (ptq161: sign bit or 4-bit code)

  // The f32 values of row `row` (in_features() floats), exactly as dequantize() computes them, for
  // every format (lowbit's and ggml's). The reference body of packed kernels. Does not validate()
  // (call it once first); row must be in [0, out).
  void dequantize_row(int64_t row, float* out) const;
  Tensor dequantize() const;  // F32 [out, in] on the CPU
  // The op layer's view of this tensor for ops::quant_matmul (pointers into this object's storage:
  // valid while it lives and is not modified). Validates first. Carries the GPU copy when one was
  // made (upload_to_device).
  ops::PackedWeight packed_view() const;
  // Makes the GPU copy of the packed codes and group parameters (once; copies of this object made
  // afterwards share it) for quant_matmul on CUDA. Throws when the format has no GPU form
  // (ops::quant_matmul_has_cuda_layout) or the build has no CUDA.
  void upload_to_device() const;
  bool has_device_copy() const { return device_copy_ != nullptr; }
  int64_t nbytes() const;     // bytes of all tensors (host copy)

  // Pieces of the weight for tensor parallelism (model/tensor_parallel.h), in the same format, the
  // codes and group parameters copied (never re-rounded): output rows [r0, r1) (any rows), or input
  // columns [c0, c1) where c0 and c1 (unless c1 = in) are multiples of column_shard_unit(), so the
  // piece keeps whole groups / ggml blocks and whole int8 activation blocks of the Int8 body (a row's
  // partial product is then the same integer products as the whole row's, summed in another order).
  // Throws lowbit::Error naming the format otherwise. The GPU copy is not carried over.
  QuantizedTensor slice_rows(int64_t r0, int64_t r1) const;
  QuantizedTensor slice_cols(int64_t c0, int64_t c1) const;
  // The group or block size, times what the Int8 body's activation blocks (32, or 256 for the
  // ternary layouts) need (lcm); 1 for per-channel formats without an integer kernel; 0 when the
  // input columns cannot be split (ptq161: its column mask and row layout are per tensor).
  int64_t column_shard_unit() const;

  // The CPU panel layout (ops/quant_matmul.h, "The CPU panel layout"): 0 while `codes` hold the
  // storage layout above; H (8 or 16) once to_panel_layout() has rearranged them, in place, into
  // panels of H rows for the x86 panel kernels of the Int8 body. dequantize_row / dequantize /
  // unpack_row and every quant_matmul body read either layout (same numbers, bit for bit);
  // slice_rows / slice_cols, upload_to_device and the checkpoint writers need the storage layout
  // and refuse this one: row_layout() gives it back.
  int64_t panel_rows = 0;
  // Rearranges the codes into the panel layout the best ISA's panel kernel reads
  // (ops::quant_matmul_panel_height), in place when this object's codes own their memory (else into
  // a new buffer that replaces them: a read-only file mapping). Returns false and changes nothing when
  // the format, shape or CPU has no panel layout. Storage shared with other QuantizedTensors changes
  // under them too: call it on the one owner (load_model: before the model takes copies).
  bool to_panel_layout();
  // This tensor in the storage layout: *this when it is in it (sharing storage), else a copy with
  // the codes converted back.
  QuantizedTensor row_layout() const;

  // The ternary format's lookup-table index form (ops/quant_matmul.h, "The ternary lookup-table
  // layout"): U8 [quant_matmul_tl_bytes], a second copy of the codes in another order, or undefined.
  // Built by to_tl_layout() (the loader: LOWBIT_TERNARY_KERNEL=lut); packed_view() hands it to the
  // CPU Int8 body, which then takes the lookup-table kernel. Not saved, not carried by slices; a
  // change to `codes` afterwards must drop it (tl_codes = Tensor()).
  Tensor tl_codes;
  // Builds tl_codes (once). Returns false and changes nothing when the weight has no such form.
  bool to_tl_layout();

  mutable std::shared_ptr<const ops::DevicePackedWeight> device_copy_;  // see upload_to_device
};

// Builds a QuantizedTensor from unpacked codes [out*in] (row-major) and per-group parameters
// [out*n_groups] (row-major) that came from the format's params_from_range. Storage rounding of the
// parameters is exact for such parameters; anything else throws.
QuantizedTensor make_quantized_tensor(const QuantFormat& f, int64_t out, int64_t in, const uint8_t* codes,
                                      const GroupParams* params, float tensor_scale);

// Wraps raw ggml blocks (U8 [out, row_bytes(in)], e.g. a GGUF tensor's data) as a QuantizedTensor
// of the ggml block format f; `what` names the tensor in errors (wrong size, `in` not a multiple of
// the block size).
QuantizedTensor make_ggml_quantized_tensor(const QuantFormat& f, int64_t out, int64_t in, Tensor blocks,
                                           const std::string& what);

}  // namespace lowbit
