#include "lowbit/io/weight_names.h"

namespace lowbit::io {

std::vector<WeightSlot> weight_slots(const LlamaConfig& c, LlamaWeights& w) {
  const int64_t D = c.dim, F = c.hidden_dim, V = c.vocab_size, h = c.resolved_head_dim();
  const int64_t Q = int64_t(c.n_heads) * h, KV = int64_t(c.n_kv_heads) * h;
  w.layers.resize(size_t(c.n_layers));
  std::vector<WeightSlot> s;
  s.push_back({"model.embed_tokens.weight", "token_embd.weight", {V, D}, &w.tok_embeddings});
  for (int i = 0; i < c.n_layers; ++i) {
    auto& l = w.layers[size_t(i)];
    const std::string hf = "model.layers." + std::to_string(i) + ".", gg = "blk." + std::to_string(i) + ".";
    s.push_back({hf + "input_layernorm.weight", gg + "attn_norm.weight", {D}, &l.attn_norm});
    s.push_back({hf + "self_attn.q_proj.weight", gg + "attn_q.weight", {Q, D}, &l.wq});
    s.push_back({hf + "self_attn.k_proj.weight", gg + "attn_k.weight", {KV, D}, &l.wk});
    s.push_back({hf + "self_attn.v_proj.weight", gg + "attn_v.weight", {KV, D}, &l.wv});
    s.push_back({hf + "self_attn.o_proj.weight", gg + "attn_output.weight", {D, Q}, &l.wo});
    if (c.attn_bias) {
      s.push_back({hf + "self_attn.q_proj.bias", gg + "attn_q.bias", {Q}, &l.bq});
      s.push_back({hf + "self_attn.k_proj.bias", gg + "attn_k.bias", {KV}, &l.bk});
      s.push_back({hf + "self_attn.v_proj.bias", gg + "attn_v.bias", {KV}, &l.bv});
    }
    if (c.qk_norm) {
      s.push_back({hf + "self_attn.q_norm.weight", gg + "attn_q_norm.weight", {h}, &l.q_norm});
      s.push_back({hf + "self_attn.k_norm.weight", gg + "attn_k_norm.weight", {h}, &l.k_norm});
    }
    s.push_back({hf + "post_attention_layernorm.weight", gg + "ffn_norm.weight", {D}, &l.ffn_norm});
    s.push_back({hf + "mlp.gate_proj.weight", gg + "ffn_gate.weight", {F, D}, &l.w_gate});
    s.push_back({hf + "mlp.down_proj.weight", gg + "ffn_down.weight", {D, F}, &l.w_down});
    s.push_back({hf + "mlp.up_proj.weight", gg + "ffn_up.weight", {F, D}, &l.w_up});
  }
  s.push_back({"model.norm.weight", "output_norm.weight", {D}, &w.final_norm});
  if (!c.tied_embeddings) s.push_back({"lm_head.weight", "output.weight", {V, D}, &w.output});
  return s;
}

bool is_block_linear_weight(const std::string& hf_name) {
  const std::string suffix = "_proj.weight";
  return hf_name.rfind("model.layers.", 0) == 0 && hf_name.size() > suffix.size() &&
         hf_name.compare(hf_name.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace lowbit::io
