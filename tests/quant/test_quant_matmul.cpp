// quant_matmul: ONE table covering every (format x backend x shape) cell against the reference body
// (row-by-row decode with the format's codec, f64 accumulation). A format added to the format table
// or a backend added to kBackends below is covered without touching the test.
//   exact backends (f32 activations): |y - y_ref| <= 1e-5 * sum_i |x_i w_i|
//   int8 backends: |y - y_ref| <= sum_i |w_i| * d_block(i) / 2 * (1 + 1e-3) + 1e-5 * sum_i |x_i w_i|
//     (d = amax/127 of the activation block, 32 values or ops::quant_matmul_act_block's 256 for the
//     ternary layouts: the activation rounding is the only error); ptq161 (column mask): its int8 body
//     quantizes r_j x_j of the binary columns to int8 and x_j of the salient ones to int16, each
//     gathered in column order, per block of 32 (masked_int8_bound).
// SIMD cells run on what this CPU supports (skipped otherwise, with a message), the portable cells
// always; CUDA cells (the device copy of the weight, x and y on the GPU) skip without a GPU, and for
// formats without a GPU form (ops::quant_matmul_has_cuda_layout).
//   cuda (Auto): the int8 decode GEMV for M <= 8, dequantized f32 tiles + cuBLAS for M > 8;
//   cuda-int8: the GEMV for every M (chunks of 8 rows); cuda-exact: f32 tiles for every M.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/expect_message.h"
#include "lowbit/autograd/functions.h"
#include "lowbit/core/threads.h"
#include "lowbit/ops/cuda/quant_gemv_layout.h"
#include "lowbit/ops/device_init.h"
#include "lowbit/ops/ops.h"
#include "lowbit/ops/quant_matmul.h"
#include "lowbit/ops/quant_matmul_kernels.h"
#include "lowbit/quant/quant_linear.h"
#include "lowbit/quant/quantize.h"

using namespace lowbit;

namespace {

struct Backend {
  const char* name;
  ops::QuantMatmulPath path;
  ops::QuantIsa isa;
  bool int8;  // error bound of the int8-activation path
  bool cuda;
  bool avxvnni = false;  // the 256-bit AVX-VNNI kernels even where AVX-512 VNNI is present
  ops::CudaGemv gemv = ops::CudaGemv::Auto;  // cuda: the decode GEMV kernel (Auto: LOWBIT_CUDA_GEMV, else v2pdl)
  // The ternary lookup-table kernel: the weight gets its index form (quant_matmul_to_tl_layout);
  // the path's Int8 body then takes it (the ternary format only: other formats skip these cells).
  bool lut = false;
};

// int8-avx2-vnni runs the AVX-512 VNNI kernels where the CPU has them, int8-avx-vnni-256 the
// AVX-VNNI (VEX) copy (CPUs with AVX-VNNI only).
const Backend kBackends[] = {
    {"exact", ops::QuantMatmulPath::Exact, ops::QuantIsa::Auto, false, false},
    {"auto", ops::QuantMatmulPath::Auto, ops::QuantIsa::Auto, true, false},
    {"int8-portable", ops::QuantMatmulPath::Int8, ops::QuantIsa::Portable, true, false},
    {"int8-avx2", ops::QuantMatmulPath::Int8, ops::QuantIsa::Avx2, true, false},
    {"int8-avx2-vnni", ops::QuantMatmulPath::Int8, ops::QuantIsa::Avx2Vnni, true, false},
    {"int8-avx-vnni-256", ops::QuantMatmulPath::Int8, ops::QuantIsa::Avx2Vnni, true, false, true},
    {"cuda", ops::QuantMatmulPath::Auto, ops::QuantIsa::Auto, true, true},
    {"cuda-int8", ops::QuantMatmulPath::Int8, ops::QuantIsa::Auto, true, true},
    {"cuda-exact", ops::QuantMatmulPath::Exact, ops::QuantIsa::Auto, false, true},
    {"cuda-int8-v1", ops::QuantMatmulPath::Int8, ops::QuantIsa::Auto, true, true, false, ops::CudaGemv::V1},
    {"cuda-int8-v2", ops::QuantMatmulPath::Int8, ops::QuantIsa::Auto, true, true, false, ops::CudaGemv::V2},
    {"cuda-int8-v2pdl", ops::QuantMatmulPath::Int8, ops::QuantIsa::Auto, true, true, false, ops::CudaGemv::V2Pdl},
    {"lut-auto", ops::QuantMatmulPath::Auto, ops::QuantIsa::Auto, true, false, false, ops::CudaGemv::Auto, true},
    {"lut-portable", ops::QuantMatmulPath::Int8, ops::QuantIsa::Portable, true, false, false, ops::CudaGemv::Auto, true},
    {"lut-avx2", ops::QuantMatmulPath::Int8, ops::QuantIsa::Avx2, true, false, false, ops::CudaGemv::Auto, true},
};

// With a GPU the tests run the packed CUDA path, which models use only when enabled (off by
// default until verified: ops::cuda_packed_enabled).
bool gpu() {
  static const bool ok = init_cuda();
  if (ok) ops::set_cuda_packed_enabled(true);
  return ok;
}

struct Shape3 {
  int64_t out, in, M;
};
// Odd sizes, sizes not a multiple of the group (or of 32), 1 and many tokens (M > 8 takes the
// tiled prefill body), rows that span several tiles. The CUDA GEMV: M 1..8 in its buckets of 1, 2,
// 4, 8 token rows (M > 8 in chunks of 8 with cuda-int8), row counts not a multiple of its 8 or 16
// rows per block, and rows of 257 blocks (in = 8224): several of the V2 kernel's chunks of 32 U
// blocks per lane for every bit width and R (U = 2..16), the last one partial.
// ggml block formats take the shapes whose rows are whole blocks (32 or 256).
const Shape3 kShapes[] = {{7, 33, 1}, {5, 96, 3}, {16, 128, 1}, {9, 200, 8}, {13, 257, 9}, {5, 256, 3},
                          {32, 576, 17}, {3, 1000, 2}, {6, 64, 40}, {260, 512, 12}, {4, 768, 1},
                          {11, 8224, 1}, {37, 8224, 5}, {19, 1024, 7}};

// The 256-bit AVX-VNNI kernels in place of the AVX-512 ones (x86 with AVX-VNNI only).
bool force_avxvnni(bool on) {
#if defined(__x86_64__) || defined(__i386__)
  return ops::qmm::force_avxvnni(on);
#else
  return !on;
#endif
}

Tensor test_input(int64_t M, int64_t in, uint64_t seed) {
  Tensor x = Tensor::randn({M, in}, seed, 1.0);
  float* p = x.data<float>();
  p[0] = 9.0f;  // an outlier channel, as real activations have
  if (in > 40) p[in * (M - 1) + 40] = -7.5f;
  return x;
}

// quantize()'s data-free ptq161 writes column factors r_j = 1: varied ones (0.25 .. 1.75) make the
// tests check that every body applies them.
void vary_column_factors(QuantizedTensor& q) {
  auto* rw = static_cast<uint16_t*>(q.col_scales.raw_data());
  for (int64_t t = 0; t < q.col_scales.numel(); ++t) rw[t] = f32_to_f16(0.25f + 0.125f * float(t * 7 % 13));
}

// The int8 body's rounding bound of output o for a column-masked weight (ptq161): binary column j
// adds |mu +- alpha| |r_j x_j - d q_j| <= |w_j / r_j| d / 2 (d = amax / 127 of its int8 block of
// gathered r x values), salient column j |w_j| d / 2 (d = amax / 32767 of its int16 block of
// gathered x values).
double masked_int8_bound(const QuantizedTensor& q, const float* xm, int64_t o) {
  const int64_t in = q.in_features();
  std::vector<float> w(static_cast<size_t>(in));
  q.dequantize_row(o, w.data());
  const uint8_t* mask = q.col_mask.data<uint8_t>();
  const auto* r = static_cast<const uint16_t*>(q.col_scales.raw_data());
  std::vector<double> vb, wb, vs, ws;
  for (int64_t j = 0, t = 0; j < in; ++j) {
    if (mask[j / 8] >> (j % 8) & 1) {
      vs.push_back(std::fabs(double(xm[j])));
      ws.push_back(std::fabs(double(w[size_t(j)])));
    } else {
      const double rj = f16_to_f32(r[t++]);
      vb.push_back(std::fabs(rj * double(xm[j])));
      wb.push_back(rj != 0 ? std::fabs(double(w[size_t(j)]) / rj) : 0.0);
    }
  }
  double bound = 0;
  for (auto [v, wt, qmax] : {std::tuple{&vb, &wb, 127.0}, std::tuple{&vs, &ws, 32767.0}})
    for (size_t b0 = 0; b0 < v->size(); b0 += 32) {
      const size_t b1 = std::min(v->size(), b0 + 32);
      double amax = 0, sw = 0;
      for (size_t i = b0; i < b1; ++i) amax = std::max(amax, (*v)[i]), sw += (*wt)[i];
      bound += sw * amax / qmax / 2.0;
    }
  return bound;
}

// The CPU panel layout (ops/quant_matmul.h) of both heights the x86 panel kernels read (8: 256-bit
// vectors, 16: AVX-512), each a copy of q with its codes rearranged, for the weights that have one.
std::vector<QuantizedTensor> panel_layouts(const QuantizedTensor& q) {
  std::vector<QuantizedTensor> out;
  const ops::PackedWeight v = q.packed_view();
  for (int64_t h : {8, 16}) {
    if (!ops::quant_matmul_panel_layout_supported(v, h)) continue;
    QuantizedTensor p = q;
    p.codes = q.codes.clone();
    ops::quant_matmul_to_panel_layout(v, h, p.codes.data<uint8_t>());
    p.panel_rows = h;
    out.push_back(std::move(p));
  }
  return out;
}

// y == the same product on each panel-layout copy, bit for bit (the layout changes no number).
void expect_panel_layouts_equal(const std::vector<QuantizedTensor>& panels, const Tensor& x, const Tensor& y,
                                const ops::QuantMatmulOptions& opt, int& cells) {
  for (const QuantizedTensor& p : panels)
    for (bool direct : {true, false}) {  // AVX-512, ggml blocks: products straight from the layout, or via the tile
#if defined(__x86_64__) || defined(__i386__)
      struct Restore {
        bool was;
        ~Restore() { ops::qmm::set_panel_direct(was); }
      } restore{ops::qmm::set_panel_direct(direct)};
#else
      if (!direct) continue;
#endif
      Tensor yp = Tensor::empty(y.shape());
      ops::quant_matmul(x, p.packed_view(), yp, opt);
      ++cells;
      const float *a = y.data<float>(), *b = yp.data<float>();
      for (int64_t i = 0; i < y.numel(); ++i)
        ASSERT_EQ(a[i], b[i]) << "output " << i << ": the panel layout of " << p.panel_rows << " rows differs"
                              << (direct ? "" : " (tile decode)");
    }
}

// An explicit lookup-table call on a ternary weight without its index form (throws).
Tensor run_lut_without_index(const ops::PackedWeight& w, int64_t in) {
  Tensor y = Tensor::empty({1, w.out});
  ops::quant_matmul(Tensor::randn({1, in}, 5), w, y, {ops::QuantMatmulPath::Int8, ops::QuantIsa::Auto, true,
                                                      ops::CudaGemv::Auto, ops::TernaryBody::Lut});
  return y;
}

}  // namespace

TEST(QuantMatmul, EveryFormatBackendShapeCellMatchesTheReference) {
  int run = 0, skipped = 0, panel_cells = 0;
  std::vector<std::string> skips;
  for (const QuantFormat& f : all_quant_formats()) {
    for (const Shape3& s : kShapes) {
      if (!f.row_fits(s.in)) continue;  // not a shape of this format (ggml: whole blocks)
      const Tensor w = Tensor::randn({s.out, s.in}, 7 + uint64_t(s.in), 0.05);
      QuantizedTensor q;
      try {
        q = quantize(w, f);
      } catch (const Error& e) {
        skips.push_back(std::string(f.name) + ": no reference quantizer to build a test weight (" + e.what() + ")");
        ++skipped;
        continue;
      }
      if (f.has_column_mask()) vary_column_factors(q);
      const ops::PackedWeight view = q.packed_view();
      const Tensor x = test_input(s.M, s.in, 3 + uint64_t(s.out));
      Tensor yref = Tensor::empty({s.M, s.out});
      ops::quant_matmul(x, view, yref, {ops::QuantMatmulPath::Reference});
      const Tensor wd = q.dequantize();
      // Every CPU cell also runs on the panel layouts (8 and 16 rows, where the weight has them):
      // the same numbers bit for bit, whichever body reads them.
      const std::vector<QuantizedTensor> panels = panel_layouts(q);
      expect_panel_layouts_equal(panels, x, yref, {ops::QuantMatmulPath::Reference}, panel_cells);
      // Per-output bounds (the int8 activation blocks: 32 values, 256 for the ternary layouts).
      const int64_t ab = ops::quant_matmul_act_block(view);
      std::vector<double> scale(size_t(s.M * s.out)), rbound(size_t(s.M * s.out));
      const float *px = x.data<float>(), *pw = wd.data<float>();
      for (int64_t m = 0; m < s.M; ++m)
        for (int64_t o = 0; o < s.out; ++o) {
          double sc = 0, rb = 0;
          for (int64_t b0 = 0; b0 < s.in; b0 += ab) {
            const int64_t b1 = std::min(s.in, b0 + ab);
            double amax = 0;
            for (int64_t i = b0; i < b1; ++i) amax = std::max(amax, std::fabs(double(px[m * s.in + i])));
            for (int64_t i = b0; i < b1; ++i) {
              const double wi = std::fabs(double(pw[o * s.in + i]));
              sc += wi * std::fabs(double(px[m * s.in + i]));
              rb += wi * amax / 127.0 / 2.0;
            }
          }
          if (f.has_column_mask()) rb = masked_int8_bound(q, px + m * s.in, o);
          scale[size_t(m * s.out + o)] = sc;
          rbound[size_t(m * s.out + o)] = rb;
        }
      for (const Backend& be : kBackends) {
        const std::string cell = std::string(f.name) + " x " + be.name + " x [" + std::to_string(s.out) + "x" +
                                 std::to_string(s.in) + "] M=" + std::to_string(s.M);
        if (be.cuda && !gpu()) {
          ++skipped;
          skips.push_back("cuda: no CUDA device (or a CPU-only build)");
          continue;
        }
        if (be.cuda && !ops::quant_matmul_has_cuda_layout(view)) {
          ++skipped;
          skips.push_back(std::string("cuda: ") + f.name + " has no GPU form (or in % 32 != 0)");
          continue;
        }
        if (!ops::quant_isa_supported(be.isa) || (be.avxvnni && !force_avxvnni(true))) {
          ++skipped;
          skips.push_back(std::string(be.name) + ": not supported by this CPU");
          continue;
        }
        if (be.lut && !ops::quant_matmul_tl_supported(view)) {
          ++skipped;
          skips.push_back("lut: the ternary format with >= 32 rows only");
          continue;
        }
        struct Unforce {
          ~Unforce() { force_avxvnni(false); }
        } unforce;
        SCOPED_TRACE(cell);
        Tensor y = Tensor::empty({s.M, s.out});
        if (be.lut) {
          QuantizedTensor ql = q;
          ASSERT_TRUE(ql.to_tl_layout());
          ops::quant_matmul(x, ql.packed_view(), y, {be.path, be.isa});
        } else if (be.cuda) {
          q.upload_to_device();
          const ops::PackedWeight dview = q.packed_view();
          Tensor yd = Tensor::empty({s.M, s.out}, DType::F32, Device::CUDA);
          ops::quant_matmul(x.to(Device::CUDA), dview, yd, {be.path, be.isa, true, be.gemv});
          y = yd.to(Device::CPU);
        } else {
          ops::quant_matmul(x, view, y, {be.path, be.isa});
          expect_panel_layouts_equal(panels, x, y, {be.path, be.isa}, panel_cells);
        }
        ++run;
        const float *py = y.data<float>(), *pr = yref.data<float>();
        for (int64_t i = 0; i < s.M * s.out; ++i) {
          double tol = 1e-5 * scale[size_t(i)] + 1e-7;
          if (be.int8) tol += rbound[size_t(i)] * (1 + 1e-3);
          ASSERT_LE(std::fabs(double(py[i]) - double(pr[i])), tol) << "output " << i << ": " << py[i] << " vs " << pr[i];
        }
      }
    }
  }
  std::string msg;
  for (const auto& s : skips)
    if (msg.find(s) == std::string::npos) msg += "\n  skipped: " + s;
  std::printf("quant_matmul table: %d cells run, %d skipped, %d panel-layout cells (ISA best here: %s)%s\n", run,
              skipped, panel_cells, ops::quant_isa_name(ops::quant_isa_best()), msg.c_str());
  EXPECT_GT(run, 0);
  EXPECT_GT(panel_cells, 0);
}

TEST(QuantMatmul, ReferenceEqualsDenseProductWithTheDequantizedWeight) {
  const QuantFormat& f = parse_quant_format("int4g32");
  const Tensor w = Tensor::randn({11, 70}, 5, 0.1);
  const QuantizedTensor q = quantize(w, f);
  const Tensor x = test_input(4, 70, 9), wd = q.dequantize();
  Tensor y = Tensor::empty({4, 11});
  ops::quant_matmul(x, q.packed_view(), y, {ops::QuantMatmulPath::Reference});
  for (int64_t m = 0; m < 4; ++m)
    for (int64_t o = 0; o < 11; ++o) {
      double acc = 0;
      for (int64_t i = 0; i < 70; ++i) acc += double(x.data<float>()[m * 70 + i]) * wd.data<float>()[o * 70 + i];
      EXPECT_NEAR(y.data<float>()[m * 11 + o], acc, 1e-5 * (1 + std::fabs(acc)));
    }
}

// The process-wide default (the CLI's --matmul) decides what options.path == Auto runs: with
// Exact, a decode-sized call (M = 2, Auto's int8 territory) gives the Exact body's numbers; with
// Int8 the Int8 body's; back to Auto afterwards. Names parse; anything else is an error.
TEST(QuantMatmul, ProcessDefaultPathSteersAuto) {
  const QuantizedTensor q = quantize(Tensor::randn({40, 64}, 3, 0.1), parse_quant_format("int4g32"));
  const Tensor x = test_input(2, 64, 4);
  auto run = [&](ops::QuantMatmulPath p) {
    Tensor y = Tensor::empty({2, 40});
    ops::quant_matmul(x, q.packed_view(), y, {p});
    return y;
  };
  const Tensor exact = run(ops::QuantMatmulPath::Exact), int8 = run(ops::QuantMatmulPath::Int8);
  ASSERT_GT(max_abs_diff(exact, int8), 0.0);  // the two bodies differ here, so the test can tell them apart
  ops::set_quant_matmul_default(ops::QuantMatmulPath::Exact);
  EXPECT_EQ(max_abs_diff(run(ops::QuantMatmulPath::Auto), exact), 0.0);
  ops::set_quant_matmul_default(ops::QuantMatmulPath::Int8);
  EXPECT_EQ(max_abs_diff(run(ops::QuantMatmulPath::Auto), int8), 0.0);
  EXPECT_EQ(max_abs_diff(run(ops::QuantMatmulPath::Exact), exact), 0.0);  // an explicit path wins
  ops::set_quant_matmul_default(ops::QuantMatmulPath::Auto);
  EXPECT_EQ(ops::quant_matmul_default(), ops::QuantMatmulPath::Auto);
  EXPECT_EQ(ops::parse_quant_matmul_path("exact"), ops::QuantMatmulPath::Exact);
  EXPECT_EQ(ops::parse_quant_matmul_path("reference"), ops::QuantMatmulPath::Reference);
  EXPECT_THROW(ops::parse_quant_matmul_path("f32"), Error);
}

TEST(QuantMatmul, RejectsBadArguments) {
  const QuantizedTensor q = quantize(Tensor::randn({4, 64}, 1, 0.1), parse_quant_format("int4g32"));
  ops::PackedWeight v = q.packed_view();
  Tensor y = Tensor::empty({2, 4});
  auto expect_error = [](auto fn, const std::string& what) { test::expect_message(fn, what); };
  expect_error([&] { ops::quant_matmul(Tensor::randn({2, 63}, 1), v, y); }, "x must be f32 [M, 64]");
  expect_error([&] { ops::quant_matmul(Tensor::randn({2, 64}, 1, 1.0, DType::F64), v, y); }, "x must be f32");
  expect_error([&] { Tensor y3 = Tensor::empty({2, 5}); ops::quant_matmul(Tensor::randn({2, 64}, 1), v, y3); }, "y has shape");
  ops::PackedWeight bad = v;
  bad.bits = 3;
  expect_error([&] { ops::quant_matmul(Tensor::randn({2, 64}, 1), bad, y); }, "needs 2, 4 or 8-bit codes");
  bad = v;
  bad.row_bytes = 31;
  expect_error([&] { ops::quant_matmul(Tensor::randn({2, 64}, 1), bad, y); }, "row_bytes 31");
  bad = v;
  bad.n_groups = 3;
  expect_error([&] { ops::quant_matmul(Tensor::randn({2, 64}, 1), bad, y); }, "has 3 groups");
  if (!ops::quant_isa_supported(ops::QuantIsa::Avx2Vnni))
    expect_error([&] { ops::quant_matmul(Tensor::randn({2, 64}, 1), v, y, {ops::QuantMatmulPath::Int8, ops::QuantIsa::Avx2Vnni}); },
                 "not supported by this CPU");
}

TEST(QuantLinear, InferenceRunsPackedAndNeverBuildsTheF32Weight) {
  const QuantizedTensor q = quantize(Tensor::randn({24, 96}, 2, 0.1), parse_quant_format("int4g32"));
  const Tensor bias = Tensor::randn({24}, 3, 0.1);
  QuantLinear ql(q, bias);
  const Tensor x = test_input(20, 96, 4);
  const Tensor y = ql.forward(Var(x)).value();
  EXPECT_FALSE(ql.has_dequantized_weight()) << "the inference path materialized the f32 weight";
  const Tensor x1 = test_input(1, 96, 5);
  ql.forward(Var(x1));
  EXPECT_FALSE(ql.has_dequantized_weight());
  // effective_weight() decodes for the caller without keeping the copy.
  const Tensor wd = ql.effective_weight();
  EXPECT_FALSE(ql.has_dequantized_weight());
  const Tensor yd = linear(Var(x), Var(wd), Var(bias)).value();
  for (int64_t i = 0; i < y.numel(); ++i) EXPECT_NEAR(y.data<float>()[i], yd.data<float>()[i], 1e-4);
  // A gradient through x needs the dense weight: built then, once.
  Var xg(x, true);
  backward(sum(ql.forward(xg)));
  EXPECT_TRUE(ql.has_dequantized_weight());
  EXPECT_EQ(xg.grad().shape(), x.shape());
}

// The CUDA GEMV kernels differ only in when their loads are issued and how they are launched
// (ops/cuda/quant_gemv.cuh): each lane sums the same blocks in the same order, so v2 and v2pdl
// must give v1's outputs bit for bit, for every bit width, token bucket and a row count that is
// not a multiple of the block's rows. Rows of 257 blocks: several v2 chunks per lane.
TEST(QuantMatmul, CudaGemvVariantsAgreeBitForBit) {
  if (!gpu()) GTEST_SKIP() << "no CUDA device (or a CPU-only build)";
  for (const char* name : {"int4g128", "int2g64", "int8pc", "q4_0", "q4_1", "q8_0", "ternary"}) {
    QuantizedTensor q = quantize(Tensor::randn({45, 8224}, 4, 0.05), parse_quant_format(name));
    q.upload_to_device();
    const ops::PackedWeight v = q.packed_view();
    ASSERT_TRUE(ops::quant_matmul_has_cuda_layout(v)) << name;
    for (int64_t M = 1; M <= 8; ++M) {
      SCOPED_TRACE(std::string(name) + " M=" + std::to_string(M));
      const Tensor x = test_input(M, 8224, 11 + uint64_t(M)).to(Device::CUDA);
      std::vector<Tensor> ys;
      for (const ops::CudaGemv k : {ops::CudaGemv::V1, ops::CudaGemv::V2, ops::CudaGemv::V2Pdl}) {
        Tensor y = Tensor::empty({M, 45}, DType::F32, Device::CUDA);
        ops::quant_matmul(x, v, y, {ops::QuantMatmulPath::Int8, ops::QuantIsa::Auto, true, k});
        ys.push_back(y.to(Device::CPU));
      }
      for (size_t k = 1; k < ys.size(); ++k)
        ASSERT_EQ(0, std::memcmp(ys[0].raw_data(), ys[k].raw_data(), size_t(M * 45) * sizeof(float)))
            << "variant " << k + 1 << " differs from v1";
    }
  }
}

TEST(QuantLinear, GpuInferenceRunsPackedAndNeverBuildsTheF32Weight) {
  if (!gpu()) GTEST_SKIP() << "no CUDA device (or a CPU-only build)";
  for (const char* name : {"int4g128", "int2g64", "int8pc", "q4_0", "q4_1", "q8_0"}) {
    SCOPED_TRACE(name);
    const QuantizedTensor q = quantize(Tensor::randn({40, 256}, 2, 0.1), parse_quant_format(name));
    const Tensor bias = Tensor::randn({40}, 3, 0.1);
    QuantLinear cpu(q, bias), dev(q, bias, Device::CUDA);
    for (int64_t M : {1, 5, 8, 20}) {
      const Tensor x = test_input(M, 256, 4 + uint64_t(M));
      cpu.set_matmul_options({M <= 8 ? ops::QuantMatmulPath::Int8 : ops::QuantMatmulPath::Exact});
      const Tensor yc = cpu.forward(Var(x)).value();
      const Tensor yg = dev.forward(Var(x.to(Device::CUDA))).value();
      ASSERT_EQ(yg.device(), Device::CUDA);
      const Tensor yh = yg.to(Device::CPU);
      // Same int8 operand (decode) or the same f32 values (prefill): f32 summation order only.
      for (int64_t i = 0; i < yc.numel(); ++i)
        EXPECT_NEAR(yh.data<float>()[i], yc.data<float>()[i], 2e-5 * (1 + std::fabs(yc.data<float>()[i]))) << i;
    }
    EXPECT_FALSE(dev.has_dequantized_weight()) << "the GPU inference path materialized the f32 weight";
    EXPECT_TRUE(dev.quantized().has_device_copy());
  }
}

TEST(QuantEmbedding, RowsMatchTheDecoderOnCpuAndGpu) {
  const QuantizedTensor q = quantize(Tensor::randn({50, 64}, 8, 0.1), parse_quant_format("q8_0"));
  const ops::PackedWeight v = q.packed_view();
  Tensor ids = Tensor::empty({3}, DType::I32);
  ids.data<int32_t>()[0] = 7, ids.data<int32_t>()[1] = 0, ids.data<int32_t>()[2] = 49;
  Tensor e = Tensor::empty({3, 64});
  ops::quant_embedding(v, ids, e);
  std::vector<float> row(64);
  for (int i = 0; i < 3; ++i) {
    q.dequantize_row(ids.data<int32_t>()[i], row.data());
    for (int k = 0; k < 64; ++k) EXPECT_EQ(e.data<float>()[i * 64 + k], row[size_t(k)]);
  }
  Tensor bad = ids.clone();
  bad.data<int32_t>()[1] = 50;
  EXPECT_THROW(ops::quant_embedding(v, bad, e), Error);
  if (!gpu()) GTEST_SKIP() << "no CUDA device (or a CPU-only build)";
  q.upload_to_device();
  const ops::PackedWeight dv = q.packed_view();
  Tensor eg = Tensor::empty({3, 64}, DType::F32, Device::CUDA);
  ops::quant_embedding(dv, ids, eg);
  const Tensor eh = eg.to(Device::CPU);
  for (int64_t i = 0; i < e.numel(); ++i) EXPECT_FLOAT_EQ(eh.data<float>()[i], e.data<float>()[i]);
  EXPECT_THROW(ops::quant_embedding(dv, bad, eg), Error);
}

// The GPU kernels' arithmetic on the host: the device layout (device_layout_on_host, what
// upload_packed_weight copies), unpacked with the same functions the kernels call
// (ops/cuda/quant_gemv_layout.h), must give the CPU Int8 body's numbers (decode) and
// dequantize_row's values (prefill tiles, embeddings). Runs without a GPU.
TEST(QuantMatmulGpuLayout, HostEmulationOfTheKernelsMatchesTheCpuBodies) {
  for (const char* name : {"int4g128", "int4g32", "int4g128s", "int4pc", "int2g64", "int2g32s", "int2pc", "int8pc", "q4_0", "q4_1", "q8_0",
                           "ternary", "tq2_0"}) {
    const QuantFormat* fp = nullptr;
    try {
      fp = &parse_quant_format(name);
    } catch (const Error&) {
      continue;  // no such format name in this build's table
    }
    SCOPED_TRACE(name);
    const int64_t out = 9, in = 256, M = 3;
    const QuantizedTensor q = quantize(Tensor::randn({out, in}, 11, 0.1), *fp);
    const ops::PackedWeight v = q.packed_view();
    ASSERT_TRUE(ops::quant_matmul_has_cuda_layout(v));
    // The ternary layouts: the CPU's int8 bodies quantize activations per 256 values, the GPU per 32,
    // so their decode is checked against the exact product within the int8 bound of 32-value blocks;
    // the ternary format's f32 gamma multiplies the product afterwards (d.post; 1 for the others).
    const bool ternary = ops::qmm::ternary_kind(v) != ops::qmm::TernaryKind::None;
    const double wtol = 1e-6;
    const ops::DevicePackedWeight d = ops::device_layout_on_host(v);
    ASSERT_EQ(d.codes.shape(), (Shape{out, d.row_bytes}));
    const uint8_t* codes = d.codes.data<uint8_t>();
    const uint16_t* prm = static_cast<const uint16_t*>(d.params.raw_data());
    const int64_t nb = in / 32, bytes = 32 * d.bits / 8;
    // Dequantization (dequant_rows_kernel's formula) == dequantize_row.
    std::vector<float> ref(static_cast<size_t>(in)), got(static_cast<size_t>(in));
    for (int64_t r = 0; r < out; ++r) {
      q.dequantize_row(r, ref.data());
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t g = d.n_groups == 1 ? 0 : b * 32 / d.group_size;
        const float s = f16_to_f32(prm[(r * d.n_groups + g) * 2]), z = f16_to_f32(prm[(r * d.n_groups + g) * 2 + 1]);
        for (int p = 0; p < 32; ++p) {
          const float c = float(qgemv::code_at_pos(d.bits, codes + r * d.row_bytes + b * bytes, p));
          got[size_t(b * 32 + qgemv::block_source(d.order, p))] = (d.offset ? c * s + z : (c - z) * s) * d.post;
        }
      }
      for (int64_t i = 0; i < in; ++i)
        ASSERT_NEAR(got[size_t(i)], ref[size_t(i)], wtol * std::fabs(ref[size_t(i)]) + 1e-6 * (1 + std::fabs(ref[size_t(i)])))
            << r << "," << i;
    }
    // Decode: int8 activations in kernel order, 8 dp4a words per block, block_term.
    const Tensor x = test_input(M, in, 5);
    Tensor ycpu = Tensor::empty({M, out});
    ops::quant_matmul(x, v, ycpu, {ternary ? ops::QuantMatmulPath::Exact : ops::QuantMatmulPath::Int8, ops::QuantIsa::Portable});
    const Tensor wd = q.dequantize();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < out; ++r) {
        float acc = 0.f;
        double mag = 0, bound = 0;  // bound: the int8 activations' error over 32-value blocks, and gamma's
        for (int64_t b = 0; b < nb; ++b) {
          const float* xb = x.data<float>() + m * in + b * 32;
          float amax = 0.f;
          for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
          for (int i = 0; i < 32; ++i) {
            const double wi = std::fabs(double(wd.data<float>()[r * in + b * 32 + i]));
            bound += wi * amax / 127.0 / 2.0 * (1 + 1e-3) + wtol * wi * std::fabs(double(xb[i]));
          }
          const float dd = amax / 127.0f, inv = dd > 0 ? 1.0f / dd : 0.0f;
          int8_t xq[32];
          int sum = 0;
          for (int p = 0; p < 32; ++p) {
            xq[p] = int8_t(std::clamp(int(std::nearbyint(xb[qgemv::block_source(d.order, p)] * inv)), -127, 127));
            sum += xq[p];
          }
          uint32_t u[8];
          std::memcpy(u, codes + r * d.row_bytes + b * bytes, size_t(bytes));
          int32_t a[8];
          if (d.bits == 4) qgemv::unpack_words<4>(u, a);
          else if (d.bits == 2) qgemv::unpack_words<2>(u, a);
          else qgemv::unpack_words<8>(u, a);
          int32_t dot = 0;
          for (int i = 0; i < 8; ++i)
            for (int k = 0; k < 4; ++k) dot += int32_t(int8_t(uint32_t(a[i]) >> (8 * k))) * xq[4 * i + k];
          const int64_t g = d.n_groups == 1 ? 0 : b * 32 / d.group_size;
          const float s = f16_to_f32(prm[(r * d.n_groups + g) * 2]), z = f16_to_f32(prm[(r * d.n_groups + g) * 2 + 1]);
          const float o = d.offset ? z : -s * z;
          acc += qgemv::block_term(s, o, dd, dd * float(sum), dot);
          mag += std::fabs(double(s) * dd * dot) + std::fabs(double(o) * dd * sum);  // cancellation scale
        }
        acc *= d.post;
        mag *= std::fabs(double(d.post));
        const float c = ycpu.data<float>()[m * out + r];
        EXPECT_NEAR(acc, c, (ternary ? bound : 0.0) + 1e-5 * mag + 1e-6) << "m " << m << " row " << r;
      }
  }
}

// The ternary format (BitNet b1.58: 2-bit codes, one f32 gamma per tensor) runs the IntGroups
// kernels with its tensor scale (the table above covers its cells); the exact body decodes it bit
// for bit like the codec, and views without scales are refused unless they have one group per row.
TEST(QuantMatmul, TernaryRunsTheIntGroupsKernelsWithItsTensorScale) {
  const QuantizedTensor q = quantize(Tensor::randn({12, 96}, 3, 0.05), quant_format(QuantFormatId::Ternary));
  const ops::PackedWeight v = q.packed_view();
  EXPECT_EQ(v.layout, ops::PackedLayout::IntGroups);
  EXPECT_EQ(v.scales, nullptr);
  EXPECT_FLOAT_EQ(v.tensor_scale, q.tensor_scale.data<float>()[0]);
  EXPECT_TRUE(ops::quant_matmul_has_int8_kernel(v));
  EXPECT_TRUE(ops::quant_matmul_has_cuda_layout(v));  // one group per row (f16 scale 1), gamma as the product's post
  EXPECT_EQ(ops::device_layout_on_host(v).post, q.tensor_scale.data<float>()[0]);
  // x = e_i picks column i of W: the exact body returns the codec's values exactly.
  const Tensor wd = q.dequantize();
  Tensor x = Tensor::zeros({1, 96});
  x.data<float>()[17] = 1.0f;
  Tensor y = Tensor::empty({1, 12});
  ops::quant_matmul(x, v, y, {ops::QuantMatmulPath::Exact});
  for (int64_t o = 0; o < 12; ++o) EXPECT_EQ(y.data<float>()[o], wd.data<float>()[o * 96 + 17]);
  ops::PackedWeight bad = v;
  bad.n_groups = 2;
  bad.group_size = 48;
  EXPECT_THROW(ops::quant_matmul(x, bad, y), Error);
  bad = v;
  bad.tensor_scale = 0.0f;
  EXPECT_THROW(ops::quant_matmul(x, bad, y), Error);
}

// quant_matmul_many (serving's q / k / v and gate / up in one parallel region): every product's
// numbers are those of quant_matmul alone, bit for bit — plain layouts sharing one quantized input
// (weights of several row counts: panels, four-row and single-row leftovers; 576 columns: the
// quantization split over the pool at 8 rows), and the sets that fall back to one product after
// the other (formats with another activation order, a ternary weight, more rows than the Int8 body
// takes, the Exact path); inside a QuantSharedInputScope too; outputs fully written.
TEST(QuantMatmul, ManyEqualsEachProductAlone) {
  const int64_t in = 576;
  auto make = [&](const char* name, int64_t out, uint64_t seed) {
    return quantize(Tensor::randn({out, in}, seed, 0.05), parse_quant_format(name));
  };
  struct Set {
    const char* what;
    std::vector<std::pair<const char*, int64_t>> ws;
  };
  const Set sets[] = {{"q4_1 q/k/v", {{"q4_1", 48}, {"q4_1", 16}, {"q4_1", 16}}},
                      {"q4_1 gate/up, leftover rows", {{"q4_1", 37}, {"q4_1", 21}}},
                      {"q8_0 + q4_0", {{"q8_0", 40}, {"q4_0", 19}}},
                      {"int4g64 (another activation order) + q4_1", {{"int4g64", 32}, {"q4_1", 32}}},
                      {"int2g64 + int4g64", {{"int2g64", 17}, {"int4g64", 33}}},
                      {"ternary + q4_1", {{"ternary", 32}, {"q4_1", 16}}},
                      {"ptq161 q/k/v (the panel kernel in one region)", {{"ptq161", 48}, {"ptq161", 17}, {"ptq161", 16}}},
                      {"ptq161 + q4_1", {{"ptq161", 20}, {"q4_1", 16}}}};
  int compared = 0;
  for (const Set& set : sets) {
    std::vector<QuantizedTensor> qs;
    for (size_t i = 0; i < set.ws.size(); ++i) qs.push_back(make(set.ws[i].first, set.ws[i].second, 40 + i));
    std::vector<ops::PackedWeight> views;
    for (const QuantizedTensor& q : qs) views.push_back(q.packed_view());
    std::vector<const ops::PackedWeight*> wp;
    for (const ops::PackedWeight& v : views) wp.push_back(&v);
    for (int64_t M : {1, 3, 8, 12})
      for (auto path : {ops::QuantMatmulPath::Auto, ops::QuantMatmulPath::Int8, ops::QuantMatmulPath::Exact})
        for (bool panels : {true, false})
          for (bool scoped : {false, true}) {
            SCOPED_TRACE(std::string(set.what) + " M=" + std::to_string(M) + " path " + std::to_string(int(path)) +
                         (panels ? " panels" : " quads") + (scoped ? " in a shared-input scope" : ""));
            const ops::QuantMatmulOptions opt{path, ops::QuantIsa::Auto, panels};
            const Tensor x = test_input(M, in, 60 + uint64_t(M));
            std::vector<Tensor> ys;
            std::vector<Tensor*> yp;
            for (const ops::PackedWeight& v : views) ys.push_back(Tensor::full({M, v.out}, std::nanf("")));
            for (Tensor& y : ys) yp.push_back(&y);
            {
              std::optional<ops::QuantSharedInputScope> shared;
              if (scoped) shared.emplace();
              ops::quant_matmul_many(x, wp, yp, opt);
            }
            for (size_t i = 0; i < views.size(); ++i) {
              Tensor alone = Tensor::empty({M, views[i].out});
              ops::quant_matmul(x, views[i], alone, opt);
              const float *a = alone.data<float>(), *b = ys[i].data<float>();
              for (int64_t e = 0; e < alone.numel(); ++e) ASSERT_EQ(b[e], a[e]) << "product " << i << ", output " << e;
              ++compared;
            }
          }
  }
  EXPECT_GT(compared, 0);
  // Mismatched lists and a wrong output shape are errors.
  const QuantizedTensor q = make("q4_1", 16, 7);
  const ops::PackedWeight v = q.packed_view();
  Tensor y = Tensor::empty({2, 16}), bad = Tensor::empty({2, 15});
  const Tensor x = test_input(2, in, 3);
  EXPECT_THROW(ops::quant_matmul_many(x, {&v, &v}, {&y}), Error);
  EXPECT_THROW(ops::quant_matmul_many(x, {&v, &v}, {&y, &bad}), Error);
}

// The batched decode GEMM (the Int8 body's eight-row panels, AVX2 / VNNI): every M of a serving
// step's range, every format, weight-row counts that leave a remainder for the four-row and the
// single-row kernels (odd counts), rows of one and of several decoded tiles (72 blocks > 64), and
// `in` not a multiple of 32 (IntGroups tails). Each cell: within the int8 bound of the reference
// body (as in the table above), and every activation row's outputs bit-identical to the same row
// run alone (M = 1), panels on or off (a sequence's numbers do not depend on its batch).
TEST(QuantMatmul, Int8GemmEveryBatchSizeMatchesTheReferenceAndTheRowAlone) {
  struct OutIn {
    int64_t out, in;
  };
  const OutIn shapes[] = {{21, 96}, {37, 256}, {19, 2304}, {29, 200}};
  const int64_t Ms[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 33, 64};
  struct Body {
    const char* name;
    ops::QuantIsa isa;
    bool panels;
    bool avxvnni = false;  // the 256-bit AVX-VNNI copy even where AVX-512 VNNI is present
  };
  const Body bodies[] = {{"portable", ops::QuantIsa::Portable, true},
                         {"avx2", ops::QuantIsa::Avx2, true},
                         {"avx2-quad", ops::QuantIsa::Avx2, false},
                         {"avx2-vnni", ops::QuantIsa::Avx2Vnni, true},
                         {"avx2-vnni-quad", ops::QuantIsa::Avx2Vnni, false},
                         {"avx-vnni-256", ops::QuantIsa::Avx2Vnni, true, true},
                         {"avx-vnni-256-quad", ops::QuantIsa::Avx2Vnni, false, true}};
  int run = 0, panel_cells = 0, panel_differs = 0, panel_layout_cells = 0;
  std::string skipped;
  for (const QuantFormat& f : all_quant_formats()) {
    for (const OutIn& s : shapes) {
      if (!f.row_fits(s.in)) continue;
      QuantizedTensor q;
      try {
        q = quantize(Tensor::randn({s.out, s.in}, 11 + uint64_t(s.in), 0.05), f);
      } catch (const Error&) {
        continue;  // no reference quantizer (reported by the table test)
      }
      if (f.has_column_mask()) vary_column_factors(q);
      const ops::PackedWeight view = q.packed_view();
      if (!ops::quant_matmul_has_int8_kernel(view)) continue;
      const Tensor wd = q.dequantize();
      const std::vector<QuantizedTensor> panels = panel_layouts(q);  // every cell again on them, bit for bit
      const int64_t Mmax = 64;
      const Tensor x = test_input(Mmax, s.in, 5 + uint64_t(s.out));
      Tensor yref = Tensor::empty({Mmax, s.out});
      ops::quant_matmul(x, view, yref, {ops::QuantMatmulPath::Reference});
      const float *px = x.data<float>(), *pw = wd.data<float>();
      std::vector<double> tol(size_t(Mmax * s.out));
      for (int64_t m = 0; m < Mmax; ++m)
        for (int64_t o = 0; o < s.out; ++o) {
          double sc = 0, rb = 0;
          const int64_t ab = ops::quant_matmul_act_block(view);  // 256 for the ternary layouts
          for (int64_t b0 = 0; b0 < s.in; b0 += ab) {
            const int64_t b1 = std::min(s.in, b0 + ab);
            double amax = 0;
            for (int64_t i = b0; i < b1; ++i) amax = std::max(amax, std::fabs(double(px[m * s.in + i])));
            for (int64_t i = b0; i < b1; ++i) {
              const double wi = std::fabs(double(pw[o * s.in + i]));
              sc += wi * std::fabs(double(px[m * s.in + i]));
              rb += wi * amax / 127.0 / 2.0;
            }
          }
          if (f.has_column_mask()) rb = masked_int8_bound(q, px + m * s.in, o);
          tol[size_t(m * s.out + o)] = 1e-5 * sc + 1e-7 + rb * (1 + 1e-3);
        }
      Tensor quad_y;  // the previous body's M = 64 product (the panel body comes first, then quad)
      for (const Body& be : bodies) {
        if (!ops::quant_isa_supported(be.isa) || (be.avxvnni && !force_avxvnni(true))) {
          if (skipped.find(be.name) == std::string::npos) skipped += std::string(" ") + be.name;
          continue;
        }
        struct Unforce {
          ~Unforce() { force_avxvnni(false); }
        } unforce;
        const ops::QuantMatmulOptions opt{ops::QuantMatmulPath::Int8, be.isa, be.panels};
        // Each row alone.
        Tensor alone = Tensor::empty({Mmax, s.out});
        for (int64_t m = 0; m < Mmax; ++m) {
          Tensor y1 = Tensor::empty({1, s.out});
          ops::quant_matmul(x.slice(0, m, m + 1).contiguous(), view, y1, opt);
          std::memcpy(alone.data<float>() + m * s.out, y1.data<float>(), size_t(s.out) * sizeof(float));
        }
        for (int64_t M : Ms) {
          SCOPED_TRACE(std::string(f.name) + " x " + be.name + " x [" + std::to_string(s.out) + "x" +
                       std::to_string(s.in) + "] M=" + std::to_string(M));
          Tensor y = Tensor::empty({M, s.out});
          const Tensor xm = x.slice(0, 0, M).contiguous();
          ops::quant_matmul(xm, view, y, opt);
          expect_panel_layouts_equal(panels, xm, y, opt, panel_layout_cells);
          ++run;
          const float *py = y.data<float>(), *pr = yref.data<float>(), *pa = alone.data<float>();
          for (int64_t i = 0; i < M * s.out; ++i) {
            ASSERT_LE(std::fabs(double(py[i]) - double(pr[i])), tol[size_t(i)]) << "output " << i;
            ASSERT_EQ(py[i], pa[i]) << "output " << i << " differs from its row run alone";
          }
          // (ptq161 has one x86 kernel per ISA, panels or not: no panel order to compare)
          if (M != Mmax || be.isa == ops::QuantIsa::Portable || f.has_column_mask()) continue;
          if (be.panels) {
            quad_y = y;
          } else if (quad_y.defined()) {  // the panels ran (their float order differs from the quads')
            ++panel_cells;
            panel_differs += max_abs_diff(quad_y, y) > 0.0 ? 1 : 0;
          }
        }
      }
    }
  }
  // The panel body ran: its float order differs from the four-row kernels', so most cells differ.
  if (ops::quant_isa_supported(ops::QuantIsa::Avx2)) {
    EXPECT_GT(panel_differs, panel_cells / 2);
  }
  std::printf("int8 GEMM cells: %d run, %d on the panel layouts (ISA best here: %s)%s%s\n", run, panel_layout_cells,
              ops::quant_isa_name(ops::quant_isa_best()), skipped.empty() ? "" : "; not supported by this CPU, skipped:",
              skipped.c_str());
  EXPECT_GT(run, 0);
  EXPECT_GT(panel_layout_cells, 0);
}

// ptq161 (SalientBinary): the x86 int8 kernels (sign bits expanded to bytes, integer dot products;
// AVX2, AVX-512 VNNI, AVX-VNNI) quantize the same gathered activations into the same codes and
// block scales as the portable body (256-entry tables), so they equal it up to f32 summation order:
// within 1e-5 of the sum of the magnitudes the two formulations add (far below the int8 rounding
// bound the table test allows, so a kernel that drops or misplaces a block fails here). Both x86
// bodies: the panel kernel (int8_panels, the default: 16 weight rows per pass on AVX-512, 8 on
// 256-bit vectors, one row per lane; every M, prefill included) and the four-row kernels (panels
// off). Widths cover every tail: binary columns not a multiple of 8 or 32, salient columns odd and
// not a multiple of 32, none (in = 3: quantize() keeps in / 5 salient columns), several tile chunks
// (in = 8192: 205 binary blocks, 52 salient ones); varied column factors. Row counts below four, a
// multiple of four, ones leaving 1-3 rows (the quads' last partial pass repeats its last row),
// 1-15 rows past a panel (the last partial panel repeats its last row); activation rows 1-16 and
// prefill-sized 33 (the panel's stored-tile form above 8 rows). A row's numbers depend neither on
// its pass nor on the batch: the same rows through a view that starts 1-3 rows later (other
// quads, other panels) are bit-identical, and so is every activation row run alone (M = 1).
TEST(QuantMatmul, SalientBinaryX86KernelsEqualThePortableInt8Body) {
  const QuantFormat& f = parse_quant_format("ptq161");
  struct Isa {
    const char* name;
    ops::QuantIsa isa;
    bool avxvnni;
  };
  const Isa isas[] = {{"avx2", ops::QuantIsa::Avx2, false},
                      {"avx2-vnni", ops::QuantIsa::Avx2Vnni, false},
                      {"avx-vnni-256", ops::QuantIsa::Avx2Vnni, true}};
  int run = 0, differs = 0;
  std::string skipped;
  int shifted = 0;
  const int64_t Mmax = 33;
  for (int64_t in : {3, 33, 64, 200, 257, 576, 1000, 1536, 8192})
  for (int64_t out : {1, 3, 4, 6, 13, 16, 17, 35}) {
    if (in == 8192 && out > 17) continue;  // (time: the chunks are covered at 1-17 rows)
    QuantizedTensor q = quantize(Tensor::randn({out, in}, 40 + uint64_t(in + out), 0.05), f);
    vary_column_factors(q);
    const ops::PackedWeight v = q.packed_view();
    ASSERT_EQ(v.layout, ops::PackedLayout::SalientBinary);
    // Per output: the magnitudes both formulations sum, |x w| over all columns plus
    // (|mu| + |alpha|) |r_j x_j| over the binary ones.
    const Tensor x = test_input(Mmax, in, 50 + uint64_t(in));
    const Tensor wd = q.dequantize();
    const uint8_t* mask = q.col_mask.data<uint8_t>();
    const auto* r = static_cast<const uint16_t*>(q.col_scales.raw_data());
    const auto* sc = static_cast<const uint16_t*>(q.scales.raw_data());
    const auto* zp = static_cast<const uint16_t*>(q.zeros.raw_data());
    std::vector<double> mag(size_t(Mmax * out));
    for (int64_t m = 0; m < Mmax; ++m)
      for (int64_t o = 0; o < out; ++o) {
        const double ma = std::fabs(f16_to_f32(sc[2 * o])) + std::fabs(f16_to_f32(zp[2 * o]));
        double s = 0;
        for (int64_t j = 0, t = 0; j < in; ++j) {
          const double xj = std::fabs(double(x.data<float>()[m * in + j]));
          s += xj * std::fabs(double(wd.data<float>()[o * in + j]));
          if (!(mask[j / 8] >> (j % 8) & 1)) s += ma * xj * std::fabs(double(f16_to_f32(r[t++])));
        }
        mag[size_t(m * out + o)] = s;
      }
    for (const Isa& is : isas)
    for (bool panels : {true, false}) {
      if (!ops::quant_isa_supported(is.isa) || (is.avxvnni && !force_avxvnni(true))) {
        if (skipped.find(is.name) == std::string::npos) skipped += std::string(" ") + is.name;
        continue;
      }
      struct Unforce {
        ~Unforce() { force_avxvnni(false); }
      } unforce;
      const ops::QuantMatmulOptions opt{ops::QuantMatmulPath::Int8, is.isa, panels};
      // Each activation row alone (M = 1).
      Tensor alone = Tensor::empty({Mmax, out});
      for (int64_t m = 0; m < Mmax; ++m) {
        Tensor y1 = Tensor::empty({1, out});
        ops::quant_matmul(x.slice(0, m, m + 1).contiguous(), v, y1, opt);
        std::memcpy(alone.data<float>() + m * out, y1.data<float>(), size_t(out) * sizeof(float));
      }
      for (int64_t M : {int64_t(1), int64_t(3), int64_t(4), int64_t(5), int64_t(8), int64_t(9), int64_t(16), Mmax}) {
        const Tensor xm = x.slice(0, 0, M).contiguous();
        Tensor yp = Tensor::empty({M, out});
        ops::quant_matmul(xm, v, yp, {ops::QuantMatmulPath::Int8, ops::QuantIsa::Portable});
        {
          SCOPED_TRACE(std::string(is.name) + (panels ? " panel" : " quad") + " [" + std::to_string(out) + "x" +
                       std::to_string(in) + "] salient " + std::to_string(v.salient) + " M=" + std::to_string(M));
          Tensor ys = Tensor::empty({M, out});
          ops::quant_matmul(xm, v, ys, opt);
          ++run;
          for (int64_t i = 0; i < M * out; ++i) {
            ASSERT_LE(std::fabs(double(ys.data<float>()[i]) - double(yp.data<float>()[i])), 1e-5 * mag[size_t(i)] + 1e-7)
                << "output " << i << ": " << ys.data<float>()[i] << " vs portable " << yp.data<float>()[i];
            ASSERT_EQ(ys.data<float>()[i], alone.data<float>()[i]) << "output " << i << " differs from its row run alone";
          }
          differs += max_abs_diff(ys, yp) > 0.0 ? 1 : 0;
          // Rows [o0, out) through a view starting at row o0: the same bits.
          for (int64_t o0 = 1; o0 <= std::min<int64_t>(3, out - 1); ++o0) {
            ops::PackedWeight sub = v;
            sub.out = out - o0;
            sub.codes = v.codes + o0 * v.row_bytes;
            sub.scales = v.scales + 2 * o0;
            sub.zeros = v.zeros + 2 * o0;
            sub.dequantize_row = [&v, o0](int64_t r, float* dst) { v.dequantize_row(r + o0, dst); };
            Tensor yo = Tensor::empty({M, sub.out});
            ops::quant_matmul(xm, sub, yo, opt);
            for (int64_t m = 0; m < M; ++m)
              for (int64_t o = 0; o < sub.out; ++o)
                ASSERT_EQ(yo.data<float>()[m * sub.out + o], ys.data<float>()[m * out + o0 + o])
                    << "row " << o0 + o << " of activation row " << m << " through a view from row " << o0;
            ++shifted;
          }
        }
      }
    }
  }
  EXPECT_TRUE(shifted > 0 || !ops::quant_isa_supported(ops::QuantIsa::Avx2));
  // The x86 kernels ran (their f32 order differs from the tables', so most cells differ in the last bits).
  if (ops::quant_isa_supported(ops::QuantIsa::Avx2)) {
    EXPECT_GT(run, 0);
    EXPECT_GT(differs, run / 2);
  }
  std::printf("ptq161 x86 kernel cells: %d run, %d differ from the portable body in f32 rounding%s%s\n", run, differs,
              skipped.empty() ? "" : "; not supported by this CPU, skipped:", skipped.c_str());
}

// The ternary layouts (the ternary format, ggml tq2_0 / tq1_0) have int8 kernels with 256-value
// activation blocks: their views carry the layout, and the SIMD four-row kernels give the portable
// body's numbers up to f32 summation order (the integer block sums are exact), for every row count
// (four-row groups, leftover rows, batched activation rows) — the table above bounds both against
// the reference.
TEST(QuantMatmul, TernaryLayoutsRunTheirInt8KernelsOnBlocksOf256) {
  const struct {
    const char* name;
    ops::PackedLayout layout;
  } kCases[] = {{"ternary", ops::PackedLayout::IntGroups}, {"tq2_0", ops::PackedLayout::GgmlTQ2_0},
                {"tq1_0", ops::PackedLayout::GgmlTQ1_0}};
  for (const auto& c : kCases) {
    SCOPED_TRACE(c.name);
    const int64_t out = 11, in = c.layout == ops::PackedLayout::IntGroups ? 600 : 768;  // ternary: a partial block
    const QuantizedTensor q = quantize(Tensor::randn({out, in}, 21, 0.05), parse_quant_format(c.name));
    const ops::PackedWeight v = q.packed_view();
    EXPECT_EQ(v.layout, c.layout);
    EXPECT_TRUE(ops::quant_matmul_has_int8_kernel(v));
    EXPECT_EQ(ops::quant_matmul_act_block(v), 256);
    // GPU form: tq2_0 yes; the ternary format only with whole 32-value blocks (not 600 columns); tq1_0 none.
    EXPECT_EQ(ops::quant_matmul_has_cuda_layout(v), c.layout == ops::PackedLayout::GgmlTQ2_0);
    // Integer activations whose every block of 256 holds +-127 quantize exactly (d = 1): then every
    // int8 body equals the reference up to f32 rounding, which pins the code and slot order down.
    {
      const int64_t M = 5;
      Tensor xi = Tensor::empty({M, in});
      for (int64_t i = 0; i < M * in; ++i)
        xi.data<float>()[i] = i % in % 256 == 7 ? 127.0f : float(int64_t((i * 2654435761u) % 255) - 127);
      Tensor yr = Tensor::empty({M, out});
      ops::quant_matmul(xi, v, yr, {ops::QuantMatmulPath::Reference});
      for (ops::QuantIsa isa : {ops::QuantIsa::Portable, ops::QuantIsa::Avx2, ops::QuantIsa::Avx2Vnni}) {
        if (!ops::quant_isa_supported(isa)) continue;
        Tensor yi = Tensor::empty({M, out});
        ops::quant_matmul(xi, v, yi, {ops::QuantMatmulPath::Int8, isa});
        for (int64_t i = 0; i < M * out; ++i)
          ASSERT_NEAR(yi.data<float>()[i], yr.data<float>()[i], 1e-5 * (1 + std::fabs(yr.data<float>()[i])) * in)
              << ops::quant_isa_name(isa) << " output " << i;
      }
    }
    for (int64_t M : {1, 3, 6}) {
      const Tensor x = test_input(M, in, 30 + uint64_t(M));
      Tensor yp = Tensor::empty({M, out}), ye = Tensor::empty({M, out});
      ops::quant_matmul(x, v, yp, {ops::QuantMatmulPath::Int8, ops::QuantIsa::Portable});
      ops::quant_matmul(x, v, ye, {ops::QuantMatmulPath::Exact});
      EXPECT_GT(max_abs_diff(yp, ye), 0.0);  // the int8 body ran, not a fallback to f32 activations
      for (ops::QuantIsa isa : {ops::QuantIsa::Avx2, ops::QuantIsa::Avx2Vnni}) {
        if (!ops::quant_isa_supported(isa)) continue;
        Tensor ys = Tensor::empty({M, out});
        ops::quant_matmul(x, v, ys, {ops::QuantMatmulPath::Int8, isa});
        for (int64_t i = 0; i < M * out; ++i)
          EXPECT_NEAR(ys.data<float>()[i], yp.data<float>()[i], 1e-5 * (1 + std::fabs(yp.data<float>()[i])))
              << ops::quant_isa_name(isa) << " M=" << M << " output " << i;
        // Row m of a batch gets the numbers it gets alone.
        Tensor y1 = Tensor::empty({1, out});
        ops::quant_matmul(x.slice(0, M - 1, M).contiguous(), v, y1, {ops::QuantMatmulPath::Int8, isa});
        for (int64_t o = 0; o < out; ++o) EXPECT_EQ(y1.data<float>()[o], ys.data<float>()[(M - 1) * out + o]);
      }
    }
  }
  // Rows of tq2_0 / tq1_0 are whole blocks of 256 (66 / 54 bytes): a view that says otherwise is refused.
  const QuantizedTensor q2 = quantize(Tensor::randn({4, 256}, 2, 0.05), parse_quant_format("tq2_0"));
  ops::PackedWeight bad = q2.packed_view();
  bad.row_bytes = 64;
  Tensor y = Tensor::empty({1, 4});
  EXPECT_THROW(ops::quant_matmul(Tensor::randn({1, 256}, 1), bad, y), Error);
}

// Auto at prefill shapes (M > kQuantDecodeMaxRows): the ternary layouts take the Int8 body (their
// int8 kernels beat dequantized f32 tiles at every prompt length measured, docs/results/bitnet.md),
// bit for bit what an explicit Int8 call gives, and within the int8 bound of the reference; so does
// ptq161 where its x86 panel kernel runs (docs/results/ptq161.md: faster than the tiles); a
// grouped 2-bit format (int2g64) still takes the Exact body there; the process default
// (--matmul exact) still wins over the ternary choice.
TEST(QuantMatmul, AutoPicksTheInt8BodyForTernaryPrefill) {
  for (const char* name : {"ternary", "tq2_0", "tq1_0", "int2g64", "ptq161"}) {
    SCOPED_TRACE(name);
    // ptq161: Int8 for every M where its x86 panel kernel runs (the portable tables: decode only).
    const bool ptq161 = std::string(name) == "ptq161";
    const bool ternary = std::string(name) != "int2g64" && (!ptq161 || ops::quant_isa_best() != ops::QuantIsa::Portable);
    const int64_t out = ptq161 ? 37 : 13, in = std::string(name) == "ternary" ? 600 : 512;
    QuantizedTensor q = quantize(Tensor::randn({out, in}, 41, 0.05), parse_quant_format(name));
    if (ptq161) vary_column_factors(q);
    const ops::PackedWeight v = q.packed_view();
    EXPECT_EQ(ops::quant_matmul_int8_prefill(v), ternary);
    for (int64_t M : {ops::kQuantDecodeMaxRows + 1, int64_t(64)}) {
      const Tensor x = test_input(M, in, 50 + uint64_t(M));
      auto run = [&](ops::QuantMatmulPath p) {
        Tensor y = Tensor::empty({M, out});
        ops::quant_matmul(x, v, y, {p});
        return y;
      };
      const Tensor yauto = run(ops::QuantMatmulPath::Auto), yint8 = run(ops::QuantMatmulPath::Int8),
                   yexact = run(ops::QuantMatmulPath::Exact), yref = run(ops::QuantMatmulPath::Reference);
      ASSERT_GT(max_abs_diff(yint8, yexact), 0.0);  // the two bodies differ, so the test can tell them apart
      EXPECT_EQ(max_abs_diff(yauto, ternary ? yint8 : yexact), 0.0) << "M=" << M;
      // The int8 rounding bound against the reference (activation blocks of quant_matmul_act_block).
      const Tensor wd = q.dequantize();
      const int64_t ab = ops::quant_matmul_act_block(v);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t o = 0; o < out; ++o) {
          double sc = 0, rb = 0;
          for (int64_t b0 = 0; b0 < in; b0 += ab) {
            double amax = 0;
            for (int64_t i = b0; i < std::min(in, b0 + ab); ++i) amax = std::max(amax, std::fabs(double(x.data<float>()[m * in + i])));
            for (int64_t i = b0; i < std::min(in, b0 + ab); ++i) {
              const double wi = std::fabs(double(wd.data<float>()[o * in + i]));
              sc += wi * std::fabs(double(x.data<float>()[m * in + i]));
              rb += wi * amax / 127.0 / 2.0;
            }
          }
          if (ptq161) rb = masked_int8_bound(q, x.data<float>() + m * in, o);
          const double err = std::fabs(double(yauto.data<float>()[m * out + o]) - double(yref.data<float>()[m * out + o]));
          EXPECT_LE(err, rb * (1 + 1e-3) + 1e-5 * sc + 1e-7) << "M=" << M << " row " << m << " out " << o;
        }
      if (ternary) {
        ops::set_quant_matmul_default(ops::QuantMatmulPath::Exact);
        EXPECT_EQ(max_abs_diff(run(ops::QuantMatmulPath::Auto), yexact), 0.0) << "M=" << M;
        ops::set_quant_matmul_default(ops::QuantMatmulPath::Auto);
      }
      {  // the block-wise pipeline's scope: ptq161 prefill back on Exact, the ternary layouts unchanged
        ops::QuantSalientPrefillExactScope scope;
        EXPECT_EQ(max_abs_diff(run(ops::QuantMatmulPath::Auto), ternary && !ptq161 ? yint8 : yexact), 0.0) << "M=" << M;
      }
    }
  }
}

// The ternary lookup-table kernel (ops/quant_matmul.h, "The ternary lookup-table layout") against
// the plain ternary kernel on the same int8 operand: the integer sums per block of 256 are the same,
// so the outputs differ only by f32 rounding of the per-block scaling (1e-6 relative to sum |x w|);
// its AVX2 copy equals its portable one bit for bit (the rows after the tiles: the plain kernel of
// that ISA, bit for bit); Auto takes it exactly when the weight has its
// index form, and an explicit Lut call without one is an error naming the fix. Shapes: one tile,
// tiles plus leftover rows (plain rows after them), a partial last block (in % 256), M = 1..9 (the
// kernel's chunks of up to 4 activation rows), and QuantActPerRowScope's per-row int4 operand.
TEST(QuantMatmul, TernaryLutKernelEqualsThePlainKernel) {
  const QuantFormat& f = parse_quant_format("ternary");
  struct S {
    int64_t out, in;
  };
  for (const S& s : {S{32, 256}, S{70, 600}, S{96, 1536}, S{33, 512}, S{64, 100}}) {
    QuantizedTensor q = quantize(Tensor::randn({s.out, s.in}, 61 + uint64_t(s.in), 0.05), f);
    const ops::PackedWeight plain = q.packed_view();
    ASSERT_TRUE(ops::quant_matmul_tl_supported(plain));
    EXPECT_EQ(ops::quant_matmul_tl_bytes(plain), s.out / 32 * ((s.in + 255) / 256) * 32 * 64);
    QuantizedTensor ql = q;
    ASSERT_TRUE(ql.to_tl_layout());
    const ops::PackedWeight lut = ql.packed_view();
    ASSERT_NE(lut.tl_codes, nullptr);
    for (int64_t M : {1, 2, 4, 5, 9}) {
      for (int act_bits : {0, 4}) {
        SCOPED_TRACE("[" + std::to_string(s.out) + "x" + std::to_string(s.in) + "] M=" + std::to_string(M) +
                     (act_bits ? " per-row int4" : ""));
        std::optional<ops::QuantActPerRowScope> per_row;
        if (act_bits) per_row.emplace(act_bits);
        const Tensor x = test_input(M, s.in, 70 + uint64_t(M));
        auto run = [&](const ops::PackedWeight& w, ops::QuantIsa isa, ops::TernaryBody tk,
                       ops::QuantMatmulPath p = ops::QuantMatmulPath::Int8) {
          Tensor y = Tensor::empty({M, s.out});
          ops::quant_matmul(x, w, y, {p, isa, true, ops::CudaGemv::Auto, tk});
          return y;
        };
        const Tensor yplain = run(plain, ops::QuantIsa::Portable, ops::TernaryBody::Auto);
        const Tensor ylut = run(lut, ops::QuantIsa::Portable, ops::TernaryBody::Lut);
        const Tensor wd = q.dequantize();
        for (int64_t m = 0; m < M; ++m)
          for (int64_t o = 0; o < s.out; ++o) {
            double sc = 0;
            for (int64_t i = 0; i < s.in; ++i)
              sc += std::fabs(double(x.data<float>()[m * s.in + i]) * double(wd.data<float>()[o * s.in + i]));
            ASSERT_LE(std::fabs(double(ylut.data<float>()[m * s.out + o]) - double(yplain.data<float>()[m * s.out + o])),
                      1e-6 * sc + 1e-8)
                << "row " << m << " out " << o;
          }
        // The plain kernel's own path when asked for (the index form is ignored).
        EXPECT_EQ(max_abs_diff(run(lut, ops::QuantIsa::Portable, ops::TernaryBody::Plain), yplain), 0.0);
        for (ops::QuantIsa isa : {ops::QuantIsa::Avx2, ops::QuantIsa::Avx2Vnni}) {
          if (!ops::quant_isa_supported(isa)) continue;
          SCOPED_TRACE(ops::quant_isa_name(isa));
          const Tensor ysimd = run(lut, isa, ops::TernaryBody::Lut), yps = run(plain, isa, ops::TernaryBody::Plain);
          // The tiles' rows: the portable lookup-table numbers; the rows after them: the plain
          // kernel's of this ISA (each row's arithmetic is independent of the others).
          const int64_t tiled = s.out / ops::kTernaryLutRows * ops::kTernaryLutRows;
          for (int64_t m = 0; m < M; ++m)
            for (int64_t o = 0; o < s.out; ++o)
              ASSERT_EQ(ysimd.data<float>()[m * s.out + o], (o < tiled ? ylut : yps).data<float>()[m * s.out + o])
                  << "row " << m << " out " << o;
          // Auto on a weight with the index form: the lookup-table kernel; without: the plain one.
          EXPECT_EQ(max_abs_diff(run(lut, isa, ops::TernaryBody::Auto, ops::QuantMatmulPath::Auto), ysimd), 0.0);
          EXPECT_EQ(max_abs_diff(run(plain, isa, ops::TernaryBody::Auto, ops::QuantMatmulPath::Auto), yps), 0.0);
        }
      }
    }
    test::expect_message([&] { (void)run_lut_without_index(plain, s.in); }, "index form");
  }
  // Formats without the index form: to_tl_layout declines; to_tl_layout refuses by name.
  QuantizedTensor tq = quantize(Tensor::randn({32, 256}, 3, 0.05), parse_quant_format("tq2_0"));
  EXPECT_FALSE(tq.to_tl_layout());
  EXPECT_FALSE(ops::quant_matmul_tl_supported(quantize(Tensor::randn({31, 256}, 3, 0.05), f).packed_view()));
  std::vector<uint8_t> buf(1 << 16);
  test::expect_message([&] { ops::quant_matmul_to_tl_layout(tq.packed_view(), buf.data()); }, "no lookup-table layout");
}

// QuantSharedInputScope (serving's q / k / v and gate / up products): inside the scope, products
// that read the same input reuse its int8 activations and panel copy; every product's numbers stay
// bit-identical to the product alone, whatever the sequence of weights (formats with other
// activation orders, panel and non-panel bodies, another row count or width on the same pointer,
// another input in between, a ternary weight with its own activation blocks).
TEST(QuantMatmul, SharedInputScopeKeepsEveryProductsNumbers) {
  const int64_t in = 256, M = 8;
  std::vector<std::pair<std::string, QuantizedTensor>> ws;
  for (const char* name : {"q4_1", "q4_0", "q8_0", "int4g128", "int2g64", "int8pc", "ternary"}) {
    const QuantFormat* f = nullptr;
    try {
      f = &parse_quant_format(name);
    } catch (const Error&) {
      continue;
    }
    if (!f->row_fits(in)) continue;
    try {
      QuantizedTensor q = quantize(Tensor::randn({48, in}, 3 + ws.size(), 0.05), *f);
      if (ops::quant_matmul_has_int8_kernel(q.packed_view())) ws.emplace_back(name, std::move(q));
    } catch (const Error&) {
    }
  }
  ASSERT_GE(ws.size(), 3u);
  const Tensor x = test_input(M, in, 17), x2 = test_input(M, in, 18);
  for (bool panels : {true, false}) {
    const ops::QuantMatmulOptions opt{ops::QuantMatmulPath::Int8, ops::QuantIsa::Auto, panels};
    auto product = [&](const Tensor& a, const QuantizedTensor& q) {
      Tensor y = Tensor::empty({a.size(0), q.packed_view().out});
      ops::quant_matmul(a, q.packed_view(), y, opt);
      return y;
    };
    // Alone (no scope): the reference numbers.
    std::vector<Tensor> want, want2, want_rows;
    for (auto& [name, q] : ws) {
      want.push_back(product(x, q));
      want2.push_back(product(x2, q));
      want_rows.push_back(product(x.slice(0, 0, 3), q));
    }
    ops::QuantSharedInputScope shared;
    for (int rep = 0; rep < 2; ++rep)
      for (size_t i = 0; i < ws.size(); ++i) {
        SCOPED_TRACE(ws[i].first + (panels ? " panels" : " quads") + " rep " + std::to_string(rep));
        EXPECT_EQ(max_abs_diff(product(x, ws[i].second), want[i]), 0.0);
        EXPECT_EQ(max_abs_diff(product(x, ws[(i + 1) % ws.size()].second), want[(i + 1) % ws.size()]), 0.0);
        EXPECT_EQ(max_abs_diff(product(x.slice(0, 0, 3), ws[i].second), want_rows[i]), 0.0);  // same pointer, 3 rows
        EXPECT_EQ(max_abs_diff(product(x2, ws[i].second), want2[i]), 0.0);
        EXPECT_EQ(max_abs_diff(product(x, ws[i].second), want[i]), 0.0);
      }
  }
}

// QuantActPerRowScope (the packed W4A8 / W4A4 product of `--act int8|int4`): on an input fake-quantized
// per row to the symmetric int8 / int4 grid (ops::fake_quant, clip 1: what the model's act_in feeds the
// block linears), every plain layout's Int8 body, and the Auto path at every row count, gives the
// Reference product of that input to f32 rounding (1e-5) — no int8 rounding term: the integer codes
// are the fake quantization's. A body quantizing per block of 32 would fail this bound (it rounds
// the codes again). Other layouts (ternary, tp2g128, ptq161) keep their own activation blocks.
TEST(QuantMatmul, ActPerRowScopeEqualsTheFakeQuantizedReference) {
  int run = 0;
  for (const QuantFormat& f : all_quant_formats()) {
    for (const Shape3& s : kShapes) {
      if (!f.row_fits(s.in)) continue;
      QuantizedTensor q;
      try {
        q = quantize(Tensor::randn({s.out, s.in}, 11 + uint64_t(s.in), 0.05), f);
      } catch (const Error&) {
        continue;
      }
      const ops::PackedWeight view = q.packed_view();
      if (!ops::quant_matmul_has_int8_kernel(view) || view.layout == ops::PackedLayout::TritPlanes ||
          view.layout == ops::PackedLayout::SalientBinary || ops::quant_matmul_act_block(view) != 32)
        continue;
      const Tensor x = test_input(s.M, s.in, 5 + uint64_t(s.out));
      for (int bits : {8, 4}) {
        Tensor fq = Tensor::empty({s.M, s.in});
        ops::fake_quant(x, bits, false, 1.0, s.in, false, fq);
        Tensor yref = Tensor::empty({s.M, s.out});
        ops::quant_matmul(fq, view, yref, {ops::QuantMatmulPath::Reference});
        const Tensor wd = q.dequantize();
        for (auto [path, isa] : {std::pair{ops::QuantMatmulPath::Auto, ops::QuantIsa::Auto},
                                 std::pair{ops::QuantMatmulPath::Int8, ops::QuantIsa::Portable},
                                 std::pair{ops::QuantMatmulPath::Int8, ops::QuantIsa::Avx2},
                                 std::pair{ops::QuantMatmulPath::Int8, ops::QuantIsa::Avx2Vnni}}) {
          if (!ops::quant_isa_supported(isa)) continue;
          SCOPED_TRACE(std::string(f.name) + " A" + std::to_string(bits) + " isa " + ops::quant_isa_name(isa) + " [" +
                       std::to_string(s.out) + "x" + std::to_string(s.in) + "] M=" + std::to_string(s.M));
          Tensor y = Tensor::empty({s.M, s.out});
          {
            ops::QuantActPerRowScope per_row(bits);
            ops::quant_matmul(fq, view, y, {path, isa});
          }
          ++run;
          for (int64_t m = 0; m < s.M; ++m)
            for (int64_t o = 0; o < s.out; ++o) {
              double sc = 0;
              for (int64_t i = 0; i < s.in; ++i)
                sc += std::fabs(double(wd.data<float>()[o * s.in + i]) * double(fq.data<float>()[m * s.in + i]));
              const double err = std::fabs(double(y.data<float>()[m * s.out + o]) - double(yref.data<float>()[m * s.out + o]));
              ASSERT_LE(err, 1e-5 * sc + 1e-7) << "row " << m << " out " << o;
            }
        }
      }
    }
  }
  std::printf("act per-row scope: %d cells run\n", run);
  EXPECT_GT(run, 50);
}

// Inside the scope Auto sends a prefill-sized product (M > 8) of a plain layout to the Int8 body
// (equal to Int8 in the scope, different from Exact); after the scope Auto is Exact again.
TEST(QuantMatmul, ActPerRowScopeSendsPrefillToTheInt8Body) {
  const int64_t out = 24, in = 256, M = 40;
  for (const char* name : {"int4g128", "q4_0"}) {
    SCOPED_TRACE(name);
    const QuantizedTensor q = quantize(Tensor::randn({out, in}, 21, 0.05), parse_quant_format(name));
    const ops::PackedWeight v = q.packed_view();
    const Tensor x = test_input(M, in, 23);
    auto run = [&](ops::QuantMatmulPath p, bool scope) {
      Tensor y = Tensor::empty({M, out});
      std::optional<ops::QuantActPerRowScope> s;
      if (scope) s.emplace(8);
      ops::quant_matmul(x, v, y, {p});
      return y;
    };
    const Tensor yexact = run(ops::QuantMatmulPath::Exact, false), yauto_scope = run(ops::QuantMatmulPath::Auto, true);
    EXPECT_EQ(max_abs_diff(yauto_scope, run(ops::QuantMatmulPath::Int8, true)), 0.0);
    EXPECT_GT(max_abs_diff(yauto_scope, yexact), 1e-6);
    EXPECT_GT(max_abs_diff(yauto_scope, run(ops::QuantMatmulPath::Int8, false)), 1e-6);  // per row != per block
    EXPECT_EQ(max_abs_diff(run(ops::QuantMatmulPath::Auto, false), yexact), 0.0);
    EXPECT_THROW(ops::QuantActPerRowScope(9), Error);
  }
}

// The panel layout at load (QuantizedTensor::to_panel_layout): a permutation of the same bytes in
// place (same storage, same size), every row decoding to the same values, the storage layout given
// back by row_layout() and QuantLinear::quantized() (what checkpoint writers read) byte for byte,
// products through QuantLinear unchanged; slicing and the GPU upload refuse the panel layout.
// Row counts: whole panels, whole panels plus 1..15 rows, fewer rows than a panel (unchanged).
TEST(QuantMatmul, PanelLayoutAtLoadIsALosslessPermutation) {
  const int64_t h = ops::quant_matmul_panel_height(
      quantize(Tensor::randn({16, 64}, 1, 0.05), parse_quant_format("q4_1")).packed_view());
  if (h == 0) GTEST_SKIP() << "no x86 panel kernel on this CPU (" << ops::quant_isa_name(ops::quant_isa_best()) << ")";
  int checked = 0;
  for (const char* name : {"q4_0", "q4_1", "q8_0", "int4g128", "int2g64", "int4g32", "int8pc", "int4pc", "int2g32s", "int4g128s"}) {
    const QuantFormat* fp = nullptr;
    try {
      fp = &parse_quant_format(name);
    } catch (const Error&) {
      continue;  // a name this build does not define
    }
    for (int64_t out : {int64_t(7), h, 2 * h, 2 * h + 1, 3 * h - 1, 5 * h + 3}) {
      const int64_t in = 256;
      SCOPED_TRACE(std::string(name) + " [" + std::to_string(out) + "x" + std::to_string(in) + "]");
      const QuantizedTensor q = quantize(Tensor::randn({out, in}, 17 + uint64_t(out), 0.05), *fp);
      QuantizedTensor p = q;
      p.codes = q.codes.clone();  // an owned copy: rearranged in place
      const void* storage = p.codes.raw_data();
      const bool done = p.to_panel_layout();
      ASSERT_EQ(done, out >= h) << "a weight of fewer rows than a panel keeps the storage layout";
      if (!done) {
        EXPECT_EQ(p.panel_rows, 0);
        continue;
      }
      ++checked;
      EXPECT_EQ(p.panel_rows, h);
      EXPECT_EQ(p.codes.raw_data(), storage) << "rearranged in place";
      EXPECT_EQ(p.nbytes(), q.nbytes());
      EXPECT_NE(std::memcmp(p.codes.raw_data(), q.codes.raw_data(), q.codes.nbytes()), 0);
      EXPECT_EQ(max_abs_diff(p.dequantize(), q.dequantize()), 0.0);
      const QuantizedTensor back = p.row_layout();
      EXPECT_EQ(back.panel_rows, 0);
      EXPECT_EQ(std::memcmp(back.codes.raw_data(), q.codes.raw_data(), q.codes.nbytes()), 0);
      QuantLinear ql(p);
      const QuantizedTensor written = ql.quantized();
      EXPECT_EQ(written.panel_rows, 0);
      EXPECT_EQ(std::memcmp(written.codes.raw_data(), q.codes.raw_data(), q.codes.nbytes()), 0);
      EXPECT_EQ(ql.packed().panel_rows, h);
      QuantLinear ref(q);
      for (int64_t M : {1, 3, 8, 9, 40}) {
        const Var x(test_input(M, in, 5 + uint64_t(M)), false);
        EXPECT_EQ(max_abs_diff(ql.forward(x).value(), ref.forward(x).value()), 0.0) << "M = " << M;
      }
      EXPECT_THROW(p.slice_rows(0, 1), Error);
      EXPECT_THROW(p.upload_to_device(), Error);
      EXPECT_NO_THROW(ql.shard(ShardAxis::Rows, 0, 1, Device::CPU));  // from the row layout
    }
  }
  EXPECT_GT(checked, 0);
}

// Issue 10: a row of activations gets the same numbers, bit for bit, whichever other rows share the
// call and however many threads run it — what a user expects of a server that batches sequences
// (a greedy answer must not change with the number of concurrent clients), and of a perplexity run
// that reads a window whole or in pieces (`eval ppl --kv-chunk`). For every format and shapes with
// and without tails: each row of quant_matmul(x) with M in {1, 2, 3, 7, 8, 17, 64} rows, on 1 and
// 2 threads, equals quant_matmul of that row alone on 1 thread.
//   exact (every ISA: portable, AVX2, the AVX-512 register copy): M <= 8 and M > 8 take the decode
//   and the tiled body, both summing every output in qmm::F32DotRows' one order; the ISAs give the
//   same numbers too (each row also equals the portable body's).
//   int8 (every ISA) and Auto inside QuantInt8RowsScope (what serving's batched steps run): the
//   int8 bodies. Auto without the scope is not row-independent by design: it takes the Int8 body
//   up to kQuantDecodeMaxRows rows and the Exact body (f32 activations) for longer prompts.
TEST(QuantMatmul, ExactAndInt8RowsDoNotDependOnTheBatch) {
  struct OutIn {
    int64_t out, in;
  };
  const OutIn shapes[] = {{37, 200}, {29, 256}, {19, 576}, {11, 1000}};
  const int64_t Ms[] = {1, 2, 3, 7, 8, 17, 64};
  const int64_t Mmax = 64;
  struct Body {
    const char* name;
    ops::QuantMatmulPath path;
    ops::QuantIsa isa;
    bool int8_scope = false;  // inside QuantInt8RowsScope(Mmax)
  };
  const Body bodies[] = {{"exact-portable", ops::QuantMatmulPath::Exact, ops::QuantIsa::Portable},
                         {"exact-avx2", ops::QuantMatmulPath::Exact, ops::QuantIsa::Avx2},
                         {"exact-avx2-vnni", ops::QuantMatmulPath::Exact, ops::QuantIsa::Avx2Vnni},
                         {"exact", ops::QuantMatmulPath::Exact, ops::QuantIsa::Auto},
                         {"int8-portable", ops::QuantMatmulPath::Int8, ops::QuantIsa::Portable},
                         {"int8-avx2", ops::QuantMatmulPath::Int8, ops::QuantIsa::Avx2},
                         {"int8-avx2-vnni", ops::QuantMatmulPath::Int8, ops::QuantIsa::Avx2Vnni},
                         {"auto-in-int8-rows-scope", ops::QuantMatmulPath::Auto, ops::QuantIsa::Auto, true}};
  const int threads_before = num_threads();
  struct RestoreThreads {
    int n;
    ~RestoreThreads() { set_num_threads(n); }
  } restore{threads_before};
  int cells = 0;
  std::string skipped;
  for (const QuantFormat& f : all_quant_formats())
    for (const OutIn& s : shapes) {
      if (!f.row_fits(s.in)) continue;
      QuantizedTensor q;
      try {
        q = quantize(Tensor::randn({s.out, s.in}, 17 + uint64_t(s.in), 0.05), f);
      } catch (const Error&) {
        continue;  // no reference quantizer (reported by the table test)
      }
      if (f.has_column_mask()) vary_column_factors(q);
      const ops::PackedWeight view = q.packed_view();
      const Tensor x = test_input(Mmax, s.in, 23 + uint64_t(s.out));
      Tensor exact_alone;  // exact-portable's rows alone: every exact ISA must give these numbers
      for (const Body& be : bodies) {
        if (!ops::quant_isa_supported(be.isa)) {
          if (skipped.find(be.name) == std::string::npos) skipped += std::string(" ") + be.name;
          continue;
        }
        const ops::QuantMatmulOptions opt{be.path, be.isa};
        auto product = [&](const Tensor& xm, int threads) {
          set_num_threads(threads);
          std::optional<ops::QuantInt8RowsScope> scope;
          if (be.int8_scope) scope.emplace(Mmax);
          Tensor y = Tensor::full({xm.size(0), s.out}, std::nanf(""));
          ops::quant_matmul(xm, view, y, opt);
          return y;
        };
        Tensor alone = Tensor::empty({Mmax, s.out});
        for (int64_t m = 0; m < Mmax; ++m) {
          const Tensor y1 = product(x.slice(0, m, m + 1).contiguous(), 1);
          std::memcpy(alone.data<float>() + m * s.out, y1.data<float>(), size_t(s.out) * sizeof(float));
        }
        const std::string what = std::string(f.name) + " x " + be.name + " [" + std::to_string(s.out) + "x" +
                                 std::to_string(s.in) + "]";
        if (be.path == ops::QuantMatmulPath::Exact) {
          if (!exact_alone.defined()) exact_alone = alone;
          for (int64_t i = 0; i < alone.numel(); ++i)
            ASSERT_EQ(alone.data<float>()[i], exact_alone.data<float>()[i])
                << what << ": output " << i << " of the rows alone differs from exact-portable's";
        }
        for (int64_t M : Ms)
          for (int threads : {1, 2}) {
            const Tensor y = product(x.slice(0, 0, M).contiguous(), threads);
            ++cells;
            for (int64_t i = 0; i < M * s.out; ++i)
              ASSERT_EQ(y.data<float>()[i], alone.data<float>()[i])
                  << what << " M=" << M << " threads " << threads << ": output " << i << " (row " << i / s.out
                  << ") differs from its row run alone";
          }
      }
    }
  std::printf("row-independence cells: %d (M x threads x body x format x shape)%s%s\n", cells,
              skipped.empty() ? "" : "; not supported by this CPU, skipped:", skipped.c_str());
  EXPECT_GT(cells, 0);
}
