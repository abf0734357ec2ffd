#include "lowbit/quant/incoherence.h"

namespace lowbit {

namespace {
uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
void check_cpu_2d(const Tensor& t, const char* what) {
  if (t.device() != Device::CPU || t.dim() != 2 || (t.dtype() != DType::F32 && t.dtype() != DType::F64))
    throw_error("incoherence: ", what, " must be an f32/f64 CPU matrix, got ", t.describe());
}
}  // namespace

uint64_t incoherence_seed(uint64_t run_seed, int layer, const std::string& linear) {
  uint64_t h = splitmix64(run_seed ^ 0x5155495030ull);
  h = splitmix64(h ^ uint64_t(uint32_t(layer)));
  for (unsigned char ch : linear) h = splitmix64(h ^ ch);
  return h >> 2;  // random_hadamard draws from seed * 2 + 1 and seed * 2 + 2
}

Incoherence make_incoherence(int64_t out, int64_t in, uint64_t seed, bool two_sided) {
  Incoherence t;
  t.seed = seed;
  t.in = random_hadamard(in, splitmix64(seed) >> 2);
  if (two_sided) t.out = random_hadamard(out, splitmix64(seed ^ 0xA5A5A5A5A5A5A5A5ull) >> 2);
  return t;
}

Tensor Incoherence::weight(const Tensor& w) const {
  check_cpu_2d(w, "the weight");
  const Tensor a = in.apply(w.contiguous().to(DType::F64));  // W R_in
  if (!out.defined()) return a.to(w.dtype());
  // R_out^T A = (A^T R_out)^T
  return out.apply(a.transpose(0, 1).contiguous()).transpose(0, 1).contiguous().to(w.dtype());
}

Tensor Incoherence::unweight(const Tensor& wq) const {
  check_cpu_2d(wq, "the weight");
  const Tensor a = in.apply(wq.contiguous().to(DType::F64), /*transpose=*/true);  // W' R_in^T
  if (!out.defined()) return a.to(wq.dtype());
  // R_out A = (A^T R_out^T)^T
  return out.apply(a.transpose(0, 1).contiguous(), true).transpose(0, 1).contiguous().to(wq.dtype());
}

Tensor Incoherence::hessian(const Tensor& h) const {
  check_cpu_2d(h, "the Hessian");
  const Tensor hr = in.apply(h.contiguous().to(DType::F64));                 // H R_in
  Tensor r = in.apply(hr.transpose(0, 1).contiguous());                      // (H R_in)^T R_in = R_in^T H R_in
  const int64_t n = r.size(0);
  double* p = r.data<double>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j) p[i * n + j] = p[j * n + i] = 0.5 * (p[i * n + j] + p[j * n + i]);
  return r.to(h.dtype());
}

Tensor Incoherence::input(const Tensor& x) const { return in.apply(x); }

Tensor Incoherence::output(const Tensor& z) const { return out.defined() ? out.apply(z, true) : z; }

void validate_incoherence(const Incoherence& t, int64_t out, int64_t in, bool two_sided, const std::string& source,
                          const std::string& module) {
  const std::string where = source + ": incoherence of " + module;
  validate_rotation(t.in, in, where, "input");
  if (two_sided) validate_rotation(t.out, out, where, "output");
  else if (t.out.defined()) throw_error(where, ": an output transform given for an input-side-only record");
}

}  // namespace lowbit
