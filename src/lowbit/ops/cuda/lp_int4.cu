// CUDA bodies of INT4 training's quantizers (ops/lp_int4.h). The arithmetic is ops/lp_int4_math.h's
// and lp_quant_math.h's, the functions the CPU reference bodies call, and every random draw is the
// counter-based lp::uniform of the same (seed, index), so the results equal the CPU's bit for bit
// (tests/ops/test_parity.cpp, Parity.LpInt4):
//   lp_int4_hq        copy x -> y; a scan of x (amax, and whether it holds NaN/inf: the CPU checks the
//                     input before the transform); one thread per Hadamard group (lp::rht_apply); the
//                     amax of the transformed values (warp max, one atomicMax on the float's bits per
//                     warp: non-negative floats order as integers; the max of a set does not depend on
//                     the order); both read back to the host (one synchronisation); s = amax / 7 on the
//                     host in f32 as the CPU; one thread per element (lp::int4_qdq); with `back`, the
//                     inverse transform per group.
//   lp_int4_bitsplit  the scan of g read back; one thread per element (lp::int4_bitsplit, element i
//                     drawing lp::uniform(mix64(seed ^ 1), i)).
//   lp_int4_lss       the row norms of hi, lo and the partner in f64, each row summed in column order
//                     by one thread (as the CPU body; the rows' 32-column slices staged through shared
//                     memory so that the reads are coalesced), read back to the host (3T doubles); the
//                     scores, the water-filled probabilities and the keep draws on the host with the
//                     CPU body's own functions (lp::lss_probabilities, lp::lss_factors: they need the
//                     whole score vector, and 2T draws cost nothing); the 2T row factors uploaded; one
//                     thread per element (lp::lss_combine).
// f32 only (f64 exists on the CPU for gradient checks). Emulated, like lp_quantize: the INT4 values are
// quantized and dequantized in f32, the GEMMs that read them are f32 cuBLAS GEMMs.
#include <cmath>
#include <cstdint>
#include <vector>

#include "lowbit/ops/cuda/cuda_common.h"
#include "lowbit/ops/cuda/cuda_ops.h"
#include "lowbit/ops/lp_int4_math.h"

namespace lowbit::ops::cuda {

namespace {
using detail::ptr;

constexpr int kThreads = 256;

// amax_bits[0] = the bits of max |v| (NaN ignored, as std::max over the CPU's values ignores it);
// bad[0] = 1 when v holds NaN/inf. Both zeroed before the launch.
__global__ void int4_scan_kernel(const float* __restrict__ v, int64_t n, unsigned int* __restrict__ amax_bits,
                                 unsigned int* __restrict__ bad) {
  float m = 0.0f;
  unsigned int b = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float a = v[i];
    if (!isfinite(a)) b = 1;
    m = fmaxf(m, fabsf(a));
  }
  m = detail::warp_max(m);
  b = __any_sync(0xffffffffu, b) ? 1u : 0u;
  if ((threadIdx.x & 31) == 0) {
    atomicMax(amax_bits, __float_as_uint(m));
    if (b) atomicOr(bad, 1u);
  }
}

// Each row's consecutive groups of `block` columns (a shorter last group untouched): one thread per group.
__global__ void int4_rht_kernel(float* __restrict__ v, int64_t R, int64_t C, int block, uint64_t seed, bool inverse) {
  const int64_t groups = C / block, total = R * groups;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += int64_t(gridDim.x) * blockDim.x)
    lp::rht_apply(v + (t / groups) * C + (t % groups) * block, 1, block, seed, inverse);
}

__global__ void int4_qdq_kernel(float* __restrict__ v, int64_t n, float s) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    v[i] = lp::int4_qdq(v[i], s);
}

__global__ void int4_bitsplit_kernel(const float* __restrict__ g, float* __restrict__ hi, float* __restrict__ lo,
                                     int64_t n, float s_hi, float s_lo, uint64_t sr_seed) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float h, l;
    lp::int4_bitsplit(g[i], s_hi, s_lo, lp::uniform(sr_seed, uint64_t(i)), h, l);
    hi[i] = h;
    lo[i] = l;
  }
}

__global__ void int4_fill_nan_kernel(float* __restrict__ v, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    v[i] = __int_as_float(0x7fc00000);
}

// norm[r] = sqrt(sum_c m[r, c]^2) in f64, the sum in column order (lp::sumsq_step), one thread per
// row; a block's kThreads rows are read 32 columns at a time into shared memory, a warp reading 32
// consecutive columns of one row.
__global__ void int4_row_norm_kernel(const float* __restrict__ m, int64_t rows, int64_t cols, double* __restrict__ norm) {
  __shared__ float tile[kThreads][33];
  const int64_t row0 = int64_t(blockIdx.x) * kThreads;
  double ss = 0;
  for (int64_t c0 = 0; c0 < cols; c0 += 32) {
    for (int e = threadIdx.x; e < kThreads * 32; e += kThreads) {
      const int rr = e >> 5, cc = e & 31;
      const int64_t r = row0 + rr, c = c0 + cc;
      tile[rr][cc] = r < rows && c < cols ? m[r * cols + c] : 0.0f;
    }
    __syncthreads();
    const int width = cols - c0 < 32 ? int(cols - c0) : 32;
    for (int cc = 0; cc < width; ++cc) ss = lp::sumsq_step(ss, double(tile[threadIdx.x][cc]));
    __syncthreads();
  }
  const int64_t r = row0 + threadIdx.x;
  if (r < rows) norm[r] = sqrt(ss);
}

// y[t, c] = hi[t, c] f[t] + lo[t, c] f[T + t]
__global__ void int4_lss_combine_kernel(const float* __restrict__ hi, const float* __restrict__ lo,
                                        const float* __restrict__ f, int64_t T, int64_t N, float* __restrict__ y) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < T * N; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / N;
    y[i] = lp::lss_combine(hi[i], f[t], lo[i], f[T + t]);
  }
}

void check_f32(const char* op, const Tensor& t, const char* name) {
  if (t.defined() && t.dtype() != DType::F32) throw_error(op, ": the CUDA body supports f32, got ", name, " ", t.describe());
}

// Scans v (n > 0) into words[0] (amax bits) and words[1] (bad), which the caller zeroed.
void scan(const float* v, int64_t n, unsigned int* words, cudaStream_t st) {
  int4_scan_kernel<<<detail::grid_for(n, kThreads), kThreads, 0, st>>>(v, n, words, words + 1);
  LB_CUDA_LAUNCH_CHECK("int4_scan_kernel");
}

void fill_nan(float* v, int64_t n, cudaStream_t st) {
  int4_fill_nan_kernel<<<detail::grid_for(n, kThreads), kThreads, 0, st>>>(v, n);
  LB_CUDA_LAUNCH_CHECK("int4_fill_nan_kernel");
}

void rht(float* v, int64_t R, int64_t C, int32_t block, uint64_t seed, bool inverse, cudaStream_t st) {
  const int64_t groups = R * (C / block);
  if (groups == 0) return;
  int4_rht_kernel<<<detail::grid_for(groups, kThreads), kThreads, 0, st>>>(v, R, C, block, seed, inverse);
  LB_CUDA_LAUNCH_CHECK("int4_rht_kernel");
}

// The row norms of m [rows, cols] into norm[0, rows).
void row_norms(const float* m, int64_t rows, int64_t cols, double* norm, cudaStream_t st) {
  if (rows == 0) return;
  const int64_t blocks = (rows + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffff) throw_error("lp_int4_lss: ", rows, " rows exceed the CUDA body's grid");
  int4_row_norm_kernel<<<unsigned(blocks), kThreads, 0, st>>>(m, rows, cols, norm);
  LB_CUDA_LAUNCH_CHECK("int4_row_norm_kernel");
}

}  // namespace

void lp_int4_hq(const Tensor& x, int32_t block, uint64_t seed, bool back, Tensor& y, LpInt4Stats* stats) {
  const char* op = "lp_int4_hq";
  LB_CUDA_OP(op);
  check_f32(op, x, "x");
  detail::check_on_gpu(op, y, "y");
  const int64_t R = x.size(0), C = x.size(1), n = R * C;
  if (n == 0) {
    if (stats) *stats = {};
    return;
  }
  cudaStream_t st = cuda_rt::stream();
  float* v = ptr<float>(y);
  LB_CUDA_CHECK(cudaMemcpyAsync(v, ptr<float>(x), size_t(n) * sizeof(float), cudaMemcpyDeviceToDevice, st));
  // words: [0] amax of x, [1] x holds NaN/inf, [2] amax after the transform, [3] unused
  Tensor words = Tensor::empty({4}, DType::I32, Device::CUDA);
  unsigned int* w = static_cast<unsigned int*>(words.raw_data());
  LB_CUDA_CHECK(cudaMemsetAsync(w, 0, 4 * sizeof(uint32_t), st));
  scan(ptr<float>(x), n, w, st);
  const bool transform = block > 0 && C / block > 0;
  if (transform) {
    rht(v, R, C, block, seed, false, st);
    scan(v, n, w + 2, st);
  }
  uint32_t host[4] = {0, 0, 0, 0};
  LB_CUDA_CHECK(cudaMemcpyAsync(host, w, sizeof(host), cudaMemcpyDeviceToHost, st));
  LB_CUDA_CHECK(cudaStreamSynchronize(st));
  if (host[1]) {  // NaN / inf in x: NaN out (the trainer stops with its divergence error)
    if (stats) *stats = {std::nan(""), 0.0};
    fill_nan(v, n, st);
    return;
  }
  const float amax = bits_f32(transform ? host[2] : host[0]), s = amax / lp::kInt4Max;
  if (stats) *stats = {double(amax), double(s)};
  int4_qdq_kernel<<<detail::grid_for(n, kThreads), kThreads, 0, st>>>(v, n, s);
  LB_CUDA_LAUNCH_CHECK("int4_qdq_kernel");
  if (back && transform) rht(v, R, C, block, seed, true, st);
}

void lp_int4_bitsplit(const Tensor& g, uint64_t seed, Tensor& hi, Tensor& lo, LpSplitStats* stats) {
  const char* op = "lp_int4_bitsplit";
  LB_CUDA_OP(op);
  check_f32(op, g, "g");
  detail::check_on_gpu(op, hi, "hi");
  detail::check_on_gpu(op, lo, "lo");
  const int64_t n = g.numel();
  if (n == 0) {
    if (stats) *stats = {};
    return;
  }
  cudaStream_t st = cuda_rt::stream();
  Tensor words = Tensor::empty({2}, DType::I32, Device::CUDA);
  unsigned int* w = static_cast<unsigned int*>(words.raw_data());
  LB_CUDA_CHECK(cudaMemsetAsync(w, 0, 2 * sizeof(uint32_t), st));
  scan(ptr<float>(g), n, w, st);
  uint32_t host[2] = {0, 0};
  LB_CUDA_CHECK(cudaMemcpyAsync(host, w, sizeof(host), cudaMemcpyDeviceToHost, st));
  LB_CUDA_CHECK(cudaStreamSynchronize(st));
  if (host[1]) {
    if (stats) *stats = {std::nan(""), std::nan("")};
    fill_nan(ptr<float>(hi), n, st);
    fill_nan(ptr<float>(lo), n, st);
    return;
  }
  const float s_hi = bits_f32(host[0]) / lp::kInt4Max, s_lo = s_hi / 14.0f;
  if (stats) *stats = {double(s_hi), double(s_lo)};
  if (!(s_hi > 0)) {
    LB_CUDA_CHECK(cudaMemsetAsync(hi.raw_data(), 0, size_t(n) * sizeof(float), st));
    LB_CUDA_CHECK(cudaMemsetAsync(lo.raw_data(), 0, size_t(n) * sizeof(float), st));
    return;
  }
  int4_bitsplit_kernel<<<detail::grid_for(n, kThreads), kThreads, 0, st>>>(ptr<float>(g), ptr<float>(hi), ptr<float>(lo),
                                                                            n, s_hi, s_lo, lp::mix64(seed ^ 0x1ull));
  LB_CUDA_LAUNCH_CHECK("int4_bitsplit_kernel");
}

void lp_int4_lss(const Tensor& hi, const Tensor& lo, const Tensor& partner, bool sample, uint64_t seed, Tensor& y,
                 LpLssStats* stats) {
  const char* op = "lp_int4_lss";
  LB_CUDA_OP(op);
  check_f32(op, hi, "hi");
  check_f32(op, lo, "lo");
  check_f32(op, partner, "partner");
  detail::check_on_gpu(op, y, "y");
  const int64_t T = hi.size(0), N = hi.size(1);
  if (T == 0) {
    if (stats) *stats = {};
    return;
  }
  cudaStream_t st = cuda_rt::stream();
  // norms: [0, T) |hi rows|, [T, 2T) |lo rows|, [2T, 3T) |partner rows|
  Tensor norms = Tensor::empty({3 * T}, DType::F64, Device::CUDA);
  double* nd = static_cast<double*>(norms.raw_data());
  row_norms(ptr<float>(hi), T, N, nd, st);
  row_norms(ptr<float>(lo), T, N, nd + T, st);
  if (partner.defined()) row_norms(ptr<float>(partner), T, partner.size(1), nd + 2 * T, st);
  std::vector<double> norm(size_t(partner.defined() ? 3 * T : 2 * T));
  LB_CUDA_CHECK(cudaMemcpyAsync(norm.data(), nd, norm.size() * sizeof(double), cudaMemcpyDeviceToHost, st));
  LB_CUDA_CHECK(cudaStreamSynchronize(st));
  // the CPU body's steps from here: scores |row_i| |partner row_i|, probabilities, draws
  std::vector<double> score(size_t(2 * T)), p(size_t(2 * T), 1.0);
  for (int64_t half = 0; half < 2; ++half)
    for (int64_t t = 0; t < T; ++t)
      score[size_t(half * T + t)] = norm[size_t(half * T + t)] * (partner.defined() ? norm[size_t(2 * T + t)] : 1.0);
  if (sample) lp::lss_probabilities(score.data(), 2 * T, double(T), p.data());
  std::vector<float> f(size_t(2 * T));
  const lp::LssCounts counts = lp::lss_factors(score.data(), p.data(), 2 * T, seed, f.data());
  if (stats) *stats = {counts.nonzero, counts.kept, counts.certain};
  if (N == 0) return;
  const Tensor fd = Tensor::from_vector(f, {2 * T}).to(Device::CUDA);
  int4_lss_combine_kernel<<<detail::grid_for(T * N, kThreads), kThreads, 0, st>>>(
      ptr<float>(hi), ptr<float>(lo), ptr<float>(fd), T, N, ptr<float>(y));
  LB_CUDA_LAUNCH_CHECK("int4_lss_combine_kernel");
}

}  // namespace lowbit::ops::cuda
