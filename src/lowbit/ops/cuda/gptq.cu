// GPTQ (Frantar et al. 2022, Algorithm 1) for the uniform integer formats on the GPU: the device
// half of methods/gptq_cuda.cpp, which passes the format's traits row and builds the
// QuantizedTensor. Results equal the CPU reference (methods/gptq.cpp) up to float rounding: the
// same damping, dead columns, act-order permutation, group fitting, codec and block structure.
//
// 1. U = chol(H^-1) upper (gptq.py: torch.linalg.cholesky(torch.cholesky_inverse(
//    torch.linalg.cholesky(H)), upper=True)) without forming H^-1. With J the reversal permutation,
//    factor M = J H J = L' L'^T (potrf); then H^-1 = J L'^-T L'^-1 J = V^T V with V = J L'^-1 J,
//    which is upper triangular with a positive diagonal, so by uniqueness V = U. One Cholesky and
//    one triangular inverse (trtri) instead of potrf + potri + potrf: half the flops, and the
//    condition number met is that of L' (sqrt(cond H)) rather than that of H^-1.
//    Factorization in f64 (default: the CPU reference is f64 and Hopper's f64 tensor cores make it
//    cheap) or f32 (as gptq.py); U is stored in f32 column-major for the sweep.
// 2. Column sweep, block by block (B <= 128 columns, §3 "lazy batch updates"): GPTQ's updates never
//    mix rows, so one warp owns one row: lane l holds columns l, l+32, l+64, l+96 of the block in
//    registers, the block's 128x128 slice of U sits in shared memory, and for each column j the
//    warp quantizes w_j (group parameters fitted when the sweep enters a group, gptq.py
//    find_params(W[:, (i1+i):(i1+i+groupsize)])), computes e = (w_j - q_j) / U_jj and applies
//    w_k -= e U_jk to its later columns (Alg. 1 lines 5-8).
// 3. Trailing update W[:, i2:] -= E U[i1:i2, i2:] with one f32 cuBLAS GEMM (Alg. 1 line 10;
//    gptq.py runs it in f32 without TF32, so does this).
#include <cuda_fp16.h>
#include <cusolverDn.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <numeric>
#include <vector>

#include "lowbit/ops/cuda/cuda_common.h"
#include "lowbit/ops/cuda/cuda_ops.h"

namespace lowbit::ops::cuda {

namespace {

using detail::ptr;

const char* cusolver_status_name(cusolverStatus_t s) {
  switch (s) {
    case CUSOLVER_STATUS_NOT_INITIALIZED: return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED: return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE: return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH: return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_EXECUTION_FAILED: return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR: return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_NOT_SUPPORTED: return "CUSOLVER_STATUS_NOT_SUPPORTED";
    default: return "cusolver error";
  }
}

#define LB_CUSOLVER_CHECK(call)                                                                           \
  do {                                                                                                    \
    const cusolverStatus_t lb_s_ = (call);                                                                \
    if (lb_s_ != CUSOLVER_STATUS_SUCCESS)                                                                 \
      throw_error("cuSOLVER error: ", #call, " failed at ", __FILE__, ":", __LINE__, ": ",                 \
                  cusolver_status_name(lb_s_), " (", int(lb_s_), ")");                                     \
  } while (0)

// One cuSOLVER handle for the process, bound to the backend's stream (created on first use).
cusolverDnHandle_t solver() {
  static std::once_flag once;
  static cusolverDnHandle_t h = nullptr;
  std::call_once(once, [] {
    LB_CUSOLVER_CHECK(cusolverDnCreate(&h));
    LB_CUSOLVER_CHECK(cusolverDnSetStream(h, cuda_rt::stream()));
  });
  return h;
}

class SolverParams {
 public:
  SolverParams() { LB_CUSOLVER_CHECK(cusolverDnCreateParams(&p_)); }
  ~SolverParams() { cusolverDnDestroyParams(p_); }
  SolverParams(const SolverParams&) = delete;
  SolverParams& operator=(const SolverParams&) = delete;
  cusolverDnParams_t get() const { return p_; }

 private:
  cusolverDnParams_t p_ = nullptr;
};

constexpr int kMaxBlock = 128;          // columns of one sweep block on the GPU
constexpr int kVpl = kMaxBlock / 32;    // values of a row held by each lane
constexpr int kSweepWarps = 8;          // rows (warps) per thread block of the sweep
constexpr unsigned kFull = 0xffffffffu;

// The integer codec of the format table on the device: core/format_traits.h's
// int_params_from_range / int_code / int_value, the functions format.cpp's CPU codec calls, so the
// two agree bit for bit. A scale that does not fit in f16 raises *err.
struct IntCodec {
  FormatTraits f;  // an IntAsym or IntSym row
  int64_t groups;  // groups per row

  __device__ float2 params(float lo, float hi, int* err) const {
    const IntParams p = int_params_from_range(f, lo, hi);
    if (!isfinite(p.scale)) {
      atomicExch(err, 1);
      return make_float2(1.0f, p.zero);
    }
    return make_float2(p.scale, p.zero);
  }
  __device__ uint8_t encode(float x, float2 p) const {
    return int_code(x, p.x, p.y, int_code_min(f), float(f.qmax()));
  }
  __device__ float decode(uint8_t q, float2 p) const { return int_value(q, p.x, p.y); }
};

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// ---- preparation ------------------------------------------------------------------------------

__global__ void nonfinite_kernel(const float* __restrict__ x, int64_t n, int* flag) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    if (!isfinite(x[i])) {
      atomicExch(flag, 1);
      return;
    }
}

__global__ void diag_kernel(const float* __restrict__ h, int64_t n, float* __restrict__ d) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    d[i] = h[i * n + i];
}

// Dead input channels (diag H = 0): W[:, j] = 0 (gptq.py: W[:, dead] = 0).
__global__ void zero_columns_kernel(float* __restrict__ w, int64_t out, int64_t in, const uint8_t* __restrict__ dead) {
  const int64_t n = out * in;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    if (dead[i % in]) w[i] = 0.0f;
}

// wp[:, j] = w[:, perm[j]] (act-order).
__global__ void permute_columns_kernel(const float* __restrict__ w, int64_t out, int64_t in,
                                       const int32_t* __restrict__ perm, float* __restrict__ wp) {
  const int64_t n = out * in;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / in, j = i % in;
    wp[i] = w[r * in + perm[j]];
  }
}

// M = J H[perm][:, perm] J with dead diagonals set to 1 and the dampening percdamp * mean(diag H)
// added (gptq.py: H[dead, dead] = 1; H[diag, diag] += damp), in T. Symmetric, so row- and
// column-major agree.
template <class T>
__global__ void build_m_kernel(const float* __restrict__ h, int64_t n, const int32_t* __restrict__ perm, double damp,
                               T* __restrict__ m) {
  const int64_t nn = n * n;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < nn; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t a = n - 1 - i / n, b = n - 1 - i % n;  // entry (a, b) of the permuted H
    const int64_t pa = perm ? perm[a] : a, pb = perm ? perm[b] : b;
    double v = double(h[pa * n + pb]);
    if (a == b) v = (v == 0.0 ? 1.0 : v) + damp;
    m[i] = T(v);
  }
}

// U (f32, column-major: U[i + j n] = U_ij) from L'^-1 (column-major lower, in T): U = J L'^-1 J,
// so U_ij = (L'^-1)_{n-1-i, n-1-j}, i.e. the storage reversed. The strict lower part is zeroed.
template <class T>
__global__ void reverse_to_u_kernel(const T* __restrict__ linv, int64_t n, float* __restrict__ u) {
  const int64_t nn = n * n;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < nn; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = k % n, j = k / n;
    u[k] = i <= j ? float(linv[nn - 1 - k]) : 0.0f;
  }
}

// Parameters fitted before the sweep (per-channel formats, static groups): min/max of each group
// of W, one warp per (row, group).
__global__ void fit_params_kernel(const float* __restrict__ w, int64_t out, int64_t in, IntCodec c,
                                  float2* __restrict__ params, int* err) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t t = warp; t < out * c.groups; t += nwarps) {
    const int64_t r = t / c.groups, g = t % c.groups;
    const int64_t b = c.f.group_begin(g), e = c.f.group_end(g, in);
    float lo = INFINITY, hi = -INFINITY;
    for (int64_t k = b + lane; k < e; k += 32) {
      const float x = w[r * in + k];
      lo = fminf(lo, x), hi = fmaxf(hi, x);
    }
    lo = warp_min(lo), hi = detail::warp_max(hi);
    if (lane == 0) params[t] = c.params(lo, hi, err);
  }
}

// ---- the column sweep of one block [i1, i1 + cnt) --------------------------------------------

// W: working weight [out, in] (permuted columns under act-order); U: column-major [in, in].
// perm: original column of each working column (null = identity). Codes go to the original column
// order [out, in]; E[r, k] = e of column i1 + k (ld kMaxBlock) for the trailing GEMM.
__global__ void __launch_bounds__(kSweepWarps * 32)
    sweep_kernel(const float* __restrict__ w, int64_t out, int64_t in, const float* __restrict__ u, int64_t i1, int cnt,
                 const int32_t* __restrict__ perm, IntCodec c, int dynamic_groups, float2* __restrict__ params,
                 uint8_t* __restrict__ codes, float* __restrict__ e_out, double* loss, int* err) {
  extern __shared__ float us[];  // us[j * ld + k] = U[i1 + j, i1 + k]
  const int ld = cnt + 1;        // odd stride: conflict-free stores and row reads
  for (int idx = threadIdx.x; idx < cnt * cnt; idx += blockDim.x) {
    const int j = idx % cnt, k = idx / cnt;  // coalesced along the column-major U
    us[j * ld + k] = u[(i1 + j) + (i1 + k) * in];
  }
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  const int64_t i2 = i1 + cnt;
  double my_loss = 0;
  for (int64_t r = warp; r < out; r += nwarps) {
    const float* wrow = w + r * in;
    float v[kVpl], e_own[kVpl];
    uint8_t q_own[kVpl];
#pragma unroll
    for (int m = 0; m < kVpl; ++m) {
      const int k = lane + 32 * m;
      v[m] = k < cnt ? wrow[i1 + k] : 0.0f;
      e_own[m] = 0.0f;
      q_own[m] = 0;
    }
    float2 p = make_float2(1.0f, 0.0f);
    int64_t cur_g = -1;
    for (int jj = 0; jj < cnt; ++jj) {
      const int64_t j = i1 + jj;
      const int64_t col = perm ? perm[j] : j;
      const int owner = jj & 31, mo = jj >> 5;
      float mine = v[0];
#pragma unroll
      for (int m = 1; m < kVpl; ++m)
        if (m == mo) mine = v[m];
      const float wj = __shfl_sync(kFull, mine, owner);
      const int64_t g = c.f.group_of_column(col);
      if (dynamic_groups && col == c.f.group_begin(g)) {
        // The sweep enters group g: fit it on the weights as updated so far. Columns of the group
        // past this block have had the lazy updates of earlier blocks only, as on the CPU.
        const int64_t ge = c.f.group_end(g, in);
        float lo = INFINITY, hi = -INFINITY;
#pragma unroll
        for (int m = 0; m < kVpl; ++m) {
          const int k = lane + 32 * m;
          if (k >= jj && k < cnt && i1 + k < ge) lo = fminf(lo, v[m]), hi = fmaxf(hi, v[m]);
        }
        for (int64_t k = i2 + lane; k < ge; k += 32) lo = fminf(lo, wrow[k]), hi = fmaxf(hi, wrow[k]);
        lo = warp_min(lo), hi = detail::warp_max(hi);
        p = c.params(lo, hi, err);
        if (lane == 0) params[r * c.groups + g] = p;
        cur_g = g;
      } else if (g != cur_g) {  // fitted before the sweep, or by an earlier block
        p = params[r * c.groups + g];
        cur_g = g;
      }
      const uint8_t code = c.encode(wj, p);
      const float q = c.decode(code, p);
      const float e = (wj - q) / us[jj * ld + jj];  // Alg. 1 line 6: E = (W - Q) / [U]_jj
#pragma unroll
      for (int m = 0; m < kVpl; ++m) {
        const int k = lane + 32 * m;
        if (m == mo && lane == owner) e_own[m] = e, q_own[m] = code;
        // Alg. 1 line 7, within the block. __fmul_rn keeps the product rounded on its own (no FMA
        // contraction), as in the CPU loop.
        if (k > jj && k < cnt) v[m] = v[m] - __fmul_rn(e, us[jj * ld + k]);
      }
    }
#pragma unroll
    for (int m = 0; m < kVpl; ++m) {
      const int k = lane + 32 * m;
      if (k < cnt) {
        const int64_t col = perm ? perm[i1 + k] : i1 + k;
        codes[r * in + col] = q_own[m];
        e_out[r * kMaxBlock + k] = e_own[m];
        my_loss += 0.5 * double(e_own[m]) * double(e_own[m]);
      }
    }
  }
  my_loss = detail::warp_sum(my_loss);
  if (lane == 0 && my_loss != 0.0) atomicAdd(loss, my_loss);
}

// ---- outputs --------------------------------------------------------------------------------

// Packs each row's codes as the format table specifies (core/format_traits.h packed_code_byte,
// the function the CPU pack calls): one packed byte per thread.
__global__ void pack_kernel(const uint8_t* __restrict__ codes, int64_t out, int64_t in, int bits, int64_t row_bytes,
                            uint8_t* __restrict__ packed) {
  const int64_t n = out * row_bytes;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / row_bytes, b = i % row_bytes;
    packed[i] = packed_code_byte(bits, codes + r * in, in, b);
  }
}

// f16 scale / zero storage (exact: the parameters came from params()) and the dequantized weight.
__global__ void params_to_f16_kernel(const float2* __restrict__ p, int64_t n, __half* __restrict__ s,
                                     __half* __restrict__ z) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    s[i] = __float2half_rn(p[i].x);
    if (z) z[i] = __float2half_rn(p[i].y);
  }
}

__global__ void dequantize_kernel(const uint8_t* __restrict__ codes, const float2* __restrict__ p, int64_t out,
                                  int64_t in, IntCodec c, float* __restrict__ wq) {
  const int64_t n = out * in;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / in, k = i % in;
    wq[i] = c.decode(codes[i], p[r * c.groups + c.f.group_of_column(k)]);
  }
}

// ---- factorization ----------------------------------------------------------------------------

template <class T>
constexpr cudaDataType_t cuda_type() {
  return sizeof(T) == 8 ? CUDA_R_64F : CUDA_R_32F;
}

int read_info(const Tensor& info) { return int(info.to(Device::CPU).data<int32_t>()[0]); }

// U = chol(H[perm][:, perm] + damp I)^-1 upper, f32 column-major [n, n] (see the top of the file).
template <class T>
Tensor inverse_cholesky_upper(const Tensor& h, int64_t n, const int32_t* perm, double damp) {
  const DType dt = sizeof(T) == 8 ? DType::F64 : DType::F32;
  Tensor m = Tensor::empty({n, n}, dt, Device::CUDA);
  const cudaStream_t st = cuda_rt::stream();
  build_m_kernel<T><<<detail::grid_for(n * n, 256), 256, 0, st>>>(ptr<float>(h), n, perm, damp, ptr<T>(m));
  LB_CUDA_LAUNCH_CHECK("build_m_kernel");
  cusolverDnHandle_t hs = solver();
  SolverParams params;
  Tensor info = Tensor::zeros({1}, DType::I32, Device::CUDA);
  size_t dev_ws = 0, host_ws = 0;
  LB_CUSOLVER_CHECK(cusolverDnXpotrf_bufferSize(hs, params.get(), CUBLAS_FILL_MODE_LOWER, n, cuda_type<T>(),
                                                m.raw_data(), n, cuda_type<T>(), &dev_ws, &host_ws));
  {
    Tensor ws = Tensor::empty({int64_t(std::max<size_t>(dev_ws, 1))}, DType::U8, Device::CUDA);
    std::vector<uint8_t> hws(std::max<size_t>(host_ws, 1));
    LB_CUSOLVER_CHECK(cusolverDnXpotrf(hs, params.get(), CUBLAS_FILL_MODE_LOWER, n, cuda_type<T>(), m.raw_data(), n,
                                       cuda_type<T>(), ws.raw_data(), dev_ws, hws.data(), host_ws, ptr<int>(info)));
    const int bad = read_info(info);  // synchronises: hws must outlive the call
    if (bad > 0)
      throw_error("Cholesky: matrix is not positive definite (leading minor ", bad,
                  " of the reversed Hessian, GPU factorization); increase the dampening (percdamp) or use more "
                  "calibration data");
    if (bad < 0) throw_error("cusolverDnXpotrf: invalid argument ", -bad);
  }
  LB_CUSOLVER_CHECK(cusolverDnXtrtri_bufferSize(hs, CUBLAS_FILL_MODE_LOWER, CUBLAS_DIAG_NON_UNIT, n, cuda_type<T>(),
                                                m.raw_data(), n, &dev_ws, &host_ws));
  {
    Tensor ws = Tensor::empty({int64_t(std::max<size_t>(dev_ws, 1))}, DType::U8, Device::CUDA);
    std::vector<uint8_t> hws(std::max<size_t>(host_ws, 1));
    LB_CUSOLVER_CHECK(cusolverDnXtrtri(hs, CUBLAS_FILL_MODE_LOWER, CUBLAS_DIAG_NON_UNIT, n, cuda_type<T>(),
                                       m.raw_data(), n, ws.raw_data(), dev_ws, hws.data(), host_ws, ptr<int>(info)));
    const int bad = read_info(info);
    if (bad > 0) throw_error("GPTQ: Cholesky factor is singular at ", bad, "; increase the dampening (percdamp)");
    if (bad < 0) throw_error("cusolverDnXtrtri: invalid argument ", -bad);
  }
  Tensor u = Tensor::empty({n, n}, DType::F32, Device::CUDA);
  reverse_to_u_kernel<T><<<detail::grid_for(n * n, 256), 256, 0, st>>>(ptr<T>(m), n, ptr<float>(u));
  LB_CUDA_LAUNCH_CHECK("reverse_to_u_kernel");
  return u;
}

bool any_nonfinite(const Tensor& x) {
  Tensor flag = Tensor::zeros({1}, DType::I32, Device::CUDA);
  nonfinite_kernel<<<detail::grid_for(x.numel(), 256), 256, 0, cuda_rt::stream()>>>(ptr<float>(x), x.numel(),
                                                                                  ptr<int>(flag));
  LB_CUDA_LAUNCH_CHECK("nonfinite_kernel");
  return read_info(flag) != 0;
}

}  // namespace

GptqIntResult gptq_int(const Tensor& w_in, const Tensor& h_in, const FormatTraits& f, const GptqKernelOptions& a) {
  LB_CUDA_OP("gptq_int");
  const char* name = f.name ? f.name : "int";
  LB_CHECK(w_in.defined() && w_in.dim() == 2 && w_in.dtype() == DType::F32 && w_in.device() == Device::CUDA, "gptq [",
           name, "] (cuda): weight must be f32 [out, in] on cuda, got ", w_in.defined() ? w_in.describe() : "undefined");
  const int64_t out = w_in.size(0), in = w_in.size(1);
  LB_CHECK(h_in.defined() && h_in.dim() == 2 && h_in.size(0) == in && h_in.size(1) == in &&
               h_in.dtype() == DType::F32 && h_in.device() == Device::CUDA,
           "gptq [", name, "] (cuda): Hessian must be f32 [", in, ", ", in, "] on cuda, got ",
           h_in.defined() ? h_in.describe() : "undefined");
  LB_CHECK(f.kind == QuantKind::IntAsym || f.kind == QuantKind::IntSym, "gptq [", name,
           "] (cuda): only the uniform integer formats are supported");
  LB_CHECK(f.bits >= 2 && f.bits <= 8 && f.bits != 5 && f.bits != 6 && f.bits != 7, "gptq (cuda): unsupported bits ",
           f.bits);
  LB_CHECK(a.block_size > 0 && a.block_size <= kMaxBlock, "gptq (cuda): block_size must be in [1, ", kMaxBlock,
           "], got ", a.block_size);
  LB_CHECK(f.group_size >= 0, "gptq (cuda): bad group size");
  const bool symmetric = f.kind == QuantKind::IntSym;
  const int64_t row_bytes = f.row_bytes(in);
  LB_CHECK(in <= INT32_MAX && out <= INT32_MAX, "gptq (cuda): weight too large for cuBLAS: ", w_in.describe());
  const cudaStream_t st = cuda_rt::stream();
  const Tensor h = h_in.contiguous();
  Tensor w = w_in.contiguous().clone();  // working copy, modified in place
  if (any_nonfinite(w)) throw_error("gptq [", name, "]: weight has a non-finite value");
  if (any_nonfinite(h)) throw_error("gptq [", name, "]: Hessian has a non-finite value");

  GptqIntResult res;
  const IntCodec c{f, f.n_groups(in)};
  const bool grouped = f.group_size > 0;
  const bool static_groups = grouped && (a.static_groups || a.act_order);

  // diag(H) on the host (n floats): dead columns, the damping and the act-order permutation are
  // computed exactly as on the CPU (same double arithmetic, same stable sort).
  std::vector<double> diag(static_cast<size_t>(in));
  {
    Tensor d = Tensor::empty({in}, DType::F32, Device::CUDA);
    diag_kernel<<<detail::grid_for(in, 256), 256, 0, st>>>(ptr<float>(h), in, ptr<float>(d));
    LB_CUDA_LAUNCH_CHECK("diag_kernel");
    Tensor dh = d.to(Device::CPU);
    for (int64_t j = 0; j < in; ++j) diag[size_t(j)] = double(dh.data<float>()[j]);
  }
  std::vector<uint8_t> dead(static_cast<size_t>(in), 0);
  for (int64_t j = 0; j < in; ++j)
    if (diag[size_t(j)] == 0.0) {
      diag[size_t(j)] = 1.0;
      dead[size_t(j)] = 1;
      ++res.dead_columns;
    }
  if (res.dead_columns > 0) {
    Tensor dd = Tensor::empty({in}, DType::U8, Device::CUDA);
    LB_CUDA_CHECK(cudaMemcpyAsync(dd.raw_data(), dead.data(), size_t(in), cudaMemcpyHostToDevice, st));
    zero_columns_kernel<<<detail::grid_for(out * in, 256), 256, 0, st>>>(ptr<float>(w), out, in, ptr<uint8_t>(dd));
    LB_CUDA_LAUNCH_CHECK("zero_columns_kernel");
    LB_CUDA_CHECK(cudaStreamSynchronize(st));  // `dead` is pageable host memory
  }
  double mean_diag = 0;
  for (int64_t j = 0; j < in; ++j) mean_diag += diag[size_t(j)] / double(in);
  const double damp = a.percdamp * mean_diag;
  std::vector<int32_t> perm(static_cast<size_t>(in));
  std::iota(perm.begin(), perm.end(), 0);
  if (a.act_order)
    std::stable_sort(perm.begin(), perm.end(), [&](int32_t x, int32_t y) { return diag[size_t(x)] > diag[size_t(y)]; });
  Tensor perm_d;
  if (a.act_order) {
    perm_d = Tensor::empty({in}, DType::I32, Device::CUDA);
    LB_CUDA_CHECK(cudaMemcpyAsync(perm_d.raw_data(), perm.data(), size_t(in) * 4, cudaMemcpyHostToDevice, st));
    LB_CUDA_CHECK(cudaStreamSynchronize(st));
  }
  const int32_t* pperm = a.act_order ? ptr<int32_t>(perm_d) : nullptr;

  Tensor err = Tensor::zeros({1}, DType::I32, Device::CUDA);
  Tensor params = Tensor::empty({out * c.groups * 2}, DType::F32, Device::CUDA);  // float2 (scale, zero)
  float2* pp = reinterpret_cast<float2*>(params.raw_data());
  if (!grouped || static_groups) {  // fitted on W (dead columns zeroed) before the sweep
    fit_params_kernel<<<detail::grid_for(out * c.groups * 32, 256), 256, 0, st>>>(ptr<float>(w), out, in, c, pp,
                                                                                  ptr<int>(err));
    LB_CUDA_LAUNCH_CHECK("fit_params_kernel");
  }
  if (a.act_order) {
    Tensor wp = Tensor::empty({out, in}, DType::F32, Device::CUDA);
    permute_columns_kernel<<<detail::grid_for(out * in, 256), 256, 0, st>>>(ptr<float>(w), out, in, pperm,
                                                                          ptr<float>(wp));
    LB_CUDA_LAUNCH_CHECK("permute_columns_kernel");
    w = wp;
  }

  const Tensor u = a.fp64_factorization ? inverse_cholesky_upper<double>(h, in, pperm, damp)
                                        : inverse_cholesky_upper<float>(h, in, pperm, damp);

  Tensor codes = Tensor::empty({out, in}, DType::U8, Device::CUDA);
  Tensor e = Tensor::empty({out, int64_t(kMaxBlock)}, DType::F32, Device::CUDA);
  Tensor loss = Tensor::zeros({1}, DType::F64, Device::CUDA);
  const int bs = int(a.block_size);
  const size_t smem = size_t(bs) * size_t(bs + 1) * sizeof(float);
  static std::once_flag smem_once;
  std::call_once(smem_once, [] {
    LB_CUDA_CHECK(cudaFuncSetAttribute(sweep_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       int(kMaxBlock * (kMaxBlock + 1) * sizeof(float))));
  });
  const int64_t ctas = std::min<int64_t>((out + kSweepWarps - 1) / kSweepWarps, int64_t(cuda_rt::num_sms()) * 3);
  const float minus_one = -1.0f, one = 1.0f;
  for (int64_t i1 = 0; i1 < in; i1 += bs) {
    const int cnt = int(std::min<int64_t>(bs, in - i1));
    const int64_t i2 = i1 + cnt;
    sweep_kernel<<<unsigned(ctas), kSweepWarps * 32, smem, st>>>(ptr<float>(w), out, in, ptr<float>(u), i1, cnt, pperm,
                                                                 c, grouped && !static_groups ? 1 : 0, pp,
                                                                 ptr<uint8_t>(codes), ptr<float>(e),
                                                                 ptr<double>(loss), ptr<int>(err));
    LB_CUDA_LAUNCH_CHECK("sweep_kernel");
    if (i2 < in) {
      // Row-major W[:, i2:] -= E [out, cnt] . U[i1:i2, i2:], as the column-major product
      // W^T[i2:, :] -= U[i1:i2, i2:]^T E^T (U is column-major, E^T is E's storage).
      LB_CUBLAS_CHECK(cublasGemmEx(cuda_rt::cublas(), CUBLAS_OP_T, CUBLAS_OP_N, int(in - i2), int(out), cnt, &minus_one,
                                   ptr<float>(u) + i1 + i2 * in, CUDA_R_32F, int(in), ptr<float>(e), CUDA_R_32F,
                                   kMaxBlock, &one, ptr<float>(w) + i2, CUDA_R_32F, int(in), CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT));
    }
  }
  if (read_info(err) != 0)
    throw_error("[", name, "] a group scale does not fit in f16 (weights too large: max ~", 65504.0f * float(f.qmax()),
                ")");
  res.loss = loss.to(Device::CPU).data<double>()[0];

  res.codes = Tensor::empty({out, row_bytes}, DType::U8, Device::CUDA);
  pack_kernel<<<detail::grid_for(out * row_bytes, 256), 256, 0, st>>>(ptr<uint8_t>(codes), out, in, f.bits, row_bytes,
                                                                    ptr<uint8_t>(res.codes));
  LB_CUDA_LAUNCH_CHECK("pack_kernel");
  res.scales = Tensor::empty({out, c.groups}, DType::F16, Device::CUDA);
  if (!symmetric) res.zeros = Tensor::empty({out, c.groups}, DType::F16, Device::CUDA);
  params_to_f16_kernel<<<detail::grid_for(out * c.groups, 256), 256, 0, st>>>(
      pp, out * c.groups, ptr<__half>(res.scales), symmetric ? nullptr : ptr<__half>(res.zeros));
  LB_CUDA_LAUNCH_CHECK("params_to_f16_kernel");
  if (a.want_dequantized) {
    res.dequantized = Tensor::empty({out, in}, DType::F32, Device::CUDA);
    dequantize_kernel<<<detail::grid_for(out * in, 256), 256, 0, st>>>(ptr<uint8_t>(codes), pp, out, in, c,
                                                                      ptr<float>(res.dequantized));
    LB_CUDA_LAUNCH_CHECK("dequantize_kernel");
  }
  return res;
}

}  // namespace lowbit::ops::cuda
