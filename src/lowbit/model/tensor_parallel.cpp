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

namespace {
std::string where_of(int world) { return "tensor parallelism over " + std::to_string(world) + " ranks: "; }

// What no plan can split: a piece, and a model with transforms.
void refuse_unsplittable(const LlamaModel& m, int world) {
  if (m.tensor_parallel()) throw_error(where_of(world), "the model is already a tensor-parallel piece");
  if (m.transforms().any())
    throw_error(where_of(world), "rotation and activation / KV-cache quantization (--rotate, --act, --kv-quant, "
                "--kv-token-quant, or a checkpoint that records them) are not supported: their groups span whole rows");
}
}  // namespace

TensorParallelPlan::TensorParallelPlan(const LlamaConfig& full, int rank, int world, const ColumnUnitFn& column_unit)
    : full_(full), piece_(full), rank_(rank), world_(world) {
  const int W = world, r = rank;
  const std::string where = where_of(W);
  LB_CHECK(W >= 1 && 0 <= r && r < W, where, "rank ", r, " of ", W);
  const int64_t H = full.n_heads, K = full.n_kv_heads, h = full.resolved_head_dim(), F = full.hidden_dim;
  if (H % W != 0) throw_error(where, W, " does not divide n_heads = ", H, " (each rank holds whole attention heads)");
  if (K % W != 0)
    throw_error(where, W, " does not divide n_kv_heads = ", K, " (each rank holds whole KV heads and the query heads that read them)");
  const int64_t Hl = H / W, Kl = K / W;
  // The cut of o_proj's input (whole heads) must fall on its groups; the SwiGLU slice is a whole
  // number of down_proj's groups (the same cut for every layer: one hidden_dim per rank).
  auto unit_of = [&](int i, const char* name) {
    std::string kind;
    const int64_t u = column_unit(i, name, &kind);
    if (u <= 0) throw_error(where, "layer ", i, " ", name, " (", kind, ") cannot be cut by input columns");
    return std::pair<int64_t, std::string>(u, kind);
  };
  int64_t unit_f = 1;
  std::string down_kind = "dense";
  for (int i = 0; i < full.n_layers; ++i) {
    const auto [uo, kind] = unit_of(i, "self_attn.o_proj");
    if ((Hl * h) % uo != 0)
      throw_error(where, "layer ", i, " self_attn.o_proj (", kind, "): a rank's ", Hl, " heads are ", Hl * h,
                  " input columns, not a whole number of its groups of ", uo, " (", W, " does not divide its ",
                  (H * h + uo - 1) / uo, " groups)");
    const auto [ud, dk] = unit_of(i, "mlp.down_proj");
    if (i == 0) down_kind = dk;
    unit_f = std::lcm(unit_f, ud);
  }
  const int64_t units = (F + unit_f - 1) / unit_f;
  if (units % W != 0) {
    if (unit_f == 1) throw_error(where, W, " does not divide hidden_dim = ", F, " (the SwiGLU width is split evenly)");
    throw_error(where, "mlp.down_proj's ", F, " input columns are ", units, " groups of ", unit_f, " (", down_kind,
                "), which ", W, " ranks do not divide");
  }
  f0_ = r * (units / W) * unit_f, f1_ = std::min(F, (r + 1) * (units / W) * unit_f);
  q0_ = r * Hl * h, q1_ = q0_ + Hl * h, k0_ = r * Kl * h, k1_ = k0_ + Kl * h;
  piece_.n_heads = int(Hl);
  piece_.n_kv_heads = int(Kl);
  piece_.head_dim = int(h);
  piece_.hidden_dim = int(f1_ - f0_);
}

ShardCut TensorParallelPlan::cut(const std::string& linear) const {
  if (linear == "self_attn.q_proj") return {ShardAxis::Rows, q0_, q1_};
  if (linear == "self_attn.k_proj" || linear == "self_attn.v_proj") return {ShardAxis::Rows, k0_, k1_};
  if (linear == "self_attn.o_proj") return {ShardAxis::Cols, q0_, q1_};
  if (linear == "mlp.gate_proj" || linear == "mlp.up_proj") return {ShardAxis::Rows, f0_, f1_};
  if (linear == "mlp.down_proj") return {ShardAxis::Cols, f0_, f1_};
  throw_error("tensor parallelism: '", linear, "' is not a block linear");
}

bool TensorParallelPlan::row_parallel(const std::string& linear) {
  return linear == "self_attn.o_proj" || linear == "mlp.down_proj";
}

void LlamaModel::join_tensor_parallel(comm::Communicator& comm) {
  refuse_unsplittable(*this, comm.world_size());
  tp_ = &comm;
  for (auto& b : blocks_)
    for (auto& [name, slot] : b.linears())
      if (TensorParallelPlan::row_parallel(name)) *slot = std::make_shared<RowParallelLinear>(*slot, comm);
}

std::unique_ptr<LlamaModel> LlamaModel::tensor_parallel_shard(comm::Communicator& comm, Device device) const {
  const int W = comm.world_size();
  const std::string where = where_of(W);
  refuse_unsplittable(*this, W);
  const TensorParallelPlan plan(config_, comm.rank(), W, [&](int i, const std::string& name, std::string* kind) {
    const Linear& l = name == "self_attn.o_proj" ? *blocks_[size_t(i)].wo : *blocks_[size_t(i)].w_down;
    *kind = l.kind();
    return l.column_shard_unit();
  });

  const bool move = device != final_norm_.value().device();
  if (move && packed_output_)
    throw_error(where, "a packed vocabulary is not moved between devices: load the model on ", device_name(device));
  auto m = std::make_unique<LlamaModel>(*this);  // embedding, norms, head: shared with this model (or moved)
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
  m->config_ = plan.piece_config();
  for (int i = 0; i < n_layers(); ++i) {
    LlamaBlock b = blocks_[size_t(i)];
    LlamaBlock& p = m->blocks_[size_t(i)];
    auto from = b.linears();
    auto to = p.linears();
    for (size_t j = 0; j < to.size(); ++j) {
      const ShardCut c = plan.cut(to[j].first);
      *to[j].second = (*from[j].second)->shard(c.axis, c.begin, c.end, device);
    }
  }
  m->join_tensor_parallel(comm);
  return m;
}

}  // namespace lowbit
