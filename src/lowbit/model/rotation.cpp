#include "lowbit/model/rotation.h"

#include <cmath>
#include <vector>

#include "lowbit/autograd/bitlinear.h"
#include "lowbit/autograd/functions.h"
#include "lowbit/ops/fp_act_quant.h"
#include "lowbit/ops/ops.h"

namespace lowbit {

Tensor HadamardRotation::apply(const Tensor& x, bool transpose) const {
  if (!defined()) throw_error("hadamard rotation: not set");
  if (x.size(-1) != size()) throw_error("hadamard rotation of ", size(), " channels applied to ", x.describe());
  const Tensor xc = x.contiguous();
  const DType dt = xc.dtype();
  Tensor y = Tensor::empty(xc.shape(), dt, xc.device());
  const Device dev = xc.device();
  ops::hadamard_transform(xc, signs.to(dt).to(dev), small.defined() ? small.to(dt).to(dev) : Tensor(), transpose, y);
  return y;
}

Tensor HadamardRotation::matrix() const {
  const int64_t n = size();
  Tensor eye = Tensor::zeros({n, n}, DType::F64);
  for (int64_t i = 0; i < n; ++i) eye.data<double>()[i * n + i] = 1.0;
  return apply(eye);  // row i = e_i R
}

HadamardRotation random_hadamard(int64_t n, uint64_t seed) {
  if (n < 1) throw_error("hadamard rotation: ", n, " channels");
  int64_t p = 1;
  while (n % (2 * p) == 0) p *= 2;
  const int64_t m = n / p;
  HadamardRotation r;
  Tensor g = Tensor::randn({n}, seed * 2 + 1, 1.0, DType::F64);
  r.signs = Tensor::empty({n});
  for (int64_t i = 0; i < n; ++i) r.signs.data<float>()[i] = g.data<double>()[i] < 0 ? -1.0f : 1.0f;
  if (m > 1) {  // Gram-Schmidt (twice, for f64-exact orthogonality) on the rows of a Gaussian matrix
    Tensor a = Tensor::randn({m, m}, seed * 2 + 2, 1.0, DType::F64);
    double* A = a.data<double>();
    for (int64_t i = 0; i < m; ++i) {
      for (int pass = 0; pass < 2; ++pass)
        for (int64_t j = 0; j < i; ++j) {
          double d = 0;
          for (int64_t k = 0; k < m; ++k) d += A[i * m + k] * A[j * m + k];
          for (int64_t k = 0; k < m; ++k) A[i * m + k] -= d * A[j * m + k];
        }
      double nn = 0;
      for (int64_t k = 0; k < m; ++k) nn += A[i * m + k] * A[i * m + k];
      nn = std::sqrt(nn);
      for (int64_t k = 0; k < m; ++k) A[i * m + k] /= nn;
    }
    r.small = a.to(DType::F32);
  }
  return r;
}

ActQuantSpec parse_act_quant(const std::string& name, const std::string& what) {
  ActQuantSpec a;
  if (name == "none") return a;
  if (name == "int8" || name == "int4" || name == "int8-asym" || name == "int4-asym") {
    a.bits = name[3] == '8' ? 8 : 4;
    a.asymmetric = name.size() > 4;
    return a;
  }
  if (name == "int4-absmean") {
    a.bits = 4;
    a.absmean = true;
    return a;
  }
  if (name == "fp8" || name == "fp4-mx" || name == "fp4-nv") {
    a.bits = name == "fp8" ? 8 : 4;
    a.fp = name == "fp8" ? ActFloat::Fp8E4M3 : name == "fp4-mx" ? ActFloat::Fp4Mx : ActFloat::Fp4Nv;
    return a;
  }
  throw_error(what, ": '", name, "' is not an activation format (expected none, int8, int4, int8-asym, int4-asym, "
              "int4-absmean, fp8, fp4-mx or fp4-nv)");
}

std::string act_quant_name(const ActQuantSpec& a) {
  if (!a.enabled()) return "none";
  switch (a.fp) {
    case ActFloat::Fp8E4M3: return "fp8";
    case ActFloat::Fp4Mx: return "fp4-mx";
    case ActFloat::Fp4Nv: return "fp4-nv";
    case ActFloat::None: break;
  }
  if (a.absmean) return "int" + std::to_string(a.bits) + "-absmean";
  return "int" + std::to_string(a.bits) + (a.asymmetric ? "-asym" : "");
}

Var act_fake_quant(const Var& x, const ActQuantSpec& a) {
  if (!a.enabled()) return x;
  if (a.absmean) {
    if (a.bits != 4 || a.asymmetric || a.fp != ActFloat::None || a.clip != 1.0 || !a.clips.empty())
      throw_error("act int4-absmean: 4-bit symmetric integer with clip 1 only (got ", a.bits, " bits",
                  a.asymmetric ? ", asymmetric" : "", a.fp != ActFloat::None ? ", a float format" : "", ", clip ",
                  a.clip, a.clips.empty() ? "" : ", searched clips", ")");
    return int4_absmean_fake_quant(x);
  }
  if (a.fp == ActFloat::None) return fake_quant(x, a.bits, a.asymmetric, a.clip, x.value().size(-1), false);
  const Tensor xv = x.value().contiguous();
  Tensor y = Tensor::empty(xv.shape(), xv.dtype(), xv.device());
  ops::fp_fake_quant(xv, ops::FpActFormat(int(a.fp)), a.clip, y);
  if (!x.requires_grad()) return Var(y, false);
  // Straight through: x + (y - x) carries y forward (to rounding) and dx = dy.
  Tensor d = Tensor::empty(xv.shape(), xv.dtype(), xv.device());
  ops::sub(y, xv, d);
  return add(x, Var(d, false));
}

int parse_kv_quant_bits(const std::string& name, const std::string& what) {
  if (name == "none") return 0;
  if (name == "int4") return 4;
  if (name == "int2") return 2;
  if (name == "cq1") return 1;
  if (name == "cq2") return 2;
  if (name == "wkv4") return 4;
  if (name == "wkv2") return 2;
  throw_error(what, ": '", name, "' is not a KV-cache quantization (expected none, int4, int2, cq1, cq2, wkv4 or wkv2)");
}

bool kv_quant_wkv(const std::string& name) { return name == "wkv4" || name == "wkv2"; }

int kv_quant_channels(const std::string& name) {
  if (name == "cq1") return 8;
  if (name == "cq2") return 4;
  return 0;
}

std::string kv_quant_name(const KVQuantSpec& kv) {
  if (!kv.enabled()) return "none";
  if (kv.wkv) return "wkv" + std::to_string(kv.bits);
  if (!kv.coupled()) return "int" + std::to_string(kv.bits);
  if ((kv.bits == 1 && kv.cq_channels == 8) || (kv.bits == 2 && kv.cq_channels == 4)) return "cq" + std::to_string(kv.bits);
  return "cq" + std::to_string(kv.bits) + "c" + std::to_string(kv.cq_channels);
}

int parse_kv_token_bits(const std::string& name, const std::string& what) {
  if (name == "none") return 0;
  if (name == "int8") return 8;
  if (name == "int4") return 4;
  if (name == "int2") return 2;
  throw_error(what, ": '", name, "' is not a per-token KV quantization (expected none, int8, int4 or int2)");
}

void validate_rotation(const HadamardRotation& r, int64_t n, const std::string& source, const std::string& name) {
  if (!r.defined()) throw_error(source, ": the ", name, " rotation is missing");
  if (r.signs.dim() != 1 || r.size() != n || r.signs.dtype() != DType::F32)
    throw_error(source, ": ", name, " rotation signs are ", r.signs.describe(), ", expected f32 [", n, "]");
  const Tensor sc = r.signs.contiguous();
  for (int64_t i = 0; i < n; ++i) {
    const float s = sc.data<float>()[i];
    if (s != 1.0f && s != -1.0f) throw_error(source, ": ", name, " rotation sign ", i, " is ", s, ", not +-1");
  }
  int64_t p = 1;
  while (n % (2 * p) == 0) p *= 2;
  const int64_t m = n / p;
  if (m == 1 ? r.small.defined() : !(r.small.defined() && r.small.dtype() == DType::F32 && r.small.shape() == Shape{m, m}))
    throw_error(source, ": ", name, " rotation matrix is ", r.small.defined() ? r.small.describe() : "missing",
                ", expected f32 [", m, ", ", m, "]", m == 1 ? " (none)" : "");
  if (m > 1) {  // orthogonal to f32 rounding (a corrupt matrix would change the model's function)
    const Tensor sm = r.small.contiguous();
    const float* S = sm.data<float>();
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < m; ++j) {
        double d = 0;
        for (int64_t k = 0; k < m; ++k) d += double(S[i * m + k]) * double(S[j * m + k]);
        if (!(std::fabs(d - (i == j ? 1.0 : 0.0)) < 1e-4))
          throw_error(source, ": ", name, " rotation matrix is not orthogonal (row ", i, " . row ", j, " = ", d, ")");
      }
  }
}

void validate_transforms(const LlamaConfig& c, const ModelTransforms& t, const std::string& source) {
  if (t.kv_token_bits != 0 && t.kv_token_bits != 2 && t.kv_token_bits != 4 && t.kv_token_bits != 8)
    throw_error(source, ": per-token KV bits ", t.kv_token_bits, " (expected 2, 4 or 8)");
  if (t.kv_token_bits > 0 && t.kv.enabled())
    throw_error(source, ": per-token (LLM-QAT) and KIVI KV quantization together; give one of them");
  if (!t.rotation.empty() && t.rotation != "hadamard" && t.rotation != "h-bitlinear")
    throw_error(source, ": rotation '", t.rotation, "' is unknown (expected hadamard or h-bitlinear)");
  const bool hbit = t.rotation == "h-bitlinear";
  auto check_rot = [&](const HadamardRotation& r, int64_t n, const char* name) {
    if (t.rotation.empty() || (hbit && std::string(name) == "head") || (!hbit && std::string(name) == "o_in")) {
      if (r.defined())
        throw_error(source, ": ", name, " rotation given for a model ",
                    t.rotation.empty() ? "that is not rotated" : ("with rotation " + t.rotation + ", which has none"));
      return;
    }
    validate_rotation(r, n, source, name);
  };
  check_rot(t.ffn, c.hidden_dim, "ffn");
  check_rot(t.head, c.resolved_head_dim(), "head");
  check_rot(t.o_in, int64_t(c.n_heads) * c.resolved_head_dim(), "o_in");
  if (t.act.enabled() && t.act.bits != 4 && t.act.bits != 8)
    throw_error(source, ": activation bits ", t.act.bits, " (expected 4 or 8)");
  if (!(t.act.clip > 0 && t.act.clip <= 1)) throw_error(source, ": activation clip ratio ", t.act.clip, " is not in (0, 1]");
  if (t.act.absmean && (t.act.clip != 1.0 || !t.act.clips.empty()))
    throw_error(source, ": activations int4-absmean take no clip ratio (their range is sqrt(7) mean|x| per token)");
  if (!t.act.clips.empty()) {
    if (t.act.clips.size() != size_t(c.n_layers) * kActPoints)
      throw_error(source, ": ", t.act.clips.size(), " searched activation clip ratios for ", c.n_layers, " layers (expected ",
                  size_t(c.n_layers) * kActPoints, ": ", int(kActPoints), " per layer)");
    for (size_t i = 0; i < t.act.clips.size(); ++i)
      if (!(t.act.clips[i] > 0 && t.act.clips[i] <= 1))
        throw_error(source, ": searched activation clip ratio ", t.act.clips[i], " (layer ", i / kActPoints, ", point ",
                    i % kActPoints, ") is not in (0, 1]");
  }
  if (t.kv.enabled() && !t.kv.coupled() && t.kv.bits != 2 && t.kv.bits != 4)
    throw_error(source, ": KV-cache bits ", t.kv.bits, " (expected 2 or 4)");
  if (t.kv.wkv && t.kv.cq_channels > 0) throw_error(source, ": WKVQuant and coupled KV quantization together");
  if (t.kv.smoothed()) {  // WKVQuant: the smoothing's shape follows from the config
    const Shape want{c.n_layers, 2, int64_t(c.n_kv_heads) * c.resolved_head_dim()};
    for (const auto& [name, p] : {std::pair<const char*, const Tensor*>{"shift", &t.kv.wkv_shift}, {"scale", &t.kv.wkv_scale}}) {
      if (!p->defined())
        throw_error(source, ": the WKVQuant smoothing ", name, " is missing (", kv_quant_name(t.kv),
                    " smoothing is calibrated by `lowbit quantize --kv-quant ", kv_quant_name(t.kv),
                    " --calib ...` or at load with --kv-calib)");
      if (p->dtype() != DType::F32 || p->shape() != want || p->device() != Device::CPU)
        throw_error(source, ": the WKVQuant smoothing ", name, " is ", p->describe(), ", expected f32 ", shape_str(want),
                    " (layers, keys/values, channels)");
      const Tensor pc = p->contiguous();
      const float* v = pc.data<float>();
      for (int64_t i = 0; i < pc.numel(); ++i)
        if (!std::isfinite(v[i]) || (std::string(name) == "scale" && !(v[i] > 0)))
          throw_error(source, ": the WKVQuant smoothing ", name, " holds ", v[i], " at ", i,
                      std::string(name) == "scale" ? " (must be finite and > 0)" : " (must be finite)");
    }
  } else if (t.kv.wkv_shift.defined() || t.kv.wkv_scale.defined()) {
    throw_error(source, ": WKVQuant smoothing given for KV quantization ", kv_quant_name(t.kv));
  }
  if (t.kv.coupled()) {  // CQ: the codebooks' shape follows from the config and the spec
    const int64_t C = int64_t(c.n_kv_heads) * c.resolved_head_dim(), ch = t.kv.cq_channels;
    if (ch < 1 || t.kv.bits < 1 || t.kv.bits * ch > 8)
      throw_error(source, ": coupled KV quantization of ", t.kv.bits, " bits per channel in groups of ", ch,
                  " channels (expected 1 to 8 bits a group code)");
    if (c.resolved_head_dim() % ch != 0)
      throw_error(source, ": coupled KV quantization groups of ", ch, " channels do not divide head_dim ",
                  c.resolved_head_dim());
    const Shape want{c.n_layers, C / ch, t.kv.cq_centroids(), ch};
    for (const auto& [name, cb] : {std::pair<const char*, const Tensor*>{"keys", &t.kv.cq_keys}, {"values", &t.kv.cq_values}}) {
      if (!cb->defined())
        throw_error(source, ": the coupled KV quantization's ", name, " codebook is missing (", kv_quant_name(t.kv),
                    " codebooks are learned by `lowbit quantize --kv-quant ", kv_quant_name(t.kv), " --calib ...`)");
      if (cb->dtype() != DType::F32 || cb->shape() != want || cb->device() != Device::CPU)
        throw_error(source, ": the coupled KV quantization's ", name, " codebook is ", cb->describe(), ", expected f32 ",
                    shape_str(want), " (layers, groups, centroids, channels)");
      const Tensor cc = cb->contiguous();
      const float* p = cc.data<float>();
      for (int64_t i = 0; i < cc.numel(); ++i)
        if (!std::isfinite(p[i]))
          throw_error(source, ": the coupled KV quantization's ", name, " codebook holds a non-finite value at ", i);
    }
  } else if (t.kv.cq_keys.defined() || t.kv.cq_values.defined()) {
    throw_error(source, ": coupled KV quantization codebooks given for KV quantization ", kv_quant_name(t.kv));
  }
  if (t.kv.group < 1 || t.kv.group > 4096) throw_error(source, ": KV-cache group ", t.kv.group, " is not in [1, 4096]");
  if (t.kv.window < 0 || t.kv.window > (int64_t(1) << 30))
    throw_error(source, ": KV-cache window ", t.kv.window, " is not in [0, 2^30]");
}

namespace {
// Rows of w [.., n] times R (x -> x R).
Tensor right(const Tensor& w, const HadamardRotation& r) { return r.apply(w); }
// R^T w for w [n, k]: (w^T R)^T.
Tensor left_t(const Tensor& w, const HadamardRotation& r) { return r.apply(w.transpose(0, 1)).transpose(0, 1).contiguous(); }
// Columns scaled: w[:, j] * g[j].
Tensor fold(const Tensor& w, const Tensor& g) {
  Tensor out = w.contiguous().clone();
  const int64_t rows = out.size(0), n = out.size(1);
  double* p = out.data<double>();
  const double* gp = g.data<double>();
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < n; ++j) p[i * n + j] *= gp[j];
  return out;
}
}  // namespace

ModelTransforms rotate_weights(LlamaConfig& c, LlamaWeights& w, uint64_t seed) {
  validate_weights(c, w, "rotate");
  const DType dt = w.final_norm.dtype();
  if (w.final_norm.device() != Device::CPU) throw_error("rotate: the weights must be on the CPU");
  const int64_t D = c.dim, hd = c.resolved_head_dim();
  ModelTransforms t;
  t.rotation = "hadamard";
  t.rotation_seed = seed;
  const HadamardRotation R = random_hadamard(D, seed);
  t.ffn = random_hadamard(c.hidden_dim, seed + 1);
  t.head = random_hadamard(hd, seed + 2);
  auto f64 = [](const Tensor& x) { return x.contiguous().to(DType::F64); };
  auto back = [dt](const Tensor& x) { return x.contiguous().to(dt); };
  auto ones = [dt](const Tensor& g) { return Tensor::full(g.shape(), 1.0, dt); };
  // Per head: x [rows, heads * hd] -> each head's hd channels times R_h.
  auto per_head = [&](const Tensor& x) {
    const Shape s = x.shape();
    return t.head.apply(x.contiguous().view({-1, hd})).view(s);
  };
  if (c.tied_embeddings) {
    w.output = w.tok_embeddings.clone();
    c.tied_embeddings = false;
  }
  w.tok_embeddings = back(right(f64(w.tok_embeddings), R));
  w.output = back(right(fold(f64(w.output), f64(w.final_norm)), R));
  w.final_norm = ones(w.final_norm);
  for (auto& l : w.layers) {
    const Tensor g1 = f64(l.attn_norm), g2 = f64(l.ffn_norm);
    l.wq = back(right(fold(f64(l.wq), g1), R));
    l.wk = back(right(fold(f64(l.wk), g1), R));
    // v' = v R_h per head: W_v' = R_h^T W_v per head block of rows, i.e. per_head on W_v^T.
    l.wv = back(per_head(right(fold(f64(l.wv), g1), R).transpose(0, 1).contiguous()).transpose(0, 1));
    if (l.bv.defined()) l.bv = back(per_head(f64(l.bv).view({1, -1})).view({-1}));
    l.attn_norm = ones(l.attn_norm);
    l.wo = back(left_t(per_head(f64(l.wo)), R));  // input: per-head R_h; output: R^T
    l.w_gate = back(right(fold(f64(l.w_gate), g2), R));
    l.w_up = back(right(fold(f64(l.w_up), g2), R));
    l.ffn_norm = ones(l.ffn_norm);
    l.w_down = back(left_t(right(f64(l.w_down), t.ffn), R));  // input: R_F (online on the activations); output: R^T
  }
  return t;
}

}  // namespace lowbit
