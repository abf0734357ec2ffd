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
#include <memory>

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

// The layer that computes: a row-parallel layer's piece, else l itself (forward_mixed routes packed
// and dense layers differently).
const Linear& computing_layer(const Linear& l);

}  // namespace lowbit
