// WKVQuant's two-dimensional KV quantizer and past-only attention (ops/wkv_quant.h).
#include "lowbit/ops/wkv_quant.h"

#include <algorithm>
#include <cmath>

#include "lowbit/core/error.h"
#include "lowbit/core/threads.h"
#include "lowbit/ops/kv_quant.h"

namespace lowbit::ops {

namespace {
void check_f32_cpu(const char* op, const Tensor& t, const char* name) {
  if (t.dtype() != DType::F32 || t.device() != Device::CPU || !t.is_contiguous())
    throw_error(op, ": ", name, " must be contiguous f32 on the CPU, got ", t.describe());
}
}  // namespace

void wkv_fake_quant(const Tensor& x, const Tensor& shift, const Tensor& scale, int bits, int64_t group, Tensor& y) {
  const char* op = "wkv_fake_quant";
  if (x.dim() != 2) throw_error(op, ": x must be [tokens, channels], got ", x.describe());
  check_f32_cpu(op, x, "x");
  const int64_t M = x.size(0), C = x.size(1);
  if (shift.defined() != scale.defined()) throw_error(op, ": give both shift and scale, or neither");
  const bool smooth = shift.defined();
  if (smooth) {
    check_f32_cpu(op, shift, "shift");
    check_f32_cpu(op, scale, "scale");
    if (shift.shape() != Shape{C} || scale.shape() != Shape{C})
      throw_error(op, ": shift ", shift.describe(), " / scale ", scale.describe(), " must be [", C, "]");
    const float* s = scale.data<float>();
    for (int64_t c = 0; c < C; ++c)
      if (!(s[c] > 0) || !std::isfinite(s[c])) throw_error(op, ": scale of channel ", c, " is ", s[c], " (must be > 0, finite)");
  }
  if (!y.defined() || y.shape() != x.shape()) y = Tensor::empty(x.shape());
  check_f32_cpu(op, y, "y");
  if (M == 0) return;
  Tensor z = smooth ? Tensor::empty({M, C}) : x;
  if (smooth) {
    const float *xp = x.data<float>(), *d = shift.data<float>(), *s = scale.data<float>();
    float* zp = z.data<float>();
    for (int64_t i = 0; i < M; ++i)
      for (int64_t c = 0; c < C; ++c) zp[i * C + c] = (xp[i * C + c] - d[c]) / s[c];
  }
  kivi_fake_quant(z, bits, group, false, y);  // checks bits and group
  if (smooth) {
    const float *d = shift.data<float>(), *s = scale.data<float>();
    float* yp = y.data<float>();
    for (int64_t i = 0; i < M; ++i)
      for (int64_t c = 0; c < C; ++c) yp[i * C + c] = yp[i * C + c] * s[c] + d[c];
  }
}

void past_quant_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& kq, const Tensor& vq,
                                  const std::vector<int64_t>& quantized, double scale, Tensor& out) {
  const char* op = "past_quant_attention_forward";
  if (q.dim() != 3 || k.dim() != 3 || v.shape() != k.shape())
    throw_error(op, ": q [T, H, hd], k / v [S, KVH, hd] expected, got ", q.describe(), ", ", k.describe(), ", ", v.describe());
  const int64_t T = q.size(0), H = q.size(1), hd = q.size(2), S = k.size(0), KVH = k.size(1);
  if (k.size(2) != hd || KVH < 1 || H % KVH != 0 || T > S)
    throw_error(op, ": shapes do not fit: q ", q.describe(), ", k ", k.describe());
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&q, "q"}, {&k, "k"}, {&v, "v"}}) check_f32_cpu(op, *t, name);
  const int64_t Lq = kq.defined() ? kq.size(0) : 0;
  if (Lq > 0) {
    check_f32_cpu(op, kq, "kq");
    check_f32_cpu(op, vq, "vq");
    if (kq.dim() != 3 || kq.size(1) != KVH || kq.size(2) != hd || vq.shape() != kq.shape())
      throw_error(op, ": kq / vq must be [Lq, ", KVH, ", ", hd, "], got ", kq.describe(), ", ", vq.describe());
  }
  if (int64_t(quantized.size()) != T) throw_error(op, ": ", quantized.size(), " quantized counts for ", T, " queries");
  for (int64_t i = 0; i < T; ++i)
    if (quantized[size_t(i)] < 0 || quantized[size_t(i)] > std::min(Lq, S - T + i + 1))
      throw_error(op, ": query ", i, " reads ", quantized[size_t(i)], " quantized tokens (at most ", std::min(Lq, S - T + i + 1), ")");
  if (!out.defined() || out.shape() != q.shape()) out = Tensor::empty(q.shape());
  check_f32_cpu(op, out, "out");
  const float *Q = q.data<float>(), *K = k.data<float>(), *V = v.data<float>();
  const float *KQ = Lq ? kq.data<float>() : nullptr, *VQ = Lq ? vq.data<float>() : nullptr;
  float* O = out.data<float>();
  const int64_t rep = H / KVH, row = KVH * hd;
  const float sc = float(scale);
  parallel_for(T * H, 8, [&](int64_t b, int64_t e) {
    std::vector<float> p(static_cast<size_t>(S));
    std::vector<double> acc(static_cast<size_t>(hd));
    for (int64_t w = b; w < e; ++w) {
      const int64_t i = w / H, h = w % H, g = h / rep, pos = S - T + i, L = quantized[size_t(i)];
      const float* qi = Q + (i * H + h) * hd;
      float mx = -INFINITY;
      for (int64_t j = 0; j <= pos; ++j) {
        const float* kj = (j < L ? KQ : K) + j * row + g * hd;
        float d = 0;
        for (int64_t c = 0; c < hd; ++c) d += qi[c] * kj[c];
        p[size_t(j)] = d * sc;
        mx = std::max(mx, p[size_t(j)]);
      }
      double sum = 0;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t j = 0; j <= pos; ++j) {
        const float pj = std::exp(p[size_t(j)] - mx);
        sum += pj;
        const float* vj = (j < L ? VQ : V) + j * row + g * hd;
        for (int64_t c = 0; c < hd; ++c) acc[size_t(c)] += double(pj) * vj[c];
      }
      float* oi = O + (i * H + h) * hd;
      for (int64_t c = 0; c < hd; ++c) oi[c] = float(acc[size_t(c)] / sum);
    }
  });
}

}  // namespace lowbit::ops
