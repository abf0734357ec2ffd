// Read by nvcc too (C++17): the scaling formula below runs in the CUDA rope kernel as on the CPU.
#pragma once
#include <cstdint>
#include <vector>

#if defined(__CUDACC__)
#define LB_ROPE_HD __host__ __device__
#else
#define LB_ROPE_HD
#endif

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
  LB_ROPE_HD bool active() const { return factor > 0; }
};

// One inverse frequency f = theta^(-2i/hd) after the scaling (f itself when inactive); the one
// formula of the CPU tables (rope_inv_freq) and of the CUDA kernel.
LB_ROPE_HD inline double rope_scaled_freq(double f, const RopeScaling& s) {
  if (!s.active()) return f;
  const double pi = 3.14159265358979323846;
  const double wavelen = 2 * pi / f;
  if (wavelen > s.original_max_position / s.low_freq_factor) return f / s.factor;  // interpolated by the full factor
  if (wavelen < s.original_max_position / s.high_freq_factor) return f;             // high frequencies kept
  const double smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
  return (1 - smooth) * f / s.factor + smooth * f;
}

// Inverse frequency of each of the hd/2 channel pairs: theta^(-2i/hd), then the scaling.
std::vector<double> rope_inv_freq(double theta, int64_t hd, const RopeScaling& scaling = {});

}  // namespace lowbit
