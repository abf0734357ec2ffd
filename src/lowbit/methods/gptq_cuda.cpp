#include "lowbit/methods/gptq_cuda.h"

#include <cmath>

#include "lowbit/ops/cuda/cuda_ops.h"
#include "lowbit/ops/device_init.h"

namespace lowbit {

bool gptq_cuda_supports(const QuantFormat& f, const GptqOptions& opt, std::string* why) {
  auto no = [&](const char* reason) {
    if (why) *why = reason;
    return false;
  };
#ifndef LOWBIT_WITH_CUDA
  (void)f, (void)opt;
  return no("this build has no CUDA backend");
#else
  if (f.kind != QuantKind::IntAsym && f.kind != QuantKind::IntSym)
    return no("the GPU path covers the integer formats only (ternary and fp4 run on the CPU)");
  if (f.granularity == ScaleGranularity::PerTensor) return no("per-tensor formats run on the CPU");
  if (opt.block_size > 128) return no("block_size > 128 runs on the CPU");
  if (!cuda_ready()) return no("CUDA is not initialised (init_cuda())");
  return true;
#endif
}

GptqResult gptq_quantize_cuda(const Tensor& w_in, const Tensor& h_in, const QuantFormat& f, const GptqOptions& opt) {
  std::string why;
  if (!gptq_cuda_supports(f, opt, &why)) throw_error("gptq [", f.name, "] on cuda: ", why);
#ifndef LOWBIT_WITH_CUDA
  (void)w_in, (void)h_in;
  throw_error("gptq: no CUDA backend");
#else
  LB_CHECK(w_in.defined() && w_in.dim() == 2 && w_in.numel() > 0, "gptq [", f.name,
           "]: weight must be a non-empty [out, in] matrix, got ", w_in.defined() ? w_in.describe() : "undefined");
  const int64_t out = w_in.size(0), in = w_in.size(1);
  LB_CHECK(h_in.defined() && h_in.dim() == 2 && h_in.size(0) == in && h_in.size(1) == in, "gptq [", f.name,
           "]: Hessian must be [", in, ", ", in, "] for a weight ", shape_str(w_in.shape()), ", got ",
           h_in.defined() ? h_in.describe() : std::string("undefined"));
  LB_CHECK(opt.block_size > 0, "gptq: block_size must be > 0, got ", opt.block_size);
  LB_CHECK(opt.percdamp >= 0 && std::isfinite(opt.percdamp), "gptq: percdamp must be >= 0, got ", opt.percdamp);
  auto on_gpu_f32 = [](const Tensor& t) {
    Tensor x = t.device() == Device::CUDA ? t : t.to(Device::CUDA);
    return x.dtype() == DType::F32 ? x : x.to(DType::F32);
  };
  ops::cuda::GptqKernelOptions a;
  a.percdamp = opt.percdamp;
  a.block_size = opt.block_size;
  a.act_order = opt.act_order;
  a.static_groups = opt.static_groups;
  a.fp64_factorization = opt.cuda_fp64_factorization;
  a.want_dequantized = true;
  ops::cuda::GptqIntResult r = ops::cuda::gptq_int(on_gpu_f32(w_in), on_gpu_f32(h_in), f, a);
  GptqResult res;
  res.loss = r.loss;
  res.dead_columns = r.dead_columns;
  res.dequantized = r.dequantized;
  QuantizedTensor& q = res.q;
  q.format = f.id;
  q.shape = {out, in};
  q.codes = r.codes.to(Device::CPU);
  q.scales = r.scales.to(Device::CPU);
  if (r.zeros.defined()) q.zeros = r.zeros.to(Device::CPU);
  q.validate();
  return res;
#endif
}

}  // namespace lowbit
