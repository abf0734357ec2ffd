#include "lowbit/quant/lrqat_linear.h"

#include <algorithm>
#include <cmath>

#include "lowbit/autograd/functions.h"
#include "lowbit/ops/ops.h"

namespace lowbit {

namespace {

template <class F>
auto dispatch_float(DType dt, const char* who, F&& fn) {
  switch (dt) {
    case DType::F32: return fn(float{});
    case DType::F64: return fn(double{});
    default: throw_error(who, ": CPU body supports f32 and f64, got ", dtype_name(dt));
  }
}

constexpr int64_t kParallelMin = int64_t(1) << 14;

// Checks the quantizer's operands: phi0 and c [out, in], step and zero [out, G], one float dtype, CPU.
void check_operands(const Tensor& phi0, const Tensor& c, const Tensor& step, const Tensor& zero, const QuantFormat& f,
                    const char* who) {
  LB_CHECK(lsq_supports(f), who, ": format ", f.name,
           " is not a uniform integer format (LR-QAT supports intB{gG,pc}[s] and int8pc)");
  LB_CHECK(phi0.defined() && phi0.dim() == 2 && phi0.numel() > 0, who, " [", f.name,
           "]: Φ0 must be a non-empty [out, in], got ", phi0.defined() ? phi0.describe() : std::string("undefined"));
  const int64_t out = phi0.size(0), in = phi0.size(1), G = f.n_groups(in);
  LB_CHECK(phi0.device() == Device::CPU && (phi0.dtype() == DType::F32 || phi0.dtype() == DType::F64), who, " [",
           f.name, "]: Φ0 must be f32 or f64 on the CPU (no CUDA body), got ", phi0.describe());
  LB_CHECK(c.defined() && c.shape() == phi0.shape() && c.dtype() == phi0.dtype() && c.device() == Device::CPU, who,
           " [", f.name, "]: the adapter must be ", phi0.describe(), ", got ",
           c.defined() ? c.describe() : std::string("undefined"));
  for (const Tensor* t : {&step, &zero})
    LB_CHECK(t->defined() && t->shape() == Shape({out, G}) && t->dtype() == phi0.dtype() &&
                 t->device() == Device::CPU,
             who, " [", f.name, "]: step and zero point must be CPU ", dtype_name(phi0.dtype()), " ",
             shape_str({out, G}), ", got ", t->defined() ? t->describe() : std::string("undefined"));
}

// Ŵ = s (clamp(round(Φ0 + C), qlo, qhi) − z); optionally the clamp mask and the integers q − z.
template <class T>
void value_body(const QuantFormat& f, const LrQatGrid& gr, const T* phi, const T* c, const T* s, const T* z,
                int64_t out, int64_t in, T* y, uint8_t* mask, int8_t* qz) {
  const int64_t G = f.n_groups(in);
  const T lo = T(gr.qlo), hi = T(gr.qhi);
#pragma omp parallel for schedule(static) if (out * in > kParallelMin)
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const T sg = s[r * G + g], zg = z[r * G + g];
      for (int64_t j = f.group_begin(g), e = f.group_end(g, in); j < e; ++j) {
        const int64_t i = r * in + j;
        const T q = std::nearbyint(phi[i] + c[i]);
        const bool inside = q >= lo && q <= hi;
        const T qc = q < lo ? lo : q > hi ? hi : q;
        y[i] = sg * (qc - zg);
        if (mask) mask[i] = inside;
        if (qz) qz[i] = qc == qc ? int8_t(qc - zg) : int8_t(0);  // NaN (a diverged adapter) stays in y
      }
    }
}

// dc = s · gy inside the clamp (0 outside), ds = g Σ_group gy (q − z).
template <class T>
void grads_body(const QuantFormat& f, const LrQatGrid& gr, const T* phi, const T* c, const T* s, const T* z,
                const T* gy, int64_t out, int64_t in, T gs, T* dc, T* ds) {
  const int64_t G = f.n_groups(in);
  const T lo = T(gr.qlo), hi = T(gr.qhi);
#pragma omp parallel for schedule(static) if (out * in > kParallelMin)
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const T sg = s[r * G + g], zg = z[r * G + g];
      T acc = 0;
      for (int64_t j = f.group_begin(g), e = f.group_end(g, in); j < e; ++j) {
        const int64_t i = r * in + j;
        const T q = std::nearbyint(phi[i] + c[i]);
        const bool inside = q >= lo && q <= hi;
        const T qc = q < lo ? lo : q > hi ? hi : q;
        if (dc) dc[i] = inside ? gy[i] * sg : T(0);
        acc += gy[i] * (qc - zg);
      }
      ds[r * G + g] = gs * acc;
    }
}

// The same gradients from what a forward without checkpointing kept (the mask and q − z).
template <class T>
void saved_grads_body(const QuantFormat& f, const uint8_t* mask, const int8_t* qz, const T* s, const T* gy, int64_t out,
                      int64_t in, T gs, T* dc, T* ds) {
  const int64_t G = f.n_groups(in);
#pragma omp parallel for schedule(static) if (out * in > kParallelMin)
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const T sg = s[r * G + g];
      T acc = 0;
      for (int64_t j = f.group_begin(g), e = f.group_end(g, in); j < e; ++j) {
        const int64_t i = r * in + j;
        if (dc) dc[i] = mask[i] ? gy[i] * sg : T(0);
        acc += gy[i] * T(qz[i]);
      }
      ds[r * G + g] = gs * acc;
    }
}

// C = (α/r) B A.
Tensor adapter_value(const Tensor& a, const Tensor& b, double scale) {
  Tensor c = Tensor::empty({b.size(0), a.size(1)}, a.dtype());
  ops::gemm(b, false, a, false, c, scale, 0.0);
  return c;
}

// y = x Ŵᵀ (+ bias) as one autograd op: Ŵ is built from Φ0 (stored downcast), A, B and s in the
// forward and, with checkpointing, rebuilt in the backward; then
//   dx = dY Ŵ,  dŴ = dYᵀ x,  (dC, ds) = the quantizer's gradients,  dB = (α/r) dC Aᵀ,  dA = (α/r) Bᵀ dC.
Var lrqat_linear(const Var& x, const Tensor& phi_stored, LrQatDowncast d, const Tensor& zero, const Var& A,
                 const Var& B, const Var& step, double cs, const QuantFormat& f, double gs, bool checkpoint,
                 const Var& bias) {
  const Tensor xv = x.value().contiguous();
  const DType dt = zero.dtype();
  const int64_t out = phi_stored.size(0), in = phi_stored.size(1);
  LB_CHECK(xv.dim() == 2 && xv.size(1) == in, "lr-qat: input ", xv.describe(), " does not match the weight [", out,
           ", ", in, "]");
  LB_CHECK(xv.device() == Device::CPU && xv.dtype() == dt, "lr-qat: input ", xv.describe(),
           " must be on the CPU with the layer's dtype ", dtype_name(dt));
  const Tensor av = A.value().contiguous(), bv = B.value().contiguous(), sv = step.value().contiguous();
  const LrQatGrid gr = lrqat_grid(f);
  Tensor y = Tensor::empty({xv.size(0), out}, dt);
  Tensor w_saved, mask_saved, qz_saved;  // without checkpointing: kept for the backward
  {
    const Tensor phi = lrqat_upcast(phi_stored, f, d, dt), c = adapter_value(av, bv, cs);
    Tensor w = Tensor::empty({out, in}, dt);
    if (!checkpoint) {
      mask_saved = Tensor::empty({out, in}, DType::U8);
      qz_saved = Tensor::empty({out, in}, DType::I8);
    }
    dispatch_float(dt, "lr-qat", [&](auto t) {
      using T = decltype(t);
      value_body<T>(f, gr, phi.data<T>(), c.data<T>(), sv.data<T>(), zero.data<T>(), out, in, w.data<T>(),
                    checkpoint ? nullptr : mask_saved.data<uint8_t>(), checkpoint ? nullptr : qz_saved.data<int8_t>());
    });
    ops::gemm(xv, false, w, true, y);
    if (!checkpoint) w_saved = w;
  }
  if (bias.defined()) ops::add(y, bias.value(), y);
  std::vector<Var> inputs{x, A, B, step};
  if (bias.defined()) inputs.push_back(bias);
  return make_result(y, inputs, "lrqat_linear", [x, A, B, step, bias, xv, phi_stored, d, zero, av, bv, sv, cs, &f, gs,
                                                 checkpoint, w_saved, mask_saved, qz_saved, out, in](const Tensor& g) {
    const Tensor gc = g.contiguous();
    const DType dt = zero.dtype();
    const LrQatGrid gr = lrqat_grid(f);
    Tensor phi, c, w = w_saved;
    if (checkpoint) {  // rebuild Ŵ
      phi = lrqat_upcast(phi_stored, f, d, dt);
      c = adapter_value(av, bv, cs);
      w = Tensor::empty({out, in}, dt);
      dispatch_float(dt, "lr-qat", [&](auto t) {
        using T = decltype(t);
        value_body<T>(f, gr, phi.data<T>(), c.data<T>(), sv.data<T>(), zero.data<T>(), out, in, w.data<T>(), nullptr,
                      nullptr);
      });
    }
    if (x.requires_grad()) {
      Tensor dx = Tensor::empty(xv.shape(), dt);
      ops::gemm(gc, false, w, false, dx);
      accumulate_grad(x, dx);
    }
    w = Tensor();
    Tensor dw = Tensor::empty({out, in}, dt);
    ops::gemm(gc, true, xv, false, dw);
    const bool need_dc = A.requires_grad() || B.requires_grad();
    Tensor dc = need_dc ? Tensor::empty({out, in}, dt) : Tensor();
    Tensor ds = Tensor::empty(sv.shape(), dt);
    dispatch_float(dt, "lr-qat", [&](auto t) {
      using T = decltype(t);
      if (checkpoint)
        grads_body<T>(f, gr, phi.data<T>(), c.data<T>(), sv.data<T>(), zero.data<T>(), dw.data<T>(), out, in, T(gs),
                      need_dc ? dc.data<T>() : nullptr, ds.data<T>());
      else
        saved_grads_body<T>(f, mask_saved.data<uint8_t>(), qz_saved.data<int8_t>(), sv.data<T>(), dw.data<T>(), out,
                            in, T(gs), need_dc ? dc.data<T>() : nullptr, ds.data<T>());
    });
    phi = Tensor();
    c = Tensor();
    dw = Tensor();
    if (step.requires_grad()) accumulate_grad(step, ds);
    if (B.requires_grad()) {
      Tensor dB = Tensor::empty(bv.shape(), dt);
      ops::gemm(dc, false, av, true, dB, cs);
      accumulate_grad(B, dB);
    }
    if (A.requires_grad()) {
      Tensor dA = Tensor::empty(av.shape(), dt);
      ops::gemm(bv, true, dc, false, dA, cs);
      accumulate_grad(A, dA);
    }
    if (bias.defined() && bias.requires_grad()) {
      Tensor db = Tensor::empty(bias.value().shape(), dt);
      ops::sum_rows(gc, db);
      accumulate_grad(bias, db);
    }
  });
}

}  // namespace

const char* lrqat_downcast_name(LrQatDowncast d) {
  switch (d) {
    case LrQatDowncast::Int8: return "int8";
    case LrQatDowncast::BF16: return "bf16";
    case LrQatDowncast::F16: return "f16";
    case LrQatDowncast::F32: return "f32";
  }
  return "?";
}

LrQatDowncast parse_lrqat_downcast(const std::string& name) {
  if (name == "int8") return LrQatDowncast::Int8;
  if (name == "bf16") return LrQatDowncast::BF16;
  if (name == "f16") return LrQatDowncast::F16;
  if (name == "f32") return LrQatDowncast::F32;
  throw_error("unknown LR-QAT downcast '", name, "' (expected int8, bf16, f16 or f32)");
}

LrQatGrid lrqat_grid(const QuantFormat& f) {
  LB_CHECK(lsq_supports(f), "lr-qat: format ", f.name,
           " is not a uniform integer format (LR-QAT supports intB{gG,pc}[s] and int8pc)");
  LB_CHECK(f.bits >= 2 && f.bits <= 8, "lr-qat: format ", f.name, " has ", f.bits, " bits; 2 to 8 are supported");
  LrQatGrid g;
  if (f.kind == QuantKind::IntSym) {
    g.qhi = double((int64_t(1) << (f.bits - 1)) - 1);
    g.qlo = -g.qhi;
  } else {
    g.qlo = 0;
    g.qhi = double((int64_t(1) << f.bits) - 1);
    g.centre = double(int64_t(1) << (f.bits - 1));
  }
  g.frac = double(int64_t(1) << (8 - f.bits));
  return g;
}

Tensor lrqat_downcast(const Tensor& w0_in, const Tensor& step0_in, const Tensor& zero0_in, const QuantFormat& f,
                      LrQatDowncast d) {
  const LrQatGrid gr = lrqat_grid(f);
  LB_CHECK(w0_in.defined() && w0_in.dim() == 2 && w0_in.numel() > 0 && w0_in.device() == Device::CPU &&
               (w0_in.dtype() == DType::F32 || w0_in.dtype() == DType::F64),
           "lr-qat [", f.name, "]: W0 must be a non-empty f32/f64 [out, in] on the CPU, got ",
           w0_in.defined() ? w0_in.describe() : std::string("undefined"));
  const Tensor w = w0_in.to(DType::F64).contiguous();
  const int64_t out = w.size(0), in = w.size(1), G = f.n_groups(in);
  LB_CHECK(step0_in.defined() && step0_in.shape() == Shape({out, G}), "lr-qat [", f.name, "]: initial step must be ",
           shape_str({out, G}), ", got ", step0_in.defined() ? step0_in.describe() : std::string("undefined"));
  const bool asym = f.kind == QuantKind::IntAsym;
  LB_CHECK(!asym || (zero0_in.defined() && zero0_in.shape() == Shape({out, G})), "lr-qat [", f.name,
           "]: an asymmetric format needs initial zero points ", shape_str({out, G}));
  const Tensor s = step0_in.to(DType::F64).contiguous();
  const Tensor z = asym ? zero0_in.to(DType::F64).contiguous() : Tensor();
  const double* wp = w.data<double>();
  const double* sp = s.data<double>();
  for (int64_t k = 0; k < out * G; ++k)
    LB_CHECK(std::isfinite(sp[k]) && sp[k] > 0, "lr-qat [", f.name, "]: initial step ", sp[k], " of row ", k / G,
             " group ", k % G, " is not a positive finite number");
  // u = W0/s0 + z0 (z0 the initial zero point rounded onto the grid, as the format stores it).
  auto u_at = [&](int64_t r, int64_t j) {
    const int64_t k = r * G + f.group_of_column(j);
    const double zr = asym ? std::clamp(std::nearbyint(z.data<double>()[k]), gr.qlo, gr.qhi) : 0.0;
    const double u = wp[r * in + j] / sp[k] + zr;
    if (!std::isfinite(u))
      throw_error("lr-qat [", f.name, "]: weight element (", r, ", ", j, ") = ", wp[r * in + j],
                  " is not a finite number");
    return u;
  };
  if (d == LrQatDowncast::Int8) {
    Tensor k8 = Tensor::empty({out, in}, DType::I8);
    int8_t* kp = k8.data<int8_t>();
    for (int64_t r = 0; r < out; ++r)
      for (int64_t j = 0; j < in; ++j) {
        const double u = std::clamp(u_at(r, j), gr.qlo, gr.qhi);
        kp[r * in + j] = int8_t(std::nearbyint(u * gr.frac) - gr.centre * gr.frac);
      }
    return k8;
  }
  Tensor u = Tensor::empty({out, in}, d == LrQatDowncast::F32 ? DType::F32 : DType::F64);
  for (int64_t r = 0; r < out; ++r)
    for (int64_t j = 0; j < in; ++j) u.set_item(r * in + j, u_at(r, j));
  if (d == LrQatDowncast::F32) return u;
  return u.to(DType::F32).to(d == LrQatDowncast::BF16 ? DType::BF16 : DType::F16);
}

Tensor lrqat_upcast(const Tensor& stored, const QuantFormat& f, LrQatDowncast d, DType dt) {
  LB_CHECK(dt == DType::F32 || dt == DType::F64, "lr-qat: Φ0 upcasts to f32 or f64, not ", dtype_name(dt));
  if (d != LrQatDowncast::Int8) {
    const DType want = d == LrQatDowncast::F32 ? DType::F32 : d == LrQatDowncast::BF16 ? DType::BF16 : DType::F16;
    LB_CHECK(stored.dtype() == want, "lr-qat: stored Φ0 is ", stored.describe(), ", expected ", dtype_name(want));
    return stored.to(DType::F32).to(dt).contiguous();
  }
  LB_CHECK(stored.dtype() == DType::I8, "lr-qat: stored Φ0 is ", stored.describe(), ", expected i8");
  const LrQatGrid gr = lrqat_grid(f);
  const Tensor k = stored.contiguous();
  Tensor phi = Tensor::empty(k.shape(), dt);
  const int8_t* kp = k.data<int8_t>();
  const int64_t n = k.numel();
  dispatch_float(dt, "lr-qat", [&](auto t) {
    using T = decltype(t);
    T* p = phi.data<T>();
    const T inv = T(1.0 / gr.frac), c = T(gr.centre);  // exact: powers of two and small integers
    for (int64_t i = 0; i < n; ++i) p[i] = T(kp[i]) * inv + c;
  });
  return phi;
}

Tensor lrqat_quant_value(const Tensor& phi0_in, const Tensor& c_in, const Tensor& step_in, const Tensor& zero_in,
                         const QuantFormat& f) {
  const Tensor phi = phi0_in.contiguous(), c = c_in.contiguous(), s = step_in.contiguous(), z = zero_in.contiguous();
  check_operands(phi, c, s, z, f, "lrqat_quant");
  Tensor y = Tensor::empty(phi.shape(), phi.dtype());
  const LrQatGrid gr = lrqat_grid(f);
  dispatch_float(phi.dtype(), "lrqat_quant", [&](auto t) {
    using T = decltype(t);
    value_body<T>(f, gr, phi.data<T>(), c.data<T>(), s.data<T>(), z.data<T>(), phi.size(0), phi.size(1), y.data<T>(),
                  nullptr, nullptr);
  });
  return y;
}

void lrqat_quant_grads(const Tensor& phi0_in, const Tensor& c_in, const Tensor& step_in, const Tensor& zero_in,
                       const QuantFormat& f, double grad_scale, const Tensor& gy_in, Tensor* dc, Tensor* ds) {
  const Tensor phi = phi0_in.contiguous(), c = c_in.contiguous(), s = step_in.contiguous(), z = zero_in.contiguous();
  check_operands(phi, c, s, z, f, "lrqat_quant");
  LB_CHECK(std::isfinite(grad_scale), "lrqat_quant [", f.name, "]: gradient scale must be finite");
  LB_CHECK(ds, "lrqat_quant_grads: ds is required");
  const Tensor gy = gy_in.contiguous();
  LB_CHECK(gy.shape() == phi.shape() && gy.dtype() == phi.dtype(), "lrqat_quant [", f.name, "]: gradient ",
           gy.describe(), " does not match Φ0 ", phi.describe());
  if (dc) *dc = Tensor::empty(phi.shape(), phi.dtype());
  *ds = Tensor::empty(s.shape(), s.dtype());
  const LrQatGrid gr = lrqat_grid(f);
  dispatch_float(phi.dtype(), "lrqat_quant", [&](auto t) {
    using T = decltype(t);
    grads_body<T>(f, gr, phi.data<T>(), c.data<T>(), s.data<T>(), z.data<T>(), gy.data<T>(), phi.size(0), phi.size(1),
                  T(grad_scale), dc ? dc->data<T>() : nullptr, ds->data<T>());
  });
}

Var lrqat_fake_quant(const Tensor& phi0, const Var& c, const Var& step, const Tensor& zero, const QuantFormat& f,
                     double grad_scale) {
  LB_CHECK(c.defined() && step.defined(), "lrqat_fake_quant [", f.name, "]: undefined adapter or step");
  const Tensor pv = phi0.contiguous(), cv = c.value().contiguous(), sv = step.value().contiguous(),
               zv = zero.contiguous();
  const Tensor y = lrqat_quant_value(pv, cv, sv, zv, f);
  return make_result(y, {c, step}, "lrqat_fake_quant", [c, step, pv, cv, sv, zv, &f, grad_scale](const Tensor& gy) {
    Tensor dc, ds;
    lrqat_quant_grads(pv, cv, sv, zv, f, grad_scale, gy, c.requires_grad() ? &dc : nullptr, &ds);
    if (c.requires_grad()) accumulate_grad(c, dc);
    if (step.requires_grad()) accumulate_grad(step, ds);
  });
}

LrQatTrainLinear::LrQatTrainLinear(const Tensor& weight, const Tensor& bias, const QuantFormat& f,
                                   const LsqParams& init, const LrQatOptions& o)
    : format_(f), opt_(o) {
  LB_CHECK(lsq_supports(f), "lr-qat: format ", f.name,
           " is not a uniform integer format (LR-QAT needs intB{gG,pc}[s] or int8pc)");
  LB_CHECK(weight.defined() && weight.dim() == 2 && weight.numel() > 0, "lr-qat: weight must be a non-empty [out, in], got ",
           weight.defined() ? weight.describe() : std::string("undefined"));
  LB_CHECK(weight.device() == Device::CPU, "lr-qat: the training layer runs on the CPU (no CUDA body); got ",
           weight.describe());
  LB_CHECK(o.rank >= 1, "lr-qat: rank must be >= 1, got ", o.rank);
  LB_CHECK(o.rank <= std::min(weight.size(0), weight.size(1)), "lr-qat: rank ", o.rank, " exceeds the smaller side of a ",
           weight.size(0), " x ", weight.size(1), " weight");
  LB_CHECK(o.lora_alpha > 0 && std::isfinite(o.lora_alpha), "lr-qat: alpha must be > 0, got ", o.lora_alpha);
  LB_CHECK(std::isfinite(o.grad_scale), "lr-qat: gradient scale must be finite");
  dtype_ = weight.dtype() == DType::F64 ? DType::F64 : DType::F32;
  out_ = weight.size(0);
  in_ = weight.size(1);
  const int64_t G = f.n_groups(in_);
  LB_CHECK(init.step.defined() && init.step.shape() == Shape({out_, G}), "lr-qat: initial step must be [", out_, ", ",
           G, "], got ", init.step.defined() ? init.step.describe() : std::string("undefined"));
  const bool asym = f.kind == QuantKind::IntAsym;
  LB_CHECK(!asym || (init.offset.defined() && init.offset.shape() == Shape({out_, G})), "lr-qat: format ", f.name,
           " needs initial zero points [", out_, ", ", G, "]");
  const Tensor w = weight.dtype() == DType::F64 ? weight : weight.to(DType::F32);
  phi_ = lrqat_downcast(w, init.step, asym ? init.offset : Tensor(), f, o.downcast);
  const LrQatGrid gr = lrqat_grid(f);
  zero_ = Tensor::zeros({out_, G}, dtype_);
  if (asym)
    for (int64_t k = 0; k < out_ * G; ++k)
      zero_.set_item(k, std::clamp(std::nearbyint(init.offset.item(k)), gr.qlo, gr.qhi));
  if (bias.defined()) {
    LB_CHECK(bias.numel() == out_, "lr-qat: bias ", bias.describe(), " does not match ", out_, " outputs");
    bias_ = Var(bias.to(dtype_).contiguous().view({out_}).clone(), false);
  }
  step_ = Var(init.step.to(dtype_).contiguous().clone(), true);
  step_.set_name("lr-qat.step");
  const double bound = 1.0 / std::sqrt(double(in_));  // PEFT's kaiming_uniform_(a = sqrt(5)), the reference's init
  lora_A_ = Var(Tensor::uniform({o.rank, in_}, o.seed, -bound, bound, dtype_), true);
  lora_B_ = Var(Tensor::zeros({out_, o.rank}, dtype_), true);
  lora_A_.set_name("lora.A");
  lora_B_.set_name("lora.B");
}

Tensor LrQatTrainLinear::phi0() const { return lrqat_upcast(phi_, format_, opt_.downcast, dtype_); }

Var LrQatTrainLinear::adapter() const { return scale(matmul(lora_B_, lora_A_), lora_scale()); }

Var LrQatTrainLinear::quantized_weight() const {
  return lrqat_fake_quant(phi0(), adapter(), step_, zero_, format_, opt_.grad_scale);
}

Var LrQatTrainLinear::forward(const Var& x) const {
  return lrqat_linear(x, phi_, opt_.downcast, zero_, lora_A_, lora_B_, step_, lora_scale(), format_, opt_.grad_scale,
                      opt_.checkpoint, bias_);
}

std::vector<Var> LrQatTrainLinear::lora_parameters() const { return {lora_A_, lora_B_}; }

std::vector<Var> LrQatTrainLinear::quant_parameters() const { return {step_}; }

std::vector<Var> LrQatTrainLinear::parameters() const {
  std::vector<Var> p = lora_parameters();
  p.push_back(step_);
  return p;
}

Tensor LrQatTrainLinear::effective_weight() const {
  NoGradGuard ng;
  return quantized_weight().value();
}

QuantizedTensor LrQatTrainLinear::encode() const {
  Tensor c;
  {
    NoGradGuard ng;
    c = adapter().value();
  }
  const Tensor phi = phi0();
  // q − z0 as f32 (Ŵ with a unit step and no zero-point shift: the integers the format stores).
  const Tensor ones = Tensor::full(zero_.shape(), 1.0, dtype_);
  FrozenCodes fc;
  fc.codes = lrqat_quant_value(phi, c, ones, zero_, format_).to(DType::F32);
  fc.zero = zero_.to(DType::F32);
  fc.step = step_.value().to(DType::F32);
  return encode_frozen(fc, step_.value(), format_);
}

}  // namespace lowbit
