#include "lowbit/methods/cle.h"

#include <algorithm>
#include <cmath>
#include <map>

#include "lowbit/methods/rtn.h"
#include "lowbit/quant/quant_linear.h"

namespace lowbit {

namespace {

std::shared_ptr<Linear>* slot_of(LlamaBlock& b, const std::string& name) {
  for (auto& [n, s] : b.linears())
    if (n == name) return s;
  throw_error("cle: no linear named ", name);
}

Tensor host_copy(const Tensor& t) { return t.to(Device::CPU).to(DType::F32).contiguous().clone(); }

// max |w[:, i]| over the rows of each given [out, in] weight, per column i.
std::vector<double> column_ranges(const std::vector<const Tensor*>& ws) {
  const int64_t in = ws.front()->size(1);
  std::vector<double> r(size_t(in), 0.0);
  for (const Tensor* w : ws) {
    const float* p = w->data<float>();
    for (int64_t o = 0; o < w->size(0); ++o)
      for (int64_t i = 0; i < in; ++i) r[size_t(i)] = std::max(r[size_t(i)], double(std::fabs(p[o * in + i])));
  }
  return r;
}

std::vector<double> row_ranges(const Tensor& w) {
  const int64_t out = w.size(0), in = w.size(1);
  std::vector<double> r(size_t(out), 0.0);
  const float* p = w.data<float>();
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) r[size_t(o)] = std::max(r[size_t(o)], double(std::fabs(p[o * in + i])));
  return r;
}

void scale_columns(Tensor& w, const std::vector<double>& s) {  // w[:, i] *= s_i
  const int64_t out = w.size(0), in = w.size(1);
  float* p = w.data<float>();
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) p[o * in + i] = float(double(p[o * in + i]) * s[size_t(i)]);
}

void divide_rows(Tensor& w, const std::vector<double>& s) {  // w[i, :] /= s_i (or a vector: w[i] /= s_i)
  const int64_t out = w.size(0), in = w.numel() / std::max<int64_t>(1, w.size(0));
  float* p = w.data<float>();
  for (int64_t o = 0; o < out; ++o)
    for (int64_t i = 0; i < in; ++i) p[o * in + i] = float(double(p[o * in + i]) / s[size_t(o)]);
}

double max_deviation(const std::vector<double>& s) {
  double d = 0;
  for (double v : s) d = std::max(d, std::fabs(v - 1.0));
  return d;
}

}  // namespace

std::vector<double> cle_scales(const std::vector<double>& r1, const std::vector<double>& r2) {
  if (r1.size() != r2.size()) throw_error("cle_scales: ", r1.size(), " producer ranges for ", r2.size(), " consumer ranges");
  std::vector<double> s(r1.size(), 1.0);
  for (size_t i = 0; i < r1.size(); ++i)
    if (r1[i] > 0 && r2[i] > 0 && std::isfinite(r1[i]) && std::isfinite(r2[i])) s[i] = std::sqrt(r1[i] / r2[i]);
  return s;
}

int cle_equalize_block(LlamaModel& model, int layer, const CleOptions& o) {
  LlamaBlock& b = model.block(layer);
  const LlamaConfig& c = model.config();
  const Device dev = b.attn_norm.value().device();
  const std::vector<std::string> names = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                          "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
  std::map<std::string, Tensor> w, bias;
  for (const auto& n : names) {
    w[n] = host_copy((*slot_of(b, n))->effective_weight());
    const Tensor bb = (*slot_of(b, n))->bias();
    if (bb.defined()) bias[n] = host_copy(bb);
  }
  Tensor g1 = host_copy(b.attn_norm.value()), g2 = host_copy(b.ffn_norm.value());
  const bool scale_vo = c.n_heads == c.n_kv_heads;
  auto abs_vec = [](const Tensor& t) {
    std::vector<double> r(size_t(t.numel()));
    for (int64_t i = 0; i < t.numel(); ++i) r[size_t(i)] = std::fabs(double(t.data<float>()[i]));
    return r;
  };
  auto norm_pair = [&](Tensor& gamma, const std::vector<std::string>& consumers) {
    std::vector<const Tensor*> ws;
    for (const auto& n : consumers) ws.push_back(&w[n]);
    const std::vector<double> s = cle_scales(abs_vec(gamma), column_ranges(ws));
    Tensor gv = gamma.view({gamma.numel(), 1});
    divide_rows(gv, s);
    for (const auto& n : consumers) scale_columns(w[n], s);
    return max_deviation(s);
  };
  auto linear_pair = [&](const std::string& producer, const std::string& consumer) {
    const std::vector<double> s = cle_scales(row_ranges(w[producer]), column_ranges({&w[consumer]}));
    divide_rows(w[producer], s);
    if (bias.count(producer)) {
      Tensor bv = bias[producer].view({bias[producer].numel(), 1});
      divide_rows(bv, s);
    }
    scale_columns(w[consumer], s);
    return max_deviation(s);
  };
  int rounds = 0;
  while (rounds < std::max(1, o.max_iterations)) {
    ++rounds;
    double d = norm_pair(g1, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"});
    d = std::max(d, norm_pair(g2, {"mlp.gate_proj", "mlp.up_proj"}));
    d = std::max(d, linear_pair("mlp.up_proj", "mlp.down_proj"));
    if (scale_vo) d = std::max(d, linear_pair("self_attn.v_proj", "self_attn.o_proj"));
    if (d < o.tolerance) break;
  }
  b.attn_norm = Var(g1.to(dev));
  b.ffn_norm = Var(g2.to(dev));
  for (const auto& n : names) {
    auto* slot = slot_of(b, n);
    *slot = std::make_shared<DenseLinear>(w[n].to(dev), bias.count(n) ? bias[n].to(dev) : Tensor(), false);
  }
  return rounds;
}

std::string CleMethod::options_key() const {
  return "iters=" + std::to_string(o_.max_iterations) + ",tol=" + key_number(o_.tolerance) +
         ",bias_correction=" + std::to_string(o_.bias_correction);
}

void CleMethod::quantize_block(BlockContext& ctx, std::vector<LinearReport>& reports) {
  cle_equalize_block(ctx.model, ctx.layer, o_);
  LlamaBlock& b = ctx.model.block(ctx.layer);
  // Inputs of the equalized block (for the error reports and E[x] of bias correction): all rows
  // for the means, a sample for the reports.
  std::map<std::string, Tensor> mean_x, sample_x;
  std::map<std::string, int64_t> rows;
  ctx.run_block(ctx.inputs, [&](const std::string& name, const Tensor& x) {
    const Tensor xc = x.to(Device::CPU).to(DType::F32).contiguous();
    const int64_t n = xc.size(0), in = xc.size(1);
    Tensor& m = mean_x[name];
    if (!m.defined()) m = Tensor::zeros({in});
    for (int64_t r = 0; r < n; ++r)
      for (int64_t i = 0; i < in; ++i) m.data<float>()[i] += xc.data<float>()[r * in + i];
    rows[name] += n;
    if (!sample_x.count(name)) sample_x[name] = report_sample(xc).clone();
  });
  for (auto& [name, slot] : b.linears()) {
    const Device dev = (*slot)->effective_weight().device();
    const Tensor w = host_copy((*slot)->effective_weight());
    QuantizedTensor q = rtn_quantize(w, ctx.format_of(name, f_));
    const Tensor deq = q.dequantize();
    Tensor bias = (*slot)->bias();
    if (bias.defined() && o_.bias_correction && rows[name] > 0) {
      // b -= (Q - W) E[x]
      bias = host_copy(bias);
      const int64_t out = w.size(0), in = w.size(1);
      const float* mx = mean_x[name].data<float>();
      for (int64_t o = 0; o < out; ++o) {
        double d = 0;
        for (int64_t i = 0; i < in; ++i)
          d += (double(deq.data<float>()[o * in + i]) - double(w.data<float>()[o * in + i])) * double(mx[i]) / double(rows[name]);
        bias.data<float>()[o] = float(double(bias.data<float>()[o]) - d);
      }
      bias = bias.to(dev);
      ++bias_corrected_;
    }
    LinearReport r;
    r.name = "model.layers." + std::to_string(ctx.layer) + "." + name;
    r.rel_error = relative_output_error(sample_x.at(name), w, deq);
    r.params = q.out_features() * q.in_features();
    r.bits_per_weight = q.fmt().bits_per_weight(q.out_features(), q.in_features());
    reports.push_back(r);
    *slot = std::make_shared<QuantLinear>(std::move(q), bias, dev, Tensor(), Tensor(), deq);
  }
}

}  // namespace lowbit
