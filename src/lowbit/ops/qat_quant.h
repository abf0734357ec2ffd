// The weight quantizers of quantization-aware training as ops (issue 14): LSQ / LSQ+ fake
// quantization (quant/lsq.h), ParetoQ's sign / SEQ fake quantization (quant/paretoq.h) and
// EfficientQAT's E2E-QP dequantization of frozen integer codes (group_scale). quant/lsq.cpp and
// quant/paretoq.cpp build their autograd functions on these; the formulas are stated there and
// computed once in ops/qat_quant_math.h.
//
// Layout: w, y, dy, dw, codes [out, in]; step, offset, alpha and their gradients [out, G], one per
// quantization group of the format f (f.n_groups(in), groups along `in`); all contiguous, one
// dtype and one device. offset is undefined for symmetric formats. Outputs are allocated here (on
// w's device); a null dw / doffset is not computed.
//
// Bodies: CPU (f32, f64: the reference, and the f64 finite-difference checks) and CUDA (f32,
// ops/cuda/qat_quant.cu: one warp per group, the group sums of the backward in warp shuffles; parity
// cells in tests/ops/test_parity.cpp). The op runs on the device of w.
#pragma once
#include "lowbit/core/tensor.h"
#include "lowbit/ops/qat_quant_math.h"

namespace lowbit::ops {

// y = Q_lsq(w; step, offset). slice r (0 < r < f.bits, asymmetric formats; MatQuant,
// quant/matryoshka.h): y is the r-bit Matryoshka slice of the codes on the c-bit grid,
// (S(q, r) 2^(c-r) - zr) s, with the straight-through gradients of quant/lsq.h on the sliced grid
// [0, 2^c - 2^(c-r)] (CPU and CUDA bodies: the same per-element arithmetic).
void lsq_quant_forward(const Tensor& w, const Tensor& step, const Tensor& offset, const FormatTraits& f, Tensor& y,
                       int slice = 0);
// dw (STE), dstep = grad_scale · Σ_group, doffset = grad_scale · Σ_group (asymmetric formats).
void lsq_quant_backward(const Tensor& w, const Tensor& step, const Tensor& offset, const Tensor& dy,
                        const FormatTraits& f, double grad_scale, Tensor* dw, Tensor& dstep, Tensor* doffset,
                        int slice = 0);

// y = Q_seq(w; alpha) on grid q.
void seq_quant_forward(const Tensor& w, const Tensor& alpha, const SeqGrid& q, const FormatTraits& f, Tensor& y);
void seq_quant_backward(const Tensor& w, const Tensor& alpha, const Tensor& dy, const SeqGrid& q, const FormatTraits& f,
                        double grad_scale, Tensor* dw, Tensor& dalpha);

// y[r, j] = codes[r, j] · step[r, g(j)];  dstep[r, g] = Σ_{j in g} codes[r, j] · dy[r, j].
// codes: of the step's (dy's) float dtype, or I8 (integer codes, one byte a weight: E2E-QP's frozen
// codes, quant/lsq_linear.h); y takes the step's dtype, dstep dy's. y passed in as a bf16 tensor of
// the codes' shape and device, with an f32 step: the product rounded to bf16 as it is written (the
// operand of a bf16 GEMM under autocast: the CUDA kernel stores bf16, the CPU body rounds).
void group_scale_forward(const Tensor& codes, const Tensor& step, const FormatTraits& f, Tensor& y);
void group_scale_backward(const Tensor& codes, const Tensor& dy, const FormatTraits& f, Tensor& dstep);

}  // namespace lowbit::ops
