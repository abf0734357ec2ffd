#include "lowbit/model/tensor_parallel.h"

#include <algorithm>
#include <numeric>
#include <string>

#include "lowbit/comm/comm.h"
#include "lowbit/core/device.h"
#include "lowbit/core/error.h"
#include "lowbit/model/llama.h"

namespace lowbit {

RowParallelLinear::RowParallelLinear(std::shared_ptr<Linear> piece, comm::Communicator& comm)
    : piece_(std::move(piece)), comm_(&comm) {
  LB_CHECK(piece_, "RowParallelLinear: no layer");
}

Var RowParallelLinear::forward(const Var& x) const {
  Var y = piece_->forward(x);
  if (y.requires_grad()) throw_error("tensor-parallel layers are for inference: no gradients flow through the all-reduce");
  Tensor t = y.value().contiguous();
  comm_->all_reduce_sum(t);
  return Var(t, false);
}

const Linear& computing_layer(const Linear& l) {
  const auto* r = dynamic_cast<const RowParallelLinear*>(&l);
  return r ? r->piece() : l;
}

std::unique_ptr<LlamaModel> LlamaModel::tensor_parallel_shard(comm::Communicator& comm) const {
  return tensor_parallel_shard(comm, final_norm_.value().device());
}

std::unique_ptr<LlamaModel> LlamaModel::tensor_parallel_shard(comm::Communicator& comm, Device device) const {
  const int W = comm.world_size(), r = comm.rank();
  const std::string where = "tensor parallelism over " + std::to_string(W) + " ranks: ";
  if (tp_) throw_error(where, "the model is already a tensor-parallel piece");
  if (transforms_.any())
    throw_error(where, "rotation and activation / KV-cache quantization (--rotate, --act, --kv-quant, --kv-token-quant, "
                "or a checkpoint that records them) are not supported: their groups span whole rows");
  const int64_t H = config_.n_heads, K = config_.n_kv_heads, h = config_.resolved_head_dim(), F = config_.hidden_dim;
  if (H % W != 0) throw_error(where, W, " does not divide n_heads = ", H, " (each rank holds whole attention heads)");
  if (K % W != 0)
    throw_error(where, W, " does not divide n_kv_heads = ", K, " (each rank holds whole KV heads and the query heads that read them)");
  const int64_t Hl = H / W, Kl = K / W;
  // The cut of o_proj's input (whole heads) must fall on its groups; the SwiGLU slice is a whole
  // number of down_proj's groups (the same cut for every layer: one hidden_dim per rank).
  auto unit_of = [&](int i, const char* name, const Linear& l) {
    const int64_t u = l.column_shard_unit();
    if (u <= 0)
      throw_error(where, "layer ", i, " ", name, " (", l.kind(), ") cannot be cut by input columns");
    return u;
  };
  int64_t unit_f = 1;
  for (int i = 0; i < n_layers(); ++i) {
    const LlamaBlock& b = blocks_[size_t(i)];
    const int64_t uo = unit_of(i, "self_attn.o_proj", *b.wo);
    if ((Hl * h) % uo != 0)
      throw_error(where, "layer ", i, " self_attn.o_proj (", b.wo->kind(), "): a rank's ", Hl, " heads are ", Hl * h,
                  " input columns, not a whole number of its groups of ", uo, " (", W, " does not divide its ",
                  (H * h + uo - 1) / uo, " groups)");
    unit_f = std::lcm(unit_f, unit_of(i, "mlp.down_proj", *b.w_down));
  }
  const int64_t units = (F + unit_f - 1) / unit_f;
  if (units % W != 0) {
    if (unit_f == 1) throw_error(where, W, " does not divide hidden_dim = ", F, " (the SwiGLU width is split evenly)");
    throw_error(where, "mlp.down_proj's ", F, " input columns are ", units, " groups of ", unit_f, " (",
                blocks_[0].w_down->kind(), "), which ", W, " ranks do not divide");
  }
  const int64_t f0 = r * (units / W) * unit_f, f1 = std::min(F, (r + 1) * (units / W) * unit_f);
  const int64_t q0 = r * Hl * h, q1 = q0 + Hl * h, k0 = r * Kl * h, k1 = k0 + Kl * h;

  const bool move = device != final_norm_.value().device();
  if (move && packed_output_)
    throw_error(where, "a packed vocabulary is not moved between devices: load the model on ", device_name(device));
  auto m = std::make_unique<LlamaModel>(*this);  // embedding, norms, head: shared with this model (or moved)
  m->tp_ = &comm;
  if (move) {
    auto to = [&](Var& v) {
      if (v.defined()) v = Var(v.value().to(device), false);
    };
    to(m->tok_embeddings_);
    to(m->final_norm_);
    to(m->output_);
    for (auto& b : m->blocks_)
      for (Var* v : {&b.attn_norm, &b.ffn_norm, &b.q_norm, &b.k_norm}) to(*v);
  }
  m->config_.n_heads = int(Hl);
  m->config_.n_kv_heads = int(Kl);
  m->config_.head_dim = int(h);
  m->config_.hidden_dim = int(f1 - f0);
  for (int i = 0; i < n_layers(); ++i) {
    const LlamaBlock& b = blocks_[size_t(i)];
    LlamaBlock& p = m->blocks_[size_t(i)];
    p.wq = b.wq->shard(ShardAxis::Rows, q0, q1, device);
    p.wk = b.wk->shard(ShardAxis::Rows, k0, k1, device);
    p.wv = b.wv->shard(ShardAxis::Rows, k0, k1, device);
    p.wo = std::make_shared<RowParallelLinear>(b.wo->shard(ShardAxis::Cols, q0, q1, device), comm);
    p.w_gate = b.w_gate->shard(ShardAxis::Rows, f0, f1, device);
    p.w_up = b.w_up->shard(ShardAxis::Rows, f0, f1, device);
    p.w_down = std::make_shared<RowParallelLinear>(b.w_down->shard(ShardAxis::Cols, f0, f1, device), comm);
  }
  return m;
}

}  // namespace lowbit
