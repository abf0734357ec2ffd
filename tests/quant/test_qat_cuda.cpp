// The QAT training layers on the GPU against the same layers on the CPU (issue 14): LsqTrainLinear
// (latent weight, LSQ+ on an asymmetric format and LSQ on a symmetric one; frozen codes, E2E-QP),
// SeqTrainLinear (ParetoQ's 2-bit SEQ, ternary and sign) and L4qTrainLinear (the fused LoRA-in-the-
// quantizer op) — forward, every parameter's gradient and the packed encoding. Skipped without a GPU.
// The op-level cells (every quantizer forward and backward) are Parity.QatQuantizers in test_ops.
//
// Tolerances: the quantized weights are bit-identical on both devices (the same per-element
// arithmetic, ops/qat_quant_math.h; the L4Q merge W0 + s B A is exact here: A, B on a grid of 1/8
// and s a power of two), so the outputs differ only by the fp32 GEMMs' summation order (TF32 off):
// 1e-5 of the largest output; gradients add the per-group sums' order: 1e-4 of the largest. The
// encodings (host code on the trained tensors) are equal.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "lowbit/autograd/functions.h"
#include "lowbit/ops/device_init.h"
#include "lowbit/quant/l4q_linear.h"
#include "lowbit/quant/lsq_linear.h"
#include "lowbit/quant/paretoq_linear.h"

using namespace lowbit;

namespace {

class QatCuda : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!init_cuda()) GTEST_SKIP() << "no CUDA device (or a CPU-only build): QAT GPU parity tests skipped";
    tf32_ = cuda_allow_tf32();
    cuda_set_allow_tf32(false);
  }
  // Restores what SetUp found: these tests once left TF32 on for the rest of the process, and the
  // quant_matmul table's cuda-exact cells that ran after them failed by TF32 rounding (H100, 2026-12-07).
  void TearDown() override {
    if (cuda_ready()) cuda_set_allow_tf32(tf32_);
  }
  bool tf32_ = false;
};

double nerr(const Tensor& got, const Tensor& ref) {
  const std::vector<float> g = got.to(Device::CPU).to_vector(), r = ref.to(Device::CPU).to_vector();
  if (g.size() != r.size()) return INFINITY;
  double num = 0, den = 1e-30;
  for (size_t i = 0; i < g.size(); ++i) {
    const double d = std::fabs(double(g[i]) - double(r[i]));
    if (std::isnan(d)) return INFINITY;
    num = std::max(num, d);
    den = std::max(den, std::fabs(double(r[i])));
  }
  return num / den;
}

// A values on a grid of 1/8 in [-1/2, 1/2] (exact products and short sums in f32).
Tensor dyadic(const Shape& s, uint64_t seed) {
  Tensor t = Tensor::uniform(s, seed, -4.5, 4.5, DType::F32);
  std::vector<float> v = t.to_vector();
  for (auto& x : v) x = std::nearbyint(x) / 8.0f;
  return Tensor::from_vector(v, s);
}

struct Outcome {
  Tensor y;
  std::vector<Tensor> grads;  // x's, then every parameter's
  Tensor packed;              // the encoding, dequantized (CPU)
};

using MakeLayer = std::function<std::shared_ptr<Linear>(Device)>;
using Encode = std::function<Tensor(const Linear&)>;

Outcome run(const MakeLayer& make, const Encode& encode, Device d, const Tensor& x, const Tensor& gy) {
  auto layer = make(d);
  Var xv(x.to(d).clone(), true);
  Var y = layer->forward(xv);
  backward(y, gy.to(d));
  Outcome o;
  o.y = y.value().to(Device::CPU);
  o.grads.push_back(xv.grad().to(Device::CPU));
  for (const Var& p : layer->parameters()) o.grads.push_back(p.grad().defined() ? p.grad().to(Device::CPU) : Tensor());
  o.packed = encode(*layer);
  return o;
}

void expect_parity(const std::string& what, const MakeLayer& make, const Encode& encode, int64_t in) {
  const Tensor x = Tensor::randn({9, in}, 11, 1.0, DType::F32);
  const Tensor gy = Tensor::randn({9, 48}, 12, 1.0, DType::F32);
  const Outcome c = run(make, encode, Device::CPU, x, gy), g = run(make, encode, Device::CUDA, x, gy);
  EXPECT_LE(nerr(g.y, c.y), 1e-5) << what << ": forward";
  ASSERT_EQ(c.grads.size(), g.grads.size()) << what;
  for (size_t i = 0; i < c.grads.size(); ++i) {
    ASSERT_EQ(c.grads[i].defined(), g.grads[i].defined()) << what << ": gradient " << i;
    if (c.grads[i].defined()) {
      EXPECT_LE(nerr(g.grads[i], c.grads[i]), 1e-4) << what << ": gradient " << i;
    }
  }
  EXPECT_EQ(nerr(g.packed, c.packed), 0.0) << what << ": encoding";
}

}  // namespace

TEST_F(QatCuda, LsqLayersMatchTheCpu) {
  for (const char* fmt : {"int2g64", "int4g32s", "int3pc"}) {
    const QuantFormat& f = parse_quant_format(fmt);
    const Tensor w = Tensor::randn({48, 128}, 3, 0.05, DType::F32);
    const LsqParams init = lsq_init(w, f, LsqInit::Mse);
    QatLinearOptions o;
    o.grad_scale = lsq_grad_scale(f, 128);
    expect_parity(std::string("lsq ") + fmt,
                  [&](Device d) { return std::make_shared<LsqTrainLinear>(w.to(d), Tensor(), f, init, o); },
                  [](const Linear& l) { return dynamic_cast<const LsqTrainLinear&>(l).encode().dequantize(); }, 128);
    const QuantizedTensor q = lsq_encode(w, init.step, init.offset, f);
    expect_parity(std::string("frozen codes ") + fmt,
                  [&](Device d) { return std::make_shared<LsqTrainLinear>(q, Tensor(), d); },
                  [](const Linear& l) { return dynamic_cast<const LsqTrainLinear&>(l).encode().dequantize(); }, 128);
  }
}

TEST_F(QatCuda, ParetoQSeqLayersMatchTheCpu) {
  for (const auto& [fmt, bits] : {std::pair{"int2g64", ParetoQBits::Two}, std::pair{"int2g64s", ParetoQBits::Ternary},
                                   std::pair{"int2pcs", ParetoQBits::One}}) {
    const QuantFormat& f = parse_quant_format(fmt);
    const Tensor w = Tensor::randn({48, 128}, 4, 0.05, DType::F32);
    const Tensor alpha = paretoq_init_alpha(w, bits, f);
    const double g = paretoq_grad_scale(bits, w.numel());
    expect_parity(std::string("paretoq ") + paretoq_bits_name(bits) + " " + fmt,
                  [&](Device d) { return std::make_shared<SeqTrainLinear>(w.to(d), Tensor(), f, bits, alpha, g); },
                  [](const Linear& l) { return dynamic_cast<const SeqTrainLinear&>(l).encode().dequantize(); }, 128);
  }
}

TEST_F(QatCuda, L4qFusedLayerMatchesTheCpu) {
  for (const char* fmt : {"int3g64", "int4g64s"}) {
    const QuantFormat& f = parse_quant_format(fmt);
    const Tensor w = Tensor::randn({48, 128}, 5, 0.05, DType::F32);
    const LsqParams init = lsq_init(w, f, LsqInit::MinMax);
    L4qOptions o;
    o.rank = 4;  // s = 16 / 4 = 4
    o.grad_scale = lsq_grad_scale(f, 128);
    const Tensor A = dyadic({4, 128}, 6), B = Tensor::full({48, 4}, 1.0 / 1024, DType::F32);
    expect_parity(std::string("l4q ") + fmt,
                  [&](Device d) {
                    auto t = std::make_shared<L4qTrainLinear>(w.to(d), Tensor(), f, init, o);
                    Var a = t->lora_parameters()[0], b = t->lora_parameters()[1];
                    a.mutable_value().copy_(A);
                    b.mutable_value().copy_(B);
                    return t;
                  },
                  [](const Linear& l) { return dynamic_cast<const L4qTrainLinear&>(l).encode().dequantize(); }, 128);
  }
}

// Under AutocastBf16Guard the frozen-codes layer (E2E-QP) is one op whose group_scale kernel writes W
// in bf16 directly (issue 19): against the unfused path (f32 W, then linear's cast), with and without
// a bias, integer (I8) codes: the same bf16 operands and GEMMs, so the same values (bound 1e-6
// normalised, to allow a GEMM algorithm choice; expected 0).
TEST_F(QatCuda, FrozenCodesFusedBf16EqualsUnfused) {
  const bool was = autocast_fused_weights();
  for (const char* fmt : {"int2g64", "int4g32s"}) {
    const QuantFormat& f = parse_quant_format(fmt);
    const Tensor w = Tensor::randn({96, 256}, 31, 0.05, DType::F32);
    const LsqParams init = lsq_init(w, f, LsqInit::Mse);
    const QuantizedTensor q = lsq_encode(w, init.step, init.offset, f);
    for (bool with_bias : {false, true}) {
      const Tensor bias = with_bias ? Tensor::randn({96}, 32, 0.1, DType::F32) : Tensor();
      const Tensor x = Tensor::randn({24, 256}, 33, 1.0, DType::F32), gy = Tensor::randn({24, 96}, 34, 1.0, DType::F32);
      auto go = [&](bool fused) {
        set_autocast_fused_weights(fused);
        AutocastBf16Guard guard(true);
        LsqTrainLinear layer(q, bias, Device::CUDA);
        Var xv(x.to(Device::CUDA), true);
        Var y = layer.forward(xv);
        backward(y, gy.to(Device::CUDA));
        std::vector<Tensor> r{y.value().to(Device::CPU), xv.grad().to(Device::CPU)};
        for (const Var& p : layer.parameters()) r.push_back(p.grad().to(Device::CPU));
        return r;
      };
      const auto u = go(false), fz = go(true);
      ASSERT_EQ(u.size(), fz.size());
      for (size_t i = 0; i < u.size(); ++i) {
        const double e = nerr(fz[i], u[i]);
        std::printf("  frozen codes %-8s bias %d tensor %zu: fused vs unfused %.2e\n", fmt, int(with_bias), i, e);
        EXPECT_LE(e, 1e-6) << fmt << " tensor " << i;
      }
    }
  }
  set_autocast_fused_weights(was);
}
