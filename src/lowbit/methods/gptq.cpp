#include "lowbit/methods/gptq.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "lowbit/core/blas.h"
#include "lowbit/core/threads.h"
#include "lowbit/methods/gptq_cuda.h"
#include "lowbit/quant/ggml_grid.h"
#include "lowbit/quant/quantize.h"

namespace lowbit {

// ---- Hessian ----------------------------------------------------------------------------------------

HessianAccumulator::HessianAccumulator(int64_t in_features) : in_(in_features) {
  LB_CHECK(in_features > 0, "HessianAccumulator: in_features must be > 0, got ", in_features);
  xtx_.assign(size_t(in_ * in_), 0.0);
}

void HessianAccumulator::add(const Tensor& x) {
  LB_CHECK(x.defined() && x.dim() >= 1 && x.size(-1) == in_, "HessianAccumulator::add: expected rows of width ",
           in_, ", got ", x.describe());
  if (x.numel() == 0) return;
  Tensor xd = x.to(Device::CPU).to(DType::F64).contiguous();
  int64_t n = xd.numel() / in_;
  const double* p = xd.data<double>();
  for (int64_t i = 0; i < xd.numel(); ++i)
    LB_CHECK(std::isfinite(p[i]), "HessianAccumulator::add: non-finite input value at row ", i / in_,
             ", channel ", i % in_);
  // X^T X accumulated into the upper triangle (OpenBLAS threads: syrk has no split of its own here).
  BlasThreadsGuard blas_threads;
  cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, int(in_), int(n), 1.0, p, int(in_), 1.0, xtx_.data(),
              int(in_));
  n_ += n;
}

Tensor HessianAccumulator::hessian() const {
  LB_CHECK(n_ > 0, "HessianAccumulator: no calibration rows were added");
  Tensor h = Tensor::empty({in_, in_});
  float* ph = h.data<float>();
  double scale = 2.0 / double(n_);
  for (int64_t i = 0; i < in_; ++i)
    for (int64_t j = i; j < in_; ++j) ph[i * in_ + j] = ph[j * in_ + i] = float(scale * xtx_[size_t(i * in_ + j)]);
  return h;
}

// ---- linear algebra -------------------------------------------------------------------------------

void cholesky_lower_inplace(double* a, int64_t n) {
  // Right-looking blocked Cholesky: factor a diagonal block, solve the panel below it, update the
  // trailing matrix with a rank-kb SYRK.
  const int64_t nb = 64;
  for (int64_t k = 0; k < n; k += nb) {
    int64_t kb = std::min(nb, n - k);
    for (int64_t i = k; i < k + kb; ++i)
      for (int64_t j = k; j <= i; ++j) {
        double s = a[i * n + j];
        for (int64_t p = k; p < j; ++p) s -= a[i * n + p] * a[j * n + p];
        if (i == j) {
          if (!(s > 0))
            throw_error("Cholesky: matrix is not positive definite (pivot ", s, " at column ", i,
                        "); increase the dampening (percdamp) or use more calibration data");
          a[i * n + i] = std::sqrt(s);
        } else {
          a[i * n + j] = s / a[j * n + j];
        }
      }
    int64_t m = n - k - kb;
    if (m > 0) {
      double* a11 = a + k * n + k;
      double* a21 = a + (k + kb) * n + k;
      cblas_dtrsm(CblasRowMajor, CblasRight, CblasLower, CblasTrans, CblasNonUnit, int(m), int(kb), 1.0, a11, int(n),
                  a21, int(n));
      cblas_dsyrk(CblasRowMajor, CblasLower, CblasNoTrans, int(m), int(kb), -1.0, a21, int(n), 1.0, a21 + kb, int(n));
    }
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j) a[i * n + j] = 0.0;
}

std::vector<double> inverse_hessian_cholesky_upper(std::vector<double> h, int64_t n) {
  LB_CHECK(int64_t(h.size()) == n * n, "inverse_hessian_cholesky_upper: ", h.size(), " values for n = ", n);
  BlasThreadsGuard blas_threads;
  cholesky_lower_inplace(h.data(), n);  // H = L L^T
  std::vector<double> linv(size_t(n * n), 0.0);
  for (int64_t i = 0; i < n; ++i) linv[size_t(i * n + i)] = 1.0;
  cblas_dtrsm(CblasRowMajor, CblasLeft, CblasLower, CblasNoTrans, CblasNonUnit, int(n), int(n), 1.0, h.data(), int(n),
              linv.data(), int(n));  // L^{-1}
  std::vector<double>& hinv = h;  // L is no longer needed: reuse its memory
  cblas_dsyrk(CblasRowMajor, CblasLower, CblasTrans, int(n), int(n), 1.0, linv.data(), int(n), 0.0, hinv.data(),
              int(n));  // H^{-1} = L^{-T} L^{-1}, lower triangle
  linv = std::vector<double>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j) hinv[size_t(i * n + j)] = hinv[size_t(j * n + i)];
  cholesky_lower_inplace(hinv.data(), n);  // H^{-1} = L2 L2^T, so U = L2^T
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j) std::swap(hinv[size_t(i * n + j)], hinv[size_t(j * n + i)]);
  return h;  // holds U
}

GptqPhaseSeconds& gptq_phase_seconds() {
  static GptqPhaseSeconds s;
  return s;
}

// ---- GPTQ -----------------------------------------------------------------------------------------

Tensor shrink_hessian_to_diagonal(const Tensor& h, double a) {
  LB_CHECK(a >= 0 && a <= 1, "gptq: hessian_shrink must be in [0, 1], got ", a);
  LB_CHECK(h.defined() && h.dim() == 2 && h.size(0) == h.size(1), "shrink_hessian_to_diagonal: expected a square "
           "matrix, got ", h.defined() ? h.describe() : std::string("undefined"));
  Tensor c = h.to(Device::CPU).to(DType::F32).contiguous().clone();
  const int64_t n = c.size(0);
  float* p = c.data<float>();
  const float keep = float(1.0 - a);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      if (i != j) p[i * n + j] *= keep;
  return h.device() == Device::CPU ? c : c.to(h.device());
}

GptqResult gptq_quantize(const Tensor& w_in, const Tensor& h_raw, const QuantFormat& f, const GptqOptions& opt) {
  LB_CHECK(opt.hessian_shrink >= 0 && opt.hessian_shrink <= 1, "gptq: hessian_shrink must be in [0, 1], got ",
           opt.hessian_shrink);
  const Tensor h_in = opt.hessian_shrink > 0 && h_raw.defined() ? shrink_hessian_to_diagonal(h_raw, opt.hessian_shrink)
                                                                 : h_raw;
  const bool ggml = f.is_ggml_block();
  if (ggml && !ggml_block_grid_supported(f))
    throw_error("gptq [", f.name, "]: GPTQ runs on the ggml block types ", ggml_block_grid_names(),
                "; iq4_xs and tq1_0/tq2_0 are RTN only (use --method rtn)");
  if (!ggml && ((w_in.defined() && w_in.device() == Device::CUDA) || (h_in.defined() && h_in.device() == Device::CUDA)) &&
      gptq_cuda_supports(f, opt))
    return gptq_quantize_cuda(w_in, h_in, f, opt);
  // CPU reference (also the fallback for the formats the GPU path does not cover).
  Tensor w = checked_weight(w_in, f, "gptq").clone();  // modified in place below
  const int64_t out = w.size(0), in = w.size(1), groups = f.n_groups(in);
  LB_CHECK(h_in.defined() && h_in.dim() == 2 && h_in.size(0) == in && h_in.size(1) == in, "gptq [", f.name,
           "]: Hessian must be [", in, ", ", in, "] for a weight ", shape_str(w.shape()), ", got ",
           h_in.defined() ? h_in.describe() : std::string("undefined"));
  LB_CHECK(opt.block_size > 0, "gptq: block_size must be > 0, got ", opt.block_size);
  LB_CHECK(opt.percdamp >= 0 && std::isfinite(opt.percdamp), "gptq: percdamp must be >= 0, got ", opt.percdamp);
  std::vector<double> h;
  {
    Tensor hf = h_in.to(Device::CPU).to(DType::F64).contiguous();
    h.assign(hf.data<double>(), hf.data<double>() + in * in);
  }
  for (double v : h) LB_CHECK(std::isfinite(v), "gptq [", f.name, "]: Hessian has a non-finite value");
  float* pw = w.data<float>();

  GptqResult res;
  // Dead input channels: they never contribute to the output; quantize them to (the code of) 0.
  for (int64_t j = 0; j < in; ++j)
    if (h[size_t(j * in + j)] == 0.0) {
      h[size_t(j * in + j)] = 1.0;
      for (int64_t r = 0; r < out; ++r) pw[r * in + j] = 0.0f;
      ++res.dead_columns;
    }

  const bool grouped = f.granularity == ScaleGranularity::PerGroup;
  const bool static_groups = grouped && (opt.static_groups || opt.act_order);
  const float tensor_scale = ggml ? 1.0f : compute_tensor_scale(f, w);
  // Parameters fitted before the sweep: per-channel / per-tensor formats, and static groups.
  std::vector<GroupParams> params(ggml ? 0 : static_cast<size_t>(out * groups));
  if (!ggml && (!grouped || static_groups)) params = fit_all_group_params(f, w, tensor_scale);
  // ggml block formats (ggml_grid.h): the blocks themselves hold the group parameters; static
  // groups fit them on the original W, dynamic ones when the sweep enters each block (k-quants:
  // d / dmin and every sub-scale there, each later sub-block's scale / min again when the sweep
  // enters it). The k-quant fit is weighted by the Hessian diagonal.
  const int64_t row_bytes = ggml ? f.row_bytes(in) : 0;
  const int64_t sub = ggml ? ggml_grid_sub_block_size(f) : 0;
  std::vector<float> hdiag(ggml ? static_cast<size_t>(in) : 0);
  for (size_t j = 0; j < hdiag.size(); ++j) hdiag[j] = float(h[j * size_t(in) + j]);
  std::vector<uint8_t> blocks(static_cast<size_t>(out * row_bytes));
  if (ggml && static_groups)
    for (int64_t r = 0; r < out; ++r)
      for (int64_t g = 0; g < groups; ++g)
        ggml_grid_fit_block(f, pw + r * in + g * f.group_size, &blocks[size_t(r * row_bytes + g * f.block_bytes)],
                            &hdiag[size_t(g * f.group_size)]);

  // Column order: identity, or decreasing diag(H) (act-order). Stable sort keeps ties in order.
  std::vector<int64_t> perm(static_cast<size_t>(in));
  std::iota(perm.begin(), perm.end(), 0);
  if (opt.act_order)
    std::stable_sort(perm.begin(), perm.end(),
                     [&](int64_t a, int64_t b) { return h[size_t(a * in + a)] > h[size_t(b * in + b)]; });

  // Permuted copies W[:, perm] and H[perm][:, perm]; dampening on the diagonal.
  std::vector<float> wp(static_cast<size_t>(out * in));
  for (int64_t r = 0; r < out; ++r)
    for (int64_t j = 0; j < in; ++j) wp[size_t(r * in + j)] = pw[r * in + perm[size_t(j)]];
  std::vector<double> hp(static_cast<size_t>(in * in));
  double mean_diag = 0;
  for (int64_t j = 0; j < in; ++j) mean_diag += h[size_t(j * in + j)] / double(in);
  for (int64_t i = 0; i < in; ++i)
    for (int64_t j = 0; j < in; ++j) hp[size_t(i * in + j)] = h[size_t(perm[size_t(i)] * in + perm[size_t(j)])];
  for (int64_t j = 0; j < in; ++j) hp[size_t(j * in + j)] += opt.percdamp * mean_diag;
  h = std::vector<double>();  // free: only the permuted copy is used from here on

  // U = chol(H^{-1}) upper, in f32 for the sweep (as the reference implementation).
  std::vector<double> ud = inverse_hessian_cholesky_upper(std::move(hp), in);
  std::vector<float> u(ud.begin(), ud.end());
  ud = std::vector<double>();

  std::vector<uint8_t> codes(ggml ? 0 : static_cast<size_t>(out * in));
  const int64_t bs = opt.block_size;
  std::vector<float> err(static_cast<size_t>(out * bs));
  double loss = 0;
  for (int64_t i1 = 0; i1 < in; i1 += bs) {
    const int64_t i2 = std::min(i1 + bs, in), count = i2 - i1;
    // Rows are independent within a block (the OBS update of Alg. 1 only mixes columns).
#pragma omp parallel for reduction(+ : loss) schedule(static) if (out * count >= 16384)
    for (int64_t r = 0; r < out; ++r) {
      float* wrow = &wp[size_t(r * in)];
      for (int64_t j = i1; j < i2; ++j) {
        const int64_t col = perm[size_t(j)];  // original column
        const int64_t g = f.group_of_column(col);
        if (ggml) {
          uint8_t* blk = &blocks[size_t(r * row_bytes + g * f.block_bytes)];
          const int64_t pos = col - f.group_begin(g);
          if (!static_groups && pos == 0) ggml_grid_fit_block(f, wrow + j, blk, &hdiag[size_t(col)]);
          else if (!static_groups && pos % sub == 0)  // without act-order j == col: wrow + j is the sub-block
            ggml_grid_refit_sub_block(f, blk, int(pos / sub), wrow + j, &hdiag[size_t(col)]);
          const float q = ggml_grid_round(f, blk, int(pos), wrow[j]);
          const float* urow = &u[size_t(j * in)];
          const float e = (wrow[j] - q) / urow[j];
          loss += 0.5 * double(e) * double(e);
          err[size_t(r * bs + (j - i1))] = e;
          for (int64_t k = j + 1; k < i2; ++k) wrow[k] -= e * urow[k];
          continue;
        }
        GroupParams& p = params[size_t(r * groups + g)];
        // Dynamic groups (no act-order, so j == col): fit when the sweep enters the group, on the
        // weights as updated so far.
        if (grouped && !static_groups && col == f.group_begin(g))
          p = fit_group_params(f, wrow + j, f.group_end(g, in) - col, tensor_scale);
        const uint8_t code = f.codec->encode(f, wrow[j], p);
        const float q = f.codec->decode(f, code, p);
        codes[size_t(r * in + col)] = code;
        const float* urow = &u[size_t(j * in)];
        const float e = (wrow[j] - q) / urow[j];  // Alg. 1: E = (W - Q) / [H^-1]_jj, Cholesky form
        loss += 0.5 * double(e) * double(e);
        err[size_t(r * bs + (j - i1))] = e;
        for (int64_t k = j + 1; k < i2; ++k) wrow[k] -= e * urow[k];  // OBS update within the block
      }
    }
    // Lazy batch update of the remaining columns: W[:, i2:] -= E [out, count] . U[i1:i2, i2:].
    if (i2 < in)
      blas::gemm(false, false, out, in - i2, count, -1.0f, err.data(), bs, &u[size_t(i1 * in + i2)], in, 1.0f,
                 &wp[size_t(i2)], in);
  }
  res.loss = loss;
  if (ggml) {
    Tensor t = Tensor::empty({out, row_bytes}, DType::U8);
    std::memcpy(t.data<uint8_t>(), blocks.data(), blocks.size());
    res.q = make_ggml_quantized_tensor(f, out, in, std::move(t), "gptq");
    return res;
  }
  res.q = make_quantized_tensor(f, out, in, codes.data(), params.data(), tensor_scale);
  return res;
}

}  // namespace lowbit
