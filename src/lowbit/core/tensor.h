// Tensor: a strided view (shape, strides in elements, offset) over reference-counted storage on
// one device. Copies of a Tensor share storage (like torch.Tensor); clone() copies data.
#pragma once
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "lowbit/core/device.h"
#include "lowbit/core/dtype.h"
#include "lowbit/core/error.h"

namespace lowbit {

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);

// A block of memory. Owned (freed by its deleter) or borrowed from e.g. a memory-mapped file,
// in which case `keep_alive` holds the owner.
struct Storage {
  void* data = nullptr;
  size_t nbytes = 0;
  Device device = Device::CPU;
  std::function<void(void*)> deleter;  // empty: not owned
  std::shared_ptr<void> keep_alive;
  ~Storage();

  static std::shared_ptr<Storage> allocate(size_t nbytes, Device device);
  static std::shared_ptr<Storage> borrow(void* data, size_t nbytes, std::shared_ptr<void> owner);
};

class Tensor {
 public:
  Tensor() = default;

  // ---- factories -------------------------------------------------------------------
  static Tensor empty(const Shape& shape, DType dtype = DType::F32, Device device = Device::CPU);
  static Tensor zeros(const Shape& shape, DType dtype = DType::F32, Device device = Device::CPU);
  static Tensor full(const Shape& shape, double value, DType dtype = DType::F32);
  // Copies `values` into a new CPU tensor of the given shape (numel must match).
  static Tensor from_vector(const std::vector<float>& values, const Shape& shape);
  static Tensor from_vector(const std::vector<double>& values, const Shape& shape);
  static Tensor from_vector(const std::vector<int32_t>& values, const Shape& shape);
  // Wraps existing memory without copying (CPU). `owner` keeps it alive.
  static Tensor from_blob(void* data, const Shape& shape, DType dtype, std::shared_ptr<void> owner);
  // Normal(0, std) / uniform(lo, hi) filled tensors from a seeded generator (CPU).
  static Tensor randn(const Shape& shape, uint64_t seed, double std = 1.0, DType dtype = DType::F32);
  static Tensor uniform(const Shape& shape, uint64_t seed, double lo, double hi, DType dtype = DType::F32);

  // ---- metadata ---------------------------------------------------------------------
  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  int64_t dim() const { return int64_t(shape_.size()); }
  int64_t size(int64_t d) const;  // negative d counts from the end
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return size_t(numel()) * size_t(dtype_size(dtype_)); }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device : Device::CPU; }
  bool is_contiguous() const;
  int64_t offset() const { return offset_; }
  const std::shared_ptr<Storage>& storage() const { return storage_; }
  std::string describe() const;  // "f32[2, 3] cpu"

  // ---- data access --------------------------------------------------------------------
  void* raw_data() const;  // pointer to element 0 of this view
  template <class T>
  T* data() const {
    if (dtype_of<T>::value != dtype_) throw_error("tensor is ", dtype_name(dtype_), ", accessed as ", dtype_name(dtype_of<T>::value));
    return static_cast<T*>(raw_data());
  }
  // Element read/write by flat index into a contiguous CPU tensor, converting to/from double
  // (slow; for tests and small tensors).
  double item(int64_t flat_index = 0) const;
  void set_item(int64_t flat_index, double v);
  std::vector<float> to_vector() const;  // any float/int dtype, any layout, CPU or device

  // ---- views (share storage) ---------------------------------------------------------
  Tensor view(const Shape& shape) const;  // contiguous only; one dim may be -1
  Tensor reshape(const Shape& shape) const;  // view if contiguous, else a contiguous copy
  Tensor slice(int64_t dim, int64_t start, int64_t end) const;
  Tensor select(int64_t dim, int64_t index) const;  // removes dim
  Tensor transpose(int64_t d0, int64_t d1) const;

  // ---- copies ----------------------------------------------------------------------------
  Tensor contiguous() const;  // self if already contiguous
  Tensor clone() const;
  Tensor to(DType dtype) const;  // converted copy (self if same dtype)
  Tensor to(Device device) const;
  void copy_(const Tensor& src);  // same shape; converts dtype; any layouts/devices
  void fill_(double value);
  void zero_();

 private:
  std::shared_ptr<Storage> storage_;
  Shape shape_, strides_;
  int64_t offset_ = 0;  // in elements
  DType dtype_ = DType::F32;
};

Shape contiguous_strides(const Shape& shape);
bool allclose(const Tensor& a, const Tensor& b, double atol, double rtol);
double max_abs_diff(const Tensor& a, const Tensor& b);

}  // namespace lowbit
