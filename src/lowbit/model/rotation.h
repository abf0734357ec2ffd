// Rotations and activation / KV-cache quantization of a Llama model (issue 16; QuaRot, Ashkboos et
// al. 2024; QuIP, Chee et al. 2023; KIVI, Liu et al. 2024).
//
// Rotation ("hadamard"): rotate_weights() folds each RMSNorm weight into the linears that read the
// norm's output (q/k/v, gate/up, lm_head; the norms become 1) and then multiplies the residual
// stream by a randomized Hadamard rotation R (D x D): the embedding rows by R, the input side of
// q/k/v/gate/up/lm_head by R, the output side of o_proj/down_proj by R^T. RMSNorm without a weight
// commutes with an orthogonal R, so the model computes the same function while every linear input
// (and the residual) is rotated, which spreads outlier channels over all channels. A tied
// embedding is untied (the head gets the folded final norm; the table does not). Two more
// rotations: R_h (head_dim) applied offline per head to the values (v_proj output, o_proj input),
// and R_F (SwiGLU width) applied online to the input of down_proj (its transpose is folded into
// down_proj's weight); with KV-cache quantization queries and keys are also rotated online by R_h
// after RoPE (q . k unchanged). The online rotations are part of the model (ModelTransforms) and
// of a quantized checkpoint.
//
// Activation quantization (ActQuantSpec): the input of every linear of a block (not lm_head) is
// fake-quantized per token (one scale per row, dynamic) before the product.
// KV-cache quantization (KVQuantSpec, KIVI): fake quantization in the attention path. A query at
// position t sees keys/values of positions below L(t) = floor((t + 1 - window) / group) * group
// (0 when negative) quantized, the rest (between `window` and window + group - 1 recent tokens)
// in full precision; keys per channel in groups of `group` tokens, values per token in groups of
// `group` channels (the head when group does not divide head_dim), both asymmetric min/max.
// This is what a KIVI cache that quantizes `group` tokens at a time once more than `window` are
// held would store; the cache itself keeps its storage type (the quantized values are recomputed).
#pragma once
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "lowbit/autograd/variable.h"
#include "lowbit/core/tensor.h"
#include "lowbit/model/config.h"
#include "lowbit/model/weights.h"

namespace lowbit {

// R = diag(signs) (H_p / sqrt(p) (x) S): n = p * m with p the largest power of two dividing n and
// S an m x m random orthogonal matrix (none when m = 1). Orthogonal (to f32 rounding of S).
struct HadamardRotation {
  Tensor signs;  // f32 [n], +-1
  Tensor small;  // f32 [m, m]; undefined when m = 1
  bool defined() const { return signs.defined(); }
  int64_t size() const { return signs.defined() ? signs.numel() : 0; }
  // x [..., n] (f32 or f64, CPU) -> x R, or x R^T with transpose.
  Tensor apply(const Tensor& x, bool transpose = false) const;
  // The explicit matrix R [n, n] in f64 (tests).
  Tensor matrix() const;
};

// A seeded random rotation of n >= 1 channels (deterministic for a given n and seed).
HadamardRotation random_hadamard(int64_t n, uint64_t seed);
// Checks a rotation read from a file: defined, f32 signs [n] of +-1, the small factor f32 [m, m]
// (none when m = 1) and orthogonal to 1e-4; throws "<source>: <name> rotation ..." otherwise.
void validate_rotation(const HadamardRotation& r, int64_t n, const std::string& source, const std::string& name);

// Integer grids (per-token absmax / min-max) or floating-point formats (ops/fp_act_quant.h:
// "fp8" = E4M3 per token, "fp4-mx" = E2M1 with an e8m0 scale per 32 channels, "fp4-nv" = E2M1 with
// an e4m3 scale per 16 channels under an f32 per-token scale); bits is 8 or 4 for those too.
enum class ActFloat : int { None = 0, Fp8E4M3 = 1, Fp4Mx = 2, Fp4Nv = 3 };  // = ops::FpActFormat's values
// The four activation-quantization points of a block (the inputs act_in quantizes): q/k/v's,
// o_proj's, gate/up's and down_proj's.
enum ActPoint : int { kActAttn = 0, kActO = 1, kActFfn = 2, kActDown = 3, kActPoints = 4 };
struct ActQuantSpec {
  int bits = 0;             // 0: off; 4 or 8
  bool asymmetric = false;  // min/max with a zero point instead of symmetric absmax
  double clip = 1.0;        // the range is clip * (min, max)
  ActFloat fp = ActFloat::None;  // a floating-point format instead of the integer grid
  // Searched clip ratios (methods/act_clip.h), one per (layer, point) at clips[layer * kActPoints +
  // point]; empty: `clip` everywhere.
  std::vector<double> clips;
  // "int4-absmean": BitNet v2's INT4 quantizer, s = mean|x| / sqrt(7) per token, codes in [-8, 7]
  // (ops::act_quant_int4_absmean); 4 bits, symmetric, integer, clip 1 only.
  bool absmean = false;
  bool enabled() const { return bits > 0; }
  double clip_at(int layer, int point) const {
    return clips.empty() ? clip : clips[size_t(layer) * kActPoints + size_t(point)];
  }
  // The same quantizer with one ratio `c` everywhere (no searched ratios).
  ActQuantSpec with_clip(double c) const { return ActQuantSpec{bits, asymmetric, c, fp, {}, absmean}; }
};

// Coupled Quantization (CQ, arXiv 2405.03917; ops/coupled_quant.h, methods/kv_cq.h) instead of KIVI
// when cq_channels > 0: every token's keys and values (of all kv heads, flattened: KVH * head_dim
// channels) are split into groups of cq_channels contiguous channels, each replaced by the nearest
// of 2^(bits * cq_channels) centroids of its (layer, K/V, group) codebook. "cq1": bits 1, 8
// channels (256 centroids); "cq2": bits 2, 4 channels (256 centroids). The same L(t) as KIVI's
// decides which tokens a query reads quantized (`group` is then only the token granularity of
// that rule: CQ quantizes each token on its own).
//
// WKVQuant (arXiv 2402.12065; ops/wkv_quant.h, methods/kv_wkv.h) instead of KIVI when wkv: every
// quantized token's keys and values are smoothed per channel by the static (layer, K/V) shift and
// scale of wkv_shift / wkv_scale, then quantized per token (asymmetric min/max, groups of `group`
// channels of a head; the whole head when group does not divide head_dim) at `bits` (4 or 2).
// Past-only: a query at position t reads L(t) = max(0, t + 1 - max(window, 1)) quantized tokens —
// every token older than its newest `window` ones (no rounding to groups: each token is quantized
// on its own), and never its own token, even at window 0 (KIVI's and CQ's rule with window 0
// quantizes a query's own token when it completes a group).
struct KVQuantSpec {
  int bits = 0;          // 0: off; 2 or 4 (KIVI, WKVQuant); 1 or 2 bits per channel (CQ)
  int64_t group = 32;    // tokens per key group, channels per value group (WKVQuant: channels per group)
  int64_t window = 128;  // recent tokens kept in full precision (at least)
  int cq_channels = 0;   // > 0: coupled quantization, channels per group
  // CQ codebooks, f32 [n_layers, KVH * head_dim / cq_channels, 2^(bits * cq_channels), cq_channels].
  Tensor cq_keys, cq_values;
  bool wkv = false;  // WKVQuant
  // WKVQuant's smoothing, f32 [n_layers, 2 (keys, values), KVH * head_dim] (keys in the Hugging Face
  // channel order of each head, as CQ's codebooks); scale > 0.
  Tensor wkv_shift, wkv_scale;
  bool enabled() const { return bits > 0; }
  bool coupled() const { return bits > 0 && cq_channels > 0; }
  bool smoothed() const { return bits > 0 && wkv; }
  int64_t cq_centroids() const { return int64_t(1) << (bits * cq_channels); }
  // L(t): how many of the keys/values a query at position t reads are quantized (0 when off).
  int64_t quantized_len(int64_t t) const {
    if (bits == 0) return 0;
    if (wkv) return std::max<int64_t>(0, t + 1 - std::max<int64_t>(window, 1));
    const int64_t n = t + 1 - window;
    return n <= 0 ? int64_t(0) : (n / group) * group;
  }
};

struct ModelTransforms {
  std::string rotation;  // "" (none), "hadamard" (QuaRot) or "h-bitlinear" (BitNet v2)
  uint64_t rotation_seed = 0;
  HadamardRotation ffn;   // online before down_proj (n = F); defined when rotated
  HadamardRotation o_in;  // online before o_proj (n = n_heads * head_dim); "h-bitlinear" only
  HadamardRotation head;  // per head (n = head_dim): values offline; queries/keys online under kv
  ActQuantSpec act;
  KVQuantSpec kv;
  // LLM-QAT's KV quantization (arXiv 2305.17888; what `qat --method llm-qat --kv-bits` trains with):
  // the outputs of k_proj and v_proj fake-quantized per (token, head), symmetric MinMax
  // (s = max|x| / (2^(b-1) - 1)), before RoPE, gradient straight through; 0: off, else 2, 4 or 8.
  // Each token's keys/values depend on that token alone, so every forward path (and a cache of any
  // type) computes the same numbers. Not together with KIVI (kv).
  int kv_token_bits = 0;
  bool any() const { return !rotation.empty() || act.enabled() || kv.enabled() || kv_token_bits > 0; }
};

// "int8", "int4", "int8-asym", "int4-asym", "int4-absmean", "fp8", "fp4-mx", "fp4-nv" or "none" ->
// spec (clip 1); throws naming `what`.
ActQuantSpec parse_act_quant(const std::string& name, const std::string& what = "--act");
std::string act_quant_name(const ActQuantSpec& a);  // "none", "int8", "int4-asym", "int4-absmean", ...
// x [M, N] (f32/f64; CPU, or CUDA for the integer grids) fake-quantized per token by the spec (x
// itself when off); gradients pass straight through.
Var act_fake_quant(const Var& x, const ActQuantSpec& a);
// "int4", "int2" or "none" -> bits (4, 2, 0); "cq1" / "cq2" -> 1 / 2 (coupled quantization; see
// kv_quant_channels); "wkv4" / "wkv2" -> 4 / 2 (WKVQuant; see kv_quant_wkv); throws naming `what`.
int parse_kv_quant_bits(const std::string& name, const std::string& what = "--kv-quant");
// Channels per CQ group of a --kv-quant name: cq1 -> 8, cq2 -> 4, otherwise 0 (KIVI or none).
int kv_quant_channels(const std::string& name);
// Whether a --kv-quant name is WKVQuant's: wkv4 or wkv2.
bool kv_quant_wkv(const std::string& name);
// "none", "int4", "int2", "cq1", "cq2" (a CQ spec with other channel counts: "cq<bits>c<channels>"),
// "wkv4", "wkv2".
std::string kv_quant_name(const KVQuantSpec& kv);

// "int8", "int4", "int2" or "none" -> ModelTransforms::kv_token_bits; throws naming `what`.
int parse_kv_token_bits(const std::string& name, const std::string& what = "--kv-token-quant");

// Rotates the weights of an f32/f64 CPU model in place as described above (computed in f64) and
// returns the transforms with rotation = "hadamard" and the online rotations set. config loses
// tied_embeddings when it had them. Throws when the weights are not on the CPU or not f32/f64.
ModelTransforms rotate_weights(LlamaConfig& config, LlamaWeights& w, uint64_t seed);

// Checks the transforms against a config (rotation sizes, specs in range); throws naming `source`.
void validate_transforms(const LlamaConfig& config, const ModelTransforms& t, const std::string& source);

}  // namespace lowbit
