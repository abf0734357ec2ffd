// Floating-point fake quantization of activations (issue 16), per row (token), dynamic:
//   Fp8E4M3: s = clip * max|x_row| / 448,  y = e4m3(x / s) s   (E4M3 "fn", round to nearest even, saturating)
//   Fp4Mx:   blocks of 32 channels, OCP MX: X = 2^(floor(log2(clip * max|x_block|)) - 2) (an e8m0 scale),
//            y = e2m1(x / X) X   (E2M1, round to nearest even, saturates at 6)
//   Fp4Nv:   blocks of 16 channels, NVFP4: g = clip * max|x_row| / (448 * 6) (f32, per token),
//            s_b = e4m3(clip * max|x_block| / 6 / g),  y = e2m1(x / (s_b g)) s_b g
// (a row's last block may be shorter). An all-zero row or block stays zero; clip in (0, 1]. The
// element and scale codecs are the format table's (core/format_traits.h). No backward (callers
// pass gradients straight through). CPU only, f32/f64.
#pragma once
#include <cstdint>

#include "lowbit/core/tensor.h"

namespace lowbit::ops {

enum class FpActFormat : int { Fp8E4M3 = 1, Fp4Mx = 2, Fp4Nv = 3 };
int64_t fp_act_block(FpActFormat f);  // channels per block scale: 32 (MX), 16 (NV), 0 (FP8: the row)
void fp_fake_quant(const Tensor& x, FpActFormat format, double clip, Tensor& y);

}  // namespace lowbit::ops
