#include "lowbit/io/rope_layout.h"

#include <cstring>

namespace lowbit {

// dst row (head, a*h/2 + i) <- src row (head, 2i + a) when to_half; the reverse otherwise.
static Tensor permute_rows(const Tensor& w, int n_heads, int head_dim, bool to_half) {
  LB_CHECK(w.defined() && w.dim() >= 1, "rope row permutation: undefined tensor");
  LB_CHECK(head_dim > 0 && head_dim % 2 == 0, "rope row permutation: head_dim ", head_dim, " must be even");
  LB_CHECK(w.size(0) == int64_t(n_heads) * head_dim, "rope row permutation: tensor ", w.describe(), " does not have ",
           n_heads, " heads of ", head_dim, " rows");
  Tensor src = w.to(Device::CPU).contiguous();
  Tensor dst = Tensor::empty(src.shape(), src.dtype());
  const size_t row_bytes = size_t(src.numel() / src.size(0)) * size_t(dtype_size(src.dtype()));
  const auto* s = static_cast<const uint8_t*>(src.raw_data());
  auto* d = static_cast<uint8_t*>(dst.raw_data());
  const int half = head_dim / 2;
  for (int64_t hd = 0; hd < n_heads; ++hd)
    for (int a = 0; a < 2; ++a)
      for (int i = 0; i < half; ++i) {
        const int64_t meta = hd * head_dim + 2 * i + a, hf = hd * head_dim + a * half + i;
        const int64_t from = to_half ? meta : hf, to = to_half ? hf : meta;
        std::memcpy(d + size_t(to) * row_bytes, s + size_t(from) * row_bytes, row_bytes);
      }
  return dst.to(w.device());
}

Tensor rope_rows_interleaved_to_half(const Tensor& w, int n_heads, int head_dim) {
  return permute_rows(w, n_heads, head_dim, true);
}
Tensor rope_rows_half_to_interleaved(const Tensor& w, int n_heads, int head_dim) {
  return permute_rows(w, n_heads, head_dim, false);
}

LlamaWeights weights_with_rope_style(const LlamaConfig& c, const LlamaWeights& w, RopeStyle target) {
  LlamaWeights out = w;  // shares storage
  if (c.rope_style == target) return out;
  const bool to_half = target == RopeStyle::Half;
  const int h = c.resolved_head_dim();
  auto perm = [&](Tensor& t, int heads) {
    if (t.defined()) t = permute_rows(t, heads, h, to_half);
  };
  for (auto& l : out.layers) {
    perm(l.wq, c.n_heads);
    perm(l.wk, c.n_kv_heads);
    perm(l.bq, c.n_heads);
    perm(l.bk, c.n_kv_heads);
    // Per-head q/k RMSNorm weights index the channels of one head, which move with the rows.
    perm(l.q_norm, 1);
    perm(l.k_norm, 1);
  }
  return out;
}

}  // namespace lowbit
