#include "lowbit/model/lp_linear.h"

#include "lowbit/autograd/functions.h"

namespace lowbit {

LpProduct::LpProduct(const LpRecipe& recipe, std::shared_ptr<LpContext> context, int64_t layer_id)
    : recipe_(recipe), context_(std::move(context)), state_(std::make_shared<LpLinearState>()), layer_id_(layer_id) {
  if (!context_) throw_error("LpProduct: no context");
  check_lp_recipe(recipe_);
}

Var LpProduct::operator()(const Var& x, const Var& w) const {
  if (context_->high_precision) return linear(x, w);
  uint64_t seed = 0;
  if (grad_enabled()) {  // a fresh seed per training call; validation needs none (no rounding draws)
    if (calls_step_ != context_->step) calls_ = 0, calls_step_ = context_->step;
    using ops::lp::mix64;
    seed = mix64(mix64(mix64(context_->seed) ^ uint64_t(context_->step)) ^ (uint64_t(layer_id_) << 32 | uint64_t(calls_++)));
  }
  return lp_linear(x, w, recipe_, state_, seed);
}

LowPrecisionLinear::LowPrecisionLinear(Var weight, const LpRecipe& recipe, std::shared_ptr<LpContext> context,
                                       int64_t layer_id)
    : weight_(std::move(weight)), product_(recipe, std::move(context), layer_id) {
  if (weight_.value().dim() != 2)
    throw_error("LowPrecisionLinear: weight must be [out, in], got ", weight_.value().describe());
}

Var LowPrecisionLinear::forward(const Var& x) const { return product_(x, weight_); }

std::vector<Var> LowPrecisionLinear::parameters() const {
  if (weight_.requires_grad()) return {weight_};
  return {};
}

std::string LowPrecisionLinear::kind() const { return std::string("lp-") + lp_precision_name(product_.recipe().precision); }

}  // namespace lowbit
