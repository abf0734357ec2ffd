#include "lowbit/model/llama.h"

#include <algorithm>
#include <cmath>
#include <optional>

#include "lowbit/autograd/functions.h"
#include "lowbit/core/threads.h"
#include "lowbit/core/vecmath.h"
#include "lowbit/model/tensor_parallel.h"
#include "lowbit/ops/coupled_quant.h"
#include "lowbit/ops/wkv_quant.h"
#include "lowbit/ops/ops.h"
#include "lowbit/ops/quant_matmul.h"

namespace lowbit {

std::vector<std::pair<std::string, std::shared_ptr<Linear>*>> LlamaBlock::linears() {
  return {{"self_attn.q_proj", &wq},   {"self_attn.k_proj", &wk}, {"self_attn.v_proj", &wv},
          {"self_attn.o_proj", &wo},   {"mlp.gate_proj", &w_gate}, {"mlp.up_proj", &w_up},
          {"mlp.down_proj", &w_down}};
}

LlamaModel::LlamaModel(LlamaConfig config, const LlamaWeights& w, bool trainable)
    : LlamaModel(std::move(config), w, trainable, true) {}

LlamaModel::LlamaModel(LlamaConfig config, const LlamaWeights& w, bool trainable, bool check_values)
    : config_(std::move(config)) {
  config_.validate("model config");
  validate_weights(config_, w, "model weights", check_values);
  tok_embeddings_ = Var(w.tok_embeddings, trainable);
  final_norm_ = Var(w.final_norm, trainable);
  if (!config_.tied_embeddings) output_ = Var(w.output, trainable);
  blocks_.resize(w.layers.size());
  for (size_t i = 0; i < w.layers.size(); ++i) blocks_[i] = make_block(w.layers[i], trainable);
}

LlamaBlock LlamaModel::make_block(const LayerWeights& l, bool trainable) const {
  LlamaBlock b;
  b.attn_norm = Var(l.attn_norm, trainable);
  b.ffn_norm = Var(l.ffn_norm, trainable);
  if (config_.qk_norm) {
    b.q_norm = Var(l.q_norm, trainable);
    b.k_norm = Var(l.k_norm, trainable);
  }
  b.wq = std::make_shared<DenseLinear>(l.wq, config_.attn_bias ? l.bq : Tensor(), trainable);
  b.wk = std::make_shared<DenseLinear>(l.wk, config_.attn_bias ? l.bk : Tensor(), trainable);
  b.wv = std::make_shared<DenseLinear>(l.wv, config_.attn_bias ? l.bv : Tensor(), trainable);
  b.wo = std::make_shared<DenseLinear>(l.wo, Tensor(), trainable);
  b.w_gate = std::make_shared<DenseLinear>(l.w_gate, Tensor(), trainable);
  b.w_down = std::make_shared<DenseLinear>(l.w_down, Tensor(), trainable);
  b.w_up = std::make_shared<DenseLinear>(l.w_up, Tensor(), trainable);
  return b;
}

void LlamaModel::set_block(int i, const LayerWeights& l) {
  LB_CHECK(i >= 0 && i < n_layers(), "set_block: no block ", i, " (the model has ", n_layers(), ")");
  const int64_t D = config_.dim, F = config_.hidden_dim, h = config_.resolved_head_dim();
  const int64_t Q = int64_t(config_.n_heads) * h, KV = int64_t(config_.n_kv_heads) * h;
  const std::pair<const Tensor*, Shape> need[] = {{&l.attn_norm, {D}}, {&l.ffn_norm, {D}}, {&l.wq, {Q, D}},
                                                  {&l.wk, {KV, D}},    {&l.wv, {KV, D}},   {&l.wo, {D, Q}},
                                                  {&l.w_gate, {F, D}}, {&l.w_down, {D, F}}, {&l.w_up, {F, D}}};
  for (const auto& [t, shape] : need)
    LB_CHECK(t->defined() && t->shape() == shape, "set_block ", i, ": a tensor is ",
             t->defined() ? shape_str(t->shape()) : std::string("missing"), ", expected ", shape_str(shape));
  blocks_.at(size_t(i)) = make_block(l, false);
}

void LlamaModel::set_packed_vocab(std::shared_ptr<Linear> output, EmbedRowFn embed_row, EmbedIdsFn embed_ids) {
  LB_CHECK(output && embed_row, "set_packed_vocab: both the output layer and the embedding rows are needed");
  LB_CHECK(output->in_features() == config_.dim && output->out_features() == config_.vocab_size,
           "set_packed_vocab: output layer is [", output->out_features(), ", ", output->in_features(), "], expected [",
           config_.vocab_size, ", ", config_.dim, "]");
  packed_output_ = std::move(output);
  packed_embed_row_ = std::move(embed_row);
  packed_embed_ids_ = std::move(embed_ids);
}

Var LlamaModel::embed(const Tensor& tokens) const {
  if (packed_embed_ids_) return Var(packed_embed_ids_(tokens.contiguous().view({-1}).to(Device::CPU)), false);
  if (packed_embed_row_) {
    const Tensor ids = tokens.contiguous().view({-1}).to(Device::CPU);
    const int64_t n = ids.numel(), D = config_.dim;
    Tensor out = Tensor::empty({n, D});
    for (int64_t i = 0; i < n; ++i) {
      const int64_t id = ids.data<int32_t>()[i];
      if (id < 0 || id >= config_.vocab_size)
        throw_error("embed: token id ", id, " at position ", i, " is outside the vocabulary [0, ", config_.vocab_size, ")");
      packed_embed_row_(id, out.data<float>() + i * D);
    }
    return Var(out.to(final_norm_.value().device()), false);
  }
  Var e = embedding(tok_embeddings_, tokens.contiguous().view({-1}).to(tok_embeddings_.value().device()));
  const DType dt = tok_embeddings_.value().dtype();
  return dt == DType::F16 || dt == DType::BF16 ? cast(e, DType::F32) : e;  // compact_weights() tables
}

namespace {
// The f32 tensor as bf16 or f16 when every value survives the conversion exactly, else undefined.
Tensor exact_16bit(const Tensor& t) {
  const float* p = t.data<float>();
  const int64_t n = t.numel();
  const double not_bf16 = parallel_sum(n, 1 << 16, [&](int64_t lo, int64_t hi) {
    uint32_t any = 0;
    for (int64_t i = lo; i < hi; ++i) any |= __builtin_bit_cast(uint32_t, p[i]) & 0xffffu;
    return double(any != 0);
  });
  if (not_bf16 == 0) {
    Tensor r = Tensor::empty(t.shape(), DType::BF16);
    auto* d = static_cast<uint16_t*>(r.raw_data());
    parallel_for(n, 1 << 16, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) d[i] = uint16_t(__builtin_bit_cast(uint32_t, p[i]) >> 16);
    });
    return r;
  }
  Tensor r = Tensor::empty(t.shape(), DType::F16);
  auto* d = static_cast<uint16_t*>(r.raw_data());
  const double inexact = parallel_sum(
      n, 1 << 16, [&](int64_t lo, int64_t hi) { return vec::f32_to_f16_exact(p + lo, d + lo, hi - lo) ? 0.0 : 1.0; });
  return inexact == 0 ? r : Tensor();
}
}  // namespace

int64_t LlamaModel::compact_weights() {
  int64_t saved = 0;
  auto compact = [&](const Var& v) -> Var {
    const Tensor& t = v.value();
    if (!t.defined() || t.dim() != 2 || t.dtype() != DType::F32) return v;
    if (t.device() != Device::CPU || v.requires_grad())
      throw_error("compact_weights: only for frozen models on the CPU (", t.describe(), ")");
    Tensor h = exact_16bit(t.contiguous());
    if (!h.defined()) return v;
    saved += t.numel() * 2;
    return Var(h, false);
  };
  if (!packed_embed_row_) tok_embeddings_ = compact(tok_embeddings_);  // packed vocabularies stay packed
  if (output_.defined() && !packed_output_) output_ = compact(output_);
  for (auto& b : blocks_)
    for (auto& [name, slot] : b.linears()) {
      auto* d = dynamic_cast<DenseLinear*>(slot->get());
      if (!d) continue;  // quantized and training layers keep their own storage
      Var w = compact(d->weight_var());
      if (w.value().dtype() != DType::F32) *slot = std::make_shared<DenseLinear>(w.value(), d->bias(), false);
    }
  return saved;
}

KVCacheType parse_kv_cache_type(const std::string& name, const std::string& what) {
  if (name == "auto") return KVCacheType::Auto;
  if (name == "f32") return KVCacheType::F32;
  if (name == "f16") return KVCacheType::F16;
  if (name == "q8") return KVCacheType::Q8;
  if (name == "int4") return KVCacheType::Int4;
  if (name == "int2") return KVCacheType::Int2;
  throw_error(what, ": '", name, "' is not a KV cache type (expected auto, f16, q8, int4, int2 or f32)");
}

const char* kv_cache_type_name(KVCacheType t) {
  switch (t) {
    case KVCacheType::Auto: return "auto";
    case KVCacheType::F32: return "f32";
    case KVCacheType::F16: return "f16";
    case KVCacheType::Q8: return "q8";
    case KVCacheType::Int4: return "int4";
    case KVCacheType::Int2: return "int2";
  }
  return "?";
}

int kv_cache_bits(KVCacheType t) { return t == KVCacheType::Int4 ? 4 : t == KVCacheType::Int2 ? 2 : 0; }

int64_t kivi_quantized_tokens(int64_t length, int64_t group, int64_t window) {
  const int64_t n = length - window;
  return n <= 0 || group < 1 ? 0 : (n / group) * group;
}

int64_t KVCache::bytes() const {
  int64_t n = 0;
  for (const auto* list : {&k, &v, &k_scale, &v_scale, &k_zero, &v_zero, &k_res, &v_res})
    for (const Tensor& t : *list) n += t.defined() ? int64_t(t.nbytes()) : 0;
  return n;
}

namespace {
void check_layer(const KVCache& cache, int layer) {
  if (layer < 0 || size_t(layer) >= cache.k.size()) throw_error("KV cache: no layer ", layer, " (", cache.k.size(), " layers)");
}
}  // namespace

void kv_append(KVCache& cache, int layer, int64_t pos0, const Tensor& k, const Tensor& v) {
  check_layer(cache, layer);
  Tensor& ck = cache.k[size_t(layer)];
  Tensor& cv = cache.v[size_t(layer)];
  const int bits0 = kv_cache_bits(cache.type);
  const int64_t KVH = ck.size(1), hd = bits0 ? ck.size(2) * 8 / bits0 : ck.size(2), T = k.numel() / std::max<int64_t>(1, KVH * hd);
  if (k.numel() != T * KVH * hd || v.numel() != k.numel())
    throw_error("KV cache: keys ", k.describe(), " / values ", v.describe(), " are not [T, ", KVH, " x ", hd, "]");
  if (pos0 < 0 || pos0 + T > cache.capacity) throw_error("KV cache full: ", pos0 + T, " tokens, capacity ", cache.capacity);
  if (const int bits = kv_cache_bits(cache.type)) {
    // Packed (KIVI): each token enters the f16 ring; a group of `group` tokens is packed from the
    // ring once it leaves the window (the ring holds window + group tokens, enough for that).
    const size_t l = size_t(layer);
    const int64_t G = cache.group, C = KVH * hd, rb = C * bits / 8, nvg = hd / cache.vgroup;
    const Tensor kc = k.contiguous().view({T, C}), vc = v.contiguous().view({T, C});
    auto* kr = static_cast<uint16_t*>(cache.k_res[l].raw_data());
    auto* vr = static_cast<uint16_t*>(cache.v_res[l].raw_data());
    for (int64_t t = 0; t < T; ++t) {
      const int64_t p = pos0 + t, slot = p % cache.ring;
      vec::f32_to_f16_exact(kc.data<float>() + t * C, kr + slot * C, C);
      vec::f32_to_f16_exact(vc.data<float>() + t * C, vr + slot * C, C);
      const int64_t before = kivi_quantized_tokens(p, G, cache.window), after = kivi_quantized_tokens(p + 1, G, cache.window);
      if (after == before) continue;
      // Tokens [before, after) (one group) leave the ring: widen them from f16 and pack.
      Tensor kg = Tensor::empty({G, C}), vg = Tensor::empty({G, C});
      for (int64_t j = 0; j < G; ++j) {
        const int64_t s = (before + j) % cache.ring;
        vec::f16_to_f32(kr + s * C, kg.data<float>() + j * C, C);
        vec::f16_to_f32(vr + s * C, vg.data<float>() + j * C, C);
      }
      Tensor kcodes = ck.view({cache.capacity, rb}).slice(0, before, after);
      Tensor vcodes = cv.view({cache.capacity, rb}).slice(0, before, after);
      const int64_t g = before / G;
      Tensor ks = cache.k_scale[l].view({-1, C}).slice(0, g, g + 1), kz = cache.k_zero[l].view({-1, C}).slice(0, g, g + 1);
      Tensor vs = cache.v_scale[l].view({cache.capacity, KVH * nvg}).slice(0, before, after);
      Tensor vz = cache.v_zero[l].view({cache.capacity, KVH * nvg}).slice(0, before, after);
      ops::kivi_quantize(kg, bits, G, true, kcodes, ks, kz);
      ops::kivi_quantize(vg, bits, cache.vgroup, false, vcodes, vs, vz);
    }
    return;
  }
  if (cache.type == KVCacheType::F16 || cache.type == KVCacheType::Q8) {
    const bool q8 = cache.type == KVCacheType::Q8;
    for (int kv = 0; kv < 2; ++kv) {
      Tensor dst = (kv ? cv : ck).slice(0, pos0, pos0 + T);
      Tensor sc = q8 ? (kv ? cache.v_scale : cache.k_scale)[size_t(layer)].slice(0, pos0, pos0 + T) : Tensor();
      ops::kv_store((kv ? v : k).contiguous().view({T, KVH, hd}), dst, sc);
    }
    return;
  }
  ck.slice(0, pos0, pos0 + T).copy_(k.contiguous().view({T, KVH, hd}));
  cv.slice(0, pos0, pos0 + T).copy_(v.contiguous().view({T, KVH, hd}));
}

KVLayerView kv_read(const KVCache& cache, int layer, int64_t length) {
  check_layer(cache, layer);
  if (length < 0 || length > cache.capacity) throw_error("KV cache: ", length, " tokens asked, capacity ", cache.capacity);
  if (const int bits = kv_cache_bits(cache.type)) {
    const size_t l = size_t(layer);
    auto p = std::make_shared<ops::KiviView>();
    p->bits = bits;
    p->length = length;
    p->quantized = kivi_quantized_tokens(length, cache.group, cache.window);
    p->group = cache.group;
    p->vgroup = cache.vgroup;
    p->ring = cache.ring;
    p->k_codes = cache.k[l];
    p->v_codes = cache.v[l];
    p->k_scale = cache.k_scale[l];
    p->k_zero = cache.k_zero[l];
    p->v_scale = cache.v_scale[l];
    p->v_zero = cache.v_zero[l];
    p->k_res = cache.k_res[l];
    p->v_res = cache.v_res[l];
    KVLayerView view;
    view.length = length;
    view.packed = std::move(p);
    return view;
  }
  KVLayerView view{cache.k[size_t(layer)].slice(0, 0, length), cache.v[size_t(layer)].slice(0, 0, length), {}, {}, length, {}};
  if (cache.type == KVCacheType::Q8) {
    view.k_scale = cache.k_scale[size_t(layer)].slice(0, 0, length);
    view.v_scale = cache.v_scale[size_t(layer)].slice(0, 0, length);
  }
  return view;
}

Var kv_attention(const Var& q, const KVLayerView& kv, int64_t T, int64_t H, int64_t hd) {
  const Tensor& qv = q.value();
  if (kv.packed) {
    if (qv.device() != Device::CPU || qv.dtype() != DType::F32)
      throw_error("KV cache ", kv.packed->bits, "-bit (packed): f32 queries on the CPU only, got ", qv.describe());
    Tensor out = Tensor::empty({T, H, hd}, DType::F32, Device::CPU);
    ops::kivi_attention_forward(qv.contiguous().view({T, H, hd}), *kv.packed, 1.0 / std::sqrt(double(hd)), out);
    return Var(out.view({T, H * hd}), false);
  }
  const int64_t KVH = kv.k.size(1);
  const bool keep_graph = q.requires_grad() && kv.k.dtype() == DType::F32;  // gradients to q through an f32 cache
  if (kv.k.device() == Device::CPU && qv.dtype() == DType::F32 && kv.k.dtype() != DType::F64 && !keep_graph) {
    // CPU, f32 activations: the cache-reading kernel (any storage type, no autograd graph).
    Tensor out = Tensor::empty({T, H, hd}, DType::F32, Device::CPU);
    ops::kv_attention_forward(qv.contiguous().view({T, H, hd}), kv.k, kv.v, kv.k_scale, kv.v_scale,
                              1.0 / std::sqrt(double(hd)), out);
    return Var(out.view({T, H * hd}), false);
  }
  Var kc(kv.k.view({kv.length, KVH * hd})), vc(kv.v.view({kv.length, KVH * hd}));
  return attention(q, kc, vc, 1, T, kv.length, H, KVH, hd);
}

namespace {
// KIVI fake quantization (model/rotation.h): q f32 [T, H, hd] at positions S-T .. S-1; k, v f32
// [S, KVH, hd] contiguous, full precision. Each query attends over keys/values whose first L(t)
// tokens are replaced by their quantized versions. Returns f32 [T, H, hd].
// Keys [n, KVH*hd] (f32) from the interleaved RoPE channel order to the Hugging Face (rotate-half)
// order of each head (to_half), or back: channel pair (2i, 2i+1) <-> (i, i + hd/2).
Tensor permute_key_channels(const Tensor& k, int64_t hd, bool to_half) {
  const int64_t n = k.numel() / hd;
  const Tensor c = k.contiguous();
  if (to_half) return c.view({n, hd / 2, 2}).transpose(1, 2).contiguous().view(k.shape());
  return c.view({n, 2, hd / 2}).transpose(1, 2).contiguous().view(k.shape());
}

// Whether the keys reach KV quantization in the interleaved RoPE channel order (coupled
// quantization then groups them in the Hugging Face order: kivi_attention, the KV observer); keys
// rotated per head (rotate_heads) are in the Hugging Face order already.
bool cq_keys_interleaved(const LlamaConfig& c, const ModelTransforms& t) {
  return c.rope_style == RopeStyle::Interleaved && c.resolved_head_dim() % 2 == 0 && !t.head.defined();
}

// Coupled quantization (spec.coupled()) replaces the quantized tokens with their nearest centroids
// of layer `layer`'s codebooks (ops/coupled_quant.h), each token on its own. Its channel groups are
// taken in the Hugging Face order of each head, whatever the model's RoPE layout, so a checkpoint
// (saved in that order) decodes to the same keys: keys_interleaved says the keys come in the
// interleaved order (a model with per-head rotated keys has them in that order already).
Tensor kivi_attention(const KVQuantSpec& spec, int layer, const Tensor& q, const Tensor& k, const Tensor& v,
                      double scale, bool keys_interleaved) {
  const int64_t T = q.size(0), H = q.size(1), hd = q.size(2), S = k.size(0), KVH = k.size(1), C = KVH * hd;
  const int64_t G = spec.group, vg = hd % G == 0 ? G : hd;
  const int64_t Lmax = spec.quantized_len(S - 1);
  if (spec.smoothed()) {  // WKVQuant: smoothed per channel, quantized per token, past only (ops/wkv_quant.h)
    Tensor out = Tensor::empty({T, H, hd});
    if (Lmax == 0) {
      ops::kv_attention_forward(q, k, v, Tensor(), Tensor(), scale, out);
      return out;
    }
    const Tensor shift = spec.wkv_shift.select(0, layer).contiguous(), sc = spec.wkv_scale.select(0, layer).contiguous();
    Tensor kin = k.slice(0, 0, Lmax).contiguous().view({Lmax, C}), kq = Tensor::empty({Lmax, C}), vq = Tensor::empty({Lmax, C});
    if (keys_interleaved) kin = permute_key_channels(kin, hd, true);
    ops::wkv_fake_quant(kin, shift.select(0, 0).contiguous(), sc.select(0, 0).contiguous(), spec.bits, vg, kq);
    if (keys_interleaved) kq = permute_key_channels(kq, hd, false);
    ops::wkv_fake_quant(v.slice(0, 0, Lmax).contiguous().view({Lmax, C}), shift.select(0, 1).contiguous(),
                        sc.select(0, 1).contiguous(), spec.bits, vg, vq);
    std::vector<int64_t> L(static_cast<size_t>(T));
    for (int64_t i = 0; i < T; ++i) L[size_t(i)] = spec.quantized_len(S - T + i);
    ops::past_quant_attention_forward(q, k, v, kq.view({Lmax, KVH, hd}), vq.view({Lmax, KVH, hd}), L, scale, out);
    return out;
  }
  Tensor kq, vq;
  if (Lmax > 0) {  // the complete groups, quantized once: keys per channel, values per token
    kq = Tensor::empty({Lmax, C});
    vq = Tensor::empty({Lmax, C});
    if (spec.coupled()) {
      Tensor kin = k.slice(0, 0, Lmax).contiguous().view({Lmax, C});
      if (keys_interleaved) kin = permute_key_channels(kin, hd, true);
      ops::cq_fake_quant(kin, spec.cq_keys.select(0, layer).contiguous(), kq);
      if (keys_interleaved) kq = permute_key_channels(kq, hd, false);
      ops::cq_fake_quant(v.slice(0, 0, Lmax).contiguous().view({Lmax, C}), spec.cq_values.select(0, layer).contiguous(), vq);
    } else {
      // The packed cache's codec (ops/kv_quant.h: f32 scales), so both paths give the same numbers.
      ops::kivi_fake_quant(k.slice(0, 0, Lmax).contiguous().view({Lmax, C}), spec.bits, G, true, kq);
      ops::kivi_fake_quant(v.slice(0, 0, Lmax).contiguous().view({Lmax, C}), spec.bits, vg, false, vq);
    }
  }
  Tensor out = Tensor::empty({T, H, hd});
  for (int64_t t0 = 0; t0 < T;) {  // queries sharing one L(t): consecutive positions
    const int64_t L = spec.quantized_len(S - T + t0);
    int64_t t1 = t0 + 1;
    while (t1 < T && spec.quantized_len(S - T + t1) == L) ++t1;
    const int64_t keys = S - T + t1;  // the chunk's last query sees keys [0, keys)
    Tensor km = k.slice(0, 0, keys), vm = v.slice(0, 0, keys);
    if (L > 0) {
      km = km.contiguous().clone();
      vm = vm.contiguous().clone();
      km.view({keys, C}).slice(0, 0, L).copy_(kq.slice(0, 0, L));
      vm.view({keys, C}).slice(0, 0, L).copy_(vq.slice(0, 0, L));
    }
    Tensor o = out.slice(0, t0, t1);
    Tensor oc = Tensor::empty(o.shape());
    ops::kv_attention_forward(q.slice(0, t0, t1).contiguous(), km.contiguous(), vm.contiguous(), Tensor(), Tensor(),
                              scale, oc);
    o.copy_(oc);
    t0 = t1;
  }
  return out;
}
}  // namespace

void LlamaModel::set_transforms(ModelTransforms t) {
  validate_transforms(config_, t, "model transforms");
  if (t.any() && tp_)
    throw_error("rotation and activation / KV-cache quantization: not on a tensor-parallel piece of the model");
  // On the GPU: the online Hadamard rotations, the integer activation quantizers (absmax, asymmetric,
  // absmean) and LLM-QAT's per-token KV quantizer have CUDA bodies (ops/cuda/act_quant.cu); the FP8/FP4
  // activation formats and the KV-cache quantizers (KIVI, CQ, WKVQuant) do not.
  const Device dev = final_norm_.value().device();
  if (dev != Device::CPU && t.act.enabled() && t.act.fp != ActFloat::None)
    throw_error("FP8/FP4 activation quantization (act ", act_quant_name(t.act), ") runs on the CPU only (the model is on ",
                device_name(dev), ")");
  if (dev != Device::CPU && t.kv.enabled())
    throw_error("KV-cache quantization (kv ", kv_quant_name(t.kv), ") runs on the CPU only (the model is on ",
                device_name(dev), ")");
  transforms_ = std::move(t);
  if (transforms_.kv.enabled()) set_kv_cache_layout(transforms_.kv.group, transforms_.kv.window);
}

void LlamaModel::set_kv_cache_layout(int64_t group, int64_t window) {
  if (group < 1 || group > 4096) throw_error("KV cache: group ", group, " is not in [1, 4096]");
  if (window < 0 || window > (int64_t(1) << 30)) throw_error("KV cache: window ", window, " is not in [0, 2^30]");
  kv_layout_ = KVQuantSpec{};
  kv_layout_.group = group;
  kv_layout_.window = window;
}

namespace {
// Activations quantized per token, symmetric, clip 1 (--act int8 / int4): the packed products of a
// block run on integer activations with one scale per row (ops::QuantActPerRowScope), which equals
// the fake quantization act_in applies followed by the f32 product (up to f32 summation order).
// The scope is alive for one block's products; 0 bits: none. Not for int4-absmean: its per-row scale
// (mean|x| / sqrt(7), codes down to -8) is not max|x| / 7 and cannot be read back from the
// quantized input, so those products quantize their activations as without --act.
int per_row_act_bits(const ActQuantSpec& a) {
  return a.enabled() && !a.asymmetric && !a.absmean && a.fp == ActFloat::None && a.clip == 1.0 && a.clips.empty()
             ? a.bits
             : 0;
}
}  // namespace

Var LlamaModel::act_in(const Var& x, int layer, int point) const {
  const ActQuantSpec& a = transforms_.act;
  if (a.clips.empty()) return act_fake_quant(x, a);
  return act_fake_quant(x, a.with_clip(a.clip_at(layer, point)));
}

Var LlamaModel::kv_token_in(const Var& x) const {
  const int bits = transforms_.kv_token_bits;
  if (bits <= 0) return x;
  return fake_quant(x, bits, false, 1.0, config_.resolved_head_dim());
}

Var LlamaModel::down_in(const Var& m) const {
  const HadamardRotation& r = transforms_.ffn;
  if (!r.defined()) return m;
  const DType dt = m.value().dtype();
  const Device dev = m.value().device();  // the rotation's tensors follow the activations (CPU or CUDA body)
  return hadamard_transform(m, r.signs.to(dt).to(dev), r.small.defined() ? r.small.to(dt).to(dev) : Tensor());
}

Var LlamaModel::o_in(const Var& att) const {
  const HadamardRotation& r = transforms_.o_in;
  if (!r.defined()) return att;
  const DType dt = att.value().dtype();
  const Device dev = att.value().device();
  return hadamard_transform(att, r.signs.to(dt).to(dev), r.small.defined() ? r.small.to(dt).to(dev) : Tensor());
}

Var LlamaModel::rotate_heads(const Var& x, bool kv_quantized) const {
  const HadamardRotation& r = transforms_.head;
  if (!r.defined() || !kv_quantized) return x;
  const int64_t hd = r.size();
  Tensor v = x.value().contiguous().view({-1, hd});
  // The rotation acts on each head's channels in the Hugging Face (rotate-half) order, whatever
  // this model's RoPE layout, so a checkpoint saved in that order decodes to the same keys. (Only
  // q . k matters, and queries and keys get the same treatment; KV quantization has no gradient.)
  if (config_.rope_style == RopeStyle::Interleaved && hd % 2 == 0)
    v = v.view({-1, hd / 2, 2}).transpose(1, 2).contiguous().view({-1, hd});
  return Var(r.apply(v).view(x.value().shape()), false);
}

Var LlamaModel::block_forward(int i, const Var& x, int64_t B, int64_t T, KVCache* cache) const {
  std::optional<ops::QuantActPerRowScope> int_acts;
  if (const int bits = per_row_act_bits(transforms_.act)) int_acts.emplace(bits);
  const LlamaBlock& b = blocks_.at(size_t(i));
  const int64_t H = config_.n_heads, KVH = config_.n_kv_heads, hd = config_.resolved_head_dim();
  const double eps = config_.norm_eps;
  // Attention.
  Var h = act_in(rmsnorm(x, b.attn_norm, eps), i, kActAttn);
  Var q = b.wq->forward(h), k = kv_token_in(b.wk->forward(h)), v = kv_token_in(b.wv->forward(h));
  if (config_.qk_norm) {  // Qwen3: RMSNorm over each head's channels before rotary.
    q = reshape(rmsnorm(reshape(q, {-1, hd}), b.q_norm, eps), {B * T, H * hd});
    k = reshape(rmsnorm(reshape(k, {-1, hd}), b.k_norm, eps), {B * T, KVH * hd});
  }
  Var att;
  if (cache) {
    if (B != 1) throw_error("KV-cache decoding supports batch 1, got ", B);
    att = attend_cached(i, q, k, v, T, *cache);
  } else {
    const bool kvq = transforms_.kv.enabled() || bool(kv_observer_);
    q = rotate_heads(rope(q, B, T, H, hd, 0, config_.rope_theta, config_.rope_style, config_.rope_scaling), kvq);
    k = rotate_heads(rope(k, B, T, KVH, hd, 0, config_.rope_theta, config_.rope_style, config_.rope_scaling), kvq);
    if (kv_observer_)  // keys in the channel order coupled quantization groups them in (kivi_attention)
      kv_observer_(i, cq_keys_interleaved(config_, transforms_) ? permute_key_channels(k.value().to(DType::F32), hd, true) : k.value(), v.value());
    if (transforms_.kv.enabled()) {  // KIVI fake quantization, per sequence (no gradient)
      const Tensor& qv = q.value();
      if (qv.device() != Device::CPU || qv.dtype() != DType::F32)
        throw_error("KV-cache quantization: f32 models on the CPU only (got ", qv.describe(), ")");
      const Tensor q4 = qv.contiguous().view({B, T, H, hd});
      const Tensor k4 = k.value().contiguous().view({B, T, KVH, hd}), v4 = v.value().contiguous().view({B, T, KVH, hd});
      Tensor out = Tensor::empty({B, T, H, hd});
      for (int64_t s = 0; s < B; ++s)
        out.select(0, s).copy_(kivi_attention(transforms_.kv, i, q4.select(0, s).contiguous(), k4.select(0, s).contiguous(),
                                              v4.select(0, s).contiguous(), 1.0 / std::sqrt(double(hd)),
                                              cq_keys_interleaved(config_, transforms_)));
      att = Var(out.view({B * T, H * hd}), false);
    } else {
      att = attention(q, k, v, B, T, T, H, KVH, hd);
    }
  }
  return block_mlp(i, add(x, b.wo->forward(act_in(o_in(att), i, kActO))));
}

Var LlamaModel::attend_cached(int i, Var q, Var k, const Var& v, int64_t T, KVCache& cache) const {
  const int64_t H = config_.n_heads, KVH = config_.n_kv_heads, hd = config_.resolved_head_dim();
  const int64_t pos0 = cache.length;
  if (pos0 + T > cache.capacity) throw_error("KV cache full: ", pos0 + T, " tokens, capacity ", cache.capacity);
  const bool packed = kv_cache_bits(cache.type) > 0;
  const bool kvq = packed || transforms_.kv.enabled();
  q = rotate_heads(rope(q, 1, T, H, hd, pos0, config_.rope_theta, config_.rope_style, config_.rope_scaling), kvq);
  k = rotate_heads(rope(k, 1, T, KVH, hd, pos0, config_.rope_theta, config_.rope_style, config_.rope_scaling), kvq);
  if (packed) {  // the packed cache quantizes for real (it replaces a simulated KV quantization)
    if (q.value().device() != Device::CPU || q.value().dtype() != DType::F32)
      throw_error("KV cache ", kv_cache_type_name(cache.type), ": f32 models on the CPU only (got ", q.value().describe(), ")");
    return Var(attend_packed(i, q.value().contiguous().view({T, H, hd}), k.value().contiguous(), v.value().contiguous(), T, cache)
                   .view({T, H * hd}),
               false);
  }
  kv_append(cache, i, pos0, k.value(), v.value());
  const KVLayerView view = kv_read(cache, i, pos0 + T);
  if (transforms_.kv.enabled()) {  // KIVI fake quantization of what the cache holds
    if (view.k.dtype() != DType::F32 && view.k.dtype() != DType::F16)
      throw_error("KV-cache quantization: the cache must be f32 or f16, not ", kv_cache_type_name(cache.type));
    if (q.value().device() != Device::CPU || q.value().dtype() != DType::F32)
      throw_error("KV-cache quantization: f32 models on the CPU only (got ", q.value().describe(), ")");
    Tensor out = kivi_attention(transforms_.kv, i, q.value().contiguous().view({T, H, hd}), view.k.to(DType::F32).contiguous(),
                                view.v.to(DType::F32).contiguous(), 1.0 / std::sqrt(double(hd)), cq_keys_interleaved(config_, transforms_));
    return Var(out.view({T, H * hd}), false);
  }
  return kv_attention(q, view, T, H, hd);
}

Tensor LlamaModel::attend_packed(int i, const Tensor& q, const Tensor& k, const Tensor& v, int64_t T, KVCache& cache) const {
  const int64_t pos0 = cache.length;
  auto packed_at = [&](int64_t t) { return kivi_quantized_tokens(pos0 + t + 1, cache.group, cache.window); };
  Tensor out = Tensor::empty(q.shape());
  for (int64_t t0 = 0; t0 < T;) {  // queries t0 .. t1-1 see the same packed prefix
    int64_t t1 = t0 + 1;
    while (t1 < T && packed_at(t1) == packed_at(t0)) ++t1;
    kv_append(cache, i, pos0 + t0, k.slice(0, t0, t1), v.slice(0, t0, t1));
    const KVLayerView view = kv_read(cache, i, pos0 + t1);
    Tensor o = t0 == 0 && t1 == T ? out : Tensor::empty({t1 - t0, q.size(1), q.size(2)});
    ops::kivi_attention_forward(q.slice(0, t0, t1).contiguous(), *view.packed, 1.0 / std::sqrt(double(q.size(2))), o);
    if (o.data<float>() != out.data<float>()) out.slice(0, t0, t1).copy_(o);
    t0 = t1;
  }
  return out;
}

Var LlamaModel::block_mlp(int i, const Var& x1) const {
  const LlamaBlock& b = blocks_.at(size_t(i));
  const double eps = config_.norm_eps;
  // SwiGLU MLP.
  Var h2 = act_in(rmsnorm(x1, b.ffn_norm, eps), i, kActFfn);
  Var m = act_in(down_in(swiglu(b.w_gate->forward(h2), b.w_up->forward(h2))), i, kActDown);
  return add(x1, b.w_down->forward(m));
}

Var LlamaModel::head(const Var& x) const {
  Var h = rmsnorm(x, final_norm_, config_.norm_eps);
  if (packed_output_) return packed_output_->forward(h);
  return linear(h, config_.tied_embeddings ? tok_embeddings_ : output_);
}

Var LlamaModel::forward(const Tensor& tokens) const {
  if (tokens.dim() != 2) throw_error("forward: tokens must be [B, T], got ", tokens.describe());
  const int64_t B = tokens.size(0), T = tokens.size(1);
  Var x = embed(tokens);
  for (int i = 0; i < config_.n_layers; ++i) x = block_forward(i, x, B, T);
  return head(x);
}

KVCache LlamaModel::make_cache(int64_t capacity, KVCacheType type) const {
  if (capacity < 0) throw_error("KV cache: capacity ", capacity, " is negative");
  KVCache c;
  c.capacity = capacity;
  const Tensor& ref = final_norm_.value();  // f32/f64 like the activations (the embedding may be 16-bit or packed)
  const DType model_dt = ref.dtype() == DType::F64 ? DType::F64 : DType::F32;
  const bool cpu = ref.device() == Device::CPU;
  if (type == KVCacheType::Auto) type = cpu && model_dt == DType::F32 ? KVCacheType::F16 : KVCacheType::F32;
  if (kv_cache_bits(type) && !cpu)
    throw_error("KV cache ", kv_cache_type_name(type), " (KIVI packed codes): the CPU only, no CUDA body yet (use --kv-cache "
                "f32 on the GPU, or --device cpu)");
  if (type != KVCacheType::F32 && (!cpu || model_dt != DType::F32))
    throw_error("KV cache ", kv_cache_type_name(type), ": only f32 models on the CPU support it (use f32)");
  c.type = type;
  const int64_t KVH = config_.n_kv_heads, hd = config_.resolved_head_dim();
  if (const int bits = kv_cache_bits(type)) {
    if ((hd * bits) % 8 != 0)
      throw_error("KV cache ", kv_cache_type_name(type), ": head_dim ", hd, " is not a multiple of ", 8 / bits,
                  " (whole bytes of codes per head)");
    c.group = kv_layout_.group;
    c.window = kv_layout_.window;
    c.vgroup = hd % c.group == 0 ? c.group : hd;  // as the simulated path (kivi_attention)
    c.ring = std::min(capacity, c.window + c.group);
    const int64_t groups = (capacity + c.group - 1) / c.group;
    for (int i = 0; i < config_.n_layers; ++i) {
      c.k.push_back(Tensor::zeros({capacity, KVH, hd * bits / 8}, DType::U8));
      c.v.push_back(Tensor::zeros({capacity, KVH, hd * bits / 8}, DType::U8));
      c.k_scale.push_back(Tensor::zeros({groups, KVH, hd}, DType::F32));
      c.k_zero.push_back(Tensor::zeros({groups, KVH, hd}, DType::U8));
      c.v_scale.push_back(Tensor::zeros({capacity, KVH, hd / c.vgroup}, DType::F32));
      c.v_zero.push_back(Tensor::zeros({capacity, KVH, hd / c.vgroup}, DType::U8));
      c.k_res.push_back(Tensor::zeros({c.ring, KVH, hd}, DType::F16));
      c.v_res.push_back(Tensor::zeros({c.ring, KVH, hd}, DType::F16));
    }
    return c;
  }
  const DType dt = type == KVCacheType::F16 ? DType::F16 : type == KVCacheType::Q8 ? DType::I8 : model_dt;
  for (int i = 0; i < config_.n_layers; ++i) {
    c.k.push_back(Tensor::zeros({capacity, KVH, hd}, dt, ref.device()));
    c.v.push_back(Tensor::zeros({capacity, KVH, hd}, dt, ref.device()));
    if (type == KVCacheType::Q8) {
      c.k_scale.push_back(Tensor::zeros({capacity, KVH}, DType::F32, ref.device()));
      c.v_scale.push_back(Tensor::zeros({capacity, KVH}, DType::F32, ref.device()));
    }
  }
  return c;
}

Var LlamaModel::forward_cached(const Tensor& tokens, KVCache& cache, bool logits) const {
  const int64_t T = tokens.numel();
  Var x = embed(tokens.view({1, T}));
  for (int i = 0; i < config_.n_layers; ++i) x = block_forward(i, x, 1, T, &cache);
  cache.length += T;
  return logits ? head(x) : Var();
}

namespace {
// Prompt pieces of at most this many tokens join the decode rows of a mixed step in one int8
// product (ops::QuantInt8RowsScope); longer ones run alone on Auto's prefill path (f32 activations,
// faster for them; the ternary layouts take int8 there too: ops::quant_matmul_int8_prefill).
// Which path a piece takes depends only on its own length.
constexpr int64_t kMixedInt8PieceMax = 64;

// Rows [r0, r1) of x, for a list of ranges, as one contiguous tensor (one range: a view).
Tensor gather_rows(const Tensor& x, const std::vector<std::pair<int64_t, int64_t>>& ranges) {
  if (ranges.size() == 1) return x.slice(0, ranges[0].first, ranges[0].second);
  int64_t n = 0;
  for (const auto& [r0, r1] : ranges) n += r1 - r0;
  Tensor out = Tensor::empty({n, x.size(1)}, x.dtype(), x.device());
  int64_t at = 0;
  for (const auto& [r0, r1] : ranges) {
    out.slice(0, at, at + r1 - r0).copy_(x.slice(0, r0, r1));
    at += r1 - r0;
  }
  return out;
}

void scatter_rows(const Tensor& part, const std::vector<std::pair<int64_t, int64_t>>& ranges, Tensor& y) {
  int64_t at = 0;
  for (const auto& [r0, r1] : ranges) {
    y.slice(0, r0, r1).copy_(part.slice(0, at, at + r1 - r0));
    at += r1 - r0;
  }
}

bool packed_on_cpu(const Linear& l, const Var& x) {
  return !dynamic_cast<const DenseLinear*>(&computing_layer(l)) && x.value().device() == Device::CPU;
}
}  // namespace

Var LlamaModel::forward_batch(const Tensor& tokens, const std::vector<KVCache*>& caches) const {
  const int64_t B = tokens.numel();
  if (B < 1 || tokens.dim() != 1) throw_error("forward_batch: tokens must be i32 [B] with B >= 1, got ", tokens.describe());
  return forward_mixed(tokens, caches, std::vector<int64_t>(size_t(B), 1), std::vector<bool>(size_t(B), true));
}

Var LlamaModel::forward_mixed(const Tensor& tokens, const std::vector<KVCache*>& caches, const std::vector<int64_t>& counts,
                              const std::vector<bool>& want_logits) const {
  const int64_t N = tokens.numel();
  if (N < 1 || tokens.dim() != 1) throw_error("forward_batch: tokens must be i32 [N] with N >= 1, got ", tokens.describe());
  const size_t S = caches.size();
  if (counts.size() != S || want_logits.size() != S)
    throw_error("forward_batch: ", S, " caches but ", counts.size(), " token counts and ", want_logits.size(),
                " logits flags (one each per sequence)");
  std::vector<int64_t> row0(S + 1, 0);  // sequence s owns rows [row0[s], row0[s+1])
  for (size_t s = 0; s < S; ++s) {
    if (!caches[s]) throw_error("forward_batch: cache ", s, " is null");
    if (counts[s] < 1) throw_error("forward_batch: sequence ", s, " has ", counts[s], " tokens (at least 1)");
    if (caches[s]->length + counts[s] > caches[s]->capacity)
      throw_error("forward_batch: KV cache ", s, " is full (", caches[s]->length, " of ", caches[s]->capacity,
                  " tokens, ", counts[s], " more)");
    for (size_t t = 0; t < s; ++t)
      if (caches[t] == caches[s]) throw_error("forward_batch: sequences ", t, " and ", s, " share one KV cache");
    row0[s + 1] = row0[s] + counts[s];
  }
  if (row0[S] != N) throw_error("forward_batch: the token counts add up to ", row0[S], ", but there are ", N, " tokens");
  // Rows for the linear layers. Packed layers on the CPU: the decode rows and the short prompt
  // pieces of every sequence in one int8 product (the Int8 body is row-independent), longer pieces
  // alone. Other layers: each piece alone, runs of decode rows together (as forward_batch always
  // did). Either way a sequence's numbers do not depend on the other sequences of the step.
  using Ranges = std::vector<std::pair<int64_t, int64_t>>;
  auto add_range = [](Ranges& r, int64_t r0, int64_t r1) {
    if (!r.empty() && r.back().second == r0) r.back().second = r1;
    else r.emplace_back(r0, r1);
  };
  Ranges joint, long_pieces;  // packed layers
  Ranges dense_runs;          // other layers: runs of single tokens, and each piece alone
  std::vector<bool> dense_run_single;
  int64_t joint_rows = 0;
  for (size_t s = 0; s < S; ++s) {
    const int64_t r0 = row0[s], r1 = row0[s + 1];
    if (counts[s] <= kMixedInt8PieceMax) {
      add_range(joint, r0, r1);
      joint_rows += r1 - r0;
    } else {
      long_pieces.emplace_back(r0, r1);
    }
    if (counts[s] == 1 && !dense_run_single.empty() && dense_run_single.back()) {
      dense_runs.back().second = r1;
    } else {
      dense_runs.emplace_back(r0, r1);
      dense_run_single.push_back(counts[s] == 1);
    }
  }
  auto lin = [&](const Linear& l, const Var& x) -> Var {
    if (!packed_on_cpu(l, x)) {
      if (dense_runs.size() == 1) return l.forward(x);
      const Tensor xv = x.value().contiguous();
      Tensor y;
      for (const auto& [r0, r1] : dense_runs) {
        const Tensor part = l.forward(Var(xv.slice(0, r0, r1))).value();
        if (!y.defined()) y = Tensor::empty({N, part.size(1)}, part.dtype(), part.device());
        y.slice(0, r0, r1).copy_(part);
      }
      return Var(y);
    }
    if (long_pieces.empty()) {
      ops::QuantInt8RowsScope int8_rows(N);
      return l.forward(x);
    }
    const Tensor xv = x.value().contiguous();
    Tensor y;
    auto place = [&](const Tensor& part, const Ranges& where) {
      if (!y.defined()) y = Tensor::empty({N, part.size(1)}, part.dtype(), part.device());
      scatter_rows(part, where, y);
    };
    if (!joint.empty()) {
      ops::QuantInt8RowsScope int8_rows(joint_rows);
      place(l.forward(Var(gather_rows(xv, joint).contiguous())).value(), joint);
    }
    for (const auto& r : long_pieces) place(l.forward(Var(xv.slice(0, r.first, r.second))).value(), {r});
    return Var(y);
  };
  // Linear layers that read one input (q / k / v, gate / up): packed CPU layers whose forward is
  // the product alone, in a step without long pieces, run as one ops::quant_matmul_many (the same
  // numbers as one lin after the other, in one parallel region); anything else layer by layer.
  auto lin_many = [&](std::initializer_list<const Linear*> ls, const Var& x) -> std::vector<Var> {
    std::vector<Var> out;
    std::vector<ops::PackedWeight> ws(ls.size());
    ops::QuantMatmulOptions opt0;
    bool together = long_pieces.empty() && ls.size() > 1;
    size_t i = 0;
    for (const Linear* l : ls) {
      ops::QuantMatmulOptions opt;
      together = together && packed_on_cpu(*l, x) && l->packed_product(x, ws[i], opt);
      if (!together) break;
      if (i == 0) opt0 = opt;
      together = opt.path == opt0.path && opt.isa == opt0.isa && opt.int8_panels == opt0.int8_panels;
      ++i;
    }
    if (!together) {
      for (const Linear* l : ls) out.push_back(lin(*l, x));
      return out;
    }
    const Tensor xv = x.value().contiguous();
    std::vector<Tensor> ys;
    std::vector<const ops::PackedWeight*> wp;
    for (const ops::PackedWeight& w : ws) {
      ys.push_back(Tensor::empty({N, w.out}, DType::F32, Device::CPU));
      wp.push_back(&w);
    }
    std::vector<Tensor*> yp;
    for (Tensor& y : ys) yp.push_back(&y);
    {
      ops::QuantInt8RowsScope int8_rows(N);
      ops::quant_matmul_many(xv, wp, yp, opt0);
    }
    for (Tensor& y : ys) out.push_back(Var(y, false));
    return out;
  };
  std::vector<int64_t> small, large;  // sequences by token count (attention runs them differently)
  for (size_t s = 0; s < S; ++s) (counts[s] <= kMixedInt8PieceMax ? small : large).push_back(int64_t(s));

  const int64_t H = config_.n_heads, KVH = config_.n_kv_heads, hd = config_.resolved_head_dim();
  const double eps = config_.norm_eps;
  Var x = embed(tokens.view({1, N}));
  std::optional<ops::QuantActPerRowScope> int_acts;  // the blocks' products (the head is after the loop)
  if (const int bits = per_row_act_bits(transforms_.act)) int_acts.emplace(bits);
  for (int i = 0; i < config_.n_layers; ++i) {
    const LlamaBlock& b = blocks_[size_t(i)];
    // Norms and linear layers on all N rows (each weight is read once per segment) ...
    Var h = act_in(rmsnorm(x, b.attn_norm, eps), i, kActAttn);
    Var q, k, v;
    {
      ops::QuantSharedInputScope shared;  // q, k and v read h: its int8 activations are made once
      std::vector<Var> qkv = lin_many({b.wq.get(), b.wk.get(), b.wv.get()}, h);
      q = qkv[0];
      k = qkv[1];
      v = qkv[2];
    }
    k = kv_token_in(k);
    v = kv_token_in(v);
    if (config_.qk_norm) {
      q = reshape(rmsnorm(reshape(q, {-1, hd}), b.q_norm, eps), {N, H * hd});
      k = reshape(rmsnorm(reshape(k, {-1, hd}), b.k_norm, eps), {N, KVH * hd});
    }
    // ... RoPE and attention per sequence, at its own positions against its own cache.
    const Tensor qv = q.value().contiguous(), kv = k.value().contiguous(), vv = v.value().contiguous();
    Tensor att = Tensor::empty({N, H * hd}, qv.dtype(), qv.device());
    // What attend_cached does for an f32, f16 or q8 cache on the CPU without KV transforms (no head
    // rotation then, kv_attention's cache kernel): RoPE, kv_append, kv_read, kv_attention_forward.
    auto plain_kv = [&](const KVCache& c) {
      return qv.device() == Device::CPU && qv.dtype() == DType::F32 && kv_cache_bits(c.type) == 0 &&
             !transforms_.kv.enabled() && size_t(i) < c.k.size() && c.k[size_t(i)].device() == Device::CPU &&
             c.k[size_t(i)].dtype() != DType::F64;
    };
    auto one = [&](int64_t s) {
      NoGradGuard no_grad;  // thread-local: pool workers are other threads
      const int64_t r0 = row0[size_t(s)], r1 = row0[size_t(s) + 1], T = r1 - r0;
      KVCache& cache = *caches[size_t(s)];
      if (T == 1 && plain_kv(cache) && cache.type == KVCacheType::F16 && cache.k[size_t(i)].is_contiguous() &&
          cache.v[size_t(i)].is_contiguous()) {
        // A decode row over an f16 cache: the same ops on raw rows, no Tensor made per sequence and
        // layer (a step's allocations grew with its rows): RoPE into per-thread rows, kv_store's
        // f16 rounding straight into the cache, the fused one-row attention straight into att.
        const int64_t pos0 = cache.length, qw = H * hd, kw = KVH * hd;
        thread_local std::vector<float> qrow, krow;
        if (qrow.size() < size_t(qw)) qrow.resize(size_t(qw));
        if (krow.size() < size_t(kw)) krow.resize(size_t(kw));
        ops::rope_f32(qv.data<float>() + r0 * qw, qrow.data(), 1, H, hd, pos0, config_.rope_theta, config_.rope_style,
                      config_.rope_scaling);
        ops::rope_f32(kv.data<float>() + r0 * kw, krow.data(), 1, KVH, hd, pos0, config_.rope_theta,
                      config_.rope_style, config_.rope_scaling);
        auto* ck = static_cast<uint16_t*>(cache.k[size_t(i)].raw_data());
        auto* cv = static_cast<uint16_t*>(cache.v[size_t(i)].raw_data());
        vec::f32_to_f16_exact(krow.data(), ck + pos0 * kw, kw);
        vec::f32_to_f16_exact(vv.data<float>() + r0 * kw, cv + pos0 * kw, kw);
        float* o = att.data<float>() + r0 * qw;
        if (ops::kv_decode_attention_f16(qrow.data(), ck, cv, pos0 + 1, H, KVH, hd, 1.0 / std::sqrt(double(hd)), o))
          return;
        const KVLayerView view = kv_read(cache, i, pos0 + 1);  // no fused kernel here: kv_attention_forward
        Tensor out = att.slice(0, r0, r1).view({1, H, hd});
        ops::kv_attention_forward(Tensor::from_blob(qrow.data(), {1, H, hd}, DType::F32, nullptr), view.k, view.v,
                                  view.k_scale, view.v_scale, 1.0 / std::sqrt(double(hd)), out);
        return;
      }
      if (plain_kv(cache)) {  // attend_cached's ops without its wrappers: the output straight into att
        const int64_t pos0 = cache.length;
        Tensor qr = Tensor::empty({1, T, H, hd}), kr = Tensor::empty({1, T, KVH, hd});
        ops::rope(qv.slice(0, r0, r1).view({1, T, H, hd}), pos0, config_.rope_theta, config_.rope_style, false, qr,
                  config_.rope_scaling);
        ops::rope(kv.slice(0, r0, r1).view({1, T, KVH, hd}), pos0, config_.rope_theta, config_.rope_style, false, kr,
                  config_.rope_scaling);
        kv_append(cache, i, pos0, kr, vv.slice(0, r0, r1));
        const KVLayerView view = kv_read(cache, i, pos0 + T);
        Tensor o = att.slice(0, r0, r1).view({T, H, hd});
        ops::kv_attention_forward(qr.view({T, H, hd}), view.k, view.v, view.k_scale, view.v_scale,
                                  1.0 / std::sqrt(double(hd)), o);
        return;
      }
      Var a = attend_cached(i, Var(qv.slice(0, r0, r1)), Var(kv.slice(0, r0, r1)), Var(vv.slice(0, r0, r1)), T, cache);
      att.slice(0, r0, r1).copy_(a.value());
    };
    // Decode tokens and short pieces: one sequence per pool task (the ops inside run serially there,
    // core/threads.h), so a step costs B small attentions, not B rounds of handing tiny ops to the
    // pool. Long pieces: one after the other, each attention spread over the pool.
    const int64_t n1 = int64_t(small.size());
    if (qv.device() == Device::CPU && n1 > 1) parallel_each(n1, [&](int64_t j) { one(small[size_t(j)]); });
    else for (int64_t s : small) one(s);
    for (int64_t s : large) one(s);
    Var x1 = add(x, lin(*b.wo, act_in(o_in(Var(att)), i, kActO)));
    Var h2 = act_in(rmsnorm(x1, b.ffn_norm, eps), i, kActFfn);
    Var gate, up;
    {
      ops::QuantSharedInputScope shared;  // gate and up read h2
      std::vector<Var> gu = lin_many({b.w_gate.get(), b.w_up.get()}, h2);
      gate = gu[0];
      up = gu[1];
    }
    Var m = act_in(down_in(swiglu(gate, up)), i, kActDown);
    x = add(x1, lin(*b.w_down, m));
  }
  for (size_t s = 0; s < S; ++s) caches[s]->length += counts[s];
  // Logits of the last token of each sequence that wants them.
  std::vector<int64_t> last;
  for (size_t s = 0; s < S; ++s)
    if (want_logits[s]) last.push_back(row0[s + 1] - 1);
  if (last.empty()) return Var(Tensor::empty({0, int64_t(config_.vocab_size)}, x.value().dtype(), x.value().device()));
  Tensor xl;
  if (int64_t(last.size()) == N) {
    xl = x.value();
  } else {
    const Tensor xv = x.value().contiguous();
    xl = Tensor::empty({int64_t(last.size()), xv.size(1)}, xv.dtype(), xv.device());
    for (size_t j = 0; j < last.size(); ++j) xl.slice(0, int64_t(j), int64_t(j) + 1).copy_(xv.slice(0, last[j], last[j] + 1));
  }
  if (!packed_output_) return head(Var(xl));
  ops::QuantInt8RowsScope int8_rows(int64_t(last.size()));  // one row per sequence, as alone
  return packed_output_->forward(rmsnorm(Var(xl), final_norm_, config_.norm_eps));
}

std::vector<Var> LlamaModel::parameters() const {
  std::vector<Var> p;
  auto push = [&](const Var& v) {
    if (v.defined() && v.requires_grad()) p.push_back(v);
  };
  push(tok_embeddings_);
  for (const auto& b : blocks_) {
    push(b.attn_norm);
    push(b.ffn_norm);
    push(b.q_norm);
    push(b.k_norm);
    for (const auto* l : {&b.wq, &b.wk, &b.wv, &b.wo, &b.w_gate, &b.w_down, &b.w_up})
      for (auto& v : (*l)->parameters()) p.push_back(v);
  }
  push(final_norm_);
  push(output_);
  return p;
}

LlamaWeights LlamaModel::weights() const {
  LlamaWeights w;
  w.tok_embeddings = tok_embeddings_.value();
  w.final_norm = final_norm_.value();
  if (output_.defined()) w.output = output_.value();
  if (packed_embed_row_) {  // the packed vocabulary, decoded (tok_embeddings_/output_ are placeholders then)
    const int64_t V = config_.vocab_size, D = config_.dim;
    Tensor e = Tensor::empty({V, D});
    parallel_for(V, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) packed_embed_row_(r, e.data<float>() + r * D);
    });
    w.tok_embeddings = e.to(w.final_norm.device());  // decoded on the host; the model's device as every other weight
    w.output = config_.tied_embeddings ? Tensor() : packed_output_->effective_weight();
  }
  for (const auto& b : blocks_) {
    LayerWeights l;
    l.attn_norm = b.attn_norm.value();
    l.ffn_norm = b.ffn_norm.value();
    if (b.q_norm.defined()) l.q_norm = b.q_norm.value();
    if (b.k_norm.defined()) l.k_norm = b.k_norm.value();
    l.wq = b.wq->effective_weight();
    l.wk = b.wk->effective_weight();
    l.wv = b.wv->effective_weight();
    l.bq = b.wq->bias();
    l.bk = b.wk->bias();
    l.bv = b.wv->bias();
    l.wo = b.wo->effective_weight();
    l.w_gate = b.w_gate->effective_weight();
    l.w_down = b.w_down->effective_weight();
    l.w_up = b.w_up->effective_weight();
    w.layers.push_back(std::move(l));
  }
  return w;
}

}  // namespace lowbit
