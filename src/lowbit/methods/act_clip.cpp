#include "lowbit/methods/act_clip.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "lowbit/autograd/variable.h"
#include "lowbit/core/blas.h"
#include "lowbit/core/error.h"
#include "lowbit/methods/pipeline.h"

namespace lowbit {

double act_clip_error(const Tensor& x_in, const std::vector<const Tensor*>& readers, const ActQuantSpec& act, double clip) {
  LB_CHECK(x_in.defined() && x_in.dim() == 2 && x_in.dtype() == DType::F32 && x_in.device() == Device::CPU,
           "act clip search: rows must be f32 [R, in] on the host, got ", x_in.defined() ? x_in.describe() : "none");
  LB_CHECK(act.enabled(), "act clip search: no activation quantizer");
  LB_CHECK(clip > 0 && clip <= 1, "act clip search: clip ", clip, " is not in (0, 1]");
  const Tensor x = x_in.contiguous();
  const int64_t R = x.size(0), in = x.size(1);
  const Tensor q = act_fake_quant(Var(x, false), act.with_clip(clip)).value().contiguous();
  Tensor d = Tensor::empty({R, in});  // Q_c(X) - X
  {
    const float* a = q.data<float>();
    const float* b = x.data<float>();
    float* p = d.data<float>();
    for (int64_t i = 0; i < R * in; ++i) p[i] = a[i] - b[i];
  }
  double err = 0;
  for (const Tensor* w : readers) {
    LB_CHECK(w->dim() == 2 && w->size(1) == in && w->dtype() == DType::F32 && w->device() == Device::CPU,
             "act clip search: a weight reading ", in, " channels must be f32 [out, ", in, "] on the host, got ",
             w->describe());
    const Tensor wc = w->contiguous();
    const int64_t out = wc.size(0);
    Tensor y = Tensor::zeros({R, out});
    blas::gemm(false, true, R, out, in, 1.0f, d.data<float>(), in, wc.data<float>(), in, 0.0f, y.data<float>(), out);
    const float* py = y.data<float>();
    for (int64_t i = 0; i < R * out; ++i) err += double(py[i]) * double(py[i]);
  }
  return err;
}

double search_point_clip(const Tensor& x, const std::vector<const Tensor*>& readers, const ActQuantSpec& act,
                         const std::vector<double>& grid, double* error, double* error_clip1) {
  LB_CHECK(!grid.empty(), "act clip search: the grid is empty");
  double best = grid[0], best_err = std::numeric_limits<double>::infinity(), at1 = -1;
  for (double c : grid) {
    const double e = act_clip_error(x, readers, act, c);
    if (c == 1.0) at1 = e;
    if (e < best_err) best_err = e, best = c;
  }
  if (error) *error = best_err;
  if (error_clip1) *error_clip1 = at1 >= 0 ? at1 : act_clip_error(x, readers, act, 1.0);
  return best;
}

ActClipReport search_act_clips(LlamaModel& model, const Tensor& tokens_in, const ActQuantSpec& act, const ActClipOptions& o) {
  LB_CHECK(tokens_in.dim() == 2 && tokens_in.dtype() == DType::I32 && tokens_in.size(0) >= 1,
           "act clip search: calibration tokens must be i32 [N, T], got ", tokens_in.describe());
  LB_CHECK(o.rows >= 1, "act clip search: rows must be >= 1, got ", o.rows);
  const Tensor tokens = tokens_in.contiguous();
  const int L = model.n_layers();
  static const char* const kReaderOf[kActPoints] = {"self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj",
                                                    "mlp.down_proj"};
  // Sampled rows per (layer, point): every stride-th calibration token.
  const int64_t total_rows = tokens.size(0) * tokens.size(1);
  const int64_t stride = std::max<int64_t>(1, total_rows / o.rows);
  std::vector<std::vector<float>> kept(size_t(L) * kActPoints);
  std::vector<int64_t> width(size_t(L) * kActPoints, 0);
  int64_t row_base = 0;
  std::vector<std::pair<std::string, std::shared_ptr<Linear>*>> slots;
  for (int i = 0; i < L; ++i)
    for (auto& [name, slot] : model.block(i).linears())
      for (int p = 0; p < kActPoints; ++p)
        if (name == kReaderOf[p]) slots.emplace_back(std::to_string(i * kActPoints + p), slot);
  bool finite = true;
  {
    LinearHookScope hooks(slots, [&](const std::string& key, const Tensor& x) {
      const size_t k = size_t(std::stoi(key));
      const Tensor h = x.to(Device::CPU).to(DType::F32).contiguous();
      const int64_t in = h.size(-1), n = h.numel() / in;
      width[k] = in;
      const float* p = h.data<float>();
      for (int64_t r = 0; r < n; ++r)
        if ((row_base + r) % stride == 0 && int64_t(kept[k].size()) < o.rows * in) {
          for (int64_t j = 0; j < in; ++j) finite = finite && std::isfinite(p[r * in + j]);
          kept[k].insert(kept[k].end(), p + r * in, p + (r + 1) * in);
        }
    });
    const ModelTransforms saved = model.transforms();
    ModelTransforms plain = saved;
    plain.act = ActQuantSpec{};
    model.set_transforms(plain);
    try {
      NoGradGuard ng;
      for (int64_t s = 0; s < tokens.size(0); ++s) {  // the blocks only (the head reads no searched point)
        row_base = s * tokens.size(1);
        Var x = model.embed(tokens.slice(0, s, s + 1).contiguous());
        for (int i = 0; i < L; ++i) x = model.block_forward(i, x, 1, tokens.size(1));
      }
    } catch (...) {
      model.set_transforms(saved);
      throw;
    }
    model.set_transforms(saved);
  }
  if (!finite) throw_error("act clip search: the model's activations are not finite on the calibration data");
  const LlamaWeights w = weights_to(model.weights(), Device::CPU);
  auto f32 = [](const Tensor& t) { return t.dtype() == DType::F32 ? t.contiguous() : t.to(DType::F32).contiguous(); };
  ActClipReport rep;
  rep.clips.assign(size_t(L) * kActPoints, 1.0);
  for (int i = 0; i < L; ++i) {
    const LayerWeights& lw = w.layers[size_t(i)];
    const Tensor wq = f32(lw.wq), wk = f32(lw.wk), wv = f32(lw.wv), wo = f32(lw.wo), wg = f32(lw.w_gate),
                 wu = f32(lw.w_up), wd = f32(lw.w_down);
    const std::vector<std::vector<const Tensor*>> readers = {{&wq, &wk, &wv}, {&wo}, {&wg, &wu}, {&wd}};
    for (int p = 0; p < kActPoints; ++p) {
      const size_t k = size_t(i) * kActPoints + size_t(p);
      if (width[k] == 0 || kept[k].empty()) throw_error("act clip search: layer ", i, "'s ", kReaderOf[p], " saw no input");
      const int64_t n = int64_t(kept[k].size()) / width[k];
      rep.rows = std::max(rep.rows, n);
      const Tensor x = Tensor::from_vector(std::move(kept[k]), {n, width[k]});
      double err = 0, err1 = 0;
      rep.clips[k] = search_point_clip(x, readers[size_t(p)], act, o.grid, &err, &err1);
      rep.error_searched += err;
      rep.error_clip1 += err1;
    }
  }
  return rep;
}

}  // namespace lowbit
