#include "lowbit/quant/quantized_tensor.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <numeric>
#include <vector>

namespace lowbit {

namespace {

uint16_t* f16_data(const Tensor& t) { return static_cast<uint16_t*>(t.raw_data()); }

// Stores the scale of one group in the format's scale dtype (the only place that knows the
// encodings of ScaleType); checks that the round trip is exact.
void store_scale(const QuantFormat& f, const Tensor& scales, int64_t i, float s, float tensor_scale) {
  switch (f.scale_type) {
    case ScaleType::F16: f16_data(scales)[i] = f32_to_f16(s); break;
    case ScaleType::E8M0: {
      int e = s > 0 ? std::ilogb(s) : -127;
      scales.data<uint8_t>()[i] = uint8_t(e + 127);
      break;
    }
    case ScaleType::E4M3: scales.data<uint8_t>()[i] = float_to_e4m3(s / tensor_scale); break;
    case ScaleType::None: return;
  }
}

float load_scale(const QuantFormat& f, const Tensor& scales, int64_t i, float tensor_scale) {
  switch (f.scale_type) {
    case ScaleType::F16: return f16_to_f32(f16_data(scales)[i]);
    case ScaleType::E8M0: return e8m0_to_float(scales.data<uint8_t>()[i]);
    case ScaleType::E4M3: return e4m3_to_float(scales.data<uint8_t>()[i]) * tensor_scale;
    case ScaleType::None: break;
  }
  return tensor_scale;  // ternary: every group uses the tensor scale
}

// Decoded parameters of group i (row-major over [out, n_groups]); `ts` the tensor scale (1 if none).
GroupParams load_group_params(const QuantFormat& f, const Tensor& scales, const Tensor& zeros, int64_t i, float ts) {
  GroupParams p;
  p.scale = load_scale(f, scales, i, ts);
  if (f.has_zero) p.zero = f16_to_f32(f16_data(zeros)[i]);
  else if (f.kind == QuantKind::IntSym) p.zero = float(1 << (f.bits - 1));
  else if (f.kind == QuantKind::Ternary) p.zero = 1.0f;
  return p;
}

void check_tensor(const QuantFormat& f, const char* field, const Tensor& t, bool expected, DType dtype,
                  const Shape& shape) {
  if (!expected) {
    LB_CHECK(!t.defined(), "[", f.name, "] quantized tensor has a '", field, "' tensor (", t.describe(),
             ") but the format has none");
    return;
  }
  LB_CHECK(t.defined(), "[", f.name, "] quantized tensor lacks its '", field, "' tensor");
  LB_CHECK(t.dtype() == dtype && t.shape() == shape && t.device() == Device::CPU && t.is_contiguous(), "[",
           f.name, "] '", field, "' is ", t.describe(), ", expected contiguous ", dtype_name(dtype),
           shape_str(shape), " cpu");
}

}  // namespace

void QuantizedTensor::validate() const {
  const QuantFormat& f = fmt();
  LB_CHECK(shape.size() == 2 && shape[0] > 0 && shape[1] > 0, "[", f.name,
           "] quantized tensor shape must be [out, in] with out, in > 0, got ", shape_str(shape));
  int64_t out = shape[0], in = shape[1], groups = f.n_groups(in);
  LB_CHECK(f.row_fits(in), "[", f.name, "] quantized tensor ", shape_str(shape), ": in = ", in,
           " is not a multiple of the block size ", f.group_size);
  if (f.has_column_mask()) {  // the mask first: the row width and col_scales depend on it
    check_tensor(f, "col_mask", col_mask, true, DType::U8, {(in + 7) / 8});
    if (in % 8 && (col_mask.data<uint8_t>()[col_mask.numel() - 1] >> (in % 8)))
      throw_error("[", f.name, "] col_mask has bits set beyond column ", in);
    check_tensor(f, "col_scales", col_scales, true, DType::F16, {in - salient()});
  } else if (f.kind == QuantKind::SignValue) {  // OneBit: the value g_j of every column
    check_tensor(f, "col_mask", col_mask, false, DType::U8, {});
    check_tensor(f, "col_scales", col_scales, true, DType::F16, {in});
  } else {
    check_tensor(f, "col_mask", col_mask, false, DType::U8, {});
    check_tensor(f, "col_scales", col_scales, false, DType::F16, {});
  }
  check_tensor(f, "codes", codes, true, DType::U8, {out, row_bytes()});
  bool has_scales = f.scale_type != ScaleType::None;
  check_tensor(f, "scales", scales, has_scales, has_scales ? scale_dtype(f.scale_type) : DType::F16,
               {out, groups});
  check_tensor(f, "zeros", zeros, f.has_zero, DType::F16, {out, groups});
  check_tensor(f, "tensor_scale", tensor_scale, f.has_tensor_scale, DType::F32, {1});
  if (f.has_tensor_scale) {
    float t = tensor_scale.data<float>()[0];
    LB_CHECK(std::isfinite(t) && t > 0, "[", f.name, "] tensor_scale must be finite and > 0, got ", t);
  }
}

void QuantizedTensor::check_codes() const {
  const QuantFormat& f = fmt();
  if (f.has_column_mask()) {  // padding bits after the sign bits and after the last 4-bit code are 0
    const int64_t out = out_features(), in = in_features(), k = salient(), nb = in - k, sb = (nb + 7) / 8;
    const int64_t rb = row_bytes();
    const uint8_t* c = codes.data<uint8_t>();
    for (int64_t r = 0; r < out; ++r) {
      if (nb % 8 && (c[r * rb + sb - 1] >> (nb % 8)))
        throw_error("[", f.name, "] row ", r, " has sign bits set beyond its ", nb, " binary columns");
      if (k % 2 && (c[r * rb + rb - 1] >> 4))
        throw_error("[", f.name, "] row ", r, " has a 4-bit code after its ", k, " salient columns");
    }
    return;
  }
  if (f.kind == QuantKind::SignValue) {  // OneBit: padding bits after the row's in sign bits are 0
    const int64_t out = out_features(), in = in_features(), rb = row_bytes();
    const uint8_t* c = codes.data<uint8_t>();
    if (in % 8)
      for (int64_t r = 0; r < out; ++r)
        if (c[r * rb + rb - 1] >> (in % 8))
          throw_error("[", f.name, "] row ", r, " has sign bits set beyond its ", in, " columns");
    return;
  }
  if (f.kind != QuantKind::TritPlanes) return;
  // Two 2-bit planes per row holding t + 1: the value 3 is never written.
  const int64_t out = out_features(), in = in_features(), rb = f.row_bytes(in), half = rb / 2;
  const uint8_t* c = codes.data<uint8_t>();
  for (int64_t r = 0; r < out; ++r)
    for (int plane = 0; plane < 2; ++plane)
      for (int64_t i = 0; i < in; ++i)
        if (unpack_code(2, c + r * rb + plane * half, i) == 3)
          throw_error("[", f.name, "] plane ", plane + 1, " holds code 3 (not a trit: t + 1 is 0, 1 or 2) at row ", r,
                      ", column ", i);
}

int64_t QuantizedTensor::salient() const {
  if (!col_mask.defined() || col_mask.dtype() != DType::U8 || !col_mask.is_contiguous()) return 0;
  return FormatTraits::mask_count(col_mask.data<uint8_t>(), col_mask.numel());
}

int64_t QuantizedTensor::row_bytes() const {
  const QuantFormat& f = fmt();
  return f.has_column_mask() ? FormatTraits::masked_row_bytes(in_features(), salient()) : f.row_bytes(in_features());
}

float QuantizedTensor::tensor_scale_value() const {
  return tensor_scale.defined() ? tensor_scale.data<float>()[0] : 1.0f;
}

GroupParams QuantizedTensor::group_params(int64_t row, int64_t g) const {
  const QuantFormat& f = fmt();
  LB_CHECK(!f.is_ggml_block(), "[", f.name, "] group_params: a ggml block format keeps its scales inside the blocks");
  return load_group_params(f, scales, zeros, row * f.n_groups(in_features()) + g, tensor_scale_value());
}

namespace {
// The ggml block layout of f (ops view), or Generic for lowbit's own formats.
ops::PackedLayout ggml_layout_of(const QuantFormat& f) {
  return f.id == QuantFormatId::Q4_0    ? ops::PackedLayout::GgmlQ4_0
         : f.id == QuantFormatId::Q4_1  ? ops::PackedLayout::GgmlQ4_1
         : f.id == QuantFormatId::Q8_0  ? ops::PackedLayout::GgmlQ8_0
         : f.id == QuantFormatId::TQ2_0 ? ops::PackedLayout::GgmlTQ2_0
         : f.id == QuantFormatId::TQ1_0 ? ops::PackedLayout::GgmlTQ1_0
                                        : ops::PackedLayout::Generic;
}

// Row `row` of q's codes in the storage layout: a pointer into them, or (panel layout) the row
// gathered into a per-thread buffer.
const uint8_t* storage_row(const QuantizedTensor& q, int64_t row, int64_t rb) {
  if (q.panel_rows == 0) return q.codes.data<uint8_t>() + row * rb;
  thread_local std::vector<uint8_t> buf;
  buf.resize(size_t(rb));
  // The fields quant_matmul_row_bytes reads (packed_view() would validate on every row).
  const QuantFormat& f = q.fmt();
  ops::PackedWeight w;
  w.out = q.out_features();
  w.in = q.in_features();
  const ops::PackedLayout ggml = ggml_layout_of(f);  // the panel layout holds q4_0/q4_1/q8_0 or IntGroups
  w.layout = ggml != ops::PackedLayout::Generic ? ggml : ops::PackedLayout::IntGroups;
  w.bits = f.bits;
  w.row_bytes = rb;
  w.codes = q.codes.data<uint8_t>();
  w.panel_rows = q.panel_rows;
  ops::quant_matmul_row_bytes(w, row, buf.data());
  return buf.data();
}

void refuse_panel_layout(const QuantizedTensor& q, const char* what) {
  LB_CHECK(q.panel_rows == 0, "[", q.fmt().name, "] ", what, ": the codes are in the CPU panel layout of ", q.panel_rows,
           " rows; take row_layout() first");
}
}  // namespace

bool QuantizedTensor::to_panel_layout() {
  if (panel_rows != 0) return true;
  const ops::PackedWeight w = packed_view();
  const int64_t h = ops::quant_matmul_panel_height(w);
  if (h == 0) return false;
  // Owned storage (allocated, unshared by another Tensor object of a different size) is rearranged
  // where it is; borrowed memory (a GGUF file mapping, read-only) is copied first.
  const auto& st = codes.storage();
  if (!st->deleter || codes.nbytes() != st->nbytes) codes = codes.clone();
  ops::quant_matmul_to_panel_layout(packed_view(), h, codes.data<uint8_t>());
  panel_rows = h;
  return true;
}

bool QuantizedTensor::to_tl_layout() {
  if (tl_codes.defined()) return true;
  const ops::PackedWeight w = packed_view();
  if (!ops::quant_matmul_tl_supported(w)) return false;
  Tensor t = Tensor::empty({ops::quant_matmul_tl_bytes(w)}, DType::U8);
  ops::quant_matmul_to_tl_layout(w, t.data<uint8_t>());
  tl_codes = t;
  return true;
}

QuantizedTensor QuantizedTensor::row_layout() const {
  if (panel_rows == 0) return *this;
  QuantizedTensor q = *this;
  q.device_copy_.reset();
  q.tl_codes = Tensor();  // the index form is of the whole tensor
  q.codes = codes.clone();
  const ops::PackedWeight w = packed_view();
  ops::quant_matmul_to_row_layout(w, q.codes.data<uint8_t>());
  q.panel_rows = 0;
  return q;
}

void QuantizedTensor::unpack_row(int64_t row, uint8_t* out_codes) const {
  const QuantFormat& f = fmt();
  LB_CHECK(!f.is_ggml_block(), "[", f.name, "] unpack_row: a ggml block format has no separate codes");
  if (f.has_column_mask()) {
    const int64_t in = in_features(), sb = (in - salient() + 7) / 8;
    const uint8_t* src = codes.data<uint8_t>() + row * row_bytes();
    const uint8_t* m = col_mask.data<uint8_t>();
    for (int64_t j = 0, t = 0, u = 0; j < in; ++j) {
      if (m[j / 8] >> (j % 8) & 1) {
        out_codes[j] = uint8_t(src[sb + u / 2] >> (4 * (u % 2)) & 15);
        ++u;
      } else {
        out_codes[j] = uint8_t(src[t / 8] >> (t % 8) & 1);
        ++t;
      }
    }
    return;
  }
  f.unpack(storage_row(*this, row, f.row_bytes(in_features())), in_features(), out_codes);
}

void QuantizedTensor::dequantize_row(int64_t row, float* out) const {
  const QuantFormat& f = fmt();
  const int64_t in = in_features(), rb = row_bytes();
  const uint8_t* src = storage_row(*this, row, rb);
  if (f.is_ggml_block()) {
    f.dequantize_row(src, in, out);
    return;
  }
  if (f.has_column_mask()) {  // PTQ1.61: sign bits of the binary columns, then the salient 4-bit codes
    const int64_t sb = (in - salient() + 7) / 8;
    const uint8_t* m = col_mask.data<uint8_t>();
    const uint16_t* r = f16_data(col_scales);
    const GroupParams pb = load_group_params(f, scales, zeros, row * 2, 1.0f);
    const GroupParams ps = load_group_params(f, scales, zeros, row * 2 + 1, 1.0f);
    for (int64_t j = 0, t = 0, u = 0; j < in; ++j) {
      if (m[j / 8] >> (j % 8) & 1) {
        out[j] = salient_int4_value(src[sb + u / 2] >> (4 * (u % 2)) & 15, ps.scale, ps.zero);
        ++u;
      } else {
        out[j] = salient_binary_value(src[t / 8] >> (t % 8) & 1, f16_to_f32(r[t]), pb.scale, pb.zero);
        ++t;
      }
    }
    return;
  }
  if (f.kind == QuantKind::SignValue) {  // OneBit: w_j = h * (+-1) * g_j
    const float h = load_scale(f, scales, row, 1.0f);
    const uint16_t* g = f16_data(col_scales);
    for (int64_t j = 0; j < in; ++j) out[j] = sign_value_value(src[j / 8] >> (j % 8) & 1, h, f16_to_f32(g[j]));
    return;
  }
  if (f.kind == QuantKind::TritPlanes) {  // two 2-bit planes: w = (q1 - 1) a1 + (q2 - 1) a2
    const int64_t groups = f.n_groups(in), half = rb / 2;
    for (int64_t g = 0; g < groups; ++g) {
      const GroupParams p = load_group_params(f, scales, zeros, row * groups + g, 1.0f);
      for (int64_t c = f.group_begin(g); c < f.group_end(g, in); ++c)
        out[c] = trit_pair_value(uint8_t(3 * unpack_code(2, src + half, c) + unpack_code(2, src, c)), p.scale, p.zero);
    }
    return;
  }
  // Codes are unpacked group by group into a small stack buffer (per-channel groups, as long as
  // the row, go in chunks of the buffer's size).
  constexpr int64_t kChunk = 256;
  uint8_t buf[kChunk];
  const int64_t groups = f.n_groups(in);
  const float ts = tensor_scale_value();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t b = f.group_begin(g), e = f.group_end(g, in);
    const GroupParams p = load_group_params(f, scales, zeros, row * groups + g, ts);
    for (int64_t c = b; c < e; c += kChunk) {
      const int64_t n = std::min(kChunk, e - c);
      // c is a multiple of 8 (groups of 16..128 codes, chunks of 256): the codes from c on start on
      // a byte boundary of the packed row.
      f.unpack(src + packed_code_bytes(f.bits, c), n, buf);
      f.codec->decode_n(f, buf, n, p, out + c);
    }
  }
}

Tensor QuantizedTensor::dequantize() const {
  validate();
  const int64_t out = out_features(), in = in_features();
  Tensor w = Tensor::empty({out, in});
  float* pw = w.data<float>();
  // Rows are independent (each packed row starts on a byte boundary).
#pragma omp parallel for schedule(static) if (out * in >= (int64_t(1) << 16))
  for (int64_t r = 0; r < out; ++r) dequantize_row(r, pw + r * in);
  return w;
}

ops::PackedWeight QuantizedTensor::packed_view() const {
  validate();
  const QuantFormat& f = fmt();
  ops::PackedWeight w;
  w.out = out_features();
  w.in = in_features();
  w.format = f.name;
  w.dequantize_row = [this](int64_t r, float* dst) { dequantize_row(r, dst); };
  w.device = device_copy_.get();
  w.panel_rows = panel_rows;
  if (tl_codes.defined()) w.tl_codes = tl_codes.data<uint8_t>();
  const ops::PackedLayout ggml = ggml_layout_of(f);
  if (ggml != ops::PackedLayout::Generic) {
    w.layout = ggml;
    w.row_bytes = f.row_bytes(w.in);
    w.codes = codes.data<uint8_t>();
    return w;
  }
  const bool int_kind = f.kind == QuantKind::IntAsym || f.kind == QuantKind::IntSym;
  if (int_kind && f.scale_type == ScaleType::F16 && (f.bits == 2 || f.bits == 4 || f.bits == 8)) {
    w.layout = ops::PackedLayout::IntGroups;
    w.bits = f.bits;
    w.n_groups = f.n_groups(w.in);
    w.group_size = f.group_size > 0 ? f.group_size : w.in;
    w.row_bytes = f.row_bytes(w.in);
    w.codes = codes.data<uint8_t>();
    w.scales = f16_data(scales);
    w.zeros = f.has_zero ? f16_data(zeros) : nullptr;
    w.implicit_zero = f.kind == QuantKind::IntSym ? float(1 << (f.bits - 1)) : 0.0f;
  } else if (f.has_column_mask()) {  // PTQ1.61: mask, sign bits + 4-bit codes, (alpha, s) / (mu, z), r_j
    w.layout = ops::PackedLayout::SalientBinary;
    w.bits = 1;
    w.n_groups = 2;
    w.group_size = 0;
    w.salient = salient();
    w.row_bytes = row_bytes();
    w.codes = codes.data<uint8_t>();
    w.scales = f16_data(scales);
    w.zeros = f16_data(zeros);
    w.col_mask = col_mask.data<uint8_t>();
    w.col_scales = f16_data(col_scales);
  } else if (f.kind == QuantKind::SignValue) {  // OneBit: sign bits, h per row, g per column
    w.layout = ops::PackedLayout::SignValue;
    w.bits = 1;
    w.n_groups = 1;
    w.group_size = w.in;
    w.row_bytes = f.row_bytes(w.in);
    w.codes = codes.data<uint8_t>();
    w.scales = f16_data(scales);
    w.col_scales = f16_data(col_scales);
  } else if (f.kind == QuantKind::TritPlanes) {  // two 2-bit planes, a1 in scales, a2 in zeros
    w.layout = ops::PackedLayout::TritPlanes;
    w.bits = 2;
    w.n_groups = f.n_groups(w.in);
    w.group_size = f.group_size;
    w.row_bytes = f.row_bytes(w.in);
    w.codes = codes.data<uint8_t>();
    w.scales = f16_data(scales);
    w.zeros = f16_data(zeros);
    w.implicit_zero = 1.0f;
  } else if (f.kind == QuantKind::Ternary) {  // 2-bit codes, w = (q - 1) * gamma (one f32 gamma)
    w.layout = ops::PackedLayout::IntGroups;
    w.bits = 2;
    w.n_groups = 1;
    w.group_size = w.in;
    w.row_bytes = f.row_bytes(w.in);
    w.codes = codes.data<uint8_t>();
    w.implicit_zero = 1.0f;
    w.tensor_scale = tensor_scale.data<float>()[0];
  }
  return w;
}

void QuantizedTensor::upload_to_device() const {
  static std::mutex mu;  // one upload at a time (layers may be uploaded from several threads)
  std::lock_guard<std::mutex> lock(mu);
  if (device_copy_) return;
  refuse_panel_layout(*this, "upload_to_device");
  device_copy_ = std::make_shared<const ops::DevicePackedWeight>(ops::upload_packed_weight(packed_view()));
}

int64_t QuantizedTensor::nbytes() const {
  int64_t n = 0;
  for (const Tensor* t : {&codes, &scales, &zeros, &tensor_scale, &col_mask, &col_scales})
    if (t->defined()) n += int64_t(t->nbytes());
  return n;
}

namespace {
// A copy of t that owns its storage (a slice of a mapped or larger tensor would keep all of it).
Tensor owned(const Tensor& t) { return t.is_contiguous() ? t.clone() : t.contiguous(); }
}  // namespace

int64_t QuantizedTensor::column_shard_unit() const {
  const QuantFormat& f = fmt();
  if (f.has_column_mask()) return 0;
  if (f.kind == QuantKind::SignValue) return 8;  // whole bytes of sign bits; g_j is per column
  int64_t unit = f.group_size > 0 ? f.group_size : 1;  // ggml: the block
  const ops::PackedWeight v = packed_view();
  if (ops::quant_matmul_has_int8_kernel(v)) unit = std::lcm(unit, ops::quant_matmul_act_block(v));
  return unit;
}

QuantizedTensor QuantizedTensor::slice_rows(int64_t r0, int64_t r1) const {
  validate();
  refuse_panel_layout(*this, "slice_rows");
  const QuantFormat& f = fmt();
  LB_CHECK(0 <= r0 && r0 < r1 && r1 <= out_features(), "[", f.name, "] rows [", r0, ", ", r1, ") of a ",
           shape_str(shape), " quantized tensor");
  QuantizedTensor q = *this;
  q.device_copy_.reset();
  q.tl_codes = Tensor();  // the index form is of the whole tensor
  q.shape = {r1 - r0, in_features()};
  q.codes = owned(codes.slice(0, r0, r1));
  if (scales.defined()) q.scales = owned(scales.slice(0, r0, r1));
  if (zeros.defined()) q.zeros = owned(zeros.slice(0, r0, r1));
  return q;
}

QuantizedTensor QuantizedTensor::slice_cols(int64_t c0, int64_t c1) const {
  validate();
  refuse_panel_layout(*this, "slice_cols");
  const QuantFormat& f = fmt();
  const int64_t out = out_features(), in = in_features(), n = c1 - c0;
  LB_CHECK(0 <= c0 && c0 < c1 && c1 <= in, "[", f.name, "] input columns [", c0, ", ", c1, ") of a ", shape_str(shape),
           " quantized tensor");
  const int64_t unit = column_shard_unit();
  LB_CHECK(unit > 0, "[", f.name, "] weights cannot be split by input columns (the column mask and row layout are per tensor)");
  LB_CHECK(c0 % unit == 0 && (c1 == in || c1 % unit == 0), "[", f.name, "] input columns [", c0, ", ", c1,
           ") do not fall on its groups of ", unit, " columns");
  if (c0 == 0 && c1 == in) return slice_rows(0, out);
  QuantizedTensor q = *this;
  q.device_copy_.reset();
  q.tl_codes = Tensor();  // the index form is of the whole tensor
  q.shape = {out, n};
  const int64_t rb_in = f.row_bytes(in), rb = f.row_bytes(n);
  q.codes = Tensor::empty({out, rb}, DType::U8);
  const uint8_t* src = codes.data<uint8_t>();
  uint8_t* dst = q.codes.data<uint8_t>();
  if (f.is_ggml_block()) {  // whole blocks: a byte range of each row
    const int64_t b0 = c0 / f.group_size * f.block_bytes;
    for (int64_t r = 0; r < out; ++r) std::memcpy(dst + r * rb, src + r * rb_in + b0, size_t(rb));
  } else {  // the codes of the columns, packed again (any code width, trit planes too)
    std::vector<uint8_t> row(static_cast<size_t>(in));
    for (int64_t r = 0; r < out; ++r) {
      f.unpack(src + r * rb_in, in, row.data());
      f.pack(row.data() + c0, n, dst + r * rb);
    }
  }
  // Group parameters: the groups [c0 / G, ...) of each row; one group per row (per-channel,
  // per-tensor) stays as it is.
  auto groups = [&](const Tensor& t) {
    if (!t.defined()) return t;
    if (f.group_size == 0) return owned(t);
    const int64_t g0 = c0 / f.group_size;
    return owned(t.slice(1, g0, g0 + f.n_groups(n)));
  };
  q.scales = groups(scales);
  q.zeros = groups(zeros);
  if (f.kind == QuantKind::SignValue) q.col_scales = owned(col_scales.slice(0, c0, c1));
  q.validate();
  return q;
}

QuantizedTensor make_ggml_quantized_tensor(const QuantFormat& f, int64_t out, int64_t in, Tensor blocks,
                                           const std::string& what) {
  LB_CHECK(f.is_ggml_block(), what, ": format ", f.name, " is not a ggml block format");
  LB_CHECK(out > 0 && in > 0, what, ": [", f.name, "] empty shape [", out, ", ", in, "]");
  LB_CHECK(f.row_fits(in), what, ": [", f.name, "] row length ", in, " is not a multiple of the block size ",
           f.group_size);
  LB_CHECK(blocks.defined() && blocks.dtype() == DType::U8 && blocks.numel() == out * f.row_bytes(in), what, ": [",
           f.name, "] expected ", out * f.row_bytes(in), " bytes of blocks for [", out, ", ", in, "], got ",
           blocks.defined() ? blocks.describe() : std::string("undefined"));
  QuantizedTensor q;
  q.format = f.id;
  q.shape = {out, in};
  q.codes = blocks.to(Device::CPU).contiguous().view({out, f.row_bytes(in)});
  q.validate();
  return q;
}

QuantizedTensor make_quantized_tensor(const QuantFormat& f, int64_t out, int64_t in, const uint8_t* codes,
                                      const GroupParams* params, float tensor_scale) {
  LB_CHECK(out > 0 && in > 0, "[", f.name, "] cannot quantize an empty [", out, ", ", in, "] weight");
  LB_CHECK(!f.is_ggml_block(), "[", f.name, "] make_quantized_tensor: ggml block formats are quantized by their ",
           "quantize_row (quantize())");
  if (f.has_column_mask())
    throw_error("[", f.name, "] needs a column mask chosen from calibration activations and per-column factors: ",
                "only --method ptq161 produces it (quant/ptq161_tensor.h pack_ptq161)");
  int64_t groups = f.n_groups(in);
  QuantizedTensor q;
  q.format = f.id;
  q.shape = {out, in};
  // Every byte of codes, scales and zeros is written below (pack fills a row's padding bits with 0).
  q.codes = Tensor::empty({out, f.row_bytes(in)}, DType::U8);
  if (f.scale_type != ScaleType::None) q.scales = Tensor::empty({out, groups}, scale_dtype(f.scale_type));
  if (f.has_zero) q.zeros = Tensor::empty({out, groups}, DType::F16);
  if (f.has_tensor_scale) q.tensor_scale = Tensor::full({1}, double(tensor_scale));
  if (f.kind == QuantKind::SignValue) {  // OneBit from per-row parameters alone: every column value g_j = 1
    q.col_scales = Tensor::empty({in}, DType::F16);
    std::fill(f16_data(q.col_scales), f16_data(q.col_scales) + in, f32_to_f16(1.0f));
  }
  // Rows own disjoint bytes of every tensor (packed rows start on byte boundaries), so they are
  // packed in parallel.
  uint8_t* pc = q.codes.data<uint8_t>();
  const int64_t rb = f.row_bytes(in);
  const bool parallel = out * in >= (int64_t(1) << 16);
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t r = 0; r < out; ++r) {
    f.pack(codes + r * in, in, pc + r * rb);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t i = r * groups + g;
      store_scale(f, q.scales, i, params[i].scale, tensor_scale);
      if (f.has_zero) f16_data(q.zeros)[i] = f32_to_f16(params[i].zero);
    }
  }
  q.validate();
  // The stored parameters must decode to exactly the ones the codes were computed with. The error
  // names the first group (row-major) that does not.
  const float ts = q.tensor_scale_value();
  int64_t first = out * groups;
#pragma omp parallel for schedule(static) reduction(min : first) if (parallel)
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t i = r * groups + g;
      const GroupParams p = load_group_params(f, q.scales, q.zeros, i, ts), want = params[i];
      if (!(p.scale == want.scale && p.zero == want.zero)) {
        first = std::min(first, i);
        break;
      }
    }
  if (first < out * groups) {
    const int64_t r = first / groups, g = first % groups;
    const GroupParams p = q.group_params(r, g), want = params[first];
    throw_error("[", f.name, "] group parameters (scale ", want.scale, ", zero ", want.zero, ") of row ", r, " group ",
                g, " are not representable in the format's storage (stored: ", p.scale, ", ", p.zero,
                "); compute them with the format's params_from_range");
  }
  return q;
}

}  // namespace lowbit
