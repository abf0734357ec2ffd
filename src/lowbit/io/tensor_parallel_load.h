// Rank-local loading for tensor parallelism (issue 20): rank r of W reads from the checkpoint only
// the rows / columns of each block linear that model/tensor_parallel.h's TensorParallelPlan gives it
// (pread at the file's offsets: those pages never become resident in the process), plus the
// replicated tensors (embedding, norms, output head, q/k/v biases cut by the plan; read as each
// format's whole-file loader reads them: HF and lowbit directories with pread, llama2.c and GGUF
// copied out of the mapping, GGUF's packed vocabulary kept mapped), so each rank's
// resident weights are about 1/W of the block linears plus the replicated part — instead of the
// whole model read by every rank and then cut (LlamaModel::tensor_parallel_shard, which stays the
// reference: the pieces are bit-identical to it, and it is the fallback for what is not read here).
//
//   rows (q/k/v, gate/up):   exactly those rows read (dense: converted to f32; packed: codes, scales
//                            and zeros of those rows, never re-rounded);
//   columns (o_proj, down):  the rows read in chunks of a few MiB, each chunk cut by the in-memory
//                            slicer (Tensor::slice, QuantizedTensor::slice_cols: on group boundaries),
//                            so only a chunk of the whole tensor is ever held.
//
// Formats: llama2.c .bin, Hugging Face safetensors directories, GGUF (dense F32/F16/BF16, block
// types read dequantized in a file load_model reads dense, and packed ggml block types with llama's
// q/k rows permuted per head as load_gguf_quantized does) and lowbit's quantized directories (packed
// and dense layers, LoRA adapters).
#pragma once
#include <functional>
#include <map>
#include <string>

#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/model/tensor_parallel.h"

namespace lowbit {

// Bytes of f32 rows read at a time where a whole matrix is needed in pieces (column cuts, the
// vocabulary packed at load).
constexpr int64_t kTensorParallelChunkBytes = int64_t(4) << 20;

// One block linear as stored, read on demand: rows [r0, r1) of its weight, dense (f32 [r1-r0, in])
// or packed (a QuantizedTensor of those rows, in the stored format). Exactly one of the two is set.
struct LinearSource {
  int64_t out = 0, in = 0;
  std::function<Tensor(int64_t r0, int64_t r1)> dense_rows;
  std::function<QuantizedTensor(int64_t r0, int64_t r1)> packed_rows;
  // The column unit (Linear::column_shard_unit of the layer it makes) and its kind for messages.
  int64_t column_unit(std::string* kind) const;
};

// A checkpoint opened for rank-local loading: everything but the block linears' weights loaded in
// `rest` (full config, embedding, norms, head, q/k/v biases whole, transforms; rest.dense's seven
// linear slots undefined), and the linears as sources by module name
// ("model.layers.3.self_attn.q_proj"), with their LoRA adapters (whole) in rest.lora.
struct LazyCheckpoint {
  QuantizedCheckpoint rest;
  std::map<std::string, LinearSource> linears;
};

// The per-format openers (in each format's .cpp). `packed`: GGUF only — true loads ggml block types
// packed with the vocabulary packed and q/k in the Hugging Face order (load_gguf_quantized's view,
// what inference uses), false the f32 view of load_gguf.
LazyCheckpoint open_llama2c_lazily(const std::string& path);
LazyCheckpoint open_hf_dir_lazily(const std::string& dir);
LazyCheckpoint open_gguf_lazily(const std::string& path, bool packed);
// pack_vocab: the vocabulary matrices packed as pack_vocab(q) packs them (Q8_0, what a CPU inference
// load does), read in chunks of chunk_bytes of f32 rows and packed chunk by chunk: never held in f32.
LazyCheckpoint open_quantized_dir_lazily(const std::string& dir, bool pack_vocab = false,
                                         int64_t chunk_bytes = kTensorParallelChunkBytes);

// The piece `cut` of a source (rows: read directly; columns: read in chunks of about chunk_bytes of
// f32 rows, each cut in memory). Dense pieces come as f32 weights in *dense, packed ones in *packed.
void read_linear_piece(const LinearSource& src, const ShardCut& cut, Tensor* dense, QuantizedTensor* packed,
                       int64_t chunk_bytes = kTensorParallelChunkBytes);

// Rank `rank` of `world`'s piece of the checkpoint at `path` (any format load_model reads without
// --dequantize): dense.config is the plan's piece config, dense.weights hold the replicated tensors
// and the dense linears' pieces (packed ones: zero placeholders of the piece's shape), quantized /
// lora the packed pieces. make_quantized_model builds the piece model from it, and
// LlamaModel::join_tensor_parallel makes it a rank's piece. Throws what tensor_parallel_shard
// throws for what does not split (and for checkpoints with transforms).
// chunk_bytes: as read_linear_piece (tests make it small to cut in many chunks).
QuantizedCheckpoint load_tensor_parallel_piece(const std::string& path, int rank, int world,
                                               int64_t chunk_bytes = kTensorParallelChunkBytes);
// The same from an opened checkpoint (the caller may first change lazy.rest, e.g. pack_vocab, so the
// dense vocabulary is released before the pieces are read).
QuantizedCheckpoint load_tensor_parallel_piece(LazyCheckpoint lazy, int rank, int world,
                                               int64_t chunk_bytes = kTensorParallelChunkBytes);
// The plan for the linears of an opened checkpoint.
TensorParallelPlan tensor_parallel_plan(const LazyCheckpoint& lazy, int rank, int world);
// The opener for `path` (by format: a lowbit quantized directory, a packed or dense GGUF file, a
// Hugging Face directory or safetensors file in one, a llama2.c .bin).
LazyCheckpoint open_checkpoint_lazily(const std::string& path);

}  // namespace lowbit
