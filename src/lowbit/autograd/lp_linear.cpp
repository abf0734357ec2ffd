// Low-precision training of a linear layer: the operand quantizers of each GEMM and the
// straight-through backward side by side (autograd/lp_linear.h).
#include "lowbit/autograd/lp_linear.h"

#include <algorithm>
#include <cmath>

#include "lowbit/autograd/functions.h"
#include "lowbit/ops/lp_int4.h"
#include "lowbit/ops/ops.h"

namespace lowbit {

LpPrecision parse_lp_precision(const std::string& name, const std::string& what) {
  if (name == "f32") return LpPrecision::F32;
  if (name == "bf16") return LpPrecision::BF16;
  if (name == "fp8") return LpPrecision::FP8;
  if (name == "mxfp4") return LpPrecision::MXFP4;
  if (name == "nvfp4") return LpPrecision::NVFP4;
  if (name == "fp4-dge") return LpPrecision::FP4_DGE;
  if (name == "int4") return LpPrecision::INT4;
  throw_error(what, ": '", name, "' is not a training precision (choices: f32, bf16, fp8, mxfp4, nvfp4, fp4-dge, int4)");
}

const char* lp_precision_name(LpPrecision p) {
  switch (p) {
    case LpPrecision::F32: return "f32";
    case LpPrecision::BF16: return "bf16";
    case LpPrecision::FP8: return "fp8";
    case LpPrecision::MXFP4: return "mxfp4";
    case LpPrecision::NVFP4: return "nvfp4";
    case LpPrecision::FP4_DGE: return "fp4-dge";
    case LpPrecision::INT4: return "int4";
  }
  return "?";
}

void check_lp_recipe(const LpRecipe& r) {
  if (r.amax_history < 1 || r.amax_history > 1024)
    throw_error("--amax-history ", r.amax_history, " is outside [1, 1024]");
  if (!(r.dge_k >= 1.0f && r.dge_k <= 100.0f))
    throw_error("--dge-k ", r.dge_k, " is outside [1, 100] (1: the straight-through estimator; the paper uses 5)");
  if (!(r.dge_clip > 0.0f && r.dge_clip <= 1000.0f))
    throw_error("--dge-clip ", r.dge_clip, " is outside (0, 1000] (the paper clips the DGE derivative at 3)");
  if (!(r.occ_quantile > 0.5 && r.occ_quantile <= 1.0))
    throw_error("--occ-quantile ", r.occ_quantile, " is outside (0.5, 1] (1: no clamping; the paper uses 0.99-0.999)");
}

int64_t lp_block(LpPrecision p) { return p == LpPrecision::NVFP4 ? 16 : p == LpPrecision::MXFP4 ? 32 : 0; }

float LpLinearState::delayed_scale(Role role, ops::LpFormat f) {
  settle(role);
  const auto& h = history[role];
  if (h.empty()) return 0.0f;
  const float amax = *std::max_element(h.begin(), h.end());
  return ops::lp::tensor_scale(f, amax);
}

void LpLinearState::record_later(Role role, ops::LpAmax amax, int keep) {
  pending_[role].push_back({std::move(amax), keep});
}

void LpLinearState::settle(Role role) {
  for (auto& p : pending_[role]) record(role, p.amax.get(), p.keep);
  pending_[role].clear();
}

void LpLinearState::settle() {
  for (Role r : {X, W, DY}) settle(r);
}

void LpLinearState::record(Role role, double amax, int keep) {
  auto& h = history[role];
  if (!std::isfinite(amax)) return;  // a diverged step must not poison the scale of the next ones
  h.push_back(float(amax));
  if (int64_t(h.size()) > keep) h.erase(h.begin(), h.end() - keep);
}

ops::LpQuantSpec lp_operand_spec(const LpRecipe& r, LpOperand op, uint64_t seed) {
  using ops::LpFormat;
  ops::LpQuantSpec s;
  const bool grad = op == LpOperand::DgradDy || op == LpOperand::WgradDy;
  switch (r.precision) {
    case LpPrecision::F32: return s;
    case LpPrecision::INT4: return s;  // its operands are ops/lp_int4.h's (lp_linear_int4), not lp_quantize's
    case LpPrecision::BF16: s.format = LpFormat::BF16; return s;
    case LpPrecision::FP8: s.format = grad ? LpFormat::E5M2 : LpFormat::E4M3; return s;
    case LpPrecision::FP4_DGE:
      // E5M2 gradients; x and W: E2M1 with one f32 scale per row (a tile wider than any row)
      if (grad) {
        s.format = LpFormat::E5M2;
      } else {
        s.format = LpFormat::E2M1;
        s.tile_rows = 1;
        s.tile_cols = 1 << 30;
      }
      return s;
    default: break;
  }
  const int32_t B = int32_t(lp_block(r.precision));
  s.format = r.precision == LpPrecision::NVFP4 ? LpFormat::NVFP4 : LpFormat::MXFP4;
  // Tiles run along each GEMM's reduction dimension: in (fprop), out (dgrad), tokens (wgrad).
  switch (op) {
    case LpOperand::FpropX: s.tile_rows = 1, s.tile_cols = B; break;
    case LpOperand::FpropW: s.tile_rows = r.weight_2d ? B : 1, s.tile_cols = B; break;
    case LpOperand::DgradW: s.tile_rows = B, s.tile_cols = r.weight_2d ? B : 1; break;
    case LpOperand::DgradDy: s.tile_rows = 1, s.tile_cols = B; break;
    case LpOperand::WgradDy:
    case LpOperand::WgradX: s.tile_rows = B, s.tile_cols = 1; break;
  }
  if (grad && r.stochastic_grads) {
    s.rounding = ops::LpRounding::Stochastic;
    s.seed = ops::lp::mix64(seed ^ (op == LpOperand::DgradDy ? 0x1ull : 0x2ull));
  }
  if (r.hadamard && (op == LpOperand::WgradDy || op == LpOperand::WgradX)) {
    s.rht_axis = 0;  // along the tokens (rows of x and dy)
    s.rht_size = 16;
    s.rht_seed = ops::lp::mix64(seed ^ 0x3ull);  // shared by the two operands
  }
  return s;
}

namespace {
Tensor quantize(const Tensor& v, const ops::LpQuantSpec& s, ops::LpQuantStats* st = nullptr) {
  Tensor y;
  ops::lp_quantize(v, s, y, st);
  return y;
}

// FP8 codes of v under scale ts (a re-encoding of an operand already quantized: no amax pass).
Tensor fp8_codes(const Tensor& v, ops::LpQuantSpec s, double ts, bool transpose) {
  s.tensor_scale = float(ts);
  Tensor c;
  ops::lp_quantize_fp8(v, s, c, nullptr, transpose);
  return c;
}

// alpha = s_a s_b, NaN when an operand held NaN/inf (its amax is NaN): the product is then NaN, as
// the emulated path's, whatever a body does with alpha = 0.
float fp8_alpha(const ops::LpQuantStats& a, const ops::LpQuantStats& b) {
  if (!std::isfinite(a.amax) || !std::isfinite(b.amax)) return std::nanf("");
  return float(a.tensor_scale * b.tensor_scale);
}

Tensor bf16_of(const Tensor& v) {
  Tensor b = Tensor::empty(v.shape(), DType::BF16, v.device());
  ops::cast(v, b);
  return b;
}

// The bf16 precision on bf16 GEMMs (CUDA): operands rounded to bf16 once, products in f32.
Var lp_linear_native_bf16(const Var& x, const Var& w, const Tensor& xv, const Tensor& wv, bool training) {
  const Tensor xb = bf16_of(xv), wb = bf16_of(wv);
  Tensor y = Tensor::empty({xv.size(0), wv.size(0)}, DType::F32, xv.device());
  ops::gemm(xb, false, wb, true, y);
  if (!training) return Var(y);
  return make_result(y, {x, w}, "lp_linear", [x, w, xb, wb, xs = xv.shape(), ws = wv.shape()](const Tensor& g) {
    const Tensor gb = bf16_of(g.contiguous());
    if (x.requires_grad()) {
      Tensor dx = Tensor::empty(xs, DType::F32, gb.device());
      ops::gemm(gb, false, wb, false, dx);
      accumulate_grad(x, dx);
    }
    if (w.requires_grad()) {
      Tensor dw = Tensor::empty(ws, DType::F32, gb.device());
      ops::gemm(gb, true, xb, false, dw);
      accumulate_grad(w, dw);
    }
  });
}

// Delayed scaling with a history (every step after the first): the scales are known on the host
// before the operands are read, so each operand is encoded in one pass into the layouts its GEMMs
// need (x and x^T, W and W^T, dy and dy^T: the transposed codes are kept for the backward instead
// of the f32 values) and its amax reaches the history later (LpLinearState::record_later) — no host
// synchronisation in the step. The codes, scales and histories are the other path's; the first
// backward (no dy history yet) takes dy's current scale, as the emulated layer does.
Var lp_linear_native_fp8_delayed(const Var& x, const Var& w, const Tensor& xv, const Tensor& wv, const LpRecipe& r,
                                 const std::shared_ptr<LpLinearState>& state, uint64_t seed, bool training,
                                 const ops::LpQuantSpec& sx, const ops::LpQuantSpec& sw) {
  using Role = LpLinearState::Role;
  const bool need_xt = training && w.requires_grad(), need_wt = training && x.requires_grad();
  Tensor cx, cxt, cw, cwt;
  ops::LpAmax ax, aw;
  ops::lp_encode_fp8_dual(xv, sx.format, sx.tensor_scale, &cx, need_xt ? &cxt : nullptr, training ? &ax : nullptr);
  ops::lp_encode_fp8_dual(wv, sw.format, sw.tensor_scale, &cw, need_wt ? &cwt : nullptr, training ? &aw : nullptr);
  if (training) {
    state->record_later(Role::X, ax, r.amax_history);
    state->record_later(Role::W, aw, r.amax_history);
  }
  Tensor y = Tensor::empty({xv.size(0), wv.size(0)}, DType::F32, xv.device());
  ops::fp8_gemm(cx, sx.format, cw, sw.format, sx.tensor_scale * sw.tensor_scale, y);
  if (!training) return Var(y);
  const float tsx = sx.tensor_scale, tsw = sw.tensor_scale;
  const ops::LpFormat fx = sx.format, fw = sw.format;
  return make_result(y, {x, w}, "lp_linear", [x, w, cxt, cwt, r, state, seed, tsx, tsw, fx, fw, xs = xv.shape(),
                                              ws = wv.shape()](const Tensor& g) {
    const Tensor gv = g.contiguous();
    ops::LpQuantSpec sg = lp_operand_spec(r, LpOperand::DgradDy, seed);
    float tsg = state->delayed_scale(LpLinearState::DY, sg.format);
    float alpha_scale = tsg;  // NaN when dy held NaN/inf (current scaling below): the products are NaN
    Tensor cg, cgt;
    if (tsg > 0) {
      ops::LpAmax ag;
      ops::lp_encode_fp8_dual(gv, sg.format, tsg, x.requires_grad() ? &cg : nullptr, w.requires_grad() ? &cgt : nullptr, &ag);
      state->record_later(LpLinearState::DY, ag, r.amax_history);
    } else {
      sg.tensor_scale = 0;
      ops::LpQuantStats stg;
      ops::lp_quantize_fp8(gv, sg, cg, &stg);
      state->record(LpLinearState::DY, stg.amax, r.amax_history);
      tsg = float(stg.tensor_scale);
      alpha_scale = std::isfinite(stg.amax) ? tsg : std::nanf("");
      if (w.requires_grad()) cgt = fp8_codes(gv, sg, tsg, true);
    }
    if (x.requires_grad()) {  // dx [T, in] = dy [T, out] . (W^T [in, out])^T
      Tensor dx = Tensor::empty(xs, DType::F32, gv.device());
      ops::fp8_gemm(cg, sg.format, cwt, fw, alpha_scale * tsw, dx);
      accumulate_grad(x, dx);
    }
    if (w.requires_grad()) {  // dW [out, in] = dy^T [out, T] . (x^T [in, T])^T
      Tensor dw = Tensor::empty(ws, DType::F32, gv.device());
      ops::fp8_gemm(cgt, sg.format, cxt, fx, alpha_scale * tsx, dw);
      accumulate_grad(w, dw);
    }
  });
}

// The fp8 precision on FP8 GEMMs: E4M3 codes of x and W, E5M2 codes of dy, each GEMM's operands
// laid out along its reduction dimension (W^T for dgrad, dy^T and x^T for wgrad: re-encoded with the
// forward's scales, so every GEMM sees the emulated path's values), the scales folded into alpha.
Var lp_linear_native_fp8(const Var& x, const Var& w, const Tensor& xv, const Tensor& wv, const LpRecipe& r,
                         const std::shared_ptr<LpLinearState>& state, uint64_t seed, bool training, bool delayed) {
  using Role = LpLinearState::Role;
  ops::LpQuantSpec sx = lp_operand_spec(r, LpOperand::FpropX, seed), sw = lp_operand_spec(r, LpOperand::FpropW, seed);
  if (delayed) {
    sx.tensor_scale = state->delayed_scale(Role::X, sx.format);
    sw.tensor_scale = state->delayed_scale(Role::W, sw.format);
  }
  if (delayed && sx.tensor_scale > 0 && sw.tensor_scale > 0)
    return lp_linear_native_fp8_delayed(x, w, xv, wv, r, state, seed, training, sx, sw);
  ops::LpQuantStats stx, stw;
  Tensor cx, cw;
  ops::lp_quantize_fp8(xv, sx, cx, &stx);
  ops::lp_quantize_fp8(wv, sw, cw, &stw);
  if (training && delayed) {
    state->record(Role::X, stx.amax, r.amax_history);
    state->record(Role::W, stw.amax, r.amax_history);
  }
  Tensor y = Tensor::empty({xv.size(0), wv.size(0)}, DType::F32, xv.device());
  ops::fp8_gemm(cx, sx.format, cw, sw.format, fp8_alpha(stx, stw), y);
  if (!training) return Var(y);
  return make_result(y, {x, w}, "lp_linear", [x, w, xv, wv, r, state, seed, delayed, sx, sw, stx, stw](const Tensor& g) {
    const Tensor gv = g.contiguous();
    ops::LpQuantSpec sg = lp_operand_spec(r, LpOperand::DgradDy, seed);
    if (delayed) sg.tensor_scale = state->delayed_scale(LpLinearState::DY, sg.format);
    ops::LpQuantStats stg;
    Tensor cg;
    ops::lp_quantize_fp8(gv, sg, cg, &stg);
    if (delayed) state->record(LpLinearState::DY, stg.amax, r.amax_history);
    if (x.requires_grad()) {  // dx [T, in] = dy [T, out] . (W^T [in, out])^T
      Tensor dx = Tensor::empty(xv.shape(), DType::F32, xv.device());
      ops::fp8_gemm(cg, sg.format, fp8_codes(wv, sw, stw.tensor_scale, true), sw.format, fp8_alpha(stg, stw), dx);
      accumulate_grad(x, dx);
    }
    if (w.requires_grad()) {  // dW [out, in] = dy^T [out, T] . (x^T [in, T])^T
      Tensor dw = Tensor::empty(wv.shape(), DType::F32, wv.device());
      ops::fp8_gemm(fp8_codes(gv, sg, stg.tensor_scale, true), sg.format, fp8_codes(xv, sx, stx.tensor_scale, true),
                    sx.format, fp8_alpha(stg, stx), dw);
      accumulate_grad(w, dw);
    }
  });
}
// fp4-dge (autograd/lp_linear.h): OCC on x, E2M1 per-row operands, E5M2 dy, the DGE on W's gradient.
Var lp_linear_fp4_dge(const Var& x, const Var& w, const Tensor& xv, const Tensor& wv, const LpRecipe& r, uint64_t seed,
                      bool training) {
  if (xv.device() != Device::CPU)
    throw_error("--precision fp4-dge: no CUDA body yet (the outlier quantile of OCC and the DGE derivative run on the "
                "CPU only): train it with --device cpu");
  const ops::LpQuantSpec sx = lp_operand_spec(r, LpOperand::FpropX, seed), sw = lp_operand_spec(r, LpOperand::FpropW, seed);
  Tensor xe;  // the forward's x operand: Q(clamp(x)) + residual
  if (r.occ_quantile < 1.0) {
    Tensor xc, res;
    ops::lp_occ_split(xv, r.occ_quantile, xc, res);
    xe = quantize(xc, sx);
    ops::add(xe, res, xe);
  } else {
    xe = quantize(xv, sx);
  }
  const Tensor wq = quantize(wv, sw);
  Tensor y = Tensor::empty({xv.size(0), wv.size(0)}, xv.dtype(), xv.device());
  ops::gemm(xe, false, wq, true, y);
  if (!training) return Var(y);
  return make_result(y, {x, w}, "lp_linear", [x, w, xe, wv, wq, r, seed, sw](const Tensor& g) {
    const Tensor gd = quantize(g.contiguous(), lp_operand_spec(r, LpOperand::DgradDy, seed));
    if (x.requires_grad()) {  // dx = E5M2(dy) . Q(W): straight through the quantizer and the clamp
      Tensor dx = Tensor::empty(xe.shape(), xe.dtype(), xe.device());
      ops::gemm(gd, false, wq, false, dx);
      accumulate_grad(x, dx);
    }
    if (w.requires_grad()) {  // dW = (E5M2(dy)^T . x_eff) * f'(W / S): the DGE
      Tensor dw = Tensor::empty(wv.shape(), wv.dtype(), wv.device());
      ops::gemm(gd, true, xe, false, dw);
      if (r.dge_k != 1.0f) ops::lp_dge_scale(wv, sw, r.dge_k, r.dge_clip, dw);
      accumulate_grad(w, dw);
    }
  });
}

// int4 (autograd/lp_linear.h): HQ forward operands, bit splitting + LSS of dy in the backward.
Var lp_linear_int4(const Var& x, const Var& w, const Tensor& xv, const Tensor& wv, const LpRecipe& r, uint64_t seed,
                   bool training) {
  const int32_t hb = r.hadamard ? kInt4HadamardBlock : 0;
  const bool row = r.int4_row_scales;
  const uint64_t hs = ops::lp::mix64(seed ^ 0x4ull);  // the transform's signs, shared by x and W
  Tensor xh, wh;  // Q(x H), Q(W H)
  ops::lp_int4_hq(xv, hb, hs, false, xh, nullptr, row);
  ops::lp_int4_hq(wv, hb, hs, false, wh, nullptr, row);
  Tensor y = Tensor::empty({xv.size(0), wv.size(0)}, xv.dtype(), xv.device());
  ops::gemm(xh, false, wh, true, y);
  if (!training) return Var(y);
  return make_result(y, {x, w}, "lp_linear", [x, w, xv, wv, xh, wh, r, seed, hb, hs, row](const Tensor& g) {
    const Tensor gv = g.contiguous();
    const auto back = [&](const Tensor& v, const Tensor& vh) {  // Q(v H) H^T (the naive recipe: Q(v))
      if (hb == 0) return vh;
      Tensor e;
      ops::lp_int4_hq(v, hb, hs, true, e, nullptr, row);
      return e;
    };
    Tensor hi, lo;  // bit splitting, once for both GEMMs
    if (r.stochastic_grads) ops::lp_int4_bitsplit(gv, ops::lp::mix64(seed ^ 0x5ull), hi, lo, nullptr, row);
    const auto dy = [&](const Tensor& partner, uint64_t salt, bool sample) {  // the estimate of dy a GEMM reads
      Tensor e;
      if (r.stochastic_grads) ops::lp_int4_lss(hi, lo, partner, sample, ops::lp::mix64(seed ^ salt), e);
      else ops::lp_int4_hq(gv, 0, 0, false, e, nullptr, row);
      return e;
    };
    using G = LpRecipe::Int4Grad;
    if (x.requires_grad()) {  // dx = dy_est . W_eff
      const Tensor we = back(wv, wh), gd = dy(Tensor(), 0x6ull, r.int4_grad != G::Bs);
      Tensor dx = Tensor::empty(xv.shape(), xv.dtype(), xv.device());
      ops::gemm(gd, false, we, false, dx);
      accumulate_grad(x, dx);
    }
    if (w.requires_grad()) {  // dW = dy_est^T . x_eff (sampled by |dy row| |x_eff row|)
      const Tensor xe = back(xv, xh), gw = dy(xe, 0x7ull, r.int4_grad == G::BsLss);
      Tensor dw = Tensor::empty(wv.shape(), wv.dtype(), wv.device());
      ops::gemm(gw, true, xe, false, dw);
      accumulate_grad(w, dw);
    }
  });
}
}  // namespace

Var lp_linear(const Var& x, const Var& w, const LpRecipe& r, const std::shared_ptr<LpLinearState>& state,
              uint64_t seed) {
  if (r.precision == LpPrecision::F32) return linear(x, w);
  const Tensor xv = x.value().contiguous(), wv = w.value().contiguous();
  if (xv.dim() != 2 || wv.dim() != 2 || xv.size(1) != wv.size(1))
    throw_error("lp_linear: x ", xv.describe(), " and weight ", wv.describe(), " do not match (weight is [out, in])");
  if (xv.dtype() != wv.dtype() || xv.device() != wv.device())
    throw_error("lp_linear: x is ", xv.describe(), " but the weight is ", wv.describe());
  const bool training = grad_enabled() && (x.requires_grad() || w.requires_grad());
  const bool fp8 = r.precision == LpPrecision::FP8;
  const bool delayed = fp8 && r.delayed_scaling && state;
  if (r.native_gemm && xv.dtype() == DType::F32) {
    const int64_t T = xv.size(0), in = xv.size(1), out = wv.size(0);
    if (fp8 && ops::fp8_gemm_shape_ok(T, out, in))
      return lp_linear_native_fp8(x, w, xv, wv, r, state, seed, training, delayed);
    if (r.precision == LpPrecision::BF16 && xv.device() == Device::CUDA)
      return lp_linear_native_bf16(x, w, xv, wv, training);
  }
  if (r.precision == LpPrecision::FP4_DGE) return lp_linear_fp4_dge(x, w, xv, wv, r, seed, training);
  if (r.precision == LpPrecision::INT4) return lp_linear_int4(x, w, xv, wv, r, seed, training);
  using Role = LpLinearState::Role;
  // fprop operands (fp8: the per-tensor scale from the history when delayed)
  ops::LpQuantSpec sx = lp_operand_spec(r, LpOperand::FpropX, seed), sw = lp_operand_spec(r, LpOperand::FpropW, seed);
  if (delayed) {
    sx.tensor_scale = state->delayed_scale(Role::X, sx.format);
    sw.tensor_scale = state->delayed_scale(Role::W, sw.format);
  }
  ops::LpQuantStats stx, stw;
  const Tensor xq = quantize(xv, sx, &stx), wq = quantize(wv, sw, &stw);
  if (training && delayed) {
    state->record(Role::X, stx.amax, r.amax_history);
    state->record(Role::W, stw.amax, r.amax_history);
  }
  Tensor y = Tensor::empty({xv.size(0), wv.size(0)}, xv.dtype(), xv.device());
  ops::gemm(xq, false, wq, true, y);
  if (!training) return Var(y);
  return make_result(y, {x, w}, "lp_linear", [x, w, xv, wv, xq, wq, r, state, seed, delayed](const Tensor& g) {
    const Tensor gv = g.contiguous();
    const bool fp4 = r.precision == LpPrecision::MXFP4 || r.precision == LpPrecision::NVFP4;
    // dgrad's dy (and, for bf16/fp8, wgrad's: one per-tensor quantization serves both GEMMs)
    ops::LpQuantSpec sg = lp_operand_spec(r, LpOperand::DgradDy, seed);
    if (delayed) sg.tensor_scale = state->delayed_scale(LpLinearState::DY, sg.format);
    ops::LpQuantStats stg;
    const Tensor gd = quantize(gv, sg, &stg);
    if (delayed) state->record(LpLinearState::DY, stg.amax, r.amax_history);
    if (x.requires_grad()) {  // dx = Q(dy) . Q(W): the forward's Q(W) unless 1-D fp4 tiles
      const Tensor wd = fp4 && !r.weight_2d ? quantize(wv, lp_operand_spec(r, LpOperand::DgradW, seed)) : wq;
      Tensor dx = Tensor::empty(xv.shape(), xv.dtype(), xv.device());
      ops::gemm(gd, false, wd, false, dx);
      accumulate_grad(x, dx);
    }
    if (w.requires_grad()) {  // dW = Q(H dy)^T . Q(H x) (fp4), Q(dy)^T . Q(x) otherwise
      const Tensor gw = fp4 ? quantize(gv, lp_operand_spec(r, LpOperand::WgradDy, seed)) : gd;
      const Tensor xw = fp4 ? quantize(xv, lp_operand_spec(r, LpOperand::WgradX, seed)) : xq;
      Tensor dw = Tensor::empty(wv.shape(), wv.dtype(), wv.device());
      ops::gemm(gw, true, xw, false, dw);
      accumulate_grad(w, dw);
    }
  });
}

}  // namespace lowbit
