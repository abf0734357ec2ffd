#include "lowbit/quant/quant_linear.h"

#include "lowbit/autograd/functions.h"
#include "lowbit/model/lp_linear.h"
#include "lowbit/ops/ops.h"

namespace lowbit {

QuantLinear::QuantLinear(QuantizedTensor q, Tensor bias, Device device, Tensor lora_A, Tensor lora_B,
                         Tensor dequantized)
    : q_(std::move(q)), device_(device) {
  q_.validate();
  gpu_packed_ = device == Device::CUDA && ops::cuda_packed_enabled() && ops::quant_matmul_has_cuda_layout(q_.packed_view());
  if (dequantized.defined()) {
    LB_CHECK(dequantized.shape() == q_.shape, "QuantLinear: dequantized weight ", dequantized.describe(),
             " does not match the quantized shape ", shape_str(q_.shape));
    weight_ = Var(dequantized.to(DType::F32).to(device).contiguous(), false);
  }
  if (bias.defined()) bias_ = Var(bias.to(device), false);
  LB_CHECK(lora_A.defined() == lora_B.defined(), "QuantLinear: LoRA needs both A and B (got only ",
           lora_A.defined() ? "A" : "B", ")");
  if (!lora_A.defined()) return;
  const int64_t out = q_.out_features(), in = q_.in_features();
  LB_CHECK(lora_A.dim() == 2 && lora_A.size(1) == in && lora_A.size(0) > 0, "QuantLinear: lora_A must be [rank, ", in,
           "], got ", lora_A.describe());
  LB_CHECK(lora_B.dim() == 2 && lora_B.size(0) == out && lora_B.size(1) == lora_A.size(0),
           "QuantLinear: lora_B must be [", out, ", ", lora_A.size(0), "] to match lora_A, got ", lora_B.describe());
  const DType dt = DType::F32;
  lora_A_ = Var(lora_A.to(dt).contiguous().to(device), false);
  lora_B_ = Var(lora_B.to(dt).contiguous().to(device), false);
}

const Var& QuantLinear::weight_var() const {
  std::lock_guard<std::mutex> lock(weight_mutex_);
  if (!weight_.defined()) {
    Tensor w = q_.dequantize();
    if (inc_.defined()) w = inc_.unweight(w);  // in x's basis
    weight_ = Var(w.to(device_), false);
  }
  return weight_;
}

void QuantLinear::set_incoherence(Incoherence t) {
  if (!t.defined()) {
    LB_CHECK(!inc_.defined(), "QuantLinear: the incoherence transform cannot be removed");
    return;
  }
  LB_CHECK(!inc_.defined(), "QuantLinear: the layer already has an incoherence transform");
  LB_CHECK(!has_lora(), "QuantLinear: incoherence processing of a layer with LoRA adapters is not supported");
  LB_CHECK(t.in.size() == q_.in_features() && (!t.out.defined() || t.out.size() == q_.out_features()),
           "QuantLinear: incoherence transform of ", t.in.size(), " inputs / ", t.out.size(), " outputs for a [",
           q_.out_features(), ", ", q_.in_features(), "] layer");
  std::lock_guard<std::mutex> lock(weight_mutex_);
  if (weight_.defined()) weight_ = Var(t.unweight(weight_.value().to(Device::CPU)).to(device_), false);
  inc_ = std::move(t);
  gpu_packed_ = false;  // the transforms run on the CPU: on CUDA the dense weight (in x's basis)
}

Var QuantLinear::forward(const Var& x) const {
  const Tensor& xv = x.value();
  const bool plain = !x.requires_grad() && xv.dtype() == DType::F32 && xv.dim() == 2 && xv.size(1) == q_.in_features();
  const bool packed_cpu = plain && device_ == Device::CPU && xv.device() == Device::CPU;
  // On the GPU: the packed kernels when the format has a GPU form, unless the dense weight was
  // handed over (then it is already there and faster for long prompts).
  const bool packed_gpu = plain && device_ == Device::CUDA && xv.device() == Device::CUDA && gpu_packed_ &&
                          !has_dequantized_weight();
  Var y;
  if (packed_cpu || packed_gpu) {
    if (packed_gpu) q_.upload_to_device();
    Tensor yt = Tensor::empty({xv.size(0), q_.out_features()}, DType::F32, xv.device());
    if (inc_.defined()) {  // y = ((x R_in) Q(W')^T) R_out^T
      ops::quant_matmul(inc_.input(xv.contiguous()), q_.packed_view(), yt, mm_opt_);
      yt = inc_.output(yt);
    } else {
      ops::quant_matmul(xv.contiguous(), q_.packed_view(), yt, mm_opt_);
    }
    if (bias_.defined()) ops::add(yt, bias_.value(), yt);
    y = Var(yt, false);
  } else {
    y = linear(x, weight_var(), bias_);
  }
  if (!has_lora()) return y;
  // Low-rank path (x A^T) B^T: M*r*(in+out) flops instead of forming Ŵ + B A.
  if (lora_product_a_) return add(y, (*lora_product_b_)((*lora_product_a_)(x, lora_A_), lora_B_));
  return add(y, linear(linear(x, lora_A_), lora_B_));
}

void QuantLinear::set_lora_products(std::shared_ptr<const LpProduct> a, std::shared_ptr<const LpProduct> b) {
  LB_CHECK(has_lora() || (!a && !b), "QuantLinear: low-precision adapter products on a layer without adapters");
  LB_CHECK(bool(a) == bool(b), "QuantLinear: give both adapter products or neither");
  lora_product_a_ = std::move(a);
  lora_product_b_ = std::move(b);
}

std::shared_ptr<Linear> QuantLinear::shard(ShardAxis axis, int64_t begin, int64_t end, Device device) const {
  if (inc_.defined())
    throw_error("tensor parallelism: a layer with QuIP incoherence processing (quantize --method quip) cannot be "
                "split (its transforms mix all rows and columns)");
  const int64_t n = axis == ShardAxis::Rows ? out_features() : in_features();
  LB_CHECK(0 <= begin && begin < end && end <= n, "tensor parallelism: ", axis == ShardAxis::Rows ? "output rows [" : "input columns [",
           begin, ", ", end, ") of a ", kind(), " layer with ", n);
  // Bias and adapters: the piece's part, copied (QuantLinear moves them to `device`).
  auto own = [](const Tensor& t) { return t.is_contiguous() ? t.clone() : t.contiguous(); };
  const Tensor b = bias(), A = lora_A(), B = lora_B();
  std::shared_ptr<QuantLinear> l;
  if (axis == ShardAxis::Rows)
    l = std::make_shared<QuantLinear>(q_.row_layout().slice_rows(begin, end), b.defined() ? own(b.slice(0, begin, end)) : b, device,
                                      A.defined() ? own(A) : A, B.defined() ? own(B.slice(0, begin, end)) : B);
  else
    l = std::make_shared<QuantLinear>(q_.row_layout().slice_cols(begin, end), begin == 0 ? b : Tensor(), device,
                                      A.defined() ? own(A.slice(1, begin, end)) : A, B.defined() ? own(B) : B);
  l->set_matmul_options(mm_opt_);
  return l;
}

bool QuantLinear::packed_product(const Var& x, ops::PackedWeight& w, ops::QuantMatmulOptions& opt) const {
  const Tensor& xv = x.value();
  // forward's packed CPU path with nothing after the product
  if (x.requires_grad() || xv.dtype() != DType::F32 || xv.dim() != 2 || xv.size(1) != q_.in_features() ||
      device_ != Device::CPU || xv.device() != Device::CPU || bias_.defined() || has_lora() || inc_.defined())
    return false;
  w = q_.packed_view();
  opt = mm_opt_;
  return true;
}

std::vector<Var> QuantLinear::parameters() const {
  if (has_lora() && lora_A_.requires_grad()) return {lora_A_, lora_B_};
  return {};
}

Tensor QuantLinear::effective_weight() const {
  Tensor w;
  {
    std::lock_guard<std::mutex> lock(weight_mutex_);
    if (weight_.defined()) w = has_lora() ? weight_.value().clone() : weight_.value();
  }
  if (!w.defined()) w = (inc_.defined() ? inc_.unweight(q_.dequantize()) : q_.dequantize()).to(device_);
  if (!has_lora()) return w;
  ops::gemm(lora_B_.value(), false, lora_A_.value(), false, w, 1.0, 1.0);  // Ŵ + B A
  return w;
}

void QuantLinear::set_lora_trainable(bool trainable) {
  LB_CHECK(has_lora(), "QuantLinear::set_lora_trainable: the layer has no LoRA adapters");
  lora_A_ = Var(lora_A_.value(), trainable);
  lora_B_ = Var(lora_B_.value(), trainable);
}

}  // namespace lowbit
