// Matryoshka Quantization (MatQuant; Nair, Datta, Dean, Jain, Kusupati 2025, "Matryoshka
// Quantization", arXiv 2502.06786): one set of int8 codes whose most significant bits are the int4
// and int2 (or int3) models.
//
//   Parent: an asymmetric int8 group format (int8g32 / int8g64 / int8g128): w = s (q - z), q in
//   [0, 255], f16 s and an integer z per group (quant/format.h).
//   Slice (paper §3, eq. 6): the r-bit code S(q, r) = clamp(round(q / 2^(8-r)), 0, 2^r - 1), the
//   rounding a rounded right shift with ties up (core/format_traits.h matryoshka_slice_code: the one
//   implementation), dequantized on the parent's grid with the parent's parameters:
//     w_r = s (S(q, r) 2^(8-r) - z)
//   which is exactly an ordinary int{r}g{G} tensor with codes S(q, r), scale s 2^(8-r) and zero
//   z / 2^(8-r) (a power-of-two multiple of an f16 scale and a multiple of 2^-6 below 256: both exact
//   in f16; a non-integer zero point is allowed by the int formats, quant/format.h). So a sliced
//   model is a normal packed model the kernels run as they are.
//   Training (qat --method matquant, methods/block_ap.h with widths): the loss of a step is
//   Σ_r λ_r L_r, L_r the block reconstruction error of the model whose every linear is the r-bit
//   slice of the same latent quantizer (quant/lsq.h lsq_fake_quant with a slice: straight-through
//   gradients through the rounding of the codes and of the slice). The sliced quantizer's forward
//   with the stored (f16) steps is bit for bit what matryoshka_slice of the encoded tensor decodes
//   (tests/quant/test_matryoshka.cpp).
#pragma once
#include <string>
#include <vector>

#include "lowbit/model/llama.h"
#include "lowbit/quant/format.h"
#include "lowbit/quant/quantized_tensor.h"

namespace lowbit {

// True for the formats a Matryoshka model is stored in (asymmetric int8 groups).
bool matryoshka_parent(const QuantFormat& f);
// The widths a parent serves: 8 (itself), 4, 3, 2.
bool matryoshka_width_valid(int r);
// The format of the r-bit slice of `parent` (int{r}g{G}, G the parent's group size; r = 8: the
// parent). Throws naming `flag` when the parent is no Matryoshka parent or r is no width.
const QuantFormat& matryoshka_slice_format(const QuantFormat& parent, int r, const std::string& flag = "--slice");
// The r-bit model of q as an ordinary tensor of matryoshka_slice_format(q.fmt(), r) (a copy of q when
// r = 8). q in the storage layout (QuantizedTensor::row_layout).
QuantizedTensor matryoshka_slice(const QuantizedTensor& q, int r);

// "8,4,2" -> {8, 4, 2}: distinct widths, each 8, 4, 3 or 2; errors name `flag`.
std::vector<int> parse_matryoshka_widths(const std::string& text, const std::string& flag = "--widths");
// "1,1,2" -> {1, 1, 2}: one finite weight >= 0 per width, not all 0 (empty text: all 1); errors
// name `flag`.
std::vector<double> parse_width_weights(const std::string& text, size_t n_widths,
                                        const std::string& flag = "--width-weights");

// Replaces every packed block linear of `model` (QuantLinear in a Matryoshka parent format, no
// adapters) by its r-bit slice, on the layer's device (`eval ppl --slice`, `generate --slice`,
// `convert --slice`). Returns the number of layers sliced; throws
// naming `what` when a block linear is not such a layer.
int matryoshka_slice_model(LlamaModel& model, int r, const std::string& what);

}  // namespace lowbit
