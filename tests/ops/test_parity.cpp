// GPU-vs-CPU parity: every op of ops::op_registry(), forward and backward, on the CUDA backend
// against the CPU reference bodies (the specification), at odd and realistic shapes. Skips (with a
// message) when init_cuda() finds no GPU or the build has no CUDA, so CI without a GPU passes.
//
// Metric: normalised max error  max_i |gpu_i - cpu_i| / max_i |cpu_i|  (NaN counts as failure).
// GPU outputs are pre-filled with NaN so that an element a kernel forgets to write fails.
// Tolerances are per op, with the reason next to each; TF32 stays off (fp32 GEMMs), so f32 results
// differ from the CPU only by summation order and fp32-vs-fp64 intermediates.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "lowbit/autograd/functions.h"
#include "lowbit/autograd/lp_linear.h"
#include "lowbit/ops/adaround.h"
#include "lowbit/ops/lp_fp8.h"
#include "lowbit/ops/lp_int4.h"
#include "lowbit/ops/device_init.h"
#include "lowbit/ops/ops.h"
#include "lowbit/ops/qat_quant.h"
#include "lowbit/ops/ternary.h"
#include "lowbit/ops/registry.h"
#include "qat_cases.h"

using namespace lowbit;

namespace {

constexpr Device kGpu = Device::CUDA;
const double kNaN = std::numeric_limits<double>::quiet_NaN();

Tensor rnd(const Shape& s, uint64_t seed, double std = 1.0) { return Tensor::randn(s, seed, std, DType::F32); }
Tensor gpu(const Tensor& t) { return t.to(kGpu); }
Tensor cpu(const Tensor& t) { return t.to(Device::CPU); }
Tensor nan_cpu(const Shape& s, DType dt = DType::F32) { return Tensor::full(s, kNaN, dt); }
Tensor nan_gpu(const Shape& s, DType dt = DType::F32) { return Tensor::full(s, kNaN, dt).to(kGpu); }
// bf16-rounded copy in f32 (the CPU reference for a bf16 GPU input).
Tensor bf16_round(const Tensor& t) { return t.to(DType::BF16).to(DType::F32); }
Tensor ids_tensor(int64_t n, int64_t V, uint64_t seed) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  uint64_t s = seed * 6364136223846793005ull + 1442695040888963407ull;
  for (auto& x : v) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    x = int32_t((s >> 33) % uint64_t(V));
  }
  return Tensor::from_vector(v, {n});
}

// Concatenates anything streamable (avoids GCC 12's false -Wrestrict on "literal" + std::string).
template <class... A>
std::string str(const A&... a) {
  std::ostringstream os;
  (os << ... << a);
  return os.str();
}

// floor: the smallest denominator, for outputs that are mathematically zero (where fp32 rounding
// noise divided by an fp64 reference of ~1e-17 would read as a huge relative error).
double nerr(const Tensor& got, const Tensor& ref, double floor = 1e-30) {
  if (got.shape() != ref.shape()) return std::numeric_limits<double>::infinity();
  const std::vector<float> g = got.to_vector(), r = ref.to_vector();
  double num = 0, den = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    const double d = std::fabs(double(g[i]) - double(r[i]));
    if (std::isnan(d)) return std::numeric_limits<double>::infinity();
    num = std::max(num, d);
    den = std::max(den, std::fabs(double(r[i])));
  }
  return num / std::max(den, floor);
}

// Largest error seen per op, with its tolerance, printed at the end of the run.
struct OpRecord {
  double worst = 0, tol = 0;
  int checks = 0;
};
std::map<std::string, OpRecord>& records() {
  static std::map<std::string, OpRecord> r;
  return r;
}

void check(const std::string& op, const std::string& what, const Tensor& got, const Tensor& ref, double tol,
           double floor = 1e-30) {
  const double e = nerr(got, ref, floor);
  OpRecord& r = records()[op];
  r.worst = std::max(r.worst, e);
  r.tol = std::max(r.tol, tol);
  r.checks += 1;
  EXPECT_LE(e, tol) << op << ": " << what << " normalised max error " << e << " > " << tol;
}

class SummaryPrinter : public ::testing::Environment {
 public:
  void TearDown() override {
    if (records().empty()) return;
    std::printf("\nGPU parity summary (%s): normalised max error |gpu - cpu|max / |cpu|max\n",
                cuda_device_name().c_str());
    std::printf("%-26s %8s %12s %10s %s\n", "op", "checks", "worst", "tolerance", "");
    for (const auto& [op, r] : records())
      std::printf("%-26s %8d %12.3e %10.1e %s\n", op.c_str(), r.checks, r.worst, r.tol, r.worst <= r.tol ? "ok" : "FAIL");
  }
};
[[maybe_unused]] const auto* g_summary = ::testing::AddGlobalTestEnvironment(new SummaryPrinter);

class Parity : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!init_cuda()) GTEST_SKIP() << "no CUDA device (or a CPU-only build): GPU parity tests skipped";
  }
};

// Runs f on the CPU and on the GPU, backpropagates the same random projection of the output and
// compares the output and every input's gradient.
using VarFn = std::function<Var(const std::vector<Var>&, Device)>;
void autograd_parity(const std::string& op, const VarFn& f, const std::vector<Tensor>& inputs, double tol_fwd,
                     double tol_bwd) {
  auto run = [&](Device d) {
    std::vector<Var> vs;
    for (const auto& t : inputs) vs.emplace_back(t.to(d).clone(), true);
    Var y = f(vs, d);
    backward(y, Tensor::randn(y.shape(), 4242, 1.0, DType::F32).to(d));
    std::vector<Tensor> out{cpu(y.value())};
    for (auto& v : vs) out.push_back(v.grad().defined() ? cpu(v.grad()) : Tensor());
    return out;
  };
  const auto c = run(Device::CPU), g = run(kGpu);
  check(op, "forward (autograd)", g[0], c[0], tol_fwd);
  for (size_t i = 1; i < c.size(); ++i) {
    ASSERT_EQ(c[i].defined(), g[i].defined()) << op << ": input " << i - 1;
    if (c[i].defined()) check(op, str("grad of input ", i - 1, " (autograd)"), g[i], c[i], tol_bwd);
  }
}

}  // namespace

// ---- gemm ------------------------------------------------------------------------------------------
// fp32 on both sides (TF32 off); the sums over K run in different orders, with rounding error
// ~sqrt(K) * 6e-8 relative to the largest products; K <= 257 here, so 1e-5 of the largest output
// leaves a wide margin while any indexing or transpose mistake gives O(1).
TEST_F(Parity, Gemm) {
  const double tol = 1e-5;
  uint64_t seed = 1;
  for (int64_t M : {1, 7, 33, 257})
    for (int64_t N : {1, 33, 64})
      for (int64_t K : {1, 7, 257})
        for (bool ta : {false, true})
          for (bool tb : {false, true}) {
            Tensor a = ta ? rnd({K, M}, seed++) : rnd({M, K}, seed++);
            Tensor b = tb ? rnd({N, K}, seed++) : rnd({K, N}, seed++);
            Tensor cc = nan_cpu({M, N}), cg = nan_gpu({M, N});
            ops::gemm(a, ta, b, tb, cc);
            ops::gemm(gpu(a), ta, gpu(b), tb, cg);
            check("gemm", str("M", M, " N", N, " K", K), cg, cc, tol);
          }
  // alpha/beta with an existing c; batched; broadcast b with and without transposed a.
  {
    Tensor a = rnd({3, 33, 17}, 1), b = rnd({3, 17, 9}, 2), c0 = rnd({3, 33, 9}, 3);
    Tensor cc = c0.clone(), cg = gpu(c0);
    ops::gemm(a, false, b, false, cc, 0.5, 2.0);
    ops::gemm(gpu(a), false, gpu(b), false, cg, 0.5, 2.0);
    check("gemm", "batched alpha/beta", cg, cc, tol);
  }
  {
    Tensor a = rnd({2, 7, 33}, 4), b = rnd({5, 33}, 5), cc = nan_cpu({2, 7, 5}), cg = nan_gpu({2, 7, 5});
    ops::gemm(a, false, b, true, cc);
    ops::gemm(gpu(a), false, gpu(b), true, cg);
    check("gemm", "broadcast b", cg, cc, tol);
    Tensor at = rnd({2, 33, 7}, 6), b2 = rnd({33, 5}, 7);
    ops::gemm(at, true, b2, false, cc);
    ops::gemm(gpu(at), true, gpu(b2), false, cg);
    check("gemm", "broadcast b, transposed a", cg, cc, tol);
  }
  // Backward through autograd (linear with bias: gemm x2 + sum_rows; matmul batched).
  autograd_parity("gemm", [](const std::vector<Var>& v, Device) { return linear(v[0], v[1], v[2]); },
                  {rnd({33, 65}, 8), rnd({17, 65}, 9), rnd({17}, 10)}, tol, tol);
  autograd_parity("gemm", [](const std::vector<Var>& v, Device) { return matmul(v[0], v[1], true, false); },
                  {rnd({3, 9, 7}, 11), rnd({3, 9, 5}, 12)}, tol, tol);
}

// ---- elementwise -----------------------------------------------------------------------------------
// add/sub/mul/scale are single correctly-rounded fp32 operations on both sides: bit-identical
// unless something is wrong, so the tolerance is rounding-level (1e-6). axpy differs only by FMA
// contraction (1 ulp).
TEST_F(Parity, Elementwise) {
  const double tol = 1e-6;
  uint64_t seed = 100;
  std::vector<Shape> shapes = {{1}, {7}, {33, 257}, {4, 4096}, {3, 1023}};
  for (const auto& s : shapes) {
    Tensor a = rnd(s, seed++), b = rnd(s, seed++), row = rnd({s.back()}, seed++);
    for (int which = 0; which < 3; ++which)
      for (bool bcast : {false, true}) {
        const Tensor& bb = bcast ? row : b;
        Tensor oc = nan_cpu(s), og = nan_gpu(s);
        const char* name = which == 0 ? "add" : which == 1 ? "sub" : "mul";
        if (which == 0) ops::add(a, bb, oc), ops::add(gpu(a), gpu(bb), og);
        if (which == 1) ops::sub(a, bb, oc), ops::sub(gpu(a), gpu(bb), og);
        if (which == 2) ops::mul(a, bb, oc), ops::mul(gpu(a), gpu(bb), og);
        check(name, shape_str(s) + (bcast ? " broadcast" : ""), og, oc, tol);
      }
    Tensor sc = nan_cpu(s), sg = nan_gpu(s);
    ops::scale(a, -1.7, sc);
    ops::scale(gpu(a), -1.7, sg);
    check("scale", shape_str(s), sg, sc, tol);
    Tensor yc = b.clone(), yg = gpu(b);
    ops::axpy(0.3, a, yc);
    ops::axpy(0.3, gpu(a), yg);
    check("axpy", shape_str(s), yg, yc, tol);
  }
  // A view at an odd element offset: not 16-byte aligned, takes the scalar path.
  {
    Tensor big = rnd({4097}, seed++), other = rnd({4096}, seed++);
    Tensor bg = gpu(big);
    Tensor va = big.slice(0, 1, 4097), vg = bg.slice(0, 1, 4097);
    Tensor oc = nan_cpu({4096}), og = nan_gpu({4096});
    ops::add(va, other, oc);
    ops::add(vg, gpu(other), og);
    check("add", "unaligned view", og, oc, tol);
  }
  // Forward + backward through autograd (broadcast operands reduce with sum_rows).
  autograd_parity("add", [](const std::vector<Var>& v, Device) { return add(v[0], v[1]); }, {rnd({33, 7}, 1), rnd({7}, 2)},
                  tol, 1e-5);
  autograd_parity("sub", [](const std::vector<Var>& v, Device) { return sub(v[0], v[1]); }, {rnd({33, 7}, 3), rnd({33, 7}, 4)},
                  tol, 1e-5);
  autograd_parity("mul", [](const std::vector<Var>& v, Device) { return mul(v[0], v[1]); }, {rnd({257, 33}, 5), rnd({33}, 6)},
                  tol, 1e-5);
  autograd_parity("scale", [](const std::vector<Var>& v, Device) { return scale(v[0], 0.25); }, {rnd({7, 9}, 7)}, tol, tol);
}

// ---- reductions ------------------------------------------------------------------------------------
// sum and sum_squares accumulate in fp64 on both sides (1e-9 would do; 1e-6 for the final fp32
// rounding of sum). sum_rows accumulates in fp32 in a different order: ~sqrt(R) ulps of the column
// sum's scale (up to 2049 rows here) -> 1e-5.
TEST_F(Parity, Reductions) {
  uint64_t seed = 200;
  for (const Shape& s : std::vector<Shape>{{1, 1}, {7, 5}, {257, 33}, {33, 4099}, {2049, 300}}) {
    Tensor x = rnd(s, seed++);
    Tensor rc = nan_cpu({s[1]}), rg = nan_gpu({s[1]});
    ops::sum_rows(x, rc);
    ops::sum_rows(gpu(x), rg);
    check("sum_rows", shape_str(s), rg, rc, 1e-5);
    Tensor tc = nan_cpu({}), tg = nan_gpu({});
    ops::sum(x, tc);
    ops::sum(gpu(x), tg);
    // The total of randn values can be near 0 while the terms are O(1): normalise by sum |x|.
    double l1 = 0;
    for (float v : x.to_vector()) l1 += std::fabs(v);
    const double e = std::fabs(tg.item() - tc.item()) / l1;
    records()["sum"].worst = std::max(records()["sum"].worst, e);
    records()["sum"].tol = 1e-6;
    records()["sum"].checks += 1;
    EXPECT_LE(e, 1e-6) << "sum " << shape_str(s);
    const double qc = ops::sum_squares(x), qg = ops::sum_squares(gpu(x));
    EXPECT_LE(std::fabs(qc - qg) / qc, 1e-9) << "sum_squares " << shape_str(s);
    records()["sum_squares"].worst = std::max(records()["sum_squares"].worst, std::fabs(qc - qg) / qc);
    records()["sum_squares"].tol = 1e-9;
    records()["sum_squares"].checks += 1;
  }
  autograd_parity("sum", [](const std::vector<Var>& v, Device) { return sum(v[0]); }, {rnd({33, 7}, 1)}, 1e-6, 1e-6);
}

// ---- rmsnorm ---------------------------------------------------------------------------------------
// fp32 on the GPU vs fp64 accumulation on the CPU: the row statistics agree to ~sqrt(D) ulps
// (D <= 4099), outputs to ~1e-6 relative; dw sums M rows in fp32 -> 1e-5.
TEST_F(Parity, RmsNorm) {
  uint64_t seed = 300;
  for (int64_t M : {1, 7, 33, 257})
    for (int64_t D : {7, 64, 4096, 4099}) {
      Tensor x = rnd({M, D}, seed++), w = rnd({D}, seed++), dy = rnd({M, D}, seed++);
      Tensor yc = nan_cpu({M, D}), rc = nan_cpu({M}), yg = nan_gpu({M, D}), rg = nan_gpu({M});
      ops::rmsnorm_forward(x, w, 1e-5, yc, rc);
      ops::rmsnorm_forward(gpu(x), gpu(w), 1e-5, yg, rg);
      const std::string tag = str("M", M, " D", D);
      check("rmsnorm", "y " + tag, yg, yc, 1e-5);
      check("rmsnorm", "rstd " + tag, rg, rc, 1e-5);
      Tensor dxc = nan_cpu({M, D}), dwc = nan_cpu({D}), dxg = nan_gpu({M, D}), dwg = nan_gpu({D});
      ops::rmsnorm_backward(dy, x, w, rc, dxc, dwc);
      ops::rmsnorm_backward(gpu(dy), gpu(x), gpu(w), rg, dxg, dwg);
      check("rmsnorm", "dx " + tag, dxg, dxc, 1e-5);
      check("rmsnorm", "dw " + tag, dwg, dwc, 1e-5);
    }
}

// ---- rope ------------------------------------------------------------------------------------------
// Angles and their sines/cosines in fp64 on both sides; the rotation itself is two fp32 products
// and a sum on the GPU (fp64 on the CPU): a few ulps -> 1e-6. Large pos0 checks the angle precision.
TEST_F(Parity, Rope) {
  uint64_t seed = 400;
  for (const Shape& s : std::vector<Shape>{{2, 33, 3, 64}, {1, 7, 5, 128}, {1, 1, 1, 6}, {2, 9, 4, 16}})
    for (auto style : {RopeStyle::Interleaved, RopeStyle::Half})
      for (bool inverse : {false, true})
        for (int64_t pos0 : {0, 5000}) {
          Tensor x = rnd(s, seed++), yc = nan_cpu(s), yg = nan_gpu(s);
          ops::rope(x, pos0, 10000.0, style, inverse, yc);
          ops::rope(gpu(x), pos0, 10000.0, style, inverse, yg);
          check("rope", str(shape_str(s), " pos0 ", pos0), yg, yc, 1e-6);
        }
  autograd_parity(
      "rope", [](const std::vector<Var>& v, Device) { return rope(v[0], 2, 5, 3, 8, 11, 10000.0, RopeStyle::Half); },
      {rnd({10, 24}, 1)}, 1e-6, 1e-6);
}

// rope_scaling "llama3" (Llama 3.1/3.2: factor 8, low 1, high 4, original 8192, theta 500000): the
// same scaled frequencies on both sides (rope_style.h's one formula), so the same 1e-6. The head
// widths cover pairs in all three bands (kept, interpolated, divided by the factor).
TEST_F(Parity, RopeLlama3Scaling) {
  RopeScaling sc;
  sc.factor = 8;
  sc.low_freq_factor = 1;
  sc.high_freq_factor = 4;
  sc.original_max_position = 8192;
  uint64_t seed = 450;
  for (const Shape& s : std::vector<Shape>{{2, 17, 3, 64}, {1, 5, 2, 128}})
    for (auto style : {RopeStyle::Interleaved, RopeStyle::Half})
      for (bool inverse : {false, true})
        for (int64_t pos0 : {0, 3000, 100000}) {
          Tensor x = rnd(s, seed++), yc = nan_cpu(s), yg = nan_gpu(s), yu = nan_cpu(s);
          ops::rope(x, pos0, 500000.0, style, inverse, yc, sc);
          ops::rope(gpu(x), pos0, 500000.0, style, inverse, yg, sc);
          check("rope llama3", str(shape_str(s), " pos0 ", pos0), yg, yc, 1e-6);
          if (pos0 > 0) {  // the scaling changes the result (the cell would pass vacuously otherwise)
            ops::rope(x, pos0, 500000.0, style, inverse, yu);
            double diff = 0;
            for (int64_t k = 0; k < x.numel(); ++k) diff = std::max(diff, std::fabs(double(yu.data<float>()[k] - yc.data<float>()[k])));
            EXPECT_GT(diff, 1e-3) << "llama3 scaling had no effect";
          }
        }
  autograd_parity(
      "rope llama3",
      [sc](const std::vector<Var>& v, Device) { return rope(v[0], 2, 5, 3, 8, 700, 500000.0, RopeStyle::Half, sc); },
      {rnd({10, 24}, 2)}, 1e-6, 1e-6);
}

// ---- attention -------------------------------------------------------------------------------------
// The CPU computes scores, softmax and sums in fp64; the GPU in fp32 with an online softmax
// (exp2 of base-2 scores). Output: ~1e-6 relative. lse: absolute error ~1e-6 on values of O(1-10).
// Gradients: dS = P (dP - D) subtracts nearly equal terms and dQ/dK sum up to Tk/Tq of them, so
// they get 1e-4 (observed errors are ~1e-6 to 1e-5; a wrong mask or index gives O(1)).
struct AttnCase {
  int64_t B, Tq, Tk, H, KVH, hd;
};
void attention_case(const AttnCase& c, uint64_t seed) {
  const std::string tag = str("B", c.B, " Tq", c.Tq, " Tk", c.Tk, " H", c.H, "/", c.KVH, " hd", c.hd);
  Tensor q = rnd({c.B, c.Tq, c.H, c.hd}, seed), k = rnd({c.B, c.Tk, c.KVH, c.hd}, seed + 1);
  Tensor v = rnd({c.B, c.Tk, c.KVH, c.hd}, seed + 2), dout = rnd({c.B, c.Tq, c.H, c.hd}, seed + 3);
  const double sc = 1.0 / std::sqrt(double(c.hd));
  Tensor oc = nan_cpu(q.shape()), lc = nan_cpu({c.B, c.H, c.Tq}), og = nan_gpu(q.shape()), lg = nan_gpu({c.B, c.H, c.Tq});
  ops::attention_forward(q, k, v, sc, oc, lc);
  ops::attention_forward(gpu(q), gpu(k), gpu(v), sc, og, lg);
  check("attention", "out " + tag, og, oc, 2e-5);
  check("attention", "lse " + tag, lg, lc, 2e-5);
  Tensor dqc = nan_cpu(q.shape()), dkc = nan_cpu(k.shape()), dvc = nan_cpu(v.shape());
  Tensor dqg = nan_gpu(q.shape()), dkg = nan_gpu(k.shape()), dvg = nan_gpu(v.shape());
  ops::attention_backward(dout, q, k, v, oc, lc, sc, dqc, dkc, dvc);
  ops::attention_backward(gpu(dout), gpu(q), gpu(k), gpu(v), og, lg, sc, dqg, dkg, dvg);
  // With a single key, P = 1 and dP - D = dO.V - dO.O = 0: dq and dk are exactly zero and the CPU
  // gives ~1e-17. Gradients here are O(1) (unit-normal inputs), so errors are measured against at
  // least 1.
  check("attention", "dq " + tag, dqg, dqc, 1e-4, 1.0);
  check("attention", "dk " + tag, dkg, dkc, 1e-4, 1.0);
  check("attention", "dv " + tag, dvg, dvc, 1e-4);
}

TEST_F(Parity, Attention) {
  const std::vector<AttnCase> cases = {
      {1, 1, 1, 1, 1, 64},      // single token
      {2, 33, 33, 3, 1, 64},    // odd T, odd number of heads, multi-query
      {1, 257, 257, 4, 2, 128}, // GQA, several key tiles, hd 128
      {2, 7, 40, 5, 5, 64},     // Tq < Tk (prefill after a cache), odd heads
      {1, 1, 257, 8, 2, 128},   // decode: one query over a long cache
      {1, 65, 130, 2, 1, 128},  // Tq < Tk spanning tiles
      {2, 9, 9, 3, 3, 5},       // odd head_dim (zero-padded to 64, scalar loads)
      {1, 70, 70, 6, 2, 48},    // head_dim 48 (stories-15M style)
      {1, 100, 100, 2, 2, 96},  // head_dim 96 (padded to 128)
  };
  uint64_t seed = 500;
  for (const auto& c : cases) {
    attention_case(c, seed);
    seed += 10;
  }
  autograd_parity(
      "attention",
      [](const std::vector<Var>& v, Device) { return attention(v[0], v[1], v[2], 2, 9, 12, 4, 2, 64); },
      {rnd({18, 256}, 1), rnd({24, 128}, 2), rnd({24, 128}, 3)}, 2e-5, 1e-4);
}

// ---- attention on TF32 tensor cores ----------------------------------------------------------------
// With TF32 allowed (cuda_set_allow_tf32, `--tf32`), f32 attention with head_dim 64 or 128 runs on
// tensor cores (attention_wmma_tf32.cuh): Q, K, V, dO and the probabilities P, dS are rounded to TF32
// (10 explicit mantissa bits, unit roundoff u = 2^-11 = 4.9e-4) before each product; the softmax, the
// accumulators, out and lse stay fp32. This is the bf16 tensor-core path's error model (Bf16 below:
// 1e-2 for out, 2e-2 for the gradients) with a 4x smaller u and no rounding of the outputs:
//  * a score s = scale q.k sums hd products each off by <= 2u relative, independently, so s is off
//    by ~2u x (its own O(1) spread) ~ 1e-3 absolute; P = exp(s - lse) inherits that relative
//    error, plus u from rounding P and u from rounding V: out ~1e-3 relative per element, a few
//    1e-3 at the worst of ~1e5 elements -> 5e-3. lse (O(1-10), normalised by its largest value,
//    ~5) is off by ~1e-3 absolute at worst -> 1e-3.
//  * gradients chain two or three such products; the cancellation in dS = P (dP - D) that costs
//    the fp32 kernels 5x (1e-4 against 2e-5 for out) is at fp32 level, far below the TF32 input
//    rounding, which enters each product once as for out -> 5e-3 as well, measured against at
//    least 1 as in attention_case (zero gradients for single-key rows).
// Seen on an H100: out 1.15e-3, lse 2.1e-4, dq/dk/dv 1.1e-3, autograd 5.5e-4, i.e. 4-9x below the
// tolerances (an H200 gave the same worst, 1.15e-3).
// A wrong mask, tile bound or fragment index gives O(1). The cases are Llama-like (head_dim 128,
// GQA, T not a multiple of the 64-row tiles, batch > 1, prefill over a cache, decode) plus one
// with q and k at std 2 (scores of std 4: peaked rows as in trained models). To show the
// tensor-core path really ran, the TF32 out error must also exceed fp32 level (1e-6), and with
// LOWBIT_CUDA_SIMT_ATTENTION=1 the same call must be back at the fp32 kernels' 2e-5.
TEST_F(Parity, AttentionTf32) {
  struct Tf32On {  // restores the default (off) even when a check fails
    Tf32On() { cuda_set_allow_tf32(true); }
    ~Tf32On() {
      cuda_set_allow_tf32(false);
      unsetenv("LOWBIT_CUDA_SIMT_ATTENTION");
    }
  } tf32_on;
  unsetenv("LOWBIT_CUDA_SIMT_ATTENTION");
  struct Tf32Case {
    AttnCase c;
    double qk_std;
  };
  const std::vector<Tf32Case> cases = {
      {{1, 300, 300, 8, 2, 128}, 1.0},   // GQA 4:1, T = 4 x 64 + 44
      {{1, 520, 520, 32, 8, 128}, 1.0},  // Llama-3-8B heads (32 / 8), 9 tiles with a partial last one
      {{2, 129, 129, 6, 3, 64}, 1.0},    // batch 2, GQA 2:1, last tile of a single row
      {{1, 100, 333, 4, 1, 128}, 1.0},   // Tq < Tk (prefill after a cache), multi-query
      {{1, 1, 200, 4, 2, 64}, 1.0},      // decode: one query over a cache
      {{1, 200, 200, 4, 4, 128}, 2.0},   // peaked softmax (scores of std 4)
  };
  uint64_t seed = 900;
  for (const auto& [c, qk_std] : cases) {
    const std::string tag = str("tf32 B", c.B, " Tq", c.Tq, " Tk", c.Tk, " H", c.H, "/", c.KVH, " hd", c.hd,
                                qk_std != 1.0 ? " peaked" : "");
    Tensor q = rnd({c.B, c.Tq, c.H, c.hd}, seed, qk_std), k = rnd({c.B, c.Tk, c.KVH, c.hd}, seed + 1, qk_std);
    Tensor v = rnd({c.B, c.Tk, c.KVH, c.hd}, seed + 2), dout = rnd({c.B, c.Tq, c.H, c.hd}, seed + 3);
    seed += 10;
    const double sc = 1.0 / std::sqrt(double(c.hd));
    Tensor oc = nan_cpu(q.shape()), lc = nan_cpu({c.B, c.H, c.Tq}), og = nan_gpu(q.shape()), lg = nan_gpu({c.B, c.H, c.Tq});
    ops::attention_forward(q, k, v, sc, oc, lc);
    ops::attention_forward(gpu(q), gpu(k), gpu(v), sc, og, lg);
    check("attention tf32 out", tag, og, oc, 5e-3);
    check("attention tf32 lse", tag, lg, lc, 1e-3);
    if (c.Tk >= 64) {
      EXPECT_GT(nerr(og, oc), 1e-6) << "out " << tag << " is at fp32 level: the TF32 kernels did not run";
    }
    Tensor dqc = nan_cpu(q.shape()), dkc = nan_cpu(k.shape()), dvc = nan_cpu(v.shape());
    Tensor dqg = nan_gpu(q.shape()), dkg = nan_gpu(k.shape()), dvg = nan_gpu(v.shape());
    ops::attention_backward(dout, q, k, v, oc, lc, sc, dqc, dkc, dvc);
    ops::attention_backward(gpu(dout), gpu(q), gpu(k), gpu(v), og, lg, sc, dqg, dkg, dvg);
    check("attention tf32 dq/dk/dv", "dq " + tag, dqg, dqc, 5e-3, 1.0);
    check("attention tf32 dq/dk/dv", "dk " + tag, dkg, dkc, 5e-3, 1.0);
    check("attention tf32 dq/dk/dv", "dv " + tag, dvg, dvc, 5e-3, 1.0);
  }
  // TF32 on, CUDA-core kernels forced: fp32-level agreement again (the switch still works).
  {
    setenv("LOWBIT_CUDA_SIMT_ATTENTION", "1", 1);
    const AttnCase c{1, 130, 130, 4, 2, 128};
    Tensor q = rnd({c.B, c.Tq, c.H, c.hd}, 990), k = rnd({c.B, c.Tk, c.KVH, c.hd}, 991);
    Tensor v = rnd({c.B, c.Tk, c.KVH, c.hd}, 992);
    const double sc = 1.0 / std::sqrt(double(c.hd));
    Tensor oc = nan_cpu(q.shape()), lc = nan_cpu({c.B, c.H, c.Tq}), og = nan_gpu(q.shape()), lg = nan_gpu({c.B, c.H, c.Tq});
    ops::attention_forward(q, k, v, sc, oc, lc);
    ops::attention_forward(gpu(q), gpu(k), gpu(v), sc, og, lg);
    check("attention", "out, tf32 on + LOWBIT_CUDA_SIMT_ATTENTION=1", og, oc, 2e-5);
    unsetenv("LOWBIT_CUDA_SIMT_ATTENTION");
  }
  // Through autograd (what the training step and ApiQ call): [B*T, H*hd] activations, GQA, hd 64.
  autograd_parity(
      "attention tf32 (autograd)",
      [](const std::vector<Var>& v, Device) { return attention(v[0], v[1], v[2], 2, 70, 70, 4, 2, 64); },
      {rnd({140, 256}, 11), rnd({140, 128}, 12), rnd({140, 128}, 13)}, 5e-3, 5e-3);
}

// ---- activations -----------------------------------------------------------------------------------
// Same fp32 formulas; expf may differ by 1-2 ulps between the GPU and glibc -> 1e-6.
TEST_F(Parity, Activations) {
  uint64_t seed = 600;
  for (const Shape& s : std::vector<Shape>{{1}, {7}, {33, 257}, {3, 4097}}) {
    Tensor x = rnd(s, seed++, 3.0), u = rnd(s, seed++), dy = rnd(s, seed++);
    Tensor yc = nan_cpu(s), yg = nan_gpu(s);
    ops::silu_forward(x, yc);
    ops::silu_forward(gpu(x), yg);
    check("silu", "y " + shape_str(s), yg, yc, 1e-6);
    ops::silu_backward(dy, x, yc);
    ops::silu_backward(gpu(dy), gpu(x), yg);
    check("silu", "dx " + shape_str(s), yg, yc, 1e-6);
    ops::swiglu_forward(x, u, yc);
    ops::swiglu_forward(gpu(x), gpu(u), yg);
    check("swiglu", "y " + shape_str(s), yg, yc, 1e-6);
    Tensor dgc = nan_cpu(s), duc = nan_cpu(s), dgg = nan_gpu(s), dug = nan_gpu(s);
    ops::swiglu_backward(dy, x, u, dgc, duc);
    ops::swiglu_backward(gpu(dy), gpu(x), gpu(u), dgg, dug);
    check("swiglu", "dgate " + shape_str(s), dgg, dgc, 1e-6);
    check("swiglu", "dup " + shape_str(s), dug, duc, 1e-6);
  }
}

// ---- embedding -------------------------------------------------------------------------------------
// The forward is a copy (exact). The backward adds repeated ids with atomics in an unspecified
// order: fp32 rounding of a few terms -> 1e-6.
TEST_F(Parity, Embedding) {
  for (int64_t N : {1, 7, 257})
    for (int64_t D : {1, 33, 64}) {
      const int64_t V = 50;
      Tensor table = rnd({V, D}, uint64_t(N * 100 + D)), ids = ids_tensor(N, V, uint64_t(N + D));
      Tensor dout = rnd({N, D}, 7);
      Tensor oc = nan_cpu({N, D}), og = nan_gpu({N, D});
      ops::embedding_forward(table, ids, oc);
      ops::embedding_forward(gpu(table), gpu(ids), og);
      check("embedding", "forward, ids on gpu", og, oc, 0.0);
      og = nan_gpu({N, D});
      ops::embedding_forward(gpu(table), ids, og);
      check("embedding", "forward, ids on cpu", og, oc, 0.0);
      Tensor dc = nan_cpu({V, D}), dg = nan_gpu({V, D});
      ops::embedding_backward(dout, ids, dc);
      ops::embedding_backward(gpu(dout), gpu(ids), dg);
      check("embedding", "backward", dg, dc, 1e-6);
    }
  // Out-of-range ids on the GPU are reported like on the CPU (device flag, read after the kernel).
  Tensor table = gpu(rnd({4, 2}, 1)), out = nan_gpu({2, 2});
  EXPECT_THROW(ops::embedding_forward(table, gpu(Tensor::from_vector(std::vector<int32_t>{1, 4}, {2})), out), Error);
  EXPECT_THROW(ops::embedding_forward(table, gpu(Tensor::from_vector(std::vector<int32_t>{-1, 0}, {2})), out), Error);
  // ...and the backend is still usable afterwards.
  ops::embedding_forward(table, gpu(Tensor::from_vector(std::vector<int32_t>{3, 0}, {2})), out);
  EXPECT_EQ(out.item(0), table.item(6));
}

// ---- losses ----------------------------------------------------------------------------------------
// Cross-entropy: fp32 online log-sum-exp vs fp64: lse ~1e-7 relative, loss (lse - z_t, O(1-10))
// ~1e-6 -> 1e-5. Gradients are softmax values, ~1e-6 relative -> 1e-5. KL sums P (log P - log Q) in
// fp32 (fp64 on the CPU); the loss is normalised by its own size, which can be small relative to
// the terms: 1e-4. MSE: fp64 reduction on both sides -> 1e-6.
TEST_F(Parity, Losses) {
  uint64_t seed = 700;
  for (int64_t N : {1, 7, 33})
    for (int64_t V : {5, 257, 32000}) {
      const std::string tag = str("N", N, " V", V);
      Tensor z = rnd({N, V}, seed++, 2.0), t = ids_tensor(N, V, seed++);
      if (N > 1) t.set_item(1, -1);  // an ignored row
      Tensor lc = nan_cpu({}), ec = nan_cpu({N}), lg = nan_gpu({}), eg = nan_gpu({N});
      ops::cross_entropy_forward(z, t, lc, ec);
      ops::cross_entropy_forward(gpu(z), gpu(t), lg, eg);
      check("cross_entropy", "loss " + tag, lg, lc, 1e-5);
      check("cross_entropy", "lse " + tag, eg, ec, 1e-5);
      Tensor dl = Tensor::full({}, 1.7), dzc = nan_cpu({N, V}), dzg = nan_gpu({N, V});
      ops::cross_entropy_backward(dl, z, t, ec, dzc);
      ops::cross_entropy_backward(gpu(dl), gpu(z), gpu(t), eg, dzg);
      check("cross_entropy", "dlogits " + tag, dzg, dzc, 1e-5);

      Tensor q = rnd({N, V}, seed++, 2.0), kc = nan_cpu({}), kg = nan_gpu({});
      ops::kl_div_forward(z, q, kc);
      ops::kl_div_forward(gpu(z), gpu(q), kg);
      check("kl_div", "loss " + tag, kg, kc, 1e-4);
      Tensor dpc = nan_cpu({N, V}), dqc = nan_cpu({N, V}), dpg = nan_gpu({N, V}), dqg = nan_gpu({N, V});
      ops::kl_div_backward(dl, z, q, dpc, dqc);
      ops::kl_div_backward(gpu(dl), gpu(z), gpu(q), dpg, dqg);
      check("kl_div", "dp " + tag, dpg, dpc, 1e-4);
      check("kl_div", "dq " + tag, dqg, dqc, 1e-4);
      Tensor none, dq_only = nan_gpu({N, V});
      ops::kl_div_backward(gpu(dl), gpu(z), gpu(q), none, dq_only);
      check("kl_div", "dq only " + tag, dq_only, dqc, 1e-4);

      Tensor mc = nan_cpu({}), mg = nan_gpu({});
      ops::mse_forward(z, q, mc);
      ops::mse_forward(gpu(z), gpu(q), mg);
      check("mse", "loss " + tag, mg, mc, 1e-6);
      Tensor dac = nan_cpu({N, V}), dbc = nan_cpu({N, V}), dag = nan_gpu({N, V}), dbg = nan_gpu({N, V});
      ops::mse_backward(dl, z, q, dac, dbc);
      ops::mse_backward(gpu(dl), gpu(z), gpu(q), dag, dbg);
      check("mse", "da " + tag, dag, dac, 1e-6);
      check("mse", "db " + tag, dbg, dbc, 1e-6);

      Tensor wt = rnd({N, V}, seed++, 1.0), sc = nan_cpu({}), sg = nan_gpu({});
      ops::weighted_sq_err_forward(z, q, wt, 0.37, sc);
      ops::weighted_sq_err_forward(gpu(z), gpu(q), gpu(wt), 0.37, sg);
      check("weighted_sq_err", "loss " + tag, sg, sc, 1e-5);
      Tensor wdc = nan_cpu({N, V}), wdg = nan_gpu({N, V});
      ops::weighted_sq_err_backward(dl, z, q, wt, 0.37, wdc);
      ops::weighted_sq_err_backward(gpu(dl), gpu(z), gpu(q), gpu(wt), 0.37, wdg);
      check("weighted_sq_err", "da " + tag, wdg, wdc, 1e-5);
    }
  // All targets ignored: loss 0 and zero gradient, as on the CPU.
  {
    Tensor z = rnd({3, 5}, 1), t = Tensor::from_vector(std::vector<int32_t>{-1, -1, -1}, {3});
    Tensor lg = nan_gpu({}), eg = nan_gpu({3}), dz = nan_gpu({3, 5});
    ops::cross_entropy_forward(gpu(z), gpu(t), lg, eg);
    EXPECT_EQ(lg.item(), 0.0);
    ops::cross_entropy_backward(gpu(Tensor::full({}, 1.0)), gpu(z), gpu(t), eg, dz);
    EXPECT_EQ(max_abs_diff(dz, Tensor::zeros({3, 5})), 0.0);
  }
  // Invalid targets on the GPU raise lowbit::Error.
  Tensor z = gpu(rnd({2, 3}, 1)), loss = nan_gpu({}), lse = nan_gpu({2});
  EXPECT_THROW(ops::cross_entropy_forward(z, gpu(Tensor::from_vector(std::vector<int32_t>{3, 0}, {2})), loss, lse), Error);
  EXPECT_THROW(ops::cross_entropy_forward(z, gpu(Tensor::from_vector(std::vector<int32_t>{0, -2}, {2})), loss, lse), Error);
}

// ---- AdamW -----------------------------------------------------------------------------------------
// The GPU updates in fp32 (the CPU in fp64 before rounding): a few ulps per step -> 1e-6 after
// three steps.
TEST_F(Parity, AdamW) {
  for (const Shape& s : std::vector<Shape>{{1}, {7}, {33, 257}}) {
    Tensor pc = rnd(s, 1), mc = Tensor::zeros(s), vc = Tensor::zeros(s);
    Tensor pg = gpu(pc), mg = gpu(mc), vg = gpu(vc);
    for (int64_t step = 1; step <= 3; ++step) {
      Tensor g = rnd(s, uint64_t(10 + step));
      ops::adamw_step(pc, g, mc, vc, 1e-2, 0.9, 0.999, 1e-8, 0.1, step);
      ops::adamw_step(pg, gpu(g), mg, vg, 1e-2, 0.9, 0.999, 1e-8, 0.1, step);
    }
    check("adamw_step", "param " + shape_str(s), pg, pc, 1e-6);
    check("adamw_step", "m " + shape_str(s), mg, mc, 1e-6);
    check("adamw_step", "v " + shape_str(s), vg, vc, 1e-6);
  }
}

// The fused group update: 30 tensors (one launch of at most 32), sizes around the 4096-element
// block chunk and an empty one, against adamw_step per tensor on the CPU (1e-6, as above) and on the
// GPU (bit-identical: the same per-element arithmetic).
TEST_F(Parity, AdamWMulti) {
  std::vector<Shape> shapes;
  for (int k = 0; k < 30; ++k) shapes.push_back(k == 5 ? Shape{0} : Shape{int64_t(1 + (k * 977) % 9000)});
  shapes[7] = {33, 257};
  const size_t n = shapes.size();
  std::vector<Tensor> pc(n), mc(n), vc(n), pg(n), mg(n), vg(n), ps(n), ms(n), vs(n);
  for (size_t k = 0; k < n; ++k) {
    pc[k] = rnd(shapes[k], 100 + k);
    mc[k] = Tensor::zeros(shapes[k]);
    vc[k] = Tensor::zeros(shapes[k]);
    pg[k] = gpu(pc[k]), mg[k] = gpu(mc[k]), vg[k] = gpu(vc[k]);
    ps[k] = gpu(pc[k]), ms[k] = gpu(mc[k]), vs[k] = gpu(vc[k]);
  }
  for (int64_t step = 1; step <= 3; ++step) {
    std::vector<Tensor> g(n), gg(n);
    std::vector<ops::AdamwParam> cpu_ps, gpu_ps;
    for (size_t k = 0; k < n; ++k) {
      g[k] = rnd(shapes[k], 1000 * uint64_t(step) + k);
      gg[k] = gpu(g[k]);
      cpu_ps.push_back({&pc[k], &g[k], &mc[k], &vc[k]});
      gpu_ps.push_back({&pg[k], &gg[k], &mg[k], &vg[k]});
      ops::adamw_step(ps[k], gg[k], ms[k], vs[k], 1e-2, 0.9, 0.999, 1e-8, 0.1, step);
    }
    ops::adamw_step_multi(cpu_ps, 1e-2, 0.9, 0.999, 1e-8, 0.1, step);
    ops::adamw_step_multi(gpu_ps, 1e-2, 0.9, 0.999, 1e-8, 0.1, step);
  }
  for (size_t k = 0; k < n; ++k) {
    check("adamw_step_multi", "param " + std::to_string(k), pg[k], pc[k], 1e-6);
    check("adamw_step_multi", "v " + std::to_string(k), vg[k], vc[k], 1e-6);
    EXPECT_EQ(max_abs_diff(pg[k], ps[k]), 0.0) << "tensor " << k << " differs from adamw_step on the GPU";
    EXPECT_EQ(max_abs_diff(mg[k], ms[k]), 0.0) << "tensor " << k;
  }
}

// Several groups in one fused launch (issue 19): 45 tensors (two launches of at most 32) in three
// groups with their own lr, weight decay and step count, sizes around the 4096-element chunk, an
// empty one, and views at an odd offset (not 16-byte aligned: the scalar path beside the float4
// one). Against the CPU reference body (1e-6, as above) and bit-identical to adamw_step per tensor
// on the GPU.
TEST_F(Parity, AdamWGroups) {
  const ops::AdamwHyper hs[3] = {{5e-3, 0.9, 0.999, 1e-8, 0.1, 1}, {5e-4, 0.9, 0.999, 1e-8, 0.1, 4},
                                 {1e-2, 0.8, 0.99, 1e-6, 0.0, 2}};
  const size_t n = 45;
  std::vector<Shape> shapes;
  for (size_t k = 0; k < n; ++k) shapes.push_back(k == 9 ? Shape{0} : Shape{int64_t(1 + (k * 1231) % 10000)});
  shapes[4] = {64, 4096};  // a LoRA-sized factor: 64 chunks
  std::vector<Tensor> pc(n), mc(n), vc(n), pg(n), mg(n), vg(n), ps(n), ms(n), vs(n);
  // Odd k: a view one element into a longer GPU tensor (contiguous, misaligned).
  auto place = [&](const Tensor& host, size_t k) {
    if (k % 2 == 0 || host.numel() == 0) return gpu(host);
    Tensor big = Tensor::zeros({host.numel() + 1}).to(kGpu);
    Tensor view = big.slice(0, 1, host.numel() + 1).view(host.shape());
    view.copy_(gpu(host));
    return view;
  };
  for (size_t k = 0; k < n; ++k) {
    pc[k] = rnd(shapes[k], 500 + k);
    mc[k] = rnd(shapes[k], 600 + k, 0.1);
    vc[k] = Tensor::full(shapes[k], 0.01);
    pg[k] = place(pc[k], k), mg[k] = place(mc[k], k), vg[k] = place(vc[k], k);
    ps[k] = place(pc[k], k), ms[k] = place(mc[k], k), vs[k] = place(vc[k], k);
  }
  for (int rep = 0; rep < 2; ++rep) {
    std::vector<Tensor> g(n), gg(n);
    std::vector<ops::AdamwGroupStep> cpu_gs(3), gpu_gs(3);
    for (int j = 0; j < 3; ++j) {
      cpu_gs[size_t(j)].hyper = gpu_gs[size_t(j)].hyper = hs[j];
      cpu_gs[size_t(j)].hyper.step += rep, gpu_gs[size_t(j)].hyper.step += rep;
    }
    for (size_t k = 0; k < n; ++k) {
      g[k] = rnd(shapes[k], 2000 * uint64_t(rep + 1) + k);
      gg[k] = place(g[k], k);
      cpu_gs[k % 3].params.push_back({&pc[k], &g[k], &mc[k], &vc[k]});
      gpu_gs[k % 3].params.push_back({&pg[k], &gg[k], &mg[k], &vg[k]});
      const ops::AdamwHyper& h = cpu_gs[k % 3].hyper;
      ops::adamw_step(ps[k], gg[k], ms[k], vs[k], h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.step);
    }
    ops::adamw_step_groups(cpu_gs);
    ops::adamw_step_groups(gpu_gs);
  }
  for (size_t k = 0; k < n; ++k) {
    check("adamw_step_groups", "param " + std::to_string(k), pg[k], pc[k], 1e-6);
    check("adamw_step_groups", "m " + std::to_string(k), mg[k], mc[k], 1e-6);
    check("adamw_step_groups", "v " + std::to_string(k), vg[k], vc[k], 1e-6);
    EXPECT_EQ(max_abs_diff(pg[k], ps[k]), 0.0) << "tensor " << k << " differs from adamw_step on the GPU";
    EXPECT_EQ(max_abs_diff(mg[k], ms[k]), 0.0) << "tensor " << k;
    EXPECT_EQ(max_abs_diff(vg[k], vs[k]), 0.0) << "tensor " << k;
  }
}

// ---- QAT weight quantizers (ops/qat_quant.h) ----------------------------------------------------------
// The per-element arithmetic is the same header on both sides (ops/qat_quant_math.h: IEEE division,
// rint, no fused multiply-add that changes a result), so the forwards and dw are exact (0). The
// per-group sums of the backwards (dstep, doffset, dalpha) run in another order (32 lanes, then a
// shuffle tree): fp32 rounding of at most 300 terms of magnitude ~|dy| -> 1e-5 of the largest.
// Every case runs with and without dw / doffset (the kernels' null-output branches).
// MatQuant's Matryoshka slice of the LSQ quantizer (quant/matryoshka.h): int8 groups sliced to 4, 3
// and 2 bits, the same per-element arithmetic on both sides (forward and dw exact, the group sums as
// above).
TEST_F(Parity, QatQuantizersMatryoshkaSlice) {
  const test::QatFormatCase c{test::qat_traits("int8g64", QuantKind::IntAsym, 8, 64), 9, 200};
  uint64_t seed = 1900;
  for (int slice : {4, 3, 2}) {
    const test::QatParams p = test::qat_params(c, seed += 10);
    // u = w / s + z spans the 256 codes: both clamps act.
    const Tensor w = Tensor::randn({c.out, c.in}, seed + 7, 40.0, DType::F32);
    const std::string fn = std::string("int8g64 slice ") + std::to_string(slice);
    Tensor yc, yg;
    ops::lsq_quant_forward(w, p.step, p.offset, c.f, yc, slice);
    ops::lsq_quant_forward(gpu(w), gpu(p.step), gpu(p.offset), c.f, yg, slice);
    check("lsq_quant", fn + " forward", yg, yc, 0.0);
    Tensor dwc, dsc, dzc, dwg, dsg, dzg;
    ops::lsq_quant_backward(w, p.step, p.offset, p.dy, c.f, 1.0, &dwc, dsc, &dzc, slice);
    ops::lsq_quant_backward(gpu(w), gpu(p.step), gpu(p.offset), gpu(p.dy), c.f, 1.0, &dwg, dsg, &dzg, slice);
    check("lsq_quant", fn + " dstep", dsg, dsc, 1e-5);
    check("lsq_quant", fn + " dw", dwg, dwc, 0.0);
    check("lsq_quant", fn + " doffset", dzg, dzc, 1e-5);
  }
}

TEST_F(Parity, QatQuantizers) {
  uint64_t seed = 900;
  for (const auto& c : test::qat_format_cases()) {
    const test::QatParams p = test::qat_params(c, seed += 10);
    const std::string fn = c.f.name;
    const Tensor ofs_g = p.offset.defined() ? gpu(p.offset) : Tensor();
    Tensor yc, yg;
    ops::lsq_quant_forward(p.w, p.step, p.offset, c.f, yc);
    ops::lsq_quant_forward(gpu(p.w), gpu(p.step), ofs_g, c.f, yg);
    check("lsq_quant", fn + " forward", yg, yc, 0.0);
    for (bool want_dw : {true, false}) {
      Tensor dwc, dsc, dzc, dwg, dsg, dzg;
      ops::lsq_quant_backward(p.w, p.step, p.offset, p.dy, c.f, 0.03, want_dw ? &dwc : nullptr, dsc,
                              want_dw ? &dzc : nullptr);
      ops::lsq_quant_backward(gpu(p.w), gpu(p.step), ofs_g, gpu(p.dy), c.f, 0.03, want_dw ? &dwg : nullptr, dsg,
                              want_dw ? &dzg : nullptr);
      check("lsq_quant", fn + " dstep", dsg, dsc, 1e-5);
      if (want_dw) check("lsq_quant", fn + " dw", dwg, dwc, 0.0);
      ASSERT_EQ(dzc.defined(), dzg.defined()) << fn;
      if (dzc.defined()) check("lsq_quant", fn + " doffset", dzg, dzc, 1e-5);
    }
    Tensor gc, gg, dc, dg;
    ops::group_scale_forward(p.codes, p.step, c.f, gc);
    ops::group_scale_forward(gpu(p.codes), gpu(p.step), c.f, gg);
    check("group_scale", fn + " forward", gg, gc, 0.0);
    ops::group_scale_backward(p.codes, p.dy, c.f, dc);
    ops::group_scale_backward(gpu(p.codes), gpu(p.dy), c.f, dg);
    check("group_scale", fn + " dstep", dg, dc, 1e-5);
    {  // integer codes as I8 on the GPU against the same integers in f32 on the CPU
      Tensor ci = Tensor::empty(p.codes.shape(), DType::I8), cf = Tensor::empty(p.codes.shape(), DType::F32);
      for (int64_t i = 0; i < p.codes.numel(); ++i) {
        const double v = std::nearbyint(p.codes.item(i) * 40.0);
        ci.data<int8_t>()[i] = int8_t(v);
        cf.set_item(i, v);
      }
      Tensor ic, ig, ec, eg;
      ops::group_scale_forward(cf, p.step, c.f, ic);
      ops::group_scale_forward(gpu(ci), gpu(p.step), c.f, ig);
      check("group_scale", fn + " i8 codes forward", ig, ic, 0.0);
      ops::group_scale_backward(cf, p.dy, c.f, ec);
      ops::group_scale_backward(gpu(ci), gpu(p.dy), c.f, eg);
      check("group_scale", fn + " i8 codes dstep", eg, ec, 1e-5);
    }
    for (const auto& sc : test::seq_cases()) {
      const std::string what = fn + " " + sc.name;
      Tensor sy, sg;
      ops::seq_quant_forward(p.w, p.alpha, sc.q, c.f, sy);
      ops::seq_quant_forward(gpu(p.w), gpu(p.alpha), sc.q, c.f, sg);
      check("seq_quant", what + " forward", sg, sy, 0.0);
      for (bool want_dw : {true, false}) {
        Tensor dwc, dac, dwg, dag;
        ops::seq_quant_backward(p.w, p.alpha, p.dy, sc.q, c.f, 0.05, want_dw ? &dwc : nullptr, dac);
        ops::seq_quant_backward(gpu(p.w), gpu(p.alpha), gpu(p.dy), sc.q, c.f, 0.05, want_dw ? &dwg : nullptr, dag);
        check("seq_quant", what + " dalpha", dag, dac, 1e-5);
        if (want_dw) check("seq_quant", what + " dw", dwg, dwc, 0.0);
      }
    }
  }
}

// ---- bf16 ------------------------------------------------------------------------------------------
// bf16 inputs on the GPU (fp32 arithmetic inside, tensor cores with fp32 accumulation for gemm)
// against the CPU in f32 on the same bf16-rounded inputs. The difference is dominated by rounding
// the outputs to bf16 (8 significant bits: <= 2^-9 relative per element) -> 1e-2 of the largest
// output. lse is kept in f32 (see cuda_ops.h).
// Low-precision training's operand quantizer (issue 18): the same arithmetic (ops/lp_quant_math.h)
// in f32 on both sides, so every format, tile, rounding mode and Hadamard setting agrees bit for bit
// (tolerance 0). Then the whole lp_linear (forward, dx, dW) per precision: the GEMMs differ only by
// summation order (1e-5).
TEST_F(Parity, LpQuantize) {
  const Tensor x = rnd({70, 52}, 31, 2.0);
  std::vector<ops::LpQuantSpec> specs;
  for (ops::LpFormat f : {ops::LpFormat::BF16, ops::LpFormat::E4M3, ops::LpFormat::E5M2}) {
    ops::LpQuantSpec s;
    s.format = f;
    specs.push_back(s);
    if (f != ops::LpFormat::BF16) {
      s.tensor_scale = 0.001f;  // a delayed scale that saturates
      specs.push_back(s);
    }
  }
  // E2M1 with f32 absmax scales (fp4-dge's operands: whole rows, 1 << 30 wide) rides on the same tile kernel
  for (ops::LpFormat f : {ops::LpFormat::MXFP4, ops::LpFormat::NVFP4, ops::LpFormat::E2M1})
    for (auto [tr, tc] : {std::pair{1, 16}, std::pair{16, 1}, std::pair{16, 16}, std::pair{32, 32}, std::pair{1, 32}, std::pair{1, 1 << 30}})
      for (int variant = 0; variant < 3; ++variant) {
        ops::LpQuantSpec s;
        s.format = f;
        s.tile_rows = tr, s.tile_cols = tc;
        if (variant >= 1) s.rounding = ops::LpRounding::Stochastic, s.seed = 99;
        if (variant == 2) s.rht_axis = tr > 1 ? 0 : 1, s.rht_size = 16, s.rht_seed = 7;
        specs.push_back(s);
      }
  for (const auto& s : specs) {
    Tensor yc, yg;
    ops::LpQuantStats sc, sg;
    ops::lp_quantize(x, s, yc, &sc);
    ops::lp_quantize(gpu(x), s, yg, &sg);
    const std::string what = str(ops::lp_format_name(s.format), " ", s.tile_rows, "x", s.tile_cols,
                                 s.rounding == ops::LpRounding::Stochastic ? " sr" : "", s.rht_axis >= 0 ? " rht" : "");
    check("lp_quantize", what, yg, yc, 0.0);
    EXPECT_EQ(sg.amax, sc.amax) << what;
    EXPECT_EQ(sg.tensor_scale, sc.tensor_scale) << what;
  }
  for (LpPrecision p : {LpPrecision::BF16, LpPrecision::FP8, LpPrecision::MXFP4, LpPrecision::NVFP4}) {
    LpRecipe r;
    r.precision = p;
    autograd_parity("lp_quantize",
                    [&](const std::vector<Var>& v, Device) { return lp_linear(v[0], v[1], r, std::make_shared<LpLinearState>(), 5); },
                    {rnd({48, 40}, 1), rnd({24, 40}, 2)}, 1e-5, 1e-5);
  }
}

// INT4 training's quantizers (issue 18, int4: ops/lp_int4.h): the per-element arithmetic, the f64 row
// sums of squares (column order) and LSS's water filling and draws are ops/lp_int4_math.h's on both
// sides and every random draw is a counter-based function of (seed, index), so each case agrees bit
// for bit (tolerance 0) and the statistics are equal; NaN in, NaN out on both. Then the whole
// lp_linear with --precision int4 (full recipe and naive): the quantized operands are equal, the f32
// GEMMs differ only by summation order (1e-5), and the backward's bit splitting and sampling read the
// same dy and the same x_eff, so the same rows are kept.
TEST_F(Parity, LpInt4) {
  const auto all_nan = [](const Tensor& t) {
    for (float v : t.to_vector())
      if (!std::isnan(v)) return false;
    return true;
  };
  // lp_int4_hq: no transform, blocks with a partial tail (52 = 32 + 20, 172 = 5 x 32 + 12), one
  // 256-block, the smallest block, fewer columns than a block; an outlier channel; all zero; NaN.
  struct HqCase {
    int64_t R, C;
    int32_t block;
    bool back;
    double std;
  };
  const std::vector<HqCase> hq = {{70, 52, 0, false, 2.0},  {70, 52, 32, false, 2.0}, {70, 52, 32, true, 2.0},
                                  {33, 172, 32, true, 0.5}, {64, 256, 256, true, 1.0}, {5, 16, 2, true, 1e-3},
                                  {8, 24, 32, true, 1.0},   {1, 1, 0, false, 3.0}};
  for (size_t i = 0; i < hq.size(); ++i) {
    const HqCase& c = hq[i];
    Tensor x = rnd({c.R, c.C}, 40 + i, c.std);
    if (c.C > 3)
      for (int64_t r = 0; r < c.R; ++r) x.data<float>()[r * c.C + 3] *= 30.0f;  // HQ's case: an outlier channel
    const std::string what = str(c.R, "x", c.C, " block ", c.block, c.back ? " back" : "");
    Tensor yc, yg;
    ops::LpInt4Stats sc, sg;
    ops::lp_int4_hq(x, c.block, 0xABC + i, c.back, yc, &sc);
    ops::lp_int4_hq(gpu(x), c.block, 0xABC + i, c.back, yg, &sg);
    check("lp_int4_hq", what, yg, yc, 0.0);
    EXPECT_EQ(sg.amax, sc.amax) << what;
    EXPECT_EQ(sg.scale, sc.scale) << what;
  }
  {
    Tensor yc, yg;
    ops::lp_int4_hq(gpu(Tensor::zeros({9, 64})), 32, 1, true, yg);
    ops::lp_int4_hq(Tensor::zeros({9, 64}), 32, 1, true, yc);
    check("lp_int4_hq", "all zero", yg, yc, 0.0);
    Tensor bad = rnd({9, 64}, 3);
    bad.data<float>()[70] = INFINITY;
    ops::LpInt4Stats sg;
    ops::lp_int4_hq(gpu(bad), 32, 1, true, yg, &sg);
    EXPECT_TRUE(all_nan(yg) && std::isnan(sg.amax)) << "lp_int4_hq: inf in, NaN out";
  }
  // lp_int4_bitsplit: shapes, seeds, a dy with a few large rows (the structural sparsity LSS is for),
  // all zero, NaN.
  struct SplitCase {
    int64_t T, N;
    uint64_t seed;
    bool sparse;
  };
  const std::vector<SplitCase> split = {{70, 52, 1, false}, {1, 1, 2, false}, {257, 33, 3, true}, {96, 40, 4, true}};
  const auto dy = [](const SplitCase& c) {
    Tensor g = rnd({c.T, c.N}, 60 + c.seed, 0.01);
    if (c.sparse)
      for (int64_t t = 0; t < c.T; t += 11)
        for (int64_t j = 0; j < c.N; ++j) g.data<float>()[t * c.N + j] *= 100.0f;
    return g;
  };
  for (const SplitCase& c : split) {
    const std::string what = str(c.T, "x", c.N, " seed ", c.seed, c.sparse ? " sparse" : "");
    const Tensor g = dy(c);
    Tensor hc, lc, hg, lg;
    ops::LpSplitStats sc, sg;
    ops::lp_int4_bitsplit(g, c.seed, hc, lc, &sc);
    ops::lp_int4_bitsplit(gpu(g), c.seed, hg, lg, &sg);
    check("lp_int4_bitsplit", what + " hi", hg, hc, 0.0);
    check("lp_int4_bitsplit", what + " lo", lg, lc, 0.0);
    EXPECT_EQ(sg.scale_hi, sc.scale_hi) << what;
    EXPECT_EQ(sg.scale_lo, sc.scale_lo) << what;
  }
  {
    Tensor hc, lc, hg, lg;
    ops::lp_int4_bitsplit(Tensor::zeros({6, 7}), 5, hc, lc);
    ops::lp_int4_bitsplit(gpu(Tensor::zeros({6, 7})), 5, hg, lg);
    check("lp_int4_bitsplit", "all zero hi", hg, hc, 0.0);
    check("lp_int4_bitsplit", "all zero lo", lg, lc, 0.0);
    Tensor bad = rnd({6, 7}, 5);
    bad.data<float>()[11] = NAN;
    ops::LpSplitStats sg;
    ops::lp_int4_bitsplit(gpu(bad), 5, hg, lg, &sg);
    EXPECT_TRUE(all_nan(hg) && all_nan(lg) && std::isnan(sg.scale_hi)) << "lp_int4_bitsplit: NaN in, NaN out";
  }
  // lp_int4_lss on the CPU's split (the same hi / lo on both devices): with a partner (wgrad) and
  // without (dgrad), sampled and not, the water filling saturating (sparse rows), every nonzero row
  // certain (zero rows: at most T nonzero of the 2T), a long thin partner (K = 300: several 32-column
  // slices of the row-norm kernel, a partial last one).
  struct LssCase {
    SplitCase g;
    int64_t K;  // 0: no partner
    bool sample;
  };
  const std::vector<LssCase> lss = {{{96, 40, 4, true}, 24, true},   {{96, 40, 4, true}, 0, true},
                                    {{96, 40, 4, true}, 24, false},  {{257, 33, 3, true}, 300, true},
                                    {{70, 52, 1, false}, 70, true},  {{70, 52, 1, false}, 0, true},
                                    {{1, 1, 2, false}, 3, true}};
  for (size_t i = 0; i < lss.size(); ++i) {
    const LssCase& c = lss[i];
    const std::string what = str(c.g.T, "x", c.g.N, c.K ? str(" partner K ", c.K) : " no partner",
                                 c.sample ? " sampled" : " all kept");
    Tensor hi, lo;
    ops::lp_int4_bitsplit(dy(c.g), c.g.seed, hi, lo);
    const Tensor partner = c.K ? rnd({c.g.T, c.K}, 80 + i) : Tensor();
    Tensor yc, yg;
    ops::LpLssStats sc, sg;
    ops::lp_int4_lss(hi, lo, partner, c.sample, 0x77 + i, yc, &sc);
    ops::lp_int4_lss(gpu(hi), gpu(lo), c.K ? gpu(partner) : Tensor(), c.sample, 0x77 + i, yg, &sg);
    check("lp_int4_lss", what, yg, yc, 0.0);
    EXPECT_EQ(sg.nonzero, sc.nonzero) << what;
    EXPECT_EQ(sg.kept, sc.kept) << what;
    EXPECT_EQ(sg.certain, sc.certain) << what;
  }
  {  // zero rows: at most T of the 2T stacked rows nonzero, so every one is kept for certain
    Tensor g = Tensor::zeros({12, 8});
    for (int64_t j = 0; j < 8; ++j) g.data<float>()[5 * 8 + j] = float(j) - 3.5f;
    Tensor hi, lo, yc, yg;
    ops::lp_int4_bitsplit(g, 9, hi, lo);
    ops::LpLssStats sc, sg;
    ops::lp_int4_lss(hi, lo, Tensor(), true, 3, yc, &sc);
    ops::lp_int4_lss(gpu(hi), gpu(lo), Tensor(), true, 3, yg, &sg);
    check("lp_int4_lss", "zero rows", yg, yc, 0.0);
    EXPECT_EQ(sg.certain, sc.certain);
    EXPECT_EQ(sg.kept, sc.nonzero);
  }
  for (bool full : {true, false}) {
    LpRecipe r;
    r.precision = LpPrecision::INT4;
    r.hadamard = r.stochastic_grads = full;
    autograd_parity(full ? "lp_linear int4" : "lp_linear int4 naive",
                    [&](const std::vector<Var>& v, Device) { return lp_linear(v[0], v[1], r, std::make_shared<LpLinearState>(), 5); },
                    {rnd({48, 72}, 1), rnd({24, 72}, 2)}, 1e-5, 1e-5);
  }
}

// Native FP8 GEMMs (issue 18): the codes bit for bit (both layouts, both formats, a saturating
// delayed scale); cuBLASLt's FP8 GEMM against the CPU reference body (decoded codes, f32 gemm): the
// products of FP8 values are exact, but the tensor cores accumulate a K-slice at reduced precision
// before promoting to f32, so 2e-3 of the largest output (a layout or scale error is O(1)); then
// lp_linear with native GEMMs on the GPU against the CPU's emulated lp_linear (fp8 and bf16).
TEST_F(Parity, Fp8Gemm) {
  const Tensor x = rnd({96, 64}, 41, 3.0);
  for (ops::LpFormat f : {ops::LpFormat::E4M3, ops::LpFormat::E5M2})
    for (float given : {0.0f, 0.002f})
      for (bool tr : {false, true}) {
        ops::LpQuantSpec s;
        s.format = f;
        s.tensor_scale = given;
        Tensor cc, cg;
        ops::LpQuantStats sc, sg;
        ops::lp_quantize_fp8(x, s, cc, &sc, tr);
        ops::lp_quantize_fp8(gpu(x), s, cg, &sg, tr);
        const Tensor back = cg.to(Device::CPU);
        EXPECT_EQ(std::memcmp(back.raw_data(), cc.raw_data(), size_t(cc.numel())), 0)
            << ops::lp_format_name(f) << " scale " << given << (tr ? " transposed" : "");
        EXPECT_EQ(sg.amax, sc.amax);
        EXPECT_EQ(sg.tensor_scale, sc.tensor_scale);
      }
  for (auto [M, N, K] : {std::tuple{16, 16, 16}, std::tuple{64, 48, 96}, std::tuple{256, 128, 512}})
    for (auto [fa, fb] : {std::pair{ops::LpFormat::E4M3, ops::LpFormat::E4M3}, std::pair{ops::LpFormat::E5M2, ops::LpFormat::E4M3},
                          std::pair{ops::LpFormat::E4M3, ops::LpFormat::E5M2}}) {
      ops::LpQuantSpec sa, sb;
      sa.format = fa, sb.format = fb;
      Tensor a, b;
      ops::LpQuantStats qa, qb;
      ops::lp_quantize_fp8(rnd({M, K}, 3 + M, 2.0), sa, a, &qa);
      ops::lp_quantize_fp8(rnd({N, K}, 5 + N, 0.5), sb, b, &qb);
      const float alpha = float(qa.tensor_scale * qb.tensor_scale);
      Tensor yc = Tensor::empty({M, N}, DType::F32), yg = Tensor::empty({M, N}, DType::F32, kGpu);
      ops::fp8_gemm(a, fa, b, fb, alpha, yc);
      ops::fp8_gemm(gpu(a), fa, gpu(b), fb, alpha, yg);
      check("fp8_gemm", str(M, "x", N, "x", K, " ", ops::lp_format_name(fa), "*", ops::lp_format_name(fb)), yg, yc, 2e-3);
    }
  // the one-pass encoder: both layouts equal lp_quantize_fp8's codes with the same scale, bit for
  // bit, and its amax (read later) equals the CPU's
  for (ops::LpFormat f : {ops::LpFormat::E4M3, ops::LpFormat::E5M2})
    for (auto [rows, cols] : {std::pair{70, 45}, std::pair{96, 132}, std::pair{48, 4100}}) {
    // 70 x 45: the general kernel on ragged tiles; the others the vectorised one (partial 128-wide tiles)
    const Tensor xr = rnd({rows, cols}, 43, 2.0);
    Tensor cc, ct, gc, gt, ref;
    ops::LpAmax ac, ag;
    ops::lp_encode_fp8_dual(xr, f, 0.003f, &cc, &ct, &ac);
    ops::lp_encode_fp8_dual(gpu(xr), f, 0.003f, &gc, &gt, &ag);
    ops::LpQuantSpec s;
    s.format = f;
    s.tensor_scale = 0.003f;
    ops::lp_quantize_fp8(xr, s, ref);
    EXPECT_EQ(std::memcmp(ref.raw_data(), cc.raw_data(), size_t(cc.numel())), 0) << ops::lp_format_name(f);
    EXPECT_EQ(std::memcmp(gc.to(Device::CPU).raw_data(), cc.raw_data(), size_t(cc.numel())), 0) << ops::lp_format_name(f);
    EXPECT_EQ(std::memcmp(gt.to(Device::CPU).raw_data(), ct.raw_data(), size_t(ct.numel())), 0) << ops::lp_format_name(f);
    EXPECT_EQ(ag.get(), ac.get());
    }
  // lp_linear with native GEMMs on the GPU against the emulated CPU layer: three steps, so that
  // fp8 with delayed scaling runs its one-pass path (histories recorded later) from the second on
  for (LpPrecision p : {LpPrecision::FP8, LpPrecision::BF16})
    for (bool delayed : {true, false}) {
      if (p == LpPrecision::BF16 && !delayed) continue;
      LpRecipe emulated, native;
      emulated.precision = native.precision = p;
      emulated.delayed_scaling = native.delayed_scaling = delayed;
      native.native_gemm = true;
      auto se = std::make_shared<LpLinearState>(), sn = std::make_shared<LpLinearState>();
      for (int step = 0; step < 3; ++step) {
        const Tensor xv = rnd({64, 48}, 1 + step, 1.0 + 0.5 * step), wv = rnd({32, 48}, 2), g = rnd({64, 32}, 3 + step);
        auto run = [&](const LpRecipe& r, Device d, const std::shared_ptr<LpLinearState>& st) {
          Var xa(d == kGpu ? gpu(xv) : xv.clone(), true), wa(d == kGpu ? gpu(wv) : wv.clone(), true);
          Var y = lp_linear(xa, wa, r, st, 5);
          backward(y, d == kGpu ? gpu(g) : g);
          return std::vector<Tensor>{y.value().to(Device::CPU), xa.grad().to(Device::CPU), wa.grad().to(Device::CPU)};
        };
        const auto ref = run(emulated, Device::CPU, se), got = run(native, kGpu, sn);
        const char* names[3] = {"y", "dx", "dW"};
        for (int i = 0; i < 3; ++i)
          check("fp8_gemm", str(lp_precision_name(p), delayed ? " delayed" : " current", " step ", step, " lp_linear native ", names[i]),
                got[i], ref[i], 2e-3);
      }
      sn->settle();
      for (int role = 0; role < 3; ++role) EXPECT_EQ(sn->history[role], se->history[role]) << role;
    }
}

// One bf16 attention cell, forward and backward against the CPU (fp64 on bf16-rounded inputs), on
// the kernel named by `kernel`: fa2 / fa2-atomic / wmma (LOWBIT_ATTENTION) or simt
// (LOWBIT_CUDA_SIMT_ATTENTION=1, the fp32 CUDA-core kernels).
void attention_bf16_case(const AttnCase& c, const std::string& kernel) {
  const bool simt = kernel == "simt";
  if (simt) {
    setenv("LOWBIT_CUDA_SIMT_ATTENTION", "1", 1);
    unsetenv("LOWBIT_ATTENTION");
  } else {
    unsetenv("LOWBIT_CUDA_SIMT_ATTENTION");
    setenv("LOWBIT_ATTENTION", kernel.c_str(), 1);
  }
  auto to_gpu_bf16 = [](const Tensor& t) { return t.to(DType::BF16).to(kGpu); };
  const std::string tag = str(kernel, " B", c.B, " Tq", c.Tq, " Tk", c.Tk, " H", c.H, "/", c.KVH, " hd", c.hd);
  Tensor q = bf16_round(rnd({c.B, c.Tq, c.H, c.hd}, 5)), k = bf16_round(rnd({c.B, c.Tk, c.KVH, c.hd}, 6));
  Tensor v = bf16_round(rnd({c.B, c.Tk, c.KVH, c.hd}, 7));
  const double sc = 1.0 / std::sqrt(double(c.hd));
  Tensor oc = nan_cpu(q.shape()), lc = nan_cpu({c.B, c.H, c.Tq});
  Tensor og = nan_gpu(q.shape(), DType::BF16), lg = nan_gpu({c.B, c.H, c.Tq});
  ops::attention_forward(q, k, v, sc, oc, lc);
  ops::attention_forward(to_gpu_bf16(q), to_gpu_bf16(k), to_gpu_bf16(v), sc, og, lg);
  check("attention bf16 " + kernel, "out " + tag, og, oc, 1e-2);
  // The tensor-core paths round P to bf16 before P V; lse is f32: 1e-3 absolute on O(1-10).
  check("attention bf16 " + kernel, "lse (f32) " + tag, lg, lc, 1e-3);
  Tensor dout = bf16_round(rnd(q.shape(), 8));
  Tensor dqc = nan_cpu(q.shape()), dkc = nan_cpu(k.shape()), dvc = nan_cpu(v.shape());
  Tensor dqg = nan_gpu(q.shape(), DType::BF16), dkg = nan_gpu(k.shape(), DType::BF16);
  Tensor dvg = nan_gpu(v.shape(), DType::BF16);
  ops::attention_backward(dout, q, k, v, oc, lc, sc, dqc, dkc, dvc);
  ops::attention_backward(to_gpu_bf16(dout), to_gpu_bf16(q), to_gpu_bf16(k), to_gpu_bf16(v), og, lg, sc, dqg, dkg,
                          dvg);
  // The GPU backward also reads the bf16-rounded forward output (in D = rowsum(dO * O)) and, on
  // tensor cores, rounds P and dS to bf16 for the products: 2e-2.
  check("attention bf16 " + kernel, "dq " + tag, dqg, dqc, 2e-2, 1.0);
  check("attention bf16 " + kernel, "dk " + tag, dkg, dkc, 2e-2, 1.0);
  check("attention bf16 " + kernel, "dv " + tag, dvg, dvc, 2e-2, 1.0);
  unsetenv("LOWBIT_CUDA_SIMT_ATTENTION");
  unsetenv("LOWBIT_ATTENTION");
}

TEST_F(Parity, Bf16) {
  const double tol = 1e-2;
  auto to_gpu_bf16 = [](const Tensor& t) { return t.to(DType::BF16).to(kGpu); };
  {
    Tensor a = bf16_round(rnd({33, 257}, 1)), b = bf16_round(rnd({64, 257}, 2));
    Tensor cc = nan_cpu({33, 64}), cg = nan_gpu({33, 64}, DType::BF16);
    ops::gemm(a, false, b, true, cc);
    ops::gemm(to_gpu_bf16(a), false, to_gpu_bf16(b), true, cg);
    check("gemm", "bf16", cg, cc, tol);
  }
  {
    Tensor a = bf16_round(rnd({7, 4096}, 3)), b = bf16_round(rnd({4096}, 4));
    Tensor oc = nan_cpu({7, 4096}), og = nan_gpu({7, 4096}, DType::BF16);
    ops::add(a, b, oc);
    ops::add(to_gpu_bf16(a), to_gpu_bf16(b), og);
    check("add", "bf16 broadcast", og, oc, tol);
    ops::swiglu_forward(a, a, oc);
    ops::swiglu_forward(to_gpu_bf16(a), to_gpu_bf16(a), og);
    check("swiglu", "bf16", og, oc, tol);
    Tensor yc = nan_cpu({7, 4096}), rc = nan_cpu({7}), yg = nan_gpu({7, 4096}, DType::BF16), rg = nan_gpu({7}, DType::BF16);
    ops::rmsnorm_forward(a, b, 1e-5, yc, rc);
    ops::rmsnorm_forward(to_gpu_bf16(a), to_gpu_bf16(b), 1e-5, yg, rg);
    check("rmsnorm", "bf16 y", yg, yc, tol);
  }
  // Attention: every bf16 kernel at a few shapes (more for the FlashAttention-2 kernels in
  // AttentionFa2Bf16 below).
  for (const char* kernel : {"fa2", "fa2-atomic", "wmma", "simt"})
    for (const AttnCase& c : std::vector<AttnCase>{{1, 65, 65, 4, 2, 64}, {1, 65, 65, 4, 2, 128},
                                                   {2, 33, 130, 4, 1, 128}, {1, 1, 70, 2, 2, 64}})
      attention_bf16_case(c, kernel);
}

// ---- bf16 attention: the FlashAttention-2 kernels (attention_fa2.cuh) ----------------------------
// bf16 with head_dim 64 or 128 runs on the FlashAttention-2 kernels by default (LOWBIT_ATTENTION=fa2:
// deterministic backward with a separate dQ kernel), or with dQ accumulated by fp32 atomics
// (fa2-atomic), or on the earlier WMMA kernels (wmma). Shapes: sequences that are not multiples of
// the 64-key / 32- or 64-query tiles, exact multiples, Tq < Tk (causal offset), decode (Tq = 1),
// GQA and MQA groups, batch > 1, head_dim 64 and 128. Tolerances as for the bf16 cells above.
TEST_F(Parity, AttentionFa2Bf16) {
  const std::vector<AttnCase> cases = {
      {1, 200, 200, 8, 2, 128},  // ragged (200 = 3 x 64 + 8), GQA 4, several key tiles
      {2, 128, 128, 2, 2, 64},   // exact tile multiples, batch 2
      {1, 100, 257, 4, 4, 64},   // Tq < Tk across tiles, ragged both ways
      {1, 97, 97, 6, 1, 128},    // MQA (group 6), ragged 32-row backward tiles
      {1, 1, 130, 4, 2, 128},    // decode over a ragged cache
      {2, 64, 64, 4, 2, 64},     // one full tile
      {1, 300, 300, 2, 1, 64},   // long-ish, 5 key tiles, group 2
  };
  for (const char* kernel : {"fa2", "fa2-atomic"})
    for (const AttnCase& c : cases) attention_bf16_case(c, kernel);
}

// The default (fa2) backward must be bit-reproducible run to run: dQ comes from its own kernel that
// sums over key tiles in a fixed order, dK / dV over query tiles in a fixed order (no atomics).
TEST_F(Parity, AttentionFa2Deterministic) {
  unsetenv("LOWBIT_ATTENTION");
  unsetenv("LOWBIT_CUDA_SIMT_ATTENTION");
  for (const AttnCase& c : std::vector<AttnCase>{{2, 333, 333, 8, 2, 128}, {1, 257, 300, 4, 1, 64}}) {
    const std::string tag = str("B", c.B, " Tq", c.Tq, " Tk", c.Tk, " H", c.H, "/", c.KVH, " hd", c.hd);
    auto bf = [](const Tensor& t) { return t.to(DType::BF16).to(kGpu); };
    Tensor q = bf(rnd({c.B, c.Tq, c.H, c.hd}, 31)), k = bf(rnd({c.B, c.Tk, c.KVH, c.hd}, 32));
    Tensor v = bf(rnd({c.B, c.Tk, c.KVH, c.hd}, 33)), dout = bf(rnd({c.B, c.Tq, c.H, c.hd}, 34));
    const double sc = 1.0 / std::sqrt(double(c.hd));
    Tensor o = nan_gpu(q.shape(), DType::BF16), l = nan_gpu({c.B, c.H, c.Tq});
    ops::attention_forward(q, k, v, sc, o, l);
    std::vector<std::vector<float>> first;
    for (int run = 0; run < 3; ++run) {
      Tensor dq = nan_gpu(q.shape(), DType::BF16), dk = nan_gpu(k.shape(), DType::BF16);
      Tensor dv = nan_gpu(v.shape(), DType::BF16);
      ops::attention_backward(dout, q, k, v, o, l, sc, dq, dk, dv);
      const std::vector<std::vector<float>> got = {dq.to_vector(), dk.to_vector(), dv.to_vector()};
      if (run == 0) {
        first = got;
        for (const auto& g : got)
          for (float x : g) ASSERT_TRUE(std::isfinite(x)) << "attention fa2 backward: non-finite gradient, " << tag;
        continue;
      }
      const char* names[] = {"dq", "dk", "dv"};
      for (size_t i = 0; i < got.size(); ++i) {
        size_t diff = 0;
        for (size_t j = 0; j < got[i].size(); ++j) diff += std::memcmp(&got[i][j], &first[i][j], sizeof(float)) != 0;
        EXPECT_EQ(diff, 0u) << "attention fa2 backward: " << names[i] << " differs between runs in " << diff
                            << " elements, " << tag;
      }
    }
  }
}

// ---- end to end ------------------------------------------------------------------------------------
// A two-sequence Llama-style stack (embedding -> rmsnorm -> q/k/v linear -> rope -> GQA attention ->
// output projection + residual -> rmsnorm -> SwiGLU MLP + residual -> rmsnorm -> LM head ->
// cross-entropy), forward and backward through autograd, CPU vs GPU: the loss and the gradient of
// every weight. About twenty fp32 ops compound ~1e-6 errors each: 1e-4.
TEST_F(Parity, LlamaStackForwardBackward) {
  const int64_t B = 2, T = 17, D = 64, H = 4, KVH = 2, hd = 16, F = 96, V = 37;
  std::vector<Tensor> w = {
      rnd({V, D}, 1),          rnd({D}, 2, 0.1),          rnd({H * hd, D}, 3, 0.15),  rnd({KVH * hd, D}, 4, 0.15),
      rnd({KVH * hd, D}, 5, 0.15), rnd({D, H * hd}, 6, 0.15), rnd({D}, 7, 0.1),           rnd({F, D}, 8, 0.15),
      rnd({F, D}, 9, 0.15),    rnd({D, F}, 10, 0.15),     rnd({D}, 11, 0.1),          rnd({V, D}, 12, 0.15)};
  for (int i : {1, 6, 10}) w[size_t(i)] = add(Var(w[size_t(i)]), Var(Tensor::full({D}, 1.0))).value();  // norms ~1
  Tensor ids = ids_tensor(B * T, V, 3), targets = ids_tensor(B * T, V, 4);
  targets.set_item(B * T - 1, -1);
  auto model = [&](const std::vector<Var>& p, Device d) {
    Var x = embedding(p[0], ids.to(d));
    Var h = rmsnorm(x, p[1], 1e-5);
    Var q = rope(linear(h, p[2]), B, T, H, hd, 0, 10000.0, RopeStyle::Half);
    Var k = rope(linear(h, p[3]), B, T, KVH, hd, 0, 10000.0, RopeStyle::Half);
    Var v = linear(h, p[4]);
    x = add(x, linear(attention(q, k, v, B, T, T, H, KVH, hd), p[5]));
    Var h2 = rmsnorm(x, p[6], 1e-5);
    x = add(x, linear(swiglu(linear(h2, p[7]), linear(h2, p[8])), p[9]));
    return cross_entropy(linear(rmsnorm(x, p[10], 1e-5), p[11]), targets.to(d));
  };
  auto run = [&](Device d) {
    std::vector<Var> p;
    for (const auto& t : w) p.emplace_back(t.to(d).clone(), true);
    Var loss = model(p, d);
    backward(loss);
    std::vector<Tensor> out{cpu(loss.value())};
    for (auto& v : p) out.push_back(cpu(v.grad()));
    return out;
  };
  const auto c = run(Device::CPU), g = run(kGpu);
  check("end_to_end", "loss", g[0], c[0], 1e-5);
  for (size_t i = 1; i < c.size(); ++i) check("end_to_end", str("grad of weight ", i - 1), g[i], c[i], 1e-4);
}

// group_scale_forward with a bf16 output (issue 19: E2E-QP's frozen-codes layer under autocast
// writes W in bf16 directly): the GPU kernel's bf16 values equal the CPU body's (the same single f32
// product, rounded to nearest even) and the GPU's own f32 result cast; I8 and float codes.
TEST_F(Parity, GroupScaleBf16Output) {
  uint64_t seed = 950;
  for (const auto& c : test::qat_format_cases()) {
    const test::QatParams p = test::qat_params(c, seed += 10);
    Tensor ci = Tensor::empty(p.codes.shape(), DType::I8);
    for (int64_t i = 0; i < p.codes.numel(); ++i) ci.data<int8_t>()[i] = int8_t(std::nearbyint(p.codes.item(i) * 40.0));
    for (const Tensor& codes : {ci, p.codes}) {
      Tensor yc = Tensor::empty(codes.shape(), DType::BF16), yg = Tensor::empty(codes.shape(), DType::BF16).to(kGpu), yg32;
      ops::group_scale_forward(codes, p.step, c.f, yc);
      ops::group_scale_forward(gpu(codes), gpu(p.step), c.f, yg);
      ops::group_scale_forward(gpu(codes), gpu(p.step), c.f, yg32);
      const std::string what = std::string(c.f.name) + (codes.dtype() == DType::I8 ? " i8" : " f32") + " codes";
      check("group_scale_bf16", what, cpu(yg).to(DType::F32), yc.to(DType::F32), 0.0);
      EXPECT_EQ(max_abs_diff(cpu(yg).to(DType::F32), cpu(to_bf16(yg32)).to(DType::F32)), 0.0) << what;
    }
  }
}

// BitLinear's quantizers, the randomized Hadamard transform and the fake quantizer (issues 15, 16;
// ops/cuda/act_quant.cu), f32 and f64: bit for bit (tolerance 0) but ternary_fake_quant, whose
// gamma (mean |w|) the device sums in another order (f32: the same after rounding but for a rare
// tie, 1e-6; f64: 1e-12). Odd shapes, per-row and per-column groups, asymmetric and clipped grids,
// an all-zero group, the Hadamard with and without a small matrix (576 = 64 x 9, 1536 = 512 x 3),
// forward and transpose, and the autograd functions' backwards (straight through / the transpose).
TEST_F(Parity, ActQuant) {
  for (DType dt : {DType::F32, DType::F64}) {
    const std::string d = dtype_name(dt);
    auto r = [&](const Shape& s, uint64_t seed) { return Tensor::randn(s, seed, 1.0, DType::F64).to(dt); };
    struct Fq {
      int64_t M, N;
      int bits;
      bool asym;
      double clip;
      int64_t group;
      bool per_column;
    };
    for (const Fq& c : {Fq{37, 96, 8, false, 1.0, 96, false}, Fq{37, 96, 4, true, 0.9, 32, false},
                        Fq{64, 40, 3, false, 1.0, 16, true}, Fq{5, 7, 2, true, 1.0, 7, false}}) {
      Tensor x = r({c.M, c.N}, 11);
      Tensor x0 = x.to(DType::F64);
      for (int64_t k = 0; k < c.group && !c.per_column; ++k) x0.data<double>()[k] = 0.0;  // an all-zero group
      x = x0.to(dt);
      Tensor yc = Tensor::empty(x.shape(), dt), yg = nan_gpu(x.shape(), dt);
      ops::fake_quant(x, c.bits, c.asym, c.clip, c.group, c.per_column, yc);
      ops::fake_quant(gpu(x), c.bits, c.asym, c.clip, c.group, c.per_column, yg);
      check("fake_quant", str(d, " ", c.M, "x", c.N, " int", c.bits, c.asym ? " asym" : " sym", " g", c.group,
                              c.per_column ? " per column" : ""), yg, yc, 0.0);
    }
    {
      const Tensor x = r({29, 200}, 12);
      Tensor yc, yg;
      ops::act_quant_int8(x, yc);
      ops::act_quant_int8(gpu(x), yg);
      check("act_quant_int8", d, yg, yc, 0.0);
      ops::act_quant_int4_absmean(x, yc);
      ops::act_quant_int4_absmean(gpu(x), yg);
      check("act_quant_int4_absmean", d, yg, yc, 0.0);
    }
    for (auto sc : {ops::TernaryScale::AbsMean, ops::TernaryScale::AbsMedian}) {
      const Tensor w = r({48, 129}, 13);
      Tensor yc, yg;
      const double gc = ops::ternary_fake_quant(w, sc, yc), gg = ops::ternary_fake_quant(gpu(w), sc, yg);
      const double tol = dt == DType::F64 ? 1e-12 : 1e-6;
      EXPECT_NEAR(gg, gc, tol * gc) << d << " " << ops::ternary_scale_name(sc);
      check("ternary_fake_quant", str(d, " ", ops::ternary_scale_name(sc)), yg, yc, tol);
      EXPECT_NEAR(ops::ternary_gamma(gpu(w), sc), gc, tol * gc) << d;
    }
    struct Had {
      int64_t M, n, m;
    };
    for (const Had& c : {Had{7, 64, 1}, Had{5, 576, 9}, Had{3, 1536, 3}, Had{40, 8, 1}}) {
      const Tensor x = r({c.M, c.n}, 14);
      Tensor signs = r({c.n}, 15).to(DType::F64);
      for (int64_t k = 0; k < c.n; ++k) signs.data<double>()[k] = signs.data<double>()[k] < 0 ? -1.0 : 1.0;
      signs = signs.to(dt);
      const Tensor small = c.m > 1 ? r({c.m, c.m}, 16) : Tensor();
      for (bool transpose : {false, true}) {
        Tensor yc = Tensor::empty(x.shape(), dt), yg = nan_gpu(x.shape(), dt);
        ops::hadamard_transform(x, signs, small, transpose, yc);
        ops::hadamard_transform(gpu(x), gpu(signs), c.m > 1 ? gpu(small) : Tensor(), transpose, yg);
        check("hadamard_transform", str(d, " ", c.M, "x", c.n, " m ", c.m, transpose ? " transpose" : ""), yg, yc, 0.0);
      }
    }
  }
  // The autograd functions on both devices (f32): the Hadamard's backward is its transpose, the
  // quantizers' straight through.
  const Tensor signs = [] {
    Tensor s = Tensor::randn({576}, 17, 1.0, DType::F32);
    for (int64_t k = 0; k < 576; ++k) s.data<float>()[k] = s.data<float>()[k] < 0 ? -1.0f : 1.0f;
    return s;
  }();
  const Tensor small = Tensor::randn({9, 9}, 18, 0.3, DType::F32);
  autograd_parity("hadamard_transform",
                  [&](const std::vector<Var>& v, Device dev) { return hadamard_transform(v[0], signs.to(dev), small.to(dev)); },
                  {rnd({6, 576}, 19)}, 0.0, 0.0);
  autograd_parity("fake_quant", [](const std::vector<Var>& v, Device) { return fake_quant(v[0], 4, false, 1.0, 32); },
                  {rnd({6, 64}, 20)}, 0.0, 0.0);
}

// AdaRound's passes (issue 17) in f64 (the solver's dtype) and f32, at a size that is not a multiple
// of the block, with saturated, clamped and ordinary weights; cuBLAS's f64 gemm; then whole solves on
// both devices. Not bit for bit: the device's exp / pow and nvcc's FMA contraction differ from the
// CPU in the last place (f64: 1e-12 of the largest value; f32: 1e-5).
TEST_F(Parity, AdaRound) {
  // check() compares in f32; f64 results are compared here in f64 (then recorded through check()).
  auto check64 = [](const char* op, const std::string& what, const Tensor& got, const Tensor& ref, double tol) {
    const Tensor g = cpu(got).to(DType::F64), r = ref.to(DType::F64);
    double num = 0, den = 0;
    for (int64_t k = 0; k < r.numel(); ++k) {
      const double d = std::fabs(g.data<double>()[k] - r.data<double>()[k]);
      num = std::isnan(d) ? std::numeric_limits<double>::infinity() : std::max(num, d);
      den = std::max(den, std::fabs(r.data<double>()[k]));
    }
    EXPECT_LE(num / std::max(den, 1e-300), tol) << op << ": " << what;
    check(op, what, got, ref, tol);
  };
  const ops::adaround::Grid g{0, 7, 1.1, -0.1};
  const int64_t R = 37, C = 129;
  auto positive = [](Tensor t) {
    Tensor d = t.to(DType::F64);
    for (int64_t k = 0; k < d.numel(); ++k) d.data<double>()[k] = std::fabs(d.data<double>()[k]) + 1e-3;
    return d.to(t.dtype());
  };
  for (DType dt : {DType::F64, DType::F32}) {
    const double tol = dt == DType::F64 ? 1e-12 : 1e-5;
    auto r = [&](uint64_t seed, double sd) { return Tensor::randn({R, C}, seed, sd, DType::F64).to(dt); };
    const Tensor v = r(1, 4.0), w = r(2, 1.0), s = positive(r(3, 0.1)), z = Tensor::full({R, C}, 3.0, dt), eh = r(5, 1.0);
    Tensor fl = r(4, 3.0);  // codes before rounding: some below 0 and above 7 (clamped)
    {
      Tensor f64 = fl.to(DType::F64);
      for (int64_t k = 0; k < f64.numel(); ++k) f64.data<double>()[k] = std::floor(f64.data<double>()[k]) + 3;
      fl = f64.to(dt);
    }
    Tensor ec = Tensor::empty({R, C}, dt), eg = nan_gpu({R, C}, dt);
    ops::adaround_soft_error(v, w, fl, s, z, g, ec);
    ops::adaround_soft_error(gpu(v), gpu(w), gpu(fl), gpu(s), gpu(z), g, eg);
    check64("adaround_soft_error", dtype_name(dt), eg, ec, tol);
    ops::AdaRoundStep st;
    st.beta = 7.5;
    st.reg = 0.01;
    for (int64_t t : {int64_t(1), int64_t(40)}) {
      st.t = t;
      Tensor vc = v.clone(), mc = r(6, 0.01), m2c = positive(r(7, 0.01));
      Tensor vg = gpu(vc), mg = gpu(mc), m2g = gpu(m2c);
      ops::adaround_adam_step(vc, mc, m2c, eh, fl, s, z, g, st);
      ops::adaround_adam_step(vg, mg, m2g, gpu(eh), gpu(fl), gpu(s), gpu(z), g, st);
      const std::string what = str(dtype_name(dt), " t=", t);
      check64("adaround_adam_step", what + " v", vg, vc, tol);
      check64("adaround_adam_step", what + " m", mg, mc, tol);
      check64("adaround_adam_step", what + " m2", m2g, m2c, tol);
    }
  }
  {  // cuBLAS's f64 GEMM (AdaRound's E H) against the CPU's
    const Tensor a = Tensor::randn({37, 129}, 8, 1.0, DType::F64), b = Tensor::randn({129, 129}, 9, 1.0, DType::F64);
    Tensor cc = Tensor::empty({37, 129}, DType::F64), cg = nan_gpu({37, 129}, DType::F64);
    ops::gemm(a, false, b, false, cc, 1.0, 0.0);
    ops::gemm(gpu(a), false, gpu(b), false, cg, 1.0, 0.0);
    check64("gemm", "f64", cg, cc, 1e-13);
  }
}

// ---- coverage --------------------------------------------------------------------------------------
// Every op with a CUDA body in the registry has a parity test above (names kept in step by hand;
// cast's is CastParity.F32Bf16OnTheGpu in test_grad.cpp, beside its gradient check; quant_matmul's
// CUDA column is in tests/quant/test_quant_matmul.cpp, whose table covers every backend).
TEST(ParityCoverage, EveryRegistryOpHasAParityTest) {
  const std::vector<std::string> tested = {"gemm", "add", "sub", "mul", "scale", "sum", "rmsnorm", "rope", "attention",
                                           "silu", "swiglu", "embedding", "cross_entropy", "kl_div", "mse", "adamw_step",
                                           "adamw_step_multi", "adamw_step_groups", "weighted_sq_err",
                                           "cast", "quant_matmul",
                                           // CPU only: a model on the GPU keeps an f32 cache and uses attention.
                                           "kv_attention",
                                           // Parity.ActQuant (issues 15 and 16): BitLinear's quantizers,
                                           // the Hadamard transform and the fake quantizer.
                                           "ternary_fake_quant", "act_quant_int8",
                                           "act_quant_int4_absmean",
                                           "hadamard_transform", "fake_quant",
                                           // CPU only (issue 16): FP8/FP4 activation quantizers (ops/fp_act_quant.h).
                                           "fp_fake_quant",
                                           // CPU only (issue 18): a GPU tensor is an error (test_optim8.cpp).
                                           "adamw8_step",
                                           // Parity.QatQuantizers (issue 14)
                                           "lsq_quant", "seq_quant", "group_scale",
                                           // Parity.LpQuantize, Parity.Fp8Gemm (issue 18)
                                           "lp_quantize", "lp_quantize_fp8", "fp8_gemm", "lp_encode_fp8_dual",
                                           // CPU only (issue 18, fp4-dge): a GPU tensor is an error naming the op
                                           // (test_lp_dge.cpp); lp_linear refuses fp4-dge on CUDA first.
                                           "lp_dge_scale", "lp_occ_split",
                                           // Parity.LpInt4 (issue 18, int4)
                                           "lp_int4_hq", "lp_int4_bitsplit", "lp_int4_lss",
                                           // Parity.AdaRound (issue 17)
                                           "adaround_soft_error", "adaround_adam_step"};
  for (const auto& op : ops::op_registry())
    EXPECT_NE(std::find(tested.begin(), tested.end(), std::string(op.name)), tested.end())
        << "op '" << op.name << "' has no GPU parity test";
}
