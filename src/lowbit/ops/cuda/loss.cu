// Embedding lookup and the losses on the GPU.
//
// Softmax cross-entropy and KL are fused row kernels: one block per row of logits, each thread
// keeping an online log-sum-exp (running max and rescaled sum, one pass over the row), merged
// across the block with warp shuffles. KL needs the two normalisers before it can sum
// P (log P - log Q), so it reads the row twice (the second time from L2), which is more accurate
// than a one-pass formula that cancels large terms. Per-row results go to a small fp32 buffer and
// one block takes the mean in fp64 (deterministic).
//
// Ids and targets that live on the GPU are validated in the kernels: the first bad position is
// recorded with atomicMin in a device word that the host reads back after the launch (one
// synchronisation per call) and raises as lowbit::Error with the same message as the CPU check.
#include <climits>

#include "lowbit/ops/cuda/cuda_ops.h"
#include "lowbit/ops/cuda/elementwise_kernel.cuh"
#include "lowbit/ops/cuda/reduce_kernel.cuh"

namespace lowbit::ops::cuda {

namespace {
using namespace detail;

constexpr int kNoBad = 0x7f7f7f7f;  // memset pattern 0x7f: "no bad position seen"

// A device word holding the first invalid position found by a kernel.
class BadIndex {
 public:
  BadIndex() : buf_(Tensor::empty({1}, DType::I32, Device::CUDA)) {
    LB_CUDA_CHECK(cudaMemsetAsync(buf_.raw_data(), 0x7f, sizeof(int), cuda_rt::stream()));
  }
  int* get() { return static_cast<int*>(buf_.raw_data()); }
  // -1 when every index was valid (synchronises).
  int64_t first() const {
    const int v = int(buf_.item());
    return v == kNoBad ? -1 : v;
  }

 private:
  Tensor buf_;
};

Tensor ids_on_gpu(const Tensor& ids, bool& validated_on_host) {
  validated_on_host = ids.device() == Device::CPU;
  return validated_on_host ? ids.to(Device::CUDA) : ids;
}

template <class T>
__global__ void embedding_fwd_kernel(const T* table, const int32_t* ids, T* out, int64_t V, int64_t D, int* bad) {
  const int64_t i = blockIdx.x;
  const int32_t id = ids[i];
  T* o = out + i * D;
  if (id < 0 || id >= V) {
    if (threadIdx.x == 0) atomicMin(bad, int(i));
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x) o[j] = from_f<T>(0.f);
    return;
  }
  const T* src = table + int64_t(id) * D;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) o[j] = src[j];
}

template <class T>
__global__ void embedding_bwd_kernel(const T* dout, const int32_t* ids, T* dtable, int64_t V, int64_t D, int* bad) {
  const int64_t i = blockIdx.x;
  const int32_t id = ids[i];
  if (id < 0 || id >= V) {
    if (threadIdx.x == 0) atomicMin(bad, int(i));
    return;
  }
  // Rows repeated in ids add into the same table row from several blocks: atomics (order, and so
  // the last bits, may vary between runs when an id repeats).
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) atomicAdd(dtable + int64_t(id) * D + j, dout[i * D + j]);
}

void raise_bad_id(const char* op, const Tensor& ids, int64_t pos, int64_t V) {
  const int64_t id = int64_t(ids.slice(0, pos, pos + 1).item());
  throw_error(op, ": token id ", id, " at position ", pos, " is outside the vocabulary [0, ", V, ")");
}

template <class T>
__global__ void ce_fwd_kernel(const T* z, const int32_t* tgt, int64_t V, T* lse, float* rowloss) {
  const int64_t row = blockIdx.x;
  const T* zr = z + row * V;
  LseState st;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) st.add(to_f(zr[j]));
  const float l = block_lse(st);
  if (threadIdx.x == 0) {
    lse[row] = from_f<T>(l);
    const int32_t t = tgt[row];
    rowloss[row] = (t >= 0 && t < V) ? l - to_f(zr[t]) : 0.f;
  }
}

// loss = sum(rowloss) / #valid targets; validates targets (-1 = ignored).
template <class T>
__global__ void ce_finalize_kernel(const float* rowloss, const int32_t* tgt, int64_t N, int64_t V, T* loss, int* bad) {
  double acc = 0, cnt = 0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const int32_t t = tgt[i];
    if (t < -1 || t >= V) atomicMin(bad, int(i));
    if (t >= 0) {
      acc += rowloss[i];
      cnt += 1;
    }
  }
  acc = block_sum(acc);
  cnt = block_sum(cnt);
  if (threadIdx.x == 0) *loss = from_f<T>(cnt > 0 ? float(acc / cnt) : 0.f);
}

__global__ void count_valid_kernel(const int32_t* tgt, int64_t N, int64_t V, int* count, int* bad) {
  int c = 0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const int32_t t = tgt[i];
    if (t < -1 || t >= V) atomicMin(bad, int(i));
    c += t >= 0;
  }
  c = block_sum(c);
  if (threadIdx.x == 0) *count = c;
}

template <class T>
__global__ void ce_bwd_kernel(const T* dloss, const T* z, const int32_t* tgt, const T* lse, const int* count, int64_t V,
                              T* dz) {
  const int64_t row = blockIdx.x;
  const int32_t t = tgt[row];
  T* dr = dz + row * V;
  const int n = *count;
  if (t < 0 || t >= V || n == 0) {
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) dr[j] = from_f<T>(0.f);
    return;
  }
  const float g = to_f(*dloss) / float(n), l = to_f(lse[row]);
  const T* zr = z + row * V;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    float d = g * expf(to_f(zr[j]) - l);
    if (j == t) d -= g;
    dr[j] = from_f<T>(d);
  }
}

// Per row: log-sum-exp of p and q, then KL = sum_v P_v (log P_v - log Q_v).
template <class T>
__device__ void kl_row(const T* p, const T* q, int64_t V, float& lp, float& lq, float& kl) {
  LseState sp, sq;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    sp.add(to_f(p[j]));
    sq.add(to_f(q[j]));
  }
  lp = block_lse(sp);
  lq = block_lse(sq);
  float acc = 0;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float logp = to_f(p[j]) - lp, logq = to_f(q[j]) - lq;
    acc += expf(logp) * (logp - logq);
  }
  kl = block_sum(acc);
}

template <class T>
__global__ void kl_fwd_kernel(const T* p, const T* q, int64_t V, float* rowkl) {
  const int64_t off = int64_t(blockIdx.x) * V;
  float lp, lq, kl;
  kl_row(p + off, q + off, V, lp, lq, kl);
  if (threadIdx.x == 0) rowkl[blockIdx.x] = kl;
}

template <class T>
__global__ void kl_bwd_kernel(const T* dloss, const T* p, const T* q, int64_t V, int64_t N, T* dp, T* dq) {
  const int64_t off = int64_t(blockIdx.x) * V;
  float lp, lq, kl;
  kl_row(p + off, q + off, V, lp, lq, kl);
  const float g = to_f(*dloss) / float(N);
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float logp = to_f(p[off + j]) - lp, logq = to_f(q[off + j]) - lq;
    const float P = expf(logp), Q = expf(logq);
    if (dq) dq[off + j] = from_f<T>(g * (Q - P));
    if (dp) dp[off + j] = from_f<T>(g * P * (logp - logq - kl));
  }
}

template <class T>
__global__ void mean_kernel(const float* v, int64_t N, T* out) {
  double acc = 0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) acc += v[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) *out = from_f<T>(N > 0 ? float(acc / double(N)) : 0.f);
}

template <class T>
struct SqDiffF {
  const T *a, *b;
  __device__ double operator()(int64_t i) const {
    const double d = double(to_f(a[i])) - double(to_f(b[i]));
    return d * d;
  }
};

template <class T>
struct MseBwdF {  // (a, b) -> (da, db) = ±2 dloss (a - b) / n
  const T* dloss;
  float inv_n;
  __device__ void operator()(const float (&x)[2], float (&y)[2]) const {
    const float g = 2.f * to_f(*dloss) * inv_n;
    y[0] = g * (x[0] - x[1]);
    y[1] = -y[0];
  }
};

template <class T>
struct WeightedSqDiffF {
  const T *a, *b, *w;
  __device__ double operator()(int64_t i) const {
    const double d = double(to_f(a[i])) - double(to_f(b[i]));
    return double(to_f(w[i])) * d * d;
  }
};

template <class T>
struct WeightedSqErrBwdF {  // (a, b, w) -> da = 2 scale dloss w (a - b)
  const T* dloss;
  float two_scale;
  __device__ void operator()(const float (&x)[3], float (&y)[1]) const {
    y[0] = two_scale * to_f(*dloss) * x[2] * (x[0] - x[1]);
  }
};

int row_block(int64_t V) { return V >= 2048 ? 512 : (V >= 256 ? 256 : 64); }

void check_scalar(const char* op, const Tensor& t, const Tensor& ref, const char* name) {
  check_on_gpu(op, t, name);
  if (t.numel() != 1 || t.dtype() != ref.dtype())
    throw_error(op, ": ", name, " must be a one-element ", dtype_name(ref.dtype()), " tensor, got ", t.describe());
}
}  // namespace

void embedding_forward(const Tensor& table, const Tensor& ids, Tensor& out) {
  LB_CUDA_OP("embedding_forward");
  const char* op = "embedding_forward";
  check_on_gpu(op, out, "out");
  const int64_t N = ids.numel(), V = table.size(0), D = table.size(1);
  if (N == 0) return;
  if (N > INT32_MAX) throw_error(op, ": too many ids (", N, ")");
  bool host_checked = false;
  const Tensor idg = ids_on_gpu(ids, host_checked);
  BadIndex bad;
  dispatch(op, table.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    embedding_fwd_kernel<T><<<unsigned(N), 128, 0, cuda_rt::stream()>>>(ptr<T>(table), ptr<int32_t>(idg), ptr<T>(out),
                                                                          V, D, bad.get());
    LB_CUDA_LAUNCH_CHECK("embedding_fwd_kernel");
  });
  if (!host_checked)
    if (const int64_t pos = bad.first(); pos >= 0) raise_bad_id(op, idg, pos, V);
}

void embedding_backward(const Tensor& dout, const Tensor& ids, Tensor& dtable) {
  LB_CUDA_OP("embedding_backward");
  const char* op = "embedding_backward";
  check_on_gpu(op, dout, "dout");
  if (dout.dtype() != dtable.dtype() || !dout.is_contiguous())
    throw_error(op, ": dout ", dout.describe(), " must be a contiguous ", dtype_name(dtable.dtype()));
  const int64_t N = ids.numel(), V = dtable.size(0), D = dtable.size(1);
  dtable.zero_();
  if (N == 0) return;
  if (N > INT32_MAX) throw_error(op, ": too many ids (", N, ")");
  bool host_checked = false;
  const Tensor idg = ids_on_gpu(ids, host_checked);
  BadIndex bad;
  dispatch(op, dtable.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    embedding_bwd_kernel<T><<<unsigned(N), 128, 0, cuda_rt::stream()>>>(ptr<T>(dout), ptr<int32_t>(idg),
                                                                          ptr<T>(dtable), V, D, bad.get());
    LB_CUDA_LAUNCH_CHECK("embedding_bwd_kernel");
  });
  if (!host_checked)
    if (const int64_t pos = bad.first(); pos >= 0) raise_bad_id(op, idg, pos, V);
}

void cross_entropy_forward(const Tensor& logits, const Tensor& targets, Tensor& loss, Tensor& lse) {
  LB_CUDA_OP("cross_entropy_forward");
  const char* op = "cross_entropy_forward";
  check_on_gpu(op, loss, "loss");
  check_on_gpu(op, lse, "lse");
  for (const Tensor* t : TensorList{&loss, &lse})
    if (t->dtype() != logits.dtype()) throw_error(op, ": loss and lse must be ", dtype_name(logits.dtype()), ", got ", t->describe());
  const int64_t N = logits.size(0), V = logits.size(1);
  if (N > INT32_MAX) throw_error(op, ": too many rows (", N, ")");
  bool host_checked = false;
  const Tensor tg = ids_on_gpu(targets, host_checked);
  BadIndex bad;
  Tensor rowloss = Tensor::empty({N}, DType::F32, Device::CUDA);
  dispatch(op, logits.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (N > 0) {
      ce_fwd_kernel<T><<<unsigned(N), row_block(V), 0, cuda_rt::stream()>>>(ptr<T>(logits), ptr<int32_t>(tg), V,
                                                                             ptr<T>(lse), ptr<float>(rowloss));
      LB_CUDA_LAUNCH_CHECK("ce_fwd_kernel");
    }
    ce_finalize_kernel<T><<<1, 1024, 0, cuda_rt::stream()>>>(ptr<float>(rowloss), ptr<int32_t>(tg), N, V, ptr<T>(loss),
                                                             bad.get());
    LB_CUDA_LAUNCH_CHECK("ce_finalize_kernel");
  });
  if (!host_checked)
    if (const int64_t pos = bad.first(); pos >= 0)
      throw_error(op, ": target ", int64_t(tg.slice(0, pos, pos + 1).item()), " at row ", pos, " is outside [0, ", V,
                  ") and not -1 (ignored)");
}

void cross_entropy_backward(const Tensor& dloss, const Tensor& logits, const Tensor& targets, const Tensor& lse,
                            Tensor& dlogits) {
  LB_CUDA_OP("cross_entropy_backward");
  const char* op = "cross_entropy_backward";
  check_scalar(op, dloss, logits, "dloss");
  check_on_gpu(op, lse, "lse");
  check_on_gpu(op, dlogits, "dlogits");
  if (lse.dtype() != logits.dtype() || dlogits.dtype() != logits.dtype() || !dlogits.is_contiguous())
    throw_error(op, ": lse and dlogits must be contiguous ", dtype_name(logits.dtype()));
  const int64_t N = logits.size(0), V = logits.size(1);
  if (N == 0) return;
  if (N > INT32_MAX) throw_error(op, ": too many rows (", N, ")");
  bool host_checked = false;
  const Tensor tg = ids_on_gpu(targets, host_checked);
  BadIndex bad;
  Tensor count = Tensor::empty({1}, DType::I32, Device::CUDA);
  count_valid_kernel<<<1, 1024, 0, cuda_rt::stream()>>>(ptr<int32_t>(tg), N, V, ptr<int>(count), bad.get());
  LB_CUDA_LAUNCH_CHECK("count_valid_kernel");
  dispatch(op, logits.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    ce_bwd_kernel<T><<<unsigned(N), row_block(V), 0, cuda_rt::stream()>>>(
        ptr<T>(dloss), ptr<T>(logits), ptr<int32_t>(tg), ptr<T>(lse), ptr<int>(count), V, ptr<T>(dlogits));
    LB_CUDA_LAUNCH_CHECK("ce_bwd_kernel");
  });
  if (!host_checked)
    if (const int64_t pos = bad.first(); pos >= 0)
      throw_error(op, ": target ", int64_t(tg.slice(0, pos, pos + 1).item()), " at row ", pos, " is outside [0, ", V,
                  ") and not -1 (ignored)");
}

void kl_div_forward(const Tensor& p_logits, const Tensor& q_logits, Tensor& loss) {
  LB_CUDA_OP("kl_div_forward");
  const char* op = "kl_div_forward";
  check_on_gpu(op, loss, "loss");
  if (loss.dtype() != p_logits.dtype()) throw_error(op, ": loss must be ", dtype_name(p_logits.dtype()));
  const int64_t V = p_logits.size(-1), N = p_logits.numel() / (V > 0 ? V : 1);
  if (N > INT32_MAX) throw_error(op, ": too many rows (", N, ")");
  Tensor rowkl = Tensor::empty({N}, DType::F32, Device::CUDA);
  dispatch(op, p_logits.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (N > 0 && V > 0) {
      kl_fwd_kernel<T><<<unsigned(N), row_block(V), 0, cuda_rt::stream()>>>(ptr<T>(p_logits), ptr<T>(q_logits), V,
                                                                             ptr<float>(rowkl));
      LB_CUDA_LAUNCH_CHECK("kl_fwd_kernel");
    }
    mean_kernel<T><<<1, 1024, 0, cuda_rt::stream()>>>(ptr<float>(rowkl), V > 0 ? N : 0, ptr<T>(loss));
    LB_CUDA_LAUNCH_CHECK("mean_kernel");
  });
}

void kl_div_backward(const Tensor& dloss, const Tensor& p_logits, const Tensor& q_logits, Tensor& dp, Tensor& dq) {
  LB_CUDA_OP("kl_div_backward");
  const char* op = "kl_div_backward";
  check_scalar(op, dloss, p_logits, "dloss");
  check_on_gpu(op, q_logits, "q_logits");
  for (const Tensor* t : TensorList{&q_logits, &dp, &dq})
    if (t->defined() && (t->dtype() != p_logits.dtype() || !t->is_contiguous()))
      throw_error(op, ": q_logits, dp and dq must be contiguous ", dtype_name(p_logits.dtype()), ", got ", t->describe());
  check_on_gpu(op, dp, "dp");
  check_on_gpu(op, dq, "dq");
  if (!p_logits.is_contiguous()) throw_error(op, ": p_logits must be contiguous");
  const int64_t V = p_logits.size(-1), N = p_logits.numel() / (V > 0 ? V : 1);
  if (N == 0 || V == 0 || (!dp.defined() && !dq.defined())) return;
  if (N > INT32_MAX) throw_error(op, ": too many rows (", N, ")");
  dispatch(op, p_logits.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    kl_bwd_kernel<T><<<unsigned(N), row_block(V), 0, cuda_rt::stream()>>>(
        ptr<T>(dloss), ptr<T>(p_logits), ptr<T>(q_logits), V, N, dp.defined() ? ptr<T>(dp) : nullptr,
        dq.defined() ? ptr<T>(dq) : nullptr);
    LB_CUDA_LAUNCH_CHECK("kl_bwd_kernel");
  });
}

void mse_forward(const Tensor& a, const Tensor& b, Tensor& loss) {
  LB_CUDA_OP("mse_forward");
  check_on_gpu("mse_forward", loss, "loss");
  if (loss.dtype() != a.dtype()) throw_error("mse_forward: loss must be ", dtype_name(a.dtype()));
  const int64_t n = a.numel();
  dispatch("mse_forward", a.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    reduce_sum<T>(n, SqDiffF<T>{ptr<T>(a), ptr<T>(b)}, n > 0 ? 1.0 / double(n) : 0.0, ptr<T>(loss), nullptr);
  });
}

void mse_backward(const Tensor& dloss, const Tensor& a, const Tensor& b, Tensor& da, Tensor& db) {
  LB_CUDA_OP("mse_backward");
  const char* op = "mse_backward";
  check_scalar(op, dloss, a, "dloss");
  for (const Tensor* t : TensorList{&b, &da, &db}) {
    check_on_gpu(op, *t, "an argument");
    if (t->defined() && (t->dtype() != a.dtype() || !t->is_contiguous()))
      throw_error(op, ": b, da and db must be contiguous ", dtype_name(a.dtype()), ", got ", t->describe());
  }
  if (!a.is_contiguous()) throw_error(op, ": a must be contiguous");
  const int64_t n = a.numel();
  if (!da.defined() && !db.defined()) return;
  dispatch(op, a.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    EwArgs<T, 2, 2> args{{ptr<T>(a), ptr<T>(b)}, {0, 0}, {da.defined() ? ptr<T>(da) : nullptr, db.defined() ? ptr<T>(db) : nullptr}};
    launch_ew(op, args, n, MseBwdF<T>{ptr<T>(dloss), n > 0 ? float(1.0 / double(n)) : 0.f});
  });
}

void weighted_sq_err_forward(const Tensor& a, const Tensor& b, const Tensor& w, double scale, Tensor& loss) {
  LB_CUDA_OP("weighted_sq_err_forward");
  const char* op = "weighted_sq_err_forward";
  for (const Tensor* t : TensorList{&b, &w, &loss}) check_on_gpu(op, *t, "an argument");
  const int64_t n = a.numel();
  dispatch(op, a.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    reduce_sum<T>(n, WeightedSqDiffF<T>{ptr<T>(a), ptr<T>(b), ptr<T>(w)}, scale, ptr<T>(loss), nullptr);
  });
}

void weighted_sq_err_backward(const Tensor& dloss, const Tensor& a, const Tensor& b, const Tensor& w, double scale,
                              Tensor& da) {
  LB_CUDA_OP("weighted_sq_err_backward");
  const char* op = "weighted_sq_err_backward";
  check_scalar(op, dloss, a, "dloss");
  for (const Tensor* t : TensorList{&b, &w, &da}) check_on_gpu(op, *t, "an argument");
  dispatch(op, a.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    EwArgs<T, 3, 1> args{{ptr<T>(a), ptr<T>(b), ptr<T>(w)}, {0, 0, 0}, {ptr<T>(da)}};
    launch_ew(op, args, a.numel(), WeightedSqErrBwdF<T>{ptr<T>(dloss), float(2.0 * scale)});
  });
}

}  // namespace lowbit::ops::cuda
