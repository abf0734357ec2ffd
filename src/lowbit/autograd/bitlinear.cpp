// BitLinear b1.58: forward (quantized operands) and straight-through backward side by side.
#include "lowbit/autograd/bitlinear.h"

#include "lowbit/autograd/functions.h"
#include "lowbit/ops/ops.h"

namespace lowbit {

namespace {
// v + lambda (q - v), in place into q (lambda < 1 only).
void blend(const Tensor& v, double lambda, Tensor& q) {
  if (lambda >= 1.0) return;
  Tensor d = Tensor::empty(q.shape(), q.dtype(), q.device());
  ops::sub(q, v, d);
  ops::scale(d, lambda, d);
  ops::add(v, d, q);
}

void check_options(const BitLinearOptions& o) {
  if (!(o.lambda >= 0.0 && o.lambda <= 1.0)) throw_error("bitlinear: lambda ", o.lambda, " is outside [0, 1]");
}
}  // namespace

Tensor bitlinear_effective_weight(const Tensor& w, const BitLinearOptions& o) {
  check_options(o);
  const Tensor wv = w.contiguous();
  if (!o.quantize) return wv.clone();
  Tensor q;
  ops::ternary_fake_quant(wv, o.scale, q);
  blend(wv, o.lambda, q);
  return q;
}

Var bitlinear(const Var& x, const Var& w, const BitLinearOptions& o) {
  check_options(o);
  if (!o.quantize) return linear(x, w);
  const Tensor xv = x.value().contiguous(), wv = w.value().contiguous();
  if (xv.dim() != 2 || wv.dim() != 2 || xv.size(1) != wv.size(1))
    throw_error("bitlinear: x ", xv.describe(), " and weight ", wv.describe(), " do not match (weight is [out, in])");
  if (xv.dtype() != wv.dtype()) throw_error("bitlinear: x is ", xv.describe(), " but the weight is ", wv.describe());
  Tensor wq = bitlinear_effective_weight(wv, o), xq = xv;
  if (o.quantize_activations) {
    xq = Tensor();
    ops::act_quant_int8(xv, xq);
    blend(xv, o.lambda, xq);
  }
  Tensor y = Tensor::empty({xv.size(0), wv.size(0)}, xv.dtype(), xv.device());
  ops::gemm(xq, false, wq, true, y);
  return make_result(y, {x, w}, "bitlinear", [x, w, xq, wq](const Tensor& g) {
    if (x.requires_grad()) {  // STE through Qa: d/dx of (x + c_x) is the identity
      Tensor dx = Tensor::empty(xq.shape(), xq.dtype(), xq.device());
      ops::gemm(g, false, wq, false, dx);
      accumulate_grad(x, dx);
    }
    if (w.requires_grad()) {  // STE through Qw
      Tensor dw = Tensor::empty(wq.shape(), wq.dtype(), wq.device());
      ops::gemm(g, true, xq, false, dw);
      accumulate_grad(w, dw);
    }
  });
}

Var int4_absmean_fake_quant(const Var& x) {
  Tensor y;
  ops::act_quant_int4_absmean(x.value(), y);
  return make_result(y, {x}, "int4_absmean_fake_quant", [x](const Tensor& g) {
    if (x.requires_grad()) accumulate_grad(x, g.contiguous());  // straight through
  });
}

Var h_bitlinear(const Var& x, const Var& w, const Tensor& signs, const Tensor& small, int act_bits,
                const BitLinearOptions& options, ops::ActScale act_scale) {
  if (act_bits != 0 && (act_bits < 2 || act_bits > 8))
    throw_error("h_bitlinear: ", act_bits, " activation bits (expected 0 = none, or 2 to 8)");
  if (act_scale == ops::ActScale::AbsMean && act_bits != 4)
    throw_error("h_bitlinear: the absmean activation quantizer is 4-bit only (BitNet v2's INT4), got ", act_bits,
                " bits");
  if (x.value().dim() != 2) throw_error("h_bitlinear: x must be [rows, in], got ", x.value().describe());
  Var xr = hadamard_transform(x, signs, small);
  if (act_bits > 0)
    xr = act_scale == ops::ActScale::AbsMean ? int4_absmean_fake_quant(xr)
                                              : fake_quant(xr, act_bits, false, 1.0, xr.value().size(1));
  BitLinearOptions o = options;
  o.quantize_activations = false;
  return bitlinear(xr, w, o);
}

}  // namespace lowbit
