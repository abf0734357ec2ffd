#include "lowbit/core/tensor.h"

#include <cmath>
#include <cstring>
#include <random>
#include <sstream>

namespace lowbit {

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

Shape contiguous_strides(const Shape& shape) {
  Shape st(shape.size());
  int64_t s = 1;
  for (int64_t i = int64_t(shape.size()) - 1; i >= 0; --i) {
    st[i] = s;
    s *= shape[i];
  }
  return st;
}

// ---- Storage -------------------------------------------------------------------------------
Storage::~Storage() {
  if (deleter && data) deleter(data);
}

std::shared_ptr<Storage> Storage::allocate(size_t nbytes, Device device) {
  auto s = std::make_shared<Storage>();
  s->nbytes = nbytes;
  s->device = device;
  if (device == Device::CPU) {
    s->data = aligned_host_alloc(nbytes);
    s->deleter = [](void* p) { aligned_host_free(p); };
  } else {
    DeviceBackend* b = &get_device_backend(device);
    s->data = b->allocate(nbytes);
    s->deleter = [b, nbytes](void* p) { b->deallocate(p, nbytes); };
  }
  return s;
}

std::shared_ptr<Storage> Storage::borrow(void* data, size_t nbytes, std::shared_ptr<void> owner) {
  auto s = std::make_shared<Storage>();
  s->data = data;
  s->nbytes = nbytes;
  s->keep_alive = std::move(owner);
  return s;
}

// ---- factories -------------------------------------------------------------------------------
static void check_shape(const Shape& shape) {
  for (auto d : shape)
    if (d < 0) throw_error("invalid tensor shape ", shape_str(shape), ": negative dimension");
}

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  check_shape(shape);
  Tensor t;
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  t.dtype_ = dtype;
  t.storage_ = Storage::allocate(size_t(shape_numel(shape)) * dtype_size(dtype), device);
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  t.zero_();
  return t;
}

Tensor Tensor::full(const Shape& shape, double value, DType dtype) {
  Tensor t = empty(shape, dtype);
  t.fill_(value);
  return t;
}

template <class T>
static Tensor from_vec(const std::vector<T>& v, const Shape& shape) {
  if (int64_t(v.size()) != shape_numel(shape))
    throw_error("from_vector: ", v.size(), " values for shape ", shape_str(shape));
  Tensor t = Tensor::empty(shape, dtype_of<T>::value);
  if (!v.empty()) std::memcpy(t.raw_data(), v.data(), v.size() * sizeof(T));
  return t;
}
Tensor Tensor::from_vector(const std::vector<float>& v, const Shape& s) { return from_vec(v, s); }
Tensor Tensor::from_vector(const std::vector<double>& v, const Shape& s) { return from_vec(v, s); }
Tensor Tensor::from_vector(const std::vector<int32_t>& v, const Shape& s) { return from_vec(v, s); }

Tensor Tensor::from_blob(void* data, const Shape& shape, DType dtype, std::shared_ptr<void> owner) {
  check_shape(shape);
  Tensor t;
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  t.dtype_ = dtype;
  t.storage_ = Storage::borrow(data, size_t(shape_numel(shape)) * dtype_size(dtype), std::move(owner));
  return t;
}

Tensor Tensor::randn(const Shape& shape, uint64_t seed, double std, DType dtype) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, std);
  Tensor t = empty(shape, DType::F64);
  double* p = t.data<double>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = nd(rng);
  return t.to(dtype);
}

Tensor Tensor::uniform(const Shape& shape, uint64_t seed, double lo, double hi, DType dtype) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> ud(lo, hi);
  Tensor t = empty(shape, DType::F64);
  double* p = t.data<double>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = ud(rng);
  return t.to(dtype);
}

// ---- metadata -------------------------------------------------------------------------------
int64_t Tensor::size(int64_t d) const {
  int64_t n = dim();
  if (d < 0) d += n;
  if (d < 0 || d >= n) throw_error("dimension ", d, " out of range for tensor of shape ", shape_str(shape_));
  return shape_[d];
}

bool Tensor::is_contiguous() const {
  int64_t s = 1;
  for (int64_t i = dim() - 1; i >= 0; --i) {
    if (shape_[i] != 1 && strides_[i] != s) return false;
    s *= shape_[i];
  }
  return true;
}

std::string Tensor::describe() const {
  if (!defined()) return "undefined tensor";
  return std::string(dtype_name(dtype_)) + shape_str(shape_) + " " + device_name(device());
}

void* Tensor::raw_data() const {
  if (!storage_) throw_error("access to an undefined tensor");
  return static_cast<char*>(storage_->data) + offset_ * dtype_size(dtype_);
}

// ---- element conversion helpers ---------------------------------------------------------------
static inline double load_as_double(const void* p, DType t) {
  switch (t) {
    case DType::F32: return *static_cast<const float*>(p);
    case DType::F64: return *static_cast<const double*>(p);
    case DType::F16: return f16_to_f32(*static_cast<const uint16_t*>(p));
    case DType::BF16: return bf16_to_f32(*static_cast<const uint16_t*>(p));
    case DType::I8: return *static_cast<const int8_t*>(p);
    case DType::U8: return *static_cast<const uint8_t*>(p);
    case DType::I16: return *static_cast<const int16_t*>(p);
    case DType::I32: return *static_cast<const int32_t*>(p);
    case DType::I64: return double(*static_cast<const int64_t*>(p));
  }
  return 0;
}

static inline void store_from_double(void* p, DType t, double v) {
  switch (t) {
    case DType::F32: *static_cast<float*>(p) = float(v); break;
    case DType::F64: *static_cast<double*>(p) = v; break;
    case DType::F16: *static_cast<uint16_t*>(p) = f32_to_f16(float(v)); break;
    case DType::BF16: *static_cast<uint16_t*>(p) = f32_to_bf16(float(v)); break;
    case DType::I8: *static_cast<int8_t*>(p) = int8_t(std::lrint(v)); break;
    case DType::U8: *static_cast<uint8_t*>(p) = uint8_t(std::lrint(v)); break;
    case DType::I16: *static_cast<int16_t*>(p) = int16_t(std::lrint(v)); break;
    case DType::I32: *static_cast<int32_t*>(p) = int32_t(std::llrint(v)); break;
    case DType::I64: *static_cast<int64_t*>(p) = int64_t(std::llrint(v)); break;
  }
}

double Tensor::item(int64_t i) const {
  if (device() != Device::CPU) return to(Device::CPU).item(i);
  if (!is_contiguous()) return contiguous().item(i);
  if (i < 0 || i >= numel()) throw_error("item index ", i, " out of range for ", describe());
  return load_as_double(static_cast<const char*>(raw_data()) + i * dtype_size(dtype_), dtype_);
}

void Tensor::set_item(int64_t i, double v) {
  if (device() != Device::CPU || !is_contiguous()) throw_error("set_item needs a contiguous CPU tensor");
  if (i < 0 || i >= numel()) throw_error("set_item index ", i, " out of range for ", describe());
  store_from_double(static_cast<char*>(raw_data()) + i * dtype_size(dtype_), dtype_, v);
}

std::vector<float> Tensor::to_vector() const {
  Tensor c = to(Device::CPU).to(DType::F32).contiguous();
  const float* p = c.data<float>();
  return std::vector<float>(p, p + c.numel());
}

// ---- views ----------------------------------------------------------------------------------
Tensor Tensor::view(const Shape& new_shape) const {
  if (!is_contiguous()) throw_error("view of a non-contiguous tensor ", describe(), "; use reshape()");
  Shape s = new_shape;
  int64_t known = 1, infer = -1;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == -1) {
      if (infer >= 0) throw_error("view: more than one -1 in ", shape_str(new_shape));
      infer = int64_t(i);
    } else {
      known *= s[i];
    }
  }
  if (infer >= 0) {
    if (known == 0 || numel() % known != 0) throw_error("view: cannot infer ", shape_str(new_shape), " from ", describe());
    s[infer] = numel() / known;
  }
  if (shape_numel(s) != numel()) throw_error("view: shape ", shape_str(new_shape), " does not match ", describe());
  Tensor t = *this;
  t.shape_ = s;
  t.strides_ = contiguous_strides(s);
  return t;
}

Tensor Tensor::reshape(const Shape& s) const { return is_contiguous() ? view(s) : contiguous().view(s); }

Tensor Tensor::slice(int64_t d, int64_t start, int64_t end) const {
  if (d < 0) d += dim();
  if (d < 0 || d >= dim()) throw_error("slice: dim out of range for ", describe());
  if (start < 0 || end < start || end > shape_[d])
    throw_error("slice [", start, ", ", end, ") out of range for dim ", d, " of ", describe());
  Tensor t = *this;
  t.offset_ += start * strides_[d];
  t.shape_[d] = end - start;
  return t;
}

Tensor Tensor::select(int64_t d, int64_t index) const {
  if (d < 0) d += dim();
  Tensor t = slice(d, index, index + 1);
  t.shape_.erase(t.shape_.begin() + d);
  t.strides_.erase(t.strides_.begin() + d);
  return t;
}

Tensor Tensor::transpose(int64_t d0, int64_t d1) const {
  if (d0 < 0) d0 += dim();
  if (d1 < 0) d1 += dim();
  if (d0 < 0 || d1 < 0 || d0 >= dim() || d1 >= dim()) throw_error("transpose: dims out of range for ", describe());
  Tensor t = *this;
  std::swap(t.shape_[d0], t.shape_[d1]);
  std::swap(t.strides_[d0], t.strides_[d1]);
  return t;
}

// ---- copies -----------------------------------------------------------------------------------
Tensor Tensor::contiguous() const { return is_contiguous() ? *this : clone(); }

Tensor Tensor::clone() const {
  Tensor t = empty(shape_, dtype_, device());
  t.copy_(*this);
  return t;
}

Tensor Tensor::to(DType dt) const {
  if (dt == dtype_) return *this;
  Tensor t = empty(shape_, dt, device());
  t.copy_(*this);
  return t;
}

Tensor Tensor::to(Device d) const {
  if (d == device()) return *this;
  Tensor t = empty(shape_, dtype_, d);
  t.copy_(*this);
  return t;
}

// Visits every element of a strided CPU view in row-major order.
template <class F>
static void for_each_offset(const Shape& shape, const Shape& strides, F&& f) {
  int64_t n = shape_numel(shape);
  if (n == 0) return;
  int64_t nd = int64_t(shape.size());
  std::vector<int64_t> idx(nd, 0);
  int64_t off = 0;
  for (int64_t i = 0; i < n; ++i) {
    f(i, off);
    for (int64_t d = nd - 1; d >= 0; --d) {
      if (++idx[d] < shape[d]) {
        off += strides[d];
        break;
      }
      off -= strides[d] * (shape[d] - 1);
      idx[d] = 0;
    }
  }
}

void Tensor::copy_(const Tensor& src) {
  if (src.shape_ != shape_) throw_error("copy_: shape ", shape_str(src.shape_), " into ", shape_str(shape_));
  if (numel() == 0) return;
  Device dd = device(), sd = src.device();
  if (dd != Device::CPU || sd != Device::CPU) {
    if (dtype_ == src.dtype_ && is_contiguous() && src.is_contiguous()) {
      if (dd != Device::CPU && sd == Device::CPU) get_device_backend(dd).copy_to_device(raw_data(), src.raw_data(), nbytes());
      else if (dd == Device::CPU) get_device_backend(sd).copy_to_host(raw_data(), src.raw_data(), nbytes());
      else get_device_backend(dd).copy_on_device(raw_data(), src.raw_data(), nbytes());
      return;
    }
    // General case staged through the host (rare: layout or dtype changes across devices).
    Tensor host = (sd == Device::CPU ? src : src.contiguous().to(Device::CPU)).to(dtype_).contiguous();
    if (dd == Device::CPU) {
      copy_(host);
    } else {
      if (!is_contiguous()) throw_error("copy_: non-contiguous device destination is not supported");
      get_device_backend(dd).copy_to_device(raw_data(), host.raw_data(), nbytes());
    }
    return;
  }
  const int es = dtype_size(dtype_), ses = dtype_size(src.dtype_);
  char* dst = static_cast<char*>(raw_data());
  const char* sp = static_cast<const char*>(src.raw_data());
  if (dtype_ == src.dtype_ && is_contiguous() && src.is_contiguous()) {
    std::memcpy(dst, sp, nbytes());
    return;
  }
  if (is_contiguous()) {
    if (dtype_ == src.dtype_) {
      for_each_offset(src.shape_, src.strides_, [&](int64_t i, int64_t off) { std::memcpy(dst + i * es, sp + off * ses, es); });
    } else if (dtype_ == DType::F32 && src.dtype_ == DType::BF16 && src.is_contiguous()) {
      float* d = reinterpret_cast<float*>(dst);
      const uint16_t* s = reinterpret_cast<const uint16_t*>(sp);
      for (int64_t i = 0; i < numel(); ++i) d[i] = bf16_to_f32(s[i]);
    } else if (dtype_ == DType::F32 && src.dtype_ == DType::F16 && src.is_contiguous()) {
      float* d = reinterpret_cast<float*>(dst);
      const uint16_t* s = reinterpret_cast<const uint16_t*>(sp);
      for (int64_t i = 0; i < numel(); ++i) d[i] = f16_to_f32(s[i]);
    } else {
      for_each_offset(src.shape_, src.strides_, [&](int64_t i, int64_t off) {
        store_from_double(dst + i * es, dtype_, load_as_double(sp + off * ses, src.dtype_));
      });
    }
    return;
  }
  Tensor c = src.contiguous().to(dtype_);
  const char* cp = static_cast<const char*>(c.raw_data());
  for_each_offset(shape_, strides_, [&](int64_t i, int64_t off) { std::memcpy(dst + off * es, cp + i * es, es); });
}

void Tensor::fill_(double value) {
  if (device() != Device::CPU && is_contiguous()) {
    // On the device: no host tensor of the whole shape, no copy, no wait for the queued work.
    char tmp[8];
    store_from_double(tmp, dtype_, value);
    if (numel() > 0) get_device_backend(device()).fill(raw_data(), size_t(numel()), size_t(dtype_size(dtype_)), tmp);
    return;
  }
  if (device() != Device::CPU) {
    Tensor h = full(shape_, value, dtype_);
    copy_(h);
    return;
  }
  const int es = dtype_size(dtype_);
  char tmp[8];
  store_from_double(tmp, dtype_, value);
  char* dst = static_cast<char*>(raw_data());
  for_each_offset(shape_, strides_, [&](int64_t, int64_t off) { std::memcpy(dst + off * es, tmp, es); });
}

void Tensor::zero_() {
  if (is_contiguous()) {
    if (device() == Device::CPU) std::memset(raw_data(), 0, nbytes());
    else get_device_backend(device()).memset_zero(raw_data(), nbytes());
  } else {
    fill_(0.0);
  }
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape()) throw_error("max_abs_diff: shapes ", shape_str(a.shape()), " and ", shape_str(b.shape()));
  Tensor x = a.to(Device::CPU).to(DType::F64).contiguous(), y = b.to(Device::CPU).to(DType::F64).contiguous();
  double m = 0;
  const double *p = x.data<double>(), *q = y.data<double>();
  for (int64_t i = 0; i < x.numel(); ++i) {
    double d = std::fabs(p[i] - q[i]);
    if (std::isnan(d)) return d;
    m = std::max(m, d);
  }
  return m;
}

bool allclose(const Tensor& a, const Tensor& b, double atol, double rtol) {
  if (a.shape() != b.shape()) return false;
  Tensor x = a.to(Device::CPU).to(DType::F64).contiguous(), y = b.to(Device::CPU).to(DType::F64).contiguous();
  const double *p = x.data<double>(), *q = y.data<double>();
  for (int64_t i = 0; i < x.numel(); ++i)
    if (!(std::fabs(p[i] - q[i]) <= atol + rtol * std::fabs(q[i]))) return false;
  return true;
}

}  // namespace lowbit
