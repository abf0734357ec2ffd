#pragma once
#include <cstdint>
#include <vector>

namespace lowbit {

// How rotary embeddings pair the channels of a head.
//  Interleaved: (x[2i], x[2i+1]) — Meta's original layout, llama2.c, GGUF "llama".
//  Half:        (x[i], x[i + d/2]) — Hugging Face "rotate_half" layout (HF Llama/Qwen checkpoints,
//               GGUF "qwen2"). HF Llama q/k weights are the Meta ones with rows permuted, so the
//               two conventions give identical logits on their respective weight layouts.
enum class RopeStyle { Interleaved = 0, Half = 1 };

// Frequency scaling of Hugging Face rope_scaling {"rope_type": "llama3", ...} (Llama 3.1 / 3.2):
// wavelengths longer than original_max_position / low_freq_factor are divided by `factor`,
// shorter than original_max_position / high_freq_factor kept, and those between interpolated
// (transformers' _compute_llama3_parameters). factor == 0: no scaling.
struct RopeScaling {
  double factor = 0, low_freq_factor = 1, high_freq_factor = 4, original_max_position = 8192;
  bool active() const { return factor > 0; }
};

// Inverse frequency of each of the hd/2 channel pairs: theta^(-2i/hd), then the scaling.
std::vector<double> rope_inv_freq(double theta, int64_t hd, const RopeScaling& scaling = {});

}  // namespace lowbit
