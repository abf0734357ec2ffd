// Block-wise streaming of a Hugging Face safetensors model (one file or shards) through the
// quantization pipeline (pipeline.h's BlockStream), so that a model larger than host memory can
// be quantized: the pipeline holds one decoder block's full-precision weights at a time, plus the
// calibration activations, whatever the model's depth.
//
//   * The model handed to run_blockwise is made of placeholders (io/quantized_checkpoint.h's
//     zero_placeholder: address space, no memory); the pipeline's embed() reads the embedding rows
//     of the calibration tokens only.
//   * load(i) reads block i's tensors with pread (SafetensorsFile::read_f32), converts them to f32
//     exactly as the resident loader does and moves them to the device. pread, not the mapping:
//     pages of a mapped file that the process touches count in its resident set until they are
//     unmapped (or dropped with madvise), while pread leaves them in the page cache only, which
//     the kernel reclaims as it needs; the mapping stays for the headers.
//   * finish(i) writes the quantized block to its part file (QuantizedBlockWriter, atomic) in the
//     state directory and puts placeholders back; assemble() writes the checkpoint from the parts
//     at the end, the vocabulary and final norm streamed from the input: byte for byte the file the
//     resident path writes.
//   * Resume: the parts are the finished blocks; the pipeline's state file holds the activations.
#pragma once
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "lowbit/io/hf.h"
#include "lowbit/io/quantized_checkpoint.h"
#include "lowbit/methods/pipeline.h"

namespace lowbit {

class HfBlockStream : public BlockStream {
 public:
  // Part files go to parts_dir (the run's state directory: they are its finished blocks).
  HfBlockStream(std::shared_ptr<const HfTensorSource> source, Device device, std::string parts_dir,
                const QuantFormat& format, LoraStorage lora = LoraStorage::Separate, DType merged_dtype = DType::F16);

  // The model to quantize: the source's config, every tensor a placeholder.
  std::unique_ptr<LlamaModel> make_model() const;

  Device device() const override { return device_; }
  Tensor embed(const Tensor& tokens) override;
  void load(LlamaModel& model, int i) override;
  void finish(LlamaModel& model, int i, const std::string& key) override;
  void check_finished(int start, const std::string& key) const override;

  // dir/model.safetensors + config.json from the finished blocks (QuantizedBlockWriter::assemble).
  void assemble(const std::string& dir, const std::string& method, const nlohmann::json& extra,
                const ModelTransforms& transforms) const;

 private:
  LayerWeights placeholder_layer(int i) const;

  std::shared_ptr<const HfTensorSource> source_;
  Device device_;
  QuantizedBlockWriter writer_;
};

}  // namespace lowbit
