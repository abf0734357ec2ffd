// QuIP's incoherence processing of one linear layer (Chee, Cai, Kuleshov, De Sa 2023, "QuIP: 2-Bit
// Quantization of Large Language Models With Guarantees", arXiv 2307.13304, §4 / Algorithm 1), with
// randomized Hadamard-type orthogonal matrices (model/rotation.h random_hadamard: random signs times
// H_p / sqrt(p) ⊗ S, S a small random orthogonal factor where the size is not a power of two; the
// QuIP# choice of transform, which QuIP's §4 allows in place of Kronecker products of random
// orthogonal matrices) instead of a rotation fused into the model (QuaRot, `--rotate`).
//
// For y = x W^T with W [out, in]: R_in [in, in] and R_out [out, out] orthogonal,
//     W' = R_out^T W R_in,   H' = R_in^T H R_in   (H = E[x^T x], the GPTQ Hessian of the inputs)
// are what the quantizer sees (GPTQ on (W', H') is QuIP's LDLQ); at inference
//     y = ((x R_in) Q(W')^T) R_out^T
// — an online transform of the input and of the output around the packed product (QuantLinear). With
// out undefined, the transform is input-side only (W' = W R_in).
#pragma once
#include <cstdint>
#include <string>

#include "lowbit/core/tensor.h"
#include "lowbit/model/rotation.h"

namespace lowbit {

struct Incoherence {
  HadamardRotation in;   // R_in (n = in_features): x -> x R_in
  HadamardRotation out;  // R_out (n = out_features): z -> z R_out^T; undefined: input side only
  uint64_t seed = 0;     // what in/out were drawn from (incoherence_for); recorded, not used at inference
  bool defined() const { return in.defined(); }
  // W' = R_out^T W R_in (W f32/f64 [out, in] on the CPU; computed in f64, returned in W's dtype).
  Tensor weight(const Tensor& w) const;
  // The inverse: W = R_out W' R_in^T (the function a layer holding W' computes, in x's basis).
  Tensor unweight(const Tensor& wq) const;
  // H' = R_in^T H R_in, symmetrized (H f32/f64 [in, in], CPU; returned in H's dtype).
  Tensor hessian(const Tensor& h) const;
  // x R_in (x [rows, in] f32/f64, CPU).
  Tensor input(const Tensor& x) const;
  // z R_out^T (z [rows, out]); z itself without an output side.
  Tensor output(const Tensor& z) const;
};

// The transform of a [out, in] layer drawn from `seed`: R_in = random_hadamard(in, s1), R_out =
// random_hadamard(out, s2) (two_sided) with s1, s2 derived from seed.
Incoherence make_incoherence(int64_t out, int64_t in, uint64_t seed, bool two_sided = true);
// The seed of one layer of a model quantized with `run_seed` (splitmix64 of the run seed, the block
// index and the linear's name), so each linear gets its own transform.
uint64_t incoherence_seed(uint64_t run_seed, int layer, const std::string& linear);
// Checks a transform read from a file against a [out, in] layer (model/rotation.h validate_rotation
// for each side); throws "<source>: incoherence of <module>: ..." otherwise.
void validate_incoherence(const Incoherence& t, int64_t out, int64_t in, bool two_sided, const std::string& source,
                          const std::string& module);

}  // namespace lowbit
