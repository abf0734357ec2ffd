// The packed storage of a PTQ1.61 layer (methods/ptq161.h) and the layer that runs it.
//
// PTQ1.61's code width depends on the input column (4 bits on salient columns, 1 bit elsewhere,
// chosen by a per-tensor column mask), which the per-group codecs of the format table
// (quant/format.h) cannot express; this is its own small container, written to and read from the
// quantized checkpoint (io/quantized_checkpoint.h) and the pipeline's resumable state as five
// tensors. Decoding (per weight W[i, j], k = number of salient columns):
//   salient column j   : (q - z_i) * s_i                q = 4-bit code, s_i, z_i f16 (int4pc codec)
//   other column j     : r_j * (mu_i + alpha_i * b)     b = +1 / -1 from the sign bit
// Tensors:
//   mask   U8  [ceil(in/8)]               bit (j % 8) of byte j / 8 set: column j is salient
//   signs  U8  [out, ceil((in-k)/8)]      bit t of a row: the t-th non-salient column, 1 = +1
//   q4     U8  [out, ceil(k/2)]           4-bit codes of the salient columns in column order
//                                         (low nibble first, as lowbit's 4-bit packing)
//   rows   F16 [out, 4]                   alpha_i, mu_i, s_i, z_i
//   cols   F16 [in-k]                     r_j of the non-salient columns in column order
// bits_per_weight counts every stored byte (row padding included).
// The layer (Ptq161Linear) keeps the decoded weight dense and computes x W^T like a DenseLinear:
// lowbit has no packed kernel for this layout (the dequantized fallback).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "lowbit/core/tensor.h"
#include "lowbit/model/linear.h"

namespace lowbit {

struct Ptq161Tensor {
  int64_t out = 0, in = 0;
  Tensor mask, signs, q4, rows, cols;

  int64_t salient() const;  // number of salient columns (set bits of mask)
  // Checks dtypes and shapes against out, in and the mask, and that no padding bit is set; throws
  // lowbit::Error naming `what` and the field.
  void validate(const std::string& what = "ptq161") const;
  Tensor dequantize() const;  // F32 [out, in]; validates first
  int64_t storage_bytes() const;
  double bits_per_weight() const { return double(storage_bytes()) * 8.0 / double(out * in); }
};

// Packs unpacked fields (row-major): mask [in] (0/1), sign [out*in] (+-1 on non-salient columns,
// ignored elsewhere), q4 [out*in] (codes 0..15 on salient columns, ignored elsewhere), alpha, mu,
// s4, z4 [out] and col [in] (used on non-salient columns); every factor is rounded to f16.
Ptq161Tensor pack_ptq161(int64_t out, int64_t in, const std::vector<uint8_t>& mask, const std::vector<int8_t>& sign,
                         const std::vector<uint8_t>& q4, const std::vector<double>& alpha,
                         const std::vector<double>& mu, const std::vector<float>& s4, const std::vector<float>& z4,
                         const std::vector<double>& col);

class Ptq161Linear : public DenseLinear {
 public:
  // The decoded weight is computed from `packed` (on `device`); bias [out] or undefined.
  Ptq161Linear(Ptq161Tensor packed, Tensor bias, Device device = Device::CPU);
  std::string kind() const override { return "ptq161"; }
  const Ptq161Tensor& packed() const { return packed_; }

 private:
  Ptq161Tensor packed_;
};

}  // namespace lowbit
