// Layer-wise mixed precision under a bits budget (issue 17; Dumitru, Yadav, Maheshwary, Clotan,
// Madhusudhan, Surdeanu 2024, "Layer-Wise Quantization: A Pragmatic and Effective Method for
// Quantizing LLMs Beyond Integer Bit-Levels", arXiv 2406.17415): rank the decoder layers by an
// importance score, give the important ones more bits, reach a target average, then run any
// method with the resulting per-layer formats (a FormatPlan, as --preset / --format-map give).
//
// The paper's two scores, higher = more important here:
//   lim  Layer Input Modification: how much a decoder layer changes the residual stream it reads,
//        LIM_i = -mean_t cos(x_t, y_t) over calibration tokens t (x the layer's input, y its
//        output), on the full-precision model (the calibration windows, --mp-samples of them).
//   zd   z-score distribution: the fraction of the layer's weights (its seven linears together)
//        whose |w - mean| / std exceeds 1; data-free. The paper ranks a layer as more important
//        when that fraction is smaller (fewer weights far from the mean: heavier-tailed, a few
//        large outliers), so the importance is 1 - fraction.
//
// Allocation: every layer starts at the lowest level of `levels` (formats in increasing bits per
// weight); then, pass after pass over the layers in decreasing importance, a layer moves one level
// up when the average still fits the budget, until no layer can move. A more important layer so
// never ends below a less important one of the same size. The paper moves whole layers between two
// levels (its "beyond integer bit levels" 2.x / 3.x averages); with two levels this is that rule.
//
// The budget is the average bits per weight over the decoder linears, metadata included
// (QuantFormat::bits_per_weight: int2g64 is 2.5 with its f16 scale and zero per 64 values); the
// vocabulary matrices are outside it (they stay as the method leaves them).
#pragma once
#include <string>
#include <vector>

#include "lowbit/model/llama.h"
#include "lowbit/quant/format_map.h"

namespace lowbit {

enum class LayerScore { Lim, Zd };
LayerScore parse_layer_score(const std::string& name);  // "lim" | "zd"; throws naming --mp-score
const char* layer_score_name(LayerScore s);

// LIM importance of each decoder layer on calibration windows `tokens` (i32 [N, T]), `batch`
// windows per forward. Runs on the model's device; no gradients.
std::vector<double> layer_importance_lim(const LlamaModel& model, const Tensor& tokens, int64_t batch = 1);
// ZD importance (1 - fraction of |z| > 1) of each decoder layer of `w`.
std::vector<double> layer_importance_zd(const LlamaWeights& w);
// The score's fraction / cosine of one weight set (exposed for tests): fraction of |z| > 1 over
// all values of the tensors together (population std); 0 when every value is equal.
double zscore_fraction(const std::vector<const Tensor*>& tensors);

// Parses "int2g64,int3g64,int4g64" (formats, at least two, strictly increasing bits per weight
// on the model's linears, each fitting every linear's rows). Throws naming --mp-formats.
std::vector<QuantFormatId> parse_budget_levels(const std::string& list, const LlamaConfig& c);

struct BudgetPlan {
  FormatPlan plan;                 // every decoder linear's format
  std::vector<double> importance;  // per layer
  std::vector<int> level;          // per layer: index into levels
  double bits = 0;                 // achieved average bits per weight over the decoder linears
  double min_bits = 0, max_bits = 0;  // all layers at the lowest / highest level
};

// Average bits per weight of the decoder linears with layer i at levels[level[i]].
double plan_bits(const LlamaConfig& c, const std::vector<QuantFormatId>& levels, const std::vector<int>& level);

// Throws (naming --bits-budget) when the budget is not a positive finite number or is below the
// lowest level's average on this model (checked before any work).
void check_bits_budget(const LlamaConfig& c, const std::vector<QuantFormatId>& levels, double budget);

// The allocation above. Throws (naming --bits-budget) when the budget is below the lowest level's
// average or not a finite number; a budget at or above the highest level puts every layer there.
BudgetPlan plan_for_bits_budget(const LlamaConfig& c, const std::vector<double>& importance,
                                const std::vector<QuantFormatId>& levels, double budget, LayerScore score);

}  // namespace lowbit
