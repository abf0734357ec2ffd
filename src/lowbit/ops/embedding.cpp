// Token embedding lookup and its scatter-add backward.
#include "lowbit/ops/dispatch.h"

namespace lowbit::ops {

namespace {
void check_ids(const char* op, const Tensor& table, const Tensor& ids) {
  if (ids.dtype() != DType::I32) throw_error(op, ": ids must be i32, got ", ids.describe());
  detail::check_contiguous(op, ids, "ids");
  if (table.dim() != 2) throw_error(op, ": table must be [V, D], got ", table.describe());
  if (ids.device() == Device::CPU) {
    const int32_t* p = ids.data<int32_t>();
    const int64_t V = table.size(0);
    for (int64_t i = 0; i < ids.numel(); ++i)
      if (p[i] < 0 || p[i] >= V) throw_error(op, ": token id ", p[i], " at position ", i, " is outside the vocabulary [0, ", V, ")");
  }
}
}  // namespace

void embedding_forward(const Tensor& table, const Tensor& ids, Tensor& out) {
  const char* op = "embedding_forward";
  detail::check_contiguous(op, table, "table");
  check_ids(op, table, ids);
  const int64_t N = ids.numel(), D = table.size(1);
  detail::check_shape(op, out, {N, D}, "out");
  detail::check_same_kind(op, table, out, "out");
  LB_CUDA_ROUTE(table, embedding_forward, table, ids, out);
  const int es = dtype_size(table.dtype());
  const char* src = static_cast<const char*>(table.raw_data());
  char* dst = static_cast<char*>(out.raw_data());
  const int32_t* id = ids.data<int32_t>();
  for (int64_t i = 0; i < N; ++i) std::memcpy(dst + i * D * es, src + int64_t(id[i]) * D * es, size_t(D * es));
}

void embedding_backward(const Tensor& dout, const Tensor& ids, Tensor& dtable) {
  const char* op = "embedding_backward";
  detail::check_contiguous(op, dtable, "dtable");
  check_ids(op, dtable, ids);
  const int64_t N = ids.numel(), D = dtable.size(1);
  detail::check_shape(op, dout, {N, D}, "dout");
  LB_CUDA_ROUTE(dtable, embedding_backward, dout, ids, dtable);
  detail::dispatch_float(op, dtable.dtype(), [&](auto t) {
    using T = decltype(t);
    dtable.zero_();
    T* d = dtable.data<T>();
    const T* g = dout.data<T>();
    const int32_t* id = ids.data<int32_t>();
    for (int64_t i = 0; i < N; ++i)
      for (int64_t c = 0; c < D; ++c) d[int64_t(id[i]) * D + c] += g[i * D + c];
  });
}

}  // namespace lowbit::ops
