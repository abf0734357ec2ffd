// The GPU path of gptq_quantize (gptq.h): the integer formats (asymmetric and symmetric, grouped
// and per-channel, act-order with static groups) run on the GPU through ops/cuda/gptq.cu; the
// other formats (ternary, mxfp4, nvfp4) and block sizes above 128 stay on the CPU reference.
// gptq_quantize dispatches here by itself when the weight or the Hessian lives on cuda.
#pragma once
#include <string>

#include "lowbit/methods/gptq.h"

namespace lowbit {

// True when gptq_quantize_cuda handles (f, opt) in this build; else `why` (if given) says why not.
bool gptq_cuda_supports(const QuantFormat& f, const GptqOptions& opt, std::string* why = nullptr);

// GPTQ on the GPU (init_cuda() must have succeeded). w [out, in] and h [in, in] may live on
// either device (they are copied to cuda when needed); any float dtype. Returns the same
// QuantizedTensor layout as the CPU path (on the CPU), plus the dequantized weight on cuda in
// GptqResult::dequantized. Throws lowbit::Error for unsupported formats, malformed inputs and a
// Hessian that stays indefinite after dampening.
GptqResult gptq_quantize_cuda(const Tensor& w, const Tensor& h, const QuantFormat& f, const GptqOptions& opt = {});

}  // namespace lowbit
