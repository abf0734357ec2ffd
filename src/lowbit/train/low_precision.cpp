#include "lowbit/train/low_precision.h"

#include <cmath>
#include <cstdio>

namespace lowbit {

void apply_lp_recipe_name(LowPrecisionOptions& o, const std::string& name, const std::string& what) {
  if (name == "full") return;
  if (name == "naive") {
    o.recipe.weight_2d = false;
    o.recipe.hadamard = false;
    o.recipe.stochastic_grads = false;
    o.recipe.dge_k = 1.0f;         // fp4-dge: the straight-through estimator
    o.recipe.occ_quantile = 1.0;   // fp4-dge: no outlier clamping
    if (o.keep_last < 0) o.keep_last = 0;
    return;
  }
  throw_error(what, ": '", name, "' is not a recipe (choices: full, naive)");
}

int lp_keep_last(const LowPrecisionOptions& o, int n_layers) {
  if (o.keep_last >= 0) return o.keep_last;
  const LpPrecision p = o.recipe.precision;
  if (p != LpPrecision::MXFP4 && p != LpPrecision::NVFP4) return 0;
  return std::max(1, int(std::lround(0.15 * n_layers)));
}

void check_low_precision_options(const LowPrecisionOptions& o, int n_layers) {
  check_lp_recipe(o.recipe);
  if (!o.enabled()) return;
  if (o.keep_first < 0) throw_error("--lp-keep-first ", o.keep_first, " is negative");
  const int last = lp_keep_last(o, n_layers);
  if (o.keep_first + last >= n_layers)
    throw_error("--lp-keep-first ", o.keep_first, " and --lp-keep-last ", last, " keep all ", n_layers,
                " blocks in high precision: nothing would train in ", lp_precision_name(o.recipe.precision));
}

std::string low_precision_key(const LowPrecisionOptions& o, int n_layers) {
  const LpRecipe& r = o.recipe;
  std::string k = lp_precision_name(r.precision);
  if (!o.enabled()) return k;
  k += " keep " + std::to_string(o.keep_first) + "/" + std::to_string(lp_keep_last(o, n_layers));
  if (r.precision == LpPrecision::FP8)
    k += r.delayed_scaling ? " delayed h" + std::to_string(r.amax_history) : " current";
  if (r.precision == LpPrecision::MXFP4 || r.precision == LpPrecision::NVFP4)
    k += std::string(r.weight_2d ? " 2d" : " 1d") + (r.hadamard ? " rht" : "") + (r.stochastic_grads ? " sr" : "");
  if (r.precision == LpPrecision::FP4_DGE) {
    char buf[96];
    if (r.dge_k == 1.0f) std::snprintf(buf, sizeof buf, " ste");
    else std::snprintf(buf, sizeof buf, " dge k%g clip%g", double(r.dge_k), double(r.dge_clip));
    k += buf;
    if (r.occ_quantile < 1.0) std::snprintf(buf, sizeof buf, " occ %g", r.occ_quantile), k += buf;
  }
  if (r.precision == LpPrecision::INT4) {
    using G = LpRecipe::Int4Grad;
    k += std::string(r.hadamard ? " hq" + std::to_string(kInt4HadamardBlock) : "");
    if (r.stochastic_grads)
      k += r.int4_grad == G::BsLss ? " bs-lss" : r.int4_grad == G::BsLssDgrad ? " bs-lss-dgrad" : " bs";
    if (r.int4_row_scales) k += " row";
  }
  return k;
}

bool lp_block_kept(const LowPrecisionOptions& o, int block, int n_layers) {
  return block < o.keep_first || block >= n_layers - lp_keep_last(o, n_layers);
}

std::shared_ptr<LpContext> make_low_precision(LlamaModel& model, const LowPrecisionOptions& o, uint64_t seed) {
  check_low_precision_options(o, model.n_layers());
  auto ctx = std::make_shared<LpContext>();
  ctx->seed = seed;
  int64_t id = 0;
  for (int i = 0; i < model.n_layers(); ++i) {
    const bool keep = lp_block_kept(o, i, model.n_layers());
    for (auto& [name, slot] : model.block(i).linears()) {
      const int64_t layer_id = id++;
      if (keep) continue;
      const auto* d = dynamic_cast<const DenseLinear*>(slot->get());
      if (!d) throw_error("--precision: layer ", i, " ", name, " is not a dense linear layer");
      if (d->bias().defined()) throw_error("--precision: layer ", i, " ", name, " has a bias (not supported)");
      *slot = std::make_shared<LowPrecisionLinear>(d->weight_var(), o.recipe, ctx, layer_id);
    }
  }
  return ctx;
}

std::vector<const LpProduct*> lp_products(const LlamaModel& model) {
  std::vector<const LpProduct*> out;
  for (int i = 0; i < model.n_layers(); ++i) {
    LlamaBlock b = model.block(i);  // shares the layers
    for (auto& [name, slot] : b.linears())
      if (const auto* l = dynamic_cast<const LowPrecisionLinear*>(slot->get())) out.push_back(&l->product());
  }
  return out;
}

namespace {
const char* kRoles[3] = {"x", "w", "dy"};
}  // namespace

std::vector<std::pair<std::string, Tensor>> lp_state_tensors(const std::vector<const LpProduct*>& products) {
  std::vector<std::pair<std::string, Tensor>> out;
  for (const LpProduct* l : products) {
    l->state().settle();  // the amaxes still in flight (native FP8 GEMMs) into the histories
    for (int r = 0; r < 3; ++r) {
      const auto& h = l->state().history[r];
      if (h.empty()) continue;
      out.emplace_back("lp." + std::to_string(l->layer_id()) + "." + kRoles[r],
                       Tensor::from_vector(h, {int64_t(h.size())}));
    }
  }
  return out;
}

void restore_lp_state(const std::vector<const LpProduct*>& products,
                      const std::function<Tensor(const std::string&)>& load) {
  for (const LpProduct* l : products) {
    l->state().settle();  // nothing in flight survives the restore
    for (int r = 0; r < 3; ++r) {
      const std::string name = "lp." + std::to_string(l->layer_id()) + "." + kRoles[r];
      const Tensor t = load(name);
      auto& h = l->state().history[r];
      h.clear();
      if (!t.defined()) continue;
      if (t.dtype() != DType::F32 || t.dim() != 1) throw_error("training state: tensor '", name, "' is ", t.describe(), ", expected f32 [n]");
      h = t.to_vector();
    }
  }
}

}  // namespace lowbit
