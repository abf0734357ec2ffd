// A linear layer trained in low precision (issue 18): a trainable f32 master weight [out, in] whose
// products are autograd/lp_linear.h's (quantized GEMM operands, straight-through gradients). The
// layers of a model share one LpContext (the run's seed and the current step): each training call
// draws the seed of its stochastic rounding and Hadamard signs from (seed, step, layer, call), so a
// resumed run draws what the uninterrupted run drew. `high_precision` in the context turns every
// layer into a plain `linear` (the validation of the master weights in f32).
#pragma once
#include <memory>

#include "lowbit/autograd/lp_linear.h"
#include "lowbit/model/linear.h"

namespace lowbit {

struct LpContext {
  uint64_t seed = 0;
  int64_t step = 0;
  bool high_precision = false;
};

// The product y = x w^T of one trained layer in low precision (lp_linear with the layer's recipe, its
// fp8 amax histories and its seeds): LowPrecisionLinear's, and the products of the layers that
// `lowbit qat` (the latent weights' fake-quantized products: quant/lsq_linear.h, paretoq_linear.h)
// and `lowbit finetune` (the LoRA adapters' two products: quant/quant_linear.h) train with
// --precision. One implementation: every layer kind calls this.
class LpProduct {
 public:
  LpProduct(const LpRecipe& recipe, std::shared_ptr<LpContext> context, int64_t layer_id);
  // x [M, in], w [out, in] -> [M, out]; with context->high_precision the plain `linear`.
  Var operator()(const Var& x, const Var& w) const;
  const LpRecipe& recipe() const { return recipe_; }
  LpLinearState& state() const { return *state_; }
  int64_t layer_id() const { return layer_id_; }

 private:
  LpRecipe recipe_;
  std::shared_ptr<LpContext> context_;
  std::shared_ptr<LpLinearState> state_;
  int64_t layer_id_;
  mutable int64_t calls_ = 0, calls_step_ = -1;  // training calls in the current step
};

class LowPrecisionLinear : public Linear {
 public:
  LowPrecisionLinear(Var weight, const LpRecipe& recipe, std::shared_ptr<LpContext> context, int64_t layer_id);
  Var forward(const Var& x) const override;
  int64_t in_features() const override { return weight_.value().shape()[1]; }
  int64_t out_features() const override { return weight_.value().shape()[0]; }
  std::vector<Var> parameters() const override;
  // The f32 master weight: what checkpoints hold (quantize it afterwards for low-bit inference).
  Tensor effective_weight() const override { return weight_.value(); }
  std::string kind() const override;
  const LpRecipe& recipe() const { return product_.recipe(); }
  LpLinearState& state() const { return product_.state(); }
  int64_t layer_id() const { return product_.layer_id(); }
  const LpProduct& product() const { return product_; }

 private:
  Var weight_;
  LpProduct product_;
};

}  // namespace lowbit
