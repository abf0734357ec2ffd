// The Llama-family decoder (Touvron et al. 2023), written once for training, calibration and
// generation:
//
//   x = embed(tokens)                                   [B*T, D]
//   for each block i:
//     h = x + Wo . attention(rope(Wq . n1(x)), rope(Wk . n1(x)), Wv . n1(x))   n1 = RMSNorm
//     x = h + W2 . (silu(W1 . n2(h)) * (W3 . n2(h)))                           n2 = RMSNorm
//   logits = head(rmsnorm(x))                           [B*T, V]
//
// Block-level entry points (embed, block_forward, head) let quantization methods run the model
// one block at a time. With a KVCache, block_forward appends the new tokens' keys/values and
// attends over the cache: the same code serves prefill and token-by-token decoding.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "lowbit/autograd/variable.h"
#include "lowbit/model/config.h"
#include "lowbit/model/linear.h"
#include "lowbit/model/rotation.h"
#include "lowbit/model/weights.h"
#include "lowbit/ops/kv_quant.h"

namespace lowbit {

namespace comm {
class Communicator;
}

struct LlamaBlock {
  Var attn_norm, ffn_norm;  // [D]
  Var q_norm, k_norm;       // [h] (Qwen3)
  std::shared_ptr<Linear> wq, wk, wv, wo, w_gate, w_down, w_up;

  // The seven linear layers with their Hugging Face names ("self_attn.q_proj", ...).
  std::vector<std::pair<std::string, std::shared_ptr<Linear>*>> linears();
};

// Storage type of a KV cache. Auto: f16 for an f32 model on the CPU, the model's own type
// otherwise (f32 on CUDA, f64 for f64 models). F16: IEEE half per value. Q8: int8 per value with
// one f32 scale per (token, kv head) row (absmax / 127). Int4 / Int2: KIVI packed codes (ops/kv_quant.h:
// keys per channel in groups of `group` tokens, values per token in groups of `group` channels
// — the whole head when group does not divide head_dim —, f32 scales + u8 zero points, the newest
// window .. window+group-1 tokens in an f16 ring; group/window from LlamaModel::kv_cache_layout).
// All but F32 are CPU-only (inference, f32 models).
enum class KVCacheType : uint8_t { Auto, F32, F16, Q8, Int4, Int2 };
// "auto", "f32", "f16", "q8", "int4", "int2" -> the type; throws lowbit::Error naming `what` otherwise.
KVCacheType parse_kv_cache_type(const std::string& name, const std::string& what = "--kv-cache");
const char* kv_cache_type_name(KVCacheType t);
// Bits of a packed (KIVI) type: 4, 2; 0 for the others.
int kv_cache_bits(KVCacheType t);

// Keys and values of past tokens for one sequence (batch 1), per layer: [max_seq, KVH, h] in the
// storage type (f32/f64, f16, or i8 with scales [max_seq, KVH] f32 for Q8; for Int4/Int2 the
// KIVI layout of ops/kv_quant.h: k/v the packed codes, k_scale/k_zero, v_scale/v_zero, k_res/v_res).
// Code outside the cache's own functions reaches the stored keys/values only through kv_append,
// kv_read and kv_attention below, so the storage type of the cache can change behind them.
struct KVCache {
  std::vector<Tensor> k, v;
  std::vector<Tensor> k_scale, v_scale;  // Q8, Int4/Int2
  std::vector<Tensor> k_zero, v_zero, k_res, v_res;  // Int4/Int2
  KVCacheType type = KVCacheType::F32;   // resolved (never Auto)
  int64_t group = 0, vgroup = 0, window = 0, ring = 0;  // Int4/Int2 layout
  int64_t length = 0;  // tokens stored
  int64_t capacity = 0;
  int64_t bytes() const;  // memory held by the cache
};

// One layer's cached keys/values for positions [0, length) ([length, KVH, h] each, with the Q8
// scales): what kv_attention reads. A view into the cache, valid until the cache is appended to or
// destroyed.
struct KVLayerView {
  Tensor k, v;
  Tensor k_scale, v_scale;  // Q8 only
  int64_t length = 0;
  std::shared_ptr<const ops::KiviView> packed;  // Int4/Int2: the whole packed layer (k, v undefined)
};
// Tokens of a packed (KIVI) cache that are quantized once `length` tokens are stored:
// floor((length - window) / group) * group, 0 when length <= window.
int64_t kivi_quantized_tokens(int64_t length, int64_t group, int64_t window);

// Stores the keys and values of T new tokens (k, v: [T, KVH*h] or [T, KVH, h], f32) of layer
// `layer` at positions pos0 .. pos0+T-1. Does not advance cache.length (the caller does, once all
// layers are written). Throws when the tokens do not fit the capacity. Packed caches take the
// tokens in order: each enters the ring, and a group is packed as soon as it leaves the window.
void kv_append(KVCache& cache, int layer, int64_t pos0, const Tensor& k, const Tensor& v);
// The cached keys/values of layer `layer` for positions [0, length).
KVLayerView kv_read(const KVCache& cache, int layer, int64_t length);
// Causal attention of the T newest tokens' queries q [T, H*h] (positions kv.length-T ..
// kv.length-1) over the cached keys/values: [T, H*h]. Inference only (no gradient to the cache).
Var kv_attention(const Var& q, const KVLayerView& kv, int64_t T, int64_t H, int64_t hd);

class LlamaModel {
 public:
  // trainable: parameters require grad (training); otherwise frozen (inference/calibration).
  LlamaModel(LlamaConfig config, const LlamaWeights& weights, bool trainable = false);
  // check_values = false: the weights' shapes and dtypes are checked, no value is read (block-wise
  // streaming builds the model from placeholders that hold no memory, methods/stream.h).
  LlamaModel(LlamaConfig config, const LlamaWeights& weights, bool trainable, bool check_values);
  // Replaces block i by a frozen one made from `l` (shapes checked against the config): block-wise
  // streaming puts a block's weights in when the pipeline reaches it and takes them out after.
  void set_block(int i, const LayerWeights& l);

  const LlamaConfig& config() const { return config_; }
  int n_layers() const { return config_.n_layers; }
  LlamaBlock& block(int i) { return blocks_.at(size_t(i)); }
  const LlamaBlock& block(int i) const { return blocks_.at(size_t(i)); }

  // tokens: i32 [B, T] -> hidden [B*T, D]
  Var embed(const Tensor& tokens) const;
  // One decoder block on x [B*T, D]. With a cache (B must be 1) the tokens sit at positions
  // cache->length .. cache->length+T-1; the cache length is advanced by the last layer's call
  // through advance_cache().
  Var block_forward(int i, const Var& x, int64_t B, int64_t T, KVCache* cache = nullptr) const;
  // Final norm and output projection: hidden [M, D] -> logits [M, V].
  Var head(const Var& x) const;
  // Full forward: tokens [B, T] -> logits [B*T, V].
  Var forward(const Tensor& tokens) const;

  // A cache for `capacity` tokens of the given storage type (see KVCacheType).
  KVCache make_cache(int64_t capacity, KVCacheType type = KVCacheType::Auto) const;
  // Group and window of packed (Int4/Int2) caches made from now on (KVQuantSpec's meaning; bits
  // ignored). Default 32 / 128; set_transforms takes them from an enabled KV quantization.
  void set_kv_cache_layout(int64_t group, int64_t window);
  const KVQuantSpec& kv_cache_layout() const { return kv_layout_; }
  // Incremental forward of `tokens` (i32 [T]) after the cached ones; returns logits [T, V]
  // (logits = false: skips the output head and returns an undefined Var — a prompt's prefill, or a
  // tensor-parallel rank other than 0, which takes rank 0's tokens).
  Var forward_cached(const Tensor& tokens, KVCache& cache, bool logits = true) const;

  // One decoding step of B independent sequences (inference, no gradients): token b (i32 [B])
  // goes after the contents of caches[b], each at its own position. Norms and linear layers run
  // on the B rows together (weights read once per step), RoPE and attention per sequence against
  // its own cache. Returns logits [B, V]; every cache grows by one token. Equal to B separate
  // forward_cached calls. The caches must be distinct and have room for one more token.
  Var forward_batch(const Tensor& tokens, const std::vector<KVCache*>& caches) const;
  // One step of sequences that feed different numbers of tokens (continuous batching with chunked
  // prefill): sequence s feeds counts[s] >= 1 tokens (consecutive in `tokens`, i32 [sum counts])
  // after the contents of caches[s]. Packed linear layers on the CPU take the rows of every
  // sequence of at most 64 tokens (decode steps, short prompt pieces) in one product on the int8
  // path (ops::QuantInt8RowsScope: weights read once for all of them, each row computed as alone);
  // longer pieces run alone on the f32 (prefill) path, as forward_cached runs them. Other layers:
  // runs of single tokens together, each piece alone. So each sequence's numbers depend only on its
  // own tokens and on how its prompt is split into pieces, never on the other sequences of the step
  // (a piece of up to 64 tokens gets what forward_cached gives it under QuantInt8RowsScope).
  // Returns the logits of the last token of each sequence with want_logits[s], in order: [R, V]
  // (R may be 0). Every cache grows by its count.
  Var forward_mixed(const Tensor& tokens, const std::vector<KVCache*>& caches, const std::vector<int64_t>& counts,
                    const std::vector<bool>& want_logits) const;

  std::vector<Var> parameters() const;
  // The token embedding's parameter node (tied models: also the output projection).
  const Var& token_embedding() const { return tok_embeddings_; }
  // Inference on the CPU: stores each dense linear weight, the output projection and the embedding
  // table as bf16 or f16 when every value of it is exactly representable there (a model read from
  // an F16 or BF16 file), so such a model keeps half the memory and its matrix products read the
  // 16-bit weights directly (ops::gemm, core/blas.h). The numbers the model computes are unchanged.
  // Frozen models on the CPU only (throws otherwise). Returns the bytes saved.
  int64_t compact_weights();
  // Current weights (effective weights of linear layers) back as plain tensors.
  LlamaWeights weights() const;

  // Inference with a packed vocabulary matrix (e.g. GGUF's Q8_0 token_embd): `output` computes the
  // output projection (tied or not) and `embed_row(id, dst)` writes the embedding row of token id
  // into dst[0, dim). While set, embed() and head() use them and never read tok_embeddings / output
  // (which may then be shape-only placeholders). Not for training (no gradients flow through them).
  // `embed_ids` (optional; GPU models): ids i32 [n] on the CPU -> embeddings f32 [n, dim] on the
  // model's device, validating the ids; used instead of embed_row when given.
  using EmbedRowFn = std::function<void(int64_t id, float* dst)>;
  using EmbedIdsFn = std::function<Tensor(const Tensor& ids)>;
  void set_packed_vocab(std::shared_ptr<Linear> output, EmbedRowFn embed_row, EmbedIdsFn embed_ids = {});
  const std::shared_ptr<Linear>& packed_output() const { return packed_output_; }

  // Tensor parallelism (model/tensor_parallel.h): this rank's piece of the model for the ranks of
  // `comm` (which must outlive it). Rank r keeps query heads [r H/W, (r+1) H/W), KV heads [r K/W,
  // (r+1) K/W) (q/k/v rows; o_proj's input columns, all-reduced) and a slice of the SwiGLU width
  // (gate/up rows; down_proj's input columns, all-reduced), cut on the groups of packed weights; its
  // config() says n_heads = H/W, n_kv_heads = K/W, hidden_dim = its slice, head_dim = h, so its KV
  // caches hold only its heads. Token embedding, norms and output head are shared with this model
  // (replicated: every rank computes the logits of the same residual stream; a vocabulary-sharded
  // head would save V*D/W memory per rank for an all-gather of V logits per token). Throws
  // lowbit::Error when W does not divide n_heads or n_kv_heads, when down_proj's / o_proj's groups
  // (column_shard_unit) do not split evenly over W, for layer kinds that cannot be cut, and for a
  // model with transforms (rotation, activation or KV quantization: their groups span whole rows).
  // Inference only. `device`: where the piece lives (its linears copied there piece by piece, the
  // replicated tensors moved there; a packed vocabulary must already be there): a model read on
  // the CPU becomes a GPU rank's piece without the whole model ever being on the GPU. Without it:
  // the model's device.
  std::unique_ptr<LlamaModel> tensor_parallel_shard(comm::Communicator& comm, Device device) const;
  std::unique_ptr<LlamaModel> tensor_parallel_shard(comm::Communicator& comm) const;
  // Makes this model, built from a TensorParallelPlan's piece_config() and the rank's pieces of the
  // block linears (the rank-local loader, io/tensor_parallel_load.h), rank comm.rank()'s piece:
  // o_proj and down_proj become RowParallelLinear (all-reduced). The refusals of
  // tensor_parallel_shard (transforms, already a piece).
  void join_tensor_parallel(comm::Communicator& comm);
  // The communicator of a tensor-parallel piece, else null.
  comm::Communicator* tensor_parallel() const { return tp_; }

  // Rotation (online parts) and activation / KV-cache quantization (model/rotation.h), applied by
  // every forward path (block_forward, forward_cached, forward_batch). The rotated weights
  // themselves are ordinary weights (rotate_weights). Checked against the config (throws).
  // Activation and KV quantization are inference settings: their gradients pass straight through
  // (activations) or do not exist (KV quantization; the keys/values then get no gradient).
  void set_transforms(ModelTransforms t);
  const ModelTransforms& transforms() const { return transforms_; }
  // Calibration of KV quantizers (methods/kv_cq.h): while set, block_forward without a cache calls
  // it with each layer's keys and values as a KV quantizer reads them — after RoPE (and a rotated
  // model's per-head rotation, which KV quantization switches on), f32 [B*T, KVH*hd] — before it
  // attends. Empty: none.
  using KVObserver = std::function<void(int layer, const Tensor& k, const Tensor& v)>;
  void set_kv_observer(KVObserver f) { kv_observer_ = std::move(f); }

 private:
  // RoPE at the cache's positions, append k/v of T tokens to layer i of the cache, attend (batch 1).
  Var attend_cached(int i, Var q, Var k, const Var& v, int64_t T, KVCache& cache) const;
  // The SwiGLU half of block i after the attention residual x1.
  Var block_mlp(int i, const Var& x1) const;
  // The input of a linear layer: fake-quantized per token under activation quantization.
  Var act_in(const Var& x, int layer, int point) const;  // point: ActPoint
  // k_proj / v_proj outputs [M, KVH*hd]: fake-quantized per (token, head) under kv_token_bits.
  Var kv_token_in(const Var& x) const;
  // The SwiGLU output m [M, F] as down_proj reads it: times R_F when the model is rotated.
  Var down_in(const Var& m) const;
  // The attention output [M, heads*hd] as o_proj reads it: times the o_in rotation (H-BitLinear).
  Var o_in(const Var& att) const;
  // Queries/keys [M, heads*hd] times R_h per head (KV quantization — simulated, or a packed cache:
  // kv_quantized — of a rotated model), else x.
  Var rotate_heads(const Var& x, bool kv_quantized) const;
  // attend_cached for packed caches: appends and attends in runs of queries that see the same
  // number of packed tokens (the simulated path's runs), so both compute the same numbers.
  Tensor attend_packed(int i, const Tensor& q, const Tensor& k, const Tensor& v, int64_t T, KVCache& cache) const;

  LlamaBlock make_block(const LayerWeights& l, bool trainable) const;

  LlamaConfig config_;
  ModelTransforms transforms_;
  KVQuantSpec kv_layout_;
  Var tok_embeddings_, final_norm_, output_;
  std::vector<LlamaBlock> blocks_;
  std::shared_ptr<Linear> packed_output_;
  EmbedRowFn packed_embed_row_;
  EmbedIdsFn packed_embed_ids_;
  comm::Communicator* tp_ = nullptr;  // tensor_parallel_shard
  KVObserver kv_observer_;
};

}  // namespace lowbit
