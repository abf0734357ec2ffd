// LSQ / LSQ+ fake quantization: forward and backward side by side (formulas and gradient
// conventions in lsq.h).
#include "lowbit/quant/lsq.h"

#include <algorithm>
#include <cmath>

#include "lowbit/core/dtype.h"
#include "lowbit/core/threads.h"
#include "lowbit/ops/qat_quant.h"

namespace lowbit {

namespace {

// The LSQ grid and its per-element arithmetic: ops/qat_quant_math.h (shared with the op bodies).
using ops::qat::LsqGrid;
LsqGrid grid_of(const QuantFormat& f) { return ops::qat::lsq_grid(f); }
template <class T>
T round_offset(T offset, const LsqGrid& gr) {
  return ops::qat::lsq_zero(offset, gr);
}

void check_params(const Tensor& w, const Tensor& step, const Tensor& offset, const QuantFormat& f, const char* who) {
  LB_CHECK(lsq_supports(f), who, ": format ", f.name,
           " is not a uniform integer format (LSQ supports intB{gG,pc}[s] and int8pc)");
  LB_CHECK(w.defined() && w.dim() == 2 && w.numel() > 0, who, " [", f.name,
           "]: weight must be a non-empty [out, in], got ", w.defined() ? w.describe() : std::string("undefined"));
  const Shape gs{w.size(0), f.n_groups(w.size(1))};
  LB_CHECK(step.defined() && step.shape() == gs, who, " [", f.name, "]: step must be ", shape_str(gs),
           " (one per group), got ", step.defined() ? step.describe() : std::string("undefined"));
  if (f.kind == QuantKind::IntAsym)
    LB_CHECK(offset.defined() && offset.shape() == gs, who, " [", f.name, "]: offset (zero point) must be ",
             shape_str(gs), ", got ", offset.defined() ? offset.describe() : std::string("undefined"));
  else
    LB_CHECK(!offset.defined(), who, " [", f.name, "]: symmetric formats have no offset; it must be undefined");
  for (const Tensor* t : {&w, &step, &offset}) {
    if (!t->defined()) continue;
    LB_CHECK(t->device() == w.device() && t->dtype() == w.dtype(), who, " [", f.name, "]: ", t->describe(),
             " must have the weight's dtype and device (", w.describe(), ")");
  }
}

// Squared error of quantizing the group x[0, n) with step s and zero point z (grid gr), in f64.
// Σ |Q(x) − x|^p over the group, p = 2 (Mse) or 4 (Lp4).
double group_sq_error(const double* x, int64_t n, double s, double z, const LsqGrid& gr, int p = 2) {
  double e = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double q = std::nearbyint(std::clamp(x[j] / s + z, double(gr.qlo), double(gr.qhi)));
    const double d = (q - z) * s - x[j];
    e += p == 4 ? (d * d) * (d * d) : d * d;
  }
  return e;
}

}  // namespace

bool lsq_supports(const QuantFormat& f) { return f.kind == QuantKind::IntAsym || f.kind == QuantKind::IntSym; }

int64_t lsq_qp(const QuantFormat& f) {
  return f.kind == QuantKind::IntSym ? (int64_t(1) << (f.bits - 1)) - 1 : int64_t(f.qmax());
}

double lsq_grad_scale(const QuantFormat& f, int64_t in) {
  const int64_t n = f.group_size ? std::min<int64_t>(f.group_size, in) : in;
  return 1.0 / std::sqrt(double(n) * double(lsq_qp(f)));
}

const char* lsq_init_name(LsqInit i) {
  switch (i) {
    case LsqInit::Lsq: return "lsq";
    case LsqInit::MinMax: return "minmax";
    case LsqInit::Mse: return "mse";
    case LsqInit::Lp4: return "lp4";
  }
  return "?";
}

LsqInit parse_lsq_init(const std::string& name) {
  if (name == "lsq") return LsqInit::Lsq;
  if (name == "minmax") return LsqInit::MinMax;
  if (name == "mse") return LsqInit::Mse;
  if (name == "lp4") return LsqInit::Lp4;
  throw_error("unknown LSQ initialisation '", name, "' (expected lsq, minmax, mse or lp4)");
}

LsqParams lsq_init(const Tensor& w_in, const QuantFormat& f, LsqInit init) {
  LB_CHECK(lsq_supports(f), "lsq_init: format ", f.name, " is not a uniform integer format");
  LB_CHECK(w_in.defined() && w_in.dim() == 2 && w_in.numel() > 0 && w_in.device() == Device::CPU &&
               (w_in.dtype() == DType::F32 || w_in.dtype() == DType::F64),
           "lsq_init [", f.name, "]: weight must be a non-empty f32/f64 [out, in] on the CPU, got ", w_in.describe());
  const Tensor w = w_in.to(DType::F64).contiguous();
  const int64_t out = w.size(0), in = w.size(1), G = f.n_groups(in);
  const LsqGrid gr = grid_of(f);
  Tensor step = Tensor::empty({out, G}, DType::F64);
  Tensor offset = gr.asym ? Tensor::empty({out, G}, DType::F64) : Tensor();
  const double* wp = w.data<double>();
  double* sp = step.data<double>();
  double* zp = gr.asym ? offset.data<double>() : nullptr;
  const double qp = double(lsq_qp(f));
#pragma omp parallel for schedule(static) if (out * in > (int64_t(1) << 14))
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t b = f.group_begin(g), n = f.group_end(g, in) - b;
      const double* x = wp + r * in + b;
      double mn = 0, mx = 0, amax = 0, mabs = 0;  // 0-inclusive range, as the format's RTN
      for (int64_t j = 0; j < n; ++j) {
        mn = std::min(mn, x[j]), mx = std::max(mx, x[j]);
        amax = std::max(amax, std::fabs(x[j]));
        mabs += std::fabs(x[j]);
      }
      mabs /= double(n);
      double s = 1, z = 0;
      if (init == LsqInit::Lsq) {
        s = mabs > 0 ? 2.0 * mabs / std::sqrt(qp) : 1e-5;
        z = gr.asym ? std::nearbyint(double(gr.qhi) / 2) : 0.0;
      } else if (init == LsqInit::MinMax) {
        const GroupParams p = f.codec->params_from_range(f, float(mn), float(mx), 1.0f);
        s = p.scale;
        z = gr.asym ? p.zero : 0.0;
      } else {  // Mse / Lp4: shrink factors of each end of the range on a grid
        constexpr int kSteps = 20;
        const int pw = init == LsqInit::Lp4 ? 4 : 2;
        double best = -1;
        if (amax == 0) {
          s = 1e-5;
          z = gr.asym ? std::nearbyint(double(gr.qhi) / 2) : 0.0;
        } else if (!gr.asym) {
          for (int k = 0; k <= kSteps; ++k) {
            const double a = 1.0 - 0.5 * k / kSteps;
            const double sk = a * amax / qp;
            const double e = group_sq_error(x, n, sk, 0.0, gr, pw);
            if (best < 0 || e < best) best = e, s = sk;
          }
        } else {
          for (int ka = 0; ka <= kSteps; ++ka)
            for (int kb = 0; kb <= kSteps; ++kb) {
              const double hi = mx * (1.0 - 0.5 * ka / kSteps), lo = mn * (1.0 - 0.5 * kb / kSteps);
              if (hi - lo <= 0) continue;
              const double sk = (hi - lo) / gr.qhi;
              const double zk = std::clamp(std::nearbyint(-lo / sk), double(gr.qlo), double(gr.qhi));
              const double e = group_sq_error(x, n, sk, zk, gr, pw);
              if (best < 0 || e < best) best = e, s = sk, z = zk;
            }
        }
      }
      sp[r * G + g] = s;
      if (zp) zp[r * G + g] = z;
    }
  LsqParams p;
  p.step = step.to(w_in.dtype());
  if (gr.asym) p.offset = offset.to(w_in.dtype());
  return p;
}

Var lsq_fake_quant(const Var& w, const Var& step, const Var& offset, const QuantFormat& f, double grad_scale,
                   int slice) {
  LB_CHECK(w.defined() && step.defined(), "lsq_fake_quant [", f.name, "]: undefined weight or step");
  const Tensor wv = w.value().contiguous(), sv = step.value().contiguous();
  const Tensor ov = offset.defined() ? offset.value().contiguous() : Tensor();
  check_params(wv, sv, ov, f, "lsq_fake_quant");
  LB_CHECK(std::isfinite(grad_scale), "lsq_fake_quant [", f.name, "]: gradient scale must be finite");
  Tensor y;
  ops::lsq_quant_forward(wv, sv, ov, f, y, slice);
  std::vector<Var> inputs{w, step};
  if (offset.defined()) inputs.push_back(offset);
  return make_result(y, inputs, "lsq_fake_quant", [w, step, offset, wv, sv, ov, &f, grad_scale, slice](const Tensor& gy) {
    Tensor dw, ds, dz;
    const bool want_dz = offset.defined() && offset.requires_grad();
    ops::lsq_quant_backward(wv, sv, ov, gy.contiguous(), f, grad_scale, w.requires_grad() ? &dw : nullptr, ds,
                            want_dz ? &dz : nullptr, slice);
    if (dw.defined()) accumulate_grad(w, dw);
    if (step.requires_grad()) accumulate_grad(step, ds);
    if (want_dz) accumulate_grad(offset, dz);
  });
}

Tensor lsq_fake_quant_value(const Tensor& w_in, const Tensor& step_in, const Tensor& offset_in, const QuantFormat& f,
                            int slice) {
  const Tensor wv = w_in.contiguous(), sv = step_in.contiguous();
  const Tensor ov = offset_in.defined() ? offset_in.contiguous() : Tensor();
  check_params(wv, sv, ov, f, "lsq_fake_quant");
  Tensor y;
  ops::lsq_quant_forward(wv, sv, ov, f, y, slice);
  return y;
}

void lsq_fake_quant_grads(const Tensor& w_in, const Tensor& step_in, const Tensor& offset_in, const QuantFormat& f,
                          double grad_scale, const Tensor& gy, Tensor* dw, Tensor* ds, Tensor* dz) {
  const Tensor wv = w_in.contiguous(), sv = step_in.contiguous();
  const Tensor ov = offset_in.defined() ? offset_in.contiguous() : Tensor();
  check_params(wv, sv, ov, f, "lsq_fake_quant");
  LB_CHECK(std::isfinite(grad_scale), "lsq_fake_quant [", f.name, "]: gradient scale must be finite");
  LB_CHECK(ds, "lsq_fake_quant_grads: ds is required");
  const Tensor g = gy.contiguous();
  LB_CHECK(g.shape() == wv.shape() && g.dtype() == wv.dtype() && g.device() == wv.device(), "lsq_fake_quant [", f.name,
           "]: gradient ", g.describe(), " does not match the weight ", wv.describe());
  ops::lsq_quant_backward(wv, sv, ov, g, f, grad_scale, dw, *ds, dz && ov.defined() ? dz : nullptr);
}

Var group_scale_dequant(const Tensor& codes_in, const Var& step, const QuantFormat& f) {
  LB_CHECK(codes_in.defined() && codes_in.dim() == 2 && step.defined(), "group_scale_dequant [", f.name,
           "]: codes must be [out, in] and the step defined");
  const Tensor c = codes_in.contiguous(), sv = step.value().contiguous();
  const int64_t out = c.size(0), in = c.size(1), G = f.n_groups(in);
  const bool i8 = c.dtype() == DType::I8;  // integer codes (one byte a weight); else the step's dtype
  LB_CHECK(sv.shape() == Shape({out, G}) && (i8 || sv.dtype() == c.dtype()) && sv.device() == c.device(),
           "group_scale_dequant [", f.name, "]: step must be ", i8 ? "a float" : dtype_name(c.dtype()), " ",
           shape_str({out, G}), " on the codes' device (", c.describe(), "), got ", sv.describe());
  Tensor y;
  ops::group_scale_forward(c, sv, f, y);
  return make_result(y, {step}, "group_scale_dequant", [step, c, &f](const Tensor& gy) {
    Tensor ds;
    ops::group_scale_backward(c, gy.contiguous(), f, ds);
    accumulate_grad(step, ds);
  });
}

Tensor int8_codes(const Tensor& codes_in) {
  const Tensor c = codes_in.to(Device::CPU).to(DType::F32).contiguous();
  const float* p = c.data<float>();
  const int64_t n = c.numel();
  for (int64_t i = 0; i < n; ++i)
    if (!(p[i] >= -128.0f && p[i] <= 127.0f) || p[i] != std::nearbyint(p[i])) return Tensor();
  Tensor t = Tensor::empty(c.shape(), DType::I8);
  int8_t* q = t.data<int8_t>();
  parallel_for(n, int64_t(1) << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) q[i] = int8_t(p[i]);
  });
  return t;
}

Tensor lsq_storage_step(const Tensor& step) {
  Tensor s = step.to(DType::F32).contiguous().clone();
  float* p = s.data<float>();
  for (int64_t i = 0; i < s.numel(); ++i) {
    float v = f16_to_f32(f32_to_f16(p[i]));
    // A step that rounds to 0 (or is not positive) cannot be stored: the smallest f16 subnormal.
    if (!(v > 0)) v = 5.9604644775390625e-08f;
    LB_CHECK(std::isfinite(v), "lsq: step ", p[i], " does not fit the f16 storage of the format's scales");
    p[i] = v;
  }
  return s.to(step.dtype());
}

QuantizedTensor lsq_encode(const Tensor& w_in, const Tensor& step_in, const Tensor& offset_in, const QuantFormat& f) {
  const Tensor w = w_in.to(Device::CPU).to(DType::F32).contiguous();
  const Tensor step = lsq_storage_step(step_in.to(Device::CPU)).to(DType::F32).contiguous();
  const Tensor offset = offset_in.defined() ? offset_in.to(Device::CPU).to(DType::F32).contiguous() : Tensor();
  check_params(w, step, offset, f, "lsq_encode");
  const int64_t out = w.size(0), in = w.size(1), G = f.n_groups(in);
  const LsqGrid gr = grid_of(f);
  std::vector<uint8_t> codes(size_t(out * in));
  std::vector<GroupParams> params(size_t(out * G));
  const float* wp = w.data<float>();
  const float* sp = step.data<float>();
  const float half = gr.asym ? 0.0f : float(int64_t(1) << (f.bits - 1));
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const float s = sp[r * G + g];
      const float zr = gr.asym ? round_offset(offset.data<float>()[r * G + g], gr) : 0.0f;
      params[size_t(r * G + g)] = {s, gr.asym ? zr : half};
      for (int64_t j = f.group_begin(g), e = f.group_end(g, in); j < e; ++j) {
        const float u = wp[r * in + j] / s + zr;
        const float q = std::nearbyint(std::clamp(u, float(gr.qlo), float(gr.qhi)));
        codes[size_t(r * in + j)] = uint8_t(q + half);
      }
    }
  return make_quantized_tensor(f, out, in, codes.data(), params.data(), 1.0f);
}

FrozenCodes frozen_codes(const QuantizedTensor& q) {
  const QuantFormat& f = q.fmt();
  LB_CHECK(lsq_supports(f), "frozen_codes: format ", f.name, " is not a uniform integer format");
  q.validate();
  const int64_t out = q.out_features(), in = q.in_features(), G = f.n_groups(in);
  FrozenCodes fc;
  fc.codes = Tensor::empty({out, in}, DType::F32);
  fc.step = Tensor::empty({out, G}, DType::F32);
  fc.zero = Tensor::zeros({out, G}, DType::F32);
  std::vector<uint8_t> row(static_cast<size_t>(in));
  for (int64_t r = 0; r < out; ++r) {
    q.unpack_row(r, row.data());
    for (int64_t g = 0; g < G; ++g) {
      const GroupParams p = q.group_params(r, g);
      fc.step.data<float>()[r * G + g] = p.scale;
      if (f.kind == QuantKind::IntAsym) fc.zero.data<float>()[r * G + g] = p.zero;
      for (int64_t j = f.group_begin(g), e = f.group_end(g, in); j < e; ++j)
        fc.codes.data<float>()[r * in + j] = float(row[size_t(j)]) - p.zero;
    }
  }
  return fc;
}

QuantizedTensor encode_frozen(const FrozenCodes& fc, const Tensor& step_in, const QuantFormat& f) {
  const Tensor step = lsq_storage_step(step_in.to(Device::CPU)).to(DType::F32).contiguous();
  const Tensor c = fc.codes.to(DType::F32).contiguous(), z = fc.zero.to(DType::F32).contiguous();
  const int64_t out = c.size(0), in = c.size(1), G = f.n_groups(in);
  LB_CHECK(step.shape() == Shape({out, G}) && z.shape() == step.shape(), "encode_frozen [", f.name,
           "]: step and zero must be ", shape_str({out, G}));
  const float half = f.kind == QuantKind::IntSym ? float(int64_t(1) << (f.bits - 1)) : 0.0f;
  std::vector<uint8_t> codes(size_t(out * in));
  std::vector<GroupParams> params(size_t(out * G));
  for (int64_t r = 0; r < out; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const float zg = f.kind == QuantKind::IntSym ? half : z.data<float>()[r * G + g];
      params[size_t(r * G + g)] = {step.data<float>()[r * G + g], zg};
      for (int64_t j = f.group_begin(g), e = f.group_end(g, in); j < e; ++j)
        codes[size_t(r * in + j)] = uint8_t(c.data<float>()[r * in + j] + zg);
    }
  return make_quantized_tensor(f, out, in, codes.data(), params.data(), 1.0f);
}

}  // namespace lowbit
