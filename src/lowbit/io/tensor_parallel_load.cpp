#include "lowbit/io/tensor_parallel_load.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <vector>

#include "lowbit/core/error.h"
#include "lowbit/io/checkpoint.h"
#include "lowbit/io/gguf.h"

namespace fs = std::filesystem;

namespace lowbit {

int64_t LinearSource::column_unit(std::string* kind) const {
  if (dense_rows) {
    *kind = "dense";
    return 1;
  }
  const QuantizedTensor one = packed_rows(0, 1);  // the format's unit: one row says it
  *kind = one.fmt().name;
  return one.column_shard_unit();
}

namespace {
// Rows of `parts` (pieces of consecutive rows, same format and columns) as one tensor.
QuantizedTensor concat_rows(const std::vector<QuantizedTensor>& parts) {
  QuantizedTensor q = parts.front();
  int64_t rows = 0;
  for (const auto& p : parts) rows += p.out_features();
  q.shape = {rows, parts.front().in_features()};
  auto cat = [&](Tensor QuantizedTensor::*field) {
    const Tensor& first = parts.front().*field;
    if (!first.defined()) return;
    Tensor out = Tensor::empty({rows, first.size(1)}, first.dtype());
    uint8_t* dst = static_cast<uint8_t*>(out.raw_data());
    for (const auto& p : parts) {
      const Tensor t = (p.*field).contiguous();
      std::memcpy(dst, t.raw_data(), t.nbytes());
      dst += t.nbytes();
    }
    q.*field = out;
  };
  cat(&QuantizedTensor::codes);
  cat(&QuantizedTensor::scales);
  cat(&QuantizedTensor::zeros);
  q.validate();
  return q;
}
}  // namespace

void read_linear_piece(const LinearSource& src, const ShardCut& cut, Tensor* dense, QuantizedTensor* packed,
                       int64_t chunk_bytes) {
  const bool rows = cut.axis == ShardAxis::Rows;
  const int64_t n = rows ? src.out : src.in;
  if (cut.begin < 0 || cut.begin >= cut.end || cut.end > n)
    throw_error("tensor parallelism: ", rows ? "output rows [" : "input columns [", cut.begin, ", ", cut.end,
                ") of a layer with ", n);
  if (rows) {
    if (src.dense_rows) *dense = src.dense_rows(cut.begin, cut.end);
    else *packed = src.packed_rows(cut.begin, cut.end);
    return;
  }
  // A column cut: every row is needed, a chunk of rows at a time, each cut by the in-memory slicer.
  const int64_t w = cut.end - cut.begin, chunk = std::max<int64_t>(1, chunk_bytes / (src.in * 4));
  if (src.dense_rows) {
    Tensor out = Tensor::empty({src.out, w});
    for (int64_t r = 0; r < src.out; r += chunk) {
      const int64_t r1 = std::min(src.out, r + chunk);
      const Tensor part = src.dense_rows(r, r1).slice(1, cut.begin, cut.end).contiguous();
      std::memcpy(out.data<float>() + r * w, part.data<float>(), part.nbytes());
    }
    *dense = out;
    return;
  }
  std::vector<QuantizedTensor> parts;
  for (int64_t r = 0; r < src.out; r += chunk)
    parts.push_back(src.packed_rows(r, std::min(src.out, r + chunk)).slice_cols(cut.begin, cut.end));
  *packed = parts.size() == 1 ? parts.front() : concat_rows(parts);
}

TensorParallelPlan tensor_parallel_plan(const LazyCheckpoint& lazy, int rank, int world) {
  return TensorParallelPlan(lazy.rest.dense.config, rank, world, [&](int i, const std::string& name, std::string* kind) {
    return lazy.linears.at("model.layers." + std::to_string(i) + "." + name).column_unit(kind);
  });
}

LazyCheckpoint open_checkpoint_lazily(const std::string& path) {
  if (is_lowbit_quantized_dir(path)) return open_quantized_dir_lazily(path);
  switch (detect_checkpoint_format(path)) {
    case CheckpointFormat::Llama2c: return open_llama2c_lazily(path);
    case CheckpointFormat::Gguf: return open_gguf_lazily(path, gguf_has_packed_linears(path));
    case CheckpointFormat::HfDir: {
      std::error_code ec;
      return open_hf_dir_lazily(fs::is_directory(path, ec) ? path : fs::path(path).parent_path().string());
    }
    case CheckpointFormat::Auto: break;
  }
  throw_error(path, ": unrecognised checkpoint format");
}

QuantizedCheckpoint load_tensor_parallel_piece(const std::string& path, int rank, int world, int64_t chunk_bytes) {
  return load_tensor_parallel_piece(open_checkpoint_lazily(path), rank, world, chunk_bytes);
}

QuantizedCheckpoint load_tensor_parallel_piece(LazyCheckpoint lazy, int rank, int world, int64_t chunk_bytes) {
  const TensorParallelPlan plan = tensor_parallel_plan(lazy, rank, world);
  QuantizedCheckpoint q = std::move(lazy.rest);
  auto own = [](const Tensor& t) { return t.is_contiguous() ? t.clone() : t.contiguous(); };
  for (int i = 0; i < q.dense.config.n_layers; ++i) {
    LayerWeights& l = q.dense.weights.layers.at(size_t(i));
    const struct {
      const char* name;
      Tensor* w;
      Tensor* b;
    } lins[] = {{"self_attn.q_proj", &l.wq, &l.bq}, {"self_attn.k_proj", &l.wk, &l.bk}, {"self_attn.v_proj", &l.wv, &l.bv},
                {"self_attn.o_proj", &l.wo, nullptr}, {"mlp.gate_proj", &l.w_gate, nullptr},
                {"mlp.up_proj", &l.w_up, nullptr}, {"mlp.down_proj", &l.w_down, nullptr}};
    for (const auto& lin : lins) {
      const std::string m = "model.layers." + std::to_string(i) + "." + lin.name;
      const ShardCut cut = plan.cut(lin.name);
      const bool rows = cut.axis == ShardAxis::Rows;
      Tensor d;
      QuantizedTensor p;
      read_linear_piece(lazy.linears.at(m), cut, &d, &p, chunk_bytes);
      if (d.defined()) {
        *lin.w = d;
      } else {
        *lin.w = zero_placeholder(p.shape);
        q.quantized[m] = std::move(p);
      }
      // Biases and adapters as Linear::shard cuts them (QuantLinear::shard, DenseLinear::shard).
      if (lin.b && lin.b->defined()) *lin.b = rows ? own(lin.b->slice(0, cut.begin, cut.end)) : cut.begin == 0 ? *lin.b : Tensor();
      if (auto it = q.lora.find(m); it != q.lora.end()) {
        LoraAdapters& ad = it->second;
        if (rows) ad.B = own(ad.B.slice(0, cut.begin, cut.end));
        else ad.A = own(ad.A.slice(1, cut.begin, cut.end));
      }
    }
  }
  q.dense.config = plan.piece_config();
  return q;
}

}  // namespace lowbit
