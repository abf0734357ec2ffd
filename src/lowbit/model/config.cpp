#include "lowbit/model/config.h"

#include <sstream>

#include "lowbit/core/error.h"

namespace lowbit {

void LlamaConfig::validate(const std::string& source) const {
  auto positive = [&](const char* name, long v, long limit) {
    if (v <= 0) throw_error(source, ": config field ", name, " = ", v, " must be positive");
    if (v > limit) throw_error(source, ": config field ", name, " = ", v, " is implausibly large (limit ", limit, ")");
  };
  positive("dim", dim, 1 << 17);
  positive("hidden_dim", hidden_dim, 1 << 19);
  positive("n_layers", n_layers, 4096);
  positive("n_heads", n_heads, 4096);
  positive("n_kv_heads", n_kv_heads, 4096);
  positive("vocab_size", vocab_size, 1 << 24);
  positive("max_seq_len", max_seq_len, 1 << 24);
  if (head_dim == 0 && dim % n_heads != 0)
    throw_error(source, ": n_heads = ", n_heads, " does not divide dim = ", dim);
  if (n_heads % n_kv_heads != 0)
    throw_error(source, ": n_kv_heads = ", n_kv_heads, " does not divide n_heads = ", n_heads);
  if (resolved_head_dim() % 2 != 0) throw_error(source, ": head_dim = ", resolved_head_dim(), " must be even for rotary embeddings");
  if (!(rope_theta > 0)) throw_error(source, ": rope_theta must be positive");
  if (rope_scaling.active()) {
    const RopeScaling& s = rope_scaling;
    if (!(s.factor >= 1) || !(s.low_freq_factor > 0) || !(s.high_freq_factor > s.low_freq_factor) || !(s.original_max_position > 0))
      throw_error(source, ": rope_scaling llama3 needs factor >= 1, 0 < low_freq_factor < high_freq_factor and "
                  "original_max_position_embeddings > 0 (got ", s.factor, ", ", s.low_freq_factor, ", ", s.high_freq_factor,
                  ", ", s.original_max_position, ")");
  }
  if (!(norm_eps > 0)) throw_error(source, ": norm_eps must be positive");
}

std::string LlamaConfig::summary() const {
  std::ostringstream os;
  os << arch << " dim=" << dim << " hidden=" << hidden_dim << " layers=" << n_layers << " heads=" << n_heads
     << " kv_heads=" << n_kv_heads << " head_dim=" << resolved_head_dim() << " vocab=" << vocab_size
     << " seq=" << max_seq_len << " rope_theta=" << rope_theta << (tied_embeddings ? " tied" : " untied");
  if (rope_scaling.active())
    os << " rope_scaling=llama3(factor=" << rope_scaling.factor << ", low=" << rope_scaling.low_freq_factor
       << ", high=" << rope_scaling.high_freq_factor << ", original=" << rope_scaling.original_max_position << ")";
  return os.str();
}

}  // namespace lowbit
