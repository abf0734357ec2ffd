#include "lowbit/ops/registry.h"

namespace lowbit::ops {

namespace {
#ifdef LOWBIT_WITH_CUDA
constexpr bool kCuda = true;
#else
constexpr bool kCuda = false;
#endif
// name, has_backward, has_cuda, CPU dtypes. The backward of an op is in the same source file.
constexpr OpInfo kOps[] = {
    {"gemm", true, kCuda, "f32 f64"},          {"add", true, kCuda, "f32 f64"},
    {"sub", true, kCuda, "f32 f64"},           {"mul", true, kCuda, "f32 f64"},
    {"scale", true, kCuda, "f32 f64"},         {"sum", true, kCuda, "f32 f64"},
    {"rmsnorm", true, kCuda, "f32 f64"},       {"rope", true, kCuda, "f32 f64"},
    {"attention", true, kCuda, "f32 f64"},     {"silu", true, kCuda, "f32 f64"},
    {"swiglu", true, kCuda, "f32 f64"},        {"embedding", true, kCuda, "f32 f64"},
    {"cross_entropy", true, kCuda, "f32 f64"}, {"kl_div", true, kCuda, "f32 f64"},
    {"mse", true, kCuda, "f32 f64"},           {"adamw_step", false, kCuda, "f32 f64"},
    {"weighted_sq_err", true, kCuda, "f32 f64"},
    {"adamw_step_multi", false, kCuda, "f32 f64"},
    {"adamw_step_groups", false, kCuda, "f32 f64"},
    {"cast", true, kCuda, "f64 f32 bf16 f16"},
    {"quant_matmul", false, true, "f32 x packed"},
    {"kv_attention", false, false, "f32 x f32/f16/i8/KIVI int4/int2 cache"},
    {"ternary_fake_quant", false, kCuda, "f32 f64"},  // BitLinear's quantizers (ops/ternary.h);
    {"act_quant_int8", false, kCuda, "f32 f64"},      // their STE is autograd/bitlinear.cpp
    {"act_quant_int4_absmean", false, kCuda, "f32 f64"},  // BitNet v2's absmean A4 (STE: autograd/bitlinear.cpp)
    {"hadamard_transform", true, kCuda, "f32 f64"},
    {"fake_quant", false, kCuda, "f32 f64"},
    {"fp_fake_quant", false, false, "f32 f64"},      // FP8 / MXFP4 / NVFP4 activations (issue 16)
    {"adamw8_step", false, false, "f32 params, u8 codes + f32 absmax state"},  // ops/blockwise8.h
    // QAT weight quantizers (ops/qat_quant.h; their autograd functions are quant/lsq.cpp, paretoq.cpp)
    {"lsq_quant", true, kCuda, "f32 f64"},
    {"seq_quant", true, kCuda, "f32 f64"},
    {"group_scale", true, kCuda, "f32 f64"},
    // low-precision training's operand quantizer (ops/lp_quant.h; the STE is autograd/lp_linear.cpp)
    {"lp_quantize", false, kCuda, "f32 f64"},
    {"lp_quantize_fp8", false, kCuda, "f32 -> u8 fp8 codes"},
    {"fp8_gemm", false, kCuda, "u8 fp8 codes -> f32"},  // cuBLASLt on CUDA (native fp8 training)
    {"lp_encode_fp8_dual", false, kCuda, "f32 -> u8 fp8 codes, both layouts"},
    // fp4-dge (ops/lp_quant.h): the DGE factor of the weight gradient and OCC's split; CPU only
    {"lp_dge_scale", false, false, "f32 f64"},
    {"lp_occ_split", false, false, "f32 f64"},
    // int4 (ops/lp_int4.h): the Hadamard quantizer and bit splitting + leverage-score sampling (CUDA: f32)
    {"lp_int4_hq", false, kCuda, "f32 f64"},
    {"lp_int4_bitsplit", false, kCuda, "f32 f64"},
    {"lp_int4_lss", false, kCuda, "f32 f64"},
    // AdaRound's loop (ops/adaround.h; methods/adaround.cpp; CUDA: f64 and f32)
    {"adaround_soft_error", false, kCuda, "f32 f64"},
    {"adaround_adam_step", false, kCuda, "f32 f64"},
};
}  // namespace

std::span<const OpInfo> op_registry() { return kOps; }

}  // namespace lowbit::ops
