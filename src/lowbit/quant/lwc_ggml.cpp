// Learnable weight clipping on llama.cpp's block grids (q4_0, q4_1, q5_0, q5_1, q8_0 and the
// k-quants q2_k .. q6_k): forward, straight-through backward and the encoding of the trained layer.
// The formulas and the gradient conventions are in lwc.h ("ggml block formats").
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "lowbit/quant/ggml_grid.h"
#include "lowbit/quant/lwc.h"
#include "lowbit/quant/quantize.h"

namespace lowbit {

namespace {

template <class T>
T sigm(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// How one ggml type maps the clipping onto its grid.
enum class Family {
  Signed32,  // q4_0, q5_0: scale = sg * signed extreme / -off
  Abs32,     // q8_0: scale = sg * absmax / 127
  Affine32,  // q4_1, q5_1: clipped around the block's midpoint, scale = (hi' - lo') / qmax, min = lo'
  AffineK,   // q2_k, q4_k, q5_k: 0-inclusive range, scale = (sg hi - sb lo) / qmax, min = -sb lo
  SignedK,   // q3_k, q6_k: scale = sg * signed extreme / -off
};

struct Grid {
  Family fam;
  int sub;     // values per clipping group (the sub-block; the block for the 32-value types)
  int ns;      // sub-blocks per block
  int qmax;    // codes 0..qmax
  int off;     // level = code - off
  int sc_lo = 0, sc_hi = 0;  // k-quants: stored sub-scale range (affine: the min's too, 0..sc_hi)
  bool affine() const { return fam == Family::Affine32 || fam == Family::AffineK; }
  bool kquant() const { return fam == Family::AffineK || fam == Family::SignedK; }
};

bool grid_of(const QuantFormat& f, Grid& g) {
  if (!f.is_ggml_block() || !ggml_block_grid_supported(f)) return false;
  switch (f.id) {
    case QuantFormatId::Q4_0: g = {Family::Signed32, 32, 1, 15, 8}; return true;
    case QuantFormatId::Q5_0: g = {Family::Signed32, 32, 1, 31, 16}; return true;
    case QuantFormatId::Q8_0: g = {Family::Abs32, 32, 1, 254, 127}; return true;
    case QuantFormatId::Q4_1: g = {Family::Affine32, 32, 1, 15, 0}; return true;
    case QuantFormatId::Q5_1: g = {Family::Affine32, 32, 1, 31, 0}; return true;
    case QuantFormatId::Q2_K: g = {Family::AffineK, 16, 16, 3, 0, 0, 15}; return true;
    case QuantFormatId::Q4_K: g = {Family::AffineK, 32, 8, 15, 0, 0, 63}; return true;
    case QuantFormatId::Q5_K: g = {Family::AffineK, 32, 8, 31, 0, 0, 63}; return true;
    case QuantFormatId::Q3_K: g = {Family::SignedK, 16, 16, 7, 4, -32, 31}; return true;
    case QuantFormatId::Q6_K: g = {Family::SignedK, 16, 16, 63, 32, -128, 127}; return true;
    default: return false;  // iq4_nl (non-uniform levels), iq4_xs, tq1_0, tq2_0
  }
}

Grid grid(const QuantFormat& f) {
  Grid g{};
  LB_CHECK(grid_of(f, g), "lwc: format ", f.name, " has no learnable clipping (ggml types: ", lwc_ggml_names(), ")");
  return g;
}

// The clipping of one sub-block: its continuous scale and min as functions of sg = sigmoid(gamma),
// sb = sigmoid(beta), and their partial derivatives (W frozen).
template <class T>
struct Clip {
  T scale = 0, min = 0;
  T ds_dg = 0, ds_db = 0, dm_db = 0;  // d scale / d sg, d scale / d sb, d min / d sb
};

// sg, sb here are the clipping factors kLwcGgmlRange * sigmoid(logit); the chain rule's factor
// kLwcGgmlRange is applied by the callers.
template <class T>
Clip<T> clip_sub(const Grid& g, const T* x, T sg, T sb) {
  Clip<T> c;
  T mx = x[0], mn = x[0], ext = x[0];
  for (int i = 1; i < g.sub; ++i) {
    mx = std::max(mx, x[i]), mn = std::min(mn, x[i]);
    if (std::fabs(x[i]) > std::fabs(ext)) ext = x[i];
  }
  switch (g.fam) {
    case Family::Signed32: case Family::SignedK:
      c.ds_dg = ext / T(-g.off);
      c.scale = sg * c.ds_dg;
      break;
    case Family::Abs32:
      c.ds_dg = std::fabs(ext) / T(127);
      c.scale = sg * c.ds_dg;
      break;
    case Family::Affine32: {
      const T mid = (mx + mn) / T(2);
      const T hi = mid + sg * (mx - mid), lo = mid + sb * (mn - mid);
      c.scale = (hi - lo) / T(g.qmax);
      c.min = lo;
      c.ds_dg = (mx - mid) / T(g.qmax);
      c.ds_db = -(mn - mid) / T(g.qmax);
      c.dm_db = mn - mid;
      break;
    }
    case Family::AffineK: {
      const T hi = std::max(mx, T(0)), lo = std::min(mn, T(0));
      c.scale = (sg * hi - sb * lo) / T(g.qmax);
      c.min = -sb * lo;
      c.ds_dg = hi / T(g.qmax);
      c.ds_db = -lo / T(g.qmax);
      c.dm_db = -lo;
      break;
    }
  }
  return c;
}

template <class T>
T f16_round(T v) {
  return T(fmt_f16_to_f32(fmt_f32_to_f16(float(v))));
}

// ggml_grid's nearest_clamped in T: NaN -> lo, saturating at the bounds.
template <class T>
int nearest_clamped(T v, int lo, int hi) {
  if (!(v == v)) return lo;
  if (v <= T(lo)) return lo;
  if (v >= T(hi)) return hi;
  return int(std::nearbyint(v));
}

// The stored parameters of one block as the generic (f32/f64) path computes them, with every
// discrete decision kept for the backward.
template <class T>
struct BlockParams {
  T D = 0, Dmin = 0;        // the block's f16 d (dmin): k-quants; the 32-value types: d (and m)
  int tD = -1, tDmin = -1;  // k-quants: the sub-block whose scale (min) sets d (dmin); -1: none (d = 0)
  T step[16] = {}, shift[16] = {};
  int sc[16] = {}, m[16] = {};
  bool sc_clamped[16] = {}, m_clamped[16] = {};
  T r_sc[16] = {}, r_m[16] = {};  // rounding residuals sc - scale / d, m - min / dmin
};

template <class T>
BlockParams<T> block_params(const Grid& g, const Clip<T>* c) {
  BlockParams<T> p;
  if (!g.kquant()) {
    p.D = f16_round(c[0].scale);
    p.step[0] = p.D;
    if (g.fam == Family::Affine32) p.Dmin = f16_round(c[0].min), p.shift[0] = -p.Dmin;
    return p;
  }
  if (g.fam == Family::AffineK) {
    T best = 0, best_m = 0;
    for (int s = 0; s < g.ns; ++s) {
      if (c[s].scale > best) best = c[s].scale, p.tD = s;
      if (c[s].min > best_m) best_m = c[s].min, p.tDmin = s;
    }
    p.D = f16_round(best / T(g.sc_hi));
    p.Dmin = f16_round(best_m / T(g.sc_hi));
  } else {
    T amax = 0, best = 0;
    for (int s = 0; s < g.ns; ++s)
      if (std::fabs(c[s].scale) > amax) amax = std::fabs(c[s].scale), best = c[s].scale, p.tD = s;
    p.D = f16_round(amax > 0 ? best / T(g.sc_lo) : T(0));
  }
  for (int s = 0; s < g.ns; ++s) {
    if (p.D != 0) {
      const T v = c[s].scale / p.D;
      p.sc[s] = nearest_clamped(v, g.sc_lo, g.sc_hi);
      const T n = std::nearbyint(v);
      p.sc_clamped[s] = !(n >= T(g.sc_lo) && n <= T(g.sc_hi));
      p.r_sc[s] = T(p.sc[s]) - v;
    }
    if (g.fam == Family::AffineK && p.Dmin != 0) {
      const T v = c[s].min / p.Dmin;
      p.m[s] = nearest_clamped(v, 0, g.sc_hi);
      const T n = std::nearbyint(v);
      p.m_clamped[s] = !(n >= T(0) && n <= T(g.sc_hi));
      p.r_m[s] = T(p.m[s]) - v;
    }
    p.step[s] = p.D * T(p.sc[s]);
    p.shift[s] = p.Dmin * T(p.m[s]);
  }
  return p;
}

// The level (code - off) of x on the grid (step, shift) with ggml_grid_round's rule; u is the
// unrounded level and `inside` whether the rounding was not clamped.
template <class T>
int level_of(const Grid& g, T x, T step, T shift, T& u, bool& inside) {
  u = 0;
  inside = false;
  if (step == 0) return 0;  // every rule gives level 0 on a zero step
  u = (x + shift) / step;
  switch (g.fam) {
    case Family::Signed32: case Family::Affine32: {  // code = trunc(u + off + 0.5) clipped to [0, qmax]
      const T v = u + T(g.off) + T(0.5);
      inside = v >= 0 && v < T(g.qmax + 1);
      const int q = v >= 0 ? (v < T(g.qmax + 1) ? int(v) : g.qmax) : 0;
      return q - g.off;
    }
    case Family::Abs32: {
      if (!(u == u)) return 0;
      const T n = std::round(u);
      inside = n >= T(-127) && n <= T(127);
      return int(std::clamp(n, T(-127), T(127)));
    }
    default: {
      inside = std::nearbyint(u) >= T(-g.off) && std::nearbyint(u) <= T(g.qmax - g.off);
      return nearest_clamped(u, -g.off, g.qmax - g.off);
    }
  }
}

void check_shapes(const Grid& g, const QuantFormat& f, const Tensor& w, const Tensor& gamma, const Tensor& beta) {
  LB_CHECK(w.size(1) % f.group_size == 0, "lwc [", f.name, "]: rows of ", w.size(1), " values are not whole ",
           f.group_size, "-value blocks");
  const Shape gs{w.size(0), w.size(1) / g.sub};
  LB_CHECK(gamma.shape() == gs, "lwc [", f.name, "]: gamma must be ", shape_str(gs), " (one logit per ", g.sub,
           "-value sub-block), got ", gamma.describe());
  LB_CHECK(beta.defined() == g.affine(), "lwc [", f.name, "]: ", g.affine() ? "beta must be given" : "beta must be undefined");
  if (beta.defined()) LB_CHECK(beta.shape() == gs, "lwc [", f.name, "]: beta must be ", shape_str(gs), ", got ", beta.describe());
}

// The f32 path shared by the training forward and the encoding: the block's clipped scales/mins in
// f32, stored by ggml_grid_set_params, values rounded by ggml_grid_round_block (the GPTQ grid code).
void encode_block(const Grid& g, const QuantFormat& f, const float* x, const float* gam, const float* bet,
                  uint8_t* block, float* y) {
  float scale[16], min[16];
  for (int s = 0; s < g.ns; ++s) {
    const float k = float(kLwcGgmlRange);
    const Clip<float> c = clip_sub<float>(g, x + s * g.sub, k * sigm(gam[s]), bet ? k * sigm(bet[s]) : 1.0f);
    scale[s] = c.scale, min[s] = c.min;
  }
  ggml_grid_set_params(f, block, scale, min);
  ggml_grid_round_block(f, block, x, y);
}

template <class T>
void forward_generic(const Grid& g, const QuantFormat& f, const T* w, const T* gam, const T* bet, int64_t out,
                     int64_t in, T* y) {
  const int64_t nb = in / f.group_size, G = in / g.sub;
  parallel_rows(out, out * in, [&](int64_t r) {
    for (int64_t b = 0; b < nb; ++b) {
      const T* x = w + r * in + b * f.group_size;
      const int64_t c0 = r * G + b * g.ns;
      Clip<T> c[16];
      const T k = T(kLwcGgmlRange);
      for (int s = 0; s < g.ns; ++s)
        c[s] = clip_sub<T>(g, x + s * g.sub, k * sigm(gam[c0 + s]), bet ? k * sigm(bet[c0 + s]) : T(1));
      const BlockParams<T> p = block_params<T>(g, c);
      for (int64_t j = 0; j < f.group_size; ++j) {
        const int s = int(j / g.sub);
        T u;
        bool inside;
        const int l = level_of<T>(g, x[j], p.step[s], p.shift[s], u, inside);
        y[r * in + b * f.group_size + j] = p.step[s] * T(l) - p.shift[s];
      }
    }
  });
}

template <class T>
void backward_generic(const Grid& g, const QuantFormat& f, const T* w, const T* gam, const T* bet, const T* dy,
                      int64_t out, int64_t in, T* dgam, T* dbet) {
  const int64_t nb = in / f.group_size, G = in / g.sub;
  parallel_rows(out, out * in, [&](int64_t r) {
    for (int64_t b = 0; b < nb; ++b) {
      const T* x = w + r * in + b * f.group_size;
      const T* gy = dy + r * in + b * f.group_size;
      const int64_t c0 = r * G + b * g.ns;
      Clip<T> c[16];
      T sg[16], sb[16];
      const T k = T(kLwcGgmlRange);
      for (int s = 0; s < g.ns; ++s) {
        sg[s] = sigm(gam[c0 + s]), sb[s] = bet ? sigm(bet[c0 + s]) : T(1);
        c[s] = clip_sub<T>(g, x + s * g.sub, k * sg[s], bet ? k * sb[s] : T(1));
      }
      const BlockParams<T> p = block_params<T>(g, c);
      // d loss / d step_s and d loss / d shift_s (value = step * level - shift).
      T g_step[16] = {}, g_shift[16] = {};
      for (int64_t j = 0; j < f.group_size; ++j) {
        const int s = int(j / g.sub);
        T u;
        bool inside;
        const int l = level_of<T>(g, x[j], p.step[s], p.shift[s], u, inside);
        if (inside) {
          g_step[s] += gy[j] * (T(l) - u);  // value = x + step * (l - u), (l - u) held
        } else {
          g_step[s] += gy[j] * T(l);
          g_shift[s] -= gy[j];
        }
      }
      // Back to the continuous sub-block scales and mins.
      T g_scale[16] = {}, g_min[16] = {};
      if (!g.kquant()) {
        g_scale[0] = g_step[0];                             // d = f16(scale), straight through
        if (g.fam == Family::Affine32) g_min[0] = -g_shift[0];  // shift = -f16(min)
      } else {
        T gD = 0, gDmin = 0;
        for (int s = 0; s < g.ns; ++s) {
          if (p.D != 0) {  // step = d sc, sc = scale / d + r (r held) unless clamped
            if (!p.sc_clamped[s]) g_scale[s] += g_step[s];
            gD += g_step[s] * (p.sc_clamped[s] ? T(p.sc[s]) : p.r_sc[s]);
          }
          if (g.fam == Family::AffineK && p.Dmin != 0) {
            if (!p.m_clamped[s]) g_min[s] += g_shift[s];
            gDmin += g_shift[s] * (p.m_clamped[s] ? T(p.m[s]) : p.r_m[s]);
          }
        }
        // d = f16(scale_t / sc_hi) (signed: / sc_lo), straight through the f16 rounding.
        if (p.D != 0 && p.tD >= 0) g_scale[p.tD] += gD / T(g.fam == Family::AffineK ? g.sc_hi : g.sc_lo);
        if (p.Dmin != 0 && p.tDmin >= 0) g_min[p.tDmin] += gDmin / T(g.sc_hi);
      }
      for (int s = 0; s < g.ns; ++s) {
        dgam[c0 + s] = g_scale[s] * c[s].ds_dg * k * sg[s] * (1 - sg[s]);
        if (dbet) dbet[c0 + s] = (g_scale[s] * c[s].ds_db + g_min[s] * c[s].dm_db) * k * sb[s] * (1 - sb[s]);
      }
    }
  });
}

}  // namespace

bool lwc_is_ggml(const QuantFormat& f) {
  Grid g{};
  return grid_of(f, g);
}

const char* lwc_ggml_names() { return "q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k"; }

int lwc_ggml_sub_block(const QuantFormat& f) { return grid(f).sub; }

bool lwc_ggml_has_beta(const QuantFormat& f) { return grid(f).affine(); }

void lwc_ggml_forward_into(const Tensor& w, const Tensor& gamma, const Tensor& beta, const QuantFormat& f, Tensor& y) {
  const Grid g = grid(f);
  check_shapes(g, f, w, gamma, beta);
  LB_CHECK(w.device() == Device::CPU, "lwc [", f.name, "]: the ggml block grids train on the CPU, got ", w.describe());
  const int64_t out = w.size(0), in = w.size(1);
  if (w.dtype() == DType::F32) {  // the encoding's own code path: what the file will hold, bit for bit
    const float* pw = w.data<float>();
    const float* pg = gamma.data<float>();
    const float* pb = beta.defined() ? beta.data<float>() : nullptr;
    float* py = y.data<float>();
    const int64_t nb = in / f.group_size, G = in / g.sub;
    parallel_rows(out, out * in, [&](int64_t r) {
      std::vector<uint8_t> block(size_t(f.block_bytes));
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t c0 = r * G + b * g.ns;
        encode_block(g, f, pw + r * in + b * f.group_size, pg + c0, pb ? pb + c0 : nullptr, block.data(),
                     py + r * in + b * f.group_size);
      }
    });
    return;
  }
  LB_CHECK(w.dtype() == DType::F64, "lwc [", f.name, "]: CPU body supports f32 and f64, got ", dtype_name(w.dtype()));
  forward_generic<double>(g, f, w.data<double>(), gamma.data<double>(), beta.defined() ? beta.data<double>() : nullptr,
                          out, in, y.data<double>());
}

void lwc_ggml_backward_into(const Tensor& w, const Tensor& gamma, const Tensor& beta, const Tensor& dy,
                            const QuantFormat& f, Tensor& dgamma, Tensor& dbeta) {
  const Grid g = grid(f);
  check_shapes(g, f, w, gamma, beta);
  LB_CHECK(w.device() == Device::CPU, "lwc [", f.name, "]: the ggml block grids train on the CPU, got ", w.describe());
  const int64_t out = w.size(0), in = w.size(1);
  auto run = [&](auto t) {
    using T = decltype(t);
    backward_generic<T>(g, f, w.data<T>(), gamma.data<T>(), beta.defined() ? beta.data<T>() : nullptr, dy.data<T>(),
                        out, in, dgamma.data<T>(), dbeta.defined() ? dbeta.data<T>() : nullptr);
  };
  if (w.dtype() == DType::F32) run(float{});
  else if (w.dtype() == DType::F64) run(double{});
  else throw_error("lwc [", f.name, "]: CPU body supports f32 and f64, got ", dtype_name(w.dtype()));
}

void lwc_ggml_init_from_rtn(const Tensor& w_in, const QuantFormat& f, Tensor& gamma, Tensor& beta) {
  const Grid g = grid(f);
  const Tensor w = w_in.to(Device::CPU).to(DType::F32).contiguous();
  LB_CHECK(w.dim() == 2 && w.numel() > 0 && w.size(1) % f.group_size == 0, "lwc [", f.name,
           "]: weight must be a non-empty [out, in] of whole blocks, got ", w.describe());
  const int64_t out = w.size(0), in = w.size(1), nb = in / f.group_size, G = in / g.sub;
  Tensor gm = Tensor::empty({out, G}, DType::F64), bt = Tensor::empty({out, G}, DType::F64);
  double* pg = gm.data<double>();
  double* pb = bt.data<double>();
  const float* pw = w.data<float>();
  const double kLo = 0.01, kHi = 0.995;  // logits -4.6 .. 5.3 (factors 0.015 .. 1.49)
  auto logit = [&](double sg) {
    if (!(sg == sg)) sg = kHi;
    sg = std::clamp(sg, kLo, kHi);
    return std::log(sg / (1 - sg));
  };
  parallel_rows(out, out * in, [&](int64_t r) {
    std::vector<uint8_t> block(size_t(f.block_bytes));
    for (int64_t b = 0; b < nb; ++b) {
      const float* x = pw + r * in + b * f.group_size;
      f.quantize_row(x, f.group_size, block.data());  // the reference quantizer (lowbit's RTN)
      for (int s = 0; s < g.ns; ++s) {
        const float* xs = x + s * g.sub;
        double mx = xs[0], mn = xs[0], ext = xs[0];
        for (int i = 1; i < g.sub; ++i) {
          mx = std::max(mx, double(xs[i])), mn = std::min(mn, double(xs[i]));
          if (std::fabs(xs[i]) > std::fabs(ext)) ext = xs[i];
        }
        const GgmlSubParams p = ggml_grid_sub_params(f, block.data(), g.kquant() ? s : 0);
        double sg = 1, sb = 1;
        switch (g.fam) {
          case Family::Signed32: case Family::SignedK:
            if (ext != 0) sg = double(p.step) / (ext / -g.off);
            break;
          case Family::Abs32:
            if (ext != 0) sg = double(p.step) * 127 / std::fabs(ext);
            break;
          case Family::Affine32: {  // hi' = m + d qmax, lo' = m around the midpoint
            const double mid = (mx + mn) / 2, m = -double(p.shift);
            if (mx > mid) sg = (m + double(p.step) * g.qmax - mid) / (mx - mid), sb = (m - mid) / (mn - mid);
            break;
          }
          case Family::AffineK: {  // hi' = step qmax - shift, lo' = -shift
            const double hi = std::max(mx, 0.0), lo = std::min(mn, 0.0);
            if (hi > 0) sg = (double(p.step) * g.qmax - double(p.shift)) / hi;
            if (lo < 0) sb = -double(p.shift) / lo;
            break;
          }
        }
        pg[r * G + b * g.ns + s] = logit(sg / kLwcGgmlRange);
        pb[r * G + b * g.ns + s] = logit(sb / kLwcGgmlRange);
      }
    }
  });
  gamma = gm.to(gamma.defined() ? gamma.dtype() : DType::F32);
  beta = g.affine() ? bt.to(gamma.dtype()) : Tensor();
}

QuantizedTensor lwc_encode_ggml(const Tensor& w_in, const Tensor& gamma_in, const Tensor& beta_in, const QuantFormat& f) {
  const Grid g = grid(f);
  const Tensor w = w_in.to(Device::CPU).to(DType::F32).contiguous();
  const Tensor gamma = gamma_in.to(Device::CPU).to(DType::F32).contiguous();
  const Tensor beta = beta_in.defined() ? beta_in.to(Device::CPU).to(DType::F32).contiguous() : Tensor();
  LB_CHECK(w.dim() == 2 && w.numel() > 0, "lwc [", f.name, "]: weight must be a non-empty [out, in], got ", w.describe());
  check_shapes(g, f, w, gamma, beta);
  const int64_t out = w.size(0), in = w.size(1), nb = in / f.group_size, G = in / g.sub;
  const int64_t row_bytes = nb * f.block_bytes;
  Tensor blocks = Tensor::empty({out, row_bytes}, DType::U8);
  uint8_t* pbk = blocks.data<uint8_t>();
  const float* pw = w.data<float>();
  const float* pg = gamma.data<float>();
  const float* pb = beta.defined() ? beta.data<float>() : nullptr;
  parallel_rows(out, out * in, [&](int64_t r) {
    float y[256];
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t c0 = r * G + b * g.ns;
      encode_block(g, f, pw + r * in + b * f.group_size, pg + c0, pb ? pb + c0 : nullptr,
                   pbk + r * row_bytes + b * f.block_bytes, y);
    }
  });
  return make_ggml_quantized_tensor(f, out, in, blocks, "lwc encoding");
}

}  // namespace lowbit
