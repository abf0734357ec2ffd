// CPU reference body of the one-pass FP8 encoder (ops/lp_fp8.h), its checks and the CUDA route.
#include "lowbit/ops/lp_fp8.h"

#include <algorithm>
#include <cmath>
#include <mutex>

#include "lowbit/core/threads.h"
#include "lowbit/ops/dispatch.h"
#include "lowbit/ops/lp_quant.h"
#ifdef LOWBIT_WITH_CUDA
#include "lowbit/ops/cuda/lp_fp8_cuda.h"
#endif

namespace lowbit::ops {

double LpAmax::get() {
  if (!ready_) {
    if (!source_) throw_error("LpAmax::get: undefined amax");
    value_ = source_->wait();
    ready_ = true;
    source_.reset();
  }
  return value_;
}

void lp_encode_fp8_dual(const Tensor& x, LpFormat format, float scale, Tensor* codes, Tensor* codes_t, LpAmax* amax) {
  const char* op = "lp_encode_fp8_dual";
  detail::check_contiguous(op, x, "x");
  if (x.dim() != 2 || x.dtype() != DType::F32) throw_error(op, ": x must be f32 [rows, cols], got ", x.describe());
  if (!lp::is_fp8(format)) throw_error(op, ": format ", lp_format_name(format), " is not FP8 (e4m3, e5m2)");
  if (!(scale > 0) || !std::isfinite(scale)) throw_error(op, ": scale ", scale, " must be finite and > 0");
  const int64_t R = x.size(0), C = x.size(1);
  if (codes) *codes = Tensor::empty({R, C}, DType::U8, x.device());
  if (codes_t) *codes_t = Tensor::empty({C, R}, DType::U8, x.device());
#ifdef LOWBIT_WITH_CUDA
  if (detail::on_cuda(x)) {
    cuda::lp_encode_fp8_dual(x, format, scale, codes, codes_t, amax);
    return;
  }
#else
  if (detail::on_cuda(x)) detail::no_cuda(op);
#endif
  const float* xp = x.data<float>();
  uint8_t* cp = codes ? codes->data<uint8_t>() : nullptr;
  uint8_t* tp = codes_t ? codes_t->data<uint8_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, C));
  std::mutex mu;
  float total = 0;
  bool bad = false;
  parallel_for(R, grain, [&](int64_t a, int64_t b) {
    float m = 0;
    bool nonfinite = false;
    for (int64_t r = a; r < b; ++r)
      for (int64_t c = 0; c < C; ++c) {
        const float v = xp[r * C + c];
        const float av = std::fabs(v);
        uint8_t q;
        if (av <= 3.402823466e38f) {
          m = std::max(m, av);
          q = lp::fp8_code(format, v, scale);
        } else {
          nonfinite = true;
          q = 0x7f;
        }
        if (cp) cp[r * C + c] = q;
        if (tp) tp[c * R + r] = q;
      }
    std::lock_guard<std::mutex> lock(mu);
    total = std::max(total, m);
    bad = bad || nonfinite;
  });
  if (amax) *amax = LpAmax(bad ? std::nan("") : double(total));
}

}  // namespace lowbit::ops
