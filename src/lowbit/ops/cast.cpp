#include "lowbit/ops/ops.h"

#include "lowbit/ops/dispatch.h"

#ifdef LOWBIT_WITH_CUDA
namespace lowbit::ops::cuda {
void cast(const Tensor& x, Tensor& out);  // ops/cuda/cast.cu
}
#endif

namespace lowbit::ops {

void cast(const Tensor& x, Tensor& out) {
  const char* op = "cast";
  detail::check_contiguous(op, x, "x");
  detail::check_contiguous(op, out, "out");
  detail::check_same_shape(op, out, x, "out", "x");
  if (x.device() != out.device()) throw_error(op, ": x is ", x.describe(), " but out is ", out.describe());
  if (!dtype_info(x.dtype()).is_float || !dtype_info(out.dtype()).is_float)
    throw_error(op, ": converts between float dtypes, got ", x.describe(), " -> ", dtype_name(out.dtype()));
  LB_CUDA_ROUTE(x, cast, x, out);
  out.copy_(x);  // CPU: element-wise conversion with rounding to nearest even
}

}  // namespace lowbit::ops
