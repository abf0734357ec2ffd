// Tensor-parallel decoding (issue 20), Megatron-LM style (Shoeybi et al. 2019): each rank (a
// process, comm/comm.h) holds a piece of every block and runs the one forward path of llama.h on it.
//
//   q/k/v_proj       column-parallel (ShardAxis::Rows): rank r keeps the rows of its heads — H/W
//                    whole query heads and the K/W KV heads they read (whole GQA groups) —, so RoPE,
//                    the KV cache and attention are per rank and need nothing from the others;
//   o_proj           row-parallel (ShardAxis::Cols): the input columns of the same heads; its partial
//                    product is all-reduced (RowParallelLinear) before the residual add;
//   gate/up_proj     column-parallel: a slice of the SwiGLU width F (a multiple of down_proj's groups);
//   down_proj        row-parallel on that slice, all-reduced;
//   embedding, norms, output head: replicated (see LlamaModel::tensor_parallel_shard).
//
// So a block costs two all-reduces of [tokens, D] per step. Every rank computes the same residual
// stream (the all-reduce gives each rank the same sum), hence the same logits; rank 0 alone samples,
// the others take its token (runtime: follow_root). Inference only (no gradients).
#pragma once
#include <functional>
#include <memory>
#include <string>

#include "lowbit/model/config.h"
#include "lowbit/model/linear.h"

namespace lowbit {

namespace comm {
class Communicator;
}

// A row-parallel piece: forward = the piece's partial product, summed over the ranks in place
// (Communicator::all_reduce_sum). Every rank must call forward with the same number of rows, in the
// same order (the model's forward paths do: the ranks run the same steps).
class RowParallelLinear : public Linear {
 public:
  // piece: this rank's Cols shard of the layer; comm must outlive this layer.
  RowParallelLinear(std::shared_ptr<Linear> piece, comm::Communicator& comm);
  Var forward(const Var& x) const override;
  int64_t in_features() const override { return piece_->in_features(); }  // this rank's columns
  int64_t out_features() const override { return piece_->out_features(); }
  std::vector<Var> parameters() const override { return {}; }
  Tensor effective_weight() const override { return piece_->effective_weight(); }  // the piece's
  Tensor bias() const override { return piece_->bias(); }
  std::string kind() const override { return piece_->kind(); }
  const Linear& piece() const { return *piece_; }

 private:
  std::shared_ptr<Linear> piece_;
  comm::Communicator* comm_;
};

// The cut of one block linear for one rank.
struct ShardCut {
  ShardAxis axis = ShardAxis::Rows;
  int64_t begin = 0, end = 0;
};

// Which piece of every block linear rank r of W holds — described once, and used both by
// LlamaModel::tensor_parallel_shard (cutting a loaded model in memory) and by the rank-local loader
// (io/tensor_parallel_load.h, which reads only these rows / columns from the file):
//   q_proj rows [q0, q1), k_proj / v_proj rows [k0, k1) (whole heads; q/k/v biases the same rows),
//   o_proj input columns [q0, q1), gate_proj / up_proj rows [f0, f1), down_proj columns [f0, f1).
// Throws lowbit::Error (the messages of tensor_parallel_shard) when W does not divide n_heads or
// n_kv_heads, or o_proj's / down_proj's column units do not split evenly over W.
class TensorParallelPlan {
 public:
  // column_unit(layer, "self_attn.o_proj" | "mlp.down_proj", &kind): that layer's
  // Linear::column_shard_unit() (1: dense) and its kind for messages.
  using ColumnUnitFn = std::function<int64_t(int layer, const std::string& linear, std::string* kind)>;
  TensorParallelPlan(const LlamaConfig& full, int rank, int world, const ColumnUnitFn& column_unit);

  int rank() const { return rank_; }
  int world() const { return world_; }
  const LlamaConfig& full_config() const { return full_; }
  // The piece's config: n_heads = H/W, n_kv_heads = K/W, head_dim = h, hidden_dim = f1 - f0.
  const LlamaConfig& piece_config() const { return piece_; }
  // The cut of the block linear `linear` ("self_attn.q_proj", ..., "mlp.down_proj": the names of
  // LlamaBlock::linears()); throws for another name.
  ShardCut cut(const std::string& linear) const;
  // True for the row-parallel layers (o_proj, down_proj), whose partial products are all-reduced.
  static bool row_parallel(const std::string& linear);

 private:
  LlamaConfig full_, piece_;
  int rank_ = 0, world_ = 1;
  int64_t q0_ = 0, q1_ = 0, k0_ = 0, k1_ = 0, f0_ = 0, f1_ = 0;
};

// The layer that computes: a row-parallel layer's piece, else l itself (forward_mixed routes packed
// and dense layers differently).
const Linear& computing_layer(const Linear& l);

}  // namespace lowbit
