#pragma once

namespace lowbit {

// How rotary embeddings pair the channels of a head.
//  Interleaved: (x[2i], x[2i+1]) — Meta's original layout, llama2.c, GGUF "llama".
//  Half:        (x[i], x[i + d/2]) — Hugging Face "rotate_half" layout (HF Llama/Qwen checkpoints,
//               GGUF "qwen2"). HF Llama q/k weights are the Meta ones with rows permuted, so the
//               two conventions give identical logits on their respective weight layouts.
enum class RopeStyle { Interleaved = 0, Half = 1 };

}  // namespace lowbit
