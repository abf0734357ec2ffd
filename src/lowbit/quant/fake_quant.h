// Fake quantization as a differentiable op, for quantization-aware training and learnable clipping.
#pragma once
#include "lowbit/autograd/variable.h"
#include "lowbit/quant/format.h"

namespace lowbit {

// Forward: RTN quantize-then-dequantize of w [out, in] (or [n]) in format f (quant/quantize.h
// fake_quantize), computed on the CPU and returned on w's device in w's dtype.
// Backward: the straight-through estimator (Bengio, Leonard, Courville 2013; as used for QAT in
// BitNet b1.58 and LLM-QAT): d(fake_quant(w))/dw is taken as the identity, so the gradient passes
// through unchanged, including for weights clipped by the grid.
Var fake_quant(const Var& w, const QuantFormat& f);

}  // namespace lowbit
