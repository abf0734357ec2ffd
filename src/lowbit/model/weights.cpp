#include "lowbit/model/weights.h"

#include <cmath>
#include <cstring>

#include "lowbit/core/threads.h"

namespace lowbit {

template <class W, class T>
static void visit(W& w, const std::function<void(const std::string&, T&)>& f) {
  f("model.embed_tokens.weight", w.tok_embeddings);
  for (size_t i = 0; i < w.layers.size(); ++i) {
    auto& l = w.layers[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    auto opt = [&](const std::string& n, T& t) {
      if (t.defined()) f(p + n, t);
    };
    f(p + "input_layernorm.weight", l.attn_norm);
    f(p + "self_attn.q_proj.weight", l.wq);
    f(p + "self_attn.k_proj.weight", l.wk);
    f(p + "self_attn.v_proj.weight", l.wv);
    f(p + "self_attn.o_proj.weight", l.wo);
    opt("self_attn.q_proj.bias", l.bq);
    opt("self_attn.k_proj.bias", l.bk);
    opt("self_attn.v_proj.bias", l.bv);
    opt("self_attn.q_norm.weight", l.q_norm);
    opt("self_attn.k_norm.weight", l.k_norm);
    f(p + "post_attention_layernorm.weight", l.ffn_norm);
    f(p + "mlp.gate_proj.weight", l.w_gate);
    f(p + "mlp.down_proj.weight", l.w_down);
    f(p + "mlp.up_proj.weight", l.w_up);
  }
  f("model.norm.weight", w.final_norm);
  if (w.output.defined()) f("lm_head.weight", w.output);
}

void for_each_weight(LlamaWeights& w, const std::function<void(const std::string&, Tensor&)>& f) { visit(w, f); }
void for_each_weight(const LlamaWeights& w, const std::function<void(const std::string&, const Tensor&)>& f) {
  visit(w, f);
}

static void expect(const std::string& source, const std::string& name, const Tensor& t, const Shape& shape,
                   DType dtype, bool values) {
  if (!t.defined()) throw_error(source, ": missing tensor '", name, "'");
  if (t.shape() != shape)
    throw_error(source, ": tensor '", name, "' has shape ", shape_str(t.shape()), ", expected ", shape_str(shape));
  if (t.dtype() != dtype)
    throw_error(source, ": tensor '", name, "' is ", dtype_name(t.dtype()), ", expected ", dtype_name(dtype), " like the embeddings");
  if (!values) return;
  Tensor c = t.to(Device::CPU).to(DType::F32).contiguous();
  const float* p = c.data<float>();
  const int64_t n = c.numel();
  // A branch-free scan over the exponent bits (vectorises; loading a model reads every weight).
  const double bad = parallel_sum(n, 1 << 16, [&](int64_t lo, int64_t hi) {
    uint32_t any = 0;
    for (int64_t i = lo; i < hi; ++i) {
      uint32_t u;
      std::memcpy(&u, p + i, 4);
      any |= uint32_t((u & 0x7f800000u) == 0x7f800000u);
    }
    return double(any);
  });
  if (bad > 0)
    for (int64_t i = 0; i < n; ++i)
      if (!std::isfinite(p[i]))
        throw_error(source, ": tensor '", name, "' has a non-finite value (", p[i], ") at index ", i);
}

void validate_weights(const LlamaConfig& c, const LlamaWeights& w, const std::string& source, bool values) {
  const int64_t D = c.dim, F = c.hidden_dim, V = c.vocab_size, h = c.resolved_head_dim();
  const int64_t Q = int64_t(c.n_heads) * h, KV = int64_t(c.n_kv_heads) * h;
  if (w.tok_embeddings.defined() && w.tok_embeddings.dtype() != DType::F32 && w.tok_embeddings.dtype() != DType::F64)
    throw_error(source, ": weights are ", dtype_name(w.tok_embeddings.dtype()), "; the model computes in f32 (f64 for tests)");
  const DType dt = w.tok_embeddings.defined() ? w.tok_embeddings.dtype() : DType::F32;
  expect(source, "model.embed_tokens.weight", w.tok_embeddings, {V, D}, dt, values);
  expect(source, "model.norm.weight", w.final_norm, {D}, dt, values);
  if (!c.tied_embeddings) expect(source, "lm_head.weight", w.output, {V, D}, dt, values);
  if (int(w.layers.size()) != c.n_layers)
    throw_error(source, ": ", w.layers.size(), " layers of weights, config says ", c.n_layers);
  for (int i = 0; i < c.n_layers; ++i) {
    const auto& l = w.layers[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    expect(source, p + "input_layernorm.weight", l.attn_norm, {D}, dt, values);
    expect(source, p + "self_attn.q_proj.weight", l.wq, {Q, D}, dt, values);
    expect(source, p + "self_attn.k_proj.weight", l.wk, {KV, D}, dt, values);
    expect(source, p + "self_attn.v_proj.weight", l.wv, {KV, D}, dt, values);
    expect(source, p + "self_attn.o_proj.weight", l.wo, {D, Q}, dt, values);
    if (c.attn_bias) {
      expect(source, p + "self_attn.q_proj.bias", l.bq, {Q}, dt, values);
      expect(source, p + "self_attn.k_proj.bias", l.bk, {KV}, dt, values);
      expect(source, p + "self_attn.v_proj.bias", l.bv, {KV}, dt, values);
    }
    if (c.qk_norm) {
      expect(source, p + "self_attn.q_norm.weight", l.q_norm, {h}, dt, values);
      expect(source, p + "self_attn.k_norm.weight", l.k_norm, {h}, dt, values);
    }
    expect(source, p + "post_attention_layernorm.weight", l.ffn_norm, {D}, dt, values);
    expect(source, p + "mlp.gate_proj.weight", l.w_gate, {F, D}, dt, values);
    expect(source, p + "mlp.down_proj.weight", l.w_down, {D, F}, dt, values);
    expect(source, p + "mlp.up_proj.weight", l.w_up, {F, D}, dt, values);
  }
}

LlamaWeights weights_to(const LlamaWeights& w, Device device) {
  LlamaWeights r = w;
  for_each_weight(r, [&](const std::string&, Tensor& t) { t = t.to(device); });
  return r;
}

LlamaWeights random_weights(const LlamaConfig& c, uint64_t seed, double std) {
  const int64_t D = c.dim, F = c.hidden_dim, V = c.vocab_size, h = c.resolved_head_dim();
  const int64_t Q = int64_t(c.n_heads) * h, KV = int64_t(c.n_kv_heads) * h;
  uint64_t s = seed * 1000003ull;
  auto rnd = [&](Shape shape) { return Tensor::randn(shape, ++s, std); };
  auto ones = [&](int64_t n) { return Tensor::full({n}, 1.0); };
  LlamaWeights w;
  w.tok_embeddings = rnd({V, D});
  w.final_norm = ones(D);
  if (!c.tied_embeddings) w.output = rnd({V, D});
  for (int i = 0; i < c.n_layers; ++i) {
    LayerWeights l;
    l.attn_norm = ones(D);
    l.wq = rnd({Q, D});
    l.wk = rnd({KV, D});
    l.wv = rnd({KV, D});
    l.wo = rnd({D, Q});
    if (c.attn_bias) {
      l.bq = rnd({Q});
      l.bk = rnd({KV});
      l.bv = rnd({KV});
    }
    if (c.qk_norm) {
      l.q_norm = ones(h);
      l.k_norm = ones(h);
    }
    l.ffn_norm = ones(D);
    l.w_gate = rnd({F, D});
    l.w_down = rnd({D, F});
    l.w_up = rnd({F, D});
    w.layers.push_back(std::move(l));
  }
  return w;
}

}  // namespace lowbit
