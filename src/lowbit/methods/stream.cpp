#include "lowbit/methods/stream.h"

#include <malloc.h>

#include <cmath>
#include <vector>

#include "lowbit/io/weight_names.h"

namespace lowbit {

HfBlockStream::HfBlockStream(std::shared_ptr<const HfTensorSource> source, Device device, std::string parts_dir,
                             const QuantFormat& format, LoraStorage lora, DType merged_dtype)
    : source_(std::move(source)),
      device_(device),
      writer_(std::move(parts_dir), source_->config(), format, lora, merged_dtype) {
#ifdef __GLIBC__
  // A fixed mmap threshold: every allocation of 128 KiB or more is its own mapping, given back to
  // the system when freed. glibc's default raises the threshold to the size of freed large blocks,
  // after which they come from heaps whose freed pieces stay resident: GPTQ's peak then crept up
  // over the first blocks (+130 MiB by block 16 on a 1536-wide model; 127.6 vs 218.8 MiB on a
  // 512-wide one, docs/results/streaming.md). Process-wide; numbers are unchanged.
  mallopt(M_MMAP_THRESHOLD, 128 * 1024);
#endif
}

LayerWeights HfBlockStream::placeholder_layer(int i) const {
  LlamaWeights w;
  const std::string prefix = "model.layers." + std::to_string(i) + ".";
  for (auto& slot : io::weight_slots(source_->config(), w))
    if (slot.hf_name.compare(0, prefix.size(), prefix) == 0) *slot.tensor = zero_placeholder(slot.shape);
  return std::move(w.layers.at(size_t(i)));
}

std::unique_ptr<LlamaModel> HfBlockStream::make_model() const {
  LlamaWeights w;
  for (auto& slot : io::weight_slots(source_->config(), w)) *slot.tensor = zero_placeholder(slot.shape);
  return std::make_unique<LlamaModel>(source_->config(), w, false, /*check_values=*/false);
}

Tensor HfBlockStream::embed(const Tensor& tokens) {
  const LlamaConfig& c = source_->config();
  const std::string name = "model.embed_tokens.weight";
  const SafetensorsFile& f = source_->file_of(name);
  const Shape want{c.vocab_size, c.dim};
  if (f.find(name)->shape != want)
    throw_error(f.path(), ": tensor '", name, "' has shape ", shape_str(f.find(name)->shape), ", the config needs ",
                shape_str(want));
  const Tensor ids = tokens.contiguous().to(Device::CPU);
  const int64_t n = ids.numel(), D = c.dim;
  Tensor out = Tensor::empty({n, D});
  float* o = out.data<float>();
  for (int64_t r = 0; r < n; ++r) {
    const int64_t id = ids.data<int32_t>()[r];
    if (id < 0 || id >= c.vocab_size)
      throw_error("embed: token id ", id, " at position ", r, " is outside the vocabulary [0, ", c.vocab_size, ")");
    f.read_f32(name, id * D, D, o + r * D);
    for (int64_t k = 0; k < D; ++k)
      if (!std::isfinite(o[r * D + k]))
        throw_error(f.path(), ": tensor '", name, "' has a non-finite value (", o[r * D + k], ") at index ", id * D + k);
  }
  return out.to(device_);
}

void HfBlockStream::load(LlamaModel& model, int i) {
  LayerWeights l = source_->read_layer(i);
  if (device_ != Device::CPU)
    for (Tensor* t : {&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo, &l.bq, &l.bk, &l.bv, &l.q_norm, &l.k_norm, &l.ffn_norm,
                      &l.w_gate, &l.w_down, &l.w_up})
      if (t->defined()) *t = t->to(device_);
  model.set_block(i, l);
}

void HfBlockStream::finish(LlamaModel& model, int i, const std::string& key) {
  writer_.write_block(model, i, {{"key", key}, {"block", std::to_string(i)}});
  model.set_block(i, placeholder_layer(i));
#ifdef __GLIBC__
  // The block's memory back to the system: freed blocks of glibc's heap stay resident otherwise
  // (its mmap threshold grows to the size of freed large tensors, so the next block's tensors come
  // from the heap, which fragments: +0.8 MB per 3.4 MB block measured on 32 blocks without this).
  malloc_trim(0);
#endif
}

void HfBlockStream::check_finished(int start, const std::string& key) const {
  for (int i = 0; i < start; ++i)
    if (!writer_.has_block(i, key))
      throw_error(writer_.part_path(i), ": block ", i, " of the resumed run is missing or was written by another run; "
                  "remove the state directory to start again");
}

void HfBlockStream::assemble(const std::string& dir, const std::string& method, const nlohmann::json& extra,
                             const ModelTransforms& transforms) const {
  auto dense = [this](const std::string& name, const Shape& shape, const std::function<void(const void*, size_t)>& out) {
    const SafetensorsFile& f = source_->file_of(name);
    if (f.find(name)->shape != shape)
      throw_error(f.path(), ": tensor '", name, "' has shape ", shape_str(f.find(name)->shape), ", the config needs ",
                  shape_str(shape));
    const int64_t n = shape_numel(shape);
    constexpr int64_t kChunk = 1 << 20;
    std::vector<float> buf(size_t(std::min(n, kChunk)));
    for (int64_t at = 0; at < n; at += kChunk) {
      const int64_t k = std::min(kChunk, n - at);
      f.read_f32(name, at, k, buf.data());
      for (int64_t j = 0; j < k; ++j)
        if (!std::isfinite(buf[size_t(j)]))
          throw_error(f.path(), ": tensor '", name, "' has a non-finite value (", buf[size_t(j)], ") at index ", at + j);
      out(buf.data(), size_t(k) * sizeof(float));
    }
  };
  writer_.assemble(dir, method, extra, transforms, dense);
}

}  // namespace lowbit
