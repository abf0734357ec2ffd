// The quantization grid of one ggml block, for methods that round one weight at a time (GPTQ's
// column sweep) instead of a whole row at once (quantize_row).
//
// Formats with one scale (and, for q4_1/q5_1, one min) per 32-value block: q4_0, q4_1, q5_0, q5_1,
// q8_0 and iq4_nl. Without an importance a block's parameters are fitted exactly as llama.cpp's
// reference quantizer does (f.quantize_row on the block's 32 current values: q4_0/q5_0 d = signed
// extreme / -8 (-16), q8_0 d = absmax / 127, q4_1/q5_1 d = (max - min) / 15 (31) and m = min, iq4_nl
// ggml's scale search over the non-uniform levels). With an importance h (GPTQ: diag(H); RTN / AWQ
// --weighted-round: the mean x^2 of the calibration inputs), every one of these types keeps the
// reference d (m) unless another candidate has a lower error weighted by h_i sqrt(2 mean(x^2) +
// x_i^2) on the stored grid: the least-squares scales of 81 trial grids -(8 + 0.05 is) / signed
// extreme (q5_0: 16; q8_0: (127 + 0.05 is) / absolute maximum), is = -40..40, or of 82 iq4_nl
// grids +-(v_0 - 0.5 is) / signed extreme, is = -20..20 (v_0 = -127, the nearest non-uniform levels;
// llama.cpp's imatrix search tries v_0 + -7..7 and -v_0), each refitted twice on the stored grid
// (levels of the f16 scale, then their least-squares scale), or ggml's make_qkx2 search over 81
// grids (q4_1/q5_1). (llama.cpp's q8_0 ignores an importance matrix.)
// The parameters are stored as f16 in the block; then each value is rounded on its own to the
// grid of the STORED (f16) parameters:
//   q4_0 q = clamp(trunc(x/d + 8.5), 0, 15)     w = d (q - 8)
//   q5_0 q = clamp(trunc(x/d + 16.5), 0, 31)    w = d (q - 16)
//   q4_1 q = clamp(trunc((x-m)/d + 0.5), 0, 15) w = d q + m      (q5_1: 31)
//   q8_0 q = clamp(round(x/d), -127, 127)       w = d q
//   iq4_nl q = the nearest of the 16 levels v_k to x/d,          w = d v_q
// and its code is written into the block, so the block dequantizes (dequantize_row) to exactly the
// values returned.
//
// The k-quants q2_k, q3_k, q4_k, q5_k, q6_k (a super-block of 256 values; sub-blocks of 16 or 32,
// each with a quantized scale — and, for the affine types, a quantized min — against the block's f16
// super-scale d (and dmin)). Their stored grid, per sub-block s (value i, code q):
//   q2_k: 16 x 16, w = (d sc_s) q - (dmin m_s),  q 0..3,  sc_s, m_s 4-bit (0..15)
//   q4_k:  8 x 32, w = (d sc_s) q - (dmin m_s),  q 0..15, sc_s, m_s 6-bit (0..63)
//   q5_k:  8 x 32, the same with q 0..31
//   q3_k: 16 x 16, w = (d sc_s) (q - 4),         q 0..7,  sc_s signed 6-bit (-32..31)
//   q6_k: 16 x 16, w = (d sc_s) (q - 32),        q 0..63, sc_s int8 (-128..127)
// A method that rounds one weight at a time (GPTQ) uses the grid in three steps, every number being
// the one the file stores (no re-rounding at export):
//   1. ggml_grid_fit_block, when the sweep reaches the block's first value: each sub-block's
//      unquantized scale (and min) is searched on the current values, weighted (with an importance,
//      GPTQ's Hessian diagonal h_i: h_i sqrt(2 mean(x^2) + x_i^2), the form llama.cpp gives its
//      imatrix search; without, the reference quantizer's weights). Affine types: ggml's
//      make_qkx2 search (ggml_quants.h); signed types: the least-squares scale over 19 trial grids.
//      d = the largest sub-scale / 63 (q2_k: 15; q3_k: / -32, q6_k: / -128, as the reference),
//      dmin = the largest min / 63 (15), both rounded to f16 and stored; then each sub-block's
//      6-/4-/8-bit scale (and min) is the integer within 2 of round(scale / d) (round(min / dmin))
//      whose grid has the least weighted error on the sub-block's values, and is stored.
//   2. ggml_grid_refit_sub_block, when the sweep reaches a later sub-block's first value: d / dmin
//      stay as stored, the sub-block's own scale (and min) is fitted again as in 1 on its values as
//      updated by the error feedback so far (as GPTQ refits a group when it enters it).
//   3. ggml_grid_round: each value is rounded to the nearest point of its sub-block's stored grid
//      (code q = clamp(round((x + dmin m) / (d sc))) or clamp(round(x / (d sc))) + offset), the code
//      is written into the block and the value returned is the one dequantize_row gives (the same
//      f32 operations in the same order).
// iq4_xs and the ternary tq1_0 / tq2_0 have no such grid here: methods use their reference
// quantize_row (RTN).
//
// How each method maps onto these grids:
//   RTN      the reference quantize_row (llama-quantize without an importance matrix), bit for bit.
//   GPTQ     the column sweep above: 32-value types fit each block when the sweep enters it (the
//            reference rule, or with diag(H) the weighted candidate search), k-quants steps 1-3
//            (d/dmin fixed at the super-block's first column, each sub-block's 6-/4-/8-bit scale and
//            min refitted when entered); every value rounded on the stored grid, error fed back.
//   AWQ      channel scales folded into the producers, then the format's quantize_row.
//   ApiQ / SAPR (learnable clipping, quant/lwc.h "ggml block formats"; lwc_ggml.cpp): one clipping
//            logit pair per clipping group = the 32-value block (q4_0, q4_1, q5_0, q5_1, q8_0) or
//            the k-quant sub-block (16 values q2_k/q3_k/q6_k, 32 values q4_k/q5_k). The clipped
//            range gives each sub-block's continuous scale (and min: q4_1/q5_1 m, affine k-quants
//            dmin m_s); ggml_grid_set_params then stores them as the file will: the 32-value
//            types' f16 d (and m); the k-quants' f16 d = largest scale / 63 (q2_k 15, q3_k the
//            largest |scale| / -32, q6_k / -128) and dmin, and each sub-block's integer scale/min
//            code nearest to scale / d (min / dmin). The values are rounded on that stored grid
//            (ggml_grid_round_block, the same rule as GPTQ), INSIDE the training forward; the
//            backward is straight-through (rounding of values, of the f16 d/dmin and of the
//            sub-block codes held). Training starts on the reference quantizer's grid
//            (lwc_ggml_init_from_rtn), and the trained layer is encoded by the forward's own code,
//            so the GGUF holds exactly the tensor the trained fake-quant forward computed. LoRA
//            adapters cannot live in a GGUF block tensor: -o FILE.gguf trains clipping only
//            (--rank 0) unless the layers are merged into dense ones (--lora merge). iq4_nl
//            (non-uniform levels), iq4_xs and tq1_0/tq2_0 have no learnable clipping.
#pragma once
#include <cstdint>

#include "lowbit/quant/format.h"

namespace lowbit {

// True for q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl and the k-quants q2_k, q3_k, q4_k, q5_k, q6_k.
bool ggml_block_grid_supported(const QuantFormat& f);
// The formats above, for messages: "q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl, q2_k, ...".
const char* ggml_block_grid_names();
// Values per sub-block: 16 (q2_k, q3_k, q6_k), 32 (q4_k, q5_k); the block size (32) for the others.
int ggml_grid_sub_block_size(const QuantFormat& f);

// Fits the parameters of one block (f.group_size values of x) into `block` (f.block_bytes bytes),
// codes included. 32-value types: ggml's reference rule and rounding (quantize_row_*_ref), or with
// `importance` the weighted choice above (q4_0, q5_0, q4_1, q5_1, q8_0, iq4_nl). k-quants: step 1 above,
// `importance` (f.group_size values, >= 0, or null) weighting the search.
void ggml_grid_fit_block(const QuantFormat& f, const float* x, uint8_t* block, const float* importance = nullptr);

// k-quants only: refits the stored scale (and min) of sub-block s (0 <= s < 256 / sub-block size)
// from x (its sub-block-size values) given the block's stored d / dmin, and writes their codes.
void ggml_grid_refit_sub_block(const QuantFormat& f, uint8_t* block, int s, const float* x,
                               const float* importance = nullptr);

// Learnable clipping (ApiQ / SAPR, quant/lwc.h) on the same grids: the block's parameters come from
// given unquantized per-sub-block scales (and mins) instead of a search, then every value is rounded
// with ggml_grid_round's rule. ggml_grid_set_params stores, for sub-block s (n_sub = 256 / sub-block
// size for the k-quants, 1 for the 32-value types):
//   32-value types: d = f16(scale[0]) (q4_1 / q5_1: m = f16(min[0]), the value of code 0)
//   affine k-quants (q2_k, q4_k, q5_k; min[s] >= 0, w = d sc q - dmin m):
//       d = f16(max_s scale[s] / sc_hi), dmin = f16(max_s min[s] / sc_hi), sc_hi = 63 (q2_k: 15),
//       sc_s = clamp(nearbyint(scale[s] / d), 0, sc_hi), m_s = clamp(nearbyint(min[s] / dmin), 0, sc_hi)
//   signed k-quants (q3_k, q6_k): d = f16(scale[t] / sc_lo), t the sub-block of largest |scale|,
//       sc_lo = -32 (q6_k: -128), sc_s = clamp(nearbyint(scale[s] / d), sc_lo, sc_hi)
// (the plain nearest sub-scale: no search, so that a straight-through gradient sees one rounding).
void ggml_grid_set_params(const QuantFormat& f, uint8_t* block, const float* scale, const float* min);
// The stored parameters of sub-block s as the dequantizer uses them: value = step * (q - off) - shift
// (32-value affine types: step * q + m, i.e. shift = -m), with step = d * sc_s (the f32 product of
// dequantize_row; 32-value types: d), shift = dmin * m_s; the integer sub-scale and min codes, the
// block's f16 d and dmin as f32.
struct GgmlSubParams {
  float d = 0, dmin = 0, step = 0, shift = 0;
  int sc = 1, m = 0;
};
GgmlSubParams ggml_grid_sub_params(const QuantFormat& f, const uint8_t* block, int s);
// Rounds the f.group_size values x to the stored grid of `block` (ggml_grid_round's rule for every
// value), writes their codes and returns in y the values the block dequantizes to (bit-identical with
// f.dequantize_row). y may alias x.
void ggml_grid_round_block(const QuantFormat& f, uint8_t* block, const float* x, float* y);

// Rounds x to the stored grid of `block` at position j (0 <= j < f.group_size), stores the code in the
// block and returns the value it dequantizes to (bit-identical with f.dequantize_row).
float ggml_grid_round(const QuantFormat& f, uint8_t* block, int j, float x);

}  // namespace lowbit
