#include "lowbit/methods/layer_budget.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>

#include "lowbit/autograd/variable.h"
#include "lowbit/core/error.h"

namespace lowbit {

LayerScore parse_layer_score(const std::string& name) {
  if (name == "lim") return LayerScore::Lim;
  if (name == "zd") return LayerScore::Zd;
  throw_error("--mp-score must be 'lim' (layer input modification, needs calibration data) or 'zd' (weight "
              "z-scores, data-free), got '", name, "'");
}

const char* layer_score_name(LayerScore s) { return s == LayerScore::Lim ? "lim" : "zd"; }

std::vector<double> layer_importance_lim(const LlamaModel& model, const Tensor& tokens_in, int64_t batch) {
  LB_CHECK(tokens_in.dim() == 2 && tokens_in.dtype() == DType::I32 && tokens_in.size(0) >= 1 && tokens_in.size(1) >= 1,
           "layer importance: calibration tokens must be i32 [N, T], got ", tokens_in.describe());
  LB_CHECK(batch >= 1, "layer importance: batch must be >= 1, got ", batch);
  const Tensor tokens = tokens_in.contiguous();
  const int64_t N = tokens.size(0), T = tokens.size(1);
  const int L = model.n_layers();
  std::vector<double> cos_sum(size_t(L), 0.0);
  int64_t rows = 0;
  NoGradGuard ng;
  for (int64_t s = 0; s < N; s += batch) {
    const int64_t e = std::min(N, s + batch);
    Var x = model.embed(tokens.slice(0, s, e).contiguous());
    for (int i = 0; i < L; ++i) {
      Var y = model.block_forward(i, x, e - s, T);
      const Tensor xh = x.value().to(Device::CPU).to(DType::F32).contiguous();
      const Tensor yh = y.value().to(Device::CPU).to(DType::F32).contiguous();
      const int64_t n = xh.size(0), D = xh.size(1);
      const float *px = xh.data<float>(), *py = yh.data<float>();
      double acc = 0;
      for (int64_t r = 0; r < n; ++r) {
        double xy = 0, xx = 0, yy = 0;
        for (int64_t k = 0; k < D; ++k) {
          const double a = px[r * D + k], b = py[r * D + k];
          xy += a * b;
          xx += a * a;
          yy += b * b;
        }
        acc += xx > 0 && yy > 0 ? xy / std::sqrt(xx * yy) : 1.0;  // a zero row is "unchanged"
      }
      cos_sum[size_t(i)] += acc;
      x = y;
    }
    rows += (e - s) * T;
  }
  std::vector<double> lim(static_cast<size_t>(L));
  for (int i = 0; i < L; ++i) {
    lim[size_t(i)] = -cos_sum[size_t(i)] / double(rows);
    if (!std::isfinite(lim[size_t(i)]))
      throw_error("layer importance (lim): layer ", i, "'s output is not finite on the calibration data");
  }
  return lim;
}

double zscore_fraction(const std::vector<const Tensor*>& tensors) {
  double sum = 0, sq = 0;
  int64_t n = 0;
  std::vector<Tensor> host;
  for (const Tensor* t : tensors) host.push_back(t->to(Device::CPU).to(DType::F32).contiguous());
  for (const Tensor& h : host) {
    const float* p = h.data<float>();
    for (int64_t k = 0; k < h.numel(); ++k) {
      if (!std::isfinite(p[k])) throw_error("layer importance (zd): a weight is not finite (", p[k], ")");
      sum += p[k];
    }
    n += h.numel();
  }
  if (n == 0) return 0;
  const double mean = sum / double(n);
  for (const Tensor& h : host) {
    const float* p = h.data<float>();
    for (int64_t k = 0; k < h.numel(); ++k) sq += (p[k] - mean) * (p[k] - mean);
  }
  const double sd = std::sqrt(sq / double(n));
  if (sd == 0) return 0;
  int64_t far = 0;
  for (const Tensor& h : host) {
    const float* p = h.data<float>();
    for (int64_t k = 0; k < h.numel(); ++k) far += std::fabs(p[k] - mean) > sd;
  }
  return double(far) / double(n);
}

std::vector<double> layer_importance_zd(const LlamaWeights& w) {
  std::vector<double> out;
  for (const LayerWeights& l : w.layers)
    out.push_back(1.0 - zscore_fraction({&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}));
  return out;
}

namespace {
// Bits (not per weight) of decoder layer `layer` at format f, and its weight count.
std::pair<double, double> layer_bits(const LlamaConfig& c, int layer, const QuantFormat& f) {
  double bits = 0, n = 0;
  for (const PlanTensor& t : plan_tensors(c))
    if (t.layer == layer) {
      bits += f.bits_per_weight(t.out, t.in) * double(t.out) * double(t.in);
      n += double(t.out) * double(t.in);
    }
  return {bits, n};
}
}  // namespace

std::vector<QuantFormatId> parse_budget_levels(const std::string& list, const LlamaConfig& c) {
  std::vector<QuantFormatId> ids;
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) throw_error("--mp-formats '", list, "': an empty entry (give formats separated by commas)");
    const QuantFormat& f = parse_quant_format(item);
    for (const PlanTensor& t : plan_tensors(c))
      if (t.layer >= 0 && !f.row_fits(t.in))
        throw_error("--mp-formats: ", f.name, " does not fit ", t.module, " (rows of ", t.in, " values, blocks of ",
                    f.group_size, ")");
    ids.push_back(f.id);
  }
  if (ids.size() < 2) throw_error("--mp-formats '", list, "': give at least two formats (the levels to choose from)");
  for (size_t i = 1; i < ids.size(); ++i) {
    const auto [b0, n0] = layer_bits(c, 0, quant_format(ids[i - 1]));
    const auto [b1, n1] = layer_bits(c, 0, quant_format(ids[i]));
    if (!(b1 / n1 > b0 / n0))
      throw_error("--mp-formats: ", quant_format(ids[i]).name, " (", b1 / n1, " bits per weight on this model) must ",
                  "have more bits than ", quant_format(ids[i - 1]).name, " (", b0 / n0, "): list the levels in "
                  "increasing order");
  }
  return ids;
}

namespace {
// Bits per weight of one decoder layer at each level (every decoder layer has the same shapes).
std::vector<double> level_bits_per_weight(const LlamaConfig& c, const std::vector<QuantFormatId>& levels) {
  std::vector<double> out;
  for (QuantFormatId id : levels) {
    const auto [b, n] = layer_bits(c, 0, quant_format(id));
    out.push_back(n > 0 ? b / n : 0);
  }
  return out;
}
}  // namespace

double plan_bits(const LlamaConfig& c, const std::vector<QuantFormatId>& levels, const std::vector<int>& level) {
  const std::vector<double> bpw = level_bits_per_weight(c, levels);
  double sum = 0;
  for (int i = 0; i < c.n_layers; ++i) sum += bpw.at(size_t(level.at(size_t(i))));
  return c.n_layers > 0 ? sum / c.n_layers : 0;
}

void check_bits_budget(const LlamaConfig& c, const std::vector<QuantFormatId>& levels, double budget) {
  LB_CHECK(levels.size() >= 2, "bits budget: need at least two levels");
  const std::vector<double> bpw = level_bits_per_weight(c, levels);
  if (!std::isfinite(budget) || budget <= 0) throw_error("--bits-budget must be a positive number, got ", budget);
  if (budget < bpw.front() - 1e-9)
    throw_error("--bits-budget ", budget, " is below ", quant_format(levels[0]).name, "'s ", bpw.front(),
                " bits per weight on this model's linears (the lowest level of --mp-formats; reachable: ", bpw.front(),
                " .. ", bpw.back(), ")");
}

BudgetPlan plan_for_bits_budget(const LlamaConfig& c, const std::vector<double>& importance,
                                const std::vector<QuantFormatId>& levels, double budget, LayerScore score) {
  LB_CHECK(int(importance.size()) == c.n_layers, "plan_for_bits_budget: ", importance.size(), " scores for ",
           c.n_layers, " layers");
  check_bits_budget(c, levels, budget);
  const std::vector<double> bpw = level_bits_per_weight(c, levels);
  BudgetPlan bp;
  bp.importance = importance;
  const int L = c.n_layers, top = int(levels.size()) - 1;
  bp.min_bits = bpw.front();
  bp.max_bits = bpw.back();
  std::vector<int> order(static_cast<size_t>(L));
  std::iota(order.begin(), order.end(), 0);
  // Decreasing importance; ties by layer index (deterministic).
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return importance[size_t(a)] > importance[size_t(b)]; });
  bp.level.assign(size_t(L), 0);
  double sum = bpw.front() * L;  // sum over layers of their bits per weight
  for (bool moved = true; moved;) {
    moved = false;
    for (int i : order) {
      const int k = bp.level[size_t(i)];
      if (k == top) continue;
      const double up = sum - bpw[size_t(k)] + bpw[size_t(k + 1)];
      if (up / L <= budget + 1e-9) {
        bp.level[size_t(i)] = k + 1;
        sum = up;
        moved = true;
      }
    }
  }
  bp.bits = plan_bits(c, levels, bp.level);
  FormatPlan& p = bp.plan;
  std::ostringstream origin;
  origin << "bits budget " << budget << " (" << layer_score_name(score) << ")";
  p.origin = origin.str();
  p.base = levels[0];
  for (const PlanTensor& t : plan_tensors(c))
    if (t.layer >= 0) p.formats[t.module] = levels[size_t(bp.level[size_t(t.layer)])];
  return bp;
}

}  // namespace lowbit
