#include "lowbit/quant/ptq161_tensor.h"

#include <bit>
#include <cmath>

#include "lowbit/core/dtype.h"
#include "lowbit/core/error.h"

namespace lowbit {

namespace {

int64_t bytes_for_bits(int64_t n) { return (n + 7) / 8; }
uint16_t* f16_ptr(const Tensor& t) { return static_cast<uint16_t*>(t.raw_data()); }

void check_tensor(const Tensor& t, const std::string& what, const char* field, DType dt, const Shape& shape) {
  if (!t.defined()) throw_error(what, ": missing ptq161 tensor '", field, "'");
  if (t.dtype() != dt || t.shape() != shape || t.device() != Device::CPU || !t.is_contiguous())
    throw_error(what, ": ptq161 tensor '", field, "' is ", t.describe(), ", expected ", dtype_name(dt), " ",
                shape_str(shape), " (contiguous, on the CPU)");
}

}  // namespace

int64_t Ptq161Tensor::salient() const {
  if (!mask.defined() || mask.dtype() != DType::U8) return 0;
  int64_t k = 0;
  const uint8_t* p = mask.data<uint8_t>();
  for (int64_t b = 0; b < mask.numel(); ++b) k += std::popcount(unsigned(p[b]));
  return k;
}

void Ptq161Tensor::validate(const std::string& what) const {
  if (out <= 0 || in <= 0) throw_error(what, ": ptq161 layer of shape [", out, ", ", in, "]");
  check_tensor(mask, what, "mask", DType::U8, {bytes_for_bits(in)});
  if (in % 8 && (mask.data<uint8_t>()[mask.numel() - 1] >> (in % 8)))
    throw_error(what, ": ptq161 mask has bits set beyond column ", in);
  const int64_t k = salient();
  check_tensor(signs, what, "signs", DType::U8, {out, bytes_for_bits(in - k)});
  check_tensor(q4, what, "q4", DType::U8, {out, (k + 1) / 2});
  check_tensor(rows, what, "rows", DType::F16, {out, 4});
  check_tensor(cols, what, "cols", DType::F16, {in - k});
}

int64_t Ptq161Tensor::storage_bytes() const {
  return int64_t(mask.nbytes() + signs.nbytes() + q4.nbytes() + rows.nbytes() + cols.nbytes());
}

Tensor Ptq161Tensor::dequantize() const {
  validate();
  const int64_t k = salient(), sb = signs.size(1), qb = q4.size(1);
  const uint8_t* pm = mask.data<uint8_t>();
  const uint8_t* ps = signs.data<uint8_t>();
  const uint8_t* pq = q4.data<uint8_t>();
  const uint16_t* pr = f16_ptr(rows);
  const uint16_t* pc = f16_ptr(cols);
  std::vector<float> r(static_cast<size_t>(in - k));
  for (int64_t t = 0; t < in - k; ++t) r[size_t(t)] = f16_to_f32(pc[t]);
  Tensor w = Tensor::empty({out, in});
  float* pw = w.data<float>();
  for (int64_t i = 0; i < out; ++i) {
    const float alpha = f16_to_f32(pr[i * 4]), mu = f16_to_f32(pr[i * 4 + 1]);
    const float s = f16_to_f32(pr[i * 4 + 2]), z = f16_to_f32(pr[i * 4 + 3]);
    int64_t t = 0, u = 0;  // next non-salient / salient column index
    for (int64_t j = 0; j < in; ++j) {
      if ((pm[j / 8] >> (j % 8)) & 1) {
        const uint8_t q = (pq[i * qb + u / 2] >> (4 * (u % 2))) & 15;
        pw[i * in + j] = (float(q) - z) * s;
        ++u;
      } else {
        const bool plus = (ps[i * sb + t / 8] >> (t % 8)) & 1;
        pw[i * in + j] = r[size_t(t)] * (plus ? mu + alpha : mu - alpha);
        ++t;
      }
    }
  }
  return w;
}

Ptq161Tensor pack_ptq161(int64_t out, int64_t in, const std::vector<uint8_t>& mask, const std::vector<int8_t>& sign,
                         const std::vector<uint8_t>& q4, const std::vector<double>& alpha,
                         const std::vector<double>& mu, const std::vector<float>& s4, const std::vector<float>& z4,
                         const std::vector<double>& col) {
  LB_CHECK(out > 0 && in > 0 && int64_t(mask.size()) == in && int64_t(sign.size()) == out * in &&
               int64_t(q4.size()) == out * in && int64_t(alpha.size()) == out && int64_t(mu.size()) == out &&
               int64_t(s4.size()) == out && int64_t(z4.size()) == out && int64_t(col.size()) == in,
           "pack_ptq161: inconsistent sizes for a [", out, ", ", in, "] layer");
  int64_t k = 0;
  for (uint8_t m : mask) k += m ? 1 : 0;
  Ptq161Tensor p;
  p.out = out, p.in = in;
  p.mask = Tensor::zeros({bytes_for_bits(in)}, DType::U8);
  p.signs = Tensor::zeros({out, bytes_for_bits(in - k)}, DType::U8);
  p.q4 = Tensor::zeros({out, (k + 1) / 2}, DType::U8);
  p.rows = Tensor::empty({out, 4}, DType::F16);
  p.cols = Tensor::empty({in - k}, DType::F16);
  uint8_t* pm = p.mask.data<uint8_t>();
  uint8_t* ps = p.signs.data<uint8_t>();
  uint8_t* pq = p.q4.data<uint8_t>();
  uint16_t* pr = f16_ptr(p.rows);
  uint16_t* pc = f16_ptr(p.cols);
  const int64_t sb = p.signs.size(1), qb = p.q4.size(1);
  for (int64_t j = 0, t = 0; j < in; ++j) {
    if (mask[size_t(j)]) {
      pm[j / 8] = uint8_t(pm[j / 8] | (1u << (j % 8)));
    } else {
      pc[t++] = f32_to_f16(float(col[size_t(j)]));
    }
  }
  for (int64_t i = 0; i < out; ++i) {
    pr[i * 4] = f32_to_f16(float(alpha[size_t(i)]));
    pr[i * 4 + 1] = f32_to_f16(float(mu[size_t(i)]));
    pr[i * 4 + 2] = f32_to_f16(s4[size_t(i)]);
    pr[i * 4 + 3] = f32_to_f16(z4[size_t(i)]);
    int64_t t = 0, u = 0;
    for (int64_t j = 0; j < in; ++j) {
      const size_t e = size_t(i * in + j);
      if (mask[size_t(j)]) {
        LB_CHECK(q4[e] < 16, "pack_ptq161: code ", int(q4[e]), " at row ", i, " column ", j, " is not 4-bit");
        pq[i * qb + u / 2] = uint8_t(pq[i * qb + u / 2] | (q4[e] << (4 * (u % 2))));
        ++u;
      } else {
        if (sign[e] > 0) ps[i * sb + t / 8] = uint8_t(ps[i * sb + t / 8] | (1u << (t % 8)));
        ++t;
      }
    }
  }
  return p;
}

Ptq161Linear::Ptq161Linear(Ptq161Tensor packed, Tensor bias, Device device)
    : DenseLinear(packed.dequantize().to(device), std::move(bias), false), packed_(std::move(packed)) {}

}  // namespace lowbit
