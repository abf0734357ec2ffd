// The operand quantizer of low-precision training (issue 18; autograd/lp_linear.h): quantize and
// dequantize a 2-D GEMM operand x [rows, cols] into y (same shape and dtype), the emulated numerics
// of FP8 and FP4 training — the GEMMs themselves then run on the dequantized values in f32.
//
//   1. with spec.rht_axis >= 0: the randomized Hadamard transform of ops/lp_quant_math.h on groups
//      of rht_size values along that axis (y = H D x per group);
//   2. amax = max |y| over the tensor;
//   3. per-tensor formats (E4M3, E5M2): s = spec.tensor_scale, or amax / max when it is 0;
//      y = s q(y / s) (round to nearest even, saturating);
//      BF16: y = bf16(y); None: y as it is;
//   4. tile formats: the tensor is cut into tile_rows x tile_cols tiles; each tile's amax gives its
//      decode scale S (lp::tile_scale: MXFP4 a power of two, NVFP4 an E4M3 value times the tensor
//      scale g = amax / (448 * 6)); y = S e2m1(y / S), rounded to nearest even or stochastically
//      (element k = r * cols + c draws lp::uniform(spec.seed, k)).
//
// stats (optional) receives the amax of step 2 and the tensor-level scale used (s, g, or 0): the
// delayed-scaling history of FP8 training records the amax. A tensor holding NaN or inf gives NaN
// values (training then stops with its divergence error).
//
// Bodies: CPU (f32, f64 — computed in f32, as the CUDA body, via lp_quant_math.h; f64 only for
// gradient checks of the high-precision path) and CUDA (f32, ops/cuda/lp_quant.cu: one thread per
// Hadamard group and per tile, one pass for the amax; the same arithmetic bit for bit). No backward:
// autograd/lp_linear.h passes gradients straight through.
#pragma once
#include "lowbit/core/tensor.h"
#include "lowbit/ops/lp_quant_math.h"

namespace lowbit::ops {

struct LpQuantStats {
  double amax = 0;          // max |x| (after the Hadamard transform)
  double tensor_scale = 0;  // s (E4M3/E5M2) or g (NVFP4) used; 0 for the other formats
};

void lp_quantize(const Tensor& x, const LpQuantSpec& spec, Tensor& y, LpQuantStats* stats = nullptr);

// "none", "bf16", "e4m3", "e5m2", "mxfp4", "nvfp4"
const char* lp_format_name(LpFormat f);

}  // namespace lowbit::ops
