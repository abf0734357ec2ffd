// Low-precision training of a linear layer: the operand quantizers of each GEMM and the
// straight-through backward side by side (autograd/lp_linear.h).
#include "lowbit/autograd/lp_linear.h"

#include <algorithm>
#include <cmath>

#include "lowbit/autograd/functions.h"
#include "lowbit/ops/ops.h"

namespace lowbit {

LpPrecision parse_lp_precision(const std::string& name, const std::string& what) {
  if (name == "f32") return LpPrecision::F32;
  if (name == "bf16") return LpPrecision::BF16;
  if (name == "fp8") return LpPrecision::FP8;
  if (name == "mxfp4") return LpPrecision::MXFP4;
  if (name == "nvfp4") return LpPrecision::NVFP4;
  throw_error(what, ": '", name, "' is not a training precision (choices: f32, bf16, fp8, mxfp4, nvfp4)");
}

const char* lp_precision_name(LpPrecision p) {
  switch (p) {
    case LpPrecision::F32: return "f32";
    case LpPrecision::BF16: return "bf16";
    case LpPrecision::FP8: return "fp8";
    case LpPrecision::MXFP4: return "mxfp4";
    case LpPrecision::NVFP4: return "nvfp4";
  }
  return "?";
}

void check_lp_recipe(const LpRecipe& r) {
  if (r.amax_history < 1 || r.amax_history > 1024)
    throw_error("--amax-history ", r.amax_history, " is outside [1, 1024]");
}

int64_t lp_block(LpPrecision p) { return p == LpPrecision::NVFP4 ? 16 : p == LpPrecision::MXFP4 ? 32 : 0; }

float LpLinearState::delayed_scale(Role role, ops::LpFormat f) const {
  const auto& h = history[role];
  if (h.empty()) return 0.0f;
  const float amax = *std::max_element(h.begin(), h.end());
  return ops::lp::tensor_scale(f, amax);
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
    case LpPrecision::BF16: s.format = LpFormat::BF16; return s;
    case LpPrecision::FP8: s.format = grad ? LpFormat::E5M2 : LpFormat::E4M3; return s;
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
