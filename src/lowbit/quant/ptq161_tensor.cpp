#include "lowbit/quant/ptq161_tensor.h"

#include <bit>
#include <cstring>

#include "lowbit/core/dtype.h"
#include "lowbit/core/error.h"

namespace lowbit {

namespace {

int64_t bytes_for_bits(int64_t n) { return (n + 7) / 8; }
uint16_t* f16_ptr(const Tensor& t) { return static_cast<uint16_t*>(t.raw_data()); }

void check_legacy(const Tensor& t, const std::string& what, const char* field, DType dt, const Shape& shape) {
  if (!t.defined()) throw_error(what, ": missing ptq161 tensor '", field, "'");
  if (t.dtype() != dt || t.shape() != shape || t.device() != Device::CPU)
    throw_error(what, ": ptq161 tensor '", field, "' is ", t.describe(), ", expected ", dtype_name(dt), " ",
                shape_str(shape), " (on the CPU)");
}

}  // namespace

QuantizedTensor pack_ptq161(int64_t out, int64_t in, const std::vector<uint8_t>& mask, const std::vector<int8_t>& sign,
                            const std::vector<uint8_t>& q4, const std::vector<double>& alpha,
                            const std::vector<double>& mu, const std::vector<float>& s4, const std::vector<float>& z4,
                            const std::vector<double>& col) {
  LB_CHECK(out > 0 && in > 0 && int64_t(mask.size()) == in && int64_t(sign.size()) == out * in &&
               int64_t(q4.size()) == out * in && int64_t(alpha.size()) == out && int64_t(mu.size()) == out &&
               int64_t(s4.size()) == out && int64_t(z4.size()) == out && int64_t(col.size()) == in,
           "pack_ptq161: inconsistent sizes for a [", out, ", ", in, "] layer");
  int64_t k = 0;
  for (uint8_t m : mask) k += m ? 1 : 0;
  QuantizedTensor q;
  q.format = QuantFormatId::PTQ161;
  q.shape = {out, in};
  const int64_t sb = bytes_for_bits(in - k), rb = FormatTraits::masked_row_bytes(in, k);
  q.col_mask = Tensor::zeros({bytes_for_bits(in)}, DType::U8);
  q.col_scales = Tensor::empty({in - k}, DType::F16);
  q.codes = Tensor::zeros({out, rb}, DType::U8);
  q.scales = Tensor::empty({out, 2}, DType::F16);
  q.zeros = Tensor::empty({out, 2}, DType::F16);
  uint8_t* pm = q.col_mask.data<uint8_t>();
  uint8_t* pcodes = q.codes.data<uint8_t>();
  uint16_t* pc = f16_ptr(q.col_scales);
  uint16_t* ps = f16_ptr(q.scales);
  uint16_t* pz = f16_ptr(q.zeros);
  for (int64_t j = 0, t = 0; j < in; ++j) {
    if (mask[size_t(j)]) pm[j / 8] = uint8_t(pm[j / 8] | (1u << (j % 8)));
    else pc[t++] = f32_to_f16(float(col[size_t(j)]));
  }
  for (int64_t i = 0; i < out; ++i) {
    ps[i * 2] = f32_to_f16(float(alpha[size_t(i)]));
    ps[i * 2 + 1] = f32_to_f16(s4[size_t(i)]);
    pz[i * 2] = f32_to_f16(float(mu[size_t(i)]));
    pz[i * 2 + 1] = f32_to_f16(z4[size_t(i)]);
    uint8_t* row = pcodes + i * rb;
    int64_t t = 0, u = 0;
    for (int64_t j = 0; j < in; ++j) {
      const size_t e = size_t(i * in + j);
      if (mask[size_t(j)]) {
        LB_CHECK(q4[e] < 16, "pack_ptq161: code ", int(q4[e]), " at row ", i, " column ", j, " is not 4-bit");
        row[sb + u / 2] = uint8_t(row[sb + u / 2] | (q4[e] << (4 * (u % 2))));
        ++u;
      } else {
        if (sign[e] > 0) row[t / 8] = uint8_t(row[t / 8] | (1u << (t % 8)));
        ++t;
      }
    }
  }
  q.validate();
  return q;
}

QuantizedTensor ptq161_from_legacy(int64_t out, int64_t in, const Tensor& mask_in, const Tensor& signs_in,
                                   const Tensor& q4_in, const Tensor& rows_in, const Tensor& cols_in,
                                   const std::string& what) {
  if (out <= 0 || in <= 0) throw_error(what, ": ptq161 layer of shape [", out, ", ", in, "]");
  check_legacy(mask_in, what, "mask", DType::U8, {bytes_for_bits(in)});
  const Tensor mask = mask_in.contiguous();
  if (in % 8 && (mask.data<uint8_t>()[mask.numel() - 1] >> (in % 8)))
    throw_error(what, ": ptq161 mask has bits set beyond column ", in);
  int64_t k = 0;
  for (int64_t b = 0; b < mask.numel(); ++b) k += std::popcount(unsigned(mask.data<uint8_t>()[b]));
  const int64_t sb = bytes_for_bits(in - k), qb = (k + 1) / 2;
  check_legacy(signs_in, what, "signs", DType::U8, {out, sb});
  check_legacy(q4_in, what, "q4", DType::U8, {out, qb});
  check_legacy(rows_in, what, "rows", DType::F16, {out, 4});
  check_legacy(cols_in, what, "cols", DType::F16, {in - k});
  const Tensor signs = signs_in.contiguous(), q4 = q4_in.contiguous(), rows = rows_in.contiguous();
  QuantizedTensor q;
  q.format = QuantFormatId::PTQ161;
  q.shape = {out, in};
  q.col_mask = mask.clone();
  q.col_scales = cols_in.contiguous().clone();
  q.codes = Tensor::empty({out, sb + qb}, DType::U8);
  q.scales = Tensor::empty({out, 2}, DType::F16);
  q.zeros = Tensor::empty({out, 2}, DType::F16);
  const uint16_t* pr = f16_ptr(rows);
  for (int64_t i = 0; i < out; ++i) {
    std::memcpy(q.codes.data<uint8_t>() + i * (sb + qb), signs.data<uint8_t>() + i * sb, size_t(sb));
    std::memcpy(q.codes.data<uint8_t>() + i * (sb + qb) + sb, q4.data<uint8_t>() + i * qb, size_t(qb));
    f16_ptr(q.scales)[2 * i] = pr[4 * i];          // alpha
    f16_ptr(q.zeros)[2 * i] = pr[4 * i + 1];       // mu
    f16_ptr(q.scales)[2 * i + 1] = pr[4 * i + 2];  // s
    f16_ptr(q.zeros)[2 * i + 1] = pr[4 * i + 3];   // z
  }
  try {
    q.validate();
    q.check_codes();
  } catch (const Error& e) {
    throw_error(what, ": ", e.what());
  }
  return q;
}

}  // namespace lowbit
