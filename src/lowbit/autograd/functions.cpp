// Autograd ops: forward and backward side by side. Each backward receives the gradient of the
// op's output (g) and accumulates the gradients of the inputs.
#include "lowbit/autograd/functions.h"

#include <cmath>
#include <cstdlib>
#include <string_view>

#include "lowbit/ops/ops.h"

namespace lowbit {

namespace {
Tensor like(const Tensor& t) { return Tensor::empty(t.shape(), t.dtype(), t.device()); }
Tensor contig(const Var& v) { return v.value().contiguous(); }
}  // namespace

// ---- matmul: C = op(A) op(B);  dA = dC op(B)^T (transposed back if trans_a), dB likewise ----------
Var matmul(const Var& a, const Var& b, bool ta, bool tb) {
  Tensor av = contig(a), bv = contig(b);
  const int64_t M = ta ? av.size(-1) : av.size(-2), N = tb ? bv.size(-2) : bv.size(-1);
  Shape cs(av.shape().begin(), av.shape().end() - 2);
  cs.push_back(M);
  cs.push_back(N);
  Tensor c = Tensor::empty(cs, av.dtype(), av.device());
  ops::gemm(av, ta, bv, tb, c);
  return make_result(c, {a, b}, "matmul", [a, b, av, bv, ta, tb](const Tensor& g) {
    if (a.requires_grad()) {
      Tensor da = like(av);
      // C = A B: dA = G B^T; C = A^T B: dA = B G^T; with op(B) = B^T swap roles of trans flags.
      if (!ta) ops::gemm(g, false, bv, !tb, da);
      else ops::gemm(bv, tb, g, true, da);
      accumulate_grad(a, da);
    }
    if (b.requires_grad()) {
      const bool broadcast = bv.dim() == 2 && av.dim() > 2;
      Tensor ga = broadcast ? g.view({-1, g.size(-1)}) : g;
      Tensor aa = broadcast ? av.view({-1, av.size(-1)}) : av;
      if (broadcast && ta) throw_error("matmul backward: broadcast b with transposed a is not supported");
      Tensor db = like(bv);
      if (!tb) ops::gemm(aa, !ta, ga, false, db);
      else ops::gemm(ga, true, aa, ta, db);
      accumulate_grad(b, db);
    }
  });
}

// ---- autocast ----------------------------------------------------------------------------------
namespace {
thread_local bool g_autocast_bf16 = false;
}
AutocastBf16Guard::AutocastBf16Guard(bool enable) : prev_(g_autocast_bf16) { g_autocast_bf16 = enable; }
AutocastBf16Guard::~AutocastBf16Guard() { g_autocast_bf16 = prev_; }
bool AutocastBf16Guard::active() { return g_autocast_bf16; }
bool autocast_bf16_applies(const Tensor& x) {
  return g_autocast_bf16 && x.defined() && x.device() == Device::CUDA && x.dtype() == DType::F32;
}
namespace {
bool& fused_weights_flag() {
  static bool on = [] {
    const char* e = std::getenv("LOWBIT_BF16_WEIGHT_FUSED");
    return !(e && e[0] == '0');
  }();
  return on;
}
}  // namespace
bool autocast_fused_weights() { return fused_weights_flag(); }
void set_autocast_fused_weights(bool on) { fused_weights_flag() = on; }
Tensor cast_to(const Tensor& x, DType dtype) {
  if (x.dtype() == dtype) return x.contiguous();
  Tensor y = Tensor::empty(x.shape(), dtype, x.device());
  ops::cast(x.contiguous(), y);
  return y;
}
Tensor to_bf16(const Tensor& x) { return cast_to(x, DType::BF16); }
Tensor autocast_bf16_input(const Var& x) {
  Node& n = *x.node();
  const bool op_output = static_cast<bool>(n.backward) || std::string_view(n.op) != "leaf";
  if (!op_output) return to_bf16(x.value());
  if (!n.bf16_copy.defined() || n.bf16_copy.shape() != n.value.shape()) n.bf16_copy = to_bf16(n.value);
  return n.bf16_copy;
}

// ---- linear: y = x W^T + bias;  dx = dy W,  dW = dy^T x,  dbias = sum_rows dy ---------------------
// Under AutocastBf16Guard the three products take bf16 operands (xo, wo, and dy's copy) and write
// f32 results; otherwise the operands are x and W themselves.
Var linear(const Var& x, const Var& w, const Var& bias) {
  Tensor xv = contig(x), wv = contig(w);
  if (xv.dim() != 2 || wv.dim() != 2 || xv.size(1) != wv.size(1))
    throw_error("linear: x ", xv.describe(), " and weight ", wv.describe(), " do not match (weight is [out, in])");
  const bool mixed = autocast_bf16_applies(xv) && wv.dtype() == DType::F32;
  const Tensor xo = mixed ? autocast_bf16_input(x) : xv, wo = mixed ? to_bf16(wv) : wv;
  const DType xdt = xv.dtype(), wdt = wv.dtype();
  Tensor y = Tensor::empty({xv.size(0), wv.size(0)}, xdt, xv.device());
  ops::gemm(xo, false, wo, true, y);
  if (bias.defined()) ops::add(y, bias.value(), y);
  std::vector<Var> inputs{x, w};
  if (bias.defined()) inputs.push_back(bias);
  return make_result(y, inputs, "linear", [x, w, bias, xo, wo, xdt, wdt, mixed](const Tensor& g) {
    const Tensor go = mixed ? to_bf16(g) : g;
    if (x.requires_grad()) {
      Tensor dx = Tensor::empty(xo.shape(), xdt, xo.device());
      ops::gemm(go, false, wo, false, dx);
      accumulate_grad(x, dx);
    }
    if (w.requires_grad()) {
      Tensor dw = Tensor::empty(wo.shape(), wdt, wo.device());
      ops::gemm(go, true, xo, false, dw);
      accumulate_grad(w, dw);
    }
    if (bias.defined() && bias.requires_grad()) {
      Tensor db = like(bias.value());
      ops::sum_rows(g, db);
      accumulate_grad(bias, db);
    }
  });
}

// ---- elementwise ----------------------------------------------------------------------------------
namespace {
// Gradient for an operand that may have been broadcast as a row vector.
Tensor reduce_to(const Tensor& g, const Tensor& like_t) {
  if (g.shape() == like_t.shape()) return g;
  Tensor r = like(like_t);
  ops::sum_rows(g, r);
  return r;
}
}  // namespace

Var add(const Var& a, const Var& b) {
  Tensor av = contig(a), bv = contig(b), out = like(av);
  ops::add(av, bv, out);
  return make_result(out, {a, b}, "add", [a, b, bv](const Tensor& g) {
    accumulate_grad(a, g);
    if (b.requires_grad()) accumulate_grad(b, reduce_to(g, bv));
  });
}

Var sub(const Var& a, const Var& b) {
  Tensor av = contig(a), bv = contig(b), out = like(av);
  ops::sub(av, bv, out);
  return make_result(out, {a, b}, "sub", [a, b, bv](const Tensor& g) {
    accumulate_grad(a, g);
    if (b.requires_grad()) {
      Tensor r = reduce_to(g, bv), n = like(r);
      ops::scale(r, -1.0, n);
      accumulate_grad(b, n);
    }
  });
}

Var mul(const Var& a, const Var& b) {
  Tensor av = contig(a), bv = contig(b), out = like(av);
  ops::mul(av, bv, out);
  return make_result(out, {a, b}, "mul", [a, b, av, bv](const Tensor& g) {
    if (a.requires_grad()) {
      Tensor da = like(av);
      ops::mul(g, bv, da);
      accumulate_grad(a, da);
    }
    if (b.requires_grad()) {
      Tensor t = like(av);
      ops::mul(g, av, t);
      accumulate_grad(b, reduce_to(t, bv));
    }
  });
}

Var scale(const Var& x, double s) {
  Tensor xv = contig(x), out = like(xv);
  ops::scale(xv, s, out);
  return make_result(out, {x}, "scale", [x, s](const Tensor& g) {
    Tensor d = like(g);
    ops::scale(g, s, d);
    accumulate_grad(x, d);
  });
}

Var sum(const Var& x) {
  Tensor xv = contig(x), out = Tensor::empty({}, xv.dtype(), xv.device());
  ops::sum(xv, out);
  return make_result(out, {x}, "sum", [x, xv](const Tensor& g) {
    // d = g broadcast over x's shape, on g's device: zeros plus the 0-d g as a one-element row
    // (ops::add's row broadcast). No host read of g: a GPU step stays free of synchronisation.
    Tensor d = Tensor::zeros(xv.shape(), xv.dtype(), xv.device());
    if (d.numel() > 0) {
      Tensor dv = d.view({d.numel(), 1});
      ops::add(dv, g.contiguous().view({1}), dv);
    }
    accumulate_grad(x, d);
  });
}

Var mean(const Var& x) { return scale(sum(x), 1.0 / double(x.numel() > 0 ? x.numel() : 1)); }

Var reshape(const Var& x, const Shape& shape) {
  Tensor out = contig(x).view(shape);
  const Shape orig = x.shape();
  return make_result(out, {x}, "reshape", [x, orig](const Tensor& g) { accumulate_grad(x, g.contiguous().view(orig)); });
}

// ---- rmsnorm --------------------------------------------------------------------------------------
Var rmsnorm(const Var& x, const Var& w, double eps) {
  Tensor xv = contig(x), wv = contig(w), y = like(xv);
  const int64_t D = xv.size(-1);
  Tensor rstd = Tensor::empty({xv.numel() / (D > 0 ? D : 1)}, xv.dtype(), xv.device());
  ops::rmsnorm_forward(xv, wv, eps, y, rstd);
  return make_result(y, {x, w}, "rmsnorm", [x, w, xv, wv, rstd](const Tensor& g) {
    Tensor dx = like(xv), dw = like(wv);
    ops::rmsnorm_backward(g.contiguous(), xv, wv, rstd, dx, dw);
    accumulate_grad(x, dx);
    accumulate_grad(w, dw);
  });
}

// ---- rotary embedding: an orthogonal rotation, so the backward rotates by -angle -----------------
Var rope(const Var& x, int64_t B, int64_t T, int64_t H, int64_t hd, int64_t pos0, double theta, RopeStyle style,
         const RopeScaling& scaling) {
  Tensor xv = contig(x);
  if (xv.numel() != B * T * H * hd) throw_error("rope: ", xv.describe(), " is not [", B, "*", T, ", ", H, "*", hd, "]");
  Tensor x4 = xv.view({B, T, H, hd}), y = like(x4);
  ops::rope(x4, pos0, theta, style, false, y, scaling);
  const Shape orig = xv.shape();
  return make_result(y.view(orig), {x}, "rope", [x, B, T, H, hd, pos0, theta, style, scaling, orig](const Tensor& g) {
    Tensor g4 = g.contiguous().view({B, T, H, hd}), dx = like(g4);
    ops::rope(g4, pos0, theta, style, true, dx, scaling);
    accumulate_grad(x, dx.view(orig));
  });
}

// ---- attention ------------------------------------------------------------------------------------
Var attention(const Var& q, const Var& k, const Var& v, int64_t B, int64_t Tq, int64_t Tk, int64_t H, int64_t KVH,
              int64_t hd) {
  Tensor q4 = contig(q).view({B, Tq, H, hd}), k4 = contig(k).view({B, Tk, KVH, hd}), v4 = contig(v).view({B, Tk, KVH, hd});
  if (autocast_bf16_applies(q4)) {  // bf16 kernels, f32 in and out (AutocastBf16Guard)
    const Tensor qb = to_bf16(q4), kb = to_bf16(k4), vb = to_bf16(v4);
    Tensor ob = like(qb), lse = Tensor::empty({B, H, Tq}, DType::F32, q4.device());
    const double sc = 1.0 / std::sqrt(double(hd));
    ops::attention_forward(qb, kb, vb, sc, ob, lse);
    const Shape qs = q.shape(), ks = k.shape();
    return make_result(cast_to(ob, DType::F32).view(qs), {q, k, v}, "attention", [=](const Tensor& g) {
      Tensor dq = like(qb), dk = like(kb), dv = like(vb);
      ops::attention_backward(to_bf16(g.contiguous().view(qb.shape())), qb, kb, vb, ob, lse, sc, dq, dk, dv);
      accumulate_grad(q, cast_to(dq, DType::F32).view(qs));
      accumulate_grad(k, cast_to(dk, DType::F32).view(ks));
      accumulate_grad(v, cast_to(dv, DType::F32).view(ks));
    });
  }
  // The log-sum-exp stays in f32 for bf16 activations: backward recomputes P = exp(S - lse) from
  // it, and bf16's 8 mantissa bits there would cost the gradients most of their precision.
  const DType lse_dtype = q4.dtype() == DType::BF16 ? DType::F32 : q4.dtype();
  Tensor out = like(q4), lse = Tensor::empty({B, H, Tq}, lse_dtype, q4.device());
  const double sc = 1.0 / std::sqrt(double(hd));
  ops::attention_forward(q4, k4, v4, sc, out, lse);
  const Shape qs = q.shape(), ks = k.shape();
  return make_result(out.view(qs), {q, k, v}, "attention", [=](const Tensor& g) {
    Tensor dq = like(q4), dk = like(k4), dv = like(v4);
    ops::attention_backward(g.contiguous().view(q4.shape()), q4, k4, v4, out, lse, sc, dq, dk, dv);
    accumulate_grad(q, dq.view(qs));
    accumulate_grad(k, dk.view(ks));
    accumulate_grad(v, dv.view(ks));
  });
}

// ---- activations ----------------------------------------------------------------------------------
Var silu(const Var& x) {
  Tensor xv = contig(x), y = like(xv);
  ops::silu_forward(xv, y);
  return make_result(y, {x}, "silu", [x, xv](const Tensor& g) {
    Tensor dx = like(xv);
    ops::silu_backward(g.contiguous(), xv, dx);
    accumulate_grad(x, dx);
  });
}

Var swiglu(const Var& gate, const Var& up) {
  Tensor gv = contig(gate), uv = contig(up), y = like(gv);
  ops::swiglu_forward(gv, uv, y);
  return make_result(y, {gate, up}, "swiglu", [gate, up, gv, uv](const Tensor& g) {
    Tensor dg = like(gv), du = like(uv);
    ops::swiglu_backward(g.contiguous(), gv, uv, dg, du);
    accumulate_grad(gate, dg);
    accumulate_grad(up, du);
  });
}

// ---- embedding ------------------------------------------------------------------------------------
Var embedding(const Var& table, const Tensor& ids) {
  Tensor tv = contig(table), idc = ids.contiguous().view({-1});
  Tensor out = Tensor::empty({idc.numel(), tv.size(1)}, tv.dtype(), tv.device());
  ops::embedding_forward(tv, idc, out);
  return make_result(out, {table}, "embedding", [table, tv, idc](const Tensor& g) {
    Tensor dt = like(tv);
    ops::embedding_backward(g.contiguous(), idc, dt);
    accumulate_grad(table, dt);
  });
}

// ---- losses ---------------------------------------------------------------------------------------
Var cross_entropy(const Var& logits, const Tensor& targets) {
  Tensor z = contig(logits), t = targets.contiguous().view({-1});
  Tensor loss = Tensor::empty({}, z.dtype(), z.device()), lse = Tensor::empty({z.size(0)}, z.dtype(), z.device());
  ops::cross_entropy_forward(z, t, loss, lse);
  return make_result(loss, {logits}, "cross_entropy", [logits, z, t, lse](const Tensor& g) {
    Tensor dz = like(z);
    ops::cross_entropy_backward(g, z, t, lse, dz);
    accumulate_grad(logits, dz);
  });
}

Var kl_div(const Var& p_logits, const Var& q_logits) {
  Tensor p = contig(p_logits), q = contig(q_logits), loss = Tensor::empty({}, p.dtype(), p.device());
  ops::kl_div_forward(p, q, loss);
  return make_result(loss, {p_logits, q_logits}, "kl_div", [p_logits, q_logits, p, q](const Tensor& g) {
    Tensor dp = p_logits.requires_grad() ? like(p) : Tensor(), dq = q_logits.requires_grad() ? like(q) : Tensor();
    ops::kl_div_backward(g, p, q, dp, dq);
    if (dp.defined()) accumulate_grad(p_logits, dp);
    if (dq.defined()) accumulate_grad(q_logits, dq);
  });
}

Var mse(const Var& a, const Var& b) {
  Tensor av = contig(a), bv = contig(b), loss = Tensor::empty({}, av.dtype(), av.device());
  ops::mse_forward(av, bv, loss);
  return make_result(loss, {a, b}, "mse", [a, b, av, bv](const Tensor& g) {
    Tensor da = a.requires_grad() ? like(av) : Tensor(), db = b.requires_grad() ? like(bv) : Tensor();
    ops::mse_backward(g, av, bv, da, db);
    if (da.defined()) accumulate_grad(a, da);
    if (db.defined()) accumulate_grad(b, db);
  });
}

Var weighted_sq_err(const Var& a, const Tensor& b, const Tensor& w, double scale) {
  Tensor av = contig(a), bv = b.contiguous(), wv = w.contiguous(), loss = Tensor::empty({}, av.dtype(), av.device());
  ops::weighted_sq_err_forward(av, bv, wv, scale, loss);
  return make_result(loss, {a}, "weighted_sq_err", [a, av, bv, wv, scale](const Tensor& g) {
    Tensor da = like(av);
    ops::weighted_sq_err_backward(g.contiguous(), av, bv, wv, scale, da);
    accumulate_grad(a, da);
  });
}

// ---- dtype conversion: dx = cast(dy) back to x's dtype ---------------------------------------------
// ---- randomized Hadamard transform: orthogonal, so the backward is the transposed transform ----
Var hadamard_transform(const Var& x, const Tensor& signs, const Tensor& small, bool transpose) {
  Tensor xv = contig(x), y = like(xv);
  ops::hadamard_transform(xv, signs, small, transpose, y);
  return make_result(y, {x}, "hadamard_transform", [x, signs, small, transpose](const Tensor& g) {
    Tensor gc = g.contiguous(), dx = like(gc);
    ops::hadamard_transform(gc, signs, small, !transpose, dx);
    accumulate_grad(x, dx);
  });
}

// ---- fake quantization: straight-through estimator ---------------------------------------------
Var fake_quant(const Var& x, int bits, bool asymmetric, double clip, int64_t group, bool per_column) {
  Tensor xv = contig(x), y = like(xv);
  ops::fake_quant(xv, bits, asymmetric, clip, group, per_column, y);
  return make_result(y, {x}, "fake_quant", [x](const Tensor& g) { accumulate_grad(x, g.contiguous()); });
}

Var cast(const Var& x, DType dtype) {
  if (x.value().dtype() == dtype) return x;
  Tensor xv = contig(x), out = Tensor::empty(xv.shape(), dtype, xv.device());
  ops::cast(xv, out);
  const DType from = xv.dtype();
  return make_result(out, {x}, "cast", [x, from](const Tensor& g) {
    Tensor gc = g.contiguous(), dx = Tensor::empty(gc.shape(), from, gc.device());
    ops::cast(gc, dx);
    accumulate_grad(x, dx);
  });
}

}  // namespace lowbit
